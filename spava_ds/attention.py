"""Sequence-parallel attention in the zigzag layout: Spava (prefill, forward and backward) and the exact modes.

Rank r holds ``[anchor | block r | block 2W-1-r | query]`` (see ``layout.py``, which also says who sends what to
whom: ``passing_plan`` and ``key_share``; this module handles the tensors). One Spava call:

1. score its two blocks' keys against the query, keep the top-k per KV head of each (the passing blocks) and
   all-gather them, one async all-gather per half (every rank's first blocks, then every rank's second blocks);
2. attend the query rows to this rank's share of the keys (its two blocks; on rank 0 also the anchor and,
   causally, the query itself), and start the exact merge of the partials of every rank (``comm.merge_partials``);
3. anchor and block r: causal over ``[anchor | block r]``, block rows also over the passing keys of blocks < r;
4. block 2W-1-r: passing keys of blocks < 2W-1-r and the anchor, plus its own block causally;
5. finish the merge of the query partials: the query rows get exact attention.

The all-gathers run under the attention of steps 2-4 (``SpavaConfig.overlap``). What a mode is comes from
``config.MODE_TABLE``: mode ``ring`` is the same schedule with whole blocks passed instead of a selection, which
makes it exact zigzag context parallelism (the key/value blocks travel by all-gather rather than hop by hop; see
docs/algorithm.md); ``star`` and ``apb`` run it on the contiguous layout; ``ulysses`` exchanges heads for sequence
with all-to-alls. The two-dimensional mode (``mesh_attention``, ``MeshLayout``) wraps a block-schedule mode in
an all-to-all over heads inside each intra group (a node). Each step runs in a ``profiling.span``
("spava.select", "spava.attend.query", ...).

The backward pass of one call is one autograd node that issues its collectives in a fixed order on every rank:
the all-reduce of the query rows' output gradient, then the reduce-scatter of each passing block's gradient back
to the rank that selected it. Replicated tokens (anchor, query) get partial gradients (see ``layout.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import comm, kernels
from .config import MESH_MODES, SpavaConfig
from .layout import KeyRange, LocalSegments, MeshLayout, PassingPlan, ZigzagLayout, current_layout
from .profiling import span
from .select import block_scores, gather_passing, query_summary, topk_indices


def _check_inputs(q, k, v, layout, rank: int, world_size: int, needs_query: bool,
                  who: str = "spava_attention") -> None:
    if layout.world_size != world_size:
        raise ValueError(f"{who}: the layout is for {layout.world_size} ranks, the group has {world_size}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{who}: q, k and v must be [batch, seq, heads, head_dim]")
    if not (q.dtype == k.dtype == v.dtype and q.is_floating_point()):
        raise ValueError(f"{who}: q, k and v must have one floating-point dtype, got {q.dtype}, {k.dtype} "
                         f"and {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"{who}: k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{who}: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch, "
                         "sequence or head_dim")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"{who}: q and k need at least one head each, got {q.shape[2]} query and "
                         f"{k.shape[2]} KV heads")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{who}: {q.shape[2]} query heads are not a multiple of {k.shape[2]} KV heads")
    if q.shape[1] != layout.local_len(rank):
        raise ValueError(f"{who}: rank {rank} got {q.shape[1]} tokens, its share of the layout is "
                         f"{layout.local_len(rank)} ({layout})")
    if needs_query and layout.query_len == 0:
        raise ValueError(f"{who} needs a query block (query_len >= 1): the passing keys are chosen by "
                         "their score against the query")


@dataclasses.dataclass
class _Call:
    """Everything about one call that is not a tensor (the topology comes from the layout)."""

    group: Optional[dist.ProcessGroup]
    rank: int
    world: int
    backend: str
    scale: Optional[float]
    pool_kernel: int
    overlap: bool
    exact: bool              # ring: whole blocks pass, nothing is selected
    anchor_len: int
    seg: LocalSegments       # where the anchor, the blocks and the query sit locally
    passing: PassingPlan     # what the blocks send and receive
    keys: Tuple[KeyRange, ...]  # this rank's share of the keys for the exact query rows
    needs_grad: bool         # keep what the backward pass needs (the merged LSE of the first block's rows)


def _make_call(layout, config, group, rank, world, layer_idx, scale, exact, needs_grad) -> _Call:
    budget = None if exact else config.resolve_passing_len(layout.context_len, layer_idx)
    return _Call(group, rank, world, config.backend, scale, config.pool_kernel, config.overlap, exact,
                 layout.anchor_len, layout.local_segments(rank), layout.passing_plan(rank, budget),
                 layout.key_share(rank), needs_grad)


def _selection(call: _Call, which: int, k, v, qbar):
    """What local block ``which`` (0: first, 1: second) sends: its passing keys and values packed
    ``[b, n, Hkv, 2d]``, padded to the gather's size, and the indices of the selection (None when the whole block
    or nothing is sent)."""
    size, gather_size = call.passing.send[which], call.passing.gather_sizes[which]
    if size == 0:  # the block precedes no block: zeros keep the all-gather's shape
        return k.new_zeros(k.shape[0], gather_size, k.shape[2], 2 * k.shape[3]), None
    start, end = call.seg.block1 if which == 0 else call.seg.block2
    if call.exact:
        sel, idx = torch.cat([k[:, start:end], v[:, start:end]], dim=-1), None
    else:
        idx = topk_indices(block_scores(k[:, start:end], qbar, call.pool_kernel), size)
        sel = gather_passing(k[:, start:end], v[:, start:end], idx)
    if size < gather_size:  # blocks differ by one token: pad so every rank sends the same shape
        sel = F.pad(sel, (0, 0, 0, 0, 0, gather_size - size))
    return sel, idx


def _passing_kv(sources, gathered, d: int, anchor_k=None, anchor_v=None):
    """Keys and values of the passing ``sources`` ((half, rank, tokens) slots of the ``gathered`` halves), then the
    anchor's if given, each one contiguous tensor, or (None, None) when there are none. The packed [K | V] halves
    are split here: the kernels get dense inputs."""
    packed = [gathered[half][rank][:, :n] for half, rank, n in sources]
    keys = [p[..., :d] for p in packed] + ([anchor_k] if anchor_k is not None else [])
    values = [p[..., d:] for p in packed] + ([anchor_v] if anchor_v is not None else [])
    if not keys:
        return None, None
    return torch.cat(keys, dim=1), torch.cat(values, dim=1)


def _forward(call: _Call, q, k, v):
    seg, plan, la, d, attend = call.seg, call.passing, call.anchor_len, q.shape[-1], kernels.attend
    (b1s, b1e), (b2s, b2e), (qs, qe) = seg.block1, seg.block2, seg.query
    kw = dict(backend=call.backend, scale=call.scale)
    state = dict(idx1=None, idx2=None, g1=None, g2=None, lse_b2=None)

    # 1. Passing blocks: select, then gather, half by half so the second selection runs under the first transfer.
    p1 = p2 = None
    if plan.gather_sizes[0]:
        with span("spava.select"):
            qbar = None if call.exact else query_summary(q[:, qs:qe], k.shape[2])
            sel1, state["idx1"] = _selection(call, 0, k, v, qbar)
        p1 = comm.all_gather_async(sel1, call.group, call.world, call.overlap)
        if plan.gather_sizes[1]:
            with span("spava.select"):
                sel2, state["idx2"] = _selection(call, 1, k, v, qbar)
            p2 = comm.all_gather_async(sel2, call.group, call.world, call.overlap)

    # 2. Query rows over this rank's share of the keys; the partials of all ranks merge by LSE in step 5.
    with span("spava.attend.query"):
        q_rows = q[:, qs:qe]
        out_q, lse_q = kernels.merge([attend(q_rows, k[:, s:e], v[:, s:e], causal=c, **kw) for s, e, c in call.keys],
                                     torch.float32)
        merged_q = comm.merge_partials(out_q, lse_q, call.group, call.world, q.dtype, call.overlap)

    # 3. Anchor and block r: causal over [anchor | block r]; block rows also see the passing of blocks < r.
    with span("spava.attend.block1"):
        out_ab, lse_ab = attend(q[:, :b1e], k[:, :b1e], v[:, :b1e], causal=True, **kw)
        g1 = state["g1"] = p1.wait() if p1 is not None else None
        pass_k, pass_v = _passing_kv(plan.receive[0], (g1, None), d)
        if pass_k is not None:
            out_b1, lse_b1 = kernels.merge([(out_ab[:, la:], lse_ab[:, :, la:]),
                                            attend(q[:, b1s:b1e], pass_k, pass_v, **kw)])
            outs = [out_ab[:, :la], out_b1]  # joined once, with the other rows, at the end
            lse_ab = torch.cat([lse_ab[:, :, :la], lse_b1], 2) if call.needs_grad else None
        else:
            outs = [out_ab]
        state["lse_ab"] = lse_ab

    # 4. Block 2W-1-r: [passing of blocks < 2W-1-r | anchor], then its own block causally.
    if len(plan.receive) == 2:
        with span("spava.attend.block2"):
            g2 = state["g2"] = p2.wait() if p2 is not None else None
            prefix_k, prefix_v = _passing_kv(plan.receive[1], (g1, g2), d, k[:, :la], v[:, :la])
            q_b2 = q[:, b2s:b2e]
            out_b2, state["lse_b2"] = kernels.merge([
                attend(q_b2, prefix_k, prefix_v, **kw),
                attend(q_b2, k[:, b2s:b2e], v[:, b2s:b2e], causal=True, **kw)])
            outs.append(out_b2)

    # 5. Exact query rows: the LSE merge of every rank's partial, all W at once.
    with span("spava.merge.query"):
        out_q, state["lse_q"] = merged_q.wait()
    outs.append(out_q)
    return torch.cat([o.to(q.dtype) for o in outs], dim=1), state


def _backward(call: _Call, dout, q, k, v, out, state):
    seg, plan, la, d = call.seg, call.passing, call.anchor_len, q.shape[-1]
    (b1s, b1e), (qs, qe) = seg.block1, seg.query
    kw = dict(backend=call.backend, scale=call.scale)
    dq, dk, dv = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (q, k, v)]
    gathered = (state["g1"], state["g2"])
    dgathered = tuple(torch.zeros_like(g, dtype=torch.float32) if g is not None else None for g in gathered)

    def add(rows: slice, keys: Optional[slice], piece_grads):
        dq[:, rows] += piece_grads[0]
        if keys is not None:
            dk[:, keys] += piece_grads[1]
            dv[:, keys] += piece_grads[2]

    def scatter_passing(sources, dpass):
        offset = 0
        for half, rank, n in sources:
            dgathered[half][rank][:, :n] += dpass[:, offset:offset + n]
            offset += n

    # Collective 1: every rank needs the total output gradient of the (replicated) query rows.
    dq_rows = comm.all_reduce_async(dout[:, qs:qe].float().contiguous(), call.group, call.world)

    if len(plan.receive) == 2:
        with span("spava.backward.block2"):
            rows = slice(*seg.block2)
            sources = plan.receive[1]
            prefix_k, prefix_v = _passing_kv(sources, gathered, d, k[:, :la], v[:, :la])
            args = (dout[:, rows], q[:, rows])
            lse_b2 = state["lse_b2"]
            gq, gk, gv = kernels.attend_backward(*args, prefix_k, prefix_v, out[:, rows], lse_b2, **kw)
            dq[:, rows] += gq
            n_pass = prefix_k.shape[1] - la
            dk[:, :la] += gk[:, n_pass:]
            dv[:, :la] += gv[:, n_pass:]
            if sources:
                scatter_passing(sources, torch.cat([gk[:, :n_pass], gv[:, :n_pass]], dim=-1).float())
            add(rows, rows, kernels.attend_backward(*args, k[:, rows], v[:, rows], out[:, rows], lse_b2, causal=True,
                                                    **kw))

    with span("spava.backward.block1"):
        rows = slice(0, b1e)
        lse_ab = state["lse_ab"]
        add(rows, rows, kernels.attend_backward(dout[:, rows], q[:, rows], k[:, rows], v[:, rows], out[:, rows],
                                                lse_ab, causal=True, **kw))
        sources = plan.receive[0]
        if sources:
            pass_k, pass_v = _passing_kv(sources, gathered, d)
            gq, gk, gv = kernels.attend_backward(dout[:, b1s:b1e], q[:, b1s:b1e], pass_k, pass_v, out[:, b1s:b1e],
                                                 lse_ab[:, :, la:], **kw)
            dq[:, b1s:b1e] += gq
            scatter_passing(sources, torch.cat([gk, gv], dim=-1).float())

    # Collectives 2 and 3: each passing block's gradient goes back to the rank that selected it.
    pending = [comm.reduce_scatter_async(g, call.group, call.world) if g is not None else None for g in dgathered]

    with span("spava.backward.query"):  # the query rows, with the total output gradient
        dout_q = dq_rows.wait()
        out_q, lse_q = out[:, qs:qe], state["lse_q"]
        for s, e, causal in call.keys:
            add(slice(qs, qe), slice(s, e), kernels.attend_backward(dout_q.to(q.dtype), q[:, qs:qe], k[:, s:e],
                                                                    v[:, s:e], out_q, lse_q, causal=causal, **kw))

    for which, (p, (start, end)) in enumerate(zip(pending, (seg.block1, seg.block2))):
        size = plan.send[which] if which < len(plan.send) else 0
        if p is None or size == 0:
            continue  # this block sent zeros
        dsel = p.wait()[:, :size]
        idx = state["idx1" if which == 0 else "idx2"]
        if idx is None:  # whole block passed (ring)
            dk[:, start:end] += dsel[..., :d]
            dv[:, start:end] += dsel[..., d:]
        else:
            index = idx.transpose(1, 2).unsqueeze(-1).expand(-1, -1, -1, d)
            dk[:, start:end].scatter_add_(1, index, dsel[..., :d])
            dv[:, start:end].scatter_add_(1, index, dsel[..., d:])
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _ZigzagAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, call):
        out, state = _forward(call, q, k, v)
        ctx.call = call
        names = sorted(n for n, t in state.items() if t is not None)
        ctx.names = names
        ctx.save_for_backward(q, k, v, out, *[state[n] for n in names])
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, *saved = ctx.saved_tensors
        state = dict(idx1=None, idx2=None, g1=None, g2=None, lse_b2=None)
        state.update(zip(ctx.names, saved))
        dq, dk, dv = _backward(ctx.call, dout, q, k, v, out, state)
        return dq, dk, dv, None


def _zigzag_attention(q, k, v, layout, config, group, layer_idx, scale, exact):
    rank, world = comm.group_rank_size(group)
    _check_inputs(q, k, v, layout, rank, world, needs_query=not exact)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    call = _make_call(layout, config, group, rank, world, layer_idx, scale, exact, needs_grad)
    return _ZigzagAttention.apply(q, k, v, call)


def spava_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: ZigzagLayout,
                    config: Optional[SpavaConfig] = None, group: Optional[dist.ProcessGroup] = None,
                    layer_idx: Optional[int] = None, scale: Optional[float] = None) -> torch.Tensor:
    """Spava attention for this rank's tokens (differentiable).

    Args:
        q: ``[b, s_local, Hq, d]`` queries after RoPE, in the layout's local order for this rank.
        k, v: ``[b, s_local, Hkv, d]`` keys (after RoPE) and values; GQA is native (Hq a multiple of Hkv).
        layout: the ``ZigzagLayout`` of the sequence (same on every rank).
        config: defaults to ``layout.config``.
        group: the sequence-parallel process group (default: the world).
        layer_idx: needed when ``config.passing_len`` is a per-layer list.
        scale: softmax scale, default ``head_dim ** -0.5``.

    Returns ``[b, s_local, Hq, d]``: the attention output of this rank's tokens, in local order.
    """
    config = config if config is not None else layout.config
    return _zigzag_attention(q, k, v, layout, config, group, layer_idx, scale, exact=False)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: ZigzagLayout,
                      group: Optional[dist.ProcessGroup] = None, scale: Optional[float] = None,
                      local_attention: Optional[Callable] = None) -> torch.Tensor:
    """Exact attention by head parallelism (DeepSpeed-Ulysses) in the zigzag layout.

    An all-to-all gives every rank the whole sequence (rebuilt in global order) for W-th of the heads; after
    attention a second all-to-all returns each rank's tokens. KV heads fewer than W are replicated, as DeepSpeed
    does. ``local_attention(q, k, v)`` on ``[b, S, heads/W, d]`` defaults to causal SDPA.
    """
    rank, world = comm.group_rank_size(group)
    _check_inputs(q, k, v, layout, rank, world, needs_query=False)
    b, s_local, hq, d = q.shape
    hkv = k.shape[2]
    if hq % world:
        raise ValueError(f"ulysses: {hq} query heads do not split over {world} ranks")
    if hkv % world:
        if world % hkv:
            raise ValueError(f"ulysses: {hkv} KV heads neither split over nor divide {world} ranks")
        k, v = k.repeat_interleave(world // hkv, dim=2), v.repeat_interleave(world // hkv, dim=2)
    lens = [layout.local_len(r) for r in range(world)]

    def to_heads(x):
        """[b, s_local, H, d] on every rank -> [b, S, H/W, d] in global order for this rank's heads."""
        h = x.shape[2] // world
        send = x.reshape(b, s_local, world, h, d).permute(2, 0, 1, 3, 4)
        recv = comm.all_to_all(send, [b * n * h * d for n in lens], [b * s_local * h * d] * world, group)
        parts = [p.view(b, n, h, d) for p, n in zip(recv.split([b * n * h * d for n in lens]), lens)]
        return layout.unshard(parts)

    with span("spava.ulysses"):
        qh, kh, vh = to_heads(q), to_heads(k), to_heads(v)
        if local_attention is None:
            oh = kernels.dense_causal_attention(qh, kh, vh, scale)
        else:
            oh = local_attention(qh, kh, vh)
        h = oh.shape[2]
        send = torch.cat([layout.shard(oh, r).reshape(-1) for r in range(world)])
        recv = comm.all_to_all(send, [b * s_local * h * d] * world, [b * n * h * d for n in lens], group)
        return recv.view(world, b, s_local, h, d).permute(1, 2, 0, 3, 4).reshape(b, s_local, hq, d)


def sp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Optional[ZigzagLayout] = None,
                 config: Optional[SpavaConfig] = None, group: Optional[dist.ProcessGroup] = None,
                 layer_idx: Optional[int] = None, scale: Optional[float] = None,
                 local_attention: Optional[Callable] = None) -> torch.Tensor:
    """Sequence-parallel attention in the layout's local order, in the mode of ``config.mode``.

    Same tensors as ``spava_attention``; ``layout`` defaults to ``current_layout()``. With a ``MeshLayout`` this is
    ``mesh_attention`` and ``group`` is its ``DeviceMesh``. Modes: ``spava``, ``star``
    and ``apb`` (approximate), ``ring`` and ``ulysses`` (exact), ``dense`` (exact, a group of one). ``local_attention``
    is used by mode ``ulysses`` only: a callable ``(q, k, v) -> out`` on the full sequence in global order
    ``[b, S, heads/W, d]``, as DeepSpeed's DistributedAttention calls it (default: causal SDPA).
    """
    layout = layout if layout is not None else current_layout()
    if layout is None:
        raise ValueError("sp_attention: no layout given and none set with spava_ds.use_layout(...)")
    config = config if config is not None else layout.config
    if isinstance(layout, MeshLayout):  # the two-dimensional mode: group is the DeviceMesh
        return mesh_attention(q, k, v, layout, group, config, layer_idx, scale)
    if config.ulysses_degree > 1:
        raise ValueError(f"sp_attention: ulysses_degree={config.ulysses_degree} needs a MeshLayout "
                         "(spava_ds.make_layout), got a flat ZigzagLayout")
    mode = config.mode_spec
    if mode.schedule == "blocks":
        return _zigzag_attention(q, k, v, layout, config, group, layer_idx, scale, exact=mode.passing == "whole")
    if mode.schedule == "heads":
        return ulysses_attention(q, k, v, layout, group, scale, local_attention)
    # "local": one process holds the whole sequence in global order
    rank, world = comm.group_rank_size(group)
    if world != 1:
        raise ValueError(f"mode {config.mode!r} runs in one process; the group has {world} ranks (use ring or ulysses)")
    _check_inputs(q, k, v, layout, rank, world, needs_query=False)
    return kernels.dense_causal_attention(q, k, v, scale)


# ---- the two-dimensional mode: Ulysses inside each intra group, the zigzag mode over the inter groups ------------
def _tokens_to_heads(tensors: List[torch.Tensor], lens: List[int], group) -> List[torch.Tensor]:
    """Each intra rank's token share ``[b, lens[j], H, d]`` -> the whole local sequence ``[b, sum(lens), H/U, d]``
    for this rank's heads, every tensor in one all-to-all."""
    u, n = len(lens), tensors[0].shape[1]
    b, d = tensors[0].shape[0], tensors[0].shape[3]
    heads = [t.shape[2] // u for t in tensors]
    # [U, everything for destination u]: for each tensor, destination u's heads of this rank's tokens
    send = torch.cat([t.reshape(b, n, u, h, d).permute(2, 0, 1, 3, 4).reshape(u, -1) for t, h in zip(tensors, heads)],
                     dim=1)
    per_token = b * d * sum(heads)
    recv = comm.all_to_all(send, [per_token * m for m in lens], [send.shape[1]] * u, group)
    chunks = [c.split([b * m * h * d for h in heads]) for c, m in zip(recv.split([per_token * m for m in lens]), lens)]
    return [torch.cat([c[t].view(b, m, h, d) for c, m in zip(chunks, lens)], dim=1) for t, h in enumerate(heads)]


def _heads_to_tokens(x: torch.Tensor, lens: List[int], intra_rank: int, group) -> torch.Tensor:
    """The reverse of ``_tokens_to_heads`` for one tensor: ``[b, sum(lens), h, d]`` -> ``[b, lens[j], U*h, d]``."""
    u, (b, _, h, d) = len(lens), x.shape
    n = lens[intra_rank]
    send = torch.cat([piece.reshape(-1) for piece in x.split(lens, dim=1)])
    recv = comm.all_to_all(send, [b * n * h * d] * u, [b * m * h * d for m in lens], group)
    return recv.view(u, b, n, h, d).permute(1, 2, 0, 3, 4).reshape(b, n, u * h, d)


def _check_mesh_inputs(q, k, v, layout: MeshLayout, mesh, config: SpavaConfig, rank: int) -> None:
    shape = tuple(mesh.shape)
    if shape != (layout.inter_size, layout.intra_size):
        raise ValueError(f"mesh_attention: the mesh is {shape}, the layout needs (inter {layout.inter_size}, intra "
                         f"{layout.intra_size})")
    if not config.mode_spec.mesh:
        raise ValueError(f"mesh_attention: mode {config.mode!r} does not run on the inter groups; use one of "
                         f"{MESH_MODES}")
    _check_inputs(q, k, v, layout, rank, layout.world_size, config.mode_spec.needs_query, who="mesh_attention")
    u, hq, hkv = layout.intra_size, q.shape[2], k.shape[2]
    if hq % u:
        raise ValueError(f"mesh_attention: {hq} query heads do not split over ulysses_degree={u}")
    if hkv % u and u % hkv:
        raise ValueError(f"mesh_attention: {hkv} KV heads neither split over nor divide ulysses_degree={u}")


def mesh_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: MeshLayout, mesh,
                   config: Optional[SpavaConfig] = None, layer_idx: Optional[int] = None,
                   scale: Optional[float] = None) -> torch.Tensor:
    """Two-dimensional sequence parallelism (differentiable): Ulysses inside each intra group, the zigzag mode of
    ``config`` (spava, or ring for exact attention) over the inter groups.

    Args:
        q, k, v: this rank's tokens (``layout.shard``), ``[b, s_local, Hq, d]`` and ``[b, s_local, Hkv, d]``.
        layout: the ``MeshLayout``; mesh: the ``DeviceMesh`` of ``comm.init_mesh(layout.intra_size)``.

    One all-to-all in the intra group gives each rank its inter rank's whole local sequence for ``Hq/U`` query and
    ``Hkv/U`` KV heads (span ``spava.mesh.to_heads``); the zigzag mode runs on the inter group as ``sp_attention``
    does with W = inter size; one all-to-all returns each rank's tokens (``spava.mesh.to_tokens``). The result is
    the flat mode's at the inter size (head by head). Fewer KV heads than U are replicated first, as
    DeepSpeed-Ulysses does: each copy then scores and selects its passing tokens for its own query heads, i.e.
    Spava of the model with its KV heads repeated U / Hkv times.
    """
    config = config if config is not None else layout.config
    inter_group, intra_group = comm.mesh_groups(mesh)
    i, j = comm.group_rank_size(inter_group)[0], comm.group_rank_size(intra_group)[0]
    _check_mesh_inputs(q, k, v, layout, mesh, config, i * layout.intra_size + j)
    lens = layout.share_lens(i)
    with span("spava.mesh.to_heads"):
        copies = layout.intra_size // k.shape[2]  # > 1: fewer KV heads than U
        if copies > 1:
            k, v = k.repeat_interleave(copies, dim=2), v.repeat_interleave(copies, dim=2)
        qh, kh, vh = _tokens_to_heads([q, k, v], lens, intra_group)
    flat = layout.inter.config if config is layout.config else dataclasses.replace(config, ulysses_degree=1)
    out = sp_attention(qh, kh, vh, layout.inter, flat, inter_group, layer_idx, scale)
    with span("spava.mesh.to_tokens"):
        return _heads_to_tokens(out, lens, j, intra_group)
