"""The tunable kernels, each described once.

To make a new kernel tunable, add one ``TunableKernel`` to ``KERNELS`` (its name must be in
``kernels.configs.KERNEL_NAMES``, which a test checks, its launcher ``kernels.launch.<name>`` must take ``config=``, and
``kernels.compile_check.CompileJob`` must know its signature, as the compile-only CI test already requires).

The tuner does not rebuild a kernel's arguments by hand: it runs the public operation that reaches the launcher
once, records the arguments the package passes it (so the inputs are exactly what users' calls produce, whatever
the launcher's signature), and then replays that call with each candidate configuration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..api import relaxed_sort_apply, relaxed_sort_matrix
from ..kernels import launch, neuralsort
from ..kernels.configs import KernelConfig, block_d_for


def _matrix(scores: Tensor, x: Tensor, grad: Tensor, tau: float) -> None:
    relaxed_sort_matrix(scores, tau, backend="triton")


def _apply(scores: Tensor, x: Tensor, grad: Tensor, tau: float) -> None:
    relaxed_sort_apply(scores, x, tau, backend="triton")


def _apply_and_backward(scores: Tensor, x: Tensor, grad: Tensor, tau: float) -> None:
    scores, x = scores.detach().requires_grad_(), x.detach().requires_grad_()
    torch.autograd.grad(relaxed_sort_apply(scores, x, tau, backend="triton"), (scores, x), grad)


@dataclass(frozen=True)
class TunableKernel:
    """name: in ``KERNEL_NAMES`` and the launcher's name in ``kernels.launch``; kernel_attr: the ``@triton.jit``
    function in ``kernels.neuralsort`` (its source keys the cache); uses_d: whether the d bucket matters (else
    it is always 1); run: a public call ``(scores (B, n), x (B, n, d), grad (B, n, d), tau)`` that reaches the
    launcher."""

    name: str
    kernel_attr: str
    uses_d: bool
    run: Callable[[Tensor, Tensor, Tensor, float], None]

    @property
    def kernel(self) -> object:
        return getattr(neuralsort, self.kernel_attr)

    def block_d(self, d: int) -> int:
        return block_d_for(d) if self.uses_d else 1

    def capture(self, batch: int, n: int, d: int, dtype: torch.dtype, device: torch.device, tau: float = 1.0,
                seed: int = 0) -> Callable[[KernelConfig], object]:
        """Run ``self.run`` on random inputs ``(batch, n, d)`` and return a replay of this kernel's launch:
        ``replay(config)`` launches it again on the same arguments with ``config`` and returns its outputs."""
        generator = torch.Generator(device=device).manual_seed(seed)
        scores = torch.randn(batch, n, generator=generator, device=device).to(dtype)
        x, grad = (torch.randn(batch, n, d, generator=generator, device=device).to(dtype) for _ in range(2))
        launcher = getattr(launch, self.name)
        calls = []

        def recording(*args, **kwargs):
            calls.append((args, kwargs))
            return launcher(*args, **kwargs)

        short_max_n = launch.SHORT_MAX_N
        setattr(launch, self.name, recording)
        launch.SHORT_MAX_N = 0  # the tiled kernels, also where real short lists take the one-launch kernels
        try:
            self.run(scores, x, grad, tau)
        finally:
            setattr(launch, self.name, launcher)
            launch.SHORT_MAX_N = short_max_n
        if not calls:
            raise RuntimeError(f"running {self.run.__name__} did not launch {self.name}")
        args, kwargs = calls[-1]
        return lambda config: launcher(*args, **{**kwargs, "config": config})


KERNELS: dict[str, TunableKernel] = {
    spec.name: spec
    for spec in (
        TunableKernel("matrix_forward", "matrix_forward_kernel", uses_d=False, run=_matrix),
        TunableKernel("apply_forward", "apply_forward_kernel", uses_d=True, run=_apply),
        TunableKernel("apply_delta", "apply_delta_kernel", uses_d=True, run=_apply_and_backward),
        TunableKernel("apply_backward", "apply_backward_kernel", uses_d=True, run=_apply_and_backward),
    )
}
