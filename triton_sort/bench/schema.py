"""The one CSV schema of every measurement under ``perf_reports/`` (``report``, ``scaling``, ``memory``).

Long format, one row per measurement, the same columns in every file (``COLUMNS``), so ``pandas.concat`` of any of
them works and ``plots`` draws any of them. Rows are written as they are measured (``RowWriter`` flushes each), so a
run stopped halfway keeps what it measured. The CLIs call ``check_writable`` on their output folder and validate
their arguments (``positive_int``, ``positive_float``) before measuring anything.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

import torch

COLUMNS = ("tool", "variant", "pass", "batch", "n", "tau", "d", "dtype", "device", "metric", "unit", "median", "p20",
           "p80", "status", "note", "package_version", "commit", "timestamp")
# Columns a row must set; the others are filled in by the writer (device, version, commit, timestamp) or left empty.
POINT = ("batch", "n", "tau", "d", "dtype")
STATUSES = ("ok", "skipped", "failed")


def machine_name() -> str:
    """The ``device`` column and the report folder: the GPU's name, or ``cpu-<arch>``."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "-")
    return f"cpu-{platform.machine()}"


def machine_description() -> str:
    """The device's name and, on CPU, the processor model and core count (for report headers)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


def commit() -> str:
    """Short commit of the working tree (with '+dirty' if tracked files changed), '' outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return ""
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=root, timeout=30).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return ""
    return head.stdout.strip() + ("+dirty" if dirty else "")


class RowWriter:
    """Collects rows (``.rows``) and, with a ``path``, appends each to the CSV as it comes, flushed.

    ``tool`` is the command writing the rows (``report``, ``scaling``, ``memory``); device, package version, commit
    and a timestamp (the run's start) are filled in once for every row."""

    def __init__(self, tool: str, path: Path | None = None) -> None:
        from .. import __version__

        self.rows: list[dict] = []
        self.common = {"tool": tool, "device": machine_name(), "package_version": __version__, "commit": commit(),
                       "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self._handle: IO[str] | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(path, "w", newline="")  # closed in close(): rows are appended live
            self._writer = csv.DictWriter(self._handle, fieldnames=COLUMNS)
            self._writer.writeheader()
            self._handle.flush()

    def add(self, variant: str, pass_: str, point: tuple[int, int, float, int, str], metric: str, unit: str = "",
            values: tuple[float, ...] = (), status: str = "ok", note: str = "") -> dict:
        """One row; ``point`` is (batch, n, tau, d, dtype); ``values`` (median[, p20, p80]) or () when not measured."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        median, p20, p80 = (*values, "", "", "")[:3]
        row = {**self.common, **dict(zip(POINT, point, strict=True)), "variant": variant, "pass": pass_,
               "metric": metric, "unit": unit, "median": median, "p20": p20, "p80": p80, "status": status,
               "note": note}
        self.rows.append(row)
        if self._handle is not None:
            self._writer.writerow(row)
            self._handle.flush()
        return row

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_csv(path: Path) -> list[dict]:
    """The rows of a schema CSV, values as strings (as written)."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{path}: columns {reader.fieldnames} are not the perf_reports schema {COLUMNS}")
        return list(reader)


def write_csv(rows: list[dict], path: Path) -> None:
    """All ``rows`` at once (for rows already measured; ``RowWriter`` writes them live)."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def error_text(exc: BaseException) -> str:
    """``Type: first line of the message`` for a failed row's note."""
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


# ------------------------------------------------------------------------------------ argument validation
def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0 whose inverse is finite too (tau)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0 and math.isfinite(1.0 / value)):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def check_writable(parser: argparse.ArgumentParser, folder: Path, option: str = "--out") -> Path:
    """Create ``folder`` and write a probe file in it, or stop with an argparse error naming ``option``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        parser.error(f"{option}: cannot write to {folder}: {exc.strerror or exc}")
    if not os.access(folder, os.W_OK):
        parser.error(f"{option}: cannot write to {folder}")
    return folder
