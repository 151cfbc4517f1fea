"""Peak extra memory of forward + backward, measured, not estimated.

On CPU each variant runs in a fresh Python process: after the inputs exist and a warm-up call at full size, the
process hands freed memory back, resets its peak resident set size (``/proc/self/clear_refs``), runs forward and
backward once, and reads the new peak (``VmHWM``). Extra memory = that peak minus the resident size before the
call (``peak_extra_bytes``). On CUDA the same is done with ``torch.cuda.max_memory_allocated``.

``triton-sort memory [--n 16384] [--d 1] [--tau 1.0]`` prints a table and writes
``perf_reports/<device>/memory.{csv,md}`` (the CSV in the ``bench.schema`` format, rows written as measured:
``peak_memory`` in MiB and ``time_one_call``, one call's seconds, not a median).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .schema import RowWriter, check_writable, machine_description, machine_name, positive_float, positive_int

__all__ = ["MIB", "VARIANTS", "machine_description", "machine_name", "main", "measure", "measure_in_subprocess",
           "peak_extra_bytes"]

VARIANTS = ("dense_reference", "torch_streaming", "triton_streaming")
MIB = 1 << 20


def _rss_bytes(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM (peak RSS) to the current RSS


def _forward_backward(variant: str, scores: torch.Tensor, x: torch.Tensor, tau: float) -> None:
    from triton_sort import relaxed_sort_apply
    from triton_sort.reference import dense_sort_apply

    if variant == "dense_reference":
        out = dense_sort_apply(scores, x, tau)
    else:
        out = relaxed_sort_apply(scores, x, tau, backend=variant.split("_")[0])
    out.backward(torch.ones_like(out))


def peak_extra_bytes(step: Callable[[], object]) -> int:
    """Peak resident memory of one ``step()`` above what was resident before it, on CPU.

    A first call warms up (compilation, e.g. the PyTorch path's torch.compile, and one-off buffers are not
    counted); the memory it freed is handed back to the OS (``malloc_trim``: else the measured call would reuse it
    unseen); then the peak resident set size is reset and the second call measured."""
    step()
    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc:
        ctypes.CDLL(libc).malloc_trim(0)
    before = _rss_bytes()
    _reset_peak_rss()
    step()
    return _rss_bytes("VmHWM") - before


def measure(variant: str, n: int, d: int, tau: float, device: str = "cpu", seed: int = 0) -> dict:
    """Measure one variant in this process (call through ``measure_in_subprocess`` on CPU)."""
    torch.manual_seed(seed)
    scores = torch.randn(n, device=device).requires_grad_()
    x = torch.randn(n, d, device=device).requires_grad_()
    seconds: list[float] = []

    def step() -> None:
        start = time.perf_counter()
        _forward_backward(variant, scores, x, tau)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)

    if device == "cuda":
        step()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        extra = torch.cuda.max_memory_allocated() - before
    else:
        extra = peak_extra_bytes(step)
    return {"variant": variant, "n": n, "d": d, "tau": tau, "device": device,
            "extra_mib": round(extra / MIB, 2), "seconds": round(seconds[-1], 3)}


def measure_in_subprocess(variant: str, n: int, d: int, tau: float, timeout: float = 600.0) -> dict:
    """Run ``measure`` in a fresh interpreter so that earlier allocations cannot hide or inflate the peak."""
    code = (f"import json; from triton_sort.bench.memory import measure; "
            f"print(json.dumps(measure({variant!r}, {n}, {d}, {tau})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"variant": variant, "n": n, "d": d, "tau": tau, "device": "cpu",
                "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _add_rows(rec: RowWriter, measured: dict) -> None:
    """The schema rows of one ``measure_in_subprocess`` result."""
    point = (1, measured["n"], measured["tau"], measured["d"], "fp32")
    variant = measured["variant"]
    if "error" in measured:
        rec.add(variant, "forward+backward", point, "peak_memory", status="failed", note=measured["error"])
        return
    rec.add(variant, "forward+backward", point, "peak_memory", "MiB", (measured["extra_mib"],),
            note="fresh process, peak RSS above the inputs")
    rec.add(variant, "forward+backward", point, "time_one_call", "s", (measured["seconds"],),
            note="one call, not a median")


def write_markdown(rows: list[dict], folder: Path, command: str) -> None:
    """memory.md from the schema rows."""
    lines = [
        "# Peak extra memory of forward + backward",
        "",
        f"Machine: {machine_description()}, torch {torch.__version__}. "
        f"Command: `{command}`. Raw data: [`memory.csv`](memory.csv).",
        "Extra memory is the measured peak resident set size (CPU) or allocated memory (CUDA) during one "
        "forward + backward, minus what was resident before it; each variant runs in a fresh process. "
        "Time is one call (not a benchmark median).",
        "",
        "| variant | n | d | tau | extra memory (MiB) | time (s) |",
        "|---|---|---|---|---|---|",
    ]
    seconds = {(r["variant"], r["n"], r["d"], r["tau"]): r["median"] for r in rows if r["metric"] == "time_one_call"}
    for row in rows:
        if row["metric"] != "peak_memory":
            continue
        memory = row["median"] if row["status"] == "ok" else f"{row['status']}: {row['note']}"
        key = (row["variant"], row["n"], row["d"], row["tau"])
        lines.append(f"| {row['variant']} | {row['n']} | {row['d']} | {row['tau']} | {memory} | "
                     f"{seconds.get(key, '')} |")
    (folder / "memory.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="triton-sort memory", description="Peak extra memory of fwd + bwd.")
    parser.add_argument("--n", type=positive_int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--d", type=positive_int, default=1)
    parser.add_argument("--tau", type=positive_float, default=1.0)
    parser.add_argument("--variants", nargs="+", default=["dense_reference", "torch_streaming"], choices=VARIANTS)
    parser.add_argument("--out", type=Path, default=Path("perf_reports"))
    args = parser.parse_args(argv)
    folder = check_writable(parser, args.out / machine_name())
    with RowWriter("memory", folder / "memory.csv") as rec:
        for n in args.n:
            for variant in args.variants:
                measured = measure_in_subprocess(variant, n, args.d, args.tau)
                print(measured, flush=True)
                _add_rows(rec, measured)
    command = "triton-sort memory " + " ".join(argv if argv is not None else sys.argv[1:])
    write_markdown(rec.rows, folder, command.strip())
    print(f"wrote {folder / 'memory.csv'}, {folder / 'memory.md'}")
    return 0
