"""Qwen2.5-VL vision tower on a long 360p video: transformers' per-window SDPA vs the fused varlen attention,
and frame parallelism over the visible GPUs.

    python launch/bench_vision.py                                   # one GPU: 3B- and 7B-shaped towers, 64/256 frames
    torchrun --standalone --nproc_per_node 2 launch/bench_vision.py # adds frame parallelism over 2 GPUs
    python launch/bench_vision.py --tiny                            # CPU smoke run of every code path (tiny tower)

Random bf16 weights (built on the meta device, materialised on the GPU, initialised in one pass), random pixels.
Every variant is first checked against transformers' stock vision tower (max abs difference of the merged
features), then timed with CUDA events: median of --iters runs after --warmup runs. The table comes last.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from spava_ds import entry
from spava_ds.integrations import qwen_vision as qv
from spava_ds.models.shapes import PUBLISHED_SHAPES

# Qwen2.5-VL-3B / 7B vision towers (models.shapes): identical ViTs, the merger projects to the language model's
# hidden size.
TINY_VISION = dict(depth=4, hidden_size=64, num_heads=2, intermediate_size=128, patch_size=14,
                   temporal_patch_size=2, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[1, 3])
OUT_HIDDEN = {"3b": PUBLISHED_SHAPES["3b"].text["hidden_size"], "7b": PUBLISHED_SHAPES["7b"].text["hidden_size"],
              "tiny": 64}


def qwen_resize(height: int, width: int, factor: int = 28, min_pixels: int = 4 * 28 * 28,
                max_pixels: int = 768 * 28 * 28) -> tuple[int, int]:
    """Qwen's frame resize rule: each side rounded to a multiple of ``factor`` (patch 14 x merge 2), then scaled
    (keeping the aspect ratio) into [min_pixels, max_pixels]. 640x360 -> 644x364."""
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def build_visual(shape: str, device: torch.device, dtype: torch.dtype):
    """A random-weight vision tower: built on the meta device, materialised on ``device`` without init loops."""
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    vision = dict(TINY_VISION if shape == "tiny" else PUBLISHED_SHAPES[shape].vision, out_hidden_size=OUT_HIDDEN[shape])
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=dict(hidden_size=OUT_HIDDEN[shape]))
    config.vision_config._attn_implementation = "sdpa"   # transformers' per-window path: the baseline
    with torch.device("meta"):
        visual = Qwen2_5_VisionTransformerPretrainedModel(config.vision_config)
    visual = visual.to_empty(device=device).to(dtype).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in visual.named_parameters():
            if p.dim() > 1:       # fan-in scaling keeps the activations O(1) through 32 blocks
                p.normal_(0, p[0].numel() ** -0.5, generator=gen)
            elif name.endswith("norm1.weight") or name.endswith("norm2.weight") or "ln_q" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=gen)
        # to_empty left the rotary frequencies (non-persistent buffers computed in __init__) uninitialised.
        rope = visual.rotary_pos_emb
        for name, buf in type(rope)(rope.config).named_buffers():
            rope.register_buffer(name, buf.to(device), persistent=False)
    leftover = [n for n, _ in visual.named_buffers() if not n.startswith("rotary_pos_emb.")]
    if leftover:
        raise RuntimeError(f"buffers not re-initialised after to_empty: {leftover}")
    assert visual.config._attn_implementation == "sdpa", visual.config._attn_implementation
    return visual


def synthetic_video(frames: int, height: int, width: int, device, dtype, seed: int = 0):
    """Random patches ``[steps*h*w, 3*2*14*14]`` and ``grid_thw`` of a ``frames``-frame video after the resize."""
    h, w = qwen_resize(height, width)
    grid = torch.tensor([[frames // 2, h // 14, w // 14]], device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    rows = int(grid.prod())
    pixels = torch.randn(rows, 3 * 2 * 14 * 14, device=device, generator=gen, dtype=torch.float32).to(dtype)
    return pixels, grid, (h, w)


def timed(fn, warmup: int, iters: int, device: torch.device, group_sync: bool) -> float:
    """Median seconds of ``fn()`` (CUDA events on GPUs); with ``group_sync`` each run starts after a barrier."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if group_sync:
            dist.barrier()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny tower and video on the CPU (smoke test)")
    ap.add_argument("--models", nargs="+", default=None, help="3b 7b (default), or tiny")
    ap.add_argument("--frames", nargs="+", type=int, default=None, help="default 64 256 (tiny: 8)")
    ap.add_argument("--size", nargs=2, type=int, default=None, metavar=("W", "H"), help="default 640 360")
    ap.add_argument("--backends", nargs="+", default=None, help=f"fused backends to time; default: all available "
                                                              f"({', '.join(qv.BACKENDS[1:])})")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    entry.add_arguments(ap)
    return entry.run_main(bench, ap.parse_args(argv))


def bench(args) -> None:
    """Each backend of the vision tower's attention, one process and frame-parallel; rank 0 prints the table."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = entry.init_distributed(args) if distributed else (0, 1)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() and not args.tiny \
        else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = args.models or (["tiny"] if args.tiny else ["3b", "7b"])
    frames_list = args.frames or ([8] if args.tiny else [64, 256])
    width, height = args.size or ((224, 168) if args.tiny else (640, 360))
    # The fused "sdpa" loop is transformers' own path again; time it only in the smoke run, to exercise it.
    backends = args.backends or [b for b in qv.available_backends(device) if b != "sdpa" or args.tiny]
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    log(f"device: {world} x {card}, dtype {dtype}, torch {torch.__version__}, fused backends: {backends}")

    rows = []
    for shape in models:
        visual = build_visual(shape, device, dtype)
        for frames in frames_list:
            pixels, grid, (h, w) = synthetic_video(frames, height, width, device, dtype)
            tokens = int(grid.prod()) // 4
            log(f"[{shape}] {frames} frames at {w}x{h}: grid {grid.tolist()[0]}, {tokens} merged tokens")

            def run(backend, parallel):
                handle = qv.enable_fused_vision_attention(visual, backend=backend) if backend != "transformers" \
                    else None
                try:
                    if parallel:
                        fn = lambda: qv.frame_parallel_vision(visual, pixels, grid)  # noqa: E731
                    else:
                        fn = lambda: qv.encode_video(visual, pixels, grid)  # noqa: E731
                    with torch.no_grad():
                        out = fn()
                        diff = (out.float() - reference.float()).abs().max().item()
                        seconds = timed(fn, args.warmup, args.iters, device, group_sync=parallel)
                finally:
                    if handle is not None:
                        handle.remove()
                if parallel:  # the slowest rank's median is the wall time of the step
                    t = torch.tensor([seconds], device=device)
                    dist.all_reduce(t, op=dist.ReduceOp.MAX)
                    seconds = t.item()
                return seconds, diff

            with torch.no_grad():
                reference = qv.encode_video(visual, pixels, grid)
            scale = reference.float().abs().max().item()
            variants = [("transformers", False)] + [(b, False) for b in backends]
            if world > 1:
                variants += [("transformers", True)] + [(b, True) for b in backends]
            base = None
            for backend, parallel in variants:
                seconds, diff = run(backend, parallel)
                base = base or seconds
                rows.append((shape, frames, tokens, backend, world if parallel else 1, seconds, base / seconds,
                             diff, scale))
                log(f"  {backend:>12} W={world if parallel else 1}: {seconds * 1e3:9.1f} ms  "
                    f"max|diff| {diff:.3g} (max|ref| {scale:.3g})")
            del pixels, reference
        del visual
        if device.type == "cuda":
            torch.cuda.empty_cache()

    log(f"\nQwen2.5-VL vision tower, {world} x {card}, {dtype}, {width}x{height} video resized to the Qwen grid; "
        f"median of {args.iters} after {args.warmup} warm-up")
    log("| model | frames | merged tokens | attention | GPUs | time (ms) | speedup vs transformers | max abs diff |")
    log("|---|---|---|---|---|---|---|---|")
    for shape, frames, tokens, backend, w, seconds, speedup, diff, scale in rows:
        log(f"| {shape} | {frames} | {tokens} | {backend} | {w} | {seconds * 1e3:.1f} | {speedup:.2f}x | "
            f"{diff:.2e} (ref max {scale:.2g}) |")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
