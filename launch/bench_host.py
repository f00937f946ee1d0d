"""Host cost of one layer's sequence-parallel attention, per mode, in one process standing for one of W ranks.

At short contexts a layer's GPU work is smaller than the time Python takes to issue it, and then the number of
operators per call, not the kernels, sets the speed (docs/benchmarks.md, "Short contexts"). This script measures,
for one rank of a W-rank group, per mode:

* ``host``: the wall time to issue one call, in bursts of calls issued back to back while the GPU is kept busy
  by a sleep kernel (nothing waits for the GPU); the least disturbed burst counts;
* ``gpu``: the time the GPU spends on the call's kernels back to back (queued behind the sleep, no gaps);
* ``ops``: the ATen operators one call runs (from torch.profiler; views included);
* ``call``: the wall time per call of calls issued back to back with nothing else queued (about the larger of
  ``host`` and ``gpu``): what one layer's attention costs when nothing hides it;
* ``syncs``: the calls of one call that make the host wait for the device (``benchmarks.host.count_syncs``: on CUDA
  every synchronising CUDA runtime call ``torch.cuda.set_sync_debug_mode`` sees; on the CPU the calls that would
  stall a GPU, ``profiling.host_syncs``). Any sync makes the host wait out the GPU's queue: it cannot run ahead.

With ``--training`` a call is a training layer's attention: the forward with gradients, then its backward (what
a checkpointed layer runs twice forward and once backward per step).

A layer is host-bound when ``host`` exceeds ``gpu``. With ``--cuda-graphs`` every mode also runs through CUDA graphs
of the call (``spava_ds.graphs.AttentionGraphs``, as the engine's prefill does: the warm-up captures it, the timed
calls replay it), one more row each: ``host`` is then the time to copy q/k/v in, replay and copy the output out,
``capture ms`` the host time the capture took once; a summary compares each mode's ``call`` with the best exact
mode's, with and without graphs. The rank and world size come from PyTorch's fake process
group (``torch.testing._internal.distributed.fake_pg``), so one GPU (or the CPU) is enough, and spava_ds's
collective hook (``comm.collective_hook``) makes every collective return at once (the fake group's all-gather
would copy the input W times, launches a real NCCL call does not make): communication is not in the numbers, a
real collective adds about one launch each.
Inputs are random; the numbers do not depend on them.

    python launch/bench_host.py                                  # 3B shape, 16K and 32K tokens, W = 2 and 4, CUDA
    python launch/bench_host.py --heads 28 4 --cuda-graphs        # 7B shape, each mode eager and with CUDA graphs
    python launch/bench_host.py --device cpu --tokens 1024 --heads 4 2 --head-dim 16   # op counts on a CPU
    python launch/bench_host.py --heads 28 4 --tokens 65536 --world 4 --training --modes spava ring ulysses
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from spava_ds import MODE_TABLE, entry
from spava_ds.benchmarks.host import alone, count_ops, count_syncs, make_call, time_back_to_back, time_call
from spava_ds.graphs import AttentionGraphs

MODES = [mode for mode, spec in MODE_TABLE.items() if spec.schedule != "local"]  # the modes that run over W ranks


def measure(mode: str, tokens: int, world: int, rank: int, args, device, dtype, cuda_graphs: bool = False) -> dict:
    u = args.ulysses_degree if MODE_TABLE[mode].mesh else 1
    graphs = AttentionGraphs(True) if cuda_graphs else None  # a layer's attention, captured once, then replayed
    call, layout = make_call(mode, tokens, world, rank * u, args.heads, args.head_dim, args.query, device, dtype, u,
                             graphs, training=args.training)
    n = layout.local_len(rank * u)
    for _ in range(args.warmup):
        call()
    host, gpu = time_call(call, device, args.iters)
    if args.python_profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.runcall(time_call, call, device, args.iters)
        print(f"## {mode}, {tokens} tokens, W = {world}: own host time over {args.iters} calls")
        stats = pstats.Stats(prof)
        stats.sort_stats("tottime").print_stats(args.python_profile)
        stats.sort_stats("cumulative").print_stats(args.python_profile)
    row = dict(mode=mode, tokens=tokens, world=world, rank=rank, ulysses_degree=u, local_tokens=n,
               host_ms=host * 1e3, gpu_ms=gpu * 1e3, ops=count_ops(call, args.top),
               call_ms=time_back_to_back(call, device, args.iters) * 1e3, syncs=count_syncs(call, device),
               graphs=cuda_graphs, training=args.training)
    if graphs is not None:
        row.update(replayed=graphs.stats["replays"] > 0, capture_ms=graphs.capture_seconds * 1e3,
                   graph_mib=graphs.device_bytes() / 2 ** 20,
                   eager_reason=None if graphs.stats["replays"] else graphs.eager_reason(*call.inputs, layout, None))
        graphs.close()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--tokens", type=int, nargs="+", default=[16384, 32768], help="whole sequence (context + query)")
    p.add_argument("--world", type=int, nargs="+", default=[2, 4])
    p.add_argument("--rank", type=int, default=1, help="the (inter) rank to stand for (1: a middle rank, both blocks)")
    p.add_argument("--ulysses-degree", type=int, default=1,
                   help="U > 1: spava, ring, apb and star run the two-dimensional mode on a (W / U) x U mesh (rank: "
                        "its inter rank, intra rank 0); ulysses stays flat over W")
    p.add_argument("--heads", type=int, nargs=2, default=[16, 2], metavar=("HQ", "HKV"),
                   help="query and KV heads (default: Qwen2.5-VL-3B's 16 and 2)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--query", type=int, default=48, help="query tokens")
    p.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also run every mode through CUDA graphs of the call (one more row each)")
    p.add_argument("--training", action="store_true",
                   help="a call is a training layer's: forward with gradients and its backward "
                        "(not with --cuda-graphs)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=10, help="bursts of 8 calls timed")
    p.add_argument("--top", type=int, default=0, help="print the N operators with the most host time per call")
    p.add_argument("--python-profile", type=int, default=0, metavar="N",
                   help="print the N functions with the most own host time over the timed calls (cProfile)")
    p.add_argument("--out", default=None, help="also write the rows as JSON")
    entry.add_arguments(p)
    args = p.parse_args(argv)
    if any(w % args.ulysses_degree for w in args.world):
        p.error(f"--ulysses-degree {args.ulysses_degree} does not divide every --world {args.world}")
    if args.training and args.cuda_graphs:
        p.error("--training runs eagerly: CUDA graphs replay the prefill only")
    if args.rank >= min(args.world) // args.ulysses_degree:
        p.error(f"--rank {args.rank} is not an (inter) rank of W = {min(args.world)}")
    return entry.run_main(bench, args)


def bench(args) -> int:
    """One rank's host and GPU time per call of every mode, token count and world size; prints the table."""
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    print(f"# {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}, "
          f"{dtype}, heads {args.heads[0]}/{args.heads[1]}, head_dim {args.head_dim}, rank {args.rank} of W, "
          f"{'training (forward + backward)' if args.training else 'prefill'}")
    print("| tokens | W | mode | local tokens | host ms | GPU ms | ATen ops | syncs | bound | call ms | CUDA graphs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    with alone():
        for tokens in args.tokens:
            for world in args.world:
                for mode in args.modes:
                    for cuda_graphs in ([False, True] if args.cuda_graphs else [False]):
                        r = measure(mode, tokens, world, args.rank, args, device, dtype, cuda_graphs)
                        rows.append(r)
                        print(_row_line(r, device), flush=True)
    if args.cuda_graphs:
        print(summary(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=str(device), dtype=str(dtype), rows=rows), f, indent=1)
    return 0


def _row_line(r: dict, device: torch.device) -> str:
    bound = "-" if device.type != "cuda" else ("host" if r["host_ms"] > r["gpu_ms"] else "GPU")
    graphs = "-" if not r["graphs"] else (f"replayed (capture {r['capture_ms']:.1f} ms, {r['graph_mib']:.0f} MiB)"
                                         if r["replayed"] else f"eager: {r['eager_reason']}")
    u = r["ulysses_degree"]
    label = r["mode"] if u == 1 else f"{r['mode']} {r['world'] // u}x{u}"
    return (f"| {r['tokens']} | {r['world']} | {label} | {r['local_tokens']} | {r['host_ms']:.3f} | "
            f"{r['gpu_ms']:.3f} | {r['ops']} | {r['syncs']} | {bound} | {r['call_ms']:.3f} | {graphs} |")


def summary(rows) -> str:
    """Markdown: per token count and W, each approximate mode's ``call`` against the best exact mode's, eager and
    with graphs, and whether Spava's host time per call is below its GPU time."""
    exact = {m for m, spec in MODE_TABLE.items() if spec.exact}
    lines = ["", "| tokens | W | CUDA graphs | best exact mode: call ms | spava call ms | spava / best exact | "
             "spava host < GPU |", "|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["tokens"], r["world"], r["graphs"]), []).append(r)
    for (tokens, world, graphs), group in groups.items():
        best = min((r for r in group if r["mode"] in exact), key=lambda r: r["call_ms"], default=None)
        spava = next((r for r in group if r["mode"] == "spava"), None)
        if best is None or spava is None:
            continue
        below = "-" if math.isnan(spava["gpu_ms"]) else "yes" if spava["host_ms"] < spava["gpu_ms"] else "no"
        lines.append(f"| {tokens} | {world} | {'yes' if graphs else 'no'} | {best['mode']}: {best['call_ms']:.3f} | "
                     f"{spava['call_ms']:.3f} | {spava['call_ms'] / best['call_ms']:.2f} | {below} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
