"""Functional API: validation, shape handling and backend choice in front of the custom ops."""

from __future__ import annotations

import math
import numbers
from typing import Literal

import torch
from torch import Tensor

from .ops import SortApply, SortMatrix

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
        cached = _TAU_CACHE[key] = torch.tensor(value, dtype=torch.float64, device=device)
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
    if scores.dim() not in (1, 2):
        raise ValueError(f"scores must have shape (n,) or (B, n), got {tuple(scores.shape)}")
    return scores


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
    return scores if scores.dim() == 2 else scores.unsqueeze(0)


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
        expected = "(n,) or (n, d)" if leading == 1 else "(B, n) or (B, n, d)"
        raise ValueError(f"{name} must have shape {expected} matching scores {tuple(scores.shape)}, "
                         f"got {tuple(x.shape)}")
    values = x if x.dim() == leading + 1 else x.unsqueeze(-1)
    return values if leading == 2 else values.unsqueeze(0)


def relaxed_sort_apply(scores: Tensor, x: Tensor, tau: float | Tensor, *, descending: bool = True,
                       hard: bool = False, banded: bool = True, backend: Backend = "auto") -> Tensor:
    """NeuralSort's relaxed sort applied to values, ``P_hat @ x``, without materialising ``P_hat``.

    ``P_hat[i, :] = softmax(((n + 1 - 2i) * s - A_s 1) / tau)`` with ``A_s[j, k] = |s_j - s_k|``: row i (output
    rank i) peaks at the i-th largest score (``descending=False``: the i-th smallest).

    Args:
        scores: ``(n,)`` or ``(B, n)``.
        x: ``(n,)`` or ``(n, d)`` for 1-D scores; ``(B, n)`` or ``(B, n, d)`` for 2-D scores; same dtype and
            device as ``scores``.
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

    Returns:
        A tensor of ``x``'s shape, differentiable with respect to ``scores`` and ``x``. Extra memory is
        O(B * n * d) in both passes (the backward recomputes ``P_hat`` tile by tile).
    """
    scores = _check_scores(scores)
    if isinstance(x, Tensor):
        scores, x = autocast_inputs(scores, x)
    tau = check_tau(tau, scores.device)
    _check_flag("descending", descending)
    _check_flag("hard", hard)
    values = _check_values(scores, x)
    backend = _resolve_backend(backend, scores)
    _check_flag("banded", banded)
    out = SortApply.apply(_as_batch(scores), values, tau, descending, hard, banded, backend)[0]
    return out.reshape(x.shape)


def relaxed_sort_matrix(scores: Tensor, tau: float | Tensor, *, descending: bool = True, hard: bool = False,
                        banded: bool = True, backend: Backend = "auto") -> Tensor:
    """NeuralSort's relaxed permutation matrix ``P_hat``, ``(n, n)`` or ``(B, n, n)`` for scores ``(n,)``/``(B, n)``.

    Row i is a softmax peaking at the i-th largest score (``descending=False``: smallest); rows sum to 1.
    ``hard=True`` returns the exact permutation matrix (stable for ties) with the relaxed gradient.
    With ``banded`` (default) entries below ``e^-(ln(n) + 30)`` of their row's peak are exact zeros (see
    ``relaxed_sort_apply``). Differentiable with respect to ``scores``. Prefer :func:`relaxed_sort_apply` when
    only ``P_hat @ x`` is needed: it never allocates ``n x n``.
    """
    scores = _check_scores(scores)
    (scores,) = autocast_inputs(scores)
    tau = check_tau(tau, scores.device)
    _check_flag("descending", descending)
    _check_flag("hard", hard)
    backend = _resolve_backend(backend, scores)
    _check_flag("banded", banded)
    out = SortMatrix.apply(_as_batch(scores), tau, descending, hard, banded, backend)[0]
    return out if scores.dim() == 2 else out.squeeze(0)
