"""Python launchers of the NeuralSort kernels: shapes in, tensors out, one launch each.

Inputs are prepared by ``triton_sort`` (contiguous, fp32 per-column terms, values of shape ``(B, n, d)``).
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from .configs import KernelConfig, block_d_for, default_config
from .neuralsort import apply_backward_kernel, apply_forward_kernel, matrix_forward_kernel


def kernels_interpreted() -> bool:
    """True when the kernels were defined under ``TRITON_INTERPRET=1`` and so run on CPU tensors."""
    return type(apply_forward_kernel).__name__ == "InterpretedFunction"


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 values keep fp32 accuracy on tensor cores (3xTF32); fp16/bf16 values only need TF32."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def matrix_forward(s2: Tensor, b2: Tensor, sign: float, out_dtype: torch.dtype,
                   config: KernelConfig | None = None) -> Tensor:
    """Materialised relaxed permutation matrices. s2, b2: (B, n) fp32 -> (B, n, n) of ``out_dtype``."""
    batch, n = s2.shape
    out = torch.empty((batch, n, n), device=s2.device, dtype=out_dtype)
    if batch == 0 or n == 0:
        return out
    cfg = config or default_config("matrix_forward")
    grid = (triton.cdiv(n, cfg.block_m), batch)
    matrix_forward_kernel[grid](
        s2, b2, out, n, sign,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def apply_forward(s2: Tensor, b2: Tensor, x: Tensor, sign: float,
                  config: KernelConfig | None = None) -> tuple[Tensor, Tensor]:
    """Streaming P_hat @ x. s2, b2: (B, n) fp32; x: (B, n, d) -> (out (B, n, d) in x.dtype, base-2 lse (B, n))."""
    batch, n, d = x.shape
    out = torch.empty_like(x)
    lse = torch.empty((batch, n), device=x.device, dtype=torch.float32)
    if batch == 0 or n == 0 or d == 0:
        return out, lse
    block_d = block_d_for(d)
    cfg = config or default_config("apply_forward", block_d)
    grid = (triton.cdiv(n, cfg.block_m), batch, triton.cdiv(d, block_d))
    apply_forward_kernel[grid](
        s2, b2, x, out, lse, n, d, sign,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, DOT_PRECISION=dot_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse


def apply_backward(s2: Tensor, b2: Tensor, count: Tensor, x: Tensor, grad: Tensor, lse: Tensor, delta: Tensor,
                   sign: float, config: KernelConfig | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Column pass of the backward. Returns (dx (B, n, d) in x.dtype, u (B, n) fp32, r (B, n) fp32)."""
    batch, n, d = x.shape
    dx = torch.empty_like(x)
    u = torch.zeros((batch, n), device=x.device, dtype=torch.float32)
    r = torch.zeros((batch, n), device=x.device, dtype=torch.float32)
    if batch == 0 or n == 0 or d == 0:
        return dx, u, r
    block_d = block_d_for(d)
    cfg = config or default_config("apply_backward", block_d)
    grid = (triton.cdiv(n, cfg.block_n), batch, triton.cdiv(d, block_d))
    apply_backward_kernel[grid](
        s2, b2, count, x, grad, lse, delta, dx, u, r, n, d, sign,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, DOT_PRECISION=dot_precision(x.dtype),
        SINGLE_D_CHUNK=d <= block_d, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dx, u, r
