"""Peak extra memory of forward + backward, measured, not estimated.

On CPU each variant runs in a fresh Python process: after the inputs exist and a warm-up call at full size, the
process hands freed memory back, resets its peak resident set size (``/proc/self/clear_refs``), runs forward and
backward once, and reads the new peak (``VmHWM``). Extra memory = that peak minus the resident size before the
call (``peak_extra_bytes``). On CUDA the same is done with ``torch.cuda.max_memory_allocated``.

``triton-sort memory [--n 16384] [--d 1] [--tau 1.0]`` prints a table and writes
``perf_reports/<device>/memory.{csv,md}``.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import ctypes.util
import gc
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

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


def machine_name() -> str:
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


def write_report(rows: list[dict], folder: Path, command: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    fields = ["variant", "n", "d", "tau", "device", "extra_mib", "seconds", "error"]
    with open(folder / "memory.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# Peak extra memory of forward + backward",
        "",
        f"Machine: {machine_description()}, torch {torch.__version__}. "
        f"Command: `{command}`.",
        "Extra memory is the measured peak resident set size (CPU) or allocated memory (CUDA) during one "
        "forward + backward, minus what was resident before it; each variant runs in a fresh process. "
        "Time is one call (not a benchmark median).",
        "",
        "| variant | n | d | tau | extra memory (MiB) | time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        memory = row.get("extra_mib", f"failed: {row.get('error', '')}")
        lines.append(f"| {row['variant']} | {row['n']} | {row['d']} | {row['tau']} | {memory} | "
                     f"{row.get('seconds', '')} |")
    (folder / "memory.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="triton-sort memory", description="Peak extra memory of fwd + bwd.")
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--d", type=int, default=1)
    parser.add_argument("--tau", type=float, default=1.0)
    parser.add_argument("--variants", nargs="+", default=["dense_reference", "torch_streaming"], choices=VARIANTS)
    parser.add_argument("--out", type=Path, default=Path("perf_reports"))
    args = parser.parse_args(argv)
    rows = []
    for n in args.n:
        for variant in args.variants:
            row = measure_in_subprocess(variant, n, args.d, args.tau)
            print(row, flush=True)
            rows.append(row)
    command = "triton-sort memory " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(rows, args.out / machine_name(), command.strip())
    print(f"wrote {args.out / machine_name() / 'memory.md'}")
    return 0
