"""The tuning cache: one readable JSON file per device, ``<cache dir>/autotune/<device>-<arch>.json``.

Layout (``SCHEMA`` 1; the package's shipped defaults in ``autotune/tuned/`` use the same one)::

    {"schema": 1, "device": "h100", "arch": "sm90", "device_name": "NVIDIA H100 80GB HBM3", "triton": "3.1.0",
     "kernels": {"apply_forward": {"source_hash": "3f2a...", "entries": {"fp32/d16/n1024": {
         "config": {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2}, "time_ms": ..., ...}}}}}

Writers take an exclusive ``flock`` on ``<file>.lock`` around read-merge-write and replace the file atomically
(temporary file + ``os.replace``), so concurrent tuners lose nothing and readers, which take no lock, never see a
half-written file. A file that cannot be used (unreadable, not UTF-8, not JSON, another layout, schema or Triton
version) raises ``CacheProblem`` on reading (``read``) and is replaced, with a warning, on the next write.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

try:
    import fcntl
except ImportError:  # not on Linux: Triton (and so tuning) is Linux-only, reading needs no lock
    fcntl = None

from .keys import DeviceKey

if TYPE_CHECKING:
    from importlib.abc import Traversable

SCHEMA = 1


class CacheProblem(Exception):
    """A tuning file that cannot be used; the message says why."""


def cache_dir() -> Path:
    """``$TRITON_SORT_CACHE_DIR``, else ``$XDG_CACHE_HOME/triton_sort``, else ``~/.cache/triton_sort``."""
    if os.environ.get("TRITON_SORT_CACHE_DIR"):
        return Path(os.environ["TRITON_SORT_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "triton_sort"


def cache_path(device: DeviceKey) -> Path:
    return cache_dir() / "autotune" / f"{device.stem}.json"


def parse(text: str, *, triton_version: str | None = None) -> dict:
    """The document in ``text``, checked; ``triton_version``: also require results of that Triton version."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CacheProblem(f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise CacheProblem(f"schema {found!r}, expected {SCHEMA}")
    if not isinstance(doc.get("kernels"), dict) or not all(
            isinstance(table, dict) and isinstance(table.get("entries"), dict) for table in doc["kernels"].values()):
        raise CacheProblem("no valid 'kernels' table")
    if triton_version is not None and doc.get("triton") != triton_version:
        raise CacheProblem(f"tuned with Triton {doc.get('triton')}, this is Triton {triton_version}")
    return doc


def read(path: Path | Traversable, *, triton_version: str | None = None) -> dict | None:
    """The checked document in the file ``path`` (as ``parse``), or None if there is no such file. Anything that
    makes the file unusable, including an ``OSError`` while reading it or bytes that are not UTF-8, is a
    ``CacheProblem``."""
    try:
        if not path.is_file():
            return None
        data = path.read_bytes()
    except OSError as exc:
        raise CacheProblem(f"cannot be read ({exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CacheProblem(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse(text, triton_version=triton_version)


def new_document(device: DeviceKey, triton_version: str) -> dict:
    return {"schema": SCHEMA, "device": device.name, "arch": device.arch, "device_name": device.full_name,
            "triton": triton_version, "kernels": {}}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive lock on ``<path>.lock`` (a separate file: ``path`` itself is replaced while the lock is held)."""
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _write_atomically(path: Path, doc: dict) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as tmp:
        json.dump(doc, tmp, indent=1, sort_keys=True)
        tmp.write("\n")
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)


def record(path: Path, device: DeviceKey, triton_version: str, kernel: str, source_hash: str, key: str,
           entry: dict) -> None:
    """Add (or replace) one tuned entry. Stale content (another Triton version, schema or kernel source) is
    dropped; everything else in the file, including other processes' recent entries, is kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        try:
            doc = read(path, triton_version=triton_version)
        except CacheProblem as problem:
            warnings.warn(f"{path}: {problem}; starting a fresh tuning file", RuntimeWarning, stacklevel=2)
            doc = None
        if doc is None:
            doc = new_document(device, triton_version)
        table = doc["kernels"].get(kernel)
        if table is None or table.get("source_hash") != source_hash:
            table = doc["kernels"][kernel] = {"source_hash": source_hash, "entries": {}}
        table["entries"][key] = entry
        _write_atomically(path, doc)
