"""Float64 dense reference, per-dtype tolerances and comparison helpers shared by the tests."""

from __future__ import annotations

import torch

from triton_sort.reference import dense_sort_matrix

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ("torch", "triton")

# Relative error (norm of the difference over the norm of the reference) allowed per input dtype, stated once.
# fp32 is held to 1e-6 at any n and tau: the logits are never formed at their full size n * |s| / tau (drops
# from float64 prefix sums, float64 accumulation across tiles). fp16/bf16: their own rounding of inputs and output.
BASE_TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-6,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}
DTYPES = tuple(BASE_TOLERANCE)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def dense_reference(scores: torch.Tensor, tau: float, descending: bool = True) -> torch.Tensor:
    """The paper's formula, verbatim and in float64 (``triton_sort.reference``): P_hat (..., n, n)."""
    return dense_sort_matrix(scores.to(torch.float64), tau, descending)


def tolerance(dtype: torch.dtype) -> float:
    return BASE_TOLERANCE[dtype]


def relative_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """||actual - expected|| / max(||expected||, floor), in float64.

    ``floor`` is the natural size of a quantity that can be small by cancellation (see ``scores_grad_floor``)."""
    expected = expected.detach().to(torch.float64)
    diff = float((actual.detach().to(torch.float64) - expected).norm())
    scale = max(float(expected.norm()), floor)
    return diff / scale if scale > 0 else diff


def scores_grad_floor(grad_out: torch.Tensor, x: torch.Tensor, tau: float) -> float:
    """Size of the terms whose differences make up d_scores: P_ij (g_i . x_j - Delta_i) c / tau. When P_hat is
    nearly a permutation those differences, and so the gradient, are tiny next to the terms."""
    n = max(1, x.shape[0] if x.dim() == 1 else x.shape[-2] if x.dim() == 3 else x.shape[-1])
    return float(grad_out.detach().norm() * x.detach().norm()) / (tau * n**0.5)


def backend_available(backend: str, dtype: torch.dtype) -> bool:
    return not (backend == "triton" and dtype == torch.float64)


def use_torch_chunks(monkeypatch, entries: int = 0) -> None:
    """The PyTorch path's chunked evaluation instead of its one shot, at any size: batch chunks of at most
    ``entries`` (list, row, column) entries, or (0) windowed row blocks."""
    from triton_sort import _backends

    for limit in ("DENSE_ELEMENTS", "ONE_SHOT_ELEMENTS", "CPU_ONE_SHOT_ELEMENTS", "LEAN_MATRIX_ELEMENTS"):
        monkeypatch.setattr(_backends, limit, entries)
