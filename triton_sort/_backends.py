"""The two implementations behind the custom ops: PyTorch (row-chunked) and Triton (``triton_sort.kernels``).

Both work in sorted coordinates (``_columns``): row ``p`` of ``P_hat`` peaks at sorted column ``p`` and weighs
column ``m`` by ``exp(-D_p(m) / tau)`` inside its window ``[L_p, R_p]`` (0 outside), normalised by the row sum
``l_p >= 1``. Values and gradients arrive already permuted to sorted order (``ops`` does that). Each backend gives

- ``matrix_forward``: ``P_hat`` in the caller's coordinates, ``(B, n, n)``;
- ``apply_forward``: ``y_p = sum_m P_pm x_m`` and the row normaliser (as a log; natural in PyTorch, base 2 in
  Triton: it only travels from a backend's forward to the same backend's backward);
- ``apply_backward``: ``dx_m = sum_p P_pm g_p`` and the column sums ``u_m = sum_p (c_p - cnt_m) dz_pm``,
  ``r_m = sum_p dz_pm`` with ``dz_pm = P_pm (g_p . x_m - Delta_p)``, ``Delta_p = g_p . y_p``, ``c_p = 2p - n + 1``.

``d_scores = (u - signed_sum(r)) / tau`` is assembled by the caller (MATH.md, section 4).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._columns import LOG2_E, SortedTerms, output_rows

# Elements of one (B, rows, window) temporary of the PyTorch path; about five of them (float64 drops included)
# are alive at once, so a chunk costs at most ~100 MiB whatever n is.
CHUNK_ELEMENTS = 1 << 21


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (for gradcheck); everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class TorchBackend:
    """Row-chunked PyTorch path: O(B * n * d + chunk) memory, no autograd graph over the temporaries.

    Drops are computed in float64 (they are differences of float64 prefix sums); weights and products in the
    values' precision (fp32 for fp32/fp16/bf16)."""

    name = "torch"

    @staticmethod
    def _blocks(terms: SortedTerms) -> list[tuple[int, int, int]]:
        """Row blocks (p0, p1, width): rows p0..p1-1 read the columns [L_p0, R_{p1-1}] of width <= width."""
        batch, n = terms.t.shape
        if batch == 0 or n == 0:
            return []
        widest = int((terms.upper - terms.lower).max()) + 1
        step = max(1, CHUNK_ELEMENTS // max(1, batch * widest))
        starts = list(range(0, n, step))
        ends = [min(start + step, n) for start in starts]
        widths = (terms.upper[:, [e - 1 for e in ends]] - terms.lower[:, starts] + 1).amax(0).tolist()
        return list(zip(starts, ends, widths, strict=True))

    @staticmethod
    def _weights(terms: SortedTerms, p0: int, p1: int, width: int, tau: float,
                 dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """exp(-D/tau) of rows p0..p1-1 over their block's columns, 0 outside each row's window.

        Returns (weights (B, rows, width), columns (B, width), clamped to n - 1 past the window)."""
        n = terms.n
        cols = terms.lower[:, p0 : p0 + 1] + torch.arange(width, device=terms.t.device)
        cols = cols.clamp_(max=n - 1)
        rows = torch.arange(p0, p1, device=terms.t.device, dtype=torch.float64)
        t_m = torch.gather(terms.t, 1, cols)[:, None, :]
        w_m = torch.gather(terms.w, 1, cols)[:, None, :]
        d = (terms.t[:, p0:p1, None] - t_m).mul_((2 * rows - 1)[None, :, None])
        d.sub_((terms.w[:, p0:p1, None] - w_m).mul_(2))
        weights = d.mul_(-1.0 / tau).to(dtype).exp_()
        inside = (cols[:, None, :] >= terms.lower[:, p0:p1, None]) & (cols[:, None, :] <= terms.upper[:, p0:p1, None])
        return weights.mul_(inside), cols

    def matrix_forward(self, terms: SortedTerms, tau: float, descending: bool, dtype: torch.dtype) -> Tensor:
        work = compute_dtype(dtype)
        batch, n = terms.t.shape
        out = torch.zeros((batch, n, n), device=terms.t.device, dtype=dtype)
        rank = torch.empty_like(terms.order).scatter_(1, terms.order, torch.arange(n, device=terms.t.device)
                                                      .expand(batch, n))
        out_row = output_rows(n, descending, terms.t.device)
        for p0, p1, width in self._blocks(terms):
            weights, cols = self._weights(terms, p0, p1, width, tau, work)
            block = torch.zeros((batch, p1 - p0, n), device=terms.t.device, dtype=work)
            block.scatter_add_(2, cols[:, None, :].expand_as(weights), weights)
            block /= block.sum(-1, keepdim=True)
            out[:, out_row[p0:p1]] = torch.gather(block, 2, rank[:, None, :].expand_as(block)).to(dtype)
        return out

    def apply_forward(self, terms: SortedTerms, x: Tensor, tau: float) -> tuple[Tensor, Tensor]:
        work = compute_dtype(x.dtype)
        batch, n, d = x.shape
        xw = x.to(work)
        out = torch.empty_like(x)
        log_norm = torch.empty((batch, n), device=x.device, dtype=work)
        for p0, p1, width in self._blocks(terms):
            weights, cols = self._weights(terms, p0, p1, width, tau, work)
            norm = weights.sum(-1)
            x_cols = torch.gather(xw, 1, cols[..., None].expand(batch, width, d))
            out[:, p0:p1] = (torch.bmm(weights, x_cols) / norm[..., None]).to(x.dtype)
            log_norm[:, p0:p1] = norm.log()
        return out, log_norm

    def apply_backward(self, terms: SortedTerms, x: Tensor, grad: Tensor, y: Tensor, log_norm: Tensor,
                       tau: float) -> tuple[Tensor, Tensor, Tensor]:
        work = compute_dtype(x.dtype)
        batch, n, d = x.shape
        xw, gw = x.to(work), grad.to(work)
        delta = (gw * y.to(work)).sum(-1)
        count = terms.count.to(work)
        coefficient = 2 * torch.arange(n, device=x.device, dtype=work) - (n - 1)  # c_p in sorted coordinates
        dx = torch.zeros_like(xw)
        u = torch.zeros((batch, n), device=x.device, dtype=work)
        r = torch.zeros_like(u)
        for p0, p1, width in self._blocks(terms):
            weights, cols = self._weights(terms, p0, p1, width, tau, work)
            p = weights.div_(log_norm[:, p0:p1, None].exp())
            x_cols = torch.gather(xw, 1, cols[..., None].expand(batch, width, d))
            g = gw[:, p0:p1]
            dz = torch.bmm(g, x_cols.transpose(1, 2)).sub_(delta[:, p0:p1, None]).mul_(p)
            dx.scatter_add_(1, cols[..., None].expand(batch, width, d), torch.bmm(p.transpose(1, 2), g))
            r.scatter_add_(1, cols, dz.sum(1))
            # Centred form: c_p - cnt_m is small near the peak, so no two large sums cancel.
            centred = coefficient[None, p0:p1, None] - torch.gather(count, 1, cols)[:, None, :]
            u.scatter_add_(1, cols, dz.mul_(centred).sum(1))
        return dx.to(x.dtype), u, r


class TritonBackend:
    """Triton kernels; fp32/fp16/bf16 values with fp32 accumulation, drops in float64 (see kernels/)."""

    name = "triton"

    @staticmethod
    def _inputs(terms: SortedTerms) -> dict[str, Tensor]:
        return {"t": terms.t.contiguous(), "w": terms.w.contiguous(), "lower": terms.lower.to(torch.int32),
                "upper": terms.upper.to(torch.int32)}

    def matrix_forward(self, terms: SortedTerms, tau: float, descending: bool, dtype: torch.dtype) -> Tensor:
        from .kernels import launch

        out_row = output_rows(terms.n, descending, terms.t.device).to(torch.int32)
        return launch.matrix_forward(**self._inputs(terms), order=terms.order.to(torch.int32),
                                     out_row=out_row, scale=LOG2_E / tau, out_dtype=dtype)

    def apply_forward(self, terms: SortedTerms, x: Tensor, tau: float) -> tuple[Tensor, Tensor]:
        from .kernels import launch

        return launch.apply_forward(**self._inputs(terms), x=x.contiguous(), scale=LOG2_E / tau)

    def apply_backward(self, terms: SortedTerms, x: Tensor, grad: Tensor, y: Tensor, log_norm: Tensor,
                       tau: float) -> tuple[Tensor, Tensor, Tensor]:
        from .kernels import launch

        delta = (grad.float() * y.float()).sum(-1).contiguous()
        return launch.apply_backward(**self._inputs(terms), count=terms.count.float().contiguous(),
                                     x=x.contiguous(), grad=grad.contiguous(), log_norm=log_norm, delta=delta,
                                     scale=LOG2_E / tau)


BACKENDS = {"torch": TorchBackend(), "triton": TritonBackend()}
