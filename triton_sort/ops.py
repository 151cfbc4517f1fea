"""``torch.library`` custom ops and the autograd functions the public API calls.

Three layers: the backends (``_backends``: PyTorch and Triton), these custom ops (fake implementations,
``register_autograd``, vmap rules: ``torch.compile(fullgraph=True)`` traces them without graph breaks and ``opcheck``
tests them), and the functional API (``api``), which validates and reshapes user input. Shapes are canonical here:
``scores (B, n)``, ``x (B, n, d)``, ``tau`` a 0-d float64 tensor (so compiled graphs never specialise on its value),
``backend`` is ``"torch"`` or ``"triton"``.

Each forward op also returns the sorted terms it computed (``SortedTerms``, O(B n)), which the backward reuses
instead of sorting again. The public functions go through ``torch.autograd.Function`` subclasses built from the same
setup/backward functions as the ops' ``register_autograd``: PyTorch's generated autograd wrapper of custom ops lacks
``setup_context`` and so fails under ``torch.func`` transforms (pytorch/pytorch#170834); the functions here support
``grad``, ``vjp``, ``jacrev`` and ``vmap`` and raise a clear error for forward mode and double backward.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from . import _backends
from ._backends import (
    BACKENDS,
    dense_drops,
    list_poison,
    poison_lists,
    real_rows,
    rows_to_output,
    signed_sum_gradient,
)
from ._columns import TENSOR_FIELDS, SortedTerms, index_positions, positions
from ._one_shot import (
    LeanTerms,
    lean_apply,
    lean_apply_backward,
    lean_matrix,
    lean_matrix_backward,
    lean_terms,
    saved_values,
)
from ._validation import tau_checked, validation_enabled

TERM_FIELDS = TENSOR_FIELDS
_INDEX_FIELDS = ("order", "less", "not_greater", "lower", "upper", "length")


def rank_mask(mask: Tensor) -> Tensor:
    """(B, n) bool by rank (output row) from a mask by item: the first m ranks of a list of m real items."""
    return index_positions(mask.shape[-1], mask.device)[None, :] < mask.sum(-1, keepdim=True)


def validate_data(scores: Tensor, x: Tensor | None, tau: Tensor | None, mask: Tensor | None = None,
                  value_mask: Tensor | None = None) -> None:
    """With validation on (``triton_sort.set_validation``): scores and x finite, tau finite and > 0 with a finite
    inverse; only real items count where ``mask`` (scores) and ``value_mask`` (x's first axis) say which. One host
    synchronisation for all of them; nothing at all with validation off. Data-dependent, so it lives inside the ops
    (opaque to torch.compile) rather than in the Python wrappers."""
    if not validation_enabled():
        return
    if mask is not None:  # padding may hold anything (-inf, NaN): it is never used
        scores = scores.masked_fill(~mask, 0)
    if x is not None and value_mask is not None:
        x = x.masked_fill(~value_mask[..., None], 0)
    # One cheap test first: a sum is finite when every input is, and log(1 / tau) is finite exactly when tau is
    # finite and > 0 with a finite inverse. Sums of finite inputs near their dtype's limit may overflow (16-bit
    # inputs are summed in fp32): only then, or on a real error, do the per-tensor checks run.
    total = _check_sum(scores)
    if x is not None:
        total = total + _check_sum(x)
    if tau is not None and not tau_checked(tau):
        total = total + tau.reciprocal().log()
    if bool(torch.isfinite(total)):
        return
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores must be finite: found NaN or infinite values")
    if x is not None and not bool(torch.isfinite(x).all()):
        raise ValueError("x must be finite: found NaN or infinite values (triton_sort.set_validation(False) skips "
                         "this check; see its docstring for what non-finite values do then)")
    if tau is not None and not bool((tau > 0) & torch.isfinite(tau) & torch.isfinite(tau.reciprocal())):
        raise ValueError(f"tau must be finite and > 0 with a finite inverse, got {float(tau)}")


def _check_sum(values: Tensor) -> Tensor:
    """values' sum, 0-d, in their dtype (fp32 for 16-bit values): one operation, no copy."""
    return values.sum(dtype=torch.float32 if values.dtype in (torch.float16, torch.bfloat16) else None)


def without_autocast(fn):
    """Run an op's implementation with autocast off: the inputs arrive already cast (``api.autocast_inputs``), and
    an autocast region around the call must not lower the float64/fp32 work inside to 16 bits. (The regions are
    entered only when autocast is on: two context managers per call cost more than a small list's whole forward.)"""

    @functools.wraps(fn)
    def run(*args):
        if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
            with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
                return fn(*args)
        return fn(*args)

    return run


# Each custom op's implementation (autocast off), for direct eager calls (``direct_call_allowed``).
_IMPLEMENTATIONS: dict[object, Callable] = {}


def custom_op(name: str):
    """``torch.library.custom_op(name)`` (no mutated arguments) of ``fn`` run without autocast."""

    def register(fn):
        run = without_autocast(fn)
        op = torch.library.custom_op(name, mutates_args=())(run)
        _IMPLEMENTATIONS[op] = run
        return op

    return register


def direct_call_allowed(args: tuple) -> bool:
    """Whether an eager call may run an op's implementation itself instead of dispatching the op: no dispatch
    mode (FakeTensorMode, make_fx, FlopCounterMode...), no functorch transform (vmap, grad) and plain tensors
    (subclasses such as DTensor see the op whole). The dispatcher's work (schema binding, the custom op's autograd
    and autocast layers) costs ~70 us per call on CPU, a small list's whole forward; what it would do here is what
    the autograd.Function around the call already does."""
    if torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active():
        return False
    return all(type(arg) in _PLAIN_TENSORS for arg in args if isinstance(arg, Tensor))


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def hard_order(scores: Tensor, descending: bool, mask: Tensor | None = None) -> Tensor:
    """Exact sort order, stable so that equal scores keep their input order, padding (``mask`` False) last.
    (B, n) -> (B, n) int64."""
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf") if descending else float("inf"))
    return torch.sort(scores, dim=-1, descending=descending, stable=True).indices


def _hard_apply(scores: Tensor, x: Tensor, descending: bool, mask: Tensor | None, transpose: bool) -> Tensor:
    """The exact permutation applied: x (B, n, d) by item -> by rank, or (``transpose``) by rank -> by item; padded
    ranks and items are 0."""
    order = hard_order(scores, descending, mask)[..., None].expand_as(x)
    ranks = None if mask is None else rank_mask(mask)[..., None]
    if transpose:
        x = x if ranks is None else x.masked_fill(~ranks, 0)
        return torch.zeros_like(x).scatter_(1, order, x)
    out = torch.gather(x, 1, order)
    return out if ranks is None else out.masked_fill(~ranks, 0)


def _fake_terms(scores: Tensor, backend: str, banded: bool, counts: bool = True) -> tuple[Tensor, ...]:
    batch, n = scores.shape
    width = n if BACKENDS[backend].has_windows(batch, n, scores.device) else 0
    shapes = {"lower": (batch, width), "upper": (batch, width), "length": (batch,)}
    if not counts:
        shapes.update(count=(batch, 0), less=(batch, 0), not_greater=(batch, 0))
    return tuple(scores.new_empty(shapes.get(name, (batch, n)),
                                  dtype=torch.int64 if name in _INDEX_FIELDS else torch.float64)
                 for name in TERM_FIELDS)


# ------------------------------------------------------------------------------------- shared autograd machinery
def forward_mode_error(name: str) -> RuntimeError:
    return RuntimeError(f"forward-mode AD (torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad) is not "
                        f"supported by triton_sort.{name}: use reverse mode (backward, torch.func.grad, vjp, jacrev)")


def double_backward_error(name: str) -> RuntimeError:
    return RuntimeError(f"double backward is not supported by triton_sort.{name}: its backward is a fused kernel "
                        "without a derivative of its own (create_graph=True, torch.func.hessian, grad of grad)")


def _forward_calling(op):
    """``forward(<the op's arguments>) = op(...)`` with the schema's parameter names: Dynamo mistakes a
    ``forward(*args)`` for an old-style ``forward(ctx, *args)`` and fails to trace it."""
    names = ", ".join(argument.name for argument in op._schema.arguments)
    namespace = {"op": op}
    exec(f"def forward({names}):\n    return op({names})\n", namespace)
    return namespace["forward"]


class DifferentiableOp:
    """An op's ``autograd.Function``s. Traced calls (torch.compile) get one without ``jvp``, which Dynamo cannot
    trace (it does not run forward mode anyway). Eager calls get one whose ``jvp`` raises ``forward_mode_error``:
    where ``direct_call_allowed``, an old-style function (``forward(ctx, ...)``) that runs the op's implementation
    itself, else (transforms, dispatch modes, tensor subclasses) one that dispatches the op, with ``setup_context``
    as functorch needs and ``vmap`` from the ops' vmap rules (``generate_vmap_rule``). Both run the same
    ``setup_context`` and ``backward``."""

    def __init__(self, name: str, op, setup_context, backward, traced_directly: bool = False) -> None:
        def jvp(ctx, *tangents):
            raise forward_mode_error(name)

        impl, op = _IMPLEMENTATIONS[op], op._opoverload  # the OpOverload: Dynamo traces calls of it in a function
        self.op, self.impl, self.traced_directly = op, impl, traced_directly
        methods = {
            "generate_vmap_rule": True,
            "forward": staticmethod(_forward_calling(op)),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
        }
        self.traced = type(f"{name}_traced", (torch.autograd.Function,), methods)
        self.eager = type(f"{name}_function", (torch.autograd.Function,), {**methods, "jvp": staticmethod(jvp)})

        def direct_forward(ctx, *args):
            outputs = impl(*args)
            setup_context(ctx, args, outputs)
            return outputs

        # No setup_context: autograd.Function.apply then skips binding the arguments to forward's signature
        # (~50 us per call).
        self.direct = type(f"{name}_direct", (torch.autograd.Function,), {
            "forward": staticmethod(direct_forward), "backward": staticmethod(backward), "jvp": staticmethod(jvp)})

    def apply(self, *args):
        if torch.compiler.is_compiling():
            return self.op(*args) if self.traced_directly else self.traced.apply(*args)
        if not direct_call_allowed(args):
            return self.eager.apply(*args)
        if self.traced_directly and not torch.is_grad_enabled():
            return self.impl(*args)  # a backward op outside create_graph: no graph to record
        return self.direct.apply(*args)


def autograd_function(name: str, op, setup_context, backward) -> DifferentiableOp:
    """``op`` with the op's own setup/backward as ``autograd.Function``s (see the module docstring)."""
    return DifferentiableOp(name, op, setup_context, backward)


def once_differentiable(name: str, op) -> DifferentiableOp:
    """A backward op whose own derivatives raise ``double_backward_error`` (reverse) and ``forward_mode_error``
    (forward over reverse), instead of the silent zeros of an op without a formula."""

    def backward(ctx, *grads):
        raise double_backward_error(name)

    # Traced (inside a compiled backward) the op is called directly: Dynamo traces no function inside a backward.
    return DifferentiableOp(name, op, lambda ctx, inputs, output: None, backward, traced_directly=True)


def register_batch_vmap(op, name: str, batched: tuple[int, ...], tau_index: int) -> None:
    """vmap rule for an op whose tensor arguments at ``batched`` (and all outputs) are ``(B, ...)``: the vmapped
    dimension folds into B. ``tau`` (argument ``tau_index``) must be the same for the whole vmapped batch."""
    if not hasattr(torch.library, "register_vmap"):
        return

    def rule(info, in_dims, *args):
        if in_dims[tau_index] is not None:
            raise ValueError(f"vmap over tau is not supported by triton_sort.{name}: pass one tau for the whole batch")
        size = info.batch_size
        args = list(args)
        for index in batched:
            value, dim = args[index], in_dims[index]
            if value is None:  # an optional tensor (mask) not given
                continue
            value = value.movedim(dim, 0) if dim is not None else value.expand(size, *value.shape)
            args[index] = value.reshape(size * value.shape[1], *value.shape[2:])
        outputs = op(*args)
        single = isinstance(outputs, Tensor)
        outputs = (outputs,) if single else outputs
        outputs = tuple(out.reshape(size, out.shape[0] // size, *out.shape[1:]) for out in outputs)
        return (outputs[0], 0) if single else (outputs, (0,) * len(outputs))

    torch.library.register_vmap(op, rule)


# ----------------------------------------------------------------------------------- small problems (lean path)
def _lean_term_tensors(terms: LeanTerms) -> tuple[Tensor, ...]:
    """The ops' ``TERM_FIELDS`` outputs from the lean path's terms: order, t = u, w = b, no tie counts or windows
    (empty (B, 0): how the backwards recognise them) and the lengths (n for unpadded lists). Fresh empties, as
    outputs of a custom op may not alias one another."""
    order = terms.order
    empty = order.new_empty((order.shape[0], 0))
    length = torch.full_like(order[:, 0], order.shape[1]) if terms.length is None else terms.length
    return (order, terms.u, terms.b, terms.u.new_empty(empty.shape), empty, empty.clone(), empty.clone(),
            empty.clone(), length)


def lean_forward(scores: Tensor, x: Tensor, tau: Tensor, mask: Tensor | None, descending: bool, hard: bool,
                 transpose: bool) -> tuple:
    """``_one_shot.lean_apply`` with the data checks (one synchronisation): a non-finite real score or value, or a
    bad tau, makes the result non-finite (every weight of its list, or of every list, is NaN), so one sum of the
    result replaces the inputs' own checks; only then do those run, to name the culprit. ``hard``: the exact
    permutation's values instead (the rest stays for the relaxed backward)."""
    validate = validation_enabled()
    result = lean_apply(scores, x, tau, descending, transpose, not validate, mask)
    if validate:
        total = result[1].sum()
        if not tau_checked(tau):
            total = total.add_(tau.reciprocal().log_())  # log(1 / tau): finite iff tau is valid
        if not math.isfinite(total.item()):  # the inputs' own checks name the culprit
            validate_data(scores, x, tau, mask, rank_mask(mask) if transpose and mask is not None else mask)
    if hard:
        result = (_hard_apply(scores, x, descending, mask, transpose), *result[1:])
    return result


def apply_directly(scores: Tensor, x: Tensor, tau: Tensor, backend: str) -> bool:
    """Whether an eager call of the apply op on these canonical inputs may take ``LeanApply`` (the lean path's
    forward and backward without the op's layers: ~100 us of Python per forward + backward, as much as the work
    of a short list): the PyTorch path on a small problem, called directly (``direct_call_allowed``) and outside
    autocast and tracing. Everything else runs the op, which takes the same lean path inside."""
    return (backend == "torch" and not torch.compiler.is_compiling()
            and BACKENDS["torch"].lean(*scores.shape, scores.device) and direct_call_allowed((scores, x, tau))
            and not (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")))


class LeanApply(torch.autograd.Function):
    """The apply op's lean path as one autograd node (see ``apply_directly``); the same functions as the op's
    implementation and backward, with the same errors for double backward and forward mode."""

    @staticmethod
    def forward(ctx, scores, x, tau, mask, descending, hard, transpose, name):
        out, _, probs, terms, saved = lean_forward(scores, x, tau, mask, descending, hard, transpose)
        ctx.save_for_backward(probs, saved, tau, *terms)
        ctx.descending, ctx.transpose, ctx.name = descending, transpose, name
        return out

    @staticmethod
    def backward(ctx, grad):
        _, need_x, need_tau = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: gradients whose own derivatives raise
            d_scores, d_x, tau_terms = LeanBackward.apply(grad, ctx.descending, ctx.transpose, need_tau, ctx.name,
                                                          *ctx.saved_tensors)
        else:
            probs, saved, tau, *terms = ctx.saved_tensors
            d_scores, d_x, tau_terms = lean_apply_backward(probs, LeanTerms(*terms), saved, grad, tau,
                                                           ctx.descending, ctx.transpose, need_x, need_tau)
        tau = ctx.saved_tensors[2]
        return d_scores, d_x, tau_gradient(tau, tau_terms) if need_tau else None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, *tangents):
        raise forward_mode_error(ctx.name)


class LeanBackward(torch.autograd.Function):
    """``LeanApply``'s backward as a node of its own (under ``create_graph=True``), whose derivatives raise
    ``double_backward_error`` (reverse) and ``forward_mode_error`` (forward over reverse)."""

    @staticmethod
    def forward(ctx, grad, descending, transpose, need_tau, name, probs, saved, tau, *terms):
        ctx.name = name
        d_scores, d_x, tau_terms = lean_apply_backward(probs, LeanTerms(*terms), saved, grad, tau, descending,
                                                       transpose, True, need_tau)
        return d_scores, d_x, saved.new_empty(0) if tau_terms is None else tau_terms

    @staticmethod
    def backward(ctx, *grads):
        raise double_backward_error(ctx.name)

    @staticmethod
    def jvp(ctx, *tangents):
        raise forward_mode_error(ctx.name)


# ----------------------------------------------------------------------------------------- P_hat @ x (streaming)
@custom_op("triton_sort::apply")
def sort_apply(scores: Tensor, x: Tensor, tau: Tensor, mask: Tensor | None, descending: bool, hard: bool,
               banded: bool, transpose: bool, backend: str
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                          Tensor]:
    """Returns (out, norm, weights, *sorted terms): out = P_hat @ x by output row (``transpose``: P_hat^T @ x, x by
    output row, out by item; ``hard``: the exact permutation instead); norm = the row sums in sorted order
    (float64); weights = the PyTorch path's one-shot exp(-D / tau) (B, n, n) or an empty tensor; the terms
    (``TERM_FIELDS``) for the backward. ``mask`` (B, n) bool: padded lists (True for a real item)."""
    impl = BACKENDS[backend]
    if backend == "torch" and impl.lean(*scores.shape, scores.device):
        out, _, probs, terms, _ = lean_forward(scores, x, tau, mask, descending, hard, transpose)
        norm = torch.ones_like(terms.u)  # the saved weights are normalised
        return (out, norm, probs, *_lean_term_tensors(terms))
    value_mask = rank_mask(mask) if transpose and mask is not None else mask
    validate_data(scores, x, tau, mask, value_mask)
    if not transpose and impl.fuses_apply(*x.shape):
        terms, out, norm, weights = impl.prepare_and_apply(scores, x, tau, descending, banded, mask)
        if hard:
            out = _hard_apply(scores, x, descending, mask, transpose)
        return (out, norm, weights, *terms.tensors())
    # x by rank (transpose) is not in the items' order that prepare's poisoning reads: poisoned here instead.
    terms = impl.prepare(scores, tau, banded, None if transpose else x, mask)
    if transpose:
        if not validation_enabled():
            terms.t.add_(list_poison(x, value_mask)[:, None])
        out, norm, weights = impl.apply_transposed(terms, x, tau, descending, banded)
    else:
        out, norm, weights = impl.apply_forward(terms, x, tau, descending, banded)
    if hard:
        out = _hard_apply(scores, x, descending, mask, transpose)
    return (out, norm, weights, *terms.tensors())


@sort_apply.register_fake
def _(scores, x, tau, mask, descending, hard, banded, transpose, backend):
    batch, n = scores.shape
    weights = (batch, n, n) if BACKENDS[backend].saves_weights(batch, n, scores.device) else (0,)
    return (torch.empty_like(x), scores.new_empty(scores.shape, dtype=torch.float64),
            x.new_empty(weights, dtype=torch.float64),
            *_fake_terms(scores, backend, banded, BACKENDS[backend].has_counts(batch, n, scores.device,
                                                                               mask is not None)))


@custom_op("triton_sort::apply_backward")
def sort_apply_backward(x: Tensor, grad: Tensor, norm: Tensor, weights: Tensor, tau: Tensor, order: Tensor,
                        t: Tensor, w: Tensor,
                        count: Tensor, less: Tensor, not_greater: Tensor, lower: Tensor, upper: Tensor,
                        length: Tensor, descending: bool, banded: bool, backend: str, need_tau: bool, masked: bool,
                        transpose: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(d_scores (B, n), d_x (B, n, d), tau terms) of P_hat @ x, recomputing P_hat tile by tile from the forward's
    terms. The tau terms are ``sum_pm dz_pm D_p(m)`` per batch row, (B,) float64, or ``(B, 0)`` unless ``need_tau``:
    ``dL/dtau`` is their sum over ``tau^2``.

    ``transpose`` (the op P_hat^T @ v, x = v by rank, grad = w by item): w . P^T v = v . P w is P_hat @ w contracted
    with v, so d_v = P_hat @ w and d_scores is the plain backward with x = w and output gradient v. ``weights``: the
    forward's one-shot weights (or an empty tensor: recomputed tile by tile)."""
    impl = BACKENDS[backend]
    if backend == "torch" and impl.lean(*norm.shape, norm.device):  # t = u, w = b: lean_apply's terms
        terms = lean_terms(t, order, tau, descending, length if masked else None, b=w)
        saved = saved_values(x, terms, transpose)
        d_scores, d_x, tau_terms = lean_apply_backward(weights, terms, saved, grad, tau, descending, transpose, True,
                                                       need_tau)
        return d_scores, d_x, norm.new_empty((norm.shape[0], 0)) if tau_terms is None else tau_terms
    terms = SortedTerms(order, t, w, count, less, not_greater, lower, upper, length, masked)
    if transpose:
        d_x = impl.apply_forward(terms, grad, tau, descending, banded)[0]
        d_scores, _, tau_terms = impl.apply_backward(terms, grad, x, norm, tau, descending, banded, need_tau)
    else:
        d_scores, d_x, tau_terms = impl.apply_backward(terms, x, grad, norm, tau, descending, banded, need_tau)
    if tau_terms is None:
        tau_terms = norm.new_empty((norm.shape[0], 0))
    return d_scores, d_x, tau_terms


@sort_apply_backward.register_fake
def _(x, grad, norm, weights, tau, order, t, w, count, less, not_greater, lower, upper, length, descending, banded,
      backend, need_tau, masked, transpose):
    batch, n = norm.shape
    return (x.new_empty((batch, n)), torch.empty_like(x), norm.new_empty((batch,) if need_tau else (batch, 0)))


def save_with_terms(ctx, tensors: tuple, terms: tuple) -> None:
    """Save ``tensors`` and the forward's extra outputs ``terms`` (row sums, sorted terms) for the backward; those
    get no gradient, and none is materialised for them (ten zero fills per call otherwise)."""
    ctx.save_for_backward(*tensors, *terms)
    ctx.mark_non_differentiable(*terms)
    ctx.set_materialize_grads(False)


def tau_gradient(tau: Tensor, tau_terms: Tensor) -> Tensor:
    """dL/dtau = sum_pm dz_pm D_p(m) / tau^2 (the logits are -D / tau) from the per-row terms (..., B)."""
    return tau_terms.sum() / (tau * tau)


def _apply_setup_context(ctx, inputs, output):
    _scores, x, tau, mask, descending, _, banded, transpose, backend = inputs
    save_with_terms(ctx, (x, tau), output[1:])
    ctx.descending, ctx.banded, ctx.backend = descending, banded, backend
    ctx.masked, ctx.transpose = mask is not None, transpose


def _apply_backward_for(name: str):
    """The apply op's backward as the public function ``name`` runs it (``APPLY_BACKWARDS[name]``: its double
    backward errors name that function). Looked up in a module-level dict: Dynamo traces globals, not closures."""

    def backward(ctx, grad_out, *_):
        if grad_out is None:  # grads are not materialised: nothing reached the output
            return (None,) * 9
        x, tau, norm, weights, *terms = ctx.saved_tensors
        need_tau = ctx.needs_input_grad[2]
        d_scores, d_x, tau_terms = APPLY_BACKWARDS[name].apply(x, grad_out.contiguous(), norm, weights, tau, *terms,
                                                               ctx.descending, ctx.banded, ctx.backend, need_tau,
                                                               ctx.masked, ctx.transpose)
        return (d_scores, d_x, tau_gradient(tau, tau_terms) if need_tau else None, None, None, None, None, None,
                None)

    return backward


# The public functions built on the apply op, by name: the errors for forward mode and double backward name them.
_APPLY_NAMES = ("relaxed_sort_apply", "relaxed_sort", "relaxed_rank", "relaxed_topk")
APPLY_BACKWARDS = {name: once_differentiable(name, sort_apply_backward) for name in _APPLY_NAMES}
APPLY_FUNCTIONS = {name: autograd_function(name, sort_apply, _apply_setup_context, _apply_backward_for(name))
                   for name in _APPLY_NAMES}
SortApply = APPLY_FUNCTIONS["relaxed_sort_apply"]
sort_apply.register_autograd(_apply_backward_for("relaxed_sort_apply"), setup_context=_apply_setup_context)
register_batch_vmap(sort_apply, "relaxed_sort_apply", batched=(0, 1, 3), tau_index=2)
register_batch_vmap(sort_apply_backward, "relaxed_sort_apply", batched=(0, 1, 2, 3, *range(5, 14)), tau_index=4)


# ------------------------------------------------------------------------------------------ materialised P_hat
@custom_op("triton_sort::matrix")
def sort_matrix(scores: Tensor, tau: Tensor, mask: Tensor | None, descending: bool, hard: bool, banded: bool,
                backend: str
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(P_hat (B, n, n), *sorted terms); if ``hard``, the exact permutation matrix (stable for ties). Padded lists
    (``mask``): rows and columns of padding are 0."""
    validate_data(scores, None, tau, mask)
    impl = BACKENDS[backend]
    if _lean_matrix(scores, backend, hard):  # the lean path's weights are the matrix (no tie counts: empty)
        out, lean = lean_matrix(scores, tau, descending, banded, mask)
        if not validation_enabled():  # a NaN-poisoned list is NaN throughout, its padded rows too
            out = out + poison_lists(scores, None, mask)[:, None, None].to(out.dtype)
        return (out, *_lean_term_tensors(lean))
    terms = impl.prepare(scores, tau, banded, None, mask)
    if hard:
        order = hard_order(scores, descending, mask)
        out = torch.zeros(*scores.shape, scores.shape[-1], dtype=scores.dtype, device=scores.device)
        if mask is None:
            out.scatter_(-1, order[..., None], 1.0)
        else:  # padded ranks are zero rows
            out.scatter_(-1, order[..., None], rank_mask(mask)[..., None].to(scores.dtype))
    else:
        out = impl.matrix_forward(terms, tau, descending, banded, scores.dtype)
        if not validation_enabled():  # a NaN-poisoned list (``poison_lists``) is NaN outside its windows too
            out = out + poison_lists(terms.t, None)[:, None, None].to(out.dtype)
    return (out, *terms.tensors())


def _lean_matrix(scores: Tensor, backend: str, hard: bool) -> bool:
    """Whether the matrix op takes the lean path (``_one_shot.lean_matrix``): the PyTorch path, relaxed (the exact
    permutation of ``hard`` is a scatter of its own), up to ``LEAN_MATRIX_ELEMENTS`` entries on any device. Its
    terms have no tie counts."""
    batch, n = scores.shape
    return backend == "torch" and not hard and 0 < batch * n * n <= _backends.LEAN_MATRIX_ELEMENTS


@sort_matrix.register_fake
def _(scores, tau, mask, descending, hard, banded, backend):
    return (scores.new_empty((*scores.shape, scores.shape[-1])),
            *_fake_terms(scores, backend, banded, counts=not _lean_matrix(scores, backend, hard)))


@custom_op("triton_sort::matrix_backward")
def sort_matrix_backward(grad: Tensor, soft: Tensor, tau: Tensor, order: Tensor, t: Tensor, w: Tensor,
                         count: Tensor, less: Tensor, not_greater: Tensor, length: Tensor, descending: bool,
                         need_tau: bool, masked: bool) -> tuple[Tensor, Tensor]:
    """(d_scores (B, n), tau terms (B,) or (B, 0)) from dL/dP_hat (B, n, n). O(n^2) like the matrix itself; the same
    for both backends. Entries outside the band are exactly 0 in ``soft``, so they get no gradient, as in the banded
    forward; so are padded rows and columns. Terms without tie counts are the lean forward's (``lean_matrix``)."""
    if count.shape[-1] != order.shape[-1]:  # t = u, w = b of the lean path
        lean = lean_terms(t, order, tau, descending, length if masked else None, b=w)
        d_scores, tau_terms = lean_matrix_backward(grad, soft, lean, tau, descending, need_tau)
        return d_scores, t.new_empty((t.shape[0], 0)) if tau_terms is None else tau_terms
    terms = SortedTerms(order, t, w, count, less, not_greater, order[:, :0], order[:, :0], length, masked)
    work = torch.float64
    # Into sorted coordinates (row p, column m), where the weights are exp(-D_p(m) / tau) / l_p.
    index = order[:, None, :].expand_as(soft)
    p = torch.gather(rows_to_output(soft, descending, terms).to(work), 2, index)
    g = torch.gather(real_rows(rows_to_output(grad, descending, terms).to(work), terms), 2, index)
    # Renormalised in float64: rows summing to 1 up to the output dtype's rounding would rescale whole rows of dz,
    # and d_scores sums rows whose contributions largely cancel. (Padded rows are all 0, and stay so.)
    row_sums = p.sum(-1, keepdim=True)
    p = p / (row_sums.clamp_(min=0.5) if masked else row_sums)
    dz = p * (g - (p * g).sum(-1, keepdim=True))
    n = order.shape[-1]
    if masked:
        coefficient = positions(n, order.device, 2, 1)[None, :] - length[:, None]
        u = ((coefficient[:, :, None] - count[:, None, :]) * dz).sum(1)
    else:
        u = ((positions(n, order.device, 2, 1 - n)[:, None] - count[:, None, :]) * dz).sum(1)
    d_scores = signed_sum_gradient(terms, u, dz.sum(1), tau, soft.dtype)
    if not need_tau:
        return d_scores, t.new_empty((t.shape[0], 0))
    return d_scores, (dz * dense_drops(t, w)).sum((1, 2))


@sort_matrix_backward.register_fake
def _(grad, soft, tau, order, t, w, count, less, not_greater, length, descending, need_tau, masked):
    batch, n = order.shape
    return soft.new_empty((batch, n)), t.new_empty((batch,) if need_tau else (batch, 0))


def _matrix_setup_context(ctx, inputs, output):
    scores, tau, mask, descending, hard, banded, backend = inputs
    # The hard forward is a permutation: the relaxed matrix is recomputed for the straight-through gradient.
    save_with_terms(ctx, (scores, tau, mask, None if hard else output[0]), output[1:])
    ctx.descending, ctx.hard, ctx.banded, ctx.backend = descending, hard, banded, backend
    ctx.masked = mask is not None


def _matrix_backward(ctx, grad, *_):
    if grad is None:
        return (None,) * 7
    scores, tau, mask, soft, *terms = ctx.saved_tensors
    if ctx.hard:
        soft = sort_matrix(scores, tau, mask, ctx.descending, False, ctx.banded, ctx.backend)[0]
    need_tau = ctx.needs_input_grad[1]
    d_scores, tau_terms = SortMatrixBackward.apply(grad.contiguous(), soft, tau, *terms[:6], terms[8],
                                                   ctx.descending, need_tau, ctx.masked)
    return d_scores, tau_gradient(tau, tau_terms) if need_tau else None, None, None, None, None, None


sort_matrix.register_autograd(_matrix_backward, setup_context=_matrix_setup_context)
register_batch_vmap(sort_matrix, "relaxed_sort_matrix", batched=(0, 2), tau_index=1)
register_batch_vmap(sort_matrix_backward, "relaxed_sort_matrix", batched=(0, 1, *range(3, 10)), tau_index=2)
SortMatrixBackward = once_differentiable("relaxed_sort_matrix", sort_matrix_backward)
SortMatrix = autograd_function("relaxed_sort_matrix", sort_matrix, _matrix_setup_context, _matrix_backward)
