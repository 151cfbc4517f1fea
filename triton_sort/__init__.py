"""triton-sort: fast, exact differentiable sorting (NeuralSort) with Triton kernels and a PyTorch path."""

from . import ops  # noqa: F401  (registers the torch.ops.triton_sort custom ops)
from ._validation import set_validation, validation, validation_enabled
from .api import relaxed_rank, relaxed_sort, relaxed_sort_apply, relaxed_sort_matrix
from .applications import relaxed_quantile, relaxed_topk
from .modules import DifferentiableKNN, NeuralSort
from .ranking import ndcg, neural_ndcg
from .stochastic import PlackettLuce, reinforce_loss

__version__ = "0.1.0"

__all__ = [
    "DifferentiableKNN",
    "NeuralSort",
    "PlackettLuce",
    "__version__",
    "ndcg",
    "neural_ndcg",
    "reinforce_loss",
    "relaxed_quantile",
    "relaxed_rank",
    "relaxed_sort",
    "relaxed_sort_apply",
    "relaxed_sort_matrix",
    "relaxed_topk",
    "set_validation",
    "validation",
    "validation_enabled",
]
