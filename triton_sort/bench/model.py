"""Static model of the kernels' speed: instruction counts of the compiled inner loops and the bound each GPU unit sets.

``triton-sort model [--out perf_reports/model] [--arch 80 90]`` compiles every (kernel, configuration, block_d, dtype)
the package may launch (``kernels.compile_check.all_jobs``, the compile-only check's list) for sm_80 and sm_90 without
a GPU, disassembles the cubin to SASS (``cuobjdump``, shipped with Triton; PTX when it is missing), finds the tile
loops (backward branches), and counts per loop iteration: MUFU ``ex2`` (and all MUFU), float64 add/mul/fma,
fp32 add/mul/fma, f32<->f64 and int->float conversions, warp shuffles, tensor-core multiply-adds (DMMA, HMMA,
HGMMA), global load/store bytes and all issued instructions. Divided by the tile (``BLOCK_M * BLOCK_N`` entries of
``P_hat`` per iteration), with the per-SM rates of ``DEVICES``, each unit gives a time per entry; the largest is the
predicted time per entry and its unit the limiting one. Writes ``model.csv`` (the reports' long-format columns) and
``README.md``.

Counting rules (stated once): instructions are per thread (SASS and PTX are per-thread code), times the program's
threads; a warp-level MMA counts its multiply-adds once per warp (an sm_90 warpgroup ``HGMMA`` a quarter of its
shape per warp); loops nested inside a tile loop (the backward's d chunks when d > 128) count ``INNER_TRIPS`` times;
the float64 division's slow path (a called subroutine, taken only for denormal or huge operands) is left out.
Global bytes are those the threads request (L1 traffic, with broadcast loads counted per thread): caches absorb
most of it, so the DRAM bound is pessimistic and shown, not used, where another unit is slower.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

# The tile loop of a kernel iterates over (BLOCK_M, BLOCK_N) tiles; loops inside it (the backward's loop over d
# chunks for d > MAX_BLOCK_D) run at least twice per iteration: d = 256 is the smallest d that takes that path.
INNER_TRIPS = 2

# What each kernel's pass is, for the CSV's ``pass`` column.
PASS_OF_KERNEL = {"matrix_forward": "forward", "apply_forward": "forward", "apply_delta": "backward",
                  "apply_backward": "backward", "prepare": "forward", "finish": "backward"}

COUNTS = ("ex2", "mufu", "fp64", "fp32", "conversion", "shuffle", "dmma_macs", "tf32_macs", "f16_macs", "load_bytes",
          "store_bytes", "instructions")
UNITS = ("mufu", "fp64", "fp32", "conversion", "shuffle", "fp64_tensor", "tf32_tensor", "f16_tensor", "issue", "dram")


@dataclasses.dataclass(frozen=True)
class Device:
    """Published per-SM rates (results per clock per SM; tensor units in multiply-adds) and the memory bandwidth.

    Sources: SM counts, boost clocks and bandwidth from NVIDIA's A100 (SXM4 80GB), H100 (SXM5) and H200 (SXM)
    datasheets; per-SM rates of the FP32/FP64 pipes, the MUFU (16 exp2/clk/SM) and conversions from the CUDA C++
    Programming Guide's "Arithmetic Instructions" throughput table (compute capability 8.0 and 9.0; warp shuffles
    32/clk/SM; instruction issue one warp instruction per clock per SM sub-partition, 4 per SM); tensor-core
    rates from the Ampere GA100 and Hopper H100 architecture whitepapers (dense, per SM per clock)."""

    name: str
    arch: int  # the compiled code the model applies to this device
    sms: int
    boost_ghz: float
    dram_tb_s: float
    rates: dict[str, float]  # unit -> results per clock per SM ("issue": warp instructions per clock per SM)
    source: str

    def per_second(self, unit: str) -> float:
        if unit == "dram":
            return self.dram_tb_s * 1e12
        return self.rates[unit] * self.sms * self.boost_ghz * 1e9


_SM80 = {"mufu": 16, "fp64": 32, "fp32": 64, "conversion": 16, "shuffle": 32, "fp64_tensor": 64, "tf32_tensor": 512,
         "f16_tensor": 1024, "issue": 4}
_SM90 = {"mufu": 16, "fp64": 64, "fp32": 128, "conversion": 16, "shuffle": 32, "fp64_tensor": 128, "tf32_tensor": 1024,
         "f16_tensor": 2048, "issue": 4}
DEVICES: dict[str, Device] = {device.name: device for device in (
    Device("a100-sxm4-80gb", 80, 108, 1.41, 2.039, _SM80,
           "A100 datasheet: 108 SMs, 1410 MHz, 2039 GB/s; 9.7 TF FP64, 19.5 TF FP64 tensor, 19.5 TF FP32"),
    Device("h100-sxm", 90, 132, 1.98, 3.35, _SM90,
           "H100 SXM5 datasheet: 132 SMs, 1980 MHz, 3.35 TB/s; 34 TF FP64, 67 TF FP64 tensor, 67 TF FP32"),
    Device("h200", 90, 132, 1.98, 4.8, _SM90,
           "H200 SXM datasheet: GH100 (132 SMs, 1980 MHz), 4.8 TB/s; 34 TF FP64, 67 TF FP32"),
)}
# GPUs with little float64 (1/64 of fp32, no DMMA), for the double-float question only: sm_80 counts applied to them.
_SM89 = {**_SM80, "fp64": 2, "fp32": 128, "fp64_tensor": 2}
LOW_FP64_DEVICES: dict[str, Device] = {device.name: device for device in (
    Device("l40s", 80, 142, 2.52, 0.864, _SM89, "L40S datasheet: 142 SMs, 2520 MHz, 864 GB/s; FP64 1/64 of FP32"),
    Device("rtx-4090", 80, 128, 2.52, 1.008, _SM89,
           "RTX 4090 (AD102): 128 SMs, 2520 MHz, 1008 GB/s; FP64 1/64 of FP32"),
)}
# fp32 operations that replace one float64 operation in double-float (pairs of fp32) arithmetic: about 10 for the
# mix of additions (accurate double-word + double-word: 20 flops; + fp32: 10) and FMA-based products (3 to 9) of
# Joldes, Muller and Popescu, "Tight and rigorous error bounds for basic building blocks of double-word
# arithmetic" (ACM TOMS 2017). A conversion f32 <-> double-float is about one fp32 operation.
DOUBLE_FLOAT_OPS = 10


# --------------------------------------------------------------------------------------------------- counting
@dataclasses.dataclass
class Instruction:
    address: int  # byte offset (SASS) or line number (PTX)
    opcode: str  # e.g. "DFMA", "MUFU.EX2", "ld.global.v2.b32"
    operands: str


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")
_HEX_TARGET = re.compile(r"0x([0-9a-f]+)\s*$")


def parse_sass(text: str) -> list[Instruction]:
    """Instructions of ``cuobjdump -sass`` output (one kernel)."""
    out = []
    for match in _SASS_LINE.finditer(text):
        out.append(Instruction(int(match.group(1), 16), match.group(3), match.group(4).strip()))
    return out


def _branch_target(ins: Instruction) -> int | None:
    if not ins.opcode.startswith(("BRA", "CALL")):
        return None
    match = _HEX_TARGET.search(ins.operands)
    return int(match.group(1), 16) if match else None


# A slow-path block: a short run of argument moves and the call, skipped by a forward branch on the fast path.
_SLOW_PATH_MAX = 32


def sass_loop_weights(code: list[Instruction]) -> list[tuple[int, float]]:
    """(index, weight) of each instruction executed per iteration of the tile loops (top-level loops).

    A loop is a backward branch; nested loops weigh ``INNER_TRIPS``. Instructions of called subroutines and of the
    forward-skipped blocks that call them (the float64 division's slow path) are left out."""
    index_of = {ins.address: i for i, ins in enumerate(code)}
    excluded: set[int] = set()
    for ins in code:
        target = _branch_target(ins)
        if ins.opcode.startswith("CALL") and target in index_of:  # a subroutine: target .. its first RET
            body = []
            for j in range(index_of[target], len(code)):
                body.append(j)
                if code[j].opcode.startswith(("RET", "EXIT")):
                    break
            # A CALL to code that reaches EXIT first is a reconvergence idiom of the main body, not a subroutine.
            if code[body[-1]].opcode.startswith("RET"):
                excluded.update(body)
    for i, ins in enumerate(code):
        target = _branch_target(ins)
        if ins.opcode.startswith("BRA") and target in index_of and i + 1 < index_of[target] <= i + _SLOW_PATH_MAX:
            skipped = range(i + 1, index_of[target])
            calls = [code[j].opcode.startswith("CALL") for j in skipped]
            if any(calls) and not any(code[j].opcode.startswith("BRA") for j in skipped):
                excluded.update(skipped)
    loops = []
    for i, ins in enumerate(code):
        target = _branch_target(ins)
        if ins.opcode.startswith("BRA") and i not in excluded and target in index_of and index_of[target] < i:
            loops.append((index_of[target], i))
    return _weights(loops, excluded)


def _weights(loops: list[tuple[int, int]], excluded: set[int]) -> list[tuple[int, float]]:
    """Per-iteration weight of each instruction inside the outermost loops; loops nested k deep weigh INNER_TRIPS^k."""
    depth: Counter[int] = Counter()
    for start, end in loops:
        for i in range(start, end + 1):
            depth[i] += 1
    return [(i, float(INNER_TRIPS ** (level - 1))) for i, level in sorted(depth.items()) if i not in excluded]


_MMA_SHAPE = re.compile(r"(\d+)x(\d+)x(\d+)")


def _mma_macs(opcode: str) -> tuple[str, float] | None:
    """(tensor unit, multiply-adds per warp) of a SASS MMA opcode, None for other opcodes."""
    base = opcode.split(".")[0]
    if base not in ("DMMA", "HMMA", "HGMMA", "IMMA"):
        return None
    parts = opcode.split(".")
    shape = _MMA_SHAPE.search(opcode)
    if shape:
        m, n, k = map(int, shape.groups())
    elif base == "DMMA":  # DMMA.884: m8 n8 k4
        m, n, k = (int(c) for c in parts[1][:3])
    else:  # HMMA.1688 / HMMA.16816: m16, n8, k = the rest
        digits = parts[1]
        m, n, k = int(digits[:2]), int(digits[2]), int(digits[3:])
    macs = m * n * k / (4 if base == "HGMMA" else 1)  # a warpgroup's HGMMA shape is shared by its 4 warps
    if base == "DMMA":
        return "dmma_macs", macs
    return ("tf32_macs" if "TF32" in opcode else "f16_macs"), macs


def _load_width(opcode: str) -> int:
    for suffix, width in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if suffix in opcode:
            return width
    return 4


_FP64_OPS = {"DADD", "DMUL", "DFMA", "DSETP", "DMNMX"}
_FP32_OPS = {"FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FADD32I", "FMUL32I", "FFMA32I"}
_CONVERSIONS = {"F2F", "I2F", "F2I", "I2FP", "F2FP"}


def count_sass(code: list[Instruction]) -> dict[str, float]:
    """Per-thread (MMA: per-warp multiply-adds) counts of one iteration of the tile loops."""
    counts = dict.fromkeys(COUNTS, 0.0)
    for i, weight in sass_loop_weights(code):
        op = code[i].opcode
        base = op.split(".")[0]
        if base == "NOP":
            continue
        counts["instructions"] += weight
        if base == "MUFU":
            counts["mufu"] += weight
            counts["ex2"] += weight * (op == "MUFU.EX2")
        elif base in _FP64_OPS:
            counts["fp64"] += weight
        elif base in _FP32_OPS:
            counts["fp32"] += weight
        elif base in _CONVERSIONS and ("F64" in op or base.startswith("I2F")):
            counts["conversion"] += weight
        elif base == "SHFL":  # cross-thread reductions (tl.sum over a tile axis); a float64 value takes two
            counts["shuffle"] += weight
        elif (mma := _mma_macs(op)) is not None:
            counts[mma[0]] += weight * mma[1]
        elif base in ("LDG", "LDGSTS"):
            counts["load_bytes"] += weight * _load_width(op)
        elif base in ("STG", "RED", "ATOMG"):
            counts["store_bytes"] += weight * _load_width(op)
    return counts


# PTX: the fallback where cuobjdump is missing (division and MMA shapes are coarser there).
_PTX_LINE = re.compile(r"^\s*(@!?%p\d+\s+)?([a-z][a-z0-9_.]*)\s*([^;]*);", re.MULTILINE)
_PTX_LABEL = re.compile(r"^(\$L__BB\d+_\d+):", re.MULTILINE)


def count_ptx(ptx: str) -> dict[str, float]:
    """The counts of ``count_sass`` from PTX: one PTX instruction per machine instruction (``div.rn.f64`` is a
    few DFMA in SASS and counts as one float64 operation here)."""
    lines = ptx.splitlines()
    labels = {m.group(1): ptx.count("\n", 0, m.start()) for m in _PTX_LABEL.finditer(ptx)}
    loops = []
    for number, line in enumerate(lines):
        match = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if match and labels.get(match.group(1), number) < number:
            loops.append((labels[match.group(1)], number))
    counts = dict.fromkeys(COUNTS, 0.0)
    for number, weight in _weights(loops, set()):
        match = _PTX_LINE.match(lines[number])
        if not match:
            continue
        op = match.group(2)
        counts["instructions"] += weight
        if op.startswith("ex2"):
            counts["ex2"] += weight
            counts["mufu"] += weight
        elif op.startswith(("rcp", "lg2", "sin", "cos", "rsqrt")):
            counts["mufu"] += weight
        elif op.startswith("cvt") and ("f64" in op or ".f32.s" in op or ".f32.u" in op):
            counts["conversion"] += weight
        elif op.split(".")[0] in ("add", "sub", "mul", "fma", "setp", "min", "max", "neg", "div") and (
                op.endswith(".f64") or op.endswith(".f32")):
            counts["fp64" if op.endswith(".f64") else "fp32"] += weight
        elif op.startswith("shfl"):
            counts["shuffle"] += weight
        elif op.startswith(("mma", "wgmma.mma_async")):
            shape = re.search(r"m(\d+)n(\d+)k(\d+)", op)
            m, n, k = map(int, shape.groups()) if shape else (0, 0, 0)
            unit = "dmma_macs" if ".f64" in op else "tf32_macs" if "tf32" in op else "f16_macs"
            counts[unit] += weight * m * n * k / (4 if op.startswith("wgmma") else 1)
        elif op.startswith(("ld.global", "cp.async.ca.shared.global", "cp.async.cg.shared.global")):
            width = re.search(r"\.v(\d)", op)
            bits = re.search(r"\.[bfsu](\d+)\b", op)
            size = (int(bits.group(1)) // 8 if bits else 4) * (int(width.group(1)) if width else 1)
            if op.startswith("cp.async"):  # cp.async.cg.shared.global [dst], [src], 0x10, ...: the byte count
                size = int(match.group(3).split(",")[2].strip(), 0)
            counts["load_bytes"] += weight * size
        elif op.startswith(("st.global", "red.global", "atom.global")):
            width = re.search(r"\.v(\d)", op)
            bits = re.search(r"\.[bfsu](\d+)\b", op)
            counts["store_bytes"] += weight * (int(bits.group(1)) // 8 if bits else 4) * (
                int(width.group(1)) if width else 1)
    return counts


def cuobjdump_path() -> str | None:
    """Triton's bundled cuobjdump, else one on PATH; None if there is none."""
    try:
        from triton import knobs

        path = knobs.nvidia.cuobjdump.path
        if path and os.path.exists(path):
            return path
    except (ImportError, AttributeError, RuntimeError):
        pass
    return shutil.which("cuobjdump")


def sass_of(cubin: bytes) -> str | None:
    """``cuobjdump -sass`` of a cubin, or None where cuobjdump is unavailable or fails."""
    tool = cuobjdump_path()
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        proc = subprocess.run([tool, "-sass", handle.name], capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def count_compiled(compiled) -> tuple[dict[str, float], str]:
    """Counts of one ``triton.compile`` result and what they were read from ("sass", "sass/unrolled<u>" or "ptx").

    ptxas may unroll a tile loop (u iterations per trip, the rest peeled off outside it); Triton's PTX never does, so
    the ratio of the loops' exponentials (else global loads) in SASS and PTX gives u, and the SASS counts are divided
    by it."""
    ptx = count_ptx(compiled.asm["ptx"])
    sass = sass_of(compiled.asm["cubin"]) if compiled.asm.get("cubin") else None
    counts = count_sass(parse_sass(sass)) if sass else {}
    if not counts.get("instructions"):
        return ptx, "ptx"
    marker = "ex2" if ptx["ex2"] else "load_bytes"
    unroll = max(1, round(counts[marker] / ptx[marker])) if ptx[marker] else 1
    if unroll == 1:
        return counts, "sass"
    return {name: value / unroll for name, value in counts.items()}, f"sass/unrolled{unroll}"


def per_entry(counts: dict[str, float], config) -> dict[str, float]:
    """Counts per entry of P_hat: per-thread counts x threads (MMA and issue: x warps) / (BLOCK_M * BLOCK_N)."""
    tile = config.block_m * config.block_n
    threads = config.num_warps * 32
    out = {}
    for name, value in counts.items():
        per_program = value * (config.num_warps if name.endswith("_macs") else threads)
        out[name] = per_program / tile
    out["warp_instructions"] = counts["instructions"] * config.num_warps / tile
    return out


def unit_seconds(entry: dict[str, float], device: Device) -> dict[str, float]:
    """Seconds per entry of P_hat that each unit of ``device`` needs for these counts."""
    work = {"mufu": entry["mufu"], "fp64": entry["fp64"], "fp32": entry["fp32"], "conversion": entry["conversion"],
            "shuffle": entry["shuffle"],
            "fp64_tensor": entry["dmma_macs"], "tf32_tensor": entry["tf32_macs"], "f16_tensor": entry["f16_macs"],
            "issue": entry["warp_instructions"], "dram": entry["load_bytes"] + entry["store_bytes"]}
    return {unit: work[unit] / device.per_second(unit) for unit in UNITS}


def limiting(seconds: dict[str, float]) -> tuple[str, float]:
    """The unit that bounds the kernel and its time per entry. DRAM is left out: the bytes counted are the threads'
    requests (broadcast loads once per thread, tiles reused from L1/L2), far above the kernels' DRAM traffic."""
    compute = {unit: value for unit, value in seconds.items() if unit != "dram"}
    unit = max(compute, key=compute.get)
    return unit, compute[unit]


def exp_floor_seconds(device: Device) -> float:
    """One exponential per entry at the MUFU rate: the floor of any kernel that evaluates every entry."""
    return 1.0 / device.per_second("mufu")


def double_float_entry(entry: dict[str, float]) -> dict[str, float]:
    """The same kernel with every float64 operation (DMMA multiply-adds included) as ``DOUBLE_FLOAT_OPS`` fp32 ones."""
    fp64_work = entry["fp64"] + entry["dmma_macs"]
    return {**entry, "fp64": 0.0, "dmma_macs": 0.0, "fp32": entry["fp32"] + DOUBLE_FLOAT_OPS * fp64_work,
            "conversion": 0.0, "warp_instructions": entry["warp_instructions"]
            + (DOUBLE_FLOAT_OPS * fp64_work + entry["conversion"]) / 32}


# --------------------------------------------------------------------------------------------------- running
def model_job(item) -> dict:
    """Compile one (job, arch) and count its inner loop; ``{"error": ...}`` if it does not compile."""
    import triton
    from triton.backends.compiler import GPUTarget

    job, arch = item
    try:
        compiled = triton.compile(job.source(), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": job.config.num_warps, "num_stages": job.config.num_stages})
        counts, origin = count_compiled(compiled)
    except Exception as exc:  # a kernel that does not compile still gets its row, with the error
        return {**job.describe(), "arch": arch, "error": f"{type(exc).__name__}: {str(exc).strip()[-300:]}"}
    return {**job.describe(), "arch": arch, "origin": origin, "counts": counts}


# Kernels the model does not count: the short lists' one-program-per-list kernels run the tiled kernels' tile code
# (the same @triton.jit helpers) inside loops over their phases, so their cost per entry of P_hat is that of
# apply_forward / apply_backward at the same configuration; one tile loop per kernel is what the counter finds.
UNMODELLED_KERNELS = ("short_forward", "short_backward")


def all_items(archs: tuple[int, ...] = (80, 90)) -> list:
    """Every (compile job, arch) the model covers: the compile-only check's list for each arch, less
    ``UNMODELLED_KERNELS``."""
    from ..kernels.compile_check import all_jobs

    return [(job, arch) for arch in archs for job in all_jobs() if job.kernel not in UNMODELLED_KERNELS]


def run_model(items: list, workers: int | None = None) -> list[dict]:
    """``model_job`` over ``items`` in compiler processes started without ``TRITON_INTERPRET``."""
    import multiprocessing

    from ..kernels.launch import kernels_interpreted

    workers = workers or os.cpu_count() or 1
    if workers == 1 and not kernels_interpreted():
        return [model_job(item) for item in items]
    # Fresh (spawned) processes without TRITON_INTERPRET: interpreted kernels cannot be compiled, and a forked child
    # would inherit them.
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            return list(pool.map(model_job, items, chunksize=4))
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def variant_name(result: dict) -> str:
    """One row's kernel and launch configuration, e.g. 'apply_forward/m64n32w8s2', + '/multi_d' for d chunks,
    '/tau' for the tau-gradient variant (apply_backward, finish), '/transposed' for the column pass alone
    (``P_hat^T @ v``), '/full' for prepare without bands, '/masked' for prepare of padded lists."""
    name = (f"{result['kernel']}/m{result['block_m']}n{result['block_n']}w{result['num_warps']}"
            f"s{result['num_stages']}")
    return (name + ("" if result.get("single_d_chunk", True) else "/multi_d")
            + ("/tau" if result.get("need_tau", False) else "")
            + ("/transposed" if result.get("transposed", False) else "")
            + ("" if result.get("banded", True) else "/full") + ("/masked" if result.get("masked", False) else ""))


def rows_of(results: list[dict]) -> list[dict]:
    """Long-format rows: the counts per entry (device = the arch) and, per device of that arch, each unit's time per
    entry, the predicted time and the limiting unit."""
    from .. import __version__
    from .schema import COLUMNS, commit

    common = {"package_version": __version__, "commit": commit(),
              "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    rows: list[dict] = []

    def add(result: dict, device: str, metric: str, unit: str, value, status: str = "ok", note: str = "") -> None:
        row = dict.fromkeys(COLUMNS, "")
        values = {"tool": "model", "variant": variant_name(result), "pass": PASS_OF_KERNEL.get(result["kernel"], ""),
                  "d": result["block_d"], "dtype": result["dtype"], "device": device, "metric": metric,
                  "unit": unit, "median": value, "status": status, "note": note, **common}
        row.update({key: value for key, value in values.items() if key in row})
        rows.append(row)

    for result in results:
        arch = f"sm{result['arch']}"
        if "error" in result:
            add(result, arch, "compile", "", "", "failed", result["error"])
            continue
        entry = entry_of(result)
        for name, value in entry.items():
            add(result, arch, f"{name}_per_entry", "bytes" if name.endswith("bytes") else "count", value,
                note=f"from {result['origin']}")
        for device in DEVICES.values():
            if device.arch != result["arch"]:
                continue
            seconds = unit_seconds(entry, device)
            for unit, value in seconds.items():
                add(result, device.name, f"time_per_entry_{unit}", "s", value)
            unit, value = limiting(seconds)
            add(result, device.name, "predicted_time_per_entry", "s", value, note=f"limited by {unit}")
    return rows


def entry_of(result: dict) -> dict[str, float]:
    """Counts per entry of P_hat of one result: computed from its per-thread counts, or as read from a model.csv."""
    return result["entry"] if "entry" in result else per_entry(result["counts"], _config(result))


_VARIANT = re.compile(r"^(\w+)/m(\d+)n(\d+)w(\d+)s(\d+)(/multi_d)?(/tau)?(/transposed)?(/full)?(/masked)?$")


def results_from_csv(path: Path) -> list[dict]:
    """The results of an earlier run, rebuilt from the counts per entry of its model.csv (no compiling): for changing
    the rates or the report without recompiling 324 kernels."""
    from .schema import read_csv

    results: dict[tuple, dict] = {}
    for row in read_csv(path):
        match = _VARIANT.match(row["variant"])
        if not match or not row["device"].startswith("sm"):
            continue
        kernel, bm, bn, warps, stages, multi, tau, transposed, full, masked = match.groups()
        key = (row["variant"], row["d"], row["dtype"], row["device"])
        result = results.setdefault(key, {
            "kernel": kernel, "block_m": int(bm), "block_n": int(bn), "num_warps": int(warps),
            "num_stages": int(stages), "block_d": int(row["d"]), "dtype": row["dtype"], "single_d_chunk": not multi,
            "need_tau": bool(tau), "transposed": bool(transposed), "banded": not full, "masked": bool(masked),
            "arch": int(row["device"][2:]), "origin": row["note"].removeprefix("from "), "entry": {}})
        if row["metric"] == "compile" and row["status"] == "failed":
            result["error"] = row["note"]
        elif row["metric"].endswith("_per_entry"):
            result["entry"][row["metric"].removesuffix("_per_entry")] = float(row["median"])
    return list(results.values())


def _config(result: dict):
    from ..kernels.configs import KernelConfig

    return KernelConfig(result["block_m"], result["block_n"], result["num_warps"], result["num_stages"])


def default_configs() -> set[tuple]:
    """(kernel, block_d) -> the heuristic configuration the launchers use untuned, as comparable tuples."""
    from ..kernels.configs import BLOCK_D_CHOICES, KERNEL_NAMES, gpu_heuristic_config

    out = set()
    for kernel in KERNEL_NAMES:
        for block_d in (1,) if kernel == "matrix_forward" else BLOCK_D_CHOICES:
            cfg = gpu_heuristic_config(kernel, block_d)
            out.add((kernel, block_d, cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages))
    return out


def headline(results: list[dict]) -> list[dict]:
    """Per (kernel, block_d, dtype) at the default configuration, single d chunk, plain variant: the predicted time
    per entry on
    each device, its limiting unit, the exp floor and the float64 work's time against that floor."""
    defaults = default_configs()
    table = []
    for result in results:
        key = (result["kernel"], result["block_d"], result["block_m"], result["block_n"], result["num_warps"],
               result["num_stages"])
        variant = (result.get("need_tau") or result.get("transposed") or result.get("masked")
                   or not result.get("banded", True))
        if "error" in result or key not in defaults or not result.get("single_d_chunk", True) or variant:
            continue  # the plain kernels only (the tau, transposed, full and masked variants are in the CSV)
        entry = entry_of(result)
        for device in (*DEVICES.values(), *LOW_FP64_DEVICES.values()):
            if device.arch != result["arch"]:
                continue
            seconds = unit_seconds(entry, device)
            unit, value = limiting(seconds)
            df_unit, df_value = limiting(unit_seconds(double_float_entry(entry), device))
            floor = exp_floor_seconds(device)
            table.append({"kernel": result["kernel"], "block_d": result["block_d"], "dtype": result["dtype"],
                          "device": device.name, "entry": entry, "seconds": value, "unit": unit,
                          "fp64_over_floor": (seconds["fp64"] + seconds["fp64_tensor"]) / floor,
                          "over_floor": value / floor, "double_float_seconds": df_value, "double_float_unit": df_unit})
    return table


def write_readme(results: list[dict], folder: Path, command: str, seconds: float, recounted: bool = False) -> None:
    table = headline(results)
    from .schema import COLUMNS

    errors = [r for r in results if "error" in r]
    origins = Counter(r.get("origin") for r in results if "error" not in r)
    lines = ["# Static model of the kernels' speed", "",
             f"Command: `{command}` ("
             + ("times re-derived from the counts of an earlier compiling run" if recounted else f"{seconds:.0f} s")
             + f", no GPU). {len(results)} compiled kernels (every kernel x launch "
             f"configuration x block_d x dtype of `kernels.compile_check.all_jobs`, for sm_80 and sm_90); counts read "
             f"from {', '.join(f'{k} ({v})' for k, v in sorted(origins.items()))}"
             + (f"; {len(errors)} did not compile (rows with status failed)" if errors else "") + ".", "",
             "Raw data: [`model.csv`](model.csv), columns " + ", ".join(f"`{c}`" for c in COLUMNS) + ": `variant` is "
             "`kernel/m<BLOCK_M>n<BLOCK_N>w<warps>s<stages>` (`/multi_d`: the backward's loop over d chunks, d > 128), "
             "`d` is BLOCK_D, `device` is `sm80`/`sm90` for the counts per entry of P_hat and a GPU for the times "
             "per entry (`median` holds the value; `note` the limiting unit or where the counts come from).", "",
             "How: the tile loops of the SASS (backward branches) are counted per iteration, times the program's "
             "threads, divided by the BLOCK_M x BLOCK_N entries of an iteration; each unit's time per entry is that "
             "count over the device's rate (rates per SM per clock x SMs x boost clock; see `DEVICES` in "
             "`triton_sort/bench/model.py` for the numbers and their sources). The predicted time is the slowest "
             "unit's: a lower bound (no latency, occupancy, tail or window effects), so a measured time above it by "
             "2-3x is normal and far above it means something else (launches, memory, occupancy) dominates.", "",
             "Devices: " + "; ".join(f"{d.name} ({d.source})" for d in DEVICES.values()) + ".", "",
             "## Predictions at the default configurations", "",
             "Time per entry of P_hat (ps), limiting unit, and the float64 work's time relative to the exp floor "
             "(one MUFU ex2 per entry: 16/clk/SM). fp32 values unless stated.", "",
             "| kernel | block_d | dtype | A100 | H100 | H200 | H100 / exp floor | float64 / exp floor (H100) | "
             "ex2, fp64, shuffles, warp instr. per entry (sm_90) | requested global bytes per entry |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    grouped: dict[tuple, dict[str, dict]] = {}
    for row in table:
        grouped.setdefault((row["kernel"], row["block_d"], row["dtype"]), {})[row["device"]] = row
    for (kernel, block_d, dtype), by_device in sorted(grouped.items()):
        if dtype != "fp32" and block_d not in (16, 64):
            continue

        def cell(name: str, by_device=by_device) -> str:
            row = by_device.get(name)
            return f"{row['seconds'] * 1e12:.2f} ({row['unit']})" if row else "-"

        h100 = by_device.get("h100-sxm")
        if h100 is None:
            lines.append(f"| {kernel} | {block_d} | {dtype} | {cell('a100-sxm4-80gb')} | - | - | - | - | - | - |")
            continue
        e = h100["entry"]
        lines.append(f"| {kernel} | {block_d} | {dtype} | {cell('a100-sxm4-80gb')} | {cell('h100-sxm')} | "
                     f"{cell('h200')} | {h100['over_floor']:.1f}x | {h100['fp64_over_floor']:.2f}x | "
                     f"{e['ex2']:.2g}, {e['fp64']:.3g}, {e['shuffle']:.3g}, {e['warp_instructions']:.3g} | "
                     f"{e['load_bytes'] + e['store_bytes']:.3g} |")
    lines += ["", "## Without float64: double-float (fp32 pairs) on GPUs with little float64", "",
              f"Each float64 operation (DMMA multiply-adds included) replaced by {DOUBLE_FLOAT_OPS} fp32 operations "
              "(double-word arithmetic, Joldes, Muller and Popescu, ACM TOMS 2017), f32<->f64 conversions dropped; "
              "sm_80 code applied to sm_89 rates (FP64 at 1/64 of FP32, no DMMA: its multiply-adds on the FP64 pipe). "
              "Time per entry (ps) as compiled and with double-float, fp32 values:", "",
              "| kernel | block_d | device | as compiled | double-float | gain |", "|---|---|---|---|---|---|"]
    for row in table:
        if row["dtype"] == "fp32" and row["block_d"] in (1, 16, 64) and (
                row["device"] in LOW_FP64_DEVICES or row["device"] in ("a100-sxm4-80gb", "h100-sxm")):
            lines.append(f"| {row['kernel']} | {row['block_d']} | {row['device']} | {row['seconds'] * 1e12:.2f} "
                         f"({row['unit']}) | {row['double_float_seconds'] * 1e12:.2f} ({row['double_float_unit']}) | "
                         f"{row['seconds'] / row['double_float_seconds']:.1f}x |")
    lines += ["", *_findings(table)]
    (folder / "README.md").write_text("\n".join(lines) + "\n")


def _findings(table: list[dict]) -> list[str]:
    """Short conclusions computed from the table (so they follow the kernels when they change)."""
    h100 = [row for row in table if row["device"] == "h100-sxm" and row["dtype"] == "fp32"]
    low = [row for row in table if row["device"] in LOW_FP64_DEVICES and row["dtype"] == "fp32"]
    if not h100:
        return []
    units = Counter(row["unit"] for row in h100)
    shuffles = max(h100, key=lambda row: row["entry"]["shuffle"])
    lines = ["## Findings", "",
             "- Limiting unit on H100 (fp32, default configurations): "
             + ", ".join(f"{unit} for {count}" for unit, count in units.most_common()) + " kernel/block_d pairs. "
             "`issue` means the instruction stream itself (integer index and mask arithmetic, selects, conversions "
             "besides the floating-point work): 4 warp instructions per clock per SM.",
             f"- Warp shuffles: up to {shuffles['entry']['shuffle']:.3g} per entry ({shuffles['kernel']}, block_d "
             f"{shuffles['block_d']}): the row sums `tl.sum(..., axis=1)` of every tile are cross-thread float64 "
             "reductions (two shuffles per float64 value) inside the loop; accumulating per-thread (BLOCK_M, "
             "BLOCK_N) partials across tiles and reducing once after the loop would remove them and most of the "
             "float64 additions.",
             "- Requested global bytes per entry (last column) exceed what DRAM could serve at these rates, but "
             "they count each thread's request (broadcast loads of a tile's per-column terms once per thread): "
             "the tiles are reused from L1/L2, so DRAM is not taken as a bound; a measured time far above the "
             "prediction would point there first.",
             f"- The float64 work alone takes {min(r['fp64_over_floor'] for r in h100):.2f}x to "
             f"{max(r['fp64_over_floor'] for r in h100):.2f}x the exp floor on H100 (A100: half the float64 rate, "
             "so twice that ratio); the predicted time is "
             f"{min(r['over_floor'] for r in h100):.1f}x to {max(r['over_floor'] for r in h100):.1f}x the floor."]
    if low:
        gains = [row["seconds"] / row["double_float_seconds"] for row in low]
        low_units = Counter(row["unit"] for row in low)
        fast = [row["seconds"] / row["double_float_seconds"] for row in h100]
        lines.append(f"- On L40S / RTX 4090 (FP64 at 1/64) double-float would be {min(gains):.1f}x to "
                     f"{max(gains):.1f}x faster than the float64 code as compiled (limited there by "
                     + ", ".join(f"{unit} for {count}" for unit, count in low_units.most_common())
                     + f"); on H100 it would be slower ({min(fast):.1f}x to {max(fast):.1f}x the speed): a "
                     "float64-free variant pays only on GPUs with little float64.")
    return lines


def write_model(results: list[dict], folder: Path, command: str, seconds: float,
                recounted: bool = False) -> list[Path]:
    from .schema import write_csv

    folder.mkdir(parents=True, exist_ok=True)
    write_csv(rows_of(results), folder / "model.csv")
    write_readme(results, folder, command, seconds, recounted)
    return [folder / "model.csv", folder / "README.md"]


def predictions(folder: Path) -> dict[tuple[str, str, int, str], tuple[float, str]]:
    """(variant, device, d, dtype) -> (predicted seconds per entry, limiting unit) from a written ``model.csv``."""
    from .schema import read_csv

    out = {}
    for row in read_csv(folder / "model.csv"):
        if row["metric"] == "predicted_time_per_entry" and row["status"] == "ok":
            out[(row["variant"], row["device"], int(row["d"]), row["dtype"])] = (
                float(row["median"]), row["note"].removeprefix("limited by "))
    return out


def main(argv: list[str] | None = None) -> int:
    import time

    parser = argparse.ArgumentParser(prog="triton-sort model", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("perf_reports/model"), help="folder of model.csv, README.md")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=[80, 90],
                        help="compute capabilities to compile for")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel compiler processes")
    parser.add_argument("--from-csv", type=Path, help="re-derive times from the counts of an earlier model.csv "
                        "(no compiling; after changing the rates)")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a folder")
    if args.from_csv is not None and not args.from_csv.is_file():
        parser.error(f"--from-csv {args.from_csv} is not a file")
    started = time.perf_counter()
    if args.from_csv is not None:
        results = results_from_csv(args.from_csv)
    else:
        results = run_model(all_items(tuple(args.arch)), args.workers)
    command = "triton-sort model " + " ".join(argv if argv is not None else sys.argv[1:])
    files = write_model(results, args.out, command.strip(), time.perf_counter() - started, args.from_csv is not None)
    print("wrote " + ", ".join(map(str, files)))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
