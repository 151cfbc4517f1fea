"""O(n log n) preparation shared by both backends: NeuralSort in sorted coordinates (shared/design/MATH.md).

Sort each row of scores ascending, ``t_0 <= ... <= t_{n-1}`` (positions ``m``). The row of ``P_hat`` that peaks
at sorted position ``p`` has coefficient ``c = 2p - n + 1`` whichever the direction (descending output row
``i = n - 1 - p``, ascending ``i = p``), and its logits, as a function of the column's sorted position ``m``, are

    z_p(m) = z_p(p) - D_p(m) / tau,    D_p(m) = (2p - 1)(t_p - t_m) - 2 (W_p - W_m),    W_m = sum_{q<m} q g_q

with gaps ``g_q = t_{q+1} - t_q``. ``D_p(m) >= 0`` is the drop below the row's peak: a sum of positive terms
``(2|q - p| +- 1) g_q`` between ``p`` and ``m``, so each row's softmax is ``exp(-D_p / tau) / sum_m exp(-D_p / tau)``
with its maximum, exactly 1, at ``m = p``. No logit of size ``n * |s| / tau`` is ever formed: this is what keeps
fp32 results exact to float64 precision at any n. Ties need no special case (zero gaps).

Banding: ``D_p`` grows at least linearly away from ``p`` and is monotone, so the columns with
``D_p(m) <= T * tau``, ``T = ln(n) + 30``, form one window ``[L_p, R_p]``; every other column weighs less than
``e^-T`` of the peak, all of them together less than ``n e^-T = e^-30`` of the row's mass. ``L_p`` and ``R_p`` are
non-decreasing in ``p``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Drops beyond ln(n) + BAND_MARGIN (in units of tau) are left out: their total weight is below e^-BAND_MARGIN.
BAND_MARGIN = 30.0


def band_threshold(n: int) -> float:
    """T = ln(n) + 30: columns whose logit is more than T below the row's peak are left out."""
    return math.log(max(n, 1)) + BAND_MARGIN


@dataclass
class SortedTerms:
    """Everything the kernels need, per batch row, in sorted coordinates. All tensors are ``(B, n)``.

    ``t`` (sorted scores minus their median; a shift leaves every row's softmax unchanged) and ``w`` (prefix sums
    ``W_m``) are float64. ``count`` is ``cnt_m = sum_k sign(t_m - t_k)`` (float64); ``lower``/``upper`` are the
    inclusive column windows ``[L_p, R_p]`` of each row (int64; ``(B, 0)`` when the evaluation is dense and needs
    none). ``order`` maps sorted positions to input
    indices; ``less``/``not_greater`` count scores below / not above each sorted position (for ties).
    """

    order: Tensor
    t: Tensor
    w: Tensor
    count: Tensor
    less: Tensor
    not_greater: Tensor
    lower: Tensor
    upper: Tensor
    length: Tensor
    masked: bool = False

    @property
    def n(self) -> int:
        return self.t.shape[-1]

    def tensors(self) -> tuple[Tensor, ...]:
        """The tensor fields in order: what a custom op returns so that the backward reuses the forward's terms."""
        return tuple(getattr(self, name) for name in TENSOR_FIELDS)

    def lists(self, start: int, stop: int) -> SortedTerms:
        """The terms of lists [start, stop) (views)."""
        if (start, stop) == (0, self.t.shape[0]):
            return self
        return SortedTerms(*(getattr(self, name)[start:stop] for name in TENSOR_FIELDS), masked=self.masked)

    def valid(self) -> Tensor:
        """(B, n) bool: sorted position p holds a real item (p < length). Computed once per terms object."""
        cached = self.__dict__.get("_valid")
        if cached is None:
            cached = self.__dict__["_valid"] = index_positions(self.n, self.t.device)[None, :] < self.length[:, None]
        return cached

    def output_index(self) -> Tensor:
        """``output_index(length, n)``, computed once per terms object."""
        cached = self.__dict__.get("_output_index")
        if cached is None:
            cached = self.__dict__["_output_index"] = output_index(self.length, self.n)
        return cached


TENSOR_FIELDS = tuple(field.name for field in dataclasses.fields(SortedTerms) if field.name != "masked")


def drop(terms: SortedTerms, rows: Tensor, cols: Tensor) -> Tensor:
    """D_p(m) in float64 for broadcastable index tensors ``rows`` (p) and ``cols`` (m) of shape (B, ...)."""
    t_p, w_p = _take(terms.t, rows), _take(terms.w, rows)
    t_m, w_m = _take(terms.t, cols), _take(terms.w, cols)
    return (2 * rows - 1).to(torch.float64) * (t_p - t_m) - 2 * (w_p - w_m)


def _take(values: Tensor, index: Tensor) -> Tensor:
    """values (B, n) gathered at index (B, ...)."""
    flat = index.flatten(1) if index.dim() > 1 else index
    return torch.gather(values, 1, flat).reshape(index.shape)


def sorted_terms(scores: Tensor, tau: float | Tensor, banded: bool = True, windows: bool = True,
                 mask: Tensor | None = None) -> SortedTerms:
    """Sort once, prefix sums in float64, windows by binary search: O(B n log n). scores: (B, n).

    ``tau``: a float or a 0-d float64 tensor. ``windows=False`` leaves ``lower``/``upper`` empty, ``(B, 0)``: the
    dense evaluations need no windows (they mask the band's drops directly), and skipping the binary search saves
    ~2 log2(n) small operations per call. ``mask`` (B, n) bool, True for real items: padded lists (see
    ``SortedTerms``)."""
    s = scores.detach().to(torch.float64)
    batch, n = s.shape
    if mask is None:
        t, order = torch.sort(s, dim=-1, stable=True)
        length = torch.full((batch,), n, dtype=torch.int64, device=s.device)
        if n:
            t = t - t[:, n // 2 : n // 2 + 1]
    else:
        # Padding sorts last (a real NaN/inf, possible with validation off, poisons its list anyway).
        key, order = torch.sort(torch.where(mask, s, float("inf")), dim=-1, stable=True)
        length = mask.sum(-1)
        valid = index_positions(n, s.device)[None, :] < length[:, None]
        median = torch.gather(key, 1, (length // 2).clamp(max=max(n - 1, 0))[:, None]) if n else key
        t = torch.where(valid, key - median, 0.0)
    # W_m = sum_{q<m} q g_q = sum_{j<=m} (j - 1)(t_j - t_{j-1}), the j = 0 term 0 (a zero gap, prepended).
    w = torch.cumsum(positions(n, s.device, 1, -1) * torch.diff(t, dim=-1, prepend=t[:, :1]), dim=-1) if n else None
    w = t.clone() if w is None else w  # (an empty list's: distinct from t, as a custom op's outputs must be)
    searched = t if mask is None else torch.where(valid, t, float("inf"))  # ties among the real items only
    less = torch.searchsorted(searched, searched, right=False)
    not_greater = torch.searchsorted(searched, searched, right=True)
    if mask is None:
        count = (less + not_greater).to(torch.float64).sub_(n)
    else:
        less, not_greater = torch.where(valid, less, 0), torch.where(valid, not_greater, n)
        count = (less + not_greater - length[:, None]).to(torch.float64)
    # Distinct empty tensors: a custom op's outputs may not alias each other.
    terms = SortedTerms(order, t, w, count, less, not_greater, lower=order.new_empty((batch, 0)),
                        upper=order.new_empty((batch, 0)), length=length, masked=mask is not None)
    if mask is not None:
        terms.__dict__["_valid"] = valid
    if not windows:
        return terms
    rows = torch.arange(n, device=s.device).expand(batch, n)
    last = (length - 1).clamp(min=0)[:, None]
    if not banded:
        lower, upper = torch.zeros_like(rows), last.expand(batch, n).clone()
    else:
        lower, upper = _windows(terms, rows, band_threshold(n) * tau, last)
    if mask is not None:  # padded rows: empty windows [m, m - 1] (bounds stay non-decreasing in p)
        lower = torch.where(valid, lower, length[:, None])
        upper = torch.where(valid, upper, length[:, None] - 1)
    return dataclasses.replace(terms, lower=lower, upper=upper)


_POSITIONS: dict[tuple[int, str, float, float], Tensor] = {}


def positions(n: int, device: torch.device, scale: float = 1, shift: float = 0) -> Tensor:
    """``scale * p + shift`` for ``p = 0, 1, ..., n - 1`` in float64, cached per (n, device, scale, shift): a fresh
    arange is one more kernel launch per call. Never written to. Traced (torch.compile), it is made afresh inside
    the graph: reading the cache would guard on its size, which eager calls elsewhere change (a recompilation)."""
    if torch.compiler.is_compiling():
        return _scaled_arange(n, device, scale, shift)
    key = (n, str(device), scale, shift)
    cached = _POSITIONS.get(key)
    if cached is None:
        if len(_POSITIONS) > 256:
            _POSITIONS.clear()
        cached = _POSITIONS[key] = _scaled_arange(n, device, scale, shift)
    return cached


def _scaled_arange(n: int, device: torch.device, scale: float, shift: float) -> Tensor:
    p = torch.arange(max(n, 0), device=device, dtype=torch.float64)
    return p.mul_(scale).add_(shift) if (scale, shift) != (1, 0) else p


def _windows(terms: SortedTerms, rows: Tensor, limit: float | Tensor, last: Tensor) -> tuple[Tensor, Tensor]:
    """Per row p, the first and last column m <= last (B, 1) with D_p(m) <= limit (binary search; D_p is
    monotone). Both searches run at once on (B, 2n) (the first n entries look for L_p in [0, p], the last n for
    R_p in [p, last]), loop invariants outside the loop: 15 small operations per step, log2(n) + 1 steps."""
    n = terms.n
    upper = torch.cat([torch.zeros_like(rows), torch.ones_like(rows)], 1)  # 1 on the R_p half: mid rounds up
    lo = torch.cat([torch.zeros_like(rows), rows], 1)
    hi = torch.cat([rows, last.expand_as(rows)], 1)
    t_p, w_p = terms.t.repeat(1, 2), terms.w.repeat(1, 2)
    slope = positions(n, terms.t.device, 2, -1).repeat(2)  # 2p - 1, as in ``drop``
    for _ in range(max(n, 1).bit_length()):
        mid = (lo + hi).add_(upper).floor_divide_(2)
        drops = (t_p - torch.gather(terms.t, 1, mid)).mul_(slope).sub_(w_p - torch.gather(terms.w, 1, mid),
                                                                       alpha=2)
        # L_p: inside -> hi = mid, else lo = mid + 1. R_p: inside -> lo = mid, else hi = mid - 1.
        move_hi = (drops <= limit).ne_(upper)
        below = mid - upper
        hi = torch.where(move_hi, below, hi)
        lo = torch.where(move_hi, lo, below.add_(1))
    return hi[:, :n], lo[:, n:]


def signed_sum(terms: SortedTerms, r: Tensor) -> Tensor:
    """``q_m = sum_k sign(t_m - t_k) r_k`` by prefix sums in sorted order. r: (B, n) sorted -> (B, n) float64."""
    r = r.to(torch.float64)
    prefix = torch.cumsum(torch.cat([r.new_zeros(()).expand(*r.shape[:-1], 1), r], dim=-1), dim=-1)
    # below - above = P[less] - (P[n] - P[not_greater])
    return (torch.gather(prefix, -1, terms.less) + torch.gather(prefix, -1, terms.not_greater)).sub_(prefix[..., -1:])


_INDEX_POSITIONS: dict[tuple[int, str], Tensor] = {}


def index_positions(n: int, device: torch.device) -> Tensor:
    """``0, 1, ..., n - 1`` as int64, cached like ``positions`` (and, like it, made afresh when traced). Never
    written to."""
    if torch.compiler.is_compiling():
        return torch.arange(max(n, 0), device=device)
    key = (n, str(device))
    cached = _INDEX_POSITIONS.get(key)
    if cached is None:
        if len(_INDEX_POSITIONS) > 256:
            _INDEX_POSITIONS.clear()
        cached = _INDEX_POSITIONS[key] = torch.arange(max(n, 0), device=device)
    return cached


def output_index(length: Tensor, n: int) -> Tensor:
    """For descending padded lists: the output row of each sorted row p, ``m - 1 - p`` for real rows and ``p`` for
    padded ones (their output rows are zero). (B, n) int64, an involution (also the sorted row of each output row).
    """
    rows = index_positions(n, length.device)[None, :]
    return torch.where(rows < length[:, None], length[:, None] - 1 - rows, rows)
