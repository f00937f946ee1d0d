"""ZigzagLayout: where every token of one sequence lives when it is split over W ranks.

Global order of a sequence: ``[context (context_len tokens) | query (query_len tokens)]``. The context is
``[anchor | block 0 | block 1 | ... | block 2W-1]``; block ``v`` is virtual host ``v``. Rank ``r`` holds, in this
local order::

    [anchor | block r | block 2W-1-r | query]

The anchor and the query are replicated on every rank. With ``anchor_len = 0`` and ``query_len = 0`` the blocks are
Megatron context parallelism's 2*CP chunks (rank r keeps chunks r and 2*CP-1-r).

The modes whose ``MODE_TABLE`` row has the contiguous layout (the baselines ``star`` and ``apb``) use W blocks
instead: rank r holds ``[anchor | block r | query]`` (its second block is empty).

Replicated tokens and gradients: the anchor and the query are computed identically on every rank; in the backward
pass their gradients are *partial* (each rank holds the contributions of the work it did), so the sum over the
group is the gradient. Count a replicated token's loss once over the group (on one rank, or 1/W on each).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .config import SpavaConfig, as_int

Range = Tuple[int, int]
KeyRange = Tuple[int, int, bool]  # local (start, end) of keys and whether the query rows see them causally


class LocalSegments(NamedTuple):
    """Offsets (start, end) of the four parts inside one rank's local sequence."""

    anchor: Range
    block1: Range
    block2: Range
    query: Range


class PassingPlan(NamedTuple):
    """Who sends which passing block to whom in one layer, seen from one rank (``ZigzagLayout.passing_plan``).

    The passing blocks travel in two all-gathers ("halves"): half 0 gathers every rank's first block (block r from
    rank r), half 1 every rank's second block (block 2W-1-r from rank r; zigzag layout only). Every rank sends the
    same number of tokens in a half, so smaller selections are padded.

    Attributes:
        gather_sizes: tokens per rank in half 0 and half 1 (0: that half is not gathered).
        send: per local block (first, second): tokens of its selection; 0 when it precedes no block and sends
            nothing (zeros fill its slot in the gather).
        receive: per local block: the ``(half, rank, tokens)`` slots of the gathered halves that make up its passing
            block, in sequence order (the selections of every earlier block).
    """

    gather_sizes: Tuple[int, int]
    send: Tuple[int, ...]
    receive: Tuple[Tuple[Tuple[int, int, int], ...], ...]


def _split_evenly(n: int, parts: int) -> List[int]:
    """``parts`` sizes summing to ``n`` that differ by at most one; the earlier ones take the extra tokens."""
    base, extra = divmod(n, parts)
    return [base + (i < extra) for i in range(parts)]


class ZigzagLayout:
    """The plan of one sequence (or a batch of equal-length sequences) over ``world_size`` ranks.

    Args:
        context_len: tokens before the query (system prompt, video, text before the question).
        query_len: tokens of the query block (the question plus the assistant prefix); may be 0.
        world_size: number of ranks W; the context is cut into 2W virtual-host blocks.
        config: a ``SpavaConfig`` whose ``anchor_len`` rule is applied (the default config if None); its mode's
            ``layout`` picks the zigzag or the contiguous variant.

    Lengths may be any integral numbers (numpy or torch integers too). Raises ``ValueError`` when the context is too
    short to give every block a token. Every rank builds the same layout from the same global lengths, so the error
    is raised identically everywhere before any collective.

    Everything about which tokens live where, and who sends what to whom, is answered here: the blocks of each rank
    (``virtual_hosts``, ``local_segments``), the passing schedule (``passing_plan``), the keys each rank contributes
    to the exact query rows and keeps for decoding (``key_share``), and the loss weights of replicated tokens
    (``replicated_token_weights``).
    """

    def __init__(self, context_len: int, query_len: int, world_size: int, config: Optional[SpavaConfig] = None):
        self.config = config if config is not None else SpavaConfig()
        lengths = []
        for name, value, low in (("context_len", context_len, 0), ("query_len", query_len, 0),
                                 ("world_size", world_size, 1)):
            n = as_int(value)
            if n is None or n < low:
                raise ValueError(f"ZigzagLayout.{name} must be an int >= {low}, got {value!r}")
            lengths.append(n)
        self.context_len, self.query_len, self.world_size = lengths
        self.zigzag = self.config.mode_spec.layout == "zigzag"
        self.num_blocks = 2 * self.world_size if self.zigzag else self.world_size
        self.anchor_len = self.config.resolve_anchor_len(self.context_len, self.world_size)
        min_context = self.anchor_len + self.num_blocks
        if self.context_len < min_context:
            raise ValueError(
                f"context of {self.context_len} tokens is too short for {self.world_size} rank(s): the layout needs "
                f"at least {min_context} context tokens (anchor {self.anchor_len} + one token for each of the "
                f"{self.num_blocks} virtual-host blocks)")
        sizes = _split_evenly(self.context_len - self.anchor_len, self.num_blocks)
        bounds, start = [], self.anchor_len
        for size in sizes:
            bounds.append((start, start + size))
            start += size
        self.block_bounds: List[Range] = bounds
        # Answers asked on every layer's call, built once: rank -> segments / key share, (rank, budget) -> plan.
        self._segments: Dict[int, LocalSegments] = {}
        self._key_shares: Dict[int, Tuple[KeyRange, ...]] = {}
        self._plans: Dict[Tuple[int, Optional[int]], PassingPlan] = {}
        self._sharded_ranks: set = set()

    # ---- who holds what -------------------------------------------------------------------------------------
    @property
    def total_len(self) -> int:
        return self.context_len + self.query_len

    @property
    def query_range(self) -> Range:
        return (self.context_len, self.total_len)

    def block_len(self, v: int) -> int:
        start, end = self.block_bounds[v]
        return end - start

    def virtual_hosts(self, rank: int) -> Tuple[int, ...]:
        """The virtual hosts (blocks) of ``rank``: ``(rank, 2W-1-rank)``, or ``(rank,)`` in the contiguous layout."""
        self._check_rank(rank)
        return (rank, self.num_blocks - 1 - rank) if self.zigzag else (rank,)

    def owner(self, v: int) -> int:
        """The rank that holds virtual host ``v``."""
        return v if v < self.world_size else self.num_blocks - 1 - v

    def global_ranges(self, rank: int) -> List[Range]:
        """Global (start, end) of the anchor, the two blocks and the query, in the rank's local order.

        In the contiguous layout the second block is an empty range.
        """
        hosts = self.virtual_hosts(rank)
        first = self.block_bounds[hosts[0]]
        second = self.block_bounds[hosts[1]] if len(hosts) == 2 else (first[1], first[1])
        return [(0, self.anchor_len), first, second, self.query_range]

    def local_len(self, rank: int) -> int:
        return self.local_segments(rank).query[1]

    def local_segments(self, rank: int) -> LocalSegments:
        """Where the anchor, the two blocks and the query sit inside the rank's local sequence."""
        seg = self._segments.get(rank)
        if seg is None:
            out, offset = [], 0
            for start, end in self.global_ranges(rank):
                out.append((offset, offset + end - start))
                offset += end - start
            seg = self._segments[rank] = LocalSegments(*out)
        return seg

    def anchor_share(self, rank: int) -> Range:
        """The slice of the anchor (global positions) whose keys this rank contributes to the exact query attention.

        Rank 0 takes the whole anchor, the other ranks none. The query rows are few, so splitting the anchor would
        save next to no GPU time but cost every rank one more attention call and merge per layer; on rank 0 the
        anchor is contiguous with its blocks and joins their attention call.
        """
        self._check_rank(rank)
        return (0, self.anchor_len) if rank == 0 else (self.anchor_len, self.anchor_len)

    def key_share(self, rank: int) -> Tuple[KeyRange, ...]:
        """This rank's share of the keys: local ``(start, end, causal)`` ranges, adjacent ones joined.

        The query rows attend to it (exact attention by an LSE merge over the ranks: ``causal`` marks the query's
        own keys, which it sees causally), and decoding keeps it as this rank's KV cache. Over the ranks every token
        of the sequence is in exactly one share: every rank's two blocks, on rank 0 also the anchor (``anchor_share``)
        and the query (rank 0 holds the last block, so the query and the generated tokens continue its share).
        """
        share = self._key_shares.get(rank)
        if share is None:
            seg = self.local_segments(rank)
            a0, a1 = self.anchor_share(rank)
            share = ((a0 if a1 > a0 else seg.block1[0], seg.block2[1], False),)
            if rank == 0 and self.query_len:
                share += ((seg.query[0], seg.query[1], True),)
            self._key_shares[rank] = share
        return share

    def passing_plan(self, rank: int, budget: Optional[int]) -> PassingPlan:
        """The passing schedule of one layer for ``rank``: every block sends its ``min(budget, block length)`` best
        keys per KV head (``budget=None``: the whole block, which makes the attention exact) to every later block.

        Virtual host v receives the selections of blocks 0..v-1 in sequence order. With the zigzag pairing every
        rank receives (2W-1) selections in all, whatever its rank: the load balance of the paper.
        """
        key = (rank, budget)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._make_passing_plan(rank, budget)
        return plan

    def _make_passing_plan(self, rank: int, budget: Optional[int]) -> PassingPlan:
        hosts = self.virtual_hosts(rank)
        if budget == 0 or self.num_blocks == 1:  # nothing to pass, or no block after the first
            return PassingPlan((0, 0), (0,) * len(hosts), ((),) * len(hosts))
        sizes = [self.block_len(v) if budget is None else min(budget, self.block_len(v))
                 for v in range(self.num_blocks)]
        halves = [[self.virtual_hosts(r)[h] for r in range(self.world_size)] for h in range(len(hosts))]
        slot = {v: (h, r) for h, blocks in enumerate(halves) for r, v in enumerate(blocks)}
        last = self.num_blocks - 1  # the last block precedes none: it sends nothing
        gather = [max(sizes[v] for v in blocks) if any(v < last for v in blocks) else 0 for blocks in halves]
        return PassingPlan(
            gather_sizes=tuple(gather + [0] * (2 - len(gather))),
            send=tuple(sizes[v] if v < last else 0 for v in hosts),
            receive=tuple(tuple(slot[u] + (sizes[u],) for u in range(v)) for v in hosts))

    def replicated_token_weights(self, rank: int, device=None) -> torch.Tensor:
        """Per-token loss weights ``[s_local]`` for this rank: 1 for its own blocks, ``1/W`` for the anchor and the
        query, which every rank holds. Summed over the group, every token of the sequence then counts once, so the
        partial gradients of the replicated tokens add up to the true gradient once the parameter gradients are
        summed over the sequence-parallel ranks."""
        seg = self.local_segments(rank)
        weights = torch.ones(self.local_len(rank), device=device)
        for start, end in (seg.anchor, seg.query):
            weights[start:end] = 1.0 / self.world_size
        return weights

    def positions(self, rank: int, device=None) -> torch.Tensor:
        """Global position ids of the rank's local tokens, in local order (1-D, int64)."""
        return torch.cat([torch.arange(s, e, device=device) for s, e in self.global_ranges(rank)])

    # ---- moving token-aligned tensors -----------------------------------------------------------------------
    def shard(self, x: torch.Tensor, rank: int, dim: int = 1) -> torch.Tensor:
        """Rank ``rank``'s tokens of a full-sequence tensor ``x`` (sequence on ``dim``), in local order.

        Works for any token-aligned tensor: ids and labels ``[b, s]``, hidden states ``[b, s, ...]``, q/k/v
        ``[b, s, h, d]``, 3-row M-RoPE positions ``[3, b, s]`` (``dim=2``). The layout remembers the ranks it sharded
        for (``sharded_for``).
        """
        if x.shape[dim] != self.total_len:
            raise ValueError(f"shard: dim {dim} of the input has {x.shape[dim]} tokens, the layout expects "
                             f"{self.total_len} (context {self.context_len} + query {self.query_len})")
        self._sharded_ranks.add(rank)
        return torch.cat([x.narrow(dim, s, e - s) for s, e in self.global_ranges(rank)], dim=dim)

    def sharded_for(self, rank: int) -> bool:
        """Whether this layout object sharded any tensor for ``rank`` (``shard``, ``shard_batch``).

        Modules that see only local tensors use it to refuse tokens that another sharding put in another order
        (DeepSpeed's contiguous shards have the zigzag shares' lengths when there is no anchor and no query, and
        would otherwise give wrong attention without an error).
        """
        return rank in self._sharded_ranks

    def unshard(self, parts: Sequence[torch.Tensor], dim: int = 1) -> torch.Tensor:
        """Rebuild the full sequence from every rank's local tensor (``parts[r]`` from rank r).

        The replicated anchor and query are taken from rank 0.
        """
        if len(parts) != self.world_size:
            raise ValueError(f"unshard: got {len(parts)} parts, the layout has {self.world_size} ranks")
        for r, part in enumerate(parts):
            if part.shape[dim] != self.local_len(r):
                raise ValueError(f"unshard: part {r} has {part.shape[dim]} tokens on dim {dim}, rank {r} holds "
                                 f"{self.local_len(r)}")
        segs = [self.local_segments(r) for r in range(self.world_size)]

        def piece(rank: int, seg: Range) -> torch.Tensor:
            return parts[rank].narrow(dim, seg[0], seg[1] - seg[0])

        pieces = [piece(0, segs[0].anchor)]
        for v in range(self.num_blocks):
            r = self.owner(v)
            pieces.append(piece(r, segs[r].block1 if v < self.world_size else segs[r].block2))
        pieces.append(piece(0, segs[0].query))
        return torch.cat(pieces, dim=dim)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the layout's world of {self.world_size}")

    def __repr__(self) -> str:
        sizes = [self.block_len(v) for v in range(self.num_blocks)]
        return (f"ZigzagLayout({'' if self.zigzag else 'contiguous, '}context_len={self.context_len}, "
                f"query_len={self.query_len}, world_size={self.world_size}, anchor_len={self.anchor_len}, "
                f"block_lens={sizes})")


# ---- the layout of the batch being processed ---------------------------------------------------------------------
_CURRENT_LAYOUT: contextvars.ContextVar[Optional[ZigzagLayout]] = contextvars.ContextVar("spava_layout", default=None)


@contextlib.contextmanager
def use_layout(layout: ZigzagLayout):
    """Make ``layout`` the current one (``current_layout()``) inside the block, for modules such as
    ``DistributedAttention`` or the Megatron core attention that only see local tensors."""
    token = _CURRENT_LAYOUT.set(layout)
    try:
        yield layout
    finally:
        _CURRENT_LAYOUT.reset(token)


def current_layout() -> Optional[ZigzagLayout]:
    """The layout set by the innermost ``use_layout`` (None outside one)."""
    return _CURRENT_LAYOUT.get()


def shard_batch(batch: Dict[str, Any], layout: ZigzagLayout, rank: int,
                seq_dims: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
    """Rank ``rank``'s share of a batch dict: every tensor with ``layout.total_len`` tokens on its sequence dim is
    sharded; everything else (pixel values, grid sizes, scalars) is passed through.

    The sequence dim is 1, except ``position_ids`` with 3 dims (M-RoPE ``[3, b, s]``) and ``attention_mask`` with 4
    dims (``[b, 1, s, s]``), which use dim 2; ``seq_dims`` overrides per key.
    """
    out = {}
    for key, value in batch.items():
        dim = (seq_dims or {}).get(key)
        if dim is None and isinstance(value, torch.Tensor):
            dim = 2 if (key == "position_ids" and value.dim() == 3) or (key == "attention_mask"
                                                                        and value.dim() == 4) else 1
        if isinstance(value, torch.Tensor) and value.dim() > dim and value.shape[dim] == layout.total_len:
            out[key] = layout.shard(value, rank, dim)
        else:
            out[key] = value
    return out


# ---- the two-dimensional mode: an inter x intra mesh --------------------------------------------------------------
class MeshLayout:
    """The plan of one sequence over an inter x intra mesh of ``world_size`` ranks (``SpavaConfig.ulysses_degree``
    = U ranks per intra group, a node; ``world_size / U`` inter groups).

    The sequence is first split over the inter groups by ``ZigzagLayout`` (``self.inter``): inter rank i holds
    ``[anchor | block i | block 2Wi-1-i | query]``. The U ranks of intra group i then hold that local sequence in
    U contiguous shares (sizes differ by at most one), which is all the layers other than attention see. Global
    rank ``g = i * U + j`` holds share j of inter rank i: the ranks of one node are consecutive, as torchrun and the
    deepspeed launcher number them. Attention all-to-alls an intra group's shares so that each rank holds the whole
    local sequence of its inter rank for ``H / U`` heads (see ``attention.mesh_attention``).

    The anchor and the query are replicated over the inter groups (once per node), never inside one. Raises
    ``ValueError`` when ``world_size`` is not a multiple of U or an inter rank's sequence has fewer than U tokens.
    """

    def __init__(self, context_len: int, query_len: int, world_size: int, config: Optional[SpavaConfig] = None):
        self.config = config if config is not None else SpavaConfig()
        intra, world = self.config.ulysses_degree, as_int(world_size)
        if world is None or world < 1:
            raise ValueError(f"MeshLayout.world_size must be an int >= 1, got {world_size!r}")
        if world % intra:
            raise ValueError(f"{world} rank(s) do not split into intra groups of ulysses_degree={intra}")
        self.world_size, self.intra_size, self.inter_size = world, intra, world // intra
        # the inter groups run the flat mode: their layout's config is this one at ulysses_degree 1
        flat = dataclasses.replace(self.config, ulysses_degree=1)
        self.inter = ZigzagLayout(context_len, query_len, self.inter_size, flat)
        shortest = min(self.inter.local_len(i) for i in range(self.inter_size))
        if shortest < intra:
            raise ValueError(f"an inter rank holds {shortest} tokens, fewer than the {intra} ranks of its intra group "
                             f"({self.inter})")

    @property
    def context_len(self) -> int:
        return self.inter.context_len

    @property
    def query_len(self) -> int:
        return self.inter.query_len

    @property
    def total_len(self) -> int:
        return self.inter.total_len

    def coords(self, rank: int) -> Tuple[int, int]:
        """(inter rank, intra rank) of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the layout's world of {self.world_size}")
        return divmod(rank, self.intra_size)

    def share_lens(self, inter_rank: int) -> List[int]:
        """Tokens of each intra rank of inter group ``inter_rank``, in intra-rank order."""
        return _split_evenly(self.inter.local_len(inter_rank), self.intra_size)

    def share(self, rank: int) -> Range:
        """(start, end) of the rank's tokens inside its inter rank's local sequence."""
        i, j = self.coords(rank)
        lens = self.share_lens(i)
        start = sum(lens[:j])
        return (start, start + lens[j])

    def local_len(self, rank: int) -> int:
        start, end = self.share(rank)
        return end - start

    def global_ranges(self, rank: int) -> List[Range]:
        """Global (start, end) ranges of the rank's tokens, in local order (empty pieces left out)."""
        i, _ = self.coords(rank)
        lo, hi = self.share(rank)
        out, offset = [], 0
        for start, end in self.inter.global_ranges(i):
            a, b = max(lo, offset), min(hi, offset + end - start)  # this piece's overlap with the share
            if a < b:
                out.append((start + a - offset, start + b - offset))
            offset += end - start
        return out

    def positions(self, rank: int, device=None) -> torch.Tensor:
        """Global position ids of the rank's local tokens, in local order (1-D, int64)."""
        return torch.cat([torch.arange(s, e, device=device) for s, e in self.global_ranges(rank)])

    def shard(self, x: torch.Tensor, rank: int, dim: int = 1) -> torch.Tensor:
        """Rank ``rank``'s tokens of a full-sequence tensor (see ``ZigzagLayout.shard``)."""
        i, _ = self.coords(rank)
        start, end = self.share(rank)
        return self.inter.shard(x, i, dim).narrow(dim, start, end - start)

    def unshard(self, parts: Sequence[torch.Tensor], dim: int = 1) -> torch.Tensor:
        """Rebuild the full sequence from every rank's local tensor (``parts[g]`` from global rank g)."""
        if len(parts) != self.world_size:
            raise ValueError(f"unshard: got {len(parts)} parts, the layout has {self.world_size} ranks")
        u = self.intra_size
        return self.inter.unshard([torch.cat(parts[i * u:(i + 1) * u], dim=dim) for i in range(self.inter_size)],
                                  dim=dim)

    def key_share(self, rank: int) -> Tuple[KeyRange, ...]:
        """This rank's part of its inter rank's ``ZigzagLayout.key_share``: local ``(start, end, causal)`` ranges
        inside the rank's own tokens. Decoding keeps these keys as the rank's KV cache; over all ranks every token
        of the sequence is in exactly one share (inter rank 0's intra group holds the anchor and the query). A rank
        whose tokens are all replicated copies gets one empty range."""
        i, _ = self.coords(rank)
        lo, hi = self.share(rank)
        mine = tuple((max(s, lo) - lo, min(e, hi) - lo, causal) for s, e, causal in self.inter.key_share(i)
                     if max(s, lo) < min(e, hi))
        return mine or ((0, 0, False),)

    def last_token_rank(self) -> int:
        """The global rank whose last local token is the sequence's last (the query's, or block 2Wi-1's): the last
        intra rank of inter rank 0."""
        return self.intra_size - 1

    def __repr__(self) -> str:
        return f"MeshLayout(inter {self.inter_size} x intra {self.intra_size}, {self.inter})"


def make_layout(context_len: int, query_len: int, world_size: int, config: Optional[SpavaConfig] = None):
    """The layout ``config`` asks for: ``ZigzagLayout`` over all ranks, or ``MeshLayout`` when
    ``config.ulysses_degree > 1``."""
    if config is not None and config.ulysses_degree > 1:
        return MeshLayout(context_len, query_len, world_size, config)
    return ZigzagLayout(context_len, query_len, world_size, config)
