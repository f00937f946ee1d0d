"""Sequence-parallel attention in the zigzag layout: Spava (prefill, forward and backward) and the exact modes.

Rank r holds ``[anchor | block r | block 2W-1-r | query]`` (see ``layout.py``). One Spava call:

1. score its two blocks' keys against the query, keep the top-k per KV head of each (the passing blocks) and
   all-gather them, one async all-gather per virtual-host half (blocks 0..W-1, then blocks W..2W-1);
2. attend the query rows to this rank's share of the keys (its two blocks; on rank 0 also the anchor and,
   causally, the query itself), and all-gather the partial outputs with their LSE;
3. anchor and block r: causal over ``[anchor | block r]``, block rows also over the passing keys of blocks < r;
4. block 2W-1-r: passing keys of blocks < 2W-1-r and the anchor, plus its own block causally;
5. merge the query partials of all ranks by LSE: the query rows get exact attention.

The all-gathers run under the attention of steps 2-4 (``SpavaConfig.overlap``). Mode ``ring`` is the same
schedule with whole blocks passed instead of a selection, which makes it exact zigzag context parallelism (the
key/value blocks travel by all-gather rather than hop by hop; see docs/algorithm.md). ``star`` and ``apb`` run the
same code on the contiguous layout. ``ulysses`` exchanges heads for sequence with all-to-alls.

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
from .layout import MeshLayout, ZigzagLayout, current_layout
from .select import gather_passing, query_summary, block_scores, topk_indices


def _check_inputs(q, k, v, layout: ZigzagLayout, rank: int, world_size: int, needs_query: bool) -> None:
    if layout.world_size != world_size:
        raise ValueError(f"spava_attention: the layout is for {layout.world_size} ranks, the group has {world_size}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("spava_attention: q, k and v must be [batch, seq, heads, head_dim]")
    if k.shape != v.shape:
        raise ValueError(f"spava_attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"spava_attention: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch, "
                         "sequence or head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"spava_attention: {q.shape[2]} query heads are not a multiple of {k.shape[2]} KV heads")
    if q.shape[1] != layout.local_len(rank):
        raise ValueError(f"spava_attention: rank {rank} got {q.shape[1]} tokens, its share of the layout is "
                         f"{layout.local_len(rank)} ({layout})")
    if needs_query and layout.query_len == 0:
        raise ValueError("spava_attention needs a query block (query_len >= 1): the passing keys are chosen by "
                         "their score against the query")


@dataclasses.dataclass
class _Plan:
    """Everything about one call that is not a tensor."""

    layout: ZigzagLayout
    group: Optional[dist.ProcessGroup]
    rank: int
    world: int
    backend: str
    scale: Optional[float]
    pool_kernel: int
    overlap: bool
    exact: bool          # ring: pass whole blocks
    passing: int         # budget per block (tokens per KV head); > 0 means there are passing blocks
    ks: List[int]        # tokens block u sends
    kmax: Tuple[int, int]  # padded sizes of the two all-gathers
    needs_grad: bool     # keep what the backward pass needs (the merged LSE of the first block's rows)

    @property
    def hosts(self) -> Tuple[int, ...]:
        return self.layout.virtual_hosts(self.rank)

    def second_ranks(self) -> range:
        """Ranks whose second block (2W-1-u) precedes this rank's second block, in sequence order."""
        return range(self.world - 1, self.rank, -1)


def _make_plan(layout, config, group, layer_idx, scale, exact, needs_grad) -> _Plan:
    rank, world = comm.group_rank_size(group)
    backend = config.backend
    if exact:
        ks = [layout.block_len(u) for u in range(layout.num_blocks)]
        passing = max(ks)
    else:
        passing = config.resolve_passing_len(layout.context_len, layer_idx)
        ks = [min(passing, layout.block_len(u)) for u in range(layout.num_blocks)]
    half = world if layout.zigzag else layout.num_blocks
    kmax = (max(ks[:half]), max(ks[half:], default=0))
    return _Plan(layout, group, rank, world, backend, scale, config.pool_kernel, config.overlap, exact, passing, ks,
                 kmax, needs_grad)


def _select(plan: _Plan, k, v, qbar, start: int, end: int, kk: int, kmax: int):
    """Packed passing block ``[b, kmax, Hkv, 2d]`` of local block [start, end) and its indices (None if whole)."""
    if plan.exact:
        sel, idx = torch.cat([k[:, start:end], v[:, start:end]], dim=-1), None
    else:
        idx = topk_indices(block_scores(k[:, start:end], qbar, plan.pool_kernel), kk)
        sel = gather_passing(k[:, start:end], v[:, start:end], idx)
    if kk < kmax:  # blocks differ by one token: pad so every rank sends the same shape
        sel = F.pad(sel, (0, 0, 0, 0, 0, kmax - kk))
    return sel, idx


def _passing(plan: _Plan, g1: Optional[torch.Tensor], g2: Optional[torch.Tensor], second: bool) -> List:
    """The (source, slot, length) list making up the passing block of this rank's first or second block."""
    v1 = plan.hosts[0]
    if not second:
        return [(1, u, plan.ks[u]) for u in range(v1)] if g1 is not None else []
    if g1 is None:
        return []
    out = [(1, u, plan.ks[u]) for u in range(plan.world)]
    if g2 is not None:
        out += [(2, u, plan.ks[2 * plan.world - 1 - u]) for u in plan.second_ranks()]
    return out


def _passing_kv(parts, g1, g2, d: int, anchor_k=None, anchor_v=None):
    """Keys and values of the passing ``parts`` (then the anchor's, if given), each one contiguous tensor, or
    (None, None) when there are none. The packed [K | V] halves are split here: the kernels get dense inputs."""
    packed = [(g1 if src == 1 else g2)[u][:, :n] for src, u, n in parts]
    keys = [p[..., :d] for p in packed] + ([anchor_k] if anchor_k is not None else [])
    values = [p[..., d:] for p in packed] + ([anchor_v] if anchor_v is not None else [])
    if not keys:
        return None, None
    return torch.cat(keys, dim=1), torch.cat(values, dim=1)


def _query_pieces(plan: _Plan, seg) -> List[Tuple[int, int, bool]]:
    """Key ranges (local) of this rank's share for the exact query rows: its blocks, on rank 0 with the anchor in
    front (the whole anchor, right before block 1 in local order: one piece, one attention call), and the query."""
    a0, a1 = plan.layout.anchor_share(plan.rank)
    pieces = [(a0 if a1 > a0 else seg.block1[0], seg.block2[1], False)]
    if plan.rank == 0:
        pieces.append((seg.query[0], seg.query[1], True))
    return pieces


def _forward(plan: _Plan, q, k, v):
    layout, d, attend = plan.layout, q.shape[-1], kernels.attend
    seg = layout.local_segments(plan.rank)
    la = layout.anchor_len
    (b1s, b1e), (b2s, b2e), (qs, qe) = seg.block1, seg.block2, seg.query
    hosts = plan.hosts
    kw = dict(backend=plan.backend, scale=plan.scale)
    state = dict(idx1=None, idx2=None, g1=None, g2=None, lse_b2=None)

    # 1. Passing blocks: select, then gather, half by half so the second selection runs under the first transfer.
    p1 = p2 = None
    if plan.passing > 0 and (plan.world > 1 or len(hosts) == 2):
        qbar = None if plan.exact else query_summary(q[:, qs:qe], k.shape[2])
        sel1, state["idx1"] = _select(plan, k, v, qbar, b1s, b1e, plan.ks[hosts[0]], plan.kmax[0])
        p1 = comm.all_gather_async(sel1, plan.group, plan.world, plan.overlap)
        if len(hosts) == 2 and plan.world > 1:
            # Block 2W-1 (rank 0's second) precedes no block: rank 0 sends zeros in its place.
            if plan.rank > 0:
                sel2, state["idx2"] = _select(plan, k, v, qbar, b2s, b2e, plan.ks[hosts[1]], plan.kmax[1])
            else:
                sel2 = q.new_zeros(q.shape[0], plan.kmax[1], k.shape[2], 2 * d, dtype=k.dtype)
            p2 = comm.all_gather_async(sel2, plan.group, plan.world, plan.overlap)

    # 2. Query rows over this rank's share of the keys; partials travel packed as fp32 [out | lse].
    q_rows = q[:, qs:qe]
    out_q, lse_q = kernels.merge([attend(q_rows, k[:, s:e], v[:, s:e], causal=c, **kw)
                                  for s, e, c in _query_pieces(plan, seg)], torch.float32)
    pq = comm.all_gather_async(torch.cat([out_q, lse_q.transpose(1, 2).unsqueeze(-1)], dim=-1), plan.group,
                               plan.world, plan.overlap)

    # 3. Anchor and block r: causal over [anchor | block r]; block rows also see the passing of blocks < r.
    out_ab, lse_ab = attend(q[:, :b1e], k[:, :b1e], v[:, :b1e], causal=True, **kw)
    g1 = state["g1"] = p1.wait() if p1 is not None else None
    pass_k, pass_v = _passing_kv(_passing(plan, g1, None, second=False), g1, None, d)
    if pass_k is not None:
        out_b1, lse_b1 = kernels.merge([(out_ab[:, la:], lse_ab[:, :, la:]), attend(q[:, b1s:b1e], pass_k, pass_v,
                                                                                     **kw)])
        outs = [out_ab[:, :la], out_b1]  # joined once, with the other rows, at the end
        lse_ab = torch.cat([lse_ab[:, :, :la], lse_b1], 2) if plan.needs_grad else None
    else:
        outs = [out_ab]
    state["lse_ab"] = lse_ab

    # 4. Block 2W-1-r: [passing of blocks < 2W-1-r | anchor], then its own block causally.
    if len(hosts) == 2:
        g2 = state["g2"] = p2.wait() if p2 is not None else None
        prefix_k, prefix_v = _passing_kv(_passing(plan, g1, g2, second=True), g1, g2, d, k[:, :la], v[:, :la])
        q_b2 = q[:, b2s:b2e]
        out_b2, state["lse_b2"] = kernels.merge([
            attend(q_b2, prefix_k, prefix_v, **kw),
            attend(q_b2, k[:, b2s:b2e], v[:, b2s:b2e], causal=True, **kw)])
        outs.append(out_b2)

    # 5. Exact query rows: LSE merge of every rank's partial, all W at once.
    partials = pq.wait()
    out_q, lse_q = kernels.merge_stacked(partials[..., :d], partials[..., d])
    state["lse_q"] = lse_q.transpose(1, 2)
    outs.append(out_q)
    return torch.cat([o.to(q.dtype) for o in outs], dim=1), state


def _backward(plan: _Plan, dout, q, k, v, out, state):
    layout, d = plan.layout, q.shape[-1]
    seg = layout.local_segments(plan.rank)
    la = layout.anchor_len
    (b1s, b1e), (b2s, b2e), (qs, qe) = seg.block1, seg.block2, seg.query
    hosts = plan.hosts
    kw = dict(backend=plan.backend, scale=plan.scale)
    grad = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (q, k, v)]
    dq, dk, dv = grad
    g1, g2 = state["g1"], state["g2"]

    def add(rows: slice, keys: Optional[slice], piece_grads):
        dq[:, rows] += piece_grads[0]
        if keys is not None:
            dk[:, keys] += piece_grads[1]
            dv[:, keys] += piece_grads[2]

    # Collective 1: every rank needs the total output gradient of the (replicated) query rows.
    dq_rows = comm.all_reduce_async(dout[:, qs:qe].float().contiguous(), plan.group, plan.world)

    dg1 = torch.zeros_like(g1, dtype=torch.float32) if g1 is not None else None
    dg2 = torch.zeros_like(g2, dtype=torch.float32) if g2 is not None else None

    def scatter_passing(parts, dpass):
        offset = 0
        for src, u, n in parts:
            (dg1 if src == 1 else dg2)[u][:, :n] += dpass[:, offset:offset + n]
            offset += n

    # Block 2W-1-r.
    if len(hosts) == 2:
        rows = slice(b2s, b2e)
        parts = _passing(plan, g1, g2, second=True)
        prefix_k, prefix_v = _passing_kv(parts, g1, g2, d, k[:, :la], v[:, :la])
        args = (dout[:, rows], q[:, rows])
        lse_b2 = state["lse_b2"]
        gq, gk, gv = kernels.attend_backward(*args, prefix_k, prefix_v, out[:, rows], lse_b2, **kw)
        dq[:, rows] += gq
        n_pass = prefix_k.shape[1] - la
        dk[:, :la] += gk[:, n_pass:]
        dv[:, :la] += gv[:, n_pass:]
        if parts:
            scatter_passing(parts, torch.cat([gk[:, :n_pass], gv[:, :n_pass]], dim=-1).float())
        add(rows, rows, kernels.attend_backward(*args, k[:, rows], v[:, rows], out[:, rows], lse_b2, causal=True,
                                                **kw))

    # Anchor and block r.
    rows = slice(0, b1e)
    lse_ab = state["lse_ab"]
    add(rows, rows, kernels.attend_backward(dout[:, rows], q[:, rows], k[:, rows], v[:, rows], out[:, rows], lse_ab,
                                            causal=True, **kw))
    parts = _passing(plan, g1, None, second=False)
    if parts:
        pass_k, pass_v = _passing_kv(parts, g1, None, d)
        gq, gk, gv = kernels.attend_backward(dout[:, b1s:b1e], q[:, b1s:b1e], pass_k, pass_v, out[:, b1s:b1e],
                                             lse_ab[:, :, la:], **kw)
        dq[:, b1s:b1e] += gq
        scatter_passing(parts, torch.cat([gk, gv], dim=-1).float())

    # Collectives 2 and 3: each passing block's gradient goes back to the rank that selected it.
    pending = [comm.reduce_scatter_async(g, plan.group, plan.world) if g is not None else None for g in (dg1, dg2)]

    # Query rows, with the total output gradient.
    dout_q = dq_rows.wait()
    out_q, lse_q = out[:, qs:qe], state["lse_q"]
    for s, e, causal in _query_pieces(plan, seg):
        add(slice(qs, qe), slice(s, e), kernels.attend_backward(dout_q.to(q.dtype), q[:, qs:qe], k[:, s:e], v[:, s:e],
                                                                out_q, lse_q, causal=causal, **kw))

    for which, (p, (start, end)) in enumerate(zip(pending, (seg.block1, seg.block2))):
        if p is None or (which == 1 and plan.rank == 0):
            continue  # rank 0's second block sent zeros
        kk = plan.ks[hosts[which]]
        dsel = p.wait()[:, :kk]
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
    def forward(ctx, q, k, v, plan):
        out, state = _forward(plan, q, k, v)
        ctx.plan = plan
        names = sorted(n for n, t in state.items() if t is not None)
        ctx.names = names
        ctx.save_for_backward(q, k, v, out, *[state[n] for n in names])
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, *saved = ctx.saved_tensors
        state = dict(idx1=None, idx2=None, g1=None, g2=None, lse_b2=None)
        state.update(zip(ctx.names, saved))
        dq, dk, dv = _backward(ctx.plan, dout, q, k, v, out, state)
        return dq, dk, dv, None


def _zigzag_attention(q, k, v, layout, config, group, layer_idx, scale, exact):
    rank, world = comm.group_rank_size(group)
    _check_inputs(q, k, v, layout, rank, world, needs_query=not exact)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    plan = _make_plan(layout, config, group, layer_idx, scale, exact, needs_grad)
    return _ZigzagAttention.apply(q, k, v, plan)


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

    qh, kh, vh = to_heads(q), to_heads(k), to_heads(v)
    if local_attention is None:
        from .reference import dense_causal_attention

        oh = dense_causal_attention(qh, kh, vh, scale)
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
    if config.mode in ("spava", "star", "apb"):
        return _zigzag_attention(q, k, v, layout, config, group, layer_idx, scale, exact=False)
    if config.mode == "ring":
        return _zigzag_attention(q, k, v, layout, config, group, layer_idx, scale, exact=True)
    if config.mode == "ulysses":
        return ulysses_attention(q, k, v, layout, group, scale, local_attention)
    # dense: one process holds the whole sequence in global order
    rank, world = comm.group_rank_size(group)
    if world != 1:
        raise ValueError(f"mode 'dense' runs in one process; the group has {world} ranks (use ring or ulysses)")
    _check_inputs(q, k, v, layout, rank, world, needs_query=False)
    from .reference import dense_causal_attention

    return dense_causal_attention(q, k, v, scale)


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
    if config.mode not in MESH_MODES:
        raise ValueError(f"mesh_attention: mode {config.mode!r} does not run on the inter groups; use one of "
                         f"{MESH_MODES}")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError("mesh_attention: q, k and v must be [batch, seq, heads, head_dim], k and v alike")
    u, hq, hkv = layout.intra_size, q.shape[2], k.shape[2]
    if hq % u:
        raise ValueError(f"mesh_attention: {hq} query heads do not split over ulysses_degree={u}")
    if hkv % u and u % hkv:
        raise ValueError(f"mesh_attention: {hkv} KV heads neither split over nor divide ulysses_degree={u}")
    if q.shape[1] != layout.local_len(rank) or k.shape[1] != q.shape[1]:
        raise ValueError(f"mesh_attention: rank {rank} got {q.shape[1]} tokens, its share of the layout is "
                         f"{layout.local_len(rank)} ({layout})")


def mesh_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: MeshLayout, mesh,
                   config: Optional[SpavaConfig] = None, layer_idx: Optional[int] = None,
                   scale: Optional[float] = None) -> torch.Tensor:
    """Two-dimensional sequence parallelism (differentiable): Ulysses inside each intra group, the zigzag mode of
    ``config`` (spava, or ring for exact attention) over the inter groups.

    Args:
        q, k, v: this rank's tokens (``layout.shard``), ``[b, s_local, Hq, d]`` and ``[b, s_local, Hkv, d]``.
        layout: the ``MeshLayout``; mesh: the ``DeviceMesh`` of ``comm.init_mesh(layout.intra_size)``.

    One all-to-all in the intra group gives each rank its inter rank's whole local sequence for ``Hq/U`` query and
    ``Hkv/U`` KV heads; the zigzag mode runs on the inter group as ``sp_attention`` does with W = inter size; one
    all-to-all returns each rank's tokens. The result is the flat mode's at the inter size (head by head). Fewer
    KV heads than U are replicated first, as DeepSpeed-Ulysses does: each copy then scores and selects its passing
    tokens for its own query heads, i.e. Spava of the model with its KV heads repeated U / Hkv times.
    """
    config = config if config is not None else layout.config
    inter_group, intra_group = comm.mesh_groups(mesh)
    i, j = comm.group_rank_size(inter_group)[0], comm.group_rank_size(intra_group)[0]
    _check_mesh_inputs(q, k, v, layout, mesh, config, i * layout.intra_size + j)
    u = layout.intra_size
    if k.shape[2] < u:
        copies = u // k.shape[2]
        k, v = k.repeat_interleave(copies, dim=2), v.repeat_interleave(copies, dim=2)
    lens = layout.share_lens(i)
    qh, kh, vh = _tokens_to_heads([q, k, v], lens, intra_group)
    out = sp_attention(qh, kh, vh, layout.inter, dataclasses.replace(config, ulysses_degree=1), inter_group,
                       layer_idx, scale)
    return _heads_to_tokens(out, lens, j, intra_group)
