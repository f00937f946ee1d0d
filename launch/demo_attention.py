"""Spava attention over several processes on a synthetic long sequence, checked against dense attention.

    torchrun --standalone --nproc_per_node 2 launch/demo_attention.py            # CPU (gloo) or GPUs (NCCL)
    torchrun --standalone --nproc_per_node 4 launch/demo_attention.py --context-len 32768 --dtype bfloat16
    torchrun --standalone --nproc_per_node 4 launch/demo_attention.py --ulysses-degree 2   # 2-D: 2 x 2 mesh

Every rank builds the same random q/k/v for the whole sequence (one attention layer of a long-video model: a long
context then a short question), keeps its zigzag share, runs ``sp_attention`` (``--mode spava`` or ``ring``; with
``--ulysses-degree U`` the two-dimensional mode, whose reference is the flat mode at W / U), and rank 0 prints:

* the largest difference from the single-process reference (the distributed code is exact w.r.t. the algorithm),
* the difference from dense causal attention for the question rows (exact by construction) and for the context
  rows (Spava's approximation: block rows see only the passing keys of earlier blocks),
* the time of Spava on W processes and of dense attention on one.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch
import torch.distributed as dist

from spava_ds import (MeshLayout, SpavaConfig, dense_causal_attention, entry, make_layout,
                      reference_attention, sp_attention)
from spava_ds.comm import init_mesh
from spava_ds.config import MESH_MODES

log = logging.getLogger("spava_ds.demo")


def synthetic_qkv(args, device, dtype):
    """Random q/k/v for one layer, with a few 'needle' keys that the question attends to strongly."""
    g = torch.Generator().manual_seed(args.seed)
    n = args.context_len + args.query_len
    q = torch.randn(1, n, args.heads, args.head_dim, generator=g)
    k = torch.randn(1, n, args.kv_heads, args.head_dim, generator=g)
    v = torch.randn(1, n, args.kv_heads, args.head_dim, generator=g)
    needles = torch.randint(0, args.context_len, (16,), generator=g)
    direction = q[:, args.context_len:].mean(dim=(1, 2))  # what the question looks for
    k[:, needles] += 4 * direction / direction.norm() * args.head_dim ** 0.5 / 4
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def _reference(q, k, v, layout):
    """The single-process reference: Spava at the inter size in the two-dimensional mode (KV heads repeated when
    they are fewer than the intra size, as mesh_attention does)."""
    if not isinstance(layout, MeshLayout):
        return reference_attention(q, k, v, layout)
    copies = max(1, layout.intra_size // k.shape[2])
    return reference_attention(q, k.repeat_interleave(copies, 2), v.repeat_interleave(copies, 2), layout.inter)


def timed(fn, device, repeat):
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return out, min(times)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context-len", type=int, default=8192, help="context tokens before the question")
    p.add_argument("--query-len", type=int, default=48, help="question tokens")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--anchor-len", type=int, default=None, help="default: the paper's rule on the context length")
    p.add_argument("--passing-len", type=int, default=None, help="default: the paper's rule on the context length")
    p.add_argument("--backend", default="auto")
    p.add_argument("--mode", default="spava", choices=MESH_MODES, help="ring: exact attention")
    p.add_argument("--ulysses-degree", type=int, default=1,
                   help="ranks per intra group (node) of the two-dimensional mode; 1: flat over all ranks")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeat", type=int, default=3, help="timed runs (the best is reported)")
    p.add_argument("--seed", type=int, default=0)
    entry.add_arguments(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return entry.run_main(demo, args)


def demo(args) -> None:
    """Spava on the ranks against the reference and dense attention on rank 0; rank 0 prints the errors and times."""
    rank, world = entry.init_distributed(args)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # one core per rank: W ranks use W cores, dense uses one
    dtype = getattr(torch, args.dtype)
    config = SpavaConfig(mode=args.mode, anchor_len=args.anchor_len, passing_len=args.passing_len,
                         backend=args.backend, ulysses_degree=args.ulysses_degree)
    layout = make_layout(args.context_len, args.query_len, world, config)  # raises on every rank if too short
    group = init_mesh(args.ulysses_degree) if isinstance(layout, MeshLayout) else None
    if rank == 0:
        log.info("%d rank(s) on %s, %s; %s; passing budget %d tokens per block and KV head", world, device.type,
                 args.dtype, layout, config.resolve_passing_len(args.context_len))

    q, k, v = synthetic_qkv(args, device, dtype)
    ql, kl, vl = (layout.shard(t, rank) for t in (q, k, v))
    out, spava_s = timed(lambda: sp_attention(ql, kl, vl, layout, group=group), device, args.repeat)
    gathered = [out]
    if world > 1:
        t = torch.tensor([spava_s], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        spava_s = t.item()
        # Local lengths differ by at most one token per block: pad to gather, trim by the layout.
        width = max(layout.local_len(r) for r in range(world))
        padded = torch.nn.functional.pad(out, (0, 0, 0, 0, 0, width - out.shape[1]))
        bucket = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(bucket, padded)
        gathered = [b[:, :layout.local_len(r)] for r, b in enumerate(bucket)]

    if rank == 0:
        full = layout.unshard(gathered).float()
        dense, dense_s = timed(lambda: dense_causal_attention(q, k, v), device, args.repeat)
        dense = dense.float()
        ref = dense if config.mode_spec.exact else _reference(q, k, v, layout).float()
        ctx = args.context_len
        rel = ((full[:, :ctx] - dense[:, :ctx]).norm() / dense[:, :ctx].norm()).item()
        print(f"spava_ds demo: {args.mode} on {world} rank(s) ({layout}), context {ctx} + question "
              f"{args.query_len} tokens, "
              f"{args.heads}/{args.kv_heads} heads, d={args.head_dim}, {args.dtype}, {device.type}")
        print(f"  max |{args.mode} - reference|          : {(full - ref).abs().max().item():.2e}  (exact algorithm)")
        print(f"  max |{args.mode} - dense|, question rows: {(full[:, ctx:] - dense[:, ctx:]).abs().max().item():.2e}"
              "  (exact by design)")
        print(f"  relative error vs dense, context  : {rel:.2e}  (the approximation)")
        print(f"  time: {args.mode} on {world} process(es) {spava_s * 1e3:.1f} ms, dense on one {dense_s * 1e3:.1f} ms")


if __name__ == "__main__":
    sys.exit(main())
