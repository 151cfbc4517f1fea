"""``triton-sort report``: a tiny grid end to end (CSV columns, PNG plots, README, the batch grid with operation
counts), failed and skipped variants, peers, argument and output-folder validation before measuring."""

from __future__ import annotations

import csv
import dataclasses
import os
import re

import pytest
import torch
from PIL import Image

import triton_sort
from triton_sort.bench import report
from triton_sort.bench.memory import machine_name
from triton_sort.bench.report import COLUMNS, VARIANTS, Grid, Variant
from triton_sort.reference import dense_sort_apply

CPU = torch.device("cpu")
TINY = Grid(ns=(32, 64), taus=(0.1, 1.0), ds=(1, 3), workloads=((4, 8),), workload_ds=(1, 2),
            seconds_per_timing=0.0, max_reps=3)


def _broken(scores, x, tau):
    raise RuntimeError("boom")


BROKEN = Variant("broken", "always raises", _broken)


def _rows(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_tiny_report_writes_csv_plots_and_readme(tmp_path):
    variants = [VARIANTS["dense_reference"], VARIANTS["torch_streaming"], VARIANTS["triton_streaming"],
                VARIANTS["triton_banded"], BROKEN]
    rows = report.run(TINY, variants, CPU, csv_path=tmp_path / "report.csv", progress=False)
    files = report.write_report(rows, tmp_path, TINY, variants, "triton-sort report --test", CPU, 1.0)

    with open(tmp_path / "report.csv", newline="") as handle:
        assert tuple(next(csv.reader(handle))) == COLUMNS
    written = _rows(tmp_path / "report.csv")
    assert written == [{key: str(value) for key, value in row.items()} for row in rows]
    ok = [r for r in written if r["status"] == "ok"]
    # Every pass is timed at every point, for both CPU variants, with quantiles in order.
    for variant in ("dense_reference", "torch_streaming"):
        timed = [r for r in ok if r["variant"] == variant and r["metric"] == "time"]
        assert {(r["pass"], r["batch"], r["n"], r["tau"], r["d"]) for r in timed} == {
            (p, str(b), str(n), str(tau), str(d)) for p in report.PASSES for b, n, tau, d, _ in TINY.points()}
        assert all(float(r["p20"]) <= float(r["median"]) <= float(r["p80"]) for r in timed)
        errors = [float(r["median"]) for r in ok if r["variant"] == variant and r["metric"].startswith("rel_error")]
        assert len(errors) == 3 * len(TINY.points()) and max(errors) < 1e-3
        memory = [r for r in ok if r["variant"] == variant and r["metric"] == "peak_memory"]
        assert {r["n"] for r in memory} == {"32", "64"} and all(float(r["median"]) >= 0 for r in memory)
        # Operation counts per call, at every point: device_ops = torch_ops + triton_launches, whole numbers.
        counts = {(r["pass"], r["batch"], r["n"], r["tau"], r["d"], r["metric"]): float(r["median"]) for r in ok
                  if r["variant"] == variant and r["unit"] == "count"}
        assert len(counts) == 2 * 4 * len(TINY.points())
        for (pass_, *point, metric), value in counts.items():
            assert value == int(value) >= 0
            if metric == "device_ops":
                assert value == counts[(pass_, *point, "torch_ops")] + counts[(pass_, *point, "triton_launches")] > 0
    assert {r["device"] for r in written} == {machine_name()} and all(r["timestamp"] for r in written)
    assert {r["tool"] for r in written} == {"report"}

    # A failing variant is recorded with its error; skipped ones with their reason; nothing is dropped.
    failed = [r for r in written if r["variant"] == "broken"]
    assert len(failed) == len(TINY.points()) and all(r["status"] == "failed" and "boom" in r["note"] for r in failed)
    for name in ("triton_streaming", "triton_banded"):
        skipped = [r for r in written if r["variant"] == name]
        assert len(skipped) == len(TINY.points()) and all(r["status"] == "skipped" and "need a GPU" in r["note"]
                                                          for r in skipped)

    names = {path.name for path in files}
    assert {"report.csv", "README.md", "time_vs_n.png", "memory_vs_n.png", "time_vs_tau.png",
            "error_vs_n.png"} <= names
    for path in files:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            with Image.open(path) as image:
                image.verify()
    readme = (tmp_path / "README.md").read_text()
    assert "![time_vs_n.png](time_vs_n.png)" in readme and "triton-sort report --test" in readme
    assert re.search(r"\| 64 \| [\d.]+ [mu]s \| [\d.]+ MiB \| [\d.]+ [mu]s \([\d.]+x\)", readme)  # ratio to dense
    # The batch grid: dense, ours (torch_banded is not in this run), operation counts.
    assert re.search(r"\| 4 \| 8 \| 2 \| [\d.]+ [mu]s \| - \| - \| - / \d+ \|", readme)
    assert "`broken` failed" in readme and "boom" in readme


def test_variants_that_would_not_fit_are_skipped_with_the_reason(monkeypatch):
    monkeypatch.setattr(report, "available_bytes", lambda device: 100_000)
    grid = dataclasses.replace(TINY, ns=(64,), taus=(1.0,), ds=(1,), workloads=(), count_ops=False)
    rows = report.run(grid, [VARIANTS["dense_reference"], VARIANTS["torch_streaming"]], CPU, progress=False)
    dense = [r for r in rows if r["variant"] == "dense_reference"]
    assert [r["status"] for r in dense] == ["skipped"] and "would need" in dense[0]["note"]
    streaming = [r for r in rows if r["variant"] == "torch_streaming"]
    assert {r["metric"] for r in streaming if r["status"] == "ok"} == {"time", "peak_memory"}
    # The float64 reference does not fit either: accuracy is skipped, with the reason.
    assert any(r["metric"] == "rel_error" and r["status"] == "skipped" and "float64 reference" in r["note"]
               for r in streaming)


def test_sizes_predicted_to_exceed_the_time_limit_are_skipped():
    grid = dataclasses.replace(TINY, ns=(16, 32), taus=(1.0,), ds=(1,), workloads=((2, 32),), workload_ds=(1,),
                               memory_ds=(), max_seconds=1e-9, count_ops=False)
    rows = report.run(grid, [VARIANTS["torch_streaming"]], CPU, progress=False)
    assert {(r["batch"], r["n"]) for r in rows if r["metric"] == "time" and r["status"] == "ok"} == {(1, 16), (2, 32)}
    (skipped,) = [r for r in rows if r["status"] == "skipped"]
    assert (skipped["batch"], skipped["n"]) == (1, 32) and "predicted" in skipped["note"] and "limit" in skipped["note"]
    # The batch grid is always measured, whatever the prediction.
    assert any(r["batch"] == 2 and r["metric"] == "time" and r["status"] == "ok" for r in rows)


def test_grid_points_and_quick_defaults():
    assert TINY.tau_ref == 1.0 and TINY.n_ref == 64
    assert set(TINY.points()) == {(1, 32, 1.0, 1, "fp32"), (1, 32, 1.0, 3, "fp32"), (1, 64, 1.0, 1, "fp32"),
                                  (1, 64, 1.0, 3, "fp32"), (1, 64, 0.1, 1, "fp32"), (4, 8, 1.0, 1, "fp32"),
                                  (4, 8, 1.0, 2, "fp32")}
    assert TINY.points()[0][:2] == (4, 8)  # least work first
    quick = report.default_grid(CPU, quick=True)
    assert quick.taus == (0.01, 0.1, 1.0, 10.0) and quick.ds == (1,) and max(quick.ns) <= 4096
    # The batch grid of the common workloads, d = 1 and 16.
    assert {(1, 8), (256, 8), (1, 100), (64, 100), (1024, 100), (64, 256), (16, 1000), (1, 4096)} <= set(
        quick.workloads) and quick.workload_ds == (1, 16)
    assert quick.tau_workloads == ((64, 100),)  # a short-list batch at every tau too
    assert {(64, 100, tau, d, "fp32") for tau in quick.taus for d in (1, 16)} <= set(quick.points())


def test_tau_workloads_are_measured_at_every_tau_and_tabled(tmp_path):
    grid = dataclasses.replace(TINY, ns=(16,), taus=(0.1, 1.0, 10.0), ds=(1,), workloads=((3, 8),),
                               tau_workloads=((3, 8),), workload_ds=(1,), memory_ds=(), count_ops=False)
    variants = [VARIANTS["dense_reference"], VARIANTS["torch_banded"]]
    rows = report.run(grid, variants, CPU, progress=False)
    timed = {(r["variant"], r["tau"]) for r in rows if r["metric"] == "time" and r["status"] == "ok"
             and (r["batch"], r["n"]) == (3, 8)}
    assert timed == {(v.name, tau) for v in variants for tau in (0.1, 1.0, 10.0)}
    report.write_report(rows, tmp_path, grid, variants, "triton-sort report --test", CPU, 1.0)
    readme = (tmp_path / "README.md").read_text()
    assert "Temperature (forward + backward" in readme
    for tau in ("0.1", "1", "10"):
        assert re.search(rf"\| 3 \| 8 \| 1 \| {tau} \| [\d.]+ [mu]s \| [\d.]+ [mu]s \| [\d.]+x \|", readme), tau


def test_cli_writes_into_perf_reports_of_the_device_by_default(tmp_path, monkeypatch):
    from triton_sort.cli import SUBCOMMANDS, main

    assert SUBCOMMANDS["report"] == "triton_sort.bench.report"
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--quick", "--n", "16", "--tau", "1", "--d", "1", "--variants", "torch_banded"]) == 0
    folder = tmp_path / "perf_reports" / machine_name()
    assert (folder / "README.md").is_file() and (folder / "time_vs_n.png").is_file()
    rows = _rows(folder / "report.csv")
    assert {r["variant"] for r in rows} == {"torch_banded"}
    assert {(r["batch"], r["n"]) for r in rows} == {("1", "16")}  # --n without --workloads: no batch grid


def test_peers_are_measured_in_the_same_run_or_skipped_with_a_reason(monkeypatch):
    """torchsort and pykeops run beside ours where installed; where not (CI), each row says so."""
    import importlib.util

    point = (2, 8, 1.0, 1, "fp32")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name in ("torchsort", "pykeops") else find_spec(name, *args))
    for name in ("torchsort_soft_sort", "torchsort_soft_rank", "pykeops"):
        assert f"{name.split('_')[0]} is not installed" in report.skip_reason(VARIANTS[name], point, CPU)
    assert "d = 1 only" in report.skip_reason(VARIANTS["torchsort_soft_sort"], (2, 8, 1.0, 4, "fp32"), CPU)
    if not hasattr(triton_sort, "relaxed_rank"):
        assert report.skip_reason(VARIANTS["relaxed_rank"], point, CPU) == "triton_sort.relaxed_rank not available"
    # Our soft sort: triton_sort.relaxed_sort where it exists, else P_hat @ s; both descending.
    scores = torch.tensor([[0.3, -1.0, 2.0]])
    assert torch.equal(VARIANTS["relaxed_sort"].forward(scores, scores, 1e-3).round(decimals=4),
                       torch.tensor([[2.0, 0.3, -1.0]]))


@pytest.mark.parametrize("name", ["torchsort_soft_sort", "torchsort_soft_rank"])
def test_torchsort_peers_run_when_installed(name):
    pytest.importorskip("torchsort")
    scores = torch.randn(3, 5, requires_grad=True)
    out = VARIANTS[name].forward(scores, scores, 0.1)
    out.sum().backward()
    assert out.shape == (3, 5) and scores.grad is not None


def test_pykeops_formulation_equals_the_dense_formula():
    """The KeOps LazyTensor form of P_hat @ x (NeuralSort's logits, softmax-weighted sum) is the paper's formula.
    Compiled at first use (about a minute, then cached on disk), so only where KeOps has compiled it before."""
    pytest.importorskip("pykeops")
    if os.environ.get("TRITON_SORT_TEST_PYKEOPS") != "1":
        pytest.skip("set TRITON_SORT_TEST_PYKEOPS=1 (KeOps compiles each formula at first use)")
    scores = torch.randn(3, 7, dtype=torch.float64)
    x = torch.randn(3, 7, 2, dtype=torch.float64)
    torch.testing.assert_close(VARIANTS["pykeops"].forward(scores, x, 0.5), dense_sort_apply(scores, x, 0.5),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("argv, message", [
    (["--n", "-5"], "--n: expected an integer >= 1, got -5"),
    (["--n", "0"], "--n: expected an integer >= 1, got 0"),
    (["--tau", "0"], "--tau: expected a finite number > 0, got 0"),
    (["--tau", "nan"], "--tau: expected a finite number > 0"),
    (["--tau", "inf"], "--tau: expected a finite number > 0"),
    (["--tau", "1e-310"], "--tau: expected a finite number > 0"),  # 1/tau overflows
    (["--d", "0"], "--d: expected an integer >= 1"),
    (["--batch", "0"], "--batch: expected an integer >= 1"),
    (["--dtype", "fp64"], "--dtype: invalid choice"),
    (["--workloads", "64x0"], "--workloads: expected BxN"),
    (["--tau-workloads", "x100"], "--tau-workloads: expected BxN"),
    (["--variants", "bogus"], "--variants: invalid choice"),
])
def test_cli_rejects_bad_arguments_before_measuring(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(report, "run", _broken)  # measuring anything would raise "boom"
    with pytest.raises(SystemExit) as exit_info:
        report.main([*argv, "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cli_checks_the_output_folder_before_measuring(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(report, "run", _broken)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--n", "8", "--out", str(blocker)])
    assert exit_info.value.code == 2 and f"--out: cannot write to {blocker}" in capsys.readouterr().err


def test_matrix_variant_is_measured_on_cpu_and_tabled(tmp_path):
    """``torch_matrix`` (relaxed_sort_matrix @ x) beside the dense formula in the batch grid's last column; on a GPU
    it is skipped with the reason (the Triton matrix kernel is measured there)."""
    grid = dataclasses.replace(TINY, ns=(16,), taus=(1.0,), ds=(1,), workloads=((3, 8),), workload_ds=(2,),
                               memory_ds=(), count_ops=False)
    variants = [VARIANTS["dense_reference"], VARIANTS["torch_matrix"]]
    rows = report.run(grid, variants, CPU, progress=False)
    errors = [float(r["median"]) for r in rows if r["variant"] == "torch_matrix" and r["metric"] == "rel_error"]
    assert errors and max(errors) < 1e-5  # P_hat @ x, against the float64 dense formula
    report.write_report(rows, tmp_path, grid, variants, "triton-sort report --test", CPU, 1.0)
    readme = (tmp_path / "README.md").read_text()
    assert re.search(r"\| 3 \| 8 \| 2 \| .* \| [\d.]+ [mu]s \([\d.]+x\) \|\n", readme)
    assert "on a GPU" in VARIANTS["torch_matrix"].unavailable(torch.device("cuda"), 1)
