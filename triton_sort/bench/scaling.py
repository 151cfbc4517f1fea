"""Banded, exact evaluation against the dense reference as n grows (the table of the exactness issue).

``triton-sort scaling [--n 16384 65536 262144] [--tau 0.1 1] [--repeats 3]`` times forward + backward (B = 1,
d = 1, standard-normal scores) of the dense fp32 reference (materialised P_hat, autograd) and of
``relaxed_sort_apply`` (banded by default; the PyTorch path on CPU, the Triton kernels on CUDA, plus the dense
streaming kernel there), reports medians with p20/p80, extra memory measured in a fresh process, the relative error
of the forward against a float64 reference (computed densely in row chunks, where affordable) and the fitted
exponent of time versus n. Writes ``perf_reports/<device>/scaling.{csv,md}`` (the CSV in the ``bench.schema``
format, rows written as measured: ``time``, ``peak_memory``, ``rel_error``).
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from ..reference import dense_sort_apply
from .grid import DENSE, OURS
from .memory import measure_in_subprocess
from .schema import RowWriter, check_writable, machine_description, machine_name, positive_float, positive_int

DENSE_MAX_N = 16384  # the dense reference needs ~5 GiB at n = 16384 (forward + backward, fp32)
REFERENCE_MAX_N = 65536  # float64 forward reference, computed in row chunks: O(n^2) time


def float64_reference(scores: torch.Tensor, x: torch.Tensor, tau: float, rows_per_chunk: int = 256) -> torch.Tensor:
    """P_hat @ x in float64 from the paper's formula, row chunk by row chunk (never n x n). scores (n,), x (n, d)."""
    s = scores.detach().to(torch.float64)
    values = x.detach().to(torch.float64)
    n = s.shape[0]
    b = torch.zeros(n, dtype=torch.float64, device=s.device)
    for j0 in range(0, n, rows_per_chunk):
        b[j0 : j0 + rows_per_chunk] = (s[j0 : j0 + rows_per_chunk, None] - s[None, :]).abs().sum(-1)
    out = torch.empty_like(values)
    for i0 in range(0, n, rows_per_chunk):
        c = n - 1 - 2 * torch.arange(i0, min(i0 + rows_per_chunk, n), dtype=torch.float64, device=s.device)
        out[i0 : i0 + rows_per_chunk] = torch.softmax((c[:, None] * s[None, :] - b[None, :]) / tau, -1) @ values
    return out


def _time(fn, repeats: int) -> tuple[float, float, float]:
    fn()  # warm-up (and torch.compile of the PyTorch path's chunks)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    quantiles = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    return statistics.median(times), quantiles[0], quantiles[-1]


def _variants(device: str) -> dict[str, dict]:
    """The variants, named as in ``triton-sort report`` (ours: ``relaxed_sort_apply`` with its defaults)."""
    from .. import relaxed_sort_apply

    variants = {
        DENSE: {"fn": dense_sort_apply, "memory": "dense_reference", "max_n": DENSE_MAX_N},
        OURS.get(device, OURS["cpu"]): {"fn": lambda s, x, tau: relaxed_sort_apply(s, x, tau),
                                         "memory": "torch_streaming"},
    }
    if device == "cuda":
        variants["triton_streaming"] = {"fn": lambda s, x, tau: relaxed_sort_apply(s, x, tau, banded=False),
                                        "memory": None}
    return variants


def run(ns: list[int], taus: list[float], repeats: int, device: str, rec: RowWriter) -> list[dict]:
    """Measure and add the rows to ``rec`` (written as they come); returns ``rec.rows``."""
    for tau in taus:
        for n in ns:
            gen = torch.Generator().manual_seed(n)
            scores = torch.randn(n, generator=gen).to(device)
            x = torch.randn(n, 1, generator=gen).to(device)
            reference = float64_reference(scores, x, tau) if n <= REFERENCE_MAX_N else None
            point = (1, n, tau, 1, "fp32")
            for name, variant in _variants(device).items():
                if n > variant.get("max_n", math.inf):
                    rec.add(name, "forward+backward", point, "all", status="skipped",
                            note="the materialised matrix does not fit")
                    continue

                def step(variant=variant, scores=scores, x=x, tau=tau):
                    s, v = scores.clone().requires_grad_(), x.clone().requires_grad_()
                    out = variant["fn"](s, v, tau)
                    out.backward(torch.ones_like(out))
                    return out.detach()

                seconds = _time(step, repeats)
                rec.add(name, "forward+backward", point, "time", "s", seconds)
                print(f"{name} n={n} tau={tau}: {seconds[0]:.3g} s", flush=True)
                if reference is not None:
                    error = float((step().double() - reference).norm() / reference.norm())
                    rec.add(name, "forward", point, "rel_error", "ratio", (error,),
                            note="fp32 forward against a float64 reference in row chunks")
                else:
                    rec.add(name, "forward", point, "rel_error", status="skipped",
                            note="float64 reference not affordable")
                if device == "cpu" and variant["memory"]:
                    measured = measure_in_subprocess(variant["memory"], n, 1, tau)
                    if "error" in measured:
                        rec.add(name, "forward+backward", point, "peak_memory", status="failed",
                                note=measured["error"])
                    else:
                        rec.add(name, "forward+backward", point, "peak_memory", "MiB", (measured["extra_mib"],),
                                note="fresh process, peak RSS above the inputs")
    return rec.rows


def write_markdown(rows: list[dict], folder: Path, command: str) -> None:
    """scaling.md from the schema rows."""
    values = {(r["variant"], int(r["n"]), float(r["tau"]), r["metric"]): r for r in rows if r["status"] == "ok"}
    ours = next((r["variant"] for r in rows if r["variant"] != DENSE), OURS["cpu"])
    lines = [
        "# Banded exact evaluation versus the dense reference",
        "",
        f"Machine: {machine_description()}, torch {torch.__version__}. Command: `{command}`. "
        "Raw data: [`scaling.csv`](scaling.csv).",
        f"Forward + backward, B = 1, d = 1, standard-normal scores; `{ours}` is `relaxed_sort_apply` with its "
        f"defaults, `{DENSE}` the paper's formula in fp32 with a materialised P_hat under autograd; medians "
        "(p20-p80) of repeated runs after a warm-up; extra memory measured in a fresh process (peak RSS above the "
        "inputs); error = relative error of the fp32 forward against a float64 reference computed densely in row "
        "chunks.",
        "",
        "| variant | n | tau | median (s) | p20-p80 (s) | speed-up vs dense | extra memory (MiB) | memory ratio | "
        "rel. error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def get(variant: str, n: int, tau: float, metric: str) -> float | None:
        row = values.get((variant, n, tau, metric))
        return None if row is None else float(row["median"])

    for row in rows:
        variant, n, tau = row["variant"], int(row["n"]), float(row["tau"])
        if row["metric"] == "all":
            lines.append(f"| {variant} | {n} | {tau} | {row['status']}: {row['note']} | | | | | |")
        if row["metric"] != "time" or row["status"] != "ok":
            continue
        median, dense = float(row["median"]), get(DENSE, n, tau, "time")
        memory, dense_memory = get(variant, n, tau, "peak_memory"), get(DENSE, n, tau, "peak_memory")
        error = get(variant, n, tau, "rel_error")
        lines.append(f"| {variant} | {n} | {tau} | {median:.3f} | {float(row['p20']):.3f}-{float(row['p80']):.3f} | "
                     f"{f'{dense / median:.1f}x' if dense else ''} | {'' if memory is None else memory} | "
                     f"{f'{dense_memory / memory:.0f}x' if dense_memory and memory else ''} | "
                     f"{'not affordable' if error is None else f'{error:.1e}'} |")
    lines += ["", "Growth of the time with n (fitted exponent between consecutive sizes):", ""]
    for tau in sorted({float(r["tau"]) for r in rows}):
        sizes = sorted(n for (v, n, t, m) in values if v == ours and t == tau and m == "time")
        pairs = [*itertools.pairwise(sizes), *([(sizes[0], sizes[-1])] if len(sizes) > 2 else [])]
        for n0, n1 in pairs:
            t0, t1 = get(ours, n0, tau, "time"), get(ours, n1, tau, "time")
            lines.append(f"- tau = {tau}: n {n0} -> {n1}: time x{t1 / t0:.1f}, exponent "
                         f"{math.log(t1 / t0) / math.log(n1 / n0):.2f}")
    (folder / "scaling.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="triton-sort scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=positive_int, nargs="+", default=[16384, 65536, 262144])
    parser.add_argument("--tau", type=positive_float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--out", type=Path, default=Path("perf_reports"))
    args = parser.parse_args(argv)
    folder = check_writable(parser, args.out / machine_name())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with RowWriter("scaling", folder / "scaling.csv") as rec:
        rows = run(args.n, args.tau, args.repeats, device, rec)
    command = "triton-sort scaling " + " ".join(argv if argv is not None else sys.argv[1:])
    write_markdown(rows, folder, command.strip())
    print(f"wrote {folder / 'scaling.csv'}, {folder / 'scaling.md'}")
    return 0
