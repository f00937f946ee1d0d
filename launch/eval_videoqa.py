"""Accuracy of a Qwen2.5-VL checkpoint on the synthetic video tasks of ``spava_ds.tasks`` against the video length, per
attention method (dense, ring, spava, star, apb) and world size.

Give one held-out jsonl per length (``python -m spava_ds.tasks --out data/test128 --train 0 --test 60 --frames 128``).
Every record is decoded greedily by ``SpavaEngine`` once per method; exact match as in training
(``spava_ds.training.exact_match``). Beside accuracy, per method: whether the generated tokens equal dense's and the
KL divergence of the first token's distribution from dense's. No frame is dropped: ``--max_frames`` defaults to the
longest video of the test files.

World sizes: real processes (torchrun, gloo on CPU or NCCL on GPUs; dense runs on rank 0 alone) or W ranks simulated
in one process through ``reference_attention`` (``--simulate 8``; ring is exact by construction and is skipped there,
real processes check it against dense).

    torchrun --standalone --nproc_per_node 2 launch/eval_videoqa.py --model runs/small/model \\
        --tests data/test16/test.jsonl data/test32/test.jsonl data/test64/test.jsonl data/test128/test.jsonl \\
        --out runs/videoqa/w2.jsonl
    torchrun --standalone --nproc_per_node 4 launch/eval_videoqa.py ... --out runs/videoqa/w4.jsonl
    python launch/eval_videoqa.py --simulate 8 ... --out runs/videoqa/w8sim.jsonl
    python launch/eval_videoqa.py --summarize runs/videoqa/w*.jsonl --table runs/videoqa/table.md \\
        --plot runs/videoqa/accuracy.png

One jsonl record per (case, method): ``id, task, frames, context_tokens, world_size, simulated, method, expected``
(the true answer), ``answer`` (the model's), ``correct``, and with dense in the same run ``same_as_dense`` and
``kl_first_token``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# shared with the text NIAH study
from eval_niah import (METHODS, add_common_args, against_dense, finish_run, method_engines, plot_accuracy,  # noqa: E402
                       run_methods, write_record)
from spava_ds import SpavaConfig, comm, entry  # noqa: E402
from spava_ds.engine import GenerationConfig, SpavaEngine  # noqa: E402
from spava_ds.tasks import TASKS, load_records  # noqa: E402
from spava_ds.training import exact_match  # noqa: E402


def load_cases(paths: List[str], limit: Optional[int]) -> List[dict]:
    """The records of every test file (the first ``limit`` of each), in file order."""
    cases = []
    for path in paths:
        cases.extend(load_records(path)[:limit])
    return cases


def evaluate(args) -> None:
    rank, world = entry.init_distributed(args)
    if args.simulate and world > 1:
        raise ValueError("--simulate runs in one process (python, not torchrun)")
    torch.manual_seed(0)
    w = args.simulate or world
    with entry.agreed("reading the test files and the model"):  # a file one rank lacks stops every rank
        cases = load_cases(args.tests, args.limit)
        max_frames = args.max_frames or max(int(c.get("frames", 0)) for c in cases) or None
        # dense preprocesses every video once; one copy of the weights serves every method
        base = SpavaEngine.from_pretrained(args.model, SpavaConfig(mode="dense"), group=comm.SELF,
                                           dtype=getattr(torch, args.dtype))
    engines = method_engines(base, args, rank, world, [w], base.settings)
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens)
    out = None
    if rank == 0 and args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        out = open(args.out, "w", encoding="utf-8")
    progress = None
    if rank == 0:
        from tqdm.auto import tqdm

        progress = tqdm(total=len(cases), desc=f"video QA W={w}{' (sim.)' if args.simulate else ''}", unit="case")
    start = time.time()
    for case in cases:
        # the same preprocessing for every method (the base engine's, one process: no frame-count check per W)
        inputs = base.video_inputs(case["video"], case["question"], args.fps, max_frames)
        steps = int(inputs["video_grid_thw"][0, 0])
        if steps < world:  # frame-parallel vision gives every real rank at least one temporal step
            raise ValueError(f"{case['video']}: {steps} temporal steps, fewer than the {world} processes")
        results, _ = run_methods(engines, inputs, gen, world)
        if rank == 0:
            dense = results.get(("dense", None))
            for (method, _), answer in results.items():
                record = dict(id=case.get("id"), task=case.get("task"), frames=int(inputs["frames"]),
                              context_tokens=inputs["context_len"], world_size=w, simulated=bool(args.simulate),
                              method=method, expected=case["answer"], answer=answer.text,
                              correct=exact_match(answer.text, case["answer"]),
                              prefill_s=round(answer.prefill_seconds, 4), **against_dense(answer, dense))
                write_record(out, record)
            progress.update(1)
    finish_run(rank, world, progress, out, f"{len(cases)} cases x {len(engines)} methods at W={w} in "
               f"{time.time() - start:.0f} s" + (f"; results in {args.out}" if args.out else ""))


# ---- summaries -------------------------------------------------------------------------------------------------------
def _pct(values) -> str:
    values = list(values)
    return f"{100 * sum(values) / len(values):.1f}" if values else "-"


def summarize(paths: List[str], table: Optional[str] = None, plot: Optional[str] = None) -> str:
    """A markdown table (method x W x frames: accuracy overall and per task, same answer as dense, KL) and
    optionally a PNG of accuracy against frames per method, one panel per world size."""
    rows: Dict[tuple, List[dict]] = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    rows.setdefault((r["method"], r["world_size"], r["simulated"], r["frames"]), []).append(r)
    order = {m: i for i, m in enumerate(METHODS)}
    tasks = [t for t in TASKS if any(r.get("task") == t for rs in rows.values() for r in rs)]
    lines = ["| method | W | frames | context tokens | cases | accuracy % | "
             + "".join(f"{t} % | " for t in tasks) + "same answer as dense % | mean KL first token |",
             "|---|---|---|---|---|---|" + "---|" * len(tasks) + "---|---|"]
    for (method, w, sim, frames), rs in sorted(rows.items(),
                                               key=lambda kv: (kv[0][1], kv[0][2], kv[0][3], order.get(kv[0][0], 99))):
        ctx = round(sum(r["context_tokens"] for r in rs) / len(rs))
        per_task = "".join(f"{_pct(r['correct'] for r in rs if r.get('task') == t)} | " for t in tasks)
        kls = [r["kl_first_token"] for r in rs if "kl_first_token" in r]
        lines.append(f"| {method} | {w}{' (sim.)' if sim else ''} | {frames} | {ctx} | {len(rs)} | "
                     f"{_pct(r['correct'] for r in rs)} | {per_task}"
                     f"{_pct(r['same_as_dense'] for r in rs if 'same_as_dense' in r)} | "
                     f"{f'{sum(kls) / len(kls):.2e}' if kls else '-'} |")
    text = "\n".join(lines)
    if table:
        with open(table, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    if plot:
        _plot(rows, plot)
    return text


def _plot(rows: Dict[tuple, List[dict]], path: str) -> None:
    panels: Dict[str, Dict[str, list]] = {}
    for (method, w, sim, frames), rs in rows.items():
        panels.setdefault(f"W = {w}{' (simulated)' if sim else ''}", {}).setdefault(method, []).append(
            (frames, 100 * sum(r["correct"] for r in rs) / len(rs)))
    plot_accuracy(panels, "video frames (2 fps)", path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="trained Qwen2.5-VL checkpoint (e.g. runs/<name>/model)")
    p.add_argument("--tests", nargs="+", help="held-out jsonl files of spava_ds.tasks, e.g. one per frame count")
    p.add_argument("--limit", type=int, help="the first N records of each test file")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--simulate", type=int, help="simulate this many ranks in one process (reference_attention)")
    p.add_argument("--fps", type=float, help="sampling rate (default: the checkpoint's)")
    p.add_argument("--max_frames", type=int, help="frame cap (default: the longest test video, nothing dropped)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    add_common_args(p)
    args = p.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize, args.table, args.plot))
        return 0
    if not args.model or not args.tests:
        p.error("--model and --tests are required (or --summarize)")
    return entry.run_main(evaluate, args)


if __name__ == "__main__":
    sys.exit(main())
