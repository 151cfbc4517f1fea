"""The static model (``triton-sort model``): counts come from compiled code, and every launchable kernel has a row.

Compiling needs the real compiler, so those tests run in a subprocess without TRITON_INTERPRET (as the compile-only
check does); two small kernels and two real configurations only, to stay fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from triton_sort.bench import model
from triton_sort.bench.schema import COLUMNS, read_csv
from triton_sort.kernels.compile_check import all_jobs
from triton_sort.kernels.configs import KERNEL_NAMES, gpu_heuristic_config

MODEL_FOLDER = Path(__file__).resolve().parents[1] / "perf_reports" / "model"


def _compiled_counts(code: str, tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    script = tmp_path / "counts.py"  # @triton.jit needs its source in a file
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


TOY = """
import json, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton_sort.bench import model
from triton_sort.kernels.configs import KernelConfig

@triton.jit
def toy(X, OUT, n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EXPS: tl.constexpr, F64: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc64 = tl.zeros([BLOCK_M, BLOCK_N], tl.float64)
    for start in range(0, n, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        x = tl.load(X + cols, mask=cols < n, other=0.0)
        z = rows[:, None].to(tl.float32) * x[None, :]
        for k in tl.static_range(EXPS):  # EXPS different exponentials per entry
            acc += tl.math.exp2(z * (k + 1.0))
        if F64:
            acc64 += z.to(tl.float64) * 3.0
    tl.store(OUT + rows, tl.sum(acc, axis=1) + tl.sum(acc64, axis=1).to(tl.float32))

out = {}
for exps, f64 in ((1, False), (3, False), (1, True)):
    config = KernelConfig(32, 32, 4, 1)
    source = ASTSource(fn=toy, signature={"X": "*fp32", "OUT": "*fp32", "n": "i32", "BLOCK_M": "constexpr",
                       "BLOCK_N": "constexpr", "EXPS": "constexpr", "F64": "constexpr"},
                       constexprs={"BLOCK_M": 32, "BLOCK_N": 32, "EXPS": exps, "F64": f64})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 1})
    counts, origin = model.count_compiled(compiled)
    ptx = model.count_ptx(compiled.asm["ptx"])
    out[f"{exps}/{f64}"] = {"sass": model.per_entry(counts, config), "origin": origin,
                            "ptx": model.per_entry(ptx, config)}
print(json.dumps(out))
"""


def test_counts_follow_the_compiled_code(tmp_path):
    """A toy kernel with a known number of exponentials and float64 operations per entry: changing the kernel
    changes the counts by exactly that, from SASS and from the PTX fallback."""
    out = _compiled_counts(TOY, tmp_path)
    one, three, with_f64 = out["1/False"], out["3/False"], out["1/True"]
    for origin in ("sass", "ptx"):
        assert one[origin]["ex2"] == pytest.approx(1.0)
        assert three[origin]["ex2"] == pytest.approx(3.0)
        assert one[origin]["fp64"] == 0
        assert with_f64[origin]["fp64"] >= 1.0  # the multiply (+ the add, or one fused DFMA)
        assert with_f64[origin]["conversion"] >= 1.0  # fp32 -> float64 per entry
    # ptxas unrolls this small loop (4 iterations per trip): the SASS counts are per iteration all the same.
    assert one["origin"].startswith("sass" if model.cuobjdump_path() else "ptx")


REAL = """
import json, torch
from triton_sort.bench import model
from triton_sort.kernels.configs import candidate_configs
items = [(job, 80) for job, _ in model.all_items((80,)) if job.kernel == "apply_forward" and job.block_d == 1
         and job.dtype == torch.float32 and job.config in candidate_configs("apply_forward", 1)[:2]]
results = model.run_model(items, workers=1)
print(json.dumps([{**r, "entry": model.per_entry(r["counts"], model._config(r))} for r in results]))
"""


def test_real_kernel_counts_per_entry_do_not_depend_on_the_tile(tmp_path):
    """The streaming forward evaluates one exponential per entry, whatever the tile: the per-entry normalisation
    divides by the right number of threads and tile entries."""
    results = _compiled_counts(REAL, tmp_path)
    assert len(results) == 2 and all("error" not in r for r in results)
    assert {(r["block_m"], r["block_n"]) for r in results} == {(64, 32), (32, 16)}
    for result in results:
        assert result["entry"]["ex2"] == pytest.approx(1.0)
        assert result["entry"]["fp64"] > 2  # the float64 drop and the float64 accumulations
        seconds = model.unit_seconds(result["entry"], model.DEVICES["a100-sxm4-80gb"])
        unit, value = model.limiting(seconds)
        assert value >= model.exp_floor_seconds(model.DEVICES["a100-sxm4-80gb"]) and unit in model.UNITS


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   MUFU.EX2 R2, R3 ;
        /*0020*/                   DADD R4, R4, R6 ;
        /*0030*/               @P3 BRA P4, 0x0060 ;
        /*0040*/                   MOV R8, R4 ;
        /*0050*/                   CALL.REL.NOINC 0x00a0 ;
        /*0060*/                   DFMA R4, R4, R6, R8 ;
        /*0070*/               @P0 BRA 0x0010 ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x0090 ;
        /*00a0*/                   DMUL R4, R4, R6 ;
        /*00b0*/                   MUFU.RCP64H R5, R7 ;
        /*00c0*/                   RET.REL.NODEC R10 0x0 ;
"""


def test_loop_finding_leaves_out_slow_paths_and_subroutines():
    code = model.parse_sass(SASS)
    assert len(code) == 13
    counts = model.count_sass(code)
    # The loop is 0x0010..0x0070; the slow-path block (0x0040, 0x0050) and the subroutine are not in it.
    assert counts["ex2"] == 1 and counts["mufu"] == 1
    assert counts["fp64"] == 2  # DADD + DFMA, not the subroutine's DMUL
    assert counts["instructions"] == 5  # MUFU, DADD, BRA P4, DFMA, BRA


def test_every_launchable_kernel_and_configuration_has_a_row():
    """rows_of gives a row to every (kernel, configuration, block_d, dtype, arch) of the compile-only check's list."""
    items = model.all_items((80, 90))
    assert len(items) == 2 * len([job for job in all_jobs() if job.kernel not in model.UNMODELLED_KERNELS])
    counts = dict.fromkeys(model.COUNTS, 1.0)
    results = [{**job.describe(), "arch": arch, "origin": "sass", "counts": counts} for job, arch in items]
    results[0] = {**items[0][0].describe(), "arch": 80, "error": "RuntimeError: broken"}
    rows = model.rows_of(results)
    assert set(rows[0]) == set(COLUMNS)
    covered = {(r["variant"], r["d"], r["dtype"], r["device"]) for r in rows if r["metric"] == "ex2_per_entry"}
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["note"] == "RuntimeError: broken"
    assert len(covered) == len(items) - 1
    predicted = {(r["variant"], r["device"]) for r in rows if r["metric"] == "predicted_time_per_entry"}
    assert {device for _, device in predicted} == set(model.DEVICES)
    variants = {r["variant"].split("/")[0] for r in rows}
    assert variants == {*KERNEL_NAMES, "prepare", "finish"}


@pytest.mark.skipif(not (MODEL_FOLDER / "model.csv").is_file(), reason="perf_reports/model/ not generated")
def test_committed_model_covers_every_kernel_the_package_may_launch():
    """perf_reports/model/model.csv is current: a row per compile job and arch (regenerate it with
    ``triton-sort model`` after adding a kernel or a configuration), and predictions for the default configs."""
    rows = read_csv(MODEL_FOLDER / "model.csv")
    assert list(rows[0]) == list(COLUMNS)
    have = {(r["variant"], int(r["d"]), r["dtype"], r["device"]) for r in rows if r["metric"] == "ex2_per_entry"
            or r["metric"] == "compile"}
    for job, arch in model.all_items((80, 90)):
        result = {**job.describe(), "arch": arch}
        assert (model.variant_name(result), job.block_d, result["dtype"], f"sm{arch}") in have, result
    predictions = model.predictions(MODEL_FOLDER)
    for kernel in KERNEL_NAMES:
        config = gpu_heuristic_config(kernel, 1)
        variant = model.variant_name({"kernel": kernel, **config.as_dict()})
        for device in model.DEVICES:
            assert (variant, device, 1, "fp32") in predictions
