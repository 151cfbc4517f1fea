"""Python launchers of the NeuralSort kernels: shapes in, tensors out, one launch each (sorted coordinates).

Inputs are prepared by ``triton_sort`` (contiguous, fp32 per-column terms, values of shape ``(B, n, d)``).
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from .configs import KernelConfig, block_d_for, launch_config
from .neuralsort import apply_backward_kernel, apply_delta_kernel, apply_forward_kernel, matrix_forward_kernel


def kernels_interpreted() -> bool:
    """True when the kernels were defined under ``TRITON_INTERPRET=1`` and so run on CPU tensors."""
    return type(apply_forward_kernel).__name__ == "InterpretedFunction"


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 values keep fp32 accuracy on tensor cores (3xTF32); fp16/bf16 values only need TF32."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def matrix_forward(t: Tensor, w: Tensor, lower: Tensor, upper: Tensor, order: Tensor, out_row: Tensor, scale: Tensor,
                   out_dtype: torch.dtype, config: KernelConfig | None = None) -> Tensor:
    """Relaxed permutation matrices in the caller's coordinates: P[b, out_row[p], order[b, m]] for the window
    entries, 0 elsewhere. t, w: (B, n) float64 (sorted, prefix sums); lower, upper, order: (B, n) int32."""
    batch, n = t.shape
    out = torch.zeros((batch, n, n), device=t.device, dtype=out_dtype)
    if batch == 0 or n == 0:
        return out
    cfg = config or launch_config("matrix_forward", n=n, d=1, dtype=out_dtype, device=t.device)
    grid = (triton.cdiv(n, cfg.block_m), batch)
    matrix_forward_kernel[grid](
        t, w, lower, upper, order, out_row, out, n, scale,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def apply_forward(t: Tensor, w: Tensor, lower: Tensor, upper: Tensor, x: Tensor, scale: Tensor,
                  config: KernelConfig | None = None) -> tuple[Tensor, Tensor]:
    """Streaming P_hat @ x in sorted coordinates. x: (B, n, d) sorted -> (out (B, n, d), row sums (B, n) float64)."""
    batch, n, d = x.shape
    out = torch.empty_like(x)
    norm = torch.empty((batch, n), device=x.device, dtype=torch.float64)
    if batch == 0 or n == 0 or d == 0:
        return out, norm
    block_d = block_d_for(d)
    cfg = config or launch_config("apply_forward", n=n, d=d, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, cfg.block_m), batch, triton.cdiv(d, block_d))
    apply_forward_kernel[grid](
        t, w, lower, upper, x, out, norm, n, d, scale,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, DOT_PRECISION=dot_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, norm


def apply_delta(t: Tensor, w: Tensor, lower: Tensor, upper: Tensor, x: Tensor, grad: Tensor, norm: Tensor,
                scale: Tensor, config: KernelConfig | None = None) -> Tensor:
    """Row pass of the backward: Delta_p = sum_m P_pm (g_p . x_m), (B, n) float64, sorted coordinates."""
    batch, n, d = x.shape
    delta = torch.zeros((batch, n), device=x.device, dtype=torch.float64)
    if batch == 0 or n == 0 or d == 0:
        return delta
    block_d = block_d_for(d)
    cfg = config or launch_config("apply_delta", n=n, d=d, dtype=x.dtype, device=x.device)
    apply_delta_kernel[(triton.cdiv(n, cfg.block_m), batch)](
        t, w, lower, upper, x, grad, norm, delta, n, d, scale,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, DOT_PRECISION=dot_precision(x.dtype),
        SINGLE_D_CHUNK=d <= block_d, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return delta


def apply_backward(t: Tensor, w: Tensor, lower: Tensor, upper: Tensor, count: Tensor, x: Tensor, grad: Tensor,
                   norm: Tensor, delta: Tensor, scale: Tensor, need_tau: bool = False,
                   config: KernelConfig | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Column pass of the backward in sorted coordinates; norm, delta float64.
    Returns (dx (B, n, d) in x.dtype, u (B, n) float64, r (B, n) float64, and if ``need_tau`` the per-column terms
    sum_p dz_pm D_p(m) (B, n) float64, else None)."""
    batch, n, d = x.shape
    dx = torch.empty_like(x)
    u = torch.zeros((batch, n), device=x.device, dtype=torch.float64)
    r = torch.zeros((batch, n), device=x.device, dtype=torch.float64)
    tau_terms = torch.zeros((batch, n), device=x.device, dtype=torch.float64) if need_tau else None
    if batch == 0 or n == 0 or d == 0:
        return dx.zero_(), u, r, tau_terms
    block_d = block_d_for(d)
    cfg = config or launch_config("apply_backward", n=n, d=d, dtype=x.dtype, device=x.device)
    # Rows whose windows reach column tile [m0, m1]: R_p >= m0 and L_p <= m1 (both non-decreasing in p).
    tile_first = torch.arange(0, n, cfg.block_n, device=x.device, dtype=lower.dtype).expand(batch, -1)
    tile_last = (tile_first + cfg.block_n - 1).clamp_(max=n - 1)
    row_start = torch.searchsorted(upper, tile_first.contiguous()).to(torch.int32)
    row_end = torch.searchsorted(lower, tile_last.contiguous(), right=True).to(torch.int32)
    grid = (tile_first.shape[1], batch, triton.cdiv(d, block_d))
    apply_backward_kernel[grid](
        t, w, lower, upper, row_start, row_end, count, x, grad, norm, delta, dx, u, r,
        tau_terms if need_tau else u, n, d, tile_first.shape[1], scale,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, DOT_PRECISION=dot_precision(x.dtype),
        SINGLE_D_CHUNK=d <= block_d, NEED_TAU=need_tau, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dx, u, r, tau_terms
