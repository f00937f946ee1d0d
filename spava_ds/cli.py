"""``spava-infer``: answer questions about a video with Spava over several processes.

    torchrun --standalone --nproc_per_node 2 launch/infer.py --check      # embedded model, generated task video
    torchrun --nproc_per_node 4 launch/infer.py --model DIR --video clip.mp4 --question "What happens?"
    deepspeed --num_gpus 4 launch/infer.py --deepspeed_config configs/spava_sp2.json --model DIR --video v.mkv ...
    torchrun --nproc_per_node 2 launch/infer.py --model DIR --batch questions.jsonl --output answers.jsonl

Every rank prints errors (a missing or corrupt video, too few frames, an empty question, an unsupported
checkpoint) with its rank and the job exits non-zero; the checks run before any collective, so nothing hangs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from typing import List, Optional

import torch
import torch.distributed as dist

from .config import MODES

log = logging.getLogger("spava_ds.infer")

DEFAULT_QUESTION = "What is in this video?"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spava-infer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local Hugging Face checkpoint directory (default: the embedded model trained on "
                                   "spava_ds.tasks)")
    p.add_argument("--video", help="video file (mp4, mkv, webm, ...); default: a held-out synthetic task video "
                                   "(spava_ds.tasks) made on the fly, with its question and expected answer")
    p.add_argument("--question", help=f"default: the synthetic task's question, or {DEFAULT_QUESTION!r} with --video")
    p.add_argument("--task", choices=["retrieval", "ordering", "counting"], default="retrieval",
                   help="without --video: the synthetic task to make a video for")
    p.add_argument("--task-frames", type=int, default=64, help="without --video: frames of the synthetic video")
    p.add_argument("--task-seed", type=int, default=0, help="without --video: which held-out video (0, 1, ...)")
    p.add_argument("--batch", help="a .jsonl file of {\"video\": ..., \"question\": ...} records to answer")
    p.add_argument("--output", help="with --batch: where to write the answers (.jsonl; default: next to --batch)")
    p.add_argument("--mode", choices=MODES,
                   help="attention mode (default: the config's, else spava)")
    p.add_argument("--anchor-len", type=int, help="override the anchor length rule")
    p.add_argument("--passing-len", type=int, help="override the passing budget rule")
    p.add_argument("--fps", type=float, help="frames sampled per second of video (default: the model's)")
    p.add_argument("--max-frames", type=int, help="at most this many frames (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the same on every rank)")
    p.add_argument("--check", action="store_true",
                   help="also run dense attention on rank 0 and print the largest first-token logit difference")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                   help="a DeepSpeed JSON whose \"spava\" block configures the attention")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p


def _spava_config(args, world: int):
    from .config import SpavaConfig
    from .integrations.deepspeed import spava_config_from_deepspeed

    config, sp_size = spava_config_from_deepspeed(args.deepspeed_config) if args.deepspeed_config else \
        (SpavaConfig(), world)
    if sp_size != world:
        raise ValueError(f"{args.deepspeed_config}: sequence_parallel_size is {sp_size} but {world} process(es) "
                         "were launched; inference runs one question over all of them")
    overrides = {k: v for k, v in (("mode", args.mode), ("anchor_len", args.anchor_len),
                                   ("passing_len", args.passing_len)) if v is not None}
    return SpavaConfig.from_dict({**config.to_dict(), **overrides})


def _task_video(rank: int, task: str, frames: int, index: int) -> dict:
    """A held-out synthetic task video (spava_ds.tasks, test split: seeds the training split never uses) and its
    question and answer, written by every rank into its own temporary folder (no shared file system needed)."""
    from .tasks import generate_split, load_records

    if frames < 6:
        raise ValueError(f"--task-frames must be at least 6, got {frames}")
    if index < 0:
        raise ValueError(f"--task-seed must be >= 0, got {index}")
    folder = tempfile.mkdtemp(prefix=f"spava_task_r{rank}_")
    # generate_split numbers videos from 0; the one asked for is the last of index + 1 records
    split = generate_split(folder, "test", index + 1, frames=frames, tasks=(task,))
    return load_records(split)[index]


def _records(args) -> List[dict]:
    if not args.batch:
        return [dict(video=args.video, question=args.question)]  # video None: a synthetic task video (run)
    if not os.path.exists(args.batch):
        raise ValueError(f"--batch {args.batch!r} does not exist")
    records = []
    with open(args.batch, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                rec = json.loads(line)
                if "video" not in rec or "question" not in rec:
                    raise ValueError(f"{args.batch}:{n}: each record needs \"video\" and \"question\"")
                records.append(rec)
    return records


def run(args) -> int:
    from . import comm
    from .assets import default_model_dir
    from .engine import GenerationConfig, SpavaEngine, dense_engine_like

    rank, world = comm.init_distributed()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    config = _spava_config(args, world)
    model_dir = args.model or default_model_dir()
    if rank == 0:
        log.info("loading %s on %d process(es), mode %s", model_dir, world, config.mode)
    engine = SpavaEngine.from_pretrained(model_dir, config, dtype=dtype)
    gen = GenerationConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    records = _records(args)
    out_file = None
    if args.batch and rank == 0:
        out_path = args.output or os.path.splitext(args.batch)[0] + ".answers.jsonl"
        out_file = open(out_path, "w", encoding="utf-8")
    progress = None
    if args.batch and rank == 0:
        from tqdm.auto import tqdm

        progress = tqdm(total=len(records), desc="answering", unit="q")
    for rec in records:
        if not rec["video"]:
            task = _task_video(rank, args.task, args.task_frames, args.task_seed)
            rec = dict(rec, video=task["video"], task=task["task"])
            if rec["question"] is None:
                rec.update(question=task["question"], expected=task["answer"])
        rec["question"] = DEFAULT_QUESTION if rec["question"] is None else rec["question"]
        inputs = engine.video_inputs(rec["video"], rec["question"], args.fps, args.max_frames)
        answer = engine.generate(inputs, gen)
        result = dict(rec, answer=answer.text, context_tokens=answer.context_tokens,
                      prefill_seconds=round(answer.prefill_seconds, 4), mode=config.mode, world_size=world)
        if args.check and rank == 0:
            dense = dense_engine_like(engine).generate(inputs, GenerationConfig(1))
            result["max_logit_diff_vs_dense"] = (answer.first_logits - dense.first_logits).abs().max().item()
            result["dense_prefill_seconds"] = round(dense.prefill_seconds, 4)
        if rank == 0:
            if out_file:
                out_file.write(json.dumps(result) + "\n")
                progress.update(1)
            else:
                _print_answer(result, inputs)
    if out_file:
        out_file.close()
        progress.close()
        print(f"wrote {len(records)} answer(s) to {out_file.name}")
    return 0


def _print_answer(result: dict, inputs: dict) -> None:
    print(f"question: {result['question']}")
    print(f"answer: {result['answer']}")
    if "expected" in result:
        verdict = "correct" if result["answer"].strip().rstrip(".").lower() == result["expected"].lower() else "wrong"
        print(f"expected answer: {result['expected']} ({verdict}; {result['task']} task, held-out synthetic video)")
    print(f"context tokens: {result['context_tokens']} ({inputs['frames']} frames), query tokens: "
          f"{inputs['query_len']}, mode {result['mode']} on {result['world_size']} process(es)")
    print(f"prefill (vision + language model + first token): {result['prefill_seconds']:.3f} s")
    if "max_logit_diff_vs_dense" in result:
        print(f"dense attention on one process: prefill {result['dense_prefill_seconds']:.3f} s; largest "
              f"first-token logit difference {result['max_logit_diff_vs_dense']:.3e}")


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rank = int(os.environ.get("RANK", "0"))
    try:
        code = run(args)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"[rank {rank}] error: {e}", file=sys.stderr, flush=True)
        code = 2
    if dist.is_initialized():
        if code == 0:
            dist.barrier()
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
