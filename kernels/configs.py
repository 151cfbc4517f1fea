"""Launch configurations of the kernels: the block sizes the package may launch, chosen per kernel and ``d``.

The autotuner (``triton_sort.autotune``) searches ``candidate_configs``; the launchers ask ``launch_config``, which
returns the tuned configuration of the device if there is one (the user's cache, then the package's shipped
defaults) and ``default_config`` otherwise. The compile-only test compiles every configuration returned by
``candidate_configs`` for sm_80 and sm_90.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

KERNEL_NAMES = ("matrix_forward", "apply_forward", "apply_delta", "apply_backward")

# Wider d is split over programs (grid axis 2) so that a (BLOCK_N, BLOCK_D) tile stays in registers.
MAX_BLOCK_D = 128
# tl.dot needs every dimension >= 16; d = 1 uses a plain row reduction instead.
MIN_DOT_DIM = 16


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` at import time)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_power_of_2(value: int) -> int:
    return 1 if value <= 1 else 1 << (value - 1).bit_length()


def block_d_for(d: int) -> int:
    """Tile width over the value dimension: 1 for d <= 1 (d = 0: row sums only), else a power of two in
    [16, MAX_BLOCK_D]."""
    if d <= 1:
        return 1
    return min(max(MIN_DOT_DIM, next_power_of_2(d)), MAX_BLOCK_D)


BLOCK_D_CHOICES = (1, 16, 32, 64, 128)

# Lists up to this many items take the one-program-per-list kernels (``short_forward``, ``short_backward``): one
# launch per pass instead of five, each program running every tile of its list. Longer lists take the tiled
# kernels, whose grids spread one list over many programs. A bound from reasoning, not yet from a GPU measurement:
# at n = 256 a list is 8 row tiles of 32, about as many as the tiled grid would give it anyway.
SHORT_MAX_N = 256
# Positions per step of the short kernels' row passes (preparation, finish): one step up to SHORT_MAX_N, loops
# beyond (the kernels serve any n; the threshold is a speed choice, measured by ``triton-sort gpu-check``).
SHORT_ROW_BLOCK = 256

# The interpreter costs about 3 ms per program per loop step, whatever the tile: large tiles, few steps.
_INTERPRETER_CONFIG = KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=1)


def default_config(kernel: str, block_d: int = 1) -> KernelConfig:
    """The configuration launched where nobody has tuned: the interpreter's, or the GPU heuristic."""
    return _INTERPRETER_CONFIG if interpreting() else gpu_heuristic_config(kernel, block_d)


def gpu_heuristic_config(kernel: str, block_d: int = 1) -> KernelConfig:
    """Heuristic GPU configuration: the largest tile that compiles without register spills for sm_90 (checked with
    ``python -m triton_sort.autotune.prune``; the float64 drops and accumulators take registers)."""
    if kernel not in KERNEL_NAMES:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNEL_NAMES}")
    if block_d >= 128 or (kernel in ("apply_delta", "apply_backward") and block_d >= 64):
        # The (BLOCK_N, BLOCK_D) value tile and float64 accumulators leave room for a 32x32 tile only.
        return KernelConfig(block_m=32, block_n=32, num_warps=4, num_stages=2)
    return KernelConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)


def short_config(kernel: str, block_d: int = 1) -> KernelConfig:
    """Tiles of the one-program-per-list kernels: those of the tiled ``kernel`` whose code they run
    (``apply_forward`` for ``short_forward``, ``apply_backward`` for ``short_backward``), untuned: a tuned tiled
    configuration was chosen for many programs per list."""
    return default_config(kernel, block_d)


def candidate_configs(kernel: str, block_d: int = 1) -> list[KernelConfig]:
    """Every configuration the package may launch on a GPU for ``kernel`` at this ``block_d`` (the tuner's space).

    The heuristic one, its tile halved (twice the programs: fills the GPU at small n), and its tile with 8 warps
    and 3 pipeline stages (more latency hiding). Kept small on purpose: the compile-only test builds each one for
    3 dtypes and 2 architectures (doubled tiles spill and cost twice the compile time of the others).
    """
    base = gpu_heuristic_config(kernel, block_d)
    half = KernelConfig(block_m=base.block_m // 2, block_n=base.block_n // 2, num_warps=4, num_stages=2)
    return [base, half, replace(base, num_warps=8, num_stages=3)]


_LAUNCH_CONFIGS: dict[tuple, KernelConfig] = {}


def launch_config(kernel: str, *, n: int, d: int, dtype: torch.dtype, device: torch.device) -> KernelConfig:
    """The configuration the launchers use: tuned for this device if known, else ``default_config``.

    Memoised per (kernel, n bucket, block_d, dtype, device), so a launch costs a dict lookup; never tunes (tuning is
    the explicit ``triton-sort autotune``).
    """
    key = (kernel, next_power_of_2(n), block_d_for(d), dtype, device)
    config = _LAUNCH_CONFIGS.get(key)
    if config is None:
        from ..autotune.lookup import tuned_config  # the tuner imports the launchers, which import this module

        config = tuned_config(*key) or default_config(kernel, key[2])
        _LAUNCH_CONFIGS[key] = config
    return config


def forget_launch_configs() -> None:
    """Drop ``launch_config``'s memo (after tuning, or when the cache directory changes)."""
    _LAUNCH_CONFIGS.clear()
