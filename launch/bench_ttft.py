"""Time to first token from an H.264 file on disk: spava_ds's video pipeline against today's, with a breakdown.

The benchmark writes its own videos (360p and 720p, 30 fps, H.264 from PyAV's libx264: a textured landscape under a
slow camera pan with several textured objects moving across it), long enough for the target context at
Qwen2.5-VL's defaults (2 frames per second, 128*28*28 to 768*28*28 pixels a frame: 720p is resized to 1008x560, 720
tokens a second; 360p to 644x364, 299 tokens a second). Videos are cached in --video-dir by their parameters.

Three pipelines, measured in the same run on the same model (--pipelines):

``new``    every rank plans the video from the container's metadata, decodes only the frames of its own temporal
           steps (seeking to the keyframe before them, FFmpeg threads) and resizes, normalises and patchifies them
           with torch on its GPU (``SpavaEngine.video_inputs``), then runs its vision tower on them
``streamed`` the same, but the vision tower encodes each chunk of steps as it decodes (``stream=True``): decode and
           preprocess are then the waits exposed inside the tower's span, vision the rest of that span
``today``  every rank decodes the whole video and samples it, resizes and patchifies on the CPU (``read_video``,
           ``resize_frames``, ``preprocess_video``), then moves the patches to its GPU

Methods: ``dense`` on one GPU (rank 0 alone), and ``spava``, ``ring``, ``ulysses``, ``apb``, ``star`` on all GPUs
of the job (torchrun). One run is: barrier, then the file to the first token; it is timed on the wall clock and
split into metadata (the plan), prompt (tokens and M-RoPE positions), decode (RGB conversion included), preprocess
(with the copy to the GPU), wait (for the other ranks), vision (tower, all-gather, embeddings), LM prefill and first
token (head, argmax, broadcast); the GPU parts come from CUDA events. A multi-GPU run lasts as long as its slowest
rank; the table gives each part's largest value over the ranks.

``--share-worlds 2 4`` adds the one-rank-share mode (one GPU, rank 0 only): the metadata plan plus rank r of W's
decode + preprocess alone, for every r, as one rank of a W-GPU job would do it (the target: at most 0.35 s for the
slowest rank at W = 4 at 128K tokens). ``--decoder-counts 1 2 4 8 16`` adds decoding alone (the whole video and rank
0 of each W) with each number of concurrent decoders, and the preprocessing of 100 frames on the device: how
decoding scales with the host's cores, in the same run.

Results are JSON lines in --out, written as each measurement ends; a rerun of the same command skips what is there
(and --time-budget stops starting new measurements after that many seconds: rerun to continue). --table prints the
tables of one or more result files.

    # one GPU: dense and the one-rank shares, 7B shape, 360p and 720p, 32K-128K, and the decoders' scaling
    python launch/bench_ttft.py --models 7b --share-worlds 2 4 --decoder-counts 1 2 4 8 16 \
        --out .bench/ttft_1gpu.jsonl --time-budget 480
    # 2 GPUs: dense and spava, each rank's frames decoded before the tower (new) and streamed into it
    torchrun --standalone --nproc_per_node 2 launch/bench_ttft.py --models 7b --resolutions 360p 720p \
        --contexts 128K 64K --methods dense spava --pipelines new streamed --out .bench/ttft_stream.jsonl \
        --time-budget 420
    # 4 GPUs: every method, and dense on rank 0
    torchrun --standalone --nproc_per_node 4 launch/bench_ttft.py --models 7b --out .bench/ttft_4gpu.jsonl
    # CPU smoke run: the embedded tiny checkpoint, a tiny video (also under torchrun --nproc_per_node 2)
    python launch/bench_ttft.py --tiny --out /tmp/ttft_tiny.jsonl
    python launch/bench_ttft.py --table .bench/ttft_1gpu.jsonl .bench/ttft_4gpu.jsonl
"""

from __future__ import annotations

import argparse
import sys

import torch.distributed as dist

from spava_ds.benchmarks.records import read_jsonls
from spava_ds.benchmarks.ttft import METHODS, PIPELINES, bench
from spava_ds.benchmarks.ttft_report import plot, tables


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, help="7b, 3b (default: 7b; --tiny: tiny)")
    p.add_argument("--resolutions", nargs="+", default=None, help="360p, 720p or WxH (default: 360p 720p)")
    p.add_argument("--contexts", nargs="+", default=None, help="target context tokens (default: 32K 64K 128K)")
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                   help="default: all (one process: dense only)")
    p.add_argument("--pipelines", nargs="+", default=["new", "today"], choices=PIPELINES,
                   help="new, streamed, today (default: new today)")
    p.add_argument("--share-worlds", nargs="*", type=int, default=[],
                   help="also time one rank's decode + preprocess for these W (on rank 0's device)")
    p.add_argument("--decoder-counts", nargs="*", type=int, default=[],
                   help="also time decoding alone (whole video, and rank 0 of each --share-worlds W) with these "
                        "numbers of concurrent decoders, e.g. 1 2 4 8 16, and preprocessing of 100 frames")
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--video-fps", type=int, default=30, help="frame rate of the written videos")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="per-frame pixel cap (default: Qwen's 768*28*28; 0: the native size, rounded to 28)")
    p.add_argument("--video-dir", default=".bench/videos", help="where the written videos are cached")
    p.add_argument("--out", default="bench_ttft.jsonl", help="JSON lines; an existing file is resumed")
    p.add_argument("--time-budget", type=float, default=None, help="seconds: start no measurement after this")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: the embedded tiny checkpoint, tiny videos")
    p.add_argument("--table", nargs="+", default=None, metavar="JSONL", help="only print the tables of files")
    p.add_argument("--plot", default=None, metavar="PNG", help="with --table: also draw the time-to-first-token parts "
                   "of those files (needs matplotlib)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table:
        rows = read_jsonls(args.table, missing_ok=True)
        print(tables(rows))
        if args.plot:
            plot(rows, args.plot)
        return 0
    finished = bench(args, argv if argv is not None else sys.argv[1:])
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(tables(read_jsonls([args.out], missing_ok=True)), flush=True)
        print(f"\nresults: {args.out}" + ("; all measurements done" if finished else
                                          "; stopped by --time-budget: rerun to continue"), flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)
