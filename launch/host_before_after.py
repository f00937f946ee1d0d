"""Host cost per layer before and after a change, in one run on one device: launch/bench_host.py of an older copy of
the repository (``--before``: its own ``spava_ds/`` and ``launch/bench_host.py``) and of this one, interleaved, two
repeats each, for the Qwen2.5-VL-3B and 7B attention shapes; then one table of both.

Make the older copy once (an ignored folder; carry it to the GPU machine), e.g. for commit a65931d:

    mkdir -p .before && git archive a65931d spava_ds launch/bench_host.py | tar -x -C .before

    python launch/host_before_after.py --before .before --out $OUT/host_before_after.json     # one GPU, ~6 min
    python launch/host_before_after.py --before .before --cuda-graphs --out $OUT/h.json  # + this tree's graph rows
    python launch/host_before_after.py --before . --device cpu --tokens 301 --world 2 --shapes 3b --repeats 1 \
        --iters 1 --head-dim 16 --out /tmp/h.json                                                 # CPU smoke run

Each run is a separate process (``python DIR/launch/bench_host.py`` with ``PYTHONPATH=DIR``, so each half imports
its own ``spava_ds``). Runs alternate before/after so that a drift of the machine
hits both; ``--time-budget`` starts no run that the slowest run so far would carry past it. ``--cuda-graphs`` gives
this tree's bench_host ``--cuda-graphs`` (an older one may not have it): its graph rows are compared with the older
tree's eager rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

from spava_ds.models.shapes import PUBLISHED_SHAPES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {name: (PUBLISHED_SHAPES[name].heads, PUBLISHED_SHAPES[name].kv_heads)  # query heads, KV heads
          for name in ("3b", "7b")}


def plan_runs(shapes: List[str], repeats: int) -> List[tuple]:
    """(version, shape, repeat) in the order they run: before and after side by side."""
    return [(version, shape, rep) for rep in range(1, repeats + 1) for shape in shapes
            for version in ("before", "after")]


def run_one(version: str, shape: str, args, out_path: str) -> dict:
    tree = args.before if version == "before" else ROOT
    hq, hkv = SHAPES[shape]
    cmd = [sys.executable, os.path.join(tree, "launch", "bench_host.py"), "--heads", str(hq), str(hkv),
           "--head-dim", str(args.head_dim), "--tokens", *map(str, args.tokens), "--world", *map(str, args.world),
           "--iters", str(args.iters), "--warmup", str(args.warmup), "--out", out_path]
    if args.device:
        cmd += ["--device", args.device]
    if args.cuda_graphs and version == "after":
        cmd += ["--cuda-graphs"]
    env = dict(os.environ, PYTHONPATH=tree)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{version} {shape}: bench_host failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    with open(out_path, encoding="utf-8") as f:
        run = json.load(f)
    run["header"] = res.stdout.splitlines()[0]  # "# <card>, torch <version>, <dtype>, heads ..."
    return run


def run_all(args) -> Dict[str, dict]:
    runs, start, slowest = {}, time.perf_counter(), 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for version, shape, rep in plan_runs(args.shapes, args.repeats):
            elapsed = time.perf_counter() - start
            if args.time_budget is not None and elapsed + slowest > args.time_budget:
                print(f"time budget: {version}_{shape}_{rep} and later runs skipped", flush=True)
                break
            tic = time.perf_counter()
            name = f"{version}_{shape}_{rep}"
            runs[name] = run_one(version, shape, args, os.path.join(tmp, name + ".json"))
            slowest = max(slowest, time.perf_counter() - tic)
            print(f"{name}: {time.perf_counter() - tic:.0f} s", flush=True)
    return runs


def table(runs: Dict[str, dict], shapes: List[str]) -> str:
    """Markdown: per shape, tokens, W and mode the ATen ops, the host ms of every repeat before and after, the change
    of the mean host time, and the GPU ms. Rows of the newer tree with CUDA graphs ("mode + graphs") are compared
    with the older tree's eager rows."""
    lines = ["| shape | tokens | W | mode | ATen ops before → after | host ms before | host ms after | change | "
             "GPU ms before → after |", "|---|---|---|---|---|---|---|---|---|"]
    for shape in shapes:
        rows: Dict[tuple, Dict[str, List[dict]]] = {}
        for name, run in runs.items():
            version, run_shape, _ = name.split("_")
            if run_shape == shape:
                for r in run["rows"]:
                    key = (r["tokens"], r["world"], r["mode"])
                    rows.setdefault(key, {}).setdefault(version + ("+graphs" if r.get("graphs") else ""), []).append(r)
        for (tokens, world, mode), by in rows.items():
            for after in ("after", "after+graphs"):
                if "before" in by and after in by:
                    lines.append(_table_row(shape, tokens, world, mode + after[5:].replace("+", " + "),
                                            by["before"], by[after]))
    return "\n".join(lines)


def _table_row(shape, tokens, world, label, before: List[dict], after: List[dict]) -> str:
    host = [[r["host_ms"] for r in rows] for rows in (before, after)]
    mean = [sum(h) / len(h) for h in host]
    return (f"| {shape} | {tokens} | {world} | {label} | {before[0]['ops']} → {after[0]['ops']} | "
            + " | ".join(" / ".join(f"{h:.2f}" for h in hs) for hs in host)
            + f" | {100 * (mean[1] / mean[0] - 1):+.0f} % | {before[0]['gpu_ms']:.2f} → {after[0]['gpu_ms']:.2f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="folder with the older spava_ds/ and launch/bench_host.py")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tokens", type=int, nargs="+", default=[16384, 32768])
    p.add_argument("--world", type=int, nargs="+", default=[2, 4])
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=6, help="bursts of 8 calls timed per row (bench_host --iters)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default=None, help="default: bench_host's (CUDA when there is one)")
    p.add_argument("--cuda-graphs", action="store_true", help="this tree's rows also with CUDA graphs")
    p.add_argument("--time-budget", type=float, default=450.0, help="seconds; start no run that would pass it")
    p.add_argument("--out", required=True, help="JSON of every run (the format of docs/results/host_*.json)")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.before, "launch", "bench_host.py")):
        p.error(f"--before {args.before!r} has no launch/bench_host.py (see the module docstring)")
    runs = run_all(args)
    first = next(iter(runs.values()), {})
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(dict(date=time.strftime("%Y-%m-%d"), device=first.get("device"),
                       command=" ".join(["launch/host_before_after.py"] + sys.argv[1:]), runs=runs), f, indent=1)
    print(table(runs, args.shapes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
