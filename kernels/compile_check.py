"""Compile every kernel with every launch configuration for CUDA targets, without a GPU.

``python -m triton_sort.kernels.compile_check [--arch 80 90]`` runs ``triton.compile`` down to a cubin for each
(kernel, configuration, block_d, dtype) the package may launch, so code that only the interpreter accepts fails
here. Must run without ``TRITON_INTERPRET=1`` (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .configs import BLOCK_D_CHOICES, MAX_BLOCK_D, SHORT_ROW_BLOCK, KernelConfig, candidate_configs, short_config
from .launch import ROW_BLOCKS, dot_precision
from .neuralsort import (
    apply_backward_kernel,
    apply_delta_kernel,
    apply_forward_kernel,
    finish_kernel,
    matrix_forward_kernel,
    prepare_kernel,
    short_backward_kernel,
    short_forward_kernel,
)

VALUE_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class CompileJob:
    kernel: str
    config: KernelConfig
    dtype: torch.dtype
    block_d: int = 1
    single_d_chunk: bool = True
    need_tau: bool = False  # apply_backward and finish: the variant that also accumulates the tau gradient
    banded: bool = True  # prepare: windows by bisection, or full rows
    masked: bool = False  # prepare: padded lists (lengths given)
    transposed: bool = False  # apply_backward: the column pass alone, P_hat^T @ v

    def source(self) -> ASTSource:
        value = "*" + VALUE_DTYPES[self.dtype]
        f64, i64 = "*fp64", "*i64"
        if self.kernel == "prepare":
            signature = {"SORTED": value, "ORDER": i64, "X": value, "d": "i32", "TAU": f64, "LENGTH": i64, "T": f64,
                         "W": f64, "COUNT": f64, "LESS": i64, "NOT_GREATER": i64, "LOWER": i64, "UPPER": i64,
                         "n": "i32", "steps": "i32"}
            return _source(prepare_kernel, signature, {"BLOCK": self.config.block_n, "BANDED": self.banded,
                                                       "MASKED": self.masked})
        if self.kernel == "short_forward":
            signature = {"SORTED": value, "ORDER": i64, "X": value, "OUT": value, "NORM": f64, "LENGTH": i64,
                         "T": f64, "W": f64, "COUNT": f64, "LESS": i64, "NOT_GREATER": i64, "LOWER": i64,
                         "UPPER": i64, "n": "i32", "d": "i32", "steps": "i32", "TAU": f64, "banded": "i32",
                         "masked": "i32", "descending": "i32"}
            return _source(short_forward_kernel, signature, {
                "BLOCK": SHORT_ROW_BLOCK, "BLOCK_M": self.config.block_m,
                "BLOCK_N": self.config.block_n, "BLOCK_D": self.block_d, "DOT_PRECISION": dot_precision(self.dtype)})
        if self.kernel == "short_backward":
            signature = {"T": f64, "W": f64, "LOWER": i64, "UPPER": i64, "LENGTH": i64, "ORDER": i64, "CNT": f64,
                         "LESS": i64, "NOT_GREATER": i64, "X": value, "G": value, "NORM": f64, "DELTA": f64,
                         "DX": value, "U": f64, "R": f64, "TAU_TERMS": f64, "PREFIX": f64, "DS": value,
                         "TAU_ROWS": f64, "n": "i32", "d": "i32", "steps": "i32", "TAU": f64, "descending": "i32"}
            return _source(short_backward_kernel, signature, {
                "BLOCK": SHORT_ROW_BLOCK, "BLOCK_M": self.config.block_m, "BLOCK_N": self.config.block_n,
                "BLOCK_D": self.block_d, "DOT_PRECISION": dot_precision(self.dtype),
                "SINGLE_D_CHUNK": self.single_d_chunk})
        if self.kernel == "finish":
            signature = {"U": f64, "R": f64, "TAU_TERMS": f64, "LESS": i64, "NOT_GREATER": i64, "ORDER": i64,
                         "PREFIX": f64, "TAU": f64, "DS": value, "TAU_ROWS": f64, "n": "i32"}
            return _source(finish_kernel, signature, {"BLOCK": self.config.block_n, "NEED_TAU": self.need_tau})
        sorted_terms = {"T": f64, "W": f64, "LOWER": i64, "UPPER": i64, "LENGTH": i64, "ORDER": i64}
        tiles = {"BLOCK_M": self.config.block_m, "BLOCK_N": self.config.block_n}
        if self.kernel == "matrix_forward":
            signature = {**sorted_terms, "P": value, "n": "i32", "TAU": f64, "descending": "i32"}
            return _source(matrix_forward_kernel, signature, tiles)
        constants = {**tiles, "BLOCK_D": self.block_d, "DOT_PRECISION": dot_precision(self.dtype)}
        if self.kernel == "apply_forward":
            signature = {**sorted_terms, "X": value, "OUT": value, "NORM": f64, "n": "i32", "d": "i32",
                         "TAU": f64, "descending": "i32"}
            return _source(apply_forward_kernel, signature, constants)
        constants["SINGLE_D_CHUNK"] = self.single_d_chunk
        if self.kernel == "apply_delta":
            signature = {**sorted_terms, "X": value, "G": value, "NORM": f64, "DELTA": f64, "n": "i32", "d": "i32",
                         "TAU": f64, "descending": "i32"}
            return _source(apply_delta_kernel, signature, constants)
        signature = {**sorted_terms, "CNT": f64, "X": value, "G": value, "NORM": f64, "DELTA": f64, "DX": value,
                     "U": f64, "R": f64, "TAU_TERMS": f64, "n": "i32", "d": "i32", "steps": "i32", "TAU": f64,
                     "descending": "i32"}
        return _source(apply_backward_kernel, signature, {**constants, "NEED_TAU": self.need_tau,
                                                          "TRANSPOSED": self.transposed})

    def describe(self) -> dict:
        return {"kernel": self.kernel, **self.config.as_dict(), "block_d": self.block_d,
                "dtype": VALUE_DTYPES[self.dtype], "single_d_chunk": self.single_d_chunk, "need_tau": self.need_tau,
                "banded": self.banded, "masked": self.masked, "transposed": self.transposed}


def _source(fn, signature: dict[str, str], constants: dict) -> ASTSource:
    return ASTSource(fn=fn, signature={**signature, **dict.fromkeys(constants, "constexpr")}, constexprs=constants)


def all_jobs() -> Iterator[CompileJob]:
    """Every (kernel, configuration, block_d, dtype, variant) combination the launchers can produce."""
    for job in _jobs_without_tau_variants():
        yield job
        if job.kernel == "apply_backward":
            yield dataclasses.replace(job, need_tau=True)
            yield dataclasses.replace(job, transposed=True)
    # The one-program-per-row kernels: one BLOCK per row length bucket (``launch.row_block``), no tuning.
    for dtype in VALUE_DTYPES:
        for block in ROW_BLOCKS:
            config = KernelConfig(block_m=1, block_n=block, num_warps=4, num_stages=1)
            for flag in (False, True):
                yield CompileJob("prepare", config, dtype, banded=flag)
                yield CompileJob("prepare", config, dtype, banded=flag, masked=True)
                yield CompileJob("finish", config, dtype, need_tau=flag)
    # The one-program-per-list kernels of short lists: one (untuned) configuration per block_d; padding and the tau
    # gradient are runtime flags there, so there is no masked or tau variant to compile.
    for dtype in VALUE_DTYPES:
        for block_d in BLOCK_D_CHOICES:
            yield CompileJob("short_forward", short_config("apply_forward", block_d), dtype, block_d)
            yield CompileJob("short_backward", short_config("apply_backward", block_d), dtype, block_d)
            if block_d == MAX_BLOCK_D:
                yield CompileJob("short_backward", short_config("apply_backward", block_d), dtype, block_d,
                                 single_d_chunk=False)


def _jobs_without_tau_variants() -> Iterator[CompileJob]:
    for dtype in VALUE_DTYPES:
        for config in candidate_configs("matrix_forward"):
            yield CompileJob("matrix_forward", config, dtype)
        for block_d in BLOCK_D_CHOICES:
            for kernel in ("apply_forward", "apply_delta", "apply_backward"):
                for config in candidate_configs(kernel, block_d):
                    yield CompileJob(kernel, config, dtype, block_d)
            for kernel in ("apply_delta", "apply_backward"):
                for config in candidate_configs(kernel, block_d):
                    if block_d == MAX_BLOCK_D:  # d > MAX_BLOCK_D: the backward loops over d chunks
                        yield CompileJob(kernel, config, dtype, block_d, single_d_chunk=False)


def compile_job(job: CompileJob, arch: int) -> dict:
    start = time.perf_counter()
    compiled = triton.compile(job.source(), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": job.config.num_warps, "num_stages": job.config.num_stages})
    return {**job.describe(), "arch": arch, "shared_bytes": compiled.metadata.shared,
            "cubin_bytes": len(compiled.asm.get("cubin", b"")), "seconds": round(time.perf_counter() - start, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="CUDA compute capabilities")
    parser.add_argument("--json", action="store_true", help="print one JSON object per compiled kernel")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel compiler processes")
    args = parser.parse_args(argv)
    work = [(job, arch) for arch in args.arch for job in all_jobs()]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        results = list(pool.map(_compile_or_report, work))
    for result in results:
        print(json.dumps(result) if args.json else result, flush=True)
    return 1 if any("error" in result for result in results) else 0


def _compile_or_report(item: tuple[CompileJob, int]) -> dict:
    job, arch = item
    try:
        return compile_job(job, arch)
    except Exception as exc:  # report every failing configuration, not just the first
        return {**job.describe(), "arch": arch, "error": f"{type(exc).__name__}: {exc}"}


if __name__ == "__main__":
    sys.exit(main())
