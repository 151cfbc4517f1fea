"""Device operations and host synchronisations per call, counted on the host (no GPU needed).

``count_device_ops(fn)`` runs ``fn()`` once and returns ``Counts(torch_ops, triton_launches, host_syncs)``;
``counting()`` is the same as a context manager (the counts are filled in when the block exits)::

    with counting() as counts:
        out = relaxed_sort_apply(scores, x, 1.0)
        out.sum().backward()
    assert counts.device_ops <= 12 and counts.host_syncs == 0

- ``torch_ops``: aten operations that would launch a device kernel, from ``torch.profiler`` (CPU activity, so the
  same count on CPU and GPU, backward included): the leaves of the work, ``aten::`` events that are not
  ``METADATA_OPS`` (views, reshapes, allocations without a fill, dtype/shape queries, and the scalar reads counted
  as host syncs instead: nothing runs on the device) and call no such event (so ``matmul`` counts once, as its
  ``mm``, and ``zeros`` as its ``zero_``). A composite op that calls another working op and then launches its own
  kernel (``index`` with a boolean mask: ``nonzero``, then a gather) counts once, so this is a lower bound there.
  A compiled region (``torch.compile``) counts as one operation plus the aten operations it calls (a lower bound
  too: its fused kernels are not seen one by one).
- ``triton_launches``: launches of ``@triton.jit`` kernels (``JITFunction.run``, or ``InterpretedFunction.run``
  under ``TRITON_INTERPRET=1``, with ``warmup=False``), wrapped for the duration.
- ``host_syncs``: calls that copy a device value to the host and so wait for the device: ``Tensor.item``,
  ``__bool__``, ``__int__``, ``__float__``, ``__index__``, ``tolist`` and ``numpy`` (patched for the duration; on
  CPU they are counted the same, since they would synchronise on a GPU), plus the outermost aten operations whose
  output size depends on the data (``SYNCING_OPS``: ``nonzero``, ``masked_select``, ``unique``..., which
  synchronise inside aten on a GPU).

Counting is for a single thread of Python code at a time (the patches are global while the block runs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator

import torch

# aten operations that launch nothing on the device: views and reshapes, metadata changes, allocations (an empty
# tensor is not written), shape, dtype and device queries. A leaf event of any other aten op counts as one launch.
METADATA_OPS = frozenset(f"aten::{name}" for name in (
    "view", "view_as", "_reshape_alias", "reshape", "reshape_as", "_unsafe_view", "expand", "expand_as",
    "as_strided", "as_strided_", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
    "resize_", "t", "transpose", "transpose_", "permute", "movedim", "unsqueeze", "unsqueeze_", "squeeze",
    "squeeze_", "select", "slice", "narrow", "split", "split_with_sizes", "chunk", "unbind", "unflatten", "flatten",
    "diagonal", "detach", "detach_", "alias", "lift_fresh", "resolve_conj", "resolve_neg", "conj", "_conj",
    "contiguous", "to", "type_as", "set_", "requires_grad_", "size", "stride", "numel", "dim", "is_same_size",
    "result_type", "_has_compatible_shallow_copy_type", "is_nonzero", "item", "_local_scalar_dense", "real",
    "imag", "view_as_real", "view_as_complex", "_shape_as_tensor", "sym_size", "sym_stride", "sym_numel",
    "broadcast_tensors", "align_as", "expand_copy", "_nested_tensor_from_mask", "retain_grad", "output_nr",
))
# aten operations whose output size depends on the data: they copy a count to the host (a sync on a GPU).
SYNCING_OPS = frozenset(f"aten::{name}" for name in (
    "nonzero", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive",
    "equal", "argwhere", "bincount",
))
SYNC_METHODS = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy")
COMPILED_REGION = "Torch-Compiled Region"


@dataclasses.dataclass
class Counts:
    """Per-call counts (see the module docstring for what each one counts)."""

    torch_ops: int = 0
    triton_launches: int = 0
    host_syncs: int = 0

    @property
    def device_ops(self) -> int:
        """Kernel launches on a GPU: torch operations plus Triton launches."""
        return self.torch_ops + self.triton_launches


def _triton_launchers() -> list[type]:
    classes = []
    try:
        from triton.runtime.jit import JITFunction

        classes.append(JITFunction)
    except ImportError:  # no Triton (e.g. not Linux): nothing to count
        return classes
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except ImportError:
        pass
    return classes


@contextlib.contextmanager
def _patched(owner: type, name: str, wrap: Callable[[Callable], Callable]) -> Iterator[None]:
    """Replace ``owner.name`` by ``wrap(original)`` for the block; restore exactly what was there (an inherited
    attribute is deleted again rather than copied onto the class)."""
    had_own = name in owner.__dict__
    original = owner.__dict__[name] if had_own else getattr(owner, name)
    setattr(owner, name, wrap(original))
    try:
        yield
    finally:
        if had_own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


def _counting_wrapper(original: Callable, counter: list[int], skip_warmup: bool = False) -> Callable:
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if not (skip_warmup and kwargs.get("warmup")):
            counter[0] += 1
        return original(*args, **kwargs)

    return wrapper


def _does_work(event) -> bool:
    return event.name.startswith("aten::") and event.name not in METADATA_OPS


def _is_counted_op(event) -> bool:
    """A leaf of the work: an aten op that is not metadata-only and calls no such op (views inside do not count)."""
    if not _does_work(event):
        return False
    stack = list(event.cpu_children)
    while stack:
        child = stack.pop()
        if _does_work(child):
            return False
        stack.extend(child.cpu_children)
    return True


def _has_ancestor_in(event, names: frozenset[str]) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in names:
            return True
        parent = parent.cpu_parent
    return False


def count_profiler_events(events) -> tuple[int, int]:
    """(kernel-launching aten operations, data-dependent syncing aten operations) in a profiler's event list."""
    ops = syncs = 0
    for event in events:
        if _is_counted_op(event) or event.name.startswith(COMPILED_REGION):
            ops += 1
        if event.name in SYNCING_OPS and not _has_ancestor_in(event, SYNCING_OPS):
            syncs += 1
    return ops, syncs


@contextlib.contextmanager
def counting() -> Iterator[Counts]:
    """Count what the block runs; the yielded ``Counts`` is filled in when the block exits."""
    counts = Counts()
    launches, syncs = [0], [0]
    with contextlib.ExitStack() as stack:
        for launcher in _triton_launchers():
            stack.enter_context(_patched(launcher, "run", lambda f: _counting_wrapper(f, launches, True)))
        for method in SYNC_METHODS:
            stack.enter_context(_patched(torch.Tensor, method, lambda f: _counting_wrapper(f, syncs)))
        profiler = stack.enter_context(torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]))
        yield counts
    ops, data_syncs = count_profiler_events(profiler.events())
    counts.torch_ops, counts.triton_launches, counts.host_syncs = ops, launches[0], syncs[0] + data_syncs


def count_device_ops(fn: Callable[[], object]) -> Counts:
    """Run ``fn()`` once and return its ``Counts`` (warm it up first if its first call compiles or tunes)."""
    with counting() as counts:
        fn()
    return counts
