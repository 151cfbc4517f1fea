"""Python launchers of the NeuralSort kernels: shapes in, tensors out, one launch each.

Sorted coordinates inside (``triton_sort/_columns.py``), the caller's coordinates outside: values ``x`` by input
item, outputs and their gradients by output row; the kernels fold the permutations into their loads and stores, so
a forward + backward is one ``torch.sort`` and five launches, whatever n is, with no host synchronisation. Lists of
at most ``SHORT_MAX_N`` items take one launch per pass (``short_apply``, ``short_backward``): the same code, one
program per list.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from .configs import SHORT_MAX_N, SHORT_ROW_BLOCK, KernelConfig, block_d_for, launch_config, short_config
from .neuralsort import (
    apply_backward_kernel,
    apply_delta_kernel,
    apply_forward_kernel,
    finish_kernel,
    matrix_forward_kernel,
    prepare_kernel,
    short_backward_kernel,
    short_forward_kernel,
)

# Positions per step of the one-program-per-row kernels (prepare, finish): the smallest of these that holds the row
# (long rows loop over 1024 at a time). Few sizes, so that the compile-only check covers every variant.
ROW_BLOCKS = (64, 256, 1024)


def kernels_interpreted() -> bool:
    """True when the kernels were defined under ``TRITON_INTERPRET=1`` and so run on CPU tensors."""
    return type(apply_forward_kernel).__name__ == "InterpretedFunction"


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 values keep fp32 accuracy on tensor cores (3xTF32); fp16/bf16 values only need TF32."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def bisection_steps(n: int) -> int:
    """Rounds of a bisection over [0, n] that always converge."""
    return max(n, 1).bit_length() + 1


def row_block(n: int) -> int:
    return next((block for block in ROW_BLOCKS if n <= block), ROW_BLOCKS[-1])


def is_short(n: int) -> bool:
    """Lists this long take the one-program-per-list kernels."""
    return 0 < n <= SHORT_MAX_N


def _empty_terms(batch: int, n: int, device: torch.device, lengths: Tensor | None) -> dict[str, Tensor]:
    f64 = {"device": device, "dtype": torch.float64}
    i64 = {"device": device, "dtype": torch.int64}
    return {"t": torch.empty((batch, n), **f64), "w": torch.empty((batch, n), **f64),
            "count": torch.empty((batch, n), **f64), "less": torch.empty((batch, n), **i64),
            "not_greater": torch.empty((batch, n), **i64), "lower": torch.empty((batch, n), **i64),
            "upper": torch.empty((batch, n), **i64),
            "length": torch.empty(batch, **i64) if lengths is None else lengths}


def prepare(sorted_scores: Tensor, order: Tensor, tau: Tensor, banded: bool, values: Tensor | None = None,
            lengths: Tensor | None = None) -> dict[str, Tensor]:
    """The sorted terms of each row from its sorted scores (B, n) (any float dtype), their order (B, n) int64 and
    tau (1,) float64: t, w, count (B, n) float64; less, not_greater, lower, upper (B, n) int64; length (B,) int64.
    ``lengths``: padded lists' real items (sorted first), else every list has n. A list with a non-finite score or
    value (``values`` (B, n, d) by input item, contiguous) gets NaN sorted scores (``_backends.poison_lists``)."""
    batch, n = sorted_scores.shape
    terms = _empty_terms(batch, n, sorted_scores.device, lengths)
    if batch and n:
        d = values.shape[-1] if values is not None else 0
        prepare_kernel[(batch,)](
            sorted_scores, order, sorted_scores if values is None else values, d, tau, terms["length"], terms["t"],
            terms["w"], terms["count"], terms["less"], terms["not_greater"], terms["lower"], terms["upper"], n,
            bisection_steps(n), BLOCK=row_block(n), BANDED=banded, MASKED=lengths is not None, num_warps=4)
    elif lengths is None:
        terms["length"].fill_(n)
    return terms


def matrix_forward(t: Tensor, w: Tensor, lower: Tensor, upper: Tensor, length: Tensor, order: Tensor, tau: Tensor,
                   descending: bool, out_dtype: torch.dtype, config: KernelConfig | None = None) -> Tensor:
    """Relaxed permutation matrices in the caller's coordinates: P[b, output row of p, order[b, m]] for the window
    entries, 0 elsewhere. t, w: (B, n) float64 (sorted, prefix sums); lower, upper, order: (B, n) int64; length:
    (B,) int64."""
    batch, n = t.shape
    out = torch.zeros((batch, n, n), device=t.device, dtype=out_dtype)
    if batch == 0 or n == 0:
        return out
    cfg = config or launch_config("matrix_forward", n=n, d=1, dtype=out_dtype, device=t.device)
    grid = (triton.cdiv(n, cfg.block_m), batch)
    matrix_forward_kernel[grid](
        t, w, lower, upper, length, order, out, n, tau, int(descending),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def apply_forward(t: Tensor, w: Tensor, lower: Tensor, upper: Tensor, length: Tensor, order: Tensor, x: Tensor,
                  tau: Tensor, descending: bool, config: KernelConfig | None = None) -> tuple[Tensor, Tensor]:
    """Streaming P_hat @ x. x: (B, n, d) by input item -> (out (B, n, d) by output row, row sums (B, n) float64 by
    sorted row). d = 0 gives the row sums alone."""
    batch, n, d = x.shape
    out = torch.empty_like(x)
    norm = torch.empty((batch, n), device=x.device, dtype=torch.float64)
    if batch == 0 or n == 0:
        return out, norm
    block_d = block_d_for(d)
    cfg = config or launch_config("apply_forward", n=n, d=d, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, cfg.block_m), batch, max(1, triton.cdiv(d, block_d)))
    apply_forward_kernel[grid](
        t, w, lower, upper, length, order, x, out, norm, n, d, tau, int(descending),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, DOT_PRECISION=dot_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, norm


def apply_delta(t: Tensor, w: Tensor, lower: Tensor, upper: Tensor, length: Tensor, order: Tensor, x: Tensor,
                grad: Tensor, norm: Tensor, tau: Tensor, descending: bool, config: KernelConfig | None = None
                ) -> Tensor:
    """Row pass of the backward: Delta_p = sum_m P_pm (g_p . x_m), (B, n) float64 by sorted row. x by input item,
    grad by output row."""
    batch, n, d = x.shape
    delta = torch.empty((batch, n), device=x.device, dtype=torch.float64)
    if batch == 0 or n == 0 or d == 0:
        return delta.zero_()
    block_d = block_d_for(d)
    cfg = config or launch_config("apply_delta", n=n, d=d, dtype=x.dtype, device=x.device)
    apply_delta_kernel[(triton.cdiv(n, cfg.block_m), batch)](
        t, w, lower, upper, length, order, x, grad, norm, delta, n, d, tau, int(descending),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, DOT_PRECISION=dot_precision(x.dtype),
        SINGLE_D_CHUNK=d <= block_d, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return delta


def apply_backward(t: Tensor, w: Tensor, lower: Tensor, upper: Tensor, length: Tensor, order: Tensor, count: Tensor,
                   x: Tensor, grad: Tensor, norm: Tensor, delta: Tensor, tau: Tensor, descending: bool,
                   need_tau: bool = False, config: KernelConfig | None = None
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Column pass of the backward; norm, delta float64 by sorted row.
    Returns (dx (B, n, d) in x.dtype by input item, u (B, n) and r (B, n) float64 by sorted position, and if
    ``need_tau`` the per-column terms sum_p dz_pm D_p(m) (B, n) float64, else None)."""
    batch, n, d = x.shape
    dx = torch.empty_like(x)
    f64 = {"device": x.device, "dtype": torch.float64}
    u, r = torch.empty((batch, n), **f64), torch.empty((batch, n), **f64)
    tau_terms = torch.empty((batch, n), **f64) if need_tau else None
    if batch == 0 or n == 0 or d == 0:
        return dx.zero_(), u.zero_(), r.zero_(), None if tau_terms is None else tau_terms.zero_()
    block_d = block_d_for(d)
    cfg = config or launch_config("apply_backward", n=n, d=d, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, cfg.block_n), batch, triton.cdiv(d, block_d))
    apply_backward_kernel[grid](
        t, w, lower, upper, length, order, count, x, grad, norm, delta, dx, u, r, tau_terms if need_tau else u, n,
        d, bisection_steps(n), tau, int(descending),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, DOT_PRECISION=dot_precision(x.dtype),
        SINGLE_D_CHUNK=d <= block_d, NEED_TAU=need_tau, TRANSPOSED=False, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return dx, u, r, tau_terms


def apply_transposed(t: Tensor, w: Tensor, lower: Tensor, upper: Tensor, length: Tensor, order: Tensor, v: Tensor,
                     norm: Tensor, tau: Tensor, descending: bool, config: KernelConfig | None = None) -> Tensor:
    """P_hat^T @ v: the column pass alone (``TRANSPOSED``). v: (B, n, d) by output row -> (B, n, d) by input
    item; norm: the row sums, float64 by sorted row (``apply_forward`` with d = 0)."""
    batch, n, d = v.shape
    out = torch.empty_like(v)
    if batch == 0 or n == 0 or d == 0:
        return out.zero_()
    block_d = block_d_for(d)
    cfg = config or launch_config("apply_backward", n=n, d=d, dtype=v.dtype, device=v.device)
    grid = (triton.cdiv(n, cfg.block_n), batch, triton.cdiv(d, block_d))
    apply_backward_kernel[grid](
        t, w, lower, upper, length, order, norm, v, v, norm, norm, out, norm, norm, norm, n, d, bisection_steps(n),
        tau, int(descending),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, DOT_PRECISION=dot_precision(v.dtype),
        SINGLE_D_CHUNK=d <= block_d, NEED_TAU=False, TRANSPOSED=True, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def finish(u: Tensor, r: Tensor, tau_terms: Tensor | None, less: Tensor, not_greater: Tensor, order: Tensor,
           tau: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """(d_scores (B, n) of ``dtype`` by input item, per-row tau terms (B,) float64 or None) from the column sums."""
    batch, n = u.shape
    d_scores = torch.empty((batch, n), device=u.device, dtype=dtype)
    tau_rows = torch.empty(batch, device=u.device, dtype=torch.float64) if tau_terms is not None else None
    if batch == 0 or n == 0:
        return d_scores, None if tau_rows is None else tau_rows.zero_()
    prefix = torch.empty((batch, n + 1), device=u.device, dtype=torch.float64)
    finish_kernel[(batch,)](
        u, r, u if tau_terms is None else tau_terms, less, not_greater, order, prefix, tau, d_scores,
        prefix if tau_rows is None else tau_rows, n, BLOCK=row_block(n), NEED_TAU=tau_terms is not None,
        num_warps=4)
    return d_scores, tau_rows


def short_apply(sorted_scores: Tensor, order: Tensor, x: Tensor, tau: Tensor, banded: bool, descending: bool,
                lengths: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """``prepare`` and ``apply_forward`` in one launch for short lists (``is_short(n)``): (the sorted terms, out
    (B, n, d) by output row, row sums (B, n) float64 by sorted row). x: (B, n, d) by input item, contiguous; it
    also poisons lists with a non-finite value, as ``prepare`` does with ``values``."""
    batch, n, d = x.shape
    terms = _empty_terms(batch, n, x.device, lengths)
    out = torch.empty_like(x)
    norm = torch.empty((batch, n), device=x.device, dtype=torch.float64)
    block_d = block_d_for(d)
    cfg = short_config("apply_forward", block_d)
    short_forward_kernel[(batch,)](
        sorted_scores, order, x, out, norm, terms["length"], terms["t"], terms["w"], terms["count"], terms["less"],
        terms["not_greater"], terms["lower"], terms["upper"], n, d, bisection_steps(n), tau, int(banded),
        int(lengths is not None), int(descending), BLOCK=SHORT_ROW_BLOCK, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_D=block_d, DOT_PRECISION=dot_precision(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return terms, out, norm


def short_backward(t: Tensor, w: Tensor, lower: Tensor, upper: Tensor, length: Tensor, order: Tensor, count: Tensor,
                   less: Tensor, not_greater: Tensor, x: Tensor, grad: Tensor, norm: Tensor, tau: Tensor,
                   descending: bool, need_tau: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """``apply_delta``, ``apply_backward`` and ``finish`` in one launch for short lists (d >= 1): (d_scores (B, n)
    in x.dtype by input item, dx (B, n, d) by input item, per-row tau terms (B,) float64 or None)."""
    batch, n, d = x.shape
    dx = torch.empty_like(x)
    f64 = {"device": x.device, "dtype": torch.float64}
    delta, u, r = (torch.empty((batch, n), **f64) for _ in range(3))
    tau_terms = torch.empty((batch, n), **f64)
    prefix = torch.empty((batch, n + 1), **f64)
    d_scores = torch.empty((batch, n), device=x.device, dtype=x.dtype)
    tau_rows = torch.empty(batch, **f64)  # written always (one compiled variant), returned if need_tau
    block_d = block_d_for(d)
    cfg = short_config("apply_backward", block_d)
    short_backward_kernel[(batch,)](
        t, w, lower, upper, length, order, count, less, not_greater, x, grad, norm, delta, dx, u, r, tau_terms,
        prefix, d_scores, tau_rows, n, d, bisection_steps(n), tau, int(descending),
        BLOCK=SHORT_ROW_BLOCK, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        DOT_PRECISION=dot_precision(x.dtype), SINGLE_D_CHUNK=d <= block_d, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return d_scores, dx, tau_rows if need_tau else None
