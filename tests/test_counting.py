"""``triton_sort.bench.counting``: device operations (torch ops + Triton launches) and host syncs per call."""

from __future__ import annotations

import pytest
import torch

from triton_sort import relaxed_sort_apply
from triton_sort.bench.counting import Counts, count_device_ops, counting


def test_elementwise_ops_count_one_each_and_views_are_free():
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    assert count_device_ops(lambda: (a + b).sum()) == Counts(torch_ops=2, triton_launches=0, host_syncs=0)
    views = lambda: a.view(-1).reshape(5, 4).t().unsqueeze(0).expand(3, 4, 5)[1, :, 2:].detach()  # noqa: E731
    assert count_device_ops(views) == Counts(0, 0, 0)
    # matmul counts once (its mm), zeros once (its fill), a dtype conversion once (its copy).
    assert count_device_ops(lambda: a @ b.t()).torch_ops == 1
    assert count_device_ops(lambda: torch.zeros(3)).torch_ops == 1
    assert count_device_ops(lambda: a.double()).torch_ops == 1


def test_host_syncs_are_counted():
    a = torch.randn(3, 4)
    for read in (lambda: a.sum().item(), lambda: bool(a.sum() > 0), lambda: a.tolist(), lambda: int(a[0, 0]),
                 lambda: float(a[0, 0]), lambda: a[a > 0]):  # the last: nonzero's data-dependent size
        assert count_device_ops(read).host_syncs == 1
    assert count_device_ops(lambda: a.sum() > 0).host_syncs == 0


def test_backward_ops_are_counted_and_device_ops_adds_the_launches():
    x = torch.randn(6, requires_grad=True)
    forward = count_device_ops(lambda: (x * 2).exp().sum())
    both = count_device_ops(lambda: (x * 2).exp().sum().backward())
    assert forward.torch_ops == 3 and both.torch_ops > forward.torch_ops
    assert Counts(5, 2, 0).device_ops == 7


def test_patches_are_undone_even_when_the_block_raises():
    before = {name: torch.Tensor.__dict__.get(name) for name in ("item", "__bool__", "tolist")}
    with pytest.raises(RuntimeError, match="inside"), counting():
        raise RuntimeError("inside")
    assert {name: torch.Tensor.__dict__.get(name) for name in before} == before
    assert count_device_ops(lambda: None) == Counts(0, 0, 0)


def test_triton_launches_are_counted(monkeypatch):
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def add_one(pointer, size, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        mask = offsets < size
        tl.store(pointer + offsets, tl.load(pointer + offsets, mask=mask) + 1, mask=mask)

    values = torch.zeros(8, device="cuda" if torch.cuda.is_available() else "cpu")

    def twice():
        add_one[(1,)](values, 8, BLOCK=8)
        add_one[(1,)](values, 8, BLOCK=8)

    twice()  # compile outside the count
    assert count_device_ops(twice).triton_launches == 2 and values.eq(4).all()


def test_relaxed_sort_apply_is_counted_on_each_backend(backend):
    """Both paths report their launches (the targets on these counts are held by the op's own tests)."""
    scores = torch.randn(2, 9, requires_grad=True)
    x = torch.randn(2, 9, 3, requires_grad=True)

    def step():
        relaxed_sort_apply(scores, x, 1.0, backend=backend).sum().backward()

    step()
    counts = count_device_ops(step)
    assert counts.device_ops > 0
    assert (counts.triton_launches > 0) == (backend == "triton")
