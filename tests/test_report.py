"""``triton-sort report``: a tiny grid end to end (CSV columns, PNG plots, README), failed and skipped variants."""

from __future__ import annotations

import csv
import dataclasses
import re

import pytest
import torch
from PIL import Image

from triton_sort.bench import report
from triton_sort.bench.memory import machine_name
from triton_sort.bench.report import COLUMNS, VARIANTS, Grid, Variant

CPU = torch.device("cpu")
TINY = Grid(ns=(32, 64), taus=(0.1, 1.0), ds=(1, 3), seconds_per_timing=0.0, max_reps=3)


def _broken(scores, x, tau):
    raise RuntimeError("boom")


BROKEN = Variant("broken", "always raises", _broken)


def _rows(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_tiny_report_writes_csv_plots_and_readme(tmp_path):
    variants = [VARIANTS["dense_reference"], VARIANTS["torch_streaming"], VARIANTS["triton_streaming"],
                VARIANTS["triton_banded"], BROKEN]
    rows = report.run(TINY, variants, CPU, progress=False)
    files = report.write_report(rows, tmp_path, TINY, variants, "triton-sort report --test", CPU, 1.0)

    with open(tmp_path / "report.csv", newline="") as handle:
        assert tuple(next(csv.reader(handle))) == COLUMNS
    written = _rows(tmp_path / "report.csv")
    ok = [r for r in written if r["status"] == "ok"]
    # Every pass is timed at every point, for both CPU variants, with quantiles in order.
    for variant in ("dense_reference", "torch_streaming"):
        timed = [r for r in ok if r["variant"] == variant and r["metric"] == "time"]
        assert {(r["pass"], r["n"], r["tau"], r["d"]) for r in timed} == {
            (p, str(n), str(tau), str(d)) for p in report.PASSES for n, tau, d, _ in TINY.points()}
        assert all(float(r["p20"]) <= float(r["median"]) <= float(r["p80"]) for r in timed)
        errors = [float(r["median"]) for r in ok if r["variant"] == variant and r["metric"].startswith("rel_error")]
        assert len(errors) == 3 * len(TINY.points()) and max(errors) < 1e-3
        memory = [r for r in ok if r["variant"] == variant and r["metric"] == "peak_memory"]
        assert {r["n"] for r in memory} == {"32", "64"} and all(float(r["median"]) >= 0 for r in memory)
    assert {r["device"] for r in written} == {machine_name()} and all(r["timestamp"] for r in written)

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
    assert re.search(r"\| 64 \| [\d.]+ ms \| [\d.]+ MiB \| [\d.]+ ms \([\d.]+x\)", readme)  # ratio to dense
    assert "`broken` failed" in readme and "boom" in readme


def test_variants_that_would_not_fit_are_skipped_with_the_reason(monkeypatch):
    monkeypatch.setattr(report, "available_bytes", lambda device: 100_000)
    grid = dataclasses.replace(TINY, ns=(64,), taus=(1.0,), ds=(1,))
    rows = report.run(grid, [VARIANTS["dense_reference"], VARIANTS["torch_streaming"]], CPU, progress=False)
    dense = [r for r in rows if r["variant"] == "dense_reference"]
    assert [r["status"] for r in dense] == ["skipped"] and "would need" in dense[0]["note"]
    streaming = [r for r in rows if r["variant"] == "torch_streaming"]
    assert {r["metric"] for r in streaming if r["status"] == "ok"} == {"time", "peak_memory"}
    # The float64 reference does not fit either: accuracy is skipped, with the reason.
    assert any(r["metric"] == "rel_error" and r["status"] == "skipped" and "float64 reference" in r["note"]
               for r in streaming)


def test_sizes_predicted_to_exceed_the_time_limit_are_skipped():
    grid = dataclasses.replace(TINY, ns=(16, 32), taus=(1.0,), ds=(1,), memory_ds=(), max_seconds=1e-9)
    rows = report.run(grid, [VARIANTS["torch_streaming"]], CPU, progress=False)
    assert {r["n"] for r in rows if r["metric"] == "time" and r["status"] == "ok"} == {16}
    (skipped,) = [r for r in rows if r["status"] == "skipped"]
    assert skipped["n"] == 32 and "predicted" in skipped["note"] and "limit" in skipped["note"]


def test_grid_points_and_quick_defaults():
    assert TINY.tau_ref == 1.0 and TINY.n_ref == 64
    assert set(TINY.points()) == {(32, 1.0, 1, "fp32"), (32, 1.0, 3, "fp32"), (64, 1.0, 1, "fp32"),
                                  (64, 1.0, 3, "fp32"), (64, 0.1, 1, "fp32")}
    quick = report.default_grid(CPU, quick=True)
    assert quick.taus == (0.01, 0.1, 1.0, 10.0) and quick.ds == (1, 16, 64) and max(quick.ns) <= 4096


def test_cli_writes_into_perf_reports_of_the_device_by_default(tmp_path, monkeypatch):
    from triton_sort.cli import SUBCOMMANDS, main

    assert SUBCOMMANDS["report"] == "triton_sort.bench.report"
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--quick", "--n", "16", "--tau", "1", "--d", "1", "--variants", "torch_banded"]) == 0
    folder = tmp_path / "perf_reports" / machine_name()
    assert (folder / "README.md").is_file() and (folder / "time_vs_n.png").is_file()
    assert {r["variant"] for r in _rows(folder / "report.csv")} == {"torch_banded"}


@pytest.mark.parametrize("name", ["torchsort", "pykeops"])
def test_missing_peers_are_skipped_with_a_reason(name):
    reason = report.skip_reason(VARIANTS[name], (64, 1.0, 1, "fp32"), CPU, 1)
    if reason is None:
        pytest.skip(f"{name} is installed here")
    assert "not installed" in reason
