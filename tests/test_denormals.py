"""No subnormal number is formed on the PyTorch path: CPUs compute exp near the bottom of its range, and products
with subnormal operands or results, on a slow path (10x-40x per operation; at tau = 0.1 the lean path ran 6x-12x
slower at (64, 100) before its logits were clamped at ``EXP_FLOOR`` at every size). Every floating-point tensor
that any aten operation returns during a forward + backward is watched, on each of the path's evaluations (lean,
batch chunks, row blocks), at temperatures down to 0.01, for fp32 inputs of ordinary size."""

from __future__ import annotations

import math

import pytest
import torch
from reference import use_torch_chunks
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from triton_sort import _backends, _columns, _one_shot, relaxed_sort_apply, relaxed_sort_matrix


class SubnormalWatch(TorchDispatchMode):
    """Records the aten operations whose floating-point outputs hold a subnormal number."""

    def __init__(self):
        super().__init__()
        self.culprits: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.numel():
                size = tensor.abs()
                if bool(((size > 0) & (size < torch.finfo(tensor.dtype).tiny)).any()):
                    self.culprits.append(str(func))
        return out


def _watched_step(batch: int, n: int, d: int, tau: float, seed: int = 0, **options) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, n, generator=gen).requires_grad_()
    x = torch.randn(batch, n, d, generator=gen).requires_grad_()
    grad = torch.randn(batch, n, d, generator=gen)
    with SubnormalWatch() as watch:
        relaxed_sort_apply(scores, x, tau, **options).backward(grad)
    assert scores.grad is not None and bool(scores.grad.isfinite().all())
    return watch.culprits


@pytest.mark.parametrize("tau", [1.0, 0.1, 0.01])
@pytest.mark.parametrize(("batch", "n", "d"), [(1, 8, 1), (4, 100, 16), (2, 257, 1)])
@pytest.mark.parametrize("path", ["lean", "chunks", "rows"])
def test_no_subnormal_is_formed(monkeypatch, path, batch, n, d, tau):
    if path == "chunks":
        use_torch_chunks(monkeypatch, entries=2 * n * n)  # batch chunks of two lists
    elif path == "rows":
        use_torch_chunks(monkeypatch)
    assert not _watched_step(batch, n, d, tau)


@pytest.mark.parametrize("path", ["lean", "rows"])
def test_no_subnormal_is_formed_for_padded_lists_and_tau_gradients(monkeypatch, path):
    if path == "rows":
        use_torch_chunks(monkeypatch)
    mask = torch.rand(3, 60, generator=torch.Generator().manual_seed(1)) < 0.7
    assert not _watched_step(3, 60, 4, 0.05, mask=mask)
    tau = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    assert not _watched_step(3, 60, 4, tau)  # type: ignore[arg-type]
    assert tau.grad is not None and math.isfinite(tau.grad.item())


def test_weights_stay_above_the_floor_or_are_exactly_zero():
    """The floors themselves: the lean weights (float64, normalised) are >= e^floor / n; the blocks' weights
    (fp32 or float64, not normalised) are >= e^floor, or exactly 0 outside the band."""
    scores = torch.randn(3, 50, generator=torch.Generator().manual_seed(2)) * 10
    tau = torch.tensor(0.01, dtype=torch.float64)
    probs = _one_shot.lean_weights(_one_shot.sort_scores(scores, tau, True), True)
    assert probs.min() >= math.exp(_backends.EXP_FLOOR[torch.float64]) / 50
    terms = _columns.sorted_terms(scores, tau, True, windows=False)
    for dtype in (torch.float32, torch.float64):
        for banded in (False, True):
            weights = _backends._block_weights(terms, tau, slice(0, 50), slice(0, 50), dtype, banded=banded)
            nonzero = weights[weights > 0]
            assert nonzero.min() >= math.exp(_backends.EXP_FLOOR[dtype]) * (1 - 1e-6)
            assert bool((weights == 0).any()) == banded  # the band's exact zeros, and only there
    assert not relaxed_sort_matrix(scores, 0.01).isnan().any()
