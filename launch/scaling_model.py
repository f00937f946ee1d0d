"""Cost model of sequence-parallel attention on many GPUs: flat Spava, the two-dimensional mode (Spava x Ulysses),
ring, Ulysses and ring x Ulysses. docs/scaling.md derives it and shows its predictions.

For one rank and one layer it counts the attention work (FLOPs of causal and rectangular pieces, kernel calls,
memory traffic of merges and copies), the bytes every collective moves inside a node and between nodes, and the
memory held; per-card constants turn them into seconds. Three subcommands:

    python launch/scaling_model.py predict                       # 8-64 GPUs, 1M-4M tokens, where 2-D overtakes
    python launch/scaling_model.py predict --plot docs/scaling.png --measured docs/results/scaling_1xh200.json
    python launch/scaling_model.py measure --out docs/results/scaling_1xh200.json   # one GPU (H200: ~4 min)
    python launch/scaling_model.py measure --cuda-graphs --out ...   # the shares as CUDA graph replays
    python launch/scaling_model.py validate --measured docs/results/scaling_1xh200.json [--cross-validate]

``measure`` times calibration kernels (the card's constants: attention pieces of each shape class, spava_ds's
selection, copies) and one rank's attention share per mode at 64K-256K tokens, the other ranks faked as in
launch/bench_host.py; ``validate`` fits the constants on the calibration only, predicts every share and prints the
error (``--cross-validate`` adds a labelled leave-one-length-out fit of the newer terms on the shares), then
compares the communication part (and the whole language model) with the 2- and 4-GPU end-to-end runs in
docs/results.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Tuple

from spava_ds import SpavaConfig, ZigzagLayout, entry
from spava_ds.models.shapes import PUBLISHED_SHAPES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BF16 = 2  # bytes per element of q, k, v and outputs
GIB = 1024 ** 3


# ---- what is modelled ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Shape:
    """The attention of one language-model layer."""

    name: str
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    query: int = 48  # query tokens (question + assistant prefix)


SHAPES = {name: Shape(s.label, s.heads, s.kv_heads, s.head_dim, s.layers)
          for name, s in ((name, PUBLISHED_SHAPES[name]) for name in ("7b", "3b"))}


@dataclasses.dataclass(frozen=True)
class Card:
    """Per-card constants. Compute ones are fitted by ``validate`` from ``measure``'s calibration; the defaults are
    the H100 kernel rates of shared/GPU.md, and for the terms a calibration may lack (files written before
    2026-11-30) the first model's treatment (see ``calibration_notes``). Links are nominal: NVLink 4 (NCCL bus
    bandwidth seen on 8-GPU nodes) and one 400 Gb/s NIC per GPU; nothing here was measured across nodes."""

    name: str
    causal_tflops: float = 600.0  # attention on causal square pieces, counting the unmasked work only
    full_tflops: float = 600.0    # attention on rectangular pieces with at most as many keys as rows
    wide_tflops: float = 600.0    # ... with more keys than rows (their K/V outgrow the L2 cache)
    call_us: float = 10.0         # GPU time per kernel piece beyond its FLOPs (launch gaps, tails)
    query_ns: float = 1.15        # per key of a few-row piece (the query rows: too few row tiles to fill the GPU);
    query_us: float = 0.0         # default: 48 rows x 28 heads at 600 TFLOP/s, the first model's FLOP count
    select_ns: float = 0.1        # per key and KV head scored, pooled, sorted (default: read once at copy_gbs)
    select_us: float = 0.0        # per block selected, beyond its keys
    copy_gbs: float = 2500.0      # memory traffic of copies and merges (bytes read + written per second)
    pass_us: float = 0.0          # per copy or merge pass, beyond its bytes
    intra_gbs: float = 360.0      # per-GPU collective bandwidth inside a node
    inter_gbs: float = 45.0       # per-GPU bandwidth between nodes
    intra_us: float = 10.0        # latency of one collective step inside a node
    inter_us: float = 20.0        # ... between nodes
    gpus_per_node: int = 8


CARDS = {"h200": Card("H200"), "h100": Card("H100", copy_gbs=2000.0)}


FEW_ROWS = 128  # a piece of at most one row tile per head: its time is set by its keys, not its FLOPs


@dataclasses.dataclass
class Work:
    """One rank's attention work in one layer."""

    causal_flops: float = 0.0
    full_flops: float = 0.0       # rectangles with at most as many keys as rows
    wide_flops: float = 0.0       # rectangles with more keys than rows
    pieces: int = 0               # causal and rectangular pieces
    few_row_flops: float = 0.0    # pieces of at most FEW_ROWS rows (the query rows)
    few_row_keys: float = 0.0
    few_row_pieces: int = 0
    scored: float = 0.0           # keys x KV heads that the selection scores, pools and sorts
    selections: int = 0           # blocks selected
    bytes: float = 0.0            # copies and merges: bytes read + written
    passes: int = 0               # ... one kernel each

    def causal(self, n: int, heads: int, d: int) -> None:
        if n > 0:
            self.causal_flops += 4.0 * d * heads * n * (n + 1) / 2
            self.pieces += 1

    def full(self, rows: int, keys: int, heads: int, d: int) -> None:
        if rows <= 0 or keys <= 0:
            return
        flops = 4.0 * d * heads * rows * keys
        if rows <= FEW_ROWS:
            self.few_row_flops += flops
            self.few_row_keys += keys
            self.few_row_pieces += 1
            return
        if keys > rows:
            self.wide_flops += flops
        else:
            self.full_flops += flops
        self.pieces += 1

    def select(self, keys: int, kv_heads: int) -> None:
        """One block's selection (``select.block_scores``, ``topk_indices``, ``gather_passing``)."""
        if keys > 0:
            self.scored += keys * kv_heads
            self.selections += 1

    def traffic(self, elements: float, bytes_per_element: float) -> None:
        if elements > 0:
            self.bytes += elements * bytes_per_element
            self.passes += 1

    @property
    def flops(self) -> float:
        return self.causal_flops + self.full_flops + self.wide_flops + self.few_row_flops

    def seconds(self, card: Card) -> float:
        attention = (self.causal_flops / card.causal_tflops + self.full_flops / card.full_tflops
                     + self.wide_flops / card.wide_tflops) * 1e-12 + self.pieces * card.call_us * 1e-6
        few_rows = self.few_row_keys * card.query_ns * 1e-9 + self.few_row_pieces * card.query_us * 1e-6
        selection = self.scored * card.select_ns * 1e-9 + self.selections * card.select_us * 1e-6
        copies = self.bytes / (card.copy_gbs * 1e9) + self.passes * card.pass_us * 1e-6
        return attention + few_rows + selection + copies


COPY, MERGE = 2 * BF16, 3 * BF16  # bytes moved per element: copy (read + write), merge (2 in, 1 out)


@dataclasses.dataclass(frozen=True)
class Mode:
    """A way to run attention over ``world`` GPUs: ``name`` in spava, ring, ulysses; ``ulysses_degree`` > 1 is
    the two-dimensional mode (spava or ring over world / U inter groups, Ulysses inside groups of U)."""

    name: str
    world: int
    ulysses_degree: int = 1

    @property
    def label(self) -> str:
        u = self.ulysses_degree
        return f"{self.name} {self.world}" if u == 1 else f"{self.name} {self.world // u}x{u}"


def kv_heads_after_split(shape: Shape, parts: int) -> int:
    """KV heads per rank when heads split ``parts`` ways (fewer than ``parts`` are replicated, as DeepSpeed)."""
    return max(shape.kv_heads, parts) // parts


def feasible(mode: Mode, shape: Shape) -> bool:
    """Whether the heads split as the mode needs (Ulysses: all heads over the group; 2-D: over U)."""
    parts = mode.world if mode.name == "ulysses" else mode.ulysses_degree
    kv = shape.kv_heads
    return mode.world % mode.ulysses_degree == 0 and shape.heads % parts == 0 and (kv % parts == 0 or parts % kv == 0)


# ---- work: the pieces of attention._forward --------------------------------------------------------------------------
def zigzag_layout(exact: bool, tokens: int, world: int, shape: Shape) -> ZigzagLayout:
    return ZigzagLayout(tokens - shape.query, shape.query, world, SpavaConfig(mode="ring" if exact else "spava"))


def zigzag_work(exact: bool, tokens: int, world: int, shape: Shape, heads: int, kv: int,
                rank: int = 1) -> Tuple[Work, Work]:
    """(all the work, the work issued before the first wait) of one rank of flat Spava (or ring: ``exact``)."""
    lay = zigzag_layout(exact, tokens, world, shape)
    rank = min(rank, world - 1)
    la, lq, d = lay.anchor_len, lay.query_len, shape.head_dim
    v1, v2 = lay.virtual_hosts(rank)
    b1, b2 = lay.block_len(v1), lay.block_len(v2)
    budget = SpavaConfig().resolve_passing_len(lay.context_len)
    sent = [lay.block_len(u) if exact else min(budget, lay.block_len(u)) for u in range(lay.num_blocks)]
    pass1, pass2 = sum(sent[:v1]), sum(sent[:v2])  # passing keys seen by block 1 and block 2
    w = Work()
    w.full(lq, b1 + b2 + (la if rank == 0 else 0), heads, d)  # the query rows' share of the keys
    if rank == 0:
        w.causal(lq, heads, d)
    w.causal(la + b1, heads, d)
    early = dataclasses.replace(w)
    w.full(b1, pass1, heads, d)
    w.full(b2, pass2 + la, heads, d)
    w.causal(b2, heads, d)
    w.traffic((b1 if pass1 else 0) * heads * d + b2 * heads * d, MERGE)  # LSE merges of the block rows
    w.traffic((pass1 + pass2 + la) * kv * 2 * d, COPY)  # passing K|V split into contiguous keys and values
    w.traffic(lay.local_len(rank) * heads * d, COPY)  # the output joined in local order
    if not exact:  # each block that precedes another selects its passing keys
        for n, sends in zip((b1, b2), lay.passing_plan(rank, budget).send):
            if sends:
                w.select(n, kv)
    return w, early


def ulysses_work(tokens: int, world: int, shape: Shape) -> Work:
    """Flat Ulysses (attention.ulysses_attention): the whole sequence for heads / W, and its all-to-all copies."""
    heads, kv, d = shape.heads // world, kv_heads_after_split(shape, world), shape.head_dim
    local = zigzag_layout(True, tokens, world, shape).local_len(1 % world)
    w = Work()
    w.causal(tokens, heads, d)
    w.traffic(local * (heads + 2 * kv) * world * d + tokens * (heads + 2 * kv) * d, COPY)  # in: pack, unshard
    w.traffic(2 * tokens * heads * d + local * heads * world * d, COPY)  # out: shard, pack, unpack
    return w


def mesh_work(exact: bool, tokens: int, world: int, u: int, shape: Shape, rank: int = 1) -> Tuple[Work, Work]:
    """The 2-D mode: the flat mode on world / u ranks with heads / u, plus the intra all-to-alls' copies."""
    heads, kv, d = shape.heads // u, kv_heads_after_split(shape, u), shape.head_dim
    w, early = zigzag_work(exact, tokens, world // u, shape, heads, kv, rank)
    n_inter = zigzag_layout(exact, tokens, world // u, shape).local_len(min(rank, world // u - 1))
    w.traffic(2 * n_inter * (heads + 2 * kv) * d, COPY)  # q, k, v: pack this share, unpack the sequence
    w.traffic(2 * n_inter * heads * d, COPY)  # the output back
    return w, early


def work(mode: Mode, tokens: int, shape: Shape, rank: int = 1) -> Tuple[Work, Work]:
    """(work, work before the first wait) of (inter) rank ``rank`` for ``mode`` (Ulysses: every rank alike)."""
    exact = mode.name == "ring"
    if mode.name == "ulysses":
        return ulysses_work(tokens, mode.world, shape), Work()
    if mode.ulysses_degree > 1:
        return mesh_work(exact, tokens, mode.world, mode.ulysses_degree, shape, rank)
    return zigzag_work(exact, tokens, mode.world, shape, shape.heads, shape.kv_heads, rank)


# ---- communication ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Collective:
    """One collective of one layer, as seen by one rank."""

    kind: str         # "all_gather" (ring algorithm) or "all_to_all"
    group: int        # ranks in the group
    bytes: float      # all_gather: what each rank contributes; all_to_all: what each rank sends in all
    spans_nodes: bool
    hidden: bool      # overlapped with attention (the zigzag gathers) or waited on at once (the all-to-alls)

    def latency(self, card: Card) -> float:
        """One step's latency: what even a hidden collective costs when it is waited on."""
        return 0.0 if self.group <= 1 else (card.inter_us if self.spans_nodes else card.intra_us) * 1e-6

    def seconds(self, card: Card) -> float:
        if self.group <= 1:
            return 0.0
        if self.kind == "all_gather":  # ring: G - 1 steps, each moving one rank's contribution over the slowest link
            bw, lat = (card.inter_gbs, card.inter_us) if self.spans_nodes else (card.intra_gbs, card.intra_us)
            return (self.group - 1) * (self.bytes / (bw * 1e9) + lat * 1e-6)
        local = min(self.group, card.gpus_per_node) if self.spans_nodes else self.group
        remote = self.bytes * (self.group - local) / self.group  # to peers on other nodes
        near = self.bytes * (local - 1) / self.group
        lat = card.inter_us if self.spans_nodes else card.intra_us
        return max(near / (card.intra_gbs * 1e9), remote / (card.inter_gbs * 1e9)) + lat * 1e-6


def zigzag_collectives(exact: bool, tokens: int, world: int, shape: Shape, heads: int, kv: int,
                       spans_nodes: bool) -> List[Collective]:
    """The passing (or whole-block) all-gathers, one per virtual-host half, and the query partials' all-gather."""
    lay = zigzag_layout(exact, tokens, world, shape)
    budget = SpavaConfig().resolve_passing_len(lay.context_len)
    sizes = [lay.block_len(u) if exact else min(budget, lay.block_len(u)) for u in range(lay.num_blocks)]
    halves = (max(sizes[:world]), max(sizes[world:]))
    gathers = [Collective("all_gather", world, k * kv * 2 * shape.head_dim * BF16, spans_nodes, True)
               for k in halves]
    partials = lay.query_len * heads * (shape.head_dim + 1) * 4  # fp32 [out | lse]
    return gathers + [Collective("all_gather", world, partials, spans_nodes, True)]


def collectives(mode: Mode, tokens: int, shape: Shape, card: Card) -> List[Collective]:
    """Every collective of one layer of ``mode``, for a middle rank."""
    p, u, d = mode.world, mode.ulysses_degree, shape.head_dim
    exact = mode.name == "ring"
    spans = p > card.gpus_per_node
    if mode.name == "ulysses":
        kv = kv_heads_after_split(shape, p) * p
        local = zigzag_layout(True, tokens, p, shape).local_len(1 % p)
        moved = local * (2 * shape.heads + 2 * kv) * d * BF16 * (p - 1) / p  # q, k, v in, the output back
        return [Collective("all_to_all", p, moved, spans, False)]
    if u == 1:
        return zigzag_collectives(exact, tokens, p, shape, shape.heads, shape.kv_heads, spans)
    heads, kv = shape.heads // u, kv_heads_after_split(shape, u)
    n_inter = zigzag_layout(exact, tokens, p // u, shape).local_len(min(1, p // u - 1))
    moved = (n_inter / u) * (2 * shape.heads + 2 * kv * u) * d * BF16 * (u - 1) / u
    intra = Collective("all_to_all", u, moved, u > card.gpus_per_node, False)
    return [intra] + zigzag_collectives(exact, tokens, p // u, shape, heads, kv, spans)


# ---- time and memory -------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Prediction:
    mode: Mode
    tokens: int
    compute_s: float      # attention kernels, merges, copies (one rank, one layer)
    comm_s: float         # all collectives' transfer time
    exposed_s: float      # the part not hidden under attention
    flops: float
    intra_bytes: float    # bytes this rank receives in one layer, inside the node
    inter_bytes: float    # ... from other nodes
    memory_gib: float     # one layer's attention working set + the KV cache of every layer

    @property
    def layer_s(self) -> float:
        return self.compute_s + self.exposed_s


def received_bytes(c: Collective, card: Card) -> Tuple[float, float]:
    """(bytes from the node, bytes from other nodes) that one rank receives in collective ``c``."""
    total = c.bytes * (c.group - 1) if c.kind == "all_gather" else c.bytes
    if not c.spans_nodes:
        return total, 0.0
    local = min(c.group, card.gpus_per_node)
    return total * (local - 1) / max(c.group - 1, 1), total * (c.group - local) / max(c.group - 1, 1)


def memory_gib(mode: Mode, tokens: int, shape: Shape) -> float:
    """Attention's working set in one layer (q, k, v and output of what the rank attends, gathered K/V, fp32 merge
    temporaries) plus the KV cache of all layers (each token once over the ranks, all KV heads)."""
    p, u, d = mode.world, mode.ulysses_degree, shape.head_dim
    cache = tokens / p * shape.layers * shape.kv_heads * 2 * d * BF16
    if mode.name == "ulysses":
        heads, kv = shape.heads // p, kv_heads_after_split(shape, p)
        view, gathered = tokens, 0.0
    else:
        heads, kv = shape.heads // u, kv_heads_after_split(shape, u)
        lay = zigzag_layout(mode.name == "ring", tokens, p // u, shape)
        view = lay.local_len(min(1, p // u - 1))
        gathered = sum(c.bytes * c.group for c in zigzag_collectives(mode.name == "ring", tokens, p // u, shape,
                                                                      heads, kv, False))
    working = view * (heads + 2 * kv) * d * BF16 + view * heads * d * (BF16 + 4) + gathered
    return (working + cache) / GIB


def predict(mode: Mode, tokens: int, shape: Shape, card: Card) -> Prediction:
    w, early = work(mode, tokens, shape)
    colls = collectives(mode, tokens, shape, card)
    hidden = [c for c in colls if c.hidden]  # the gathers run under the attention issued before their wait
    exposed = max(sum(c.latency(card) for c in hidden), sum(c.seconds(card) for c in hidden) - early.seconds(card))
    exposed += sum(c.seconds(card) for c in colls if not c.hidden)
    received = [received_bytes(c, card) for c in colls]
    return Prediction(mode, tokens, w.seconds(card), sum(c.seconds(card) for c in colls), exposed, w.flops,
                      sum(r[0] for r in received), sum(r[1] for r in received), memory_gib(mode, tokens, shape))


# ---- the closed forms of docs/scaling.md (checked against the piece sums by the tests) -------------------------------
def closed_form_pairs(mode: str, tokens: int, world: int) -> float:
    """Visible (query, key) pairs per rank and head, large-L approximation: anchor a = L/64, block b = (L - a)/2W,
    passing budget k = min(L/128, b) (ring: k = b)."""
    a = tokens / 64
    b = (tokens - a) / (2 * world)
    if mode == "ulysses":
        return tokens ** 2 / 2 / world  # the whole sequence for 1/W of the heads
    k = b if mode == "ring" else min(tokens / 128, b)
    return a * a / 2 + 2 * a * b + b * b + (2 * world - 1) * b * k


# ---- measure: one GPU, calibration kernels and one rank's share per mode ---------------------------------------------
DEFAULT_CONFIGS = ["spava:2", "spava:4", "spava:8", "spava:16", "ring:4", "ring:8", "ulysses:2", "ulysses:4",
                   "spava:8:2", "spava:16:2", "spava:16:4", "ring:8:2"]


def parse_config(text: str) -> Mode:
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in ("spava", "ring", "ulysses"):
        raise argparse.ArgumentTypeError(f"expected MODE:W or MODE:W:U with MODE spava, ring or ulysses, got {text!r}")
    return Mode(parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else 1)


def calibration_pieces(sizes: List[int], query: int) -> List[Tuple[str, int, int]]:
    """(kind, rows, keys) of the calibration, each shaped as a kind of the shares' pieces: causal squares;
    rectangles n x n, n x n/8 (more rows than keys) and n x 4n (more keys than rows: the passing and ring pieces);
    the query rows over n and 4n keys; the selection of a block of n and 4n keys (rows 0)."""
    out = []
    for n in sizes:
        out += [("causal", n, n), ("full", n, n), ("full", n, max(1, n // 8)), ("full", n, 4 * n),
                ("full", query, n), ("full", query, 4 * n), ("select", 0, n), ("select", 0, 4 * n)]
    return out


def _timer(device, iters: int, calls: int):
    """GPU seconds of one call (CUDA: back to back behind a sleep kernel, ``spava_ds.benchmarks.host.time_call``),
    or host seconds."""
    from spava_ds.benchmarks.host import time_call

    def run(fn) -> float:
        fn()  # warm-up: plans, allocations
        host, gpu = time_call(fn, device, iters, calls)
        return gpu if device.type == "cuda" else host
    return run


def _selection_call(shape: Shape, keys: int, device, dtype):
    """One block's selection as Spava runs it (``select``'s functions, the default budget and pooling)."""
    import torch

    from spava_ds import select

    config = SpavaConfig()
    k = torch.randn(1, keys, shape.kv_heads, shape.head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    qbar = select.query_summary(torch.randn(1, shape.query, shape.heads, shape.head_dim, device=device, dtype=dtype),
                                shape.kv_heads)
    budget = min(keys, config.resolve_passing_len(2 * keys))  # about a block's budget at W = 1
    return lambda: select.select_passing(k, v, qbar, budget, config.pool_kernel)


def measure_calibration(shape: Shape, sizes: List[int], copy_mib: int, device, dtype, timer) -> List[dict]:
    import torch

    from spava_ds import kernels

    rows = []
    for kind, n, keys in calibration_pieces(sizes, shape.query):
        if kind == "select":
            with torch.inference_mode():
                seconds = timer(_selection_call(shape, keys, device, dtype))
            rows.append(dict(kind=kind, keys=keys, kv_heads=shape.kv_heads, seconds=seconds))
            continue
        q = torch.randn(1, n, shape.heads, shape.head_dim, device=device, dtype=dtype)
        k = torch.randn(1, keys, shape.kv_heads, shape.head_dim, device=device, dtype=dtype)
        v = torch.randn_like(k)
        w = Work()
        (w.causal(n, shape.heads, shape.head_dim) if kind == "causal"
         else w.full(n, keys, shape.heads, shape.head_dim))
        with torch.inference_mode():
            seconds = timer(lambda: kernels.attend(q, k, v, causal=kind == "causal"))
        rows.append(dict(kind=kind, rows=n, keys=keys, flops=w.flops, seconds=seconds))
    for size in (copy_mib * 2 ** 20 // 64, copy_mib * 2 ** 20 // 8, copy_mib * 2 ** 20):  # per-pass cost, bandwidth
        x = torch.empty(max(size // BF16, 1024), device=device, dtype=dtype)
        rows.append(dict(kind="copy", bytes=2 * x.numel() * BF16, seconds=timer(lambda: x.clone())))
    return rows


def measure_share(mode: Mode, tokens: int, shape: Shape, rank: int, device, dtype, timer,
                  cuda_graphs: bool = False) -> dict:
    """Seconds of one call of inter rank ``rank``'s attention, the other ranks faked (launch/bench_host.py); with
    ``cuda_graphs`` the call replays its CUDA graph (``graphs.AttentionGraphs``, as the engine's prefill does)."""
    from spava_ds.benchmarks.host import make_call
    from spava_ds.graphs import AttentionGraphs

    u = mode.ulysses_degree
    graphs = AttentionGraphs(True) if cuda_graphs else None
    call, layout = make_call(mode.name, tokens, mode.world, rank * u, (shape.heads, shape.kv_heads),
                             shape.head_dim, shape.query, device, dtype, u, graphs)
    if graphs is not None:
        call()  # the first call of a signature runs eagerly, the second captures; the timed ones replay
    row = dict(mode=mode.name, world=mode.world, ulysses_degree=u, tokens=tokens, rank=rank,
               local_tokens=layout.local_len(rank * u), seconds=timer(call))
    if graphs is not None:
        row["graphs"] = graphs.stats["replays"] > 0  # False: ran eagerly (no CUDA, or the capture failed)
        graphs.close()
    return row


def run_measure(args) -> int:
    import torch

    from spava_ds.benchmarks.host import alone

    start = time.perf_counter()  # the budget counts the calibration too
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = shape_from_args(args)
    timer = _timer(device, args.iters, args.calls)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    out = dict(card=card, torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M"), dtype=str(dtype),
               command="launch/scaling_model.py " + " ".join(sys.argv[1:]), shape=dataclasses.asdict(shape),
               cuda_graphs=args.cuda_graphs,
               rank=args.rank, calibration=measure_calibration(shape, args.calibration_tokens, args.copy_mib,
                                                              device, dtype, timer), shares=[])
    _write(args.out, out)
    with alone():
        for tokens in args.tokens:
            for mode in args.configs:
                if time.perf_counter() - start > args.time_budget:
                    print(f"time budget of {args.time_budget:.0f} s reached: {args.out} holds what was measured")
                    return 0
                row = measure_share(mode, tokens, shape, args.rank, device, dtype, timer, args.cuda_graphs)
                out["shares"].append(row)
                _write(args.out, out)
                print(f"{tokens:>8} {mode.label:>14}: {row['seconds'] * 1e3:9.3f} ms", flush=True)
    print(f"wrote {args.out}")
    return 0


def _write(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


# ---- validate: fit the constants, predict the measured shares, compare with the end-to-end runs ----------------------
def _fit_line(points: List[Tuple[float, float]]) -> Tuple[float, float]:
    """Least squares ``y = x / rate + c``: returns (rate, c)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    if slope <= 0:  # noise swamps the size dependence (tiny CPU runs): a rate through the origin
        return mx / my, 0.0
    return 1.0 / slope, my - slope * mx


def card_key(device_name: str) -> Optional[str]:
    """The key of ``CARDS`` for a device name such as "NVIDIA H200" (None for other devices)."""
    return next((k for k in CARDS if k.upper() in device_name.upper()), None)


def calibration_points(calibration: List[dict]) -> Dict[str, List[Tuple[float, float]]]:
    """(amount, seconds) per term of ``Work.seconds``: FLOPs of causal, rectangular (keys <= rows) and wide pieces
    (classified as ``Work.full`` does; rows of old files without rows/keys by their kind), keys of few-row pieces,
    key-heads of selections, bytes of copies."""
    points: Dict[str, List[Tuple[float, float]]] = {k: [] for k in ("causal", "full", "wide", "few_rows", "select",
                                                                     "copy")}
    for r in calibration:
        kind, rows, keys = r["kind"], r.get("rows", 0), r.get("keys", 0)
        if kind == "copy":
            points["copy"].append((r["bytes"], r["seconds"]))
        elif kind == "select":
            points["select"].append((keys * r["kv_heads"], r["seconds"]))
        elif kind == "full" and 0 < rows <= FEW_ROWS:
            points["few_rows"].append((keys, r["seconds"]))
        else:
            points["wide" if kind == "full" and keys > rows else kind].append((r["flops"], r["seconds"]))
    return points


def fit_card(calibration: List[dict], base: Card, shape: Optional[Shape] = None) -> Card:
    """The card's compute constants from ``measure``'s calibration rows (links stay nominal). A term the
    calibration lacks keeps the first model's treatment (``calibration_notes`` says which), for ``shape``."""
    pts = calibration_points(calibration)
    shape = shape or SHAPES["7b"]
    fits = {k: _fit_line(p) for k, p in pts.items() if p}
    tflops = {k: fits[k][0] / 1e12 for k in ("causal", "full", "wide") if k in fits}
    card = dataclasses.replace(base, **{f"{k}_tflops": v for k, v in tflops.items()})
    if "wide" not in fits:
        card = dataclasses.replace(card, wide_tflops=card.full_tflops)
    if tflops:
        card = dataclasses.replace(card, call_us=statistics.fmean(max(fits[k][1], 0.0) for k in tflops) * 1e6)
    if "copy" in fits:
        card = dataclasses.replace(card, copy_gbs=fits["copy"][0] / 1e9, pass_us=max(fits["copy"][1], 0.0) * 1e6)
    if "few_rows" in fits:
        card = dataclasses.replace(card, query_ns=1e9 / fits["few_rows"][0], query_us=max(fits["few_rows"][1], 0) * 1e6)
    else:  # the query rows' FLOPs at the rectangular rate
        card = dataclasses.replace(card, query_ns=4 * shape.head_dim * shape.heads * shape.query / card.full_tflops
                                   * 1e-3, query_us=card.call_us)
    if "select" in fits:
        card = dataclasses.replace(card, select_ns=1e9 / fits["select"][0], select_us=max(fits["select"][1], 0) * 1e6)
    else:  # each key read once
        card = dataclasses.replace(card, select_ns=shape.head_dim * BF16 / card.copy_gbs, select_us=0.0)
    return card


def calibration_notes(calibration: List[dict]) -> List[str]:
    """What a calibration (an older measure file) lacks, and the treatment its term then gets."""
    pts = calibration_points(calibration)
    missing = {"wide": "rectangles with more keys than rows at the rectangular rate",
               "few_rows": "the query rows' pieces at the rectangular rate's time per key of their rows x all heads",
               "select": "the selection as one read of the keys at the copy bandwidth",
               "copy": "the copy bandwidth of the card's default"}
    notes = [f"no {k} rows: {text}" for k, text in missing.items() if not pts[k]]
    if len(pts["copy"]) == 1:
        notes.append("one copy size: no per-pass cost of copies and merges (0 us)")
    return notes


def e2e_comparison(paths: List[str], cards: Dict[str, Card]) -> List[dict]:
    """Per multi-GPU case with a Spava breakdown: measured exposed communication and language-model time of spava,
    ring and ulysses against the model (the layers' attention and exposed communication from the model, the rest
    of the language model, which is the same for the three, from Spava's measured breakdown)."""
    rows = []
    for path in paths:
        data = json.load(open(path))
        card = cards.get(card_key(data["meta"]["card"]))
        if card is None:
            continue
        done = [r for r in data["results"] if r.get("status") == "ok" and r.get("gpus", 1) > 1]
        for r in done:
            bd = r.get("breakdown_per_rank")
            if r["method"] != "spava" or not bd or r["model"] not in SHAPES:
                continue
            shape = dataclasses.replace(SHAPES[r["model"]], query=r["query_tokens"])
            tokens, world = r["context_tokens"] + r["query_tokens"], r["gpus"]
            rest = statistics.fmean(b["linear"] + b["lm_other"] for b in bd)
            same_case = {x["method"]: x for x in done if x["case"] == r["case"]}
            for method in ("spava", "ring", "ulysses"):
                if method not in same_case or not feasible(Mode(method, world), shape):
                    continue
                p = predict(Mode(method, world), tokens, shape, card)
                row = dict(file=os.path.basename(path), case=r["case"], method=method,
                           lm_measured=same_case[method]["lm"], lm_predicted=rest + shape.layers * p.layer_s,
                           comm_predicted=shape.layers * p.comm_s, exposed_predicted=shape.layers * p.exposed_s)
                if method == "spava":
                    row["exposed_measured"] = [min(b["communication"] for b in bd), max(b["communication"] for b in bd)]
                rows.append(row)
    return rows


def share_work(share: dict, shape: Shape) -> Work:
    """The model's work for one measured share; a share replayed as a CUDA graph also copies its inputs (q, k, v
    with all heads) into the graph and the output out."""
    mode = Mode(share["mode"], share["world"], share["ulysses_degree"])
    w = work(mode, share["tokens"], shape, share["rank"])[0]
    if share.get("graphs"):
        w.traffic(share["local_tokens"] * (2 * shape.heads + 2 * shape.kv_heads) * shape.head_dim, COPY)
    return w


def share_errors(measured: dict, card: Card, shares: Optional[List[dict]] = None) -> List[dict]:
    shape = Shape(**measured["shape"])
    rows = []
    for r in measured["shares"] if shares is None else shares:
        pred = share_work(r, shape).seconds(card)
        rows.append(dict(tokens=r["tokens"], mode=Mode(r["mode"], r["world"], r["ulysses_degree"]).label,
                         measured_ms=r["seconds"] * 1e3, predicted_ms=pred * 1e3, error=pred / r["seconds"] - 1))
    return rows


# The terms that a calibration written before 2026-11-30 lacks, as (Card field, the Work amount it multiplies).
CROSS_VALIDATED = (("select_ns", "scored"), ("query_ns", "few_row_keys"), ("wide_extra", "wide_flops"))


def fit_terms_on_shares(measured: dict, card: Card, shares: List[dict]) -> Card:
    """CROSS-VALIDATION ONLY: ``card`` with the constants of ``CROSS_VALIDATED`` fitted on ``shares`` (least
    squares of the relative error, non-negative), the rest as calibrated. Wide pieces get 1 / R_rect plus the
    fitted seconds per FLOP."""
    import torch

    shape = Shape(**measured["shape"])
    zero = dataclasses.replace(card, select_ns=0.0, query_ns=0.0, wide_tflops=card.full_tflops)
    works = [share_work(r, shape) for r in shares]
    scale = (1e-9, 1e-9, 1e-12)  # ns per key-head, ns per key, s per TFLOP
    x = torch.tensor([[getattr(w, a) * s for (_, a), s in zip(CROSS_VALIDATED, scale)] for w in works],
                     dtype=torch.float64)
    y = torch.tensor([r["seconds"] - w.seconds(zero) for r, w in zip(shares, works)], dtype=torch.float64)
    weight = 1 / torch.tensor([r["seconds"] for r in shares], dtype=torch.float64)
    keep = [True] * len(CROSS_VALIDATED)
    coef: Dict[int, float] = {}
    while any(keep):  # drop a term whose best coefficient is negative (unphysical), refit the others
        cols = [i for i, k in enumerate(keep) if k]
        theta = torch.linalg.lstsq(x[:, cols] * weight[:, None], (y * weight)[:, None]).solution[:, 0]
        coef = dict(zip(cols, theta.tolist()))
        if (theta >= 0).all():
            break
        keep[cols[int(theta.argmin())]] = False
        coef = {}
    extra = coef.get(2, 0.0)
    return dataclasses.replace(zero, select_ns=coef.get(0, 0.0), query_ns=coef.get(1, 0.0),
                               wide_tflops=1 / (1 / card.full_tflops + extra))


def cross_validation(measured: dict, card: Card) -> List[dict]:
    """Leave one token count out: the terms of ``CROSS_VALIDATED`` fitted on the shares of the other token counts,
    the held-out count predicted."""
    out = []
    for tokens in sorted({r["tokens"] for r in measured["shares"]}):
        train = [r for r in measured["shares"] if r["tokens"] != tokens]
        held = [r for r in measured["shares"] if r["tokens"] == tokens]
        fitted = fit_terms_on_shares(measured, card, train)
        out.append(dict(tokens=tokens, card=fitted, errors=share_errors(measured, fitted, held)))
    return out


def run_validate(args) -> int:
    cards = dict(CARDS)
    if args.measured:
        data = json.load(open(args.measured))
        key = card_key(data["card"])
        card = fit_card(data["calibration"], CARDS.get(key, Card(data["card"])), Shape(**data["shape"]))
        if key:  # the end-to-end runs on this card use the fitted constants too
            cards[key] = card
        timing = "CUDA graph replays" if data.get("cuda_graphs") else "eager calls"
        print(f"# {data['card']} ({data['date']}), shares timed as {timing}: constants fitted on the calibration "
              f"only: {_constants(card)}")
        for note in calibration_notes(data["calibration"]):
            print(f"# calibration: {note}")
        print_shares(share_errors(data, card))
        if args.cross_validate:
            print_cross_validation(cross_validation(data, card))
    else:
        print(f"# no --measured JSON: the cards' default constants ({_constants(cards['h200'])})")
    print_e2e(e2e_comparison(args.e2e, cards))
    return 0


def print_cross_validation(folds: List[dict]) -> None:
    print("\n## Cross-validation (NOT the verdict above): selection, query-row and wide-piece constants fitted on "
          "the shares of the other token counts, the held-out count predicted\n")
    print("| held-out tokens | fitted on the others: selection ns/key-head, query ns/key, wide TFLOP/s | "
          "largest held-out error | held-out errors |\n|---|---|---|---|")
    for f in folds:
        c, errs = f["card"], [r["error"] for r in f["errors"]]
        print(f"| {f['tokens']} | {c.select_ns:.3g}, {c.query_ns:.3g}, {c.wide_tflops:.3g} | "
              f"{max(map(abs, errs)) * 100:.1f}% | " + " ".join(f"{r['mode']} {r['error'] * 100:+.0f}%"
                                                             for r in f["errors"]) + " |")


def print_shares(errors: List[dict]) -> None:
    print("\n| tokens | mode | measured ms | predicted ms | error |\n|---|---|---|---|---|")
    for r in errors:
        print(f"| {r['tokens']} | {r['mode']} | {r['measured_ms']:.3f} | {r['predicted_ms']:.3f} | "
              f"{r['error'] * 100:+.1f}% |")
    long = [abs(r["error"]) for r in errors if r["tokens"] >= 65536]
    if long:
        print(f"\nlargest error at 64K tokens and more: {max(long) * 100:.1f}% over {len(long)} shares "
              f"({'within' if max(long) <= 0.20 else 'NOT within'} 20%)")


def print_e2e(rows: List[dict]) -> None:
    print("\n| run | case | method | LM measured (s) | LM predicted (s) | error | comm predicted (s) | "
          "exposed predicted (s) | exposed measured, min-max over ranks (s) |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        measured = "{:.4f}-{:.4f}".format(*r["exposed_measured"]) if "exposed_measured" in r else "-"
        print(f"| {r['file']} | {r['case']} | {r['method']} | {r['lm_measured']:.3f} | {r['lm_predicted']:.3f} | "
              f"{(r['lm_predicted'] / r['lm_measured'] - 1) * 100:+.1f}% | {r['comm_predicted']:.4f} | "
              f"{r['exposed_predicted']:.4f} | {measured} |")


def _constants(card: Card) -> str:
    return (f"attention {card.causal_tflops:.3g} (causal) / {card.full_tflops:.3g} (rectangular) / "
            f"{card.wide_tflops:.3g} (wide) TFLOP/s, {card.call_us:.3g} us per piece; query rows "
            f"{card.query_ns:.3g} ns per key + {card.query_us:.3g} us; selection {card.select_ns:.3g} ns per key and "
            f"KV head + {card.select_us:.3g} us; copies {card.copy_gbs:.3g} GB/s + {card.pass_us:.3g} us a pass; "
            f"links (nominal) NVLink "
            f"{card.intra_gbs:.0f} GB/s, network {card.inter_gbs:.0f} GB/s per GPU, {card.gpus_per_node} GPUs a node")


# ---- predict: 8-64 GPUs, 1M-4M tokens --------------------------------------------------------------------------------
def candidate_modes(world: int, shape: Shape, card: Card) -> Dict[str, List[Mode]]:
    """Per family, the feasible modes on ``world`` GPUs (2-D: every U dividing a node that the heads allow)."""
    degrees = [u for u in (2, 4, 8) if u <= card.gpus_per_node and world % u == 0 and world // u >= 2]
    fams = {"spava": [Mode("spava", world)], "spava 2-D": [Mode("spava", world, u) for u in degrees],
            "ring": [Mode("ring", world)], "ulysses": [Mode("ulysses", world)],
            "ring 2-D": [Mode("ring", world, u) for u in degrees]}
    return {f: [m for m in ms if feasible(m, shape)] for f, ms in fams.items()}


def best(modes: List[Mode], tokens: int, shape: Shape, card: Card) -> Optional[Prediction]:
    preds = [predict(m, tokens, shape, card) for m in modes]
    return min(preds, key=lambda p: p.layer_s) if preds else None


def prediction_grid(shape: Shape, card: Card, tokens_list: List[int], worlds: List[int]) -> List[dict]:
    rows = []
    for tokens in tokens_list:
        for world in worlds:
            fams = candidate_modes(world, shape, card)
            rows.append(dict(tokens=tokens, world=world,
                             best={f: best(ms, tokens, shape, card) for f, ms in fams.items()}))
    return rows


def crossover(rows: List[dict], tokens: int, margin: float = 0.05) -> Optional[int]:
    """The fewest GPUs at which the best 2-D Spava is faster per layer than flat Spava (by ``margin`` at least)."""
    for r in rows:
        flat, twod = r["best"]["spava"], r["best"]["spava 2-D"]
        if r["tokens"] == tokens and flat and twod and twod.layer_s < (1 - margin) * flat.layer_s:
            return r["world"]
    return None


def print_grid(shape: Shape, card: Card, rows: List[dict]) -> None:
    fams = list(rows[0]["best"])
    print(f"\n## {shape.name} ({shape.heads}/{shape.kv_heads} heads, d {shape.head_dim}, {shape.layers} layers) on "
          f"{card.name}: attention time per layer (ms) of the best variant per family; memory per GPU (GiB)")
    print("| tokens | GPUs | " + " | ".join(fams) + " | 2-D / flat Spava | Spava exposed comm (ms) | "
          "memory spava / 2-D |")
    print("|---|---|" + "---|" * (len(fams) + 3))
    for r in rows:
        cells = [f"{p.layer_s * 1e3:.1f} ({p.mode.label})" if p else "n/a" for p in r["best"].values()]
        flat, twod = r["best"]["spava"], r["best"]["spava 2-D"]
        ratio = f"{twod.layer_s / flat.layer_s:.2f}" if flat and twod else "-"
        mem = f"{flat.memory_gib:.0f} / {twod.memory_gib:.0f}" if flat and twod else "-"
        print(f"| {_tokens_label(r['tokens'])} | {r['world']} | " + " | ".join(cells)
              + f" | {ratio} | {flat.exposed_s * 1e3:.2f} | {mem} |")
    for tokens in sorted({r["tokens"] for r in rows}):
        where = crossover(rows, tokens)
        print(f"{_tokens_label(tokens)} tokens: 2-D Spava overtakes flat Spava (by 5% or more) from "
              f"{f'{where} GPUs' if where else 'no GPU count in the grid'}")


def _tokens_label(n: int) -> str:
    return f"{n // 2 ** 20}M" if n % 2 ** 20 == 0 else f"{n // 1024}K"


def plot(grids: Dict[str, List[dict]], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print(f"matplotlib is not importable here: no plot written to {path}")
        return
    fig, axes = plt.subplots(1, len(grids), figsize=(6.5 * len(grids), 4.6), squeeze=False)
    for ax, (title, rows) in zip(axes[0], grids.items()):
        for tokens, style in zip(sorted({r["tokens"] for r in rows}), ("-", "--", ":")):
            sel = [r for r in rows if r["tokens"] == tokens]
            for fam, color in (("spava", "C0"), ("spava 2-D", "C3"), ("ring 2-D", "C2")):
                pts = [(r["world"], r["best"][fam].layer_s * 1e3) for r in sel if r["best"][fam]]
                if pts:
                    ax.plot(*zip(*pts), style, color=color, marker="o", label=f"{fam}, {_tokens_label(tokens)}")
        ax.set(xscale="log", yscale="log", xlabel="GPUs", ylabel="attention per layer (ms), predicted", title=title)
        worlds = sorted({r["world"] for r in rows})
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(worlds, labels=[str(w) for w in worlds])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def run_predict(args) -> int:
    card = CARDS[args.card]
    if args.measured:
        data = json.load(open(args.measured))
        card = fit_card(data["calibration"], card, Shape(**data["shape"]))
        for note in calibration_notes(data["calibration"]):
            print(f"# calibration: {note}")
    card = dataclasses.replace(card, inter_gbs=args.inter_gbs or card.inter_gbs,
                               gpus_per_node=args.gpus_per_node or card.gpus_per_node)
    print(f"# constants: {_constants(card)}")
    grids = {}
    for key in args.shapes:
        shape = SHAPES[key]
        rows = prediction_grid(shape, card, args.tokens, args.gpus)
        print_grid(shape, card, rows)
        grids[f"{shape.name} on {card.name}"] = rows
    if args.plot:
        plot(grids, args.plot)
    return 0


# ---- command line ----------------------------------------------------------------------------------------------------
def shape_from_args(args) -> Shape:
    shape = SHAPES[args.shape]
    if args.heads:
        shape = dataclasses.replace(shape, heads=args.heads[0], kv_heads=args.heads[1])
    return dataclasses.replace(shape, head_dim=args.head_dim or shape.head_dim, query=args.query or shape.query)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("predict", help="predictions for many GPUs and long sequences")
    pr.add_argument("--card", choices=sorted(CARDS), default="h200")
    pr.add_argument("--measured", help="a measure JSON: fit the card's compute constants on its calibration")
    pr.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["7b", "3b"])
    pr.add_argument("--tokens", type=int, nargs="+", default=[2 ** 20, 2 ** 21, 2 ** 22])
    pr.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 32, 64])
    pr.add_argument("--inter-gbs", type=float, default=None, help="network GB/s per GPU (default: the card's)")
    pr.add_argument("--gpus-per-node", type=int, default=None)
    pr.add_argument("--plot", help="PNG path (needs matplotlib)")
    me = sub.add_parser("measure", help="calibration kernels and one rank's shares on one device")
    me.add_argument("--out", required=True)
    me.add_argument("--device", default="cuda" if _cuda() else "cpu")
    me.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    me.add_argument("--heads", type=int, nargs=2, metavar=("HQ", "HKV"), help="override the shape's heads")
    me.add_argument("--head-dim", type=int, default=None)
    me.add_argument("--query", type=int, default=None)
    me.add_argument("--tokens", type=int, nargs="+", default=[65536, 131072, 262144])
    me.add_argument("--configs", type=parse_config, nargs="+", default=[parse_config(c) for c in DEFAULT_CONFIGS],
                    help="MODE:W or MODE:W:U (U: the 2-D mode's ulysses_degree)")
    me.add_argument("--rank", type=int, default=1, help="the inter rank to stand for")
    me.add_argument("--calibration-tokens", type=int, nargs="+", default=[4096, 16384, 32768])
    me.add_argument("--copy-mib", type=int, default=512)
    me.add_argument("--iters", type=int, default=3, help="timed bursts (the median counts)")
    me.add_argument("--calls", type=int, default=2, help="calls per burst")
    me.add_argument("--cuda-graphs", action="store_true",
                    help="time the shares as CUDA graph replays (SpavaConfig.cuda_graphs; default: eager calls)")
    me.add_argument("--time-budget", type=float, default=400.0,
                    help="start no share after this many seconds (the calibration included)")
    va = sub.add_parser("validate", help="the model against measure's JSON and the end-to-end runs")
    va.add_argument("--measured", help="measure's JSON (without it only the end-to-end comparison runs)")
    va.add_argument("--cross-validate", action="store_true",
                    help="also fit the selection, query-row and wide-piece constants on the shares of all but one "
                         "token count and print the held-out errors (labelled; not the verdict)")
    va.add_argument("--e2e", nargs="*", default=sorted(glob.glob(os.path.join(ROOT, "docs", "results", "e2e_*.json"))))
    for sub_parser in (pr, me, va):
        entry.add_arguments(sub_parser)
    return p


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return entry.run_main({"predict": run_predict, "measure": run_measure, "validate": run_validate}[args.command],
                          args)


if __name__ == "__main__":
    sys.exit(main())
