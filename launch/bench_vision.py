"""Qwen2.5-VL vision tower on a long 360p video: transformers' per-window SDPA vs the fused varlen attention,
and frame parallelism over the visible GPUs.

    python launch/bench_vision.py                                   # one GPU: 3B- and 7B-shaped towers, 64/256 frames
    torchrun --standalone --nproc_per_node 2 launch/bench_vision.py # adds frame parallelism over 2 GPUs
    python launch/bench_vision.py --models 7b --frames 256 --profile --out vision.json  # where the time goes
    python launch/bench_vision.py --tiny --profile                  # CPU smoke run of every code path (tiny tower)
    python launch/bench_vision.py --models 7b --frames 256 --chunk-steps 7 --backends varlen  # streamed chunks

Random bf16 weights (built on the meta device, materialised on the GPU, initialised in one pass), random pixels.
Every variant is first checked against transformers' stock vision tower (max abs difference of the merged
features), then timed with CUDA events: median of --iters runs after --warmup runs. TFLOP/s per GPU = the tower's
model FLOPs (``spava_ds.benchmarks.flops``) / W / time. The table comes last.

``--profile``: per model, one more forward of the fastest fused backend at the largest frame count on one GPU (after
a warm-up), under torch.profiler: device seconds per kernel class (``spava_ds.profiling.kernel_class``; TFLOP/s of
the gemm and attention classes from their share of the FLOPs) and the 15 kernels of the most device time. On the
CPU the same tables come from the CPU operators' self time. ``--out FILE``: the rows and profiles as JSON.

``--chunk-steps N``: two more rows per video with the first fused backend, the tower run on chunks of N temporal
steps one after another as a streamed video runs it (``SpavaEngine(stream_video=True)``): with the grid on the device
and transformers recomputing its metadata at every chunk (the path before ``qwen_vision.tower_grid_kwargs``), then
with the cached metadata; each row counts the calls per chunk that wait for the device (``profiling.host_syncs``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from spava_ds import entry
from spava_ds.benchmarks.flops import vision_tower_flops
from spava_ds.integrations import qwen_vision as qv
from spava_ds.models.shapes import PUBLISHED_SHAPES
from spava_ds.profiling import host_syncs, kernel_times

# Qwen2.5-VL-3B / 7B vision towers (models.shapes): identical ViTs, the merger projects to the language model's
# hidden size.
TINY_VISION = dict(depth=4, hidden_size=64, num_heads=2, intermediate_size=128, patch_size=14,
                   temporal_patch_size=2, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[1, 3])
OUT_HIDDEN = {"3b": PUBLISHED_SHAPES["3b"].text["hidden_size"], "7b": PUBLISHED_SHAPES["7b"].text["hidden_size"],
              "tiny": 64}
TOP_KERNELS = 15


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
    ap.add_argument("--profile", action="store_true",
                    help="one more run of the fastest fused backend at the largest frame count under torch.profiler")
    ap.add_argument("--out", default=None, help="write the rows (and profiles) to this JSON file")
    ap.add_argument("--chunk-steps", "--chunk_steps", type=int, default=None,
                    help="also time the tower chunk by chunk (N temporal steps a chunk), metadata per call vs cached")
    entry.add_arguments(ap)
    return entry.run_main(bench, ap.parse_args(argv))


def time_variant(visual, pixels, grid, reference, backend: str, parallel: bool, args, device) -> tuple:
    """(median seconds, max abs difference from ``reference``) of one attention backend, on one device or frame
    parallel (then the slowest rank's median: the wall time of the step)."""
    handle = qv.enable_fused_vision_attention(visual, backend=backend) if backend != "transformers" else None
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
    if parallel:
        t = torch.tensor([seconds], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        seconds = t.item()
    return seconds, diff


def time_chunks(visual, pixels, grid, reference, backend: str, cached: bool, args, device) -> tuple:
    """(median seconds, max abs difference from ``reference``, calls per chunk that wait for ``device``) of the
    tower on chunks of ``--chunk-steps`` steps with the fused ``backend``: each chunk's grid made on the device and
    its metadata recomputed by transformers, or ``cached`` (``tower_grid_kwargs``)."""
    steps, h, w = grid[0].tolist()
    bounds = [(first, min(first + args.chunk_steps, steps)) for first in range(0, steps, args.chunk_steps)]

    def run(syncs=None):
        features = []
        for first, stop in bounds:
            with host_syncs() if syncs is not None else contextlib.nullcontext() as counted:
                chunk_grid = [[stop - first, h, w]]
                kwargs = qv.tower_grid_kwargs(visual, chunk_grid, device) if cached else \
                    dict(grid_thw=torch.tensor(chunk_grid, device=device))
                features.append(qv.vision_fields(visual(pixels[first * h * w:stop * h * w], **kwargs))[0])
            if syncs is not None:
                syncs.append(counted.count(device.type))
        return torch.cat(features)

    handle = qv.enable_fused_vision_attention(visual, backend=backend)
    try:
        with torch.no_grad():
            diff = (run().float() - reference.float()).abs().max().item()
            syncs = []
            run(syncs)
            seconds = timed(run, args.warmup, args.iters, device, group_sync=False)
    finally:
        handle.remove()
    return seconds, diff, sum(syncs) / len(syncs)


def profile_fused(visual, pixels, grid, backend: str, device) -> dict:
    """Kernel classes and top kernels (``profiling.kernel_times``) of one forward with the fused ``backend``, after
    a warm-up (its masks and segment plans built outside the profile)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    handle = qv.enable_fused_vision_attention(visual, backend=backend)
    try:
        with torch.no_grad():
            qv.encode_video(visual, pixels, grid)
            with profile(activities=activities) as prof:
                qv.encode_video(visual, pixels, grid)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
    finally:
        handle.remove()
    return kernel_times(prof, top=TOP_KERNELS)


def bench_video(visual, shape: str, frames: int, backends, args, world: int, device, dtype, log) -> list:
    """The rows of one model and frame count: transformers, then each fused backend, on one device and (W > 1)
    frame parallel; with ``--profile`` at the largest frame count, the profile rides on the fastest fused row."""
    width, height = args.size
    pixels, grid, (h, w) = synthetic_video(frames, height, width, device, dtype)
    tokens = int(grid.prod()) // 4
    flops = vision_tower_flops(visual.config, grid)
    log(f"[{shape}] {frames} frames at {w}x{h}: grid {grid.tolist()[0]}, {tokens} merged tokens, "
        f"{flops['total'] / 1e12:.1f} TFLOP")
    with torch.no_grad():
        reference = qv.encode_video(visual, pixels, grid)
    scale = reference.float().abs().max().item()
    variants = [("transformers", False)] + [(b, False) for b in backends]
    if world > 1:
        variants += [("transformers", True)] + [(b, True) for b in backends]
    rows = []
    for backend, parallel in variants:
        seconds, diff = time_variant(visual, pixels, grid, reference, backend, parallel, args, device)
        gpus = world if parallel else 1
        rows.append(dict(model=shape, frames=frames, merged_tokens=tokens, attention=backend, gpus=gpus,
                         seconds=seconds, speedup=rows[0]["seconds"] / seconds if rows else 1.0,
                         tflops_per_gpu=flops["total"] / gpus / seconds / 1e12, max_abs_diff=diff, ref_max=scale,
                         flops=flops))
        log(f"  {backend:>12} W={gpus}: {seconds * 1e3:9.1f} ms  {rows[-1]['tflops_per_gpu']:7.3g} TFLOP/s  "
            f"max|diff| {diff:.3g} (max|ref| {scale:.3g})")
    for cached in (False, True) if args.chunk_steps and backends else ():
        seconds, diff, syncs = time_chunks(visual, pixels, grid, reference, backends[0], cached, args, device)
        label = f"{backends[0]}, chunks of {args.chunk_steps}, {'cached' if cached else 'per-call'} metadata"
        rows.append(dict(model=shape, frames=frames, merged_tokens=tokens, attention=label, gpus=1, seconds=seconds,
                         speedup=rows[0]["seconds"] / seconds, tflops_per_gpu=flops["total"] / seconds / 1e12,
                         max_abs_diff=diff, ref_max=scale, flops=flops, syncs_per_chunk=syncs))
        log(f"  {label}: {seconds * 1e3:9.1f} ms  {syncs:.1f} waits for the {device.type} a chunk  "
            f"max|diff| {diff:.3g}")
    fused = [r for r in rows if r["gpus"] == 1 and r["attention"] in backends]
    if args.profile and frames == max(args.frames) and fused:
        fastest = min(fused, key=lambda r: r["seconds"])
        fastest["profile"] = profile_fused(visual, pixels, grid, fastest["attention"], device)
    return rows


def bench(args) -> None:
    """Each backend of the vision tower's attention, one process and frame-parallel; rank 0 prints the tables and
    writes ``--out``."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = entry.init_distributed(args) if distributed else (0, 1)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() and not args.tiny \
        else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.models = args.models or (["tiny"] if args.tiny else ["3b", "7b"])
    args.frames = args.frames or ([8] if args.tiny else [64, 256])
    args.size = args.size or ((224, 168) if args.tiny else (640, 360))
    # The fused "sdpa" loop is transformers' own path again; time it only in the smoke run, to exercise it.
    backends = args.backends or [b for b in qv.available_backends(device) if b != "sdpa" or args.tiny]
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    log(f"device: {world} x {card}, dtype {dtype}, torch {torch.__version__}, fused backends: {backends}")

    rows = []
    for shape in args.models:
        visual = build_visual(shape, device, dtype)
        for frames in args.frames:
            rows += bench_video(visual, shape, frames, backends, args, world, device, dtype, log)
        del visual
        if device.type == "cuda":
            torch.cuda.empty_cache()

    log(f"\nQwen2.5-VL vision tower, {world} x {card}, {dtype}, {args.size[0]}x{args.size[1]} video resized to the "
        f"Qwen grid; median of {args.iters} after {args.warmup} warm-up")
    for line in table_lines(rows):
        log(line)
    for row in rows:
        if "profile" in row:
            for line in profile_lines(row):
                log(line)
    if args.out and rank == 0:
        write_results(args.out, rows, dict(card=card, world=world, dtype=str(dtype), size=args.size,
                                           iters=args.iters, warmup=args.warmup))


def table_lines(rows: list) -> list:
    """The timing table (markdown), one row per measurement."""
    lines = ["| model | frames | merged tokens | attention | GPUs | time (ms) | TFLOP/s per GPU | "
             "speedup vs transformers | max abs diff |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['frames']} | {r['merged_tokens']} | {r['attention']} | {r['gpus']} | "
                     f"{r['seconds'] * 1e3:.1f} | {r['tflops_per_gpu']:.3g} | {r['speedup']:.2f}x | "
                     f"{r['max_abs_diff']:.2e} (ref max {r['ref_max']:.2g}) |")
    return lines


def profile_lines(row: dict) -> list:
    """The profiled run's tables: device seconds per kernel class (TFLOP/s of the gemm and attention classes from
    their FLOPs), then the top kernels."""
    p, flops = row["profile"], row["flops"]
    class_flops = dict(gemm=flops["linear"] + flops["merger"],
                       attention=flops["window_attention"] + flops["full_attention"])
    lines = [f"\nProfile: {row['model']}, {row['frames']} frames, {row['attention']}, one device ({p['device']}): "
             f"kernels {p['total_s']:.3f} s, timed run {row['seconds']:.3f} s",
             "| kernel class | seconds | share of kernel time | TFLOP/s |", "|---|---|---|---|"]
    for kind, seconds in sorted(((k, s) for k, s in p["classes"].items() if s > 0), key=lambda item: -item[1]):
        rate = f"{class_flops[kind] / seconds / 1e12:.3g}" if kind in class_flops else ""
        lines.append(f"| {kind} | {seconds:.4f} | {seconds / max(p['total_s'], 1e-12):.1%} | {rate} |")
    lines += [f"\n| top {len(p['top'])} kernels | class | calls | seconds | share of kernel time |",
              "|---|---|---|---|---|"]
    for k in p["top"]:
        name = k["name"].replace("|", "\\|")
        name = name if len(name) <= 100 else name[:97] + "..."
        lines.append(f"| {name} | {k['kind']} | {k['calls']} | {k['seconds']:.4f} | "
                     f"{k['seconds'] / max(p['total_s'], 1e-12):.1%} |")
    return lines


def write_results(path: str, rows: list, setup: dict) -> None:
    """``--out``: where and how it ran, the rows (each with its FLOPs by part, and the profile when there is one)."""
    import transformers

    record = dict(setup, date=datetime.date.today().isoformat(), torch=torch.__version__,
                  transformers=transformers.__version__, command=" ".join(sys.argv), rows=rows)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
