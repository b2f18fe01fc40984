"""Global-batch relational losses under ``torch.distributed``.

Relational and Gram losses relate the rows of a batch to each other. Under data parallelism each
rank holds only its local rows, so ``rkd_loss(student, teacher)`` on a rank relates ``N_local``
rows, not the ``N = world_size x N_local`` rows of the global batch. Gather the features first::

    from kd_kernels.distributed import all_gather

    s = all_gather(student_features)           # [N_global, Ds], differentiable
    t = all_gather(teacher_features.detach())  # [N_global, Dt]
    loss = kd_kernels.rkd_loss(s, t)           # the same global loss on every rank

Every rank then computes the same loss over the global batch, and the backward of
:func:`all_gather` hands each rank the slice of the gradient that belongs to its own rows: each
rank's feature gradient equals its slice of the single-process gradient on the concatenated batch
(no communication in the backward). Parameter gradients under ``DistributedDataParallel``, which
*averages* them over ranks, are then ``1 / world_size`` of the single-process ones: multiply the
relational loss by ``world_size`` (``kd_kernels.distributed.world_size()``) to train exactly as one
process on the global batch would, or leave it and treat it as a learning-rate factor.

Local batches may differ in size (a last, smaller batch): the gather pads and trims. Masks
(``mask=``, ``ignore_mask=``) are gathered the same way (no gradient). Outside an initialized
process group :func:`all_gather` returns its input unchanged, so the same code runs on one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_gather", "world_size"]


def _active(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group=None) -> int:
    """The number of processes of ``group`` (1 outside an initialized process group)."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _gather_rows(x: torch.Tensor, dim: int, group) -> tuple[torch.Tensor, list[int], int]:
    """Concatenation along ``dim`` of every rank's ``x`` (sizes may differ along ``dim``), the
    per-rank sizes, and this rank's offset."""
    ws = dist.get_world_size(group)
    rank = dist.get_rank(group)
    size = torch.tensor([x.shape[dim]], device=x.device, dtype=torch.int64)
    sizes_t = [torch.zeros_like(size) for _ in range(ws)]
    dist.all_gather(sizes_t, size, group=group)
    sizes = [int(s.item()) for s in sizes_t]
    longest = max(sizes)
    xp = x.movedim(dim, 0).contiguous()
    if xp.shape[0] < longest:  # pad to the longest local batch: all_gather needs equal shapes
        xp = torch.cat([xp, xp.new_zeros((longest - xp.shape[0], *xp.shape[1:]))])
    parts = [torch.empty_like(xp) for _ in range(ws)]
    dist.all_gather(parts, xp, group=group)
    out = torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]).movedim(0, dim)
    return out, sizes, sum(sizes[:rank])


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group):
        out, sizes, offset = _gather_rows(x, dim, group)
        ctx.dim, ctx.offset, ctx.length = dim, offset, x.shape[dim]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # every rank computed the same loss from the gathered rows: its own rows' gradient is
        # its slice of the (identical) full gradient
        return grad.narrow(ctx.dim, ctx.offset, ctx.length), None, None


def all_gather(x: torch.Tensor, *, dim: int = 0, group=None) -> torch.Tensor:
    """The global batch: every rank's ``x`` concatenated along ``dim`` in rank order.

    Args:
        x: this rank's tensor, e.g. features ``[N_local, D]`` (or ``[B, N_local, D]`` with
            ``dim=1``), or a mask ``[N_local]``. Shapes must agree on every rank except along ``dim``.
        dim: the batch dimension (default 0).
        group: the process group (default: the world).

    Returns:
        ``[sum of N_local over ranks, ...]`` on every rank. Differentiable for floating ``x``: the
        backward returns this rank's slice of the incoming gradient (see the module docstring for
        the assumption that every rank computes the same loss, and the DDP scaling). Outside an
        initialized process group (or with one process) ``x`` itself.

    Example:
        >>> import torch, kd_kernels
        >>> from kd_kernels.distributed import all_gather
        >>> s, t = torch.randn(8, 16, requires_grad=True), torch.randn(8, 32)
        >>> loss = kd_kernels.rkd_loss(all_gather(s), all_gather(t))  # one process: plain rkd_loss
        >>> loss.backward()
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"all_gather: x must be a tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < max(x.dim(), 1):
        raise ValueError(f"all_gather: dim must be an int in [{-x.dim()}, {x.dim()}), got {dim!r}")
    if not _active(group):
        return x
    dim = dim % x.dim()
    if x.requires_grad:
        return _AllGather.apply(x, dim, group)
    return _gather_rows(x, dim, group)[0]
