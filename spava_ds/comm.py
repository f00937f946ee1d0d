"""The few collectives Spava needs, the exact merge of attention partials across ranks, and the process-group
helpers.

Every collective of this module goes through ``_run``, so that ``collective_hook`` can observe or replace
them all (benchmarks time and count them, or run one rank without peers); unused, the hook costs one global read.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist

from . import kernels

# How long a rank waits for the others in a collective (and at start-up) before it gives up: long enough for the
# longest legitimate wait we know (a 7B checkpoint loading from a cold disk, rank 0 alone in a dense reference run),
# short enough that a stuck rank ends the job in minutes. Entry points take --timeout; see docs/reliability.md.
def _timeout_from_env() -> datetime.timedelta:
    text = os.environ.get("SPAVA_DIST_TIMEOUT", "300")
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ValueError(f"SPAVA_DIST_TIMEOUT must be a number of seconds > 0, got {text!r}")
    return datetime.timedelta(seconds=seconds)


DEFAULT_TIMEOUT = _timeout_from_env()


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

    The backend defaults to NCCL when CUDA is available, gloo otherwise. Returns (rank, world size); a process
    started without a launcher (no ``RANK`` in the environment) is rank 0 of 1 and initialises nothing.
    """
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            return 0, 1
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


# ---- the collective hook -----------------------------------------------------------------------------------------
_COLLECTIVE_HOOK: Optional[Callable] = None


@contextlib.contextmanager
def collective_hook(fn: Callable):
    """Inside the block, every collective of this module (those of the attention modes, of decoding and of the
    frame-parallel vision tower) is ``fn(op, *args, **kwargs)`` instead of ``op(*args, **kwargs)``.

    ``op`` is the torch.distributed function (``all_gather_into_tensor``, ``all_reduce``, ``reduce_scatter_tensor``,
    ``all_to_all_single``) and the arguments are the ones it would get (output tensor first, ``group=``,
    ``async_op=``). ``fn`` returns what ``op`` returns: a work handle (an object with ``wait()``) when
    ``async_op=True``, else None. To observe, call ``op`` and wrap its handle (e.g. to time ``wait()``); to run a
    rank without peers, return None without calling it (the outputs keep whatever they hold). The hook is
    process-wide; nested hooks: the innermost wins. Under CUDA graphs (``SpavaConfig.cuda_graphs``) the hook runs
    when a call is captured, not when it is replayed: the graph holds what the hook did then.
    """
    global _COLLECTIVE_HOOK
    previous, _COLLECTIVE_HOOK = _COLLECTIVE_HOOK, fn
    try:
        yield fn
    finally:
        _COLLECTIVE_HOOK = previous


def active_collective_hook() -> Optional[Callable]:
    """The function of the innermost ``collective_hook`` in force, or None."""
    return _COLLECTIVE_HOOK


def _run(op, *args, **kwargs):
    hook = _COLLECTIVE_HOOK
    if hook is None:
        return op(*args, **kwargs)
    return hook(op, *args, **kwargs)


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
    work = _run(_all_gather_single, out, x, group=group, async_op=async_op)
    return PendingGather(out.view((world_size,) + tuple(x.shape)), work if async_op else None)


_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_reduce_async(x: torch.Tensor, group: Optional[dist.ProcessGroup], world_size: int):
    """Sum ``x`` in place over the group; returns a handle whose ``wait()`` returns ``x``."""
    work = _run(dist.all_reduce, x, group=group, async_op=True) if world_size > 1 else None
    return PendingGather(x, work)


def reduce_scatter_async(x: torch.Tensor, group: Optional[dist.ProcessGroup], world_size: int) -> PendingGather:
    """``x [W, *shape]`` -> the sum over ranks of ``x[rank]`` (the backward of ``all_gather_async``)."""
    if world_size == 1:
        return PendingGather(x[0], None)
    out = x.new_empty(x.shape[1:])
    work = _run(_reduce_scatter_single, out, x.reshape((-1,) + tuple(x.shape[2:])).contiguous(), group=group,
                async_op=True)
    return PendingGather(out, work)


class PendingMerge:
    """Every rank's partial attention of the same rows in flight; ``wait()`` returns their exact LSE merge."""

    def __init__(self, gathered: Optional[PendingGather], head_dim: int, out_dtype: torch.dtype, done=None):
        self._gathered, self._head_dim, self._out_dtype, self._done = gathered, head_dim, out_dtype, done

    def wait(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(out [b, s, H, d] in the requested dtype, lse [b, H, s] fp32)``, the same on every rank."""
        if self._done is None:
            parts, d = self._gathered.wait(), self._head_dim
            out, lse = kernels.merge_stacked(parts[..., :d], parts[..., d], self._out_dtype)
            self._done = out, lse.transpose(1, 2)
        return self._done


def merge_partials(out: torch.Tensor, lse: torch.Tensor, group: Optional[dist.ProcessGroup], world_size: int,
                   out_dtype: Optional[torch.dtype] = None, async_op: bool = True) -> PendingMerge:
    """Start the exact merge of this rank's partial attention with the other ranks' partials of the same rows.

    ``out [b, s, H, d]`` and ``lse [b, H, s]`` (as ``kernels.attend`` returns them) over this rank's keys; the ranks'
    key sets must be disjoint. One all-gather moves ``[out | lse]`` as one fp32 tensor; ``wait()`` merges the W
    partials in one pass. Used by the prefill's query rows and by every decoding step.
    """
    out_dtype = out_dtype or out.dtype
    if world_size == 1:
        done = (out if out.dtype == out_dtype else out.to(out_dtype), lse)
        return PendingMerge(None, out.shape[-1], out_dtype, done)
    out32 = out if out.dtype == torch.float32 else out.float()  # (a no-op .float() is still one dispatch)
    packed = torch.cat([out32, lse.transpose(1, 2).unsqueeze(-1)], dim=-1)
    return PendingMerge(all_gather_async(packed, group, world_size, async_op), out.shape[-1], out_dtype)


class _AllToAll(torch.autograd.Function):
    """Uneven all-to-all of flat tensors; its backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits))
        _run(dist.all_to_all_single, out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        grad_in = grad.new_empty(sum(in_splits))
        _run(dist.all_to_all_single, grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, out_splits, in_splits, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` of a flat tensor with (possibly uneven) splits."""
    if group_rank_size(group)[1] == 1:
        return x.reshape(-1)
    return _AllToAll.apply(x.reshape(-1), list(out_splits), list(in_splits), group)


# ---- uneven row blocks (the frame-parallel vision towers) and broadcasts --------------------------------------------
def _pad_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1) + (0, n - x.shape[0])) if x.shape[0] < n else x


def _gather_uneven(x: torch.Tensor, counts, group) -> torch.Tensor:
    gathered = all_gather_async(_pad_rows(x, max(counts)), group, len(counts), async_op=False).wait()
    return torch.cat([gathered[r, :n] for r, n in enumerate(counts)])


class _GatherRows(torch.autograd.Function):
    """All-gather of uneven row blocks (padded to the largest, trimmed after) with a reduce-scatter backward.

    The backward sums the gradient of this rank's rows over all ranks: under sequence parallelism every rank feeds a
    different part of the gathered rows to its part of the language model, and the total loss is the sum of the
    ranks' losses, so each rank's rows get gradient from every rank.
    """

    @staticmethod
    def forward(ctx, x, counts, rank, group):
        ctx.counts, ctx.rank, ctx.group = counts, rank, group
        return _gather_uneven(x, counts, group)

    @staticmethod
    def backward(ctx, grad):
        counts, world = ctx.counts, len(ctx.counts)
        padded = torch.stack([_pad_rows(g, max(counts)) for g in torch.split(grad, counts)])
        summed = reduce_scatter_async(padded, ctx.group, world).wait()
        return summed[:counts[ctx.rank]], None, None, None


def gather_rows(x: torch.Tensor, counts, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Every rank's rows ``x`` (``counts[r]`` rows on rank r, any trailing shape) concatenated in rank order, on every
    rank. Differentiable: the gradient of this rank's rows is summed over the ranks."""
    rank, world = group_rank_size(group)
    counts = [int(n) for n in counts]
    if x.shape[0] != counts[rank]:
        raise ValueError(f"gather_rows: rank {rank} holds {x.shape[0]} rows but counts say {counts[rank]}")
    if world == 1:
        return x
    if torch.is_grad_enabled() and x.requires_grad:
        return _GatherRows.apply(x, counts, rank, group)
    return _gather_uneven(x, counts, group)


def broadcast_(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Overwrite ``x`` (in place) with its value on the group's rank 0; returns ``x``."""
    if group_rank_size(group)[1] > 1:
        src = dist.get_global_rank(group, 0) if group is not None else 0
        _run(dist.broadcast, x, src=src, group=group)
    return x


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


# ---- for entry points: objects gathered across ranks, and naming a rank that died ------------------------------------
def all_gather_objects(obj, group: Optional[dist.ProcessGroup] = None) -> list:
    """Every rank's ``obj`` (picklable) in rank order, on every rank; ``[obj]`` in a single process."""
    world = group_rank_size(group)[1]
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj, group: Optional[dist.ProcessGroup] = None):
    """Rank 0's ``obj`` (picklable) on every rank of ``group``."""
    if group_rank_size(group)[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return box[0]


class RankHealth:
    """How each rank ended, posted in the job's rendezvous store, so that a rank whose collective failed can name the
    peer that died: gloo's errors give a socket address, NCCL's nothing. torchrun's agent hosts the store (it outlives
    every rank); without torchrun, rank 0 hosts it, and an unreachable store means rank 0 is gone.

    ``RankHealth.connect`` returns None where the job has no TCP store to reach (no MASTER_ADDR/MASTER_PORT, or
    another kind of rendezvous): the survivors then say only that a collective failed.
    """

    def __init__(self, store: dist.Store, rank: int, world: int, host: str):
        self._store, self.rank, self.world, self.store_host = store, rank, world, host

    @classmethod
    def connect(cls, rank: int, world: int, timeout_s: float = 5.0) -> Optional["RankHealth"]:
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not addr or not port:
            return None
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        try:
            store = dist.TCPStore(addr, int(port), is_master=False, wait_for_workers=False,
                                  timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError):  # DistError is a RuntimeError
            return None
        # one namespace per run and restart: torchrun's agent keeps its store across restarts
        run = f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        return cls(dist.PrefixStore(f"spava_ds/health/{run}/", store), rank, world,
                   "torchrun's agent" if agent else "rank 0")

    def post(self, status: str) -> None:
        """Tell the other ranks how this rank ends (best effort: the store's host may be gone)."""
        try:
            self._store.set(str(self.rank), status)
        except Exception:  # noqa: BLE001 - nothing more to tell anyone
            pass

    def peers(self, wait_s: float) -> Dict[int, Optional[str]]:
        """Each other rank's posted status, waiting up to ``wait_s`` for them all; None for a rank that posted
        nothing in that time (killed, crashed in native code, or stuck). Raises ``dist.DistError`` when the store
        is unreachable."""
        statuses: Dict[int, Optional[str]] = {r: None for r in range(self.world) if r != self.rank}
        deadline = time.monotonic() + wait_s
        while True:
            for r in [r for r, s in statuses.items() if s is None]:
                if self._store.check([str(r)]):
                    statuses[r] = self._store.get(str(r)).decode("utf-8", "replace")
            if all(s is not None for s in statuses.values()) or time.monotonic() > deadline:
                return statuses
            time.sleep(0.1)


def raise_if_any_rank_failed(error: Optional[str], group: Optional[dist.ProcessGroup] = None,
                             exc_type: type = RuntimeError) -> None:
    """Collective: every rank of ``group`` raises ``exc_type`` when any rank passes an error message, naming the
    ranks and their messages. A rank-local failure (e.g. its own frames did not decode) then stops every rank
    before the next collective instead of leaving the others waiting in it."""
    messages = all_gather_objects(error, group)
    failed = [(r, m) for r, m in enumerate(messages) if m]
    if failed:
        raise exc_type(failed[0][1] if len(messages) == 1 else
                       "; ".join(f"rank {r} of {len(messages)}: {m}" for r, m in failed))
