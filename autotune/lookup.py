"""Tuned configurations at launch time: the user's cache, then the package's shipped defaults; never tunes.

``kernels.configs.launch_config`` memoises what ``tuned_config`` returns per key, and this module reads each
device's files once, so a launch does no file I/O. Both forget what they know on ``clear()`` (the tuner calls it
after writing; a process that should see another process's new results calls it too).

A file that cannot be used, an entry of another kernel source, or a configuration that is not among
``candidate_configs`` is reported by one warning and ignored: the launch falls back to the default.
"""

from __future__ import annotations

import math
import warnings
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..kernels import configs
from ..kernels.configs import KernelConfig, candidate_configs
from . import cache
from .keys import DTYPE_NAMES, DeviceKey, device_key, kernel_source_hash, parse_entry_key

if TYPE_CHECKING:
    from importlib.abc import Traversable

# The package's tuned defaults, one file per device in the cache's format (tests point this elsewhere).
SHIPPED: Traversable | Path = resources.files(__package__) / "tuned"

# (kernel, dtype name, block_d) -> {n bucket: config}
Table = dict[tuple[str, str, int], dict[int, KernelConfig]]

_TABLES: dict[DeviceKey, Table] = {}
_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def clear() -> None:
    """Forget loaded files, memoised launch configurations and given warnings."""
    _TABLES.clear()
    _WARNED.clear()
    configs.forget_launch_configs()


def triton_version() -> str:
    import triton

    return triton.__version__


def source_hashes() -> dict[str, str]:
    from .registry import KERNELS

    return {name: kernel_source_hash(spec.kernel) for name, spec in KERNELS.items()}


def usable_entries(doc: dict, origin: str) -> dict[str, dict[str, dict]]:
    """kernel -> {entry key: entry} of the entries of ``doc`` that were tuned for today's kernel sources and name
    a candidate configuration; warns (once) about the rest."""
    hashes = source_hashes()
    usable: dict[str, dict[str, dict]] = {}
    for kernel, table in doc["kernels"].items():
        if kernel not in hashes:
            continue  # a kernel this version does not have
        if table.get("source_hash") != hashes[kernel]:
            warn_once(f"{origin}: the results for {kernel} were tuned for another version of the kernel; ignoring "
                      f"them (re-run `triton-sort autotune`)")
            continue
        for key, entry in table["entries"].items():
            try:
                _, block_d, _ = parse_entry_key(key)
                config = KernelConfig(**entry["config"])
            except (ValueError, TypeError, KeyError):
                warn_once(f"{origin}: malformed entry {kernel} {key!r}; ignoring it")
                continue
            if config not in candidate_configs(kernel, block_d):
                warn_once(f"{origin}: {kernel} {key} names {config}, which is not a candidate configuration of "
                          f"this version; ignoring it")
                continue
            usable.setdefault(kernel, {})[key] = entry
    return usable


def _read(path: Traversable | Path, origin: str, triton: str | None) -> dict[str, dict[str, dict]]:
    try:
        doc = cache.read(path, triton_version=triton)
    except cache.CacheProblem as problem:
        warn_once(f"{origin}: {problem}; ignoring it (re-run `triton-sort autotune`)")
        return {}
    return {} if doc is None else usable_entries(doc, origin)


def device_table(device: DeviceKey) -> Table:
    """Usable tuned configurations of a device: shipped defaults, overridden per key by the user's cache.

    Shipped results are kept across Triton versions (a configuration that is a candidate stays launchable);
    the user's cache is tuned for one Triton version and ignored under another.
    """
    if device not in _TABLES:
        table: Table = {}
        path = cache.cache_path(device)
        shipped = _read(SHIPPED / f"{device.stem}.json", f"shipped tuning for {device.stem}", None)
        user = _read(path, str(path), triton_version())
        for source in (shipped, user):
            for kernel, entries in source.items():
                for key, entry in entries.items():
                    dtype, block_d, bucket = parse_entry_key(key)
                    table.setdefault((kernel, dtype, block_d), {})[bucket] = KernelConfig(**entry["config"])
        _TABLES[device] = table
    return _TABLES[device]


def tuned_config(kernel: str, bucket: int, block_d: int, dtype: torch.dtype,
                 device: torch.device) -> KernelConfig | None:
    """The tuned configuration for this n bucket, else the one of the nearest tuned bucket (in log2 n, ties to
    the larger n), else None. Reads the device's files on first use only."""
    by_bucket = device_table(device_key(device)).get((kernel, DTYPE_NAMES.get(dtype, str(dtype)), block_d))
    if not by_bucket:
        return None
    nearest = min(by_bucket, key=lambda tuned: (abs(math.log2(tuned) - math.log2(bucket)), -tuned))
    return by_bucket[nearest]
