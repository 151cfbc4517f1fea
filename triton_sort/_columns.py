"""O(n log n) per-column quantities shared by both backends (see shared/design/MATH.md, sections 1 and 4).

Everything here works on one batch of rows at once: ``scores`` is ``(B, n)``. Nothing is ``n x n``.

Row ``i`` (0-based) of NeuralSort has logits ``z_ij = (c_i s_j - b_j) / tau`` with ``c_i = sign * (n - 1 - 2 i)``
(``sign = +1`` sorts descending, ``-1`` ascending: the ascending matrix is the descending one with its rows
reversed, and ``c_{n-1-i} = -c_i``) and the column term ``b_j = sum_k |s_j - s_k|``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

LOG2_E = 1.4426950408889634


def row_coefficients(n: int, descending: bool, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``c_i = sign * (n - 1 - 2 i)`` for ``i = 0..n-1``; exact in fp32 for n < 2^24. Shape ``(n,)``."""
    c = (n - 1) - 2 * torch.arange(n, device=device, dtype=torch.float64)
    return (c if descending else -c).to(dtype)


@dataclass
class ColumnTerms:
    """Per-column inputs of the kernels, all ``(B, n)``.

    ``centred`` is ``s - median(s)`` (softmax rows are invariant to a constant shift of the scores, since it
    adds ``c_i * shift`` to a whole row; centring keeps ``c_i s_j`` small when scores sit far from zero).
    ``b`` is ``sum_k |s_j - s_k|``; ``order``/``sorted_scores`` the stable ascending sort, used by the
    sign-weighted sums of the backward pass; ``count`` is ``cnt_j = sum_k sign(s_j - s_k)``.
    """

    centred: Tensor
    b: Tensor
    count: Tensor
    sorted_scores: Tensor
    order: Tensor  # stable ascending argsort, (B, n) int64
    less: Tensor  # number of k with s_k < s_j, (B, n) int64
    not_greater: Tensor  # number of k with s_k <= s_j, (B, n) int64


def column_terms(scores: Tensor) -> ColumnTerms:
    """Sort once and compute ``b``, ``cnt`` and the centred scores in float64 (ties need no special case).

    scores: ``(B, n)`` floating tensor, any real dtype. Results are float64 on the scores' device.
    """
    s = scores.detach().to(torch.float64)
    n = s.shape[-1]
    sorted_scores, order = torch.sort(s, dim=-1, stable=True)
    median = sorted_scores[..., n // 2 : n // 2 + 1] if n > 0 else sorted_scores[..., :0]
    t = sorted_scores - median
    # b at ascending position m (1-based): (2m - n) t_m + S_n - 2 S_m, S the prefix sums of sorted scores.
    prefix = torch.cumsum(t, dim=-1)
    positions = torch.arange(1, n + 1, device=s.device, dtype=torch.float64)
    b_sorted = (2 * positions - n) * t + prefix[..., -1:] - 2 * prefix
    b = torch.empty_like(s).scatter_(-1, order, b_sorted)
    less = torch.searchsorted(sorted_scores, s, right=False)
    not_greater = torch.searchsorted(sorted_scores, s, right=True)
    count = (less - (n - not_greater)).to(torch.float64)
    return ColumnTerms(s - median, b, count, sorted_scores, order, less, not_greater)


def signed_sum(terms: ColumnTerms, r: Tensor) -> Tensor:
    """``q_j = sum_k sign(s_j - s_k) r_k`` by prefix sums over the sorted order. r: ``(B, n)`` -> float64."""
    sorted_r = torch.gather(r.to(torch.float64), -1, terms.order)
    prefix = torch.nn.functional.pad(torch.cumsum(sorted_r, dim=-1), (1, 0))
    below = torch.gather(prefix, -1, terms.less)
    above = prefix[..., -1:] - torch.gather(prefix, -1, terms.not_greater)
    return below - above
