"""Global-batch relational losses across processes (kd_kernels.distributed): 2 CPU processes with
the gloo backend; every relational and Gram loss on the gathered batch equals one process on the
concatenated batch, in value, and each rank's feature gradient equals its slice of the
single-process gradient (uneven local batches and masks included)."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kd_kernels
from kd_kernels.distributed import all_gather, world_size

WORLD = 2
ROWS = (7, 5)  # uneven local batches
LOSSES = ("rkd_distance_loss", "rkd_angle_loss", "rkd_loss", "gram_loss", "cka_loss", "relation_loss", "procrustes_loss")
MASKED = ("gram_loss", "cka_loss", "relation_loss", "procrustes_loss")


def _data():
    g = torch.Generator().manual_seed(0)
    n = sum(ROWS)
    student = torch.randn(n, 6, generator=g, dtype=torch.float64)
    teacher = torch.randn(n, 4, generator=g, dtype=torch.float64)
    mask = torch.rand(n, generator=g) > 0.25
    return student, teacher, mask


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        student, teacher, mask = _data()
        lo = sum(ROWS[:rank])
        local_s = student[lo : lo + ROWS[rank]].clone().requires_grad_(True)
        local_t = teacher[lo : lo + ROWS[rank]].clone()
        local_m = mask[lo : lo + ROWS[rank]].clone()
        results = {"world_size": world_size()}
        for name in LOSSES:
            for masked in (False, True) if name in MASKED else (False,):
                kwargs = {"mask": all_gather(local_m)} if masked else {}
                loss = getattr(kd_kernels, name)(all_gather(local_s), all_gather(local_t), **kwargs)
                (grad,) = torch.autograd.grad(loss * 1.7, local_s)  # grad_output != 1
                results[(name, masked)] = (loss.detach(), grad)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results():
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "mask"])
@pytest.mark.parametrize("name", LOSSES)
def test_global_batch_equals_one_process(rank_results, name, masked):
    if masked and name not in MASKED:
        pytest.skip(f"{name} takes no mask")
    student, teacher, mask = _data()
    s = student.clone().requires_grad_(True)
    kwargs = {"mask": mask} if masked else {}
    loss = getattr(kd_kernels, name)(s, teacher, **kwargs)
    (grad,) = torch.autograd.grad(loss * 1.7, s)
    for rank, res in enumerate(rank_results):
        assert res["world_size"] == WORLD
        value, local_grad = res[(name, masked)]
        torch.testing.assert_close(value, loss.detach(), rtol=1e-12, atol=1e-14)
        lo = sum(ROWS[:rank])
        torch.testing.assert_close(local_grad, grad[lo : lo + ROWS[rank]], rtol=1e-10, atol=1e-13)


def test_single_process_is_identity():
    x = torch.randn(4, 3, requires_grad=True)
    assert all_gather(x) is x
    assert world_size() == 1
    with pytest.raises(ValueError, match="all_gather: dim"):
        all_gather(x, dim=2)
    with pytest.raises(TypeError, match="all_gather: x must be a tensor"):
        all_gather([1, 2])
