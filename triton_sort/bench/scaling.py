"""Banded, exact evaluation against the dense reference as n grows (the table of the exactness issue).

``triton-sort scaling [--n 16384 65536 262144] [--tau 0.1 1] [--repeats 3]`` times forward + backward (B = 1,
d = 1, standard-normal scores) of the dense fp32 reference (materialised P_hat, autograd) and of
``relaxed_sort_apply`` (banded by default; the PyTorch path on CPU, the Triton kernels on CUDA, plus the dense
streaming kernel there), reports medians with p20/p80, extra memory measured in a fresh process, the relative error
of the forward against a float64 reference (computed densely in row chunks, where affordable) and the fitted
exponent of time versus n. Writes ``perf_reports/<device>/scaling.{csv,md}``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from ..reference import dense_sort_apply
from .memory import machine_description, machine_name, measure_in_subprocess

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
    from .. import relaxed_sort_apply

    variants = {
        "dense_reference_fp32": {"fn": dense_sort_apply, "memory": "dense_reference", "max_n": DENSE_MAX_N},
        "banded": {"fn": lambda s, x, tau: relaxed_sort_apply(s, x, tau), "memory": "torch_streaming"},
    }
    if device == "cuda":
        variants["triton_dense_streaming"] = {
            "fn": lambda s, x, tau: relaxed_sort_apply(s, x, tau, banded=False), "memory": None}
    return variants


def run(ns: list[int], taus: list[float], repeats: int, device: str) -> list[dict]:
    rows = []
    for tau in taus:
        for n in ns:
            gen = torch.Generator().manual_seed(n)
            scores = torch.randn(n, generator=gen).to(device)
            x = torch.randn(n, 1, generator=gen).to(device)
            reference = float64_reference(scores, x, tau) if n <= REFERENCE_MAX_N else None
            for name, variant in _variants(device).items():
                row = {"variant": name, "n": n, "tau": tau, "device": device}
                if n > variant.get("max_n", math.inf):
                    rows.append({**row, "note": "skipped: the materialised matrix does not fit"})
                    continue

                def step(variant=variant, scores=scores, x=x, tau=tau):
                    s, v = scores.clone().requires_grad_(), x.clone().requires_grad_()
                    out = variant["fn"](s, v, tau)
                    out.backward(torch.ones_like(out))
                    return out.detach()

                row["median_s"], row["p20_s"], row["p80_s"] = _time(step, repeats)
                if reference is not None:
                    out = step()
                    row["rel_error_vs_float64"] = float((out.double() - reference).norm() / reference.norm())
                if device == "cpu" and variant["memory"]:
                    measured = measure_in_subprocess(variant["memory"], n, 1, tau)
                    row["extra_mib"] = measured.get("extra_mib", float("nan"))
                rows.append(row)
                print(row, flush=True)
    return rows


def write_report(rows: list[dict], folder: Path, command: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    fields = ["variant", "n", "tau", "device", "median_s", "p20_s", "p80_s", "extra_mib", "rel_error_vs_float64",
              "note"]
    with open(folder / "scaling.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    timed = {(r["variant"], r["n"], r["tau"]): r for r in rows if "median_s" in r}
    lines = [
        "# Banded exact evaluation versus the dense reference",
        "",
        f"Machine: {machine_description()}, torch {torch.__version__}. Command: `{command}`.",
        "Forward + backward, B = 1, d = 1, standard-normal scores; medians (p20-p80) of repeated runs after a "
        "warm-up; extra memory measured in a fresh process (peak RSS above the inputs); error = relative error of "
        "the fp32 forward against a float64 reference computed densely in row chunks.",
        "",
        "| variant | n | tau | median (s) | p20-p80 (s) | speed-up vs dense | extra memory (MiB) | memory ratio | "
        "rel. error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        dense = timed.get(("dense_reference_fp32", r["n"], r["tau"]))
        if "median_s" not in r:
            lines.append(f"| {r['variant']} | {r['n']} | {r['tau']} | {r.get('note', '')} | | | | | |")
            continue
        speedup = f"{dense['median_s'] / r['median_s']:.1f}x" if dense else ""
        memory = r.get("extra_mib")
        ratio = (f"{dense['extra_mib'] / memory:.0f}x" if dense and memory and dense.get("extra_mib") else "")
        error = r.get("rel_error_vs_float64")
        lines.append(f"| {r['variant']} | {r['n']} | {r['tau']} | {r['median_s']:.3f} | "
                     f"{r['p20_s']:.3f}-{r['p80_s']:.3f} | {speedup} | {memory if memory is not None else ''} | "
                     f"{ratio} | {f'{error:.1e}' if error is not None else 'not affordable'} |")
    lines += ["", "Growth of the banded time with n (fitted exponent between consecutive sizes):", ""]
    for tau in sorted({r["tau"] for r in rows}):
        sizes = sorted(n for (v, n, t) in timed if v == "banded" and t == tau)
        for n0, n1 in itertools.pairwise(sizes):
            t0, t1 = timed[("banded", n0, tau)]["median_s"], timed[("banded", n1, tau)]["median_s"]
            lines.append(f"- tau = {tau}: n {n0} -> {n1}: time x{t1 / t0:.1f}, exponent "
                         f"{math.log(t1 / t0) / math.log(n1 / n0):.2f}")
        if len(sizes) > 1:
            t0, t1 = timed[("banded", sizes[0], tau)]["median_s"], timed[("banded", sizes[-1], tau)]["median_s"]
            lines.append(f"- tau = {tau}: n {sizes[0]} -> {sizes[-1]}: exponent "
                         f"{math.log(t1 / t0) / math.log(sizes[-1] / sizes[0]):.2f}")
    (folder / "scaling.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="triton-sort scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[16384, 65536, 262144])
    parser.add_argument("--tau", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("perf_reports"))
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = run(args.n, args.tau, args.repeats, device)
    command = "triton-sort scaling " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(rows, args.out / machine_name(), command.strip())
    print(f"wrote {args.out / machine_name() / 'scaling.md'}")
    return 0
