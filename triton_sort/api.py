"""Functional API: validation, shape handling and backend choice in front of the custom ops."""

from __future__ import annotations

import math
import numbers
from typing import Literal

import torch
from torch import Tensor

from ._validation import mark_tau_checked
from .ops import APPLY_FUNCTIONS, LeanApply, SortMatrix, apply_directly

Backend = Literal["auto", "torch", "triton"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_TAU_CACHE: dict[tuple[float, str], Tensor] = {}


def check_tau(tau: float | Tensor, device: torch.device | str = "cpu") -> Tensor:
    """tau as a 0-d float64 tensor on ``device``; a clear error for anything that is not a positive real number.

    A Python number is checked here (finite, > 0, with a finite inverse) and converted once per value and device
    (cached: no copy per call). A one-element tensor keeps its autograd graph (a tau that requires grad gets its
    gradient) and its value is checked inside the ops, with the other data checks (``set_validation``), so that
    tracing never reads it: compiled graphs take tau as an input and do not specialise on its value."""
    if isinstance(tau, Tensor):
        if tau.numel() != 1 or not tau.is_floating_point():
            raise TypeError(f"tau must be a real number or a one-element floating-point tensor, got a tensor of "
                            f"shape {tuple(tau.shape)} and dtype {tau.dtype}")
        return tau.to(device=device, dtype=torch.float64).reshape(())
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise TypeError(f"tau must be a real number, got {type(tau).__name__}")
    if torch.compiler.is_compiling():  # a traced (possibly symbolic) number: the ops check its value at run time
        return torch.scalar_tensor(tau, dtype=torch.float64, device=device)
    value = float(tau)
    if not math.isfinite(value) or value <= 0 or not math.isfinite(1.0 / value):
        raise ValueError(f"tau must be finite and > 0 with a finite inverse, got {value}")
    key = (value, str(device))
    cached = _TAU_CACHE.get(key)
    if cached is None:
        if len(_TAU_CACHE) > 1024:
            _TAU_CACHE.clear()
        cached = _TAU_CACHE[key] = mark_tau_checked(torch.tensor(value, dtype=torch.float64, device=device))
    return cached


def autocast_inputs(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Under ``torch.autocast`` for the tensors' device, 16-bit floating inputs run at fp32 (as PyTorch's softmax
    does): mixed dtypes from autocast regions are accepted and computed at fp32 accuracy."""
    if not torch.is_autocast_enabled(tensors[0].device.type):
        return tensors
    return tuple(t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors)


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _check_scores(scores: object) -> Tensor:
    if not isinstance(scores, Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"scores must have a real floating dtype (float32, float16, bfloat16 or float64), "
                        f"got {scores.dtype}")
    if scores.dim() == 0:
        raise ValueError("scores must have shape (..., n) with at least one dimension, got a 0-d tensor")
    return scores


def _check_mask(scores: Tensor, mask: object) -> Tensor | None:
    """``mask`` (bool, scores' shape and device; True for a real item) flattened to (B, n), or None."""
    mask = check_mask(scores, mask)
    return None if mask is None else mask.reshape(_as_batch(scores).shape)


def check_mask(scores: Tensor, mask: object) -> Tensor | None:
    """``mask`` checked (bool, scores' shape and device; True for a real item) and returned as given, or None."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool (True for a real item), got {mask.dtype}")
    if tuple(mask.shape) != tuple(scores.shape):
        raise ValueError(f"mask must have the shape of scores {tuple(scores.shape)}, got {tuple(mask.shape)}")
    if mask.device != scores.device:
        raise ValueError(f"mask must be on the device of scores ({scores.device}), got {mask.device}")
    return mask


def _resolve_backend(backend: str, scores: Tensor) -> str:
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "auto":
        return "triton" if scores.is_cuda and scores.dtype in TRITON_DTYPES and _triton_available() else "torch"
    if backend == "triton":
        if scores.dtype not in TRITON_DTYPES:
            raise TypeError(f"backend='triton' supports float32, float16 and bfloat16, got {scores.dtype}; "
                            "use backend='torch' for float64")
        if not _triton_available():
            raise ValueError("backend='triton' needs the triton package, which is not importable here")
        if not scores.is_cuda:
            from .kernels.launch import kernels_interpreted

            if not kernels_interpreted():
                raise ValueError(f"backend='triton' needs CUDA tensors, got device {scores.device}; on CPU set "
                                 "TRITON_INTERPRET=1 before importing triton_sort, or use backend='torch'")
    return backend


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _as_batch(scores: Tensor) -> Tensor:
    """scores (..., n) as (B, n), B the product of the leading dimensions (1 for 1-D scores); (B, n) scores are
    returned as they are (a reshape to the same shape is still a view with an autograd node of its own, forward and
    backward: microseconds that count for a short list)."""
    if scores.dim() == 2:
        return scores
    return scores.reshape(math.prod(scores.shape[:-1]), scores.shape[-1])


def _check_values(scores: Tensor, x: object, name: str = "x") -> Tensor:
    """Check values sorted by ``scores`` (shapes as in ``relaxed_sort_apply``); return them as ``(B, n, d)``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != scores.dtype:
        raise TypeError(f"{name} must have the dtype of scores ({scores.dtype}), got {x.dtype}")
    if x.device != scores.device:
        raise ValueError(f"{name} must be on the device of scores ({scores.device}), got {x.device}")
    leading = scores.dim()
    if x.dim() not in (leading, leading + 1) or tuple(x.shape[:leading]) != tuple(scores.shape):
        raise ValueError(f"{name} must have shape (..., n) or (..., n, d) with the leading dimensions and n of "
                         f"scores {tuple(scores.shape)}, got {tuple(x.shape)}")
    values = x if x.dim() == leading + 1 else x.unsqueeze(-1)
    if values.dim() == 3:  # already (B, n, d): no view (see _as_batch)
        return values
    return values.reshape(math.prod(scores.shape[:-1]), scores.shape[-1], values.shape[-1])


def relaxed_sort_apply(scores: Tensor, x: Tensor, tau: float | Tensor, *, descending: bool = True,
                       hard: bool = False, banded: bool = True, backend: Backend = "auto", mask: Tensor | None = None,
                       transpose: bool = False) -> Tensor:
    """NeuralSort's relaxed sort applied to values, ``P_hat @ x``, without materialising ``P_hat``.

    ``P_hat[i, :] = softmax(((n + 1 - 2i) * s - A_s 1) / tau)`` with ``A_s[j, k] = |s_j - s_k|``: row i (output
    rank i) peaks at the i-th largest score (``descending=False``: the i-th smallest).

    Args:
        scores: ``(..., n)``: any leading batch dimensions, one list per row.
        x: ``(..., n)`` or ``(..., n, d)`` with the leading dimensions of ``scores``; same dtype and device.
        tau: temperature > 0, a number or a one-element tensor (a tensor that requires grad gets its exact
            gradient; under torch.compile a tensor tau never causes a recompilation); ``P_hat`` tends to the sorting
            permutation as ``tau -> 0``.
        hard: straight-through: the value is ``x`` in exact sorted order (stable for ties), the gradient the
            relaxed one.
        banded: skip the columns whose logit lies more than ``T = ln(n) + 30`` below their row's maximum. Each
            weighs less than ``e^-T`` of the row's peak, so all skipped weight together is below ``n e^-T = e^-30``
            (about 1e-13) of the row's mass: the result is exact to that bound, and the work falls from ``n^2``
            towards ``n^1.5`` for well-spread scores. ``banded=False`` evaluates every column.
        backend: ``"auto"`` (Triton for CUDA tensors, PyTorch otherwise), ``"triton"`` or ``"torch"``.
        mask: bool, ``scores``' shape, True for a real item: padded lists. A list with ``m`` real items gives
            exactly the call on those items alone in output rows ``0..m-1`` (coefficients ``m + 1 - 2i``); rows
            ``m..n-1`` are 0, padded items get no weight and zero gradient, whatever they hold (NaN included), and
            may sit anywhere in the list.
        transpose: return ``P_hat^T @ x`` instead, ``x`` indexed by rank (output row) and the result by item: sends
            values at ranks back to the items (each item's expected discount or position). Exact gradients for
            ``scores`` and ``x``.

    Returns:
        A tensor of ``x``'s shape, differentiable with respect to ``scores`` and ``x``. Extra memory is
        O(B * n * d) in both passes (the backward recomputes ``P_hat`` tile by tile).
    """
    return _apply("relaxed_sort_apply", scores, x, tau, descending, hard, banded, backend, mask, transpose)


def _apply(name: str, scores: Tensor, x: Tensor, tau: float | Tensor, descending: bool, hard: bool, banded: bool,
           backend: Backend, mask: Tensor | None, transpose: bool) -> Tensor:
    """``relaxed_sort_apply`` for the public function ``name`` (the name its autograd errors give)."""
    scores = _check_scores(scores)
    if isinstance(x, Tensor):
        scores, x = autocast_inputs(scores, x)
    tau = check_tau(tau, scores.device)
    _check_flag("descending", descending)
    _check_flag("hard", hard)
    _check_flag("transpose", transpose)
    values = _check_values(scores, x)
    flat_mask = _check_mask(scores, mask)
    backend = _resolve_backend(backend, scores)
    _check_flag("banded", banded)
    batch_scores = _as_batch(scores)
    if apply_directly(batch_scores, values, tau, backend):
        out = LeanApply.apply(batch_scores, values, tau, flat_mask, descending, hard, transpose, name)
    else:
        out = APPLY_FUNCTIONS[name].apply(batch_scores, values, tau, flat_mask, descending, hard, banded, transpose,
                                          backend)[0]
    return out if out.shape == x.shape else out.reshape(x.shape)


def relaxed_sort_matrix(scores: Tensor, tau: float | Tensor, *, descending: bool = True, hard: bool = False,
                        banded: bool = True, backend: Backend = "auto", mask: Tensor | None = None) -> Tensor:
    """NeuralSort's relaxed permutation matrix ``P_hat``, ``(..., n, n)`` for scores ``(..., n)``.

    Row i is a softmax peaking at the i-th largest score (``descending=False``: smallest); rows sum to 1.
    ``hard=True`` returns the exact permutation matrix (stable for ties) with the relaxed gradient.
    With ``banded`` (default) entries below ``e^-(ln(n) + 30)`` of their row's peak are exact zeros (see
    ``relaxed_sort_apply``). ``mask`` (bool, scores' shape, True for a real item): a list of ``m`` real items has
    the ``m x m`` matrix of those items alone in rows ``0..m-1`` and their columns; padded rows and columns are 0.
    Differentiable with respect to ``scores``. Prefer :func:`relaxed_sort_apply` when only ``P_hat @ x`` is needed:
    it never allocates ``n x n``.
    """
    scores = _check_scores(scores)
    (scores,) = autocast_inputs(scores)
    tau = check_tau(tau, scores.device)
    _check_flag("descending", descending)
    _check_flag("hard", hard)
    flat_mask = _check_mask(scores, mask)
    backend = _resolve_backend(backend, scores)
    _check_flag("banded", banded)
    out = SortMatrix.apply(_as_batch(scores), tau, flat_mask, descending, hard, banded, backend)[0]
    return out.reshape(*scores.shape, scores.shape[-1])


def relaxed_sort(scores: Tensor, tau: float | Tensor, *, descending: bool = True, hard: bool = False,
                 mask: Tensor | None = None, banded: bool = True, backend: Backend = "auto") -> Tensor:
    """Soft-sorted scores, ``P_hat @ scores``: ``(..., n)``, entry i the relaxed i-th largest score (``descending``;
    else smallest). ``hard=True``: the exact sorted scores with the relaxed gradient. ``mask`` as in
    :func:`relaxed_sort_apply` (a list's m real scores fill entries ``0..m-1``, the rest are 0). Exact gradient,
    O(B n) memory (streaming)."""
    return _apply("relaxed_sort", scores, scores, tau, descending, hard, banded, backend, mask, False)


def relaxed_rank(scores: Tensor, tau: float | Tensor, *, descending: bool = True, mask: Tensor | None = None,
                 banded: bool = True, backend: Backend = "auto") -> Tensor:
    """Soft ranks ``r_j = sum_i (i + 1) P_hat[i, j]``, ``(..., n)``, 1-based: with ``descending=True`` the largest
    score has rank about 1 (``descending=False``: the smallest). As ``tau -> 0`` they tend to the exact ranks.
    ``mask`` as in :func:`relaxed_sort_apply`: a list's m real items get ranks in [1, m], padded items 0.

    ``P_hat^T @ (1, 2, ..., n)`` (``relaxed_sort_apply(..., transpose=True)``): exact gradient, streaming, O(B n)
    memory. Unlike ``torchsort.soft_rank`` (ascending ranks, a regularised isotonic projection), these are
    NeuralSort's expected positions under ``P_hat``."""
    scores = _check_scores(scores)
    ranks = torch.arange(1, scores.shape[-1] + 1, dtype=scores.dtype, device=scores.device)
    return _apply("relaxed_rank", scores, ranks.expand(scores.shape), tau, descending, False, banded, backend, mask,
                  True)
