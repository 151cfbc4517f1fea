"""Performance reports: speed, device operations, peak memory and accuracy versus (B, n), tau, d and dtype.

``triton-sort report [--quick] [--out perf_reports]`` measures every variant of ``VARIANTS`` on a ``Grid``
(``bench.grid``: an n sweep, a tau sweep and the (B, n) batch grid of common workloads) and writes
``<out>/<device>/``: ``report.csv`` (the ``bench.schema`` long format, one row per measurement, written as measured),
PNG plots (``plots``) and a ``README.md`` with the tables, the plots, the machine and the command.

- Time: forward, backward (of a retained graph) and forward + backward; median with the 20th and 80th
  percentiles, from ``triton.testing.do_bench`` on a GPU; on CPU from wall-clock calls after a warm-up, the
  variants of a point interleaved (one call of each in turn, rotating the order), so that load from other
  processes hits them alike.
- Device operations and host synchronisations per call (``bench.counting``), forward and forward + backward.
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
import dataclasses
import importlib.util
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

import triton_sort

from .. import __version__, relaxed_sort_apply, relaxed_sort_matrix
from ..reference import dense_sort_apply
from .counting import count_device_ops
from .grid import DENSE, DTYPES, OURS, OURS_MATRIX, PASSES, WORKLOADS, Grid, Point, default_grid
from .memory import MIB, peak_extra_bytes
from .schema import (
    COLUMNS,
    RowWriter,
    check_writable,
    error_text,
    machine_description,
    machine_name,
    positive_float,
    positive_int,
)

__all__ = ["COLUMNS", "DTYPES", "PASSES", "VARIANTS", "WORKLOADS", "Grid", "Variant", "default_grid", "main", "run"]

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


def _cpu_only(device: torch.device, d: int) -> str | None:
    if device.type == "cuda":
        return "on a GPU the materialised matrix is measured as `triton_matrix` (the Triton matrix kernel)"
    return None


def _scores_only(also: Callable[[torch.device, int], str | None]) -> Callable[[torch.device, int], str | None]:
    """Soft sorts and ranks transform the scores themselves: measured at d = 1 only (x is not used)."""
    return lambda device, d: ("sorts or ranks the scores themselves, no values (measured at d = 1 only)" if d != 1
                              else also(device, d))


def _ours_missing(name: str) -> Callable[[torch.device, int], str | None]:
    return lambda device, d: None if hasattr(triton_sort, name) else f"triton_sort.{name} not available"


def _torchsort_sort(scores: Tensor, x: Tensor, tau: float) -> Tensor:
    import torchsort

    # A different relaxation (a projection onto the permutahedron), ascending: soft-sorted scores, not P_hat @ x.
    return torchsort.soft_sort(scores.float(), regularization_strength=tau).to(scores.dtype)


def _torchsort_rank(scores: Tensor, x: Tensor, tau: float) -> Tensor:
    import torchsort

    return torchsort.soft_rank(scores.float(), regularization_strength=tau).to(scores.dtype)


def _relaxed_sort(scores: Tensor, x: Tensor, tau: float) -> Tensor:
    """Our soft sort: ``triton_sort.relaxed_sort`` where it exists, else the same thing as ``P_hat @ scores``."""
    sort = getattr(triton_sort, "relaxed_sort", None)
    return sort(scores, tau) if sort is not None else relaxed_sort_apply(scores, scores, tau)


def _relaxed_rank(scores: Tensor, x: Tensor, tau: float) -> Tensor:
    return triton_sort.relaxed_rank(scores, tau)


def _pykeops(scores: Tensor, x: Tensor, tau: float) -> Tensor:
    """P_hat @ x with KeOps' symbolic softmax-weighted sum (linear memory): NeuralSort's logits
    ``(c_i s_j - b_j) / tau`` with ``c_i = n + 1 - 2i`` and ``b_j = sum_k |s_j - s_k|`` (from sorted prefix sums)."""
    from pykeops.torch import LazyTensor

    batch, n = scores.shape
    sorted_scores, order = torch.sort(scores, dim=-1)
    prefix = torch.cumsum(sorted_scores, -1) - sorted_scores  # exclusive prefix sums
    m = torch.arange(n, device=scores.device, dtype=scores.dtype)
    b_sorted = (2 * m - n) * sorted_scores + sorted_scores.sum(-1, keepdim=True) - 2 * prefix  # sum_k |s_j - s_k|
    b = torch.empty_like(b_sorted).scatter(-1, order, b_sorted)
    c = (n - 1 - 2 * m).expand(batch, n).contiguous()  # n + 1 - 2i for i = 1..n
    logits = (LazyTensor(c[:, :, None, None]) * LazyTensor(scores[:, None, :, None].contiguous())
              - LazyTensor(b[:, None, :, None].contiguous())) / tau
    return logits.sumsoftmaxweight(LazyTensor(x[:, None, :, :].contiguous()), axis=2)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One implementation to measure. forward: (scores (B, n), x (B, n, d), tau) -> output; unavailable: the
    reason it cannot run on a device at this d, or None; matrix_copies: how many (B, n, n) buffers its forward +
    backward keeps alive (0 for linear memory); exps: exponentials per entry of the n x n matrix per pass, for
    kernels that evaluate every entry (the exp/s rate; empty: not reported); accuracy: whether its output is
    NeuralSort's P_hat @ x (so comparable with the float64 reference); cpu_memory: whether the CPU report measures
    its peak memory (one fresh process per size)."""

    name: str
    description: str
    forward: ForwardFn
    unavailable: Callable[[torch.device, int], str | None] = lambda device, d: None
    matrix_copies: int = 0
    exps: dict[str, float] = dataclasses.field(default_factory=dict)
    accuracy: bool = True
    cpu_memory: bool = True


_STREAMING_EXPS = {"forward": 1.0, "backward": 1.0, "forward+backward": 2.0}

# To add a variant: append a Variant here (a forward with the (scores, x, tau) signature, and an ``unavailable``
# that names why it cannot run where it cannot); the report measures it at every point, interleaved with the others.
VARIANTS: dict[str, Variant] = {variant.name: variant for variant in (
    Variant(DENSE, "`triton_sort.reference.dense_sort_apply`: the paper's formula, materialised P_hat under "
            "autograd, as users write it", dense_sort_apply, matrix_copies=6),
    Variant("torch_streaming", "`relaxed_sort_apply(..., banded=False, backend=\"torch\")`: row-chunked PyTorch "
            "path, every column", lambda s, x, tau: relaxed_sort_apply(s, x, tau, banded=False, backend="torch")),
    Variant("torch_banded", "`relaxed_sort_apply(..., backend=\"torch\")`: PyTorch path, banded (the default; ours "
            "on CPU)", lambda s, x, tau: relaxed_sort_apply(s, x, tau, banded=True, backend="torch")),
    Variant("triton_matrix", "`relaxed_sort_matrix(..., banded=False, backend=\"triton\") @ x`: Triton matrix "
            "kernel", lambda s, x, tau: relaxed_sort_matrix(s, tau, banded=False, backend="triton") @ x, _needs_gpu,
            matrix_copies=5, exps={"forward": 2.0, "forward+backward": 2.0}),
    Variant("torch_matrix", "`relaxed_sort_matrix(..., backend=\"torch\") @ x`: the PyTorch path's materialised "
            "P_hat (ours on CPU when the matrix itself is wanted; on a GPU see `triton_matrix`)",
            lambda s, x, tau: relaxed_sort_matrix(s, tau, backend="torch") @ x, _cpu_only, matrix_copies=3),
    Variant("triton_streaming", "`relaxed_sort_apply(..., banded=False, backend=\"triton\")`: streaming Triton "
            "kernels, every column", lambda s, x, tau: relaxed_sort_apply(s, x, tau, banded=False, backend="triton"),
            _needs_gpu, exps=_STREAMING_EXPS),
    Variant("triton_banded", "`relaxed_sort_apply(..., backend=\"triton\")`: streaming Triton kernels, banded "
            "(the default; ours on GPU)",
            lambda s, x, tau: relaxed_sort_apply(s, x, tau, banded=True, backend="triton"), _needs_gpu),
    Variant("pykeops", "pykeops `LazyTensor.sumsoftmaxweight` of NeuralSort's logits: the same P_hat @ x in linear "
            "memory (peer of `relaxed_sort_apply`)", _pykeops, _missing("pykeops")),
    Variant("relaxed_sort", "our soft sort, `triton_sort.relaxed_sort(s, tau)` (where it does not exist: "
            "`relaxed_sort_apply(s, s, tau)`, the same P_hat @ s), descending", _relaxed_sort,
            _scores_only(lambda device, d: None), accuracy=False, cpu_memory=False),
    Variant("torchsort_soft_sort", "`torchsort.soft_sort` (peer of `relaxed_sort`; another relaxation, ascending)",
            _torchsort_sort, _scores_only(_missing("torchsort")), accuracy=False, cpu_memory=False),
    Variant("relaxed_rank", "our soft ranks, `triton_sort.relaxed_rank(s, tau)`", _relaxed_rank,
            _scores_only(_ours_missing("relaxed_rank")), accuracy=False, cpu_memory=False),
    Variant("torchsort_soft_rank", "`torchsort.soft_rank` (peer of `relaxed_rank`; another relaxation, ascending)",
            _torchsort_rank, _scores_only(_missing("torchsort")), accuracy=False, cpu_memory=False),
)}
# Peers and the variant each is compared with in the workload table.
PEERS = {"pykeops": None, "torchsort_soft_sort": "relaxed_sort", "torchsort_soft_rank": "relaxed_rank"}


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


# CPU: warm-up calls of each variant before timing, as many as fit in WARMUP_SECONDS (short calls: caches and the
# allocator settle over a few calls; one long call warms as much as several).
WARMUP_CALLS = 3
WARMUP_SECONDS = 0.05


def time_calls(fns: dict[str, Callable[[], object]], device: torch.device,
               grid: Grid) -> dict[str, tuple[float, float, float] | Exception]:
    """(median, p20, p80) seconds of each call, or the exception it raised. On a GPU ``do_bench`` each; on CPU
    up to WARMUP_CALLS warm-up calls each, then rounds of one call of each (rotating the order) until the time budget
    (``seconds_per_timing`` per call) or ``max_reps`` rounds are spent, at least 3."""
    results: dict[str, tuple[float, float, float] | Exception] = {}
    live: dict[str, Callable[[], object]] = {}
    for name, fn in fns.items():
        try:
            if device.type == "cuda":
                from triton.testing import do_bench

                results[name] = tuple(ms / 1e3 for ms in do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
            else:
                warm_up = time.perf_counter()
                fn()
                for _ in range(WARMUP_CALLS - 1):  # caches, allocator, lazy initialisation: short calls only
                    if time.perf_counter() - warm_up > WARMUP_SECONDS:
                        break
                    fn()
                live[name] = fn
        except Exception as exc:  # recorded as a failed row by the caller
            results[name] = exc
    samples: dict[str, list[float]] = {name: [] for name in live}
    names = list(live)
    started, rounds = time.perf_counter(), 0
    while names and (rounds < 3 or (rounds < grid.max_reps
                                    and time.perf_counter() - started < grid.seconds_per_timing * len(names))):
        for name in names[rounds % len(names):] + names[:rounds % len(names)]:
            start = time.perf_counter()
            live[name]()
            samples[name].append(time.perf_counter() - start)
        rounds += 1
    results.update({name: _quantiles(times) for name, times in samples.items()})
    return results


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
def _reference(point: Point, device: torch.device) -> dict | str:
    """The float64 dense output and gradients for this point's inputs, or why they were not computed."""
    batch, n, tau, d, dtype = point
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


def _measure_accuracy(rec: RowWriter, variant: Variant, point: Point, reference: dict | str,
                      device: torch.device) -> None:
    if isinstance(reference, str):
        rec.add(variant.name, "forward", point, "rel_error", status="skipped", note=reference)
        return
    batch, n, tau, d, dtype = point
    scores, x = _inputs(batch, n, d, DTYPES[dtype], device)
    out = variant.forward(scores, x, tau)
    rec.add(variant.name, "forward", point, "rel_error", "ratio", (_relative_error(out, reference["out"]),))
    d_scores, d_x = _gradients(out, scores, x, reference["grad"].to(out.dtype))
    for name, got, ref in (("rel_error_dscores", d_scores, reference["d_scores_x"][0]),
                           ("rel_error_dx", d_x, reference["d_scores_x"][1])):
        rec.add(variant.name, "backward", point, name, "ratio", (_relative_error(got, ref),))


def _count_operations(rec: RowWriter, variant: Variant, passes: dict[str, Callable[[], object]],
                      point: Point) -> None:
    """torch_ops, triton_launches, device_ops and host_syncs of one (already warm) call, forward and fwd + bwd."""
    for pass_ in ("forward", "forward+backward"):
        counts = count_device_ops(passes[pass_])
        for metric in ("device_ops", "torch_ops", "triton_launches", "host_syncs"):
            rec.add(variant.name, pass_, point, metric, "count", (getattr(counts, metric),))


def _measure_point(rec: RowWriter, variants: list[Variant], point: Point, device: torch.device, grid: Grid,
                   reference: dict | str | None) -> dict[str, float]:
    """Time (interleaved; on GPU, memory too), operation counts, then accuracy of the variants at one point;
    failures are recorded, not raised. Returns the forward + backward medians (s) of the variants measured."""
    batch, n, tau, d, dtype = point
    calls: dict[str, dict[str, Callable[[], object]]] = {}
    by_name = {v.name: v for v in variants}
    for variant in variants:
        try:
            scores, x = _inputs(batch, n, d, DTYPES[dtype], device)
            calls[variant.name] = _passes(variant.forward, scores, x, tau)
        except Exception as exc:  # a failing variant is part of the report
            rec.add(variant.name, "forward", point, "time", status="failed", note=error_text(exc))
    fwd_bwd: dict[str, float] = {}
    for pass_ in PASSES:
        for name, result in time_calls({name: c[pass_] for name, c in calls.items()}, device, grid).items():
            if isinstance(result, Exception):
                rec.add(name, pass_, point, "time", status="failed", note=error_text(result))
                del calls[name]
                continue
            rec.add(name, pass_, point, "time", "s", result)
            if pass_ == "forward+backward":
                fwd_bwd[name] = result[0]
            if pass_ in by_name[name].exps and (peak := exp_peak_per_second(device)):
                rate = by_name[name].exps[pass_] * batch * n * n / result[0]
                rec.add(name, pass_, point, "exp_rate", "exp/s", (rate,),
                        note=f"{rate / peak[0]:.1%} of the {peak[0]:.2g} exp/s peak ({peak[1]})")
            if device.type == "cuda":
                rec.add(name, pass_, point, "peak_memory", "MiB", (peak_cuda_bytes(calls[name][pass_]) / MIB,))
    for name, passes in calls.items():
        metric = "device_ops"
        try:
            if grid.count_ops:
                _count_operations(rec, by_name[name], passes, point)
            metric = "rel_error"
            if by_name[name].accuracy and reference is not None:
                _measure_accuracy(rec, by_name[name], point, reference, device)
        except Exception as exc:
            rec.add(name, "forward", point, metric, status="failed", note=error_text(exc))
    return fwd_bwd


def skip_reason(variant: Variant, point: Point, device: torch.device) -> str | None:
    batch, n, _, d, dtype = point
    reason = variant.unavailable(device, d)
    if reason:
        return reason
    need = estimated_bytes(variant, batch, n, d, DTYPES[dtype].itemsize)
    if need > MEMORY_FRACTION * available_bytes(device):
        return (f"would need ~{need / 2**30:.1f} GiB, more than {MEMORY_FRACTION:.0%} of the "
                f"{available_bytes(device) / 2**30:.1f} GiB free")
    return None


def run(grid: Grid, variants: list[Variant], device: torch.device, *, csv_path: Path | None = None,
        progress: bool = True) -> list[dict]:
    """Measure every variant at every grid point; the rows of the CSV (also appended to ``csv_path`` as measured).

    With ``grid.max_seconds``, a variant whose forward + backward would take longer than that at a larger point
    of the sweeps (extrapolated as batch x n^2 from its largest measured point at the same tau, d and dtype) is
    skipped there, with the prediction as the reason: a slow variant cannot stall a quick report. The batch grid
    (``grid.workloads``, a fixed set of sizes) is always measured: the banded path grows slower than n^2, and the
    comparison with the dense formula and the peers there is the point of the report.
    """
    with RowWriter("report", csv_path) as rec:
        points = grid.points()
        workloads = grid.workload_points() | grid.tau_workload_points()
        largest: dict[tuple, tuple[Point, float]] = {}  # (variant, tau, d, dtype) -> (point, fwd + bwd seconds)
        for index, point in enumerate(points):
            if progress:
                print(f"[{index + 1}/{len(points)}] B={point[0]} n={point[1]} tau={point[2]} d={point[3]} "
                      f"{point[4]}", flush=True)
            measured = []
            for variant in variants:
                key = (variant.name, *point[2:])
                reason = skip_reason(variant, point, device)
                if not reason and grid.max_seconds and key in largest and point not in workloads:
                    (b0, n0, *_), seconds = largest[key]
                    predicted = seconds * point[0] * point[1] ** 2 / (b0 * n0**2)
                    if predicted > grid.max_seconds:
                        reason = (f"predicted {predicted:.3g} s per forward + backward ({seconds:.3g} s at "
                                  f"B = {b0}, n = {n0}), over this grid's {grid.max_seconds:g} s limit")
                if reason:
                    rec.add(variant.name, "all", point, "all", status="skipped", note=reason)
                else:
                    measured.append(variant)
            reference = _reference(point, device) if any(v.accuracy for v in measured) else None
            for name, seconds in _measure_point(rec, measured, point, device, grid, reference).items():
                largest[(name, *point[2:])] = (point, seconds)
            del reference
        if device.type != "cuda":
            _cpu_memory(rec, grid, variants)
        return rec.rows


def _cpu_memory(rec: RowWriter, grid: Grid, variants: list[Variant]) -> None:
    """Forward + backward peak memory over the n sweep, one fresh process each, where the timing succeeded."""
    timed = {(r["variant"], *(r[c] for c in ("batch", "n", "tau", "d", "dtype"))) for r in rec.rows
             if r["metric"] == "time" and r["status"] == "ok"}
    memory_ds = grid.memory_ds if grid.memory_ds is not None else grid.ds[:1]
    for point in sorted(grid.sweep_points()):
        batch, n, tau, d, dtype = point
        if tau != grid.tau_ref or d not in memory_ds:
            continue
        for variant in variants:
            if not variant.cpu_memory or (variant.name, *point) not in timed:
                continue  # skipped or failed, and recorded as such
            try:
                mib = peak_memory_in_fresh_process(variant.name, batch, n, d, tau, dtype)
                rec.add(variant.name, "forward+backward", point, "peak_memory", "MiB", (mib,),
                        note="fresh process, peak RSS above the inputs")
            except Exception as exc:
                rec.add(variant.name, "forward+backward", point, "peak_memory", status="failed",
                        note=error_text(exc))


def _select(rows: list[dict], **where) -> Iterator[dict]:
    return (row for row in rows if all(str(row[key]) == str(value) for key, value in where.items()))


def _value(rows: list[dict], **where) -> float | None:
    row = next(_select(rows, status="ok", **where), None)
    return None if row is None else float(row["median"])


def _fmt_seconds(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.3g} us"
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def summary_table(rows: list[dict], grid: Grid, variants: list[str]) -> list[str]:
    """Markdown: forward + backward median time (and ratio to the dense reference of the same run) per n,
    plus peak memory, at the n sweep's batch, first d and first dtype; the variants that compute P_hat @ x (soft
    sorts and ranks are in the workload table)."""
    d, dtype = grid.ds[0], grid.dtypes[0]
    shown = [v for v in variants if (v not in VARIANTS or VARIANTS[v].accuracy)
             and any(_select(rows, variant=v, metric="time", status="ok", batch=grid.batch))]
    lines = [f"Forward + backward, d = {d}, tau = {grid.tau_ref}, {dtype}, batch {grid.batch}: median time "
             "(time / dense reference time in this run) and peak memory above the inputs.", "",
             "| n | " + " | ".join(f"{v} time | {v} memory" for v in shown) + " |",
             "|---|" + "---|---|" * len(shown)]
    for n in grid.ns:
        where = {"batch": grid.batch, "n": n, "tau": grid.tau_ref, "d": d, "dtype": dtype, "pass": "forward+backward"}
        dense = _value(rows, variant=DENSE, metric="time", **where)
        cells = []
        for v in shown:
            timing = _value(rows, variant=v, metric="time", **where)
            memory = _value(rows, variant=v, metric="peak_memory", **where)
            time_cell = "skipped/failed" if timing is None else _fmt_seconds(timing)
            if timing is not None and dense is not None and v != DENSE:
                time_cell += f" ({timing / dense:.2f}x)"
            cells += [time_cell, f"{memory:.1f} MiB" if memory is not None else "-"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def workload_table(rows: list[dict], grid: Grid, device_type: str) -> list[str]:
    """Markdown: the batch grid. Forward + backward median times, ours against the dense formula (ratio), device
    operations and host syncs per forward + backward, and the peers against the variant each replaces."""
    ours = OURS.get(device_type, OURS["cpu"])
    matrix = OURS_MATRIX.get(device_type, OURS_MATRIX["cpu"])
    if not grid.workloads:
        return []
    lines = [f"Batch grid (forward + backward, tau = {grid.tau_ref}, {grid.dtypes[0]}): median time; `ours` is "
             f"`{ours}` (`relaxed_sort_apply` with its defaults), `x dense` its time over the dense formula's in "
             "this run; ops = device operations per call (kernel-launching torch ops + Triton launches, "
             "`triton_sort.bench.counting`), syncs = host synchronisations per call; peers in the next columns "
             "(`pykeops` against ours, torchsort's soft sort and rank against ours at d = 1, ratio = peer / ours); "
             f"last, our materialised `P_hat` times x (`{matrix}`) against the dense formula.",
             "", "| B | n | d | dense | ours | x dense | ops ours / dense | syncs ours | pykeops | relaxed_sort | "
             "torchsort soft_sort | relaxed_rank | torchsort soft_rank | matrix (x dense) |", "|---" * 14 + "|"]

    def time_of(variant: str, where: dict) -> float | None:
        return _value(rows, variant=variant, metric="time", **where)

    def cell(seconds: float | None, versus: float | None = None) -> str:
        if seconds is None:
            return "-"
        return _fmt_seconds(seconds) + (f" ({seconds / versus:.2g}x)" if versus else "")

    order = {workload: index for index, workload in enumerate(grid.workloads)}
    for batch, n, tau, d, dtype in sorted(grid.workload_points(), key=lambda p: (p[3], order[p[:2]])):
        where = {"batch": batch, "n": n, "tau": tau, "d": d, "dtype": dtype, "pass": "forward+backward"}
        dense, mine = time_of(DENSE, where), time_of(ours, where)
        ops = [_value(rows, variant=v, metric="device_ops", **where) for v in (ours, DENSE)]
        syncs = _value(rows, variant=ours, metric="host_syncs", **where)
        sort, rank = time_of("relaxed_sort", where), time_of("relaxed_rank", where)
        lines.append(" | ".join([
            f"| {batch}", str(n), str(d), cell(dense), cell(mine),
            f"{mine / dense:.2f}x" if mine and dense else "-",
            " / ".join("-" if v is None else f"{v:.0f}" for v in ops), "-" if syncs is None else f"{syncs:.0f}",
            cell(time_of("pykeops", where), mine), cell(sort), cell(time_of("torchsort_soft_sort", where), sort),
            cell(rank), cell(time_of("torchsort_soft_rank", where), rank), cell(time_of(matrix, where), dense)])
                     + " |")
    return lines


def tau_table(rows: list[dict], grid: Grid, device_type: str) -> list[str]:
    """Markdown: the ``tau_workloads`` at every tau, ours against the dense formula (forward + backward)."""
    ours = OURS.get(device_type, OURS["cpu"])
    if not grid.tau_workloads:
        return []
    lines = [f"Temperature (forward + backward, {grid.dtypes[0]}): median time of ours (`{ours}`) and of the dense "
             "formula at each tau (on CPU, exp near the bottom of its range and products with subnormal numbers "
             "take a slow path, so a call's time depends on tau).", "",
             "| B | n | d | tau | dense | ours | x dense |", "|---" * 7 + "|"]
    for batch, n, tau, d, dtype in sorted(grid.tau_workload_points()):
        where = {"batch": batch, "n": n, "tau": tau, "d": d, "dtype": dtype, "pass": "forward+backward"}
        dense = _value(rows, variant=DENSE, metric="time", **where)
        mine = _value(rows, variant=ours, metric="time", **where)
        lines.append(f"| {batch} | {n} | {d} | {tau:g} | {'-' if dense is None else _fmt_seconds(dense)} | "
                     f"{'-' if mine is None else _fmt_seconds(mine)} | "
                     f"{f'{mine / dense:.2f}x' if mine and dense else '-'} |")
    return lines


def exp_rate_table(rows: list[dict]) -> list[str]:
    """Markdown: achieved exponentials per second of the Triton variants (GPU runs only)."""
    rates = list(_select(rows, metric="exp_rate", status="ok"))
    if not rates:
        return []
    lines = ["Achieved exponentials per second (n^2 per batch row per pass, dense-equivalent; the floor of this "
             "O(n^2) kernel is the device's exp rate):", "",
             "| variant | pass | B | n | tau | d | dtype | exp/s | of peak |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rates:
        lines.append(f"| {row['variant']} | {row['pass']} | {row['batch']} | {row['n']} | {row['tau']} | {row['d']} "
                     f"| {row['dtype']} | {float(row['median']):.3g} | {row['note'].split(' of ')[0]} |")
    return lines


def write_readme(rows: list[dict], folder: Path, grid: Grid, variants: list[Variant], plots: list[str],
                 command: str, device: torch.device, seconds: float) -> None:
    try:
        import triton

        versions = f"torch {torch.__version__}, Triton {triton.__version__}"
    except ImportError:
        versions = f"torch {torch.__version__}"
    for peer in ("torchsort", "pykeops"):
        if importlib.util.find_spec(peer):
            from importlib.metadata import PackageNotFoundError, version

            try:
                versions += f", {peer} {version(peer)}"
            except PackageNotFoundError:
                pass
    on_gpu = device.type == "cuda"
    first = rows[0] if rows else {}
    load = "" if on_gpu else f", load average {os.getloadavg()[0]:.1f} at the end"
    timer = ("`triton.testing.do_bench`" if on_gpu else
             "wall clock after a warm-up, the variants of a point interleaved; noisy when other processes compete "
             "for the cores")
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
    lines += ["", *workload_table(rows, grid, device.type), ""]
    temperature = tau_table(rows, grid, device.type)
    if temperature:
        lines += [*temperature, ""]
    lines += [*summary_table(rows, grid, [v.name for v in variants]), ""]
    rate_lines = exp_rate_table(rows)
    if rate_lines:
        lines += [*rate_lines, ""]
    lines += [f"![{name}]({name})" for name in plots]
    if (folder / "memory.md").is_file():
        lines += ["", "Peak memory at larger n: [`memory.md`](memory.md) (`triton-sort memory`)."]
    not_run: dict[tuple[str, str, str], set[tuple[int, int]]] = {}
    for row in rows:
        if row["status"] != "ok":
            not_run.setdefault((row["variant"], row["status"], row["note"]), set()).add((int(row["batch"]),
                                                                                        int(row["n"])))
    if not_run:
        lines += ["", "Not measured:", ""]
        for (variant, status, note), sizes in sorted(not_run.items()):
            where = ", ".join(f"({b}, {n})" for b, n in sorted(sizes))
            lines.append(f"- `{variant}` {status} at (B, n) = {where}: {note}")
    (folder / "README.md").write_text("\n".join(lines) + "\n")


def write_report(rows: list[dict], folder: Path, grid: Grid, variants: list[Variant], command: str,
                 device: torch.device, seconds: float) -> list[Path]:
    """The PNG plots and README.md in ``folder`` (report.csv is written by ``run``); returns report.csv and the
    files written (plots only where matplotlib is installed)."""
    from .plots import make_plots

    folder.mkdir(parents=True, exist_ok=True)
    plots = make_plots(rows, folder, grid, [v.name for v in variants]) if importlib.util.find_spec(
        "matplotlib") else []
    write_readme(rows, folder, grid, variants, [p.name for p in plots], command, device, seconds)
    return [folder / "report.csv", *plots, folder / "README.md"]


def _workload(text: str) -> tuple[int, int]:
    """argparse type: ``BxN`` (e.g. ``64x100``)."""
    try:
        batch, n = (positive_int(part) for part in text.lower().split("x"))
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"expected BxN with integers >= 1 (e.g. 64x100), got {text!r}") from None
    return batch, n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="triton-sort report", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small grid (a few minutes on a 2-core CPU)")
    parser.add_argument("--n", type=positive_int, nargs="+", help="list lengths (n sweep)")
    parser.add_argument("--tau", type=positive_float, nargs="+", help="temperatures (tau sweep)")
    parser.add_argument("--d", type=positive_int, nargs="+", help="value widths (n sweep)")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), help="dtypes")
    parser.add_argument("--batch", type=positive_int, help="batch rows of the n and tau sweeps")
    parser.add_argument("--workloads", type=_workload, nargs="*", metavar="BxN",
                        help="the batch grid's (B, n) pairs (default: the common workloads, or none when --n or "
                             "--batch is given; with no value: none)")
    parser.add_argument("--workload-d", type=positive_int, nargs="+", help="value widths of the batch grid")
    parser.add_argument("--tau-workloads", type=_workload, nargs="*", metavar="BxN",
                        help="(B, n) pairs also measured at every --tau (default: 64x100, or none when --n, --batch "
                             "or --workloads is given; with no value: none)")
    parser.add_argument("--no-counts", action="store_true", help="do not count device operations and host syncs")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="variants (default all)")
    parser.add_argument("--out", type=Path, default=Path("perf_reports"), help="reports go to OUT/<device>/")
    args = parser.parse_args(argv)
    folder = check_writable(parser, args.out / machine_name())
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    grid = default_grid(device, args.quick)
    workloads, tau_workloads = args.workloads, args.tau_workloads
    if workloads is None and (args.n is not None or args.batch is not None):
        workloads = []  # a sweep asked for by hand: just that
    if tau_workloads is None and workloads is not None:
        tau_workloads = []
    overrides = {"ns": args.n, "taus": args.tau, "ds": args.d, "dtypes": args.dtype, "batch": args.batch,
                 "workloads": workloads, "workload_ds": args.workload_d, "tau_workloads": tau_workloads}
    grid = dataclasses.replace(grid, count_ops=not args.no_counts,
                               **{key: tuple(value) if isinstance(value, list) else value
                                  for key, value in overrides.items() if value is not None})
    variants = [VARIANTS[name] for name in (args.variants or VARIANTS)]
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = run(grid, variants, device, csv_path=folder / "report.csv")
    command = "triton-sort report " + " ".join(argv if argv is not None else sys.argv[1:])
    files = write_report(rows, folder, grid, variants, command.strip(), device, time.perf_counter() - started)
    print("wrote " + ", ".join(str(path) for path in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
