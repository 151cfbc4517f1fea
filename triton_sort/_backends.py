"""The two implementations behind the custom ops: PyTorch (row-chunked) and Triton (``triton_sort.kernels``).

Both compute the same three things from the O(n log n) column terms (``_columns``):

- ``matrix_forward``: P_hat, ``(B, n, n)``;
- ``apply_forward``: ``y = P_hat @ x`` and the row log-sum-exp (backend-specific base: natural in PyTorch,
  base 2 in Triton; it only travels from a backend's forward to the same backend's backward);
- ``apply_backward``: ``dx = P_hat^T g`` and the column sums ``u_j = sum_i (c_i - cnt_j) dz_ij``,
  ``r_j = sum_i dz_ij`` with ``dz_ij = P_ij (g_i . x_j - Delta_i)``, ``Delta_i = g_i . y_i``.

``d_scores = (u - signed_sum(r)) / tau`` is assembled by the caller (MATH.md, section 4).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._columns import LOG2_E, ColumnTerms, row_coefficients

# Elements of one (B, rows, n) temporary of the PyTorch path: 2^22 fp32 = 16 MiB, about four of them live at once.
CHUNK_ELEMENTS = 1 << 22


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (for gradcheck); everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_per_chunk(batch: int, n: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, batch * n))


class TorchBackend:
    """Row-chunked PyTorch path: O(B * n * d + chunk * n) memory, no autograd graph over n x n temporaries."""

    name = "torch"

    @staticmethod
    def _inputs(terms: ColumnTerms, tau: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return (terms.centred / tau).to(dtype), (terms.b / tau).to(dtype)

    @staticmethod
    def _logits(c: Tensor, s: Tensor, b: Tensor) -> Tensor:
        """(rows,) x (B, n) x (B, n) -> (B, rows, n) natural-log logits."""
        return torch.addcmul(-b[:, None, :], c[None, :, None], s[:, None, :])

    def matrix_forward(self, terms: ColumnTerms, tau: float, descending: bool, dtype: torch.dtype) -> Tensor:
        work = compute_dtype(dtype)
        s, b = self._inputs(terms, tau, work)
        batch, n = s.shape
        c = row_coefficients(n, descending, work, s.device)
        out = torch.empty((batch, n, n), device=s.device, dtype=dtype)
        step = _rows_per_chunk(batch, n)
        for i0 in range(0, n, step):
            out[:, i0 : i0 + step] = torch.softmax(self._logits(c[i0 : i0 + step], s, b), dim=-1)
        return out

    def apply_forward(self, terms: ColumnTerms, x: Tensor, tau: float, descending: bool) -> tuple[Tensor, Tensor]:
        work = compute_dtype(x.dtype)
        s, b = self._inputs(terms, tau, work)
        batch, n, _ = x.shape
        c = row_coefficients(n, descending, work, s.device)
        xw = x.to(work)
        out = torch.empty_like(x)
        lse = torch.empty((batch, n), device=x.device, dtype=work)
        step = _rows_per_chunk(batch, n)
        for i0 in range(0, n, step):
            z = self._logits(c[i0 : i0 + step], s, b)
            chunk_lse = torch.logsumexp(z, dim=-1)
            p = z.sub_(chunk_lse[..., None]).exp_()
            out[:, i0 : i0 + step] = torch.bmm(p, xw)
            lse[:, i0 : i0 + step] = chunk_lse
        return out, lse

    def apply_backward(self, terms: ColumnTerms, x: Tensor, grad: Tensor, y: Tensor, lse: Tensor, tau: float,
                       descending: bool) -> tuple[Tensor, Tensor, Tensor]:
        work = compute_dtype(x.dtype)
        s, b = self._inputs(terms, tau, work)
        batch, n, _ = x.shape
        c = row_coefficients(n, descending, work, s.device)
        count = terms.count.to(work)
        xw, gw = x.to(work), grad.to(work)
        delta = (gw * y.to(work)).sum(-1)
        dx = torch.zeros_like(xw)
        u = torch.zeros((batch, n), device=x.device, dtype=work)
        r = torch.zeros_like(u)
        step = _rows_per_chunk(batch, n)
        for i0 in range(0, n, step):
            rows = slice(i0, i0 + step)
            p = self._logits(c[rows], s, b).sub_(lse[:, rows, None]).exp_()
            g = gw[:, rows]
            dz = torch.bmm(g, xw.transpose(1, 2)).sub_(delta[:, rows, None]).mul_(p)
            dx.baddbmm_(p.transpose(1, 2), g)
            r += dz.sum(1)
            # Centred form: c_i - cnt_j is small near row i's peak, so no two large sums cancel.
            u += dz.mul_(c[None, rows, None] - count[:, None, :]).sum(1)
        return dx.to(x.dtype), u, r


class TritonBackend:
    """Triton kernels; fp32/fp16/bf16 values with fp32 accumulation."""

    name = "triton"

    @staticmethod
    def _inputs(terms: ColumnTerms, tau: float) -> tuple[Tensor, Tensor]:
        scale = LOG2_E / tau
        return (terms.centred * scale).float().contiguous(), (terms.b * scale).float().contiguous()

    def matrix_forward(self, terms: ColumnTerms, tau: float, descending: bool, dtype: torch.dtype) -> Tensor:
        from .kernels import launch

        s2, b2 = self._inputs(terms, tau)
        return launch.matrix_forward(s2, b2, 1.0 if descending else -1.0, dtype)

    def apply_forward(self, terms: ColumnTerms, x: Tensor, tau: float, descending: bool) -> tuple[Tensor, Tensor]:
        from .kernels import launch

        s2, b2 = self._inputs(terms, tau)
        return launch.apply_forward(s2, b2, x.contiguous(), 1.0 if descending else -1.0)

    def apply_backward(self, terms: ColumnTerms, x: Tensor, grad: Tensor, y: Tensor, lse: Tensor, tau: float,
                       descending: bool) -> tuple[Tensor, Tensor, Tensor]:
        from .kernels import launch

        s2, b2 = self._inputs(terms, tau)
        delta = (grad.float() * y.float()).sum(-1).contiguous()
        return launch.apply_backward(s2, b2, terms.count.float().contiguous(), x.contiguous(), grad.contiguous(),
                                     lse, delta, 1.0 if descending else -1.0)


BACKENDS = {"torch": TorchBackend(), "triton": TritonBackend()}
