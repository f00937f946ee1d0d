"""Time to first token of the inference engine: Spava (and ring) on W GPUs against dense attention on one GPU.

A model of a published shape (``SHAPES``: Qwen2.5-VL-3B/7B, InternVL3-2B, Qwen3-VL-8B) with random bf16 weights
answers a question about a synthetic video. Time to first token = frame-parallel vision encoder + language-model
prefill + first token, median of ``--iters`` runs after a warm-up. Dense runs on rank 0 alone with the same model
and the same (fused) vision attention, so the comparison is like for like. Run under torchrun, one process per GPU:

    torchrun --standalone --nproc_per_node 2 launch/bench_engine.py --model-shape 3b --frames 64
    python launch/bench_engine.py --tiny           # CPU smoke test of the code path (the tiny checkpoint)
"""


from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from spava_ds import SpavaConfig, comm, entry
from spava_ds.benchmarks.shapes import SHAPES, build_model, shape_tokenizer
from spava_ds.engine import GenerationConfig, SpavaEngine


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-shape", choices=sorted(SHAPES), default="3b")
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--modes", nargs="+", default=["spava", "ring"])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="the embedded tiny checkpoint on CPU (a smoke test)")
    entry.add_arguments(p)
    return entry.run_main(bench, p.parse_args(argv))


def bench(args) -> None:
    """Time to first token of each mode and of dense on rank 0; rank 0 prints the table."""
    from spava_ds.assets import tiny_model_dir
    from spava_ds.video import write_synthetic_video

    rank, world = entry.init_distributed(args)
    if args.tiny:
        base = SpavaEngine.from_pretrained(tiny_model_dir())
        model, card, tokenizer = base.model, "CPU", base.tokenizer
        settings = base.settings
    else:
        device = torch.device("cuda", torch.cuda.current_device())
        tokenizer = shape_tokenizer(args.model_shape)
        model = build_model(args.model_shape, tokenizer, device)
        card = torch.cuda.get_device_name(device)
        pixels = args.width * args.height  # keep the video's resolution (rounded to multiples of 28)
        settings = dict(min_pixels=pixels, max_pixels=int(pixels * 1.05), fps=2, max_frames=args.frames)
    folder = tempfile.TemporaryDirectory(prefix="spava_bench_")  # removed when bench returns
    video = write_synthetic_video(os.path.join(folder.name, "bench.mp4"), num_frames=args.frames,
                                  width=args.width, height=args.height, fps=2, seed=0)
    question = "What is written in the frame where the red square appears?"

    def time_engine(config, group) -> tuple:
        engine = SpavaEngine(model, tokenizer, config, group, settings)
        inputs = engine.video_inputs(video, question, fps=2, max_frames=args.frames)
        engine.generate(inputs, GenerationConfig(max_new_tokens=1))  # warm-up (compiles kernels)
        times = [engine.generate(inputs, GenerationConfig(max_new_tokens=1)).prefill_seconds
                 for _ in range(args.iters)]
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        return statistics.median(times), inputs["context_len"], peak

    rows = []
    for mode in args.modes:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        seconds, context, peak = time_engine(SpavaConfig(mode=mode), None)
        rows.append((f"{mode}, {world} GPU(s)" if not args.tiny else f"{mode}, {world} process(es)", seconds, peak))
    if world > 1:
        dist.barrier()
    if rank == 0:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        seconds, context, peak = time_engine(SpavaConfig(mode="dense"), comm.SELF)
        rows.insert(0, ("dense, 1 GPU" if not args.tiny else "dense, 1 process", seconds, peak))
        dense = rows[0][1]
        model_name = "the tiny checkpoint" if args.tiny else f"{args.model_shape}-shaped random bf16 weights"
        print(f"\n# {card}; {model_name}; {args.frames} frames at "
              f"{args.width}x{args.height}; {context} context tokens; {time.strftime('%Y-%m-%d')}")
        print("| method | time to first token (s) | speedup vs dense | peak GPU memory (GiB, rank 0) |")
        print("|---|---|---|---|")
        for name, sec, peak in rows:
            print(f"| {name} | {sec:.3f} | {dense / sec:.2f}x | {peak:.1f} |")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
