"""Every kernel, with every configuration the package may launch, compiles for sm_80 and sm_90 (no GPU needed).

The interpreter accepts code that the GPU compiler rejects, so this runs the real compiler in a subprocess without
TRITON_INTERPRET and with an empty Triton cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from triton_sort.kernels.configs import KERNEL_NAMES


def _clean_env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    return env


def test_all_kernels_compile_for_sm80_and_sm90(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "triton_sort.kernels.compile_check", "--json", "--arch", "80", "90"],
                          capture_output=True, text=True, env=_clean_env(tmp_path), timeout=900)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    errors = [r for r in results if "error" in r]
    assert not errors, errors[:3]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {r["kernel"] for r in results} == {*KERNEL_NAMES, "prepare", "finish", "short_forward", "short_backward"}
    assert {r["arch"] for r in results} == {80, 90}
    assert {r["dtype"] for r in results} == {"fp32", "fp16", "bf16"}
    assert all(r["cubin_bytes"] > 0 for r in results)
    # A (kernel, block_d, dtype, arch, variant) combination missing here would be launched uncompiled-checked:
    # 2 archs x 3 dtypes x (3 candidate configs x (matrix + 5 block_d x 3 apply kernels + multi-chunk delta and
    # backward, + the backward's tau-gradient and transposed variants of its 5 + 1) + 3 row blocks x (prepare x
    # banded x masked, finish x tau gradient) + the short lists' forward and backward at 5 block_d, + the backward's
    # multi-chunk variant).
    assert len(results) == 2 * 3 * (3 * (1 + 5 * 3 + 2 + 2 * 6) + 3 * (4 + 2) + 5 * 2 + 1)
    assert any(r["transposed"] for r in results) and any(r["masked"] for r in results)


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(tmp_path):
    code = ("import torch, triton_sort\n"
            "try:\n"
            "    triton_sort.relaxed_sort_matrix(torch.randn(4), 1.0, backend='triton')\n"
            "except ValueError as exc:\n"
            "    print('ValueError:', exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_clean_env(tmp_path),
                          timeout=300)
    assert "ValueError: backend='triton' needs CUDA tensors" in proc.stdout, proc.stderr[-2000:]
