"""Packaging, the README's commands, the CLI and the memory benchmark's plumbing."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_no_top_level_kernels_or_autotune(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"could not build a wheel here: {proc.stderr[-500:]}")
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"triton_sort"}
    for module in ("triton_sort/kernels/neuralsort.py", "triton_sort/kernels/configs.py",
                   "triton_sort/autotune/__init__.py"):
        assert module in names


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^# 1\. .*\n(.+)\n# 2\. .*\n(.+)$", readme, flags=re.M)
    assert commands, "README must open with '# 1. ...' install/main-job and '# 2. ...' test commands"
    install, tests = commands[0]
    assert "pip install torch==2.13.0" in install and "pip install -e" in install
    assert "pytest" in tests and "ruff check" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install --quiet torch==2.13.0" in ci and "# 2\\. run the tests" in ci


def test_cli_usage():
    from triton_sort.cli import main

    assert main(["--help"]) == 0
    assert main(["no-such-command"]) == 2


def test_memory_measurement_in_a_fresh_process():
    from triton_sort.bench.memory import measure_in_subprocess

    row = measure_in_subprocess("torch_streaming", 300, 2, 0.5)
    assert "error" not in row, row
    assert row["extra_mib"] >= 0 and row["seconds"] > 0
