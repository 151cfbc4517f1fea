"""Performance reports: speed, peak memory and accuracy versus n, tau, d and dtype, per device.

``triton-sort report [--quick] [--out perf_reports]`` measures every variant of ``VARIANTS`` on a grid and writes
``<out>/<device>/``: ``report.csv`` (long format, one row per measurement), PNG plots (``plots``) and a
``README.md`` with the plots, a short table, the machine and the command.

- Time: forward, backward (of a retained graph) and forward + backward; median with the 20th and 80th
  percentiles, from ``triton.testing.do_bench`` on a GPU, from repeated wall-clock calls after a warm-up on CPU.
- Peak memory above the inputs: ``torch.cuda.max_memory_allocated`` per pass on a GPU; on CPU forward + backward
  only, each in a fresh process after a warm-up call (peak resident set size, see ``_peak_memory_here``).
- Accuracy: ``||out - ref|| / ||ref||`` for the output (forward) and for both gradients (backward), against the
  paper's dense formula in float64 on the same inputs, where that fits in memory.

Variants that cannot run here are recorded as skipped with the reason (Triton on CPU only runs in the
interpreter, whose speed means nothing; peers that are not installed; sizes that would not fit in memory), and a
variant that raises is recorded as failed with the error: no row silently disappears.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor

from .. import __version__, relaxed_sort_apply, relaxed_sort_matrix
from ..reference import dense_sort_apply
from .memory import MIB, machine_description, machine_name, peak_extra_bytes

PASSES = ("forward", "backward", "forward+backward")
COLUMNS = ("variant", "pass", "n", "tau", "d", "dtype", "batch", "device", "metric", "unit", "median", "p20", "p80",
           "status", "note", "package_version", "commit", "timestamp")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Share of the free memory (RAM, or GPU memory) a variant's estimated footprint may take before it is skipped.
MEMORY_FRACTION = 0.5

# Peak exponentials per second: 16 MUFU.EX2 per SM per clock (sm_70 to sm_90) x SMs x boost clock. The O(n^2)
# kernels' floor is n^2 exponentials per batch row per pass at this rate. Keyed by normalised device name
# (``triton_sort.autotune.keys``); other GPUs use the same formula with the driver's SM count and clock.
EXP_PEAK_PER_SECOND = {
    "h100": 3.9e12,  # SXM: 132 SMs x 1.83 GHz (the PCIe card, 114 SMs x 1.76 GHz, has 3.2e12)
    "h200": 3.9e12,  # 132 SMs x 1.83 GHz
    "gh200": 3.9e12,
    "a100": 2.4e12,  # 108 SMs x 1.41 GHz
    "l40s": 5.7e12,  # 142 SMs x 2.52 GHz
    "rtx-4090": 5.2e12,  # 128 SMs x 2.52 GHz
    "a10g": 2.2e12,  # 80 SMs x 1.71 GHz
    "l4": 1.9e12,  # 58 SMs x 2.04 GHz
    "v100": 2.0e12,  # 80 SMs x 1.53 GHz
}
EXP_PER_SM_PER_CLOCK = 16

ForwardFn = Callable[[Tensor, Tensor, float], Tensor]


def _missing(module: str) -> Callable[[torch.device, int], str | None]:
    return lambda device, d: None if importlib.util.find_spec(module) else f"{module} is not installed"


def _needs_gpu(device: torch.device, d: int) -> str | None:
    if device.type != "cuda":
        return "Triton kernels need a GPU; on CPU they only run in Triton's interpreter, whose timings mean nothing"
    return None


def _torchsort_unavailable(device: torch.device, d: int) -> str | None:
    if d != 1:
        return "torchsort sorts the scores themselves and cannot carry values (measured at d = 1 only)"
    return _missing("torchsort")(device, d)


def _torchsort(scores: Tensor, x: Tensor, tau: float) -> Tensor:
    import torchsort

    # A different relaxation (a projection onto the permutahedron): soft-sorted scores, not P_hat @ x.
    return torchsort.soft_sort(scores.float(), regularization_strength=tau).to(scores.dtype)


def _pykeops(scores: Tensor, x: Tensor, tau: float) -> Tensor:
    """P_hat @ x with KeOps' symbolic softmax-weighted sum (linear memory), logits ``(c_i s_j - b_j) / tau``."""
    from pykeops.torch import LazyTensor

    batch, n = scores.shape
    sorted_scores, order = torch.sort(scores, dim=-1)
    prefix = torch.cumsum(sorted_scores, -1) - sorted_scores  # exclusive prefix sums
    m = torch.arange(n, device=scores.device, dtype=scores.dtype)
    b_sorted = (2 * m - n) * sorted_scores + sorted_scores.sum(-1, keepdim=True) - 2 * prefix  # sum_k |s_j - s_k|
    b = torch.empty_like(b_sorted).scatter(-1, order, b_sorted)
    c = (n - 1 - 2 * m).expand(batch, n)  # n + 1 - 2i for i = 1..n
    logits = (LazyTensor(c[:, :, None, None]) * LazyTensor(scores[:, None, :, None])
              - LazyTensor(b[:, None, :, None])) / tau
    return logits.sumsoftmaxweight(LazyTensor(x[:, None, :, :]), axis=2)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One implementation to measure. forward: (scores (B, n), x (B, n, d), tau) -> output; unavailable: the
    reason it cannot run on a device at this d, or None; matrix_copies: how many (B, n, n) buffers its forward +
    backward keeps alive (0 for linear memory); exps: exponentials per entry of the n x n matrix per pass, for
    kernels that evaluate every entry (the exp/s rate; empty: not reported); accuracy: whether its output is
    NeuralSort's P_hat @ x (so comparable with the float64 reference)."""

    name: str
    description: str
    forward: ForwardFn
    unavailable: Callable[[torch.device, int], str | None] = lambda device, d: None
    matrix_copies: int = 0
    exps: dict[str, float] = dataclasses.field(default_factory=dict)
    accuracy: bool = True


_STREAMING_EXPS = {"forward": 1.0, "backward": 1.0, "forward+backward": 2.0}

VARIANTS: dict[str, Variant] = {variant.name: variant for variant in (
    Variant("dense_reference", "`triton_sort.reference.dense_sort_apply`: materialised P_hat, as users write it",
            dense_sort_apply, matrix_copies=6),
    Variant("torch_streaming", "`relaxed_sort_apply(..., banded=False, backend=\"torch\")`: row-chunked PyTorch "
            "path, every column", lambda s, x, tau: relaxed_sort_apply(s, x, tau, banded=False, backend="torch")),
    Variant("torch_banded", "`relaxed_sort_apply(..., backend=\"torch\")`: PyTorch path, banded (the default)",
            lambda s, x, tau: relaxed_sort_apply(s, x, tau, banded=True, backend="torch")),
    Variant("triton_matrix", "`relaxed_sort_matrix(..., banded=False, backend=\"triton\") @ x`: Triton matrix "
            "kernel", lambda s, x, tau: relaxed_sort_matrix(s, tau, banded=False, backend="triton") @ x, _needs_gpu,
            matrix_copies=5, exps={"forward": 2.0, "forward+backward": 2.0}),
    Variant("triton_streaming", "`relaxed_sort_apply(..., banded=False, backend=\"triton\")`: streaming Triton "
            "kernels, every column", lambda s, x, tau: relaxed_sort_apply(s, x, tau, banded=False, backend="triton"),
            _needs_gpu, exps=_STREAMING_EXPS),
    Variant("triton_banded", "`relaxed_sort_apply(..., backend=\"triton\")`: streaming Triton kernels, banded "
            "(the default)", lambda s, x, tau: relaxed_sort_apply(s, x, tau, banded=True, backend="triton"),
            _needs_gpu),
    Variant("torchsort", "`torchsort.soft_sort` (a different relaxation; sorts the scores, d = 1)", _torchsort,
            _torchsort_unavailable, accuracy=False),
    Variant("pykeops", "pykeops `LazyTensor.sumsoftmaxweight`: the same math in linear memory", _pykeops,
            _missing("pykeops")),
)}


@dataclasses.dataclass(frozen=True)
class Grid:
    """What to measure: an n sweep at ``tau_ref`` over ``ds`` x ``dtypes``, and a tau sweep at ``n_ref`` over
    ``tau_ds``. ``full`` measures the whole product n x tau x d x dtype instead."""

    ns: tuple[int, ...]
    taus: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
    ds: tuple[int, ...] = (1, 16, 64)
    dtypes: tuple[str, ...] = ("fp32",)
    batch: int = 1
    tau_ds: tuple[int, ...] | None = None  # d of the tau sweep (default: the first d)
    full: bool = False
    memory_ds: tuple[int, ...] | None = None  # CPU: d of the fresh-process memory runs (None: the first d)
    seconds_per_timing: float = 0.25  # CPU only: keep repeating a timed call until this much time has passed
    max_reps: int = 20
    max_seconds: float | None = None  # skip sizes whose forward + backward is predicted to take longer

    @property
    def tau_ref(self) -> float:
        """tau of the n sweep: 1 if measured, else the middle tau."""
        return 1.0 if 1.0 in self.taus else sorted(self.taus)[len(self.taus) // 2]

    @property
    def n_ref(self) -> int:
        """n of the tau sweep: the middle n."""
        return sorted(self.ns)[len(self.ns) // 2]

    def points(self) -> list[tuple[int, float, int, str]]:
        """(n, tau, d, dtype) to measure, small n first."""
        if self.full:
            wanted = {(n, tau, d, dt) for n in self.ns for tau in self.taus for d in self.ds for dt in self.dtypes}
        else:
            wanted = {(n, self.tau_ref, d, dt) for n in self.ns for d in self.ds for dt in self.dtypes}
            tau_ds = self.tau_ds or self.ds[:1]
            wanted |= {(self.n_ref, tau, d, dt) for tau in self.taus for d in tau_ds for dt in self.dtypes}
        return sorted(wanted)


def default_grid(device: torch.device, quick: bool) -> Grid:
    """``--quick``: a few minutes on a 2-core CPU; otherwise the full grid (meant for GPUs)."""
    if device.type == "cuda":
        if quick:
            return Grid(ns=tuple(2**k for k in range(8, 15)), batch=4, max_seconds=1.0)
        return Grid(ns=tuple(2**k for k in range(8, 18)), dtypes=tuple(DTYPES), batch=4, full=True,
                    max_seconds=30.0)
    if quick:
        return Grid(ns=(256, 512, 1024, 2048, 4096), max_seconds=5.0)
    return Grid(ns=tuple(2**k for k in range(8, 15)), full=True, memory_ds=(1, 64), max_seconds=60.0)


# ------------------------------------------------------------------------------------------------ measuring
def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) with linear interpolation."""
    ordered = sorted(samples)

    def at(q: float) -> float:
        position = q * (len(ordered) - 1)
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    return at(0.5), at(0.2), at(0.8)


def time_call(fn: Callable[[], object], device: torch.device, grid: Grid) -> tuple[float, float, float]:
    """(median, p20, p80) seconds of ``fn``."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return tuple(ms / 1e3 for ms in do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
    fn()  # warm-up
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < 3 or (len(samples) < grid.max_reps
                               and time.perf_counter() - started < grid.seconds_per_timing):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return _quantiles(samples)


def peak_cuda_bytes(fn: Callable[[], object]) -> int:
    """Peak CUDA memory allocated by ``fn`` above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _inputs(batch: int, n: int, d: int, dtype: torch.dtype, device: torch.device,
            seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator(device=device).manual_seed(seed)
    scores = torch.randn(batch, n, generator=generator, device=device).to(dtype).requires_grad_()
    x = torch.randn(batch, n, d, generator=generator, device=device).to(dtype).requires_grad_()
    return scores, x


def _gradients(out: Tensor, scores: Tensor, x: Tensor, grad: Tensor, retain: bool = False) -> tuple:
    return torch.autograd.grad(out, (scores, x), grad, retain_graph=retain, allow_unused=True)


def _passes(forward: ForwardFn, scores: Tensor, x: Tensor, tau: float) -> dict[str, Callable[[], object]]:
    """The three timed calls; the backward one replays the backward of one retained forward."""
    out = forward(scores, x, tau)
    grad = torch.randn_like(out)
    return {"forward": lambda: forward(scores, x, tau),
            "backward": lambda: _gradients(out, scores, x, grad, retain=True),
            "forward+backward": lambda: _gradients(forward(scores, x, tau), scores, x, grad)}


def peak_memory_in_fresh_process(variant: str, batch: int, n: int, d: int, tau: float, dtype: str,
                                 timeout: float = 900.0) -> float:
    """Peak extra MiB of one forward + backward, measured in a fresh interpreter (see ``bench.memory``)."""
    code = (f"from triton_sort.bench.report import _peak_memory_here; "
            f"print(_peak_memory_here({variant!r}, {batch}, {n}, {d}, {tau}, {dtype!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"exit {proc.returncode}")
    return float(proc.stdout.strip().splitlines()[-1])


def _peak_memory_here(variant: str, batch: int, n: int, d: int, tau: float, dtype: str) -> float:
    """Run in a fresh process: the peak resident set size of one forward + backward above what was resident, after
    a warm-up call at full size (``memory.peak_extra_bytes``)."""
    forward = VARIANTS[variant].forward
    scores, x = _inputs(batch, n, d, DTYPES[dtype], torch.device("cpu"))

    def step() -> None:
        out = forward(scores, x, tau)
        _gradients(out, scores, x, torch.ones_like(out))

    return round(peak_extra_bytes(step) / MIB, 2)


def available_bytes(device: torch.device) -> int:
    """Free GPU memory, or the kernel's estimate of available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as meminfo:
        return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))


def estimated_bytes(variant: Variant, batch: int, n: int, d: int, itemsize: int) -> int:
    """Rough forward + backward footprint: the variant's (B, n, n) buffers plus a few copies of the inputs."""
    return (variant.matrix_copies * n * n + 8 * n * max(d, 1)) * batch * itemsize


def exp_peak_per_second(device: torch.device) -> tuple[float, str] | None:
    """The device's exponentials per second and where the number comes from; None off CUDA."""
    if device.type != "cuda":
        return None
    from ..autotune.keys import device_key

    name = device_key(device).name
    if name in EXP_PEAK_PER_SECOND:
        return EXP_PEAK_PER_SECOND[name], f"table ({name})"
    from triton.runtime import driver

    properties = driver.active.utils.get_device_properties(device.index or 0)
    peak = properties["multiprocessor_count"] * EXP_PER_SM_PER_CLOCK * properties["sm_clock_rate"] * 1e3
    return peak, f"{properties['multiprocessor_count']} SMs x {EXP_PER_SM_PER_CLOCK} x SM clock"


# ---------------------------------------------------------------------------------------------- the report
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


class Recorder:
    """Collects the long-format rows; the fields every row shares are filled in once."""

    def __init__(self, batch: int) -> None:
        self.rows: list[dict] = []
        self.common = {"device": machine_name(), "batch": batch, "package_version": __version__,
                       "commit": commit(), "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def add(self, variant: str, pass_: str, point: tuple[int, float, int, str], metric: str, unit: str = "",
            values: tuple[float, ...] = (), status: str = "ok", note: str = "") -> None:
        n, tau, d, dtype = point
        median, p20, p80 = (*values, "", "", "")[:3]
        self.rows.append({"variant": variant, "pass": pass_, "n": n, "tau": tau, "d": d, "dtype": dtype,
                          "metric": metric, "unit": unit, "median": median, "p20": p20, "p80": p80,
                          "status": status, "note": note, **self.common})


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def _reference(point: tuple[int, float, int, str], batch: int, device: torch.device) -> dict | str:
    """The float64 dense output and gradients for this point's inputs, or why they were not computed."""
    n, tau, d, dtype = point
    need = 6 * batch * n * n * 8
    if need > MEMORY_FRACTION * available_bytes(device):
        return f"the float64 reference would need ~{need / 2**30:.1f} GiB"
    scores, x = _inputs(batch, n, d, DTYPES[dtype], device)
    scores64, x64 = (t.detach().double().requires_grad_() for t in (scores, x))
    out = dense_sort_apply(scores64, x64, tau)
    grad = torch.randn(out.shape, generator=torch.Generator(device=device).manual_seed(1), device=device)
    return {"out": out.detach(), "grad": grad, "d_scores_x": _gradients(out, scores64, x64, grad.double())}


def _relative_error(out: Tensor, ref: Tensor) -> float:
    return float((out.detach().double() - ref).norm() / ref.norm().clamp_min(1e-300))


def _measure_accuracy(rec: Recorder, variant: Variant, point, reference: dict | str, device, batch) -> None:
    if isinstance(reference, str):
        rec.add(variant.name, "forward", point, "rel_error", status="skipped", note=reference)
        return
    scores, x = _inputs(batch, point[0], point[2], DTYPES[point[3]], device)
    out = variant.forward(scores, x, point[1])
    rec.add(variant.name, "forward", point, "rel_error", "ratio", (_relative_error(out, reference["out"]),))
    d_scores, d_x = _gradients(out, scores, x, reference["grad"].to(out.dtype))
    for name, got, ref in (("rel_error_dscores", d_scores, reference["d_scores_x"][0]),
                           ("rel_error_dx", d_x, reference["d_scores_x"][1])):
        rec.add(variant.name, "backward", point, name, "ratio", (_relative_error(got, ref),))


def _measure_point(rec: Recorder, variant: Variant, point, device: torch.device, grid: Grid,
                   reference: dict | str | None) -> float | None:
    """Time (and on GPU, memory) of the three passes, then accuracy; failures are recorded, not raised.
    Returns the forward + backward median in seconds, None if it was not measured."""
    n, tau, d, dtype = point
    pass_, metric, fwd_bwd = "all", "all", None
    try:
        scores, x = _inputs(grid.batch, n, d, DTYPES[dtype], device)
        for pass_, fn in _passes(variant.forward, scores, x, tau).items():
            metric = "time"
            seconds = time_call(fn, device, grid)
            rec.add(variant.name, pass_, point, "time", "s", seconds)
            if pass_ == "forward+backward":
                fwd_bwd = seconds[0]
            if pass_ in variant.exps and (peak := exp_peak_per_second(device)):
                rate = variant.exps[pass_] * grid.batch * n * n / seconds[0]
                rec.add(variant.name, pass_, point, "exp_rate", "exp/s", (rate,),
                        note=f"{rate / peak[0]:.1%} of the {peak[0]:.2g} exp/s peak ({peak[1]})")
            if device.type == "cuda":
                rec.add(variant.name, pass_, point, "peak_memory", "MiB", (peak_cuda_bytes(fn) / MIB,))
        del scores, x
        pass_, metric = "forward", "rel_error"
        if variant.accuracy and reference is not None:
            _measure_accuracy(rec, variant, point, reference, device, grid.batch)
    except Exception as exc:  # a failing variant is part of the report
        rec.add(variant.name, pass_, point, metric, status="failed", note=_error_text(exc))
    return fwd_bwd


def skip_reason(variant: Variant, point, device: torch.device, batch: int) -> str | None:
    n, _, d, dtype = point
    reason = variant.unavailable(device, d)
    if reason:
        return reason
    need = estimated_bytes(variant, batch, n, d, DTYPES[dtype].itemsize)
    if need > MEMORY_FRACTION * available_bytes(device):
        return (f"would need ~{need / 2**30:.1f} GiB, more than {MEMORY_FRACTION:.0%} of the "
                f"{available_bytes(device) / 2**30:.1f} GiB free")
    return None


def run(grid: Grid, variants: list[Variant], device: torch.device, *, progress: bool = True) -> list[dict]:
    """Measure every variant at every grid point; the rows of the CSV.

    With ``grid.max_seconds``, a variant whose forward + backward would take longer than that at a larger n
    (extrapolated as n^2 from its largest measured n at the same tau, d and dtype) is skipped there, with the
    prediction as the reason: a slow variant cannot stall a quick report.
    """
    rec = Recorder(grid.batch)
    points = grid.points()
    largest: dict[tuple, tuple[int, float]] = {}  # (variant, tau, d, dtype) -> (n, forward + backward seconds)
    for index, point in enumerate(points):
        if progress:
            print(f"[{index + 1}/{len(points)}] n={point[0]} tau={point[1]} d={point[2]} {point[3]}", flush=True)
        reference = _reference(point, grid.batch, device) if any(v.accuracy for v in variants) else None
        for variant in variants:
            key = (variant.name, *point[1:])
            reason = skip_reason(variant, point, device, grid.batch)
            if not reason and grid.max_seconds and key in largest:
                measured_n, seconds = largest[key]
                predicted = seconds * (point[0] / measured_n) ** 2
                if predicted > grid.max_seconds:
                    reason = (f"predicted {predicted:.3g} s per forward + backward ({seconds:.3g} s at "
                              f"n = {measured_n}), over this grid's {grid.max_seconds:g} s limit")
            if reason:
                rec.add(variant.name, "all", point, "all", status="skipped", note=reason)
                continue
            seconds = _measure_point(rec, variant, point, device, grid, reference)
            if seconds is not None:
                largest[key] = (point[0], seconds)
        del reference
    if device.type != "cuda":
        _cpu_memory(rec, grid, variants)
    return rec.rows


def _cpu_memory(rec: Recorder, grid: Grid, variants: list[Variant]) -> None:
    """Forward + backward peak memory over the n sweep, one fresh process each, where the timing succeeded."""
    timed = {(r["variant"], r["n"], r["tau"], r["d"], r["dtype"]) for r in rec.rows
             if r["metric"] == "time" and r["status"] == "ok"}
    memory_ds = grid.memory_ds if grid.memory_ds is not None else grid.ds[:1]
    for point in grid.points():
        n, tau, d, dtype = point
        if tau != grid.tau_ref or d not in memory_ds:
            continue
        for variant in variants:
            if (variant.name, *point) not in timed:
                continue  # skipped or failed, and recorded as such
            try:
                mib = peak_memory_in_fresh_process(variant.name, grid.batch, n, d, tau, dtype)
                rec.add(variant.name, "forward+backward", point, "peak_memory", "MiB", (mib,),
                        note="fresh process, peak RSS above the inputs")
            except Exception as exc:
                rec.add(variant.name, "forward+backward", point, "peak_memory", status="failed",
                        note=_error_text(exc))


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _select(rows: list[dict], **where) -> Iterator[dict]:
    return (row for row in rows if all(str(row[key]) == str(value) for key, value in where.items()))


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def summary_table(rows: list[dict], grid: Grid, variants: list[str]) -> list[str]:
    """Markdown: forward + backward median time (and ratio to the dense reference of the same run) per n,
    plus peak memory, at the n sweep's first d and dtype."""
    d, dtype = grid.ds[0], grid.dtypes[0]
    shown = [v for v in variants if any(_select(rows, variant=v, metric="time", status="ok"))]
    lines = [f"Forward + backward, d = {d}, tau = {grid.tau_ref}, {dtype}, batch {grid.batch}: median time "
             "(time / dense reference time in this run) and peak memory above the inputs.", "",
             "| n | " + " | ".join(f"{v} time | {v} memory" for v in shown) + " |",
             "|---|" + "---|---|" * len(shown)]
    for n in grid.ns:
        where = {"n": n, "tau": grid.tau_ref, "d": d, "dtype": dtype, "pass": "forward+backward"}
        dense = next(_select(rows, variant="dense_reference", metric="time", status="ok", **where), None)
        cells = []
        for v in shown:
            timing = next(_select(rows, variant=v, metric="time", status="ok", **where), None)
            memory = next(_select(rows, variant=v, metric="peak_memory", status="ok", **where), None)
            time_cell = "skipped/failed" if timing is None else _fmt_seconds(float(timing["median"]))
            if timing is not None and dense is not None and v != "dense_reference":
                time_cell += f" ({float(timing['median']) / float(dense['median']):.2f}x)"
            cells += [time_cell, f"{float(memory['median']):.1f} MiB" if memory else "-"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def exp_rate_table(rows: list[dict]) -> list[str]:
    """Markdown: achieved exponentials per second of the Triton variants (GPU runs only)."""
    rates = list(_select(rows, metric="exp_rate", status="ok"))
    if not rates:
        return []
    lines = ["Achieved exponentials per second (n^2 per batch row per pass, dense-equivalent; the floor of this "
             "O(n^2) kernel is the device's exp rate):", "",
             "| variant | pass | n | tau | d | dtype | exp/s | of peak |", "|---|---|---|---|---|---|---|---|"]
    for row in rates:
        lines.append(f"| {row['variant']} | {row['pass']} | {row['n']} | {row['tau']} | {row['d']} | {row['dtype']} "
                     f"| {float(row['median']):.3g} | {row['note'].split(' of ')[0]} |")
    return lines


def write_readme(rows: list[dict], folder: Path, grid: Grid, variants: list[Variant], plots: list[str],
                 command: str, device: torch.device, seconds: float) -> None:
    try:
        import triton

        versions = f"torch {torch.__version__}, Triton {triton.__version__}"
    except ImportError:
        versions = f"torch {torch.__version__}"
    on_gpu = device.type == "cuda"
    first = rows[0] if rows else {}
    load = "" if on_gpu else f", load average {os.getloadavg()[0]:.1f} at the end"
    timer = ("`triton.testing.do_bench`" if on_gpu else
             "wall clock, repeated after a warm-up; noisy at small n when other processes compete for the cores")
    memory = ("`torch.cuda.max_memory_allocated`, per pass" if on_gpu else
              "resident set size of one forward + backward in a fresh process, after a warm-up call")
    lines = [f"# Performance report: {machine_description()}", "",
             f"Command: `{command}` ({seconds / 60:.1f} min, {torch.get_num_threads()} torch threads{load}). "
             f"Package {__version__}, commit {first.get('commit') or 'unknown'}, {versions}, "
             f"{first.get('timestamp', '')}. Raw data: [`report.csv`](report.csv) (one row per measurement; columns: "
             + ", ".join(f"`{c}`" for c in COLUMNS) + ").", "",
             f"Times are medians with 20th/80th percentiles in the CSV ({timer}). Memory is the peak above the inputs "
             f"({memory}). Errors are `||out - ref|| / ||ref||` against the paper's dense formula in float64.", "",
             "Variants:", ""]
    lines += [f"- `{v.name}`: {v.description}" for v in variants]
    lines += ["", *summary_table(rows, grid, [v.name for v in variants]), ""]
    rate_lines = exp_rate_table(rows)
    if rate_lines:
        lines += [*rate_lines, ""]
    lines += [f"![{name}]({name})" for name in plots]
    if (folder / "memory.md").is_file():
        lines += ["", "Peak memory at larger n: [`memory.md`](memory.md) (`triton-sort memory`)."]
    not_run = {}
    for row in rows:
        if row["status"] != "ok":
            not_run.setdefault((row["variant"], row["status"], row["note"]), []).append(row["n"])
    if not_run:
        lines += ["", "Not measured:", ""]
        for (variant, status, note), ns in sorted(not_run.items()):
            sizes = sorted({int(n) for n in ns})
            lines.append(f"- `{variant}` {status} at n = {', '.join(map(str, sizes))}: {note}")
    (folder / "README.md").write_text("\n".join(lines) + "\n")


def write_report(rows: list[dict], folder: Path, grid: Grid, variants: list[Variant], command: str,
                 device: torch.device, seconds: float) -> list[Path]:
    """report.csv, the PNG plots and README.md in ``folder``; returns the files written."""
    from .plots import make_plots

    folder.mkdir(parents=True, exist_ok=True)
    write_csv(rows, folder / "report.csv")
    plots = make_plots(rows, grid, [v.name for v in variants], folder)
    write_readme(rows, folder, grid, variants, [p.name for p in plots], command, device, seconds)
    return [folder / "report.csv", *plots, folder / "README.md"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="triton-sort report", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small grid (a few minutes on a 2-core CPU)")
    parser.add_argument("--n", type=int, nargs="+", help="list lengths (n sweep)")
    parser.add_argument("--tau", type=float, nargs="+", help="temperatures (tau sweep)")
    parser.add_argument("--d", type=int, nargs="+", help="value widths")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), help="dtypes")
    parser.add_argument("--batch", type=int, help="batch rows")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="variants (default all)")
    parser.add_argument("--out", type=Path, default=Path("perf_reports"), help="reports go to OUT/<device>/")
    args = parser.parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    grid = default_grid(device, args.quick)
    overrides = {"ns": args.n, "taus": args.tau, "ds": args.d, "dtypes": args.dtype, "batch": args.batch}
    grid = dataclasses.replace(grid, **{key: tuple(value) if isinstance(value, list) else value
                                        for key, value in overrides.items() if value is not None})
    variants = [VARIANTS[name] for name in (args.variants or VARIANTS)]
    started = time.perf_counter()
    rows = run(grid, variants, device)
    folder = args.out / machine_name()
    command = "triton-sort report " + " ".join(argv if argv is not None else sys.argv[1:])
    files = write_report(rows, folder, grid, variants, command.strip(), device, time.perf_counter() - started)
    print("wrote " + ", ".join(str(path) for path in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
