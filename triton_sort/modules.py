"""``nn.Module`` wrappers of the functional API."""

from __future__ import annotations

from torch import Tensor, nn

from .api import Backend, check_tau, relaxed_sort_apply, relaxed_sort_matrix


class NeuralSort(nn.Module):
    """Relaxed sort layer: ``forward(scores)`` returns ``P_hat`` (``(n, n)`` or ``(B, n, n)``),
    ``forward(scores, x)`` returns ``P_hat @ x`` without materialising ``P_hat`` (see ``relaxed_sort_apply``)."""

    def __init__(self, tau: float = 1.0, *, descending: bool = True, hard: bool = False,
                 backend: Backend = "auto") -> None:
        super().__init__()
        self.tau = check_tau(tau)
        self.descending = descending
        self.hard = hard
        self.backend = backend

    def forward(self, scores: Tensor, x: Tensor | None = None) -> Tensor:
        options = dict(descending=self.descending, hard=self.hard, backend=self.backend)
        if x is None:
            return relaxed_sort_matrix(scores, self.tau, **options)
        return relaxed_sort_apply(scores, x, self.tau, **options)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, descending={self.descending}, hard={self.hard}, backend={self.backend!r}"
