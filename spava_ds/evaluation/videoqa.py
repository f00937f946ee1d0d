"""Video-QA evaluation (``launch/eval_videoqa.py``): a checkpoint answers the held-out records of ``spava_ds.tasks``
once per attention method (greedy, exact match as in training), written as JSON lines (one record per case and
method)."""

from __future__ import annotations

import os
import time
from typing import List, Optional

import torch

from .. import SpavaConfig, comm, entry
from ..benchmarks.records import write_record
from ..engine import GenerationConfig, SpavaEngine
from ..tasks import load_records
from ..training import exact_match
from .methods import against_dense, finish_run, method_engines, run_methods, start_run
from .report import summarize_videoqa


def load_cases(paths: List[str], limit: Optional[int]) -> List[dict]:
    """The records of every test file (the first ``limit`` of each), in file order."""
    cases = []
    for path in paths:
        cases.extend(load_records(path)[:limit])
    return cases


def evaluate(args) -> None:
    rank, world = start_run(args)
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
               f"{time.time() - start:.0f} s" + (f"; results in {args.out}" if args.out else ""),
               summary=(lambda: summarize_videoqa([args.out])) if args.out else None)

