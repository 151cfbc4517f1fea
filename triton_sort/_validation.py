"""Argument checks that need no tensor, and the one switch for checks that read tensor values.

``triton_sort.api`` holds the checks of tensors (``check_tau``, ``_check_scores``, ...); what lives here is what a
module checks in ``__init__``, before it has seen a tensor, and what the functional code asks before a
data-dependent check.
"""

from __future__ import annotations

import numbers

import torch

BACKEND_NAMES = ("auto", "torch", "triton")


def check_backend_name(backend: object) -> str:
    """``backend`` itself, if it is one of ``BACKEND_NAMES``; else a ValueError (whether the backend can run on
    given tensors is ``api._resolve_backend``'s question)."""
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    return backend


def check_int(name: str, value: object, *, minimum: int) -> int:
    """``value`` as an int: a TypeError for anything that is not an integer (bools included), a ValueError below
    ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def checks_values() -> bool:
    """Whether to run checks that read tensor values (NaN/inf, permutations): they synchronise with the device and
    are data-dependent Python branches, which ``torch.compile(fullgraph=True)`` cannot trace, so they run in eager
    mode only. Callers make the traced path fail loudly instead where they can (NaN results, or the check inside a
    custom op)."""
    return not torch.compiler.is_compiling()
