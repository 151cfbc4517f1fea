"""Compile-only pruning: configurations that do not compile or do not fit the device are dropped before timing.

Each candidate is compiled with ``triton.compile`` for a CUDA target (no GPU needed): the metadata gives the
shared memory it needs, and ``ptxas -v`` on the generated PTX gives registers per thread and spilled bytes
(reported, not pruned: the timing decides whether spilling hurts). Compilation runs in a subprocess without
``TRITON_INTERPRET`` (interpreted kernels cannot be compiled), in parallel: ``python -m triton_sort.autotune.prune``
reads jobs as JSON on stdin and writes their metadata as JSON on stdout.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from ..kernels.configs import KernelConfig
from .keys import DTYPES_BY_NAME, DeviceKey

# Shared memory per block (bytes, opt-in maximum) by compute capability, for compiling without the device.
MAX_SHARED_BYTES = {70: 98304, 75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448,
                    100: 232448, 103: 232448, 120: 101376}
REGISTERS_PER_BLOCK = 65536  # every architecture since sm_50


@dataclass(frozen=True)
class DeviceLimits:
    arch: int  # compute capability compiled for, e.g. 90
    max_shared_bytes: int
    max_registers_per_block: int = REGISTERS_PER_BLOCK


def device_limits(device: DeviceKey, arch: int | None = None, max_shared_bytes: int | None = None) -> DeviceLimits:
    """Limits of a CUDA device (asked from the driver), or of ``arch`` (default sm_80) for the interpreter."""
    if device.capability is not None and arch is None:
        import torch
        from triton.runtime import driver

        properties = driver.active.utils.get_device_properties(torch.cuda.current_device())
        limits = DeviceLimits(device.capability, properties["max_shared_mem"],
                              properties.get("max_num_regs", REGISTERS_PER_BLOCK))
    else:
        arch = arch or device.capability or 80
        limits = DeviceLimits(arch, MAX_SHARED_BYTES.get(arch, min(MAX_SHARED_BYTES.values())))
    if max_shared_bytes is not None:
        limits = DeviceLimits(limits.arch, max_shared_bytes, limits.max_registers_per_block)
    return limits


def job(kernel: str, config: KernelConfig, dtype: str, block_d: int, single_d_chunk: bool = True) -> dict:
    """A compile job as JSON-able data (``kernels.compile_check.CompileJob`` fields)."""
    return {"kernel": kernel, "config": config.as_dict(), "dtype": dtype, "block_d": block_d,
            "single_d_chunk": single_d_chunk}


def compile_metadata(jobs: list[dict], arch: int, timeout: float = 1800.0) -> list[dict]:
    """Compile each job for ``arch`` in a fresh process; per job ``{"shared_bytes", "registers", "spill_bytes"}``
    (the last two None where ptxas output is unavailable) or ``{"error": message}``."""
    if not jobs:
        return []
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", __name__, "--arch", str(arch)], input=json.dumps(jobs),
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"compile-only check failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prune_reason(metadata: dict, config: KernelConfig, limits: DeviceLimits) -> str | None:
    """Why a compiled configuration cannot run on the device, or None if it can."""
    if "error" in metadata:
        return f"does not compile: {metadata['error']}"
    if metadata["shared_bytes"] > limits.max_shared_bytes:
        return f"needs {metadata['shared_bytes']} B of shared memory, the device has {limits.max_shared_bytes} B"
    registers = metadata.get("registers")
    if registers is not None and registers * config.num_warps * 32 > limits.max_registers_per_block:
        return (f"needs {registers} registers x {config.num_warps * 32} threads, more than the "
                f"{limits.max_registers_per_block} of a block")
    return None


def _ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers per thread and spilled bytes (stores + loads) from ``ptxas -v``; None where unavailable."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

        with tempfile.TemporaryDirectory() as folder:
            source = os.path.join(folder, "kernel.ptx")
            with open(source, "w") as handle:
                handle.write(ptx)
            log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}",
                                  source, "-o", source + ".o"], capture_output=True, text=True, check=True).stderr
    except (ImportError, OSError, subprocess.CalledProcessError):
        return {"registers": None, "spill_bytes": None}
    return parse_ptxas_log(log)


def parse_ptxas_log(log: str) -> dict:
    """``{"registers": per thread, "spill_bytes": stores + loads}`` from ``ptxas -v`` output (None if absent)."""
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", log)
    return {"registers": int(registers.group(1)) if registers else None,
            "spill_bytes": sum(map(int, spills)) if spills else None}


def _compile(item: tuple[dict, int]) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    from ..kernels.compile_check import CompileJob

    spec, arch = item
    config = KernelConfig(**spec["config"])
    compile_job = CompileJob(spec["kernel"], config, DTYPES_BY_NAME[spec["dtype"]], spec["block_d"],
                             spec["single_d_chunk"])
    try:
        compiled = triton.compile(compile_job.source(), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    except Exception as exc:  # any compiler failure prunes the configuration; its message is the reason
        return {"error": f"{type(exc).__name__}: {_compile_error_reason(exc)}"}
    return {"shared_bytes": compiled.metadata.shared, **_ptxas_usage(compiled.asm["ptx"], arch)}


def _compile_error_reason(exc: BaseException) -> str:
    """The cause of a compiler failure, in one line. Triton's messages end with the cause after the source excerpt,
    but an error inside a called @triton.jit helper shows the caller's line and chains the helper's error; ptxas's
    end with a repro command."""
    while exc.__cause__ is not None:  # the innermost chained error names the cause
        exc = exc.__cause__
    lines = [line for line in str(exc).strip().splitlines()
             if line.strip() and not line.startswith("Repro command") and line.strip() != "^"]
    return lines[-1].strip() if lines else ""


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="compile tuning candidates (JSON jobs on stdin)")
    parser.add_argument("--arch", type=int, required=True)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    jobs = json.loads(sys.stdin.read())
    with ProcessPoolExecutor(max_workers=min(args.workers, len(jobs))) as pool:
        results = list(pool.map(_compile, [(spec, args.arch) for spec in jobs]))
    print(json.dumps(results))
    return 0

if __name__ == "__main__":
    sys.exit(main())
