"""Argument checks that need no tensor, and the one switch for checks that read tensor values.

Validation (on by default) checks the data of every call: scores, values and a tensor tau must be finite (and tau
> 0), or the call raises a ``ValueError``. Each check reads a result back to the host, a synchronisation that
stalls a GPU's queue and prevents CUDA-graph capture: hot training loops can switch it off with
``set_validation(False)``; the arguments' types, shapes and dtypes are still checked (no synchronisation).

``triton_sort.api`` holds the checks of tensors (``check_tau``, ``_check_scores``, ...); what lives here is what a
module checks in ``__init__``, before it has seen a tensor, and what the functional code asks before a
data-dependent check.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator

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
    return _validate and not torch.compiler.is_compiling()


_validate = True


def set_validation(enabled: bool) -> None:
    """Switch the data checks of every triton_sort call on or off (like
    ``torch.distributions.Distribution.set_default_validate_args``).

    With validation off nothing synchronises with the host; non-finite inputs are then not detected and propagate
    as NaN: a NaN or infinite score makes its whole list's outputs and gradients NaN, a NaN value in ``x`` the
    outputs that weigh it (with the streaming paths' banding: the rows whose window holds it)."""
    global _validate
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _validate = enabled


def validation_enabled() -> bool:
    """Whether data checks are on (see :func:`set_validation`)."""
    return _validate


@contextlib.contextmanager
def validation(enabled: bool) -> Iterator[None]:
    """Context manager form of :func:`set_validation`; restores the previous setting on exit."""
    previous = _validate
    set_validation(enabled)
    try:
        yield
    finally:
        set_validation(previous)


# Temperatures made from Python numbers by ``api.check_tau``, which checked their values (finite, > 0, with a finite
# inverse) before making them: by id, with the tensor itself (so that the id stays its own while it is here).
_CHECKED_TAUS: dict[int, torch.Tensor] = {}


def mark_tau_checked(tau: torch.Tensor) -> torch.Tensor:
    """Record that ``tau`` (a tensor the library made and never hands out) holds a checked value; return it."""
    if len(_CHECKED_TAUS) > 1024:
        _CHECKED_TAUS.clear()
    _CHECKED_TAUS[id(tau)] = tau
    return tau


def tau_checked(tau: torch.Tensor) -> bool:
    """Whether ``tau`` is one of ``mark_tau_checked``'s: its data check may be skipped (two operations per call)."""
    return _CHECKED_TAUS.get(id(tau)) is tau
