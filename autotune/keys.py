"""What a tuned configuration is keyed by: device, Triton version, kernel source, dtype, d bucket and n bucket.

A device is its normalised name plus its architecture (``h100`` + ``sm90``), so one chip sold under several names
("NVIDIA H100 80GB HBM3", "H100 SXM", "NVIDIA H100 PCIe") shares one entry. Without a GPU, Triton's interpreter
is a pseudo-device ``interpreter`` (so tune -> cache -> use runs in CI; its timings mean nothing).
"""

from __future__ import annotations

import hashlib
import inspect
import re
from dataclasses import dataclass
from functools import cache

import torch

from ..kernels.configs import next_power_of_2

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}

# Words that name the vendor, the memory, the form factor or the partition, not the chip.
_NOISE_WORDS = {"nvidia", "geforce", "tesla", "quadro", "amd", "radeon", "instinct", "graphics", "pcie", "nvl",
                "nvlink"}
_NOISE_PATTERN = re.compile(r"^(\d+gb|hbm\d*e?|gddr\d*x?|sxm\d*)$")


def normalise_device_name(name: str) -> str:
    """'NVIDIA H100 80GB HBM3', 'H100 SXM', 'NVIDIA H100 PCIe' -> 'h100'; 'NVIDIA GeForce RTX 4090' -> 'rtx-4090'."""
    name = re.split(r"\s+mig\s+", name.lower())[0]  # "... MIG 1g.10gb": a slice of the same chip
    words = [w for w in re.split(r"[\s\-_/]+", name) if w and w not in _NOISE_WORDS and not _NOISE_PATTERN.match(w)]
    return "-".join(words) or "unknown"


@dataclass(frozen=True)
class DeviceKey:
    name: str  # normalised, e.g. "h100"
    arch: str  # e.g. "sm90"; "cpu" for the interpreter
    full_name: str = ""  # as the driver reports it (informational, not part of the key)

    @property
    def stem(self) -> str:
        """File name (without .json) of this device's cache and shipped-defaults files."""
        return f"{self.name}-{self.arch}"

    @property
    def capability(self) -> int | None:
        """CUDA compute capability as an int (90 for sm90), None for the interpreter and non-CUDA devices."""
        match = re.fullmatch(r"sm(\d+)", self.arch)
        return int(match.group(1)) if match else None


INTERPRETER = DeviceKey("interpreter", "cpu", "Triton interpreter (CPU)")


@cache
def device_key(device: torch.device) -> DeviceKey:
    """The key of a tensor's device; CPU tensors are run by the interpreter."""
    if device.type != "cuda":
        return INTERPRETER
    index = device.index if device.index is not None else torch.cuda.current_device()
    full_name = torch.cuda.get_device_name(index)
    if torch.version.hip:  # ROCm: the gfx architecture, not CUDA's compute capability
        arch = torch.cuda.get_device_properties(index).gcnArchName.split(":")[0]
    else:
        major, minor = torch.cuda.get_device_capability(index)
        arch = f"sm{major}{minor}"
    return DeviceKey(normalise_device_name(full_name), arch, full_name)


def n_bucket(n: int) -> int:
    """n rounded up to a power of two: every n in (2^(k-1), 2^k] shares the configuration tuned for 2^k."""
    return next_power_of_2(n)


def entry_key(dtype: str, block_d: int, bucket: int) -> str:
    """Key of one tuned entry inside a kernel's table, e.g. 'fp32/d16/n1024'."""
    return f"{dtype}/d{block_d}/n{bucket}"


def parse_entry_key(key: str) -> tuple[str, int, int]:
    """Inverse of ``entry_key``: 'fp32/d16/n1024' -> ('fp32', 16, 1024); ValueError if malformed."""
    match = re.fullmatch(r"(\w+)/d(\d+)/n(\d+)", key)
    if not match:
        raise ValueError(f"malformed entry key {key!r}")
    return match.group(1), int(match.group(2)), int(match.group(3))


def _triton_function_types() -> tuple[type, ...]:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return JITFunction, InterpretedFunction


@cache
def kernel_source_hash(kernel: object) -> str:
    """Hash of a ``@triton.jit`` kernel's source and of the ``@triton.jit`` helpers it calls (transitively).

    Identical with and without ``TRITON_INTERPRET`` (both wrap the same Python function); editing the kernel or a
    helper changes it, which makes earlier tuning results stale.
    """
    triton_types = _triton_function_types()
    sources: dict[str, str] = {}
    pending = [kernel]
    while pending:
        fn = pending.pop().fn
        name = f"{fn.__module__}.{fn.__qualname__}"
        if name in sources:
            continue
        sources[name] = inspect.getsource(fn)
        pending += [obj for obj in map(fn.__globals__.get, fn.__code__.co_names) if isinstance(obj, triton_types)]
    digest = hashlib.sha256("".join(sources[name] for name in sorted(sources)).encode())
    return digest.hexdigest()[:16]
