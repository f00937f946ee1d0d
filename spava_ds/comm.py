"""The few collectives Spava needs, and the process-group helpers."""

from __future__ import annotations

import datetime
import os
from typing import Optional, Tuple

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("SPAVA_DIST_TIMEOUT", "600")))


# A "group" of this process alone, usable inside a distributed job (e.g. a dense baseline on one rank).
SELF = "self"


def group_rank_size(group: Optional[dist.ProcessGroup] = None) -> Tuple[int, int]:
    """(rank, world size) in ``group``; a process without torch.distributed, or ``SELF``, is rank 0 of 1."""
    if group is SELF:
        return 0, 1
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise RuntimeError("a process group was given but torch.distributed is not initialized")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def init_distributed(backend: Optional[str] = None, timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> Tuple[int, int]:
    """Initialise the default group from torchrun's / the deepspeed launcher's environment, with a timeout.

    The backend defaults to NCCL when CUDA is available, gloo otherwise. Returns (rank, world size).
    """
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


# torch >= 2.13 renames all_gather_into_tensor to all_gather_single (the old name warns).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class PendingGather:
    """An all-gather in flight; ``wait()`` returns the gathered ``[W, *shape]`` tensor."""

    def __init__(self, out: torch.Tensor, work):
        self._out, self._work = out, work

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._out


def all_gather_async(x: torch.Tensor, group: Optional[dist.ProcessGroup], world_size: int,
                     async_op: bool = True) -> PendingGather:
    """Start gathering ``x`` (same shape on every rank) from all ranks of ``group`` into one ``[W, *shape]``."""
    x = x.contiguous()
    if world_size == 1:
        return PendingGather(x.unsqueeze(0), None)
    out = x.new_empty((world_size * x.shape[0],) + tuple(x.shape[1:]))
    work = _all_gather_single(out, x, group=group, async_op=async_op)
    return PendingGather(out.view((world_size,) + tuple(x.shape)), work if async_op else None)


_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_reduce_async(x: torch.Tensor, group: Optional[dist.ProcessGroup], world_size: int):
    """Sum ``x`` in place over the group; returns a handle whose ``wait()`` returns ``x``."""
    work = dist.all_reduce(x, group=group, async_op=True) if world_size > 1 else None
    return PendingGather(x, work)


def reduce_scatter_async(x: torch.Tensor, group: Optional[dist.ProcessGroup], world_size: int) -> PendingGather:
    """``x [W, *shape]`` -> the sum over ranks of ``x[rank]`` (the backward of ``all_gather_async``)."""
    if world_size == 1:
        return PendingGather(x[0], None)
    out = x.new_empty(x.shape[1:])
    work = _reduce_scatter_single(out, x.reshape((-1,) + tuple(x.shape[2:])).contiguous(), group=group,
                                  async_op=True)
    return PendingGather(out, work)


class _AllToAll(torch.autograd.Function):
    """Uneven all-to-all of flat tensors; its backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        grad_in = grad.new_empty(sum(in_splits))
        dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, out_splits, in_splits, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` of a flat tensor with (possibly uneven) splits."""
    if group_rank_size(group)[1] == 1:
        return x.reshape(-1)
    return _AllToAll.apply(x.reshape(-1), list(out_splits), list(in_splits), group)


# ---- the two-dimensional mode -------------------------------------------------------------------------------------
MESH_DIMS = ("inter", "intra")


def init_mesh(ulysses_degree: int, device_type: Optional[str] = None):
    """The ``DeviceMesh`` of the two-dimensional mode over the whole world: ``(W / U, U)`` with dims
    ``("inter", "intra")``, so the U consecutive ranks of one node form an intra group. Call it on every rank
    (it creates process groups). The device type defaults to the default group's (NCCL: ``"cuda"``, else ``"cpu"``).
    """
    from torch.distributed.device_mesh import init_device_mesh

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("init_mesh: initialise torch.distributed first (comm.init_distributed)")
    world = dist.get_world_size()
    if not isinstance(ulysses_degree, int) or ulysses_degree < 1 or world % ulysses_degree:
        raise ValueError(f"init_mesh: {world} rank(s) do not split into intra groups of ulysses_degree="
                         f"{ulysses_degree!r}")
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (world // ulysses_degree, ulysses_degree), mesh_dim_names=MESH_DIMS)


def mesh_groups(mesh) -> Tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """(inter group, intra group) of this rank in a mesh made by ``init_mesh``."""
    names = getattr(mesh, "mesh_dim_names", None)
    if tuple(names or ()) != MESH_DIMS:
        raise ValueError(f"the two-dimensional mode needs a DeviceMesh with dims {MESH_DIMS} (comm.init_mesh), got "
                         f"{type(mesh).__name__} with dims {names}")
    return mesh.get_group("inter"), mesh.get_group("intra")
