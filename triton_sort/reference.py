"""Dense reference implementation of NeuralSort, written as users write it today (materialises n x n).

Used as the ground truth of the tests (in float64) and as the baseline of the benchmarks. O(n^2) memory.
"""

from __future__ import annotations

import torch
from torch import Tensor


def dense_sort_matrix(scores: Tensor, tau: float, descending: bool = True) -> Tensor:
    """The paper's Eq. 5 verbatim: P_hat (..., n, n) from scores (..., n), with an explicit |s_j - s_k| matrix."""
    n = scores.shape[-1]
    i = torch.arange(1, n + 1, dtype=scores.dtype, device=scores.device)
    c = n + 1 - 2 * i
    if not descending:
        c = -c
    a_s = (scores[..., :, None] - scores[..., None, :]).abs()
    logits = c[:, None] * scores[..., None, :] - a_s.sum(-1)[..., None, :]
    return torch.softmax(logits / tau, dim=-1)


def dense_sort_apply(scores: Tensor, x: Tensor, tau: float, descending: bool = True) -> Tensor:
    """P_hat @ x with the materialised matrix; x is (..., n) or (..., n, d) like ``relaxed_sort_apply``."""
    p = dense_sort_matrix(scores, tau, descending)
    if x.dim() == scores.dim():
        return (p @ x.unsqueeze(-1)).squeeze(-1)
    return p @ x
