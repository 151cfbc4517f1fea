"""The tuning loop: per key, prune the candidates by compiling them, time the rest, record the fastest.

Keys are (kernel, dtype, d bucket, n bucket); every candidate of ``candidate_configs`` is replayed on the arguments
the package itself passes the launcher (``registry``), its output is checked against the default configuration's,
and it is timed with ``triton.testing.do_bench`` on a GPU, or with a wall-clock timer under the interpreter (where
the numbers mean nothing; that mode exists to exercise tune -> cache -> use without a GPU).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

import torch

from ..kernels.configs import KernelConfig, candidate_configs, default_config
from . import cache, lookup
from .keys import DTYPES_BY_NAME, DeviceKey, device_key, entry_key, kernel_source_hash, n_bucket
from .prune import DeviceLimits, compile_metadata, job, prune_reason
from .registry import KERNELS, TunableKernel

# Largest relative difference (norm of the difference over the norm) from the default configuration's output
# that still counts as the same result: tiles only change the order of fp32 sums, and low-precision rounding.
TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 5e-2}


@dataclass(frozen=True)
class Task:
    """One key to tune, measured at (n, d)."""

    spec: TunableKernel
    n: int
    d: int
    dtype: str

    @property
    def block_d(self) -> int:
        return self.spec.block_d(self.d)

    @property
    def key(self) -> str:
        return entry_key(self.dtype, self.block_d, n_bucket(self.n))

    @property
    def single_d_chunk(self) -> bool:
        """Whether d fits one BLOCK_D chunk (else apply_backward compiles its multi-chunk variant)."""
        return not self.spec.uses_d or self.d <= self.block_d

    def describe(self) -> str:
        return f"{self.spec.name} {self.dtype} d{self.block_d} n{n_bucket(self.n)}"


def plan(kernels: Iterable[str], ns: Iterable[int], ds: Iterable[int], dtypes: Iterable[str]) -> list[Task]:
    """One task per distinct key (kernels that ignore d are tuned once per n and dtype)."""
    tasks: dict[tuple[str, str], Task] = {}
    for name in kernels:
        for dtype in dtypes:
            for d in ds:
                for n in ns:
                    task = Task(KERNELS[name], n, d, dtype)
                    tasks.setdefault((name, task.key), task)
    return list(tasks.values())


def default_batch(n: int) -> int:
    """Batch rows for tuning at n: at least 2^22 matrix entries per launch, so small n is not all overhead."""
    return max(1, min(64, (1 << 22) // max(1, n * n)))


class Progress:
    """tqdm if installed, else a one-line textual bar on stderr (if it is a terminal)."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done = total, 0
        self.enabled = enabled and sys.stderr.isatty()
        try:
            from tqdm import tqdm
        except ImportError:
            self._bar = None
        else:
            self._bar = tqdm(total=total, disable=not enabled, unit="config", file=sys.stderr, leave=False)

    def step(self, description: str) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.set_description(description)
            self._bar.update()
        elif self.enabled:
            filled = 30 * self.done // max(1, self.total)
            print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {description:<40}", end="",
                  file=sys.stderr, flush=True)

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(("\n" if self.enabled and self.done else "") + message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.done:
            print(file=sys.stderr)


def time_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median milliseconds of ``fn``: ``do_bench`` on CUDA, else wall-clock over ``reps`` calls after a warm-up."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def relative_difference(out: object, reference: object) -> float:
    """||out - reference|| / ||reference|| over all output tensors (a launcher returns one or a tuple)."""
    pairs = list(zip(_tensors(out), _tensors(reference), strict=True))
    error = sum(float((a.double() - b.double()).square().sum()) for a, b in pairs)
    norm = sum(float(b.double().square().sum()) for _, b in pairs)
    return math.sqrt(error / norm) if norm > 0 else math.sqrt(error)


def _tensors(out: object) -> tuple[torch.Tensor, ...]:
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


def _measure(task: Task, replay: Callable[[KernelConfig], object], config: KernelConfig, reference: object,
             device: torch.device, reps: int) -> dict:
    """Run, check and time one configuration: status 'timed' with time_ms, or 'wrong'/'failed' with a reason."""
    try:
        difference = relative_difference(replay(config), reference)
        if not difference <= TOLERANCE[task.dtype]:
            return {"status": "wrong", "reason": f"differs from the default configuration's output by "
                                                 f"{difference:.1e} (relative)"}
        return {"status": "timed", "time_ms": time_ms(lambda: replay(config), device, reps)}
    except Exception as exc:  # a configuration that fails to run is recorded and skipped, not fatal
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}


def tune(tasks: list[Task], *, device: torch.device, limits: DeviceLimits, batch: int | None = None,
         reps: int = 3, force: bool = False, progress: bool = True,
         log: Callable[[str], None] | None = None) -> list[dict]:
    """Tune each task's key and record the winner in the user's cache. Returns one summary per task (tuned,
    already cached, or failed). Keys already in the cache are skipped unless ``force``."""
    dev = device_key(device)
    path = cache.cache_path(dev)
    triton = lookup.triton_version()
    done = {} if force else _cached_keys(path, triton)
    todo = [task for task in tasks if task.key not in done.get(task.spec.name, {})]
    summaries = [{"task": task.describe(), "status": "cached"} for task in tasks if task not in todo]

    # Compile-only metadata depends on (kernel, dtype, block_d, d chunking), not on n: one compile per candidate.
    variants = list(dict.fromkeys((t.spec.name, t.dtype, t.block_d, t.single_d_chunk) for t in todo))
    specs = [job(kernel, config, dtype, block_d, single) for kernel, dtype, block_d, single in variants
             for config in candidate_configs(kernel, block_d)]
    if specs:
        (log or print)(f"compiling {len(specs)} candidate configurations for sm_{limits.arch} to prune them ...")
    compiled = iter(compile_metadata(specs, limits.arch))
    metadata = {variant: [next(compiled) for _ in candidate_configs(variant[0], variant[2])] for variant in variants}

    bar = Progress(sum(len(candidate_configs(t.spec.name, t.block_d)) for t in todo), enabled=progress)
    say = log or bar.write
    try:
        for task in todo:
            rows = batch or (default_batch(task.n) if device.type == "cuda" else 1)
            try:
                summary = _tune_one(task, metadata[(task.spec.name, task.dtype, task.block_d, task.single_d_chunk)],
                                    dev, path, triton, device, limits, rows, reps, bar)
            except Exception as exc:  # e.g. the default configuration itself fails: report it, tune the rest
                summary = {"task": task.describe(), "status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
            say(format_summary(summary))
            summaries.append(summary)
    finally:
        bar.close()
        lookup.clear()
    return summaries


def _cached_keys(path, triton: str) -> dict[str, dict[str, dict]]:
    try:
        doc = cache.read(path, triton_version=triton)
    except cache.CacheProblem:
        return {}  # record() warns about the file and replaces it
    return {} if doc is None else lookup.usable_entries(doc, str(path))


def _tune_one(task: Task, metadata: list[dict], dev: DeviceKey, path, triton: str, device: torch.device,
              limits: DeviceLimits, batch: int, reps: int, bar: Progress) -> dict:
    candidates = candidate_configs(task.spec.name, task.block_d)
    default = default_config(task.spec.name, task.block_d)
    replay = task.spec.capture(batch, task.n, task.d, DTYPES_BY_NAME[task.dtype], device)
    reference = replay(default)
    rows = []
    for config, meta in zip(candidates, metadata, strict=True):
        row = {"config": config.as_dict(), **{k: meta.get(k) for k in ("shared_bytes", "registers", "spill_bytes")}}
        reason = prune_reason(meta, config, limits)
        row.update({"status": "pruned", "reason": reason} if reason else
                   _measure(task, replay, config, reference, device, reps))
        rows.append(row)
        bar.step(task.describe())
    timed = [row for row in rows if row["status"] == "timed"]
    summary = {"task": task.describe(), "candidates": rows}
    if not timed:
        return {**summary, "status": "failed", "reason": "no candidate configuration ran"}
    best = min(timed, key=lambda row: row["time_ms"])
    default_row = next((row for row in timed if row["config"] == default.as_dict()), None)
    default_ms = default_row["time_ms"] if default_row else time_ms(lambda: replay(default), device, reps)
    entry = {"config": best["config"], "time_ms": best["time_ms"], "default_config": default.as_dict(),
             "default_time_ms": default_ms, "speedup": default_ms / best["time_ms"], "n": task.n, "d": task.d,
             "batch": batch, "timer": "do_bench" if device.type == "cuda" else "wall-clock (interpreter)",
             "tuned_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "candidates": rows}
    cache.record(path, dev, triton, task.spec.name, kernel_source_hash(task.spec.kernel), task.key, entry)
    return {**summary, **entry, "status": "tuned"}


def _config_text(config: dict) -> str:
    return "block_m={block_m} block_n={block_n} num_warps={num_warps} num_stages={num_stages}".format(**config)


def format_summary(summary: dict) -> str:
    """One line per key: the chosen configuration and its speed-up, then pruned or failing candidates."""
    if summary["status"] != "tuned":
        return f"{summary['task']}: {summary['status']}" + (f" ({summary['reason']})" if "reason" in summary else "")
    lines = [f"{summary['task']}: {_config_text(summary['config'])}  {summary['time_ms']:.4g} ms, "
             f"{summary['speedup']:.2f}x the default ({summary['default_time_ms']:.4g} ms)"]
    for row in summary["candidates"]:
        spills = f", spills {row['spill_bytes']} B" if row.get("spill_bytes") else ""
        if row["status"] != "timed" or spills:
            lines.append(f"    {_config_text(row['config'])}: {row['status']}"
                         f"{': ' + row['reason'] if row.get('reason') else ''}{spills}")
    return "\n".join(lines)
