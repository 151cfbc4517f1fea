"""``triton-sort gpu-check``: the dry run end to end (every step runs or is skipped with a reason, the files have the
documented columns), the budget, argument checks and the launch counter."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch

from triton_sort import relaxed_sort_apply
from triton_sort.bench import gpu_check
from triton_sort.bench.schema import COLUMNS
from triton_sort.kernels import launch

MAX_FILES = 8


@pytest.mark.slow  # about a minute of CPU: nine steps, each a fresh process importing torch
def test_dry_run_end_to_end(tmp_path):
    out = tmp_path / "gpu"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # gpu-check sets it for its steps
    proc = subprocess.run([sys.executable, "-m", "triton_sort.cli", "gpu-check", "--dry-run", "--budget-s", "400",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    assert [step["name"] for step in summary["steps"]] == [step.name for step in gpu_check.STEPS]
    for step in summary["steps"]:
        assert step["status"] in ("ok", "skipped"), (step, (out / "log.txt").read_text()[-4000:])
        assert step["status"] == "ok" or step["note"]
    assert summary["environment"]["torch"] == torch.__version__
    assert summary["headline"]["correctness"]["failed"] == 0
    files = [path for path in out.rglob("*") if path.is_file()]
    assert len(files) <= MAX_FILES and all(path.stat().st_size <= gpu_check.MAX_FILE_BYTES for path in files)
    assert {path.name for path in files} == set(summary["files"])
    with open(out / "gpu_check.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(COLUMNS)
    steps_with_rows = {row["variant"].split("/")[0] for row in rows}
    assert {"correctness", "compile", "launches"} <= steps_with_rows
    assert any(row["metric"] == "measured_over_predicted" for row in rows)
    skipped = [row for row in rows if row["status"] == "skipped"]
    assert skipped and all(row["note"] for row in skipped)  # the CUDA graph and CUDA kernel counts, with reasons
    with tarfile.open(out / "commit.tar.gz") as archive:
        names = archive.getnames()
        assert all(name.startswith("dry-run/") for name in names)  # a dry run cannot overwrite committed reports
        report = next(name for name in names if name.endswith("/report.csv"))
        header = next(csv.reader(io.TextIOWrapper(archive.extractfile(report))))
    assert header == list(COLUMNS)
    assert any(name.startswith("dry-run/autotune/tuned/") and name.endswith(".json") for name in names)
    assert "gpu-check" in (out / "README.md").read_text()


def test_budget_spent_skips_steps_with_a_note(tmp_path):
    summary = gpu_check.check(tmp_path / "out", budget_s=gpu_check.RESERVE_S + 1, dry_run=True)
    assert [s["status"] for s in summary["steps"]] == ["skipped"] * len(gpu_check.STEPS)
    assert all(s["note"].startswith("budget spent") for s in summary["steps"])
    assert (tmp_path / "out" / "README.md").is_file()


def test_a_failing_step_is_recorded_and_the_next_one_runs(tmp_path):
    steps = (gpu_check.Step("broken", "raises", ("no_such_module_xyz",), ("no_such_module_xyz",), 30, 30),
             gpu_check.STEPS[0])
    summary = gpu_check.check(tmp_path / "out", budget_s=300, dry_run=True, steps=steps)
    broken, environment = summary["steps"]
    assert broken["status"] == "failed" and "No module named" in broken["note"]
    assert environment["status"] == "ok"


@pytest.mark.parametrize("argv, message", [
    (["--budget-s", "0", "--dry-run"], "--budget-s must be positive"),
    (["--dry-run", "--out", "FILE"], "exists and is not a folder"),
])
def test_bad_arguments_are_refused_before_anything_runs(argv, message, tmp_path, capsys):
    path = tmp_path / "file.txt"
    path.write_text("x")
    with pytest.raises(SystemExit):
        gpu_check.main([str(path) if a == "FILE" else a for a in argv])
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_without_a_gpu_it_asks_for_dry_run(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main([])
    assert "--dry-run" in capsys.readouterr().err


def test_launch_counter_counts_each_kernel_launch(monkeypatch):
    scores = torch.randn(2, 9, requires_grad=True)
    x = torch.randn(2, 9, 3, requires_grad=True)
    with gpu_check.LaunchCounter() as counter:  # a short list: one launch per pass
        relaxed_sort_apply(scores, x, 1.0, backend="triton").sum().backward()
    assert counter.counts == {"short_forward_kernel": 1, "short_backward_kernel": 1}
    monkeypatch.setattr(launch, "SHORT_MAX_N", 0)  # as a long list: the tiled kernels
    with gpu_check.LaunchCounter() as counter:
        relaxed_sort_apply(scores, x, 1.0, backend="triton").sum().backward()
    assert counter.counts == {"prepare_kernel": 1, "apply_forward_kernel": 1, "apply_delta_kernel": 1,
                              "apply_backward_kernel": 1, "finish_kernel": 1}
    with gpu_check.LaunchCounter() as counter:
        relaxed_sort_apply(scores, x, 1.0, backend="torch")
    assert counter.counts == {}
