"""One CSV schema for ``report``, ``scaling`` and ``memory``: same columns, rows on disk as measured, plots from any
of them; ``scaling`` and ``memory`` validate their arguments and output folder before measuring."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util

import pytest
import torch

from triton_sort.bench import memory, report, scaling
from triton_sort.bench.grid import Grid
from triton_sort.bench.plots import make_plots
from triton_sort.bench.schema import COLUMNS, RowWriter, machine_name, read_csv

POINT = (2, 8, 1.0, 1, "fp32")


def _header(path) -> tuple[str, ...]:
    with open(path, newline="") as handle:
        return tuple(next(csv.reader(handle)))


def test_rows_are_on_disk_as_soon_as_they_are_added(tmp_path):
    path = tmp_path / "rows.csv"
    with RowWriter("report", path) as rec:
        rec.add("v", "forward", POINT, "time", "s", (1.0, 0.5, 2.0))
        (on_disk,) = read_csv(path)  # the writer is still open
        assert on_disk["median"] == "1.0" and on_disk["batch"] == "2" and on_disk["tool"] == "report"
        rec.add("v", "forward", POINT, "time", status="skipped", note="why")
        assert [r["status"] for r in read_csv(path)] == ["ok", "skipped"]
        with pytest.raises(ValueError, match="status"):
            rec.add("v", "forward", POINT, "time", status="fine")


def test_a_report_stopped_halfway_keeps_what_it_measured(tmp_path):
    def stop_at_the_second_size(scores, x, tau):
        if scores.shape[-1] > 16:
            raise KeyboardInterrupt
        return x * 1.0

    grid = Grid(ns=(16, 32), taus=(1.0,), ds=(1,), seconds_per_timing=0.0, max_reps=3, count_ops=False)
    variant = report.Variant("stops", "stops halfway", stop_at_the_second_size, accuracy=False)
    with pytest.raises(KeyboardInterrupt):
        report.run(grid, [variant], torch.device("cpu"), csv_path=tmp_path / "report.csv", progress=False)
    kept = read_csv(tmp_path / "report.csv")
    assert {(r["n"], r["pass"], r["status"]) for r in kept} == {("16", p, "ok") for p in report.PASSES}


def test_report_scaling_and_memory_write_the_same_columns_and_plots_read_any(tmp_path):
    folder = tmp_path / machine_name()
    grid = Grid(ns=(16, 32), taus=(1.0,), ds=(1,), seconds_per_timing=0.0, max_reps=3, memory_ds=(),
                count_ops=False)
    report.run(grid, [report.VARIANTS["dense_reference"]], torch.device("cpu"), csv_path=folder / "report.csv",
               progress=False)
    assert scaling.main(["--n", "48", "--tau", "1", "--repeats", "1", "--out", str(tmp_path)]) == 0
    assert memory.main(["--n", "32", "--variants", "torch_streaming", "--out", str(tmp_path)]) == 0
    paths = [folder / name for name in ("report.csv", "scaling.csv", "memory.csv")]
    assert all(_header(path) == COLUMNS for path in paths)
    rows = [row for path in paths for row in read_csv(path)]
    assert {r["tool"] for r in rows} == {"report", "scaling", "memory"}
    assert {r["metric"] for r in rows if r["tool"] == "scaling" and r["status"] == "ok"} == {
        "time", "rel_error", "peak_memory"}
    assert {r["metric"] for r in rows if r["tool"] == "memory"} == {"peak_memory", "time_one_call"}
    assert "| torch_banded | 48 | 1.0 |" in (folder / "scaling.md").read_text()
    assert "| torch_streaming | 32 | 1 | 1.0 |" in (folder / "memory.md").read_text()
    # The scaling rows alone, and all three together, plot (the grid is read off the rows).
    assert "time_vs_n.png" in {p.name for p in make_plots(read_csv(paths[1]), tmp_path / "scaling-plots")}
    names = {p.name for p in make_plots(rows, tmp_path / "all-plots")}
    assert {"time_vs_n.png", "memory_vs_n.png", "error_vs_n.png"} <= names
    if importlib.util.find_spec("pandas"):  # not a dependency; the shared header above is what makes concat work
        import pandas

        assert list(pandas.concat([pandas.read_csv(p) for p in paths]).columns) == list(COLUMNS)


def test_grid_from_rows_recovers_the_sweeps_and_workloads():
    rec = RowWriter("report")
    for point in [(1, 16, 1.0, 1, "fp32"), (1, 32, 1.0, 1, "fp32"), (1, 32, 0.1, 1, "fp32"), (64, 100, 1.0, 16,
                                                                                             "fp32")]:
        rec.add("v", "forward", point, "time", "s", (1.0,))
    grid = Grid.from_rows(rec.rows)
    assert (grid.ns, grid.taus, grid.batch, grid.workloads) == ((16, 32), (0.1, 1.0), 1, ((64, 100),))
    assert grid.tau_workloads == ()  # measured at one tau only
    assert dataclasses.replace(grid, workloads=()).points() == sorted(grid.sweep_points(),
                                                                      key=lambda p: (p[0] * p[1] ** 2, p))
    rec.add("v", "forward", (64, 100, 0.1, 16, "fp32"), "time", "s", (1.0,))  # the same workload at another tau
    grid = Grid.from_rows(rec.rows)
    assert (grid.workloads, grid.tau_workloads) == (((64, 100),), ((64, 100),))
    assert (64, 100, 0.1, 16, "fp32") in grid.points()


@pytest.mark.parametrize("module, argv, message", [
    (scaling, ["--n", "-5"], "--n: expected an integer >= 1, got -5"),
    (scaling, ["--tau", "0"], "--tau: expected a finite number > 0, got 0"),
    (scaling, ["--repeats", "0"], "--repeats: expected an integer >= 1"),
    (memory, ["--n", "0"], "--n: expected an integer >= 1"),
    (memory, ["--d", "-1"], "--d: expected an integer >= 1"),
    (memory, ["--tau=-inf"], "--tau: expected a finite number > 0"),
])
def test_scaling_and_memory_reject_bad_arguments_before_measuring(module, argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        module.main([*argv, "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.csv"))


@pytest.mark.parametrize("module", [scaling, memory])
def test_scaling_and_memory_check_the_output_folder_first(module, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--n", "8", "--out", str(blocker)])
    assert exit_info.value.code == 2 and "--out: cannot write to" in capsys.readouterr().err


def test_memory_rows_and_markdown_name_failures(tmp_path):
    """A failed fresh-process measurement is a failed row with the error, shown in memory.md."""
    with RowWriter("memory", tmp_path / "memory.csv") as rec:
        memory._add_rows(rec, {"variant": "torch_streaming", "n": 8, "d": 1, "tau": 1.0, "extra_mib": 1.5,
                               "seconds": 0.1})
        memory._add_rows(rec, {"variant": "dense_reference", "n": 8, "d": 1, "tau": 1.0, "error": "boom"})
    memory.write_markdown(rec.rows, tmp_path, "triton-sort memory --n 8")
    assert "| dense_reference | 8 | 1 | 1.0 | failed: boom |" in (tmp_path / "memory.md").read_text()
    assert "| torch_streaming | 8 | 1 | 1.0 | 1.5 | 0.1 |" in (tmp_path / "memory.md").read_text()
    assert [(r["metric"], r["status"]) for r in read_csv(tmp_path / "memory.csv")] == [
        ("peak_memory", "ok"), ("time_one_call", "ok"), ("peak_memory", "failed")]
