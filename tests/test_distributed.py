"""DistributedDataParallel needs nothing special: the op is independent per list, so two gloo processes on CPU, each
with half of the batch, get the gradients of one process on the whole batch (DDP averages them)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from triton_sort import relaxed_sort_apply

WORLD = 2
BATCH, N, FEATURES = 8, 17, 5  # per step: 8 lists of 17 items (odd), split 4 + 4 over the two processes
STEPS = 2
TAU = 0.5


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(STEPS, BATCH, N, FEATURES, generator=generator, dtype=torch.float64)
    targets = torch.randn(STEPS, BATCH, N, generator=generator, dtype=torch.float64)
    return features, targets


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()


def _train(model: torch.nn.Module, features: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
    """STEPS of SGD on a relaxed-sort loss (soft-sorted targets by the model's scores against the true sorted
    targets); returns the gradients of every step, flattened."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = []
    for step in range(STEPS):
        optimizer.zero_grad()
        scores = model(features[step]).squeeze(-1)  # (B, n)
        relaxed = relaxed_sort_apply(scores, targets[step], TAU, backend="torch")
        loss = (relaxed - targets[step].sort(dim=-1, descending=True).values).square().mean()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).clone())
        optimizer.step()
    return grads


def _worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        features, targets = _data()
        rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        model = torch.nn.parallel.DistributedDataParallel(_model())
        grads = _train(model, features[:, rows], targets[:, rows])
        torch.save(grads, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
def test_ddp_gradients_equal_the_single_process_gradients(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    single = _train(_model(), *_data())
    for rank in range(WORLD):
        distributed = torch.load(tmp_path / f"rank{rank}.pt")
        assert len(distributed) == STEPS
        for got, want in zip(distributed, single, strict=True):
            # float64 throughout; DDP's all-reduce sums in another order than the full-batch mean.
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        assert all(g.abs().max() > 1e-6 for g in distributed)  # a real signal, not two zero gradients
