"""Global switches: input validation.

Validation (on by default) checks the data of every call: scores, values and a tensor tau must be finite (and tau
> 0), or the call raises a ``ValueError``. Each check reads a result back to the host, a synchronisation that
stalls a GPU's queue and prevents CUDA-graph capture. Hot training loops can switch it off; the arguments' types,
shapes and dtypes are still checked (that costs no synchronisation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
