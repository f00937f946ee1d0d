"""Time to first token from an H.264 file on disk: spava_ds's video pipeline against today's, with a breakdown.

The benchmark writes its own videos (360p and 720p, 30 fps, H.264 from PyAV's libx264: a textured landscape under a
slow camera pan with several textured objects moving across it), long enough for the target context at
Qwen2.5-VL's defaults (2 frames per second, 128*28*28 to 768*28*28 pixels a frame: 720p is resized to 1008x560, 720
tokens a second; 360p to 644x364, 299 tokens a second). Videos are cached in --video-dir by their parameters.

Two pipelines, measured in the same run on the same model:

``new``    every rank plans the video from the container's metadata, decodes only the frames of its own temporal
           steps (seeking to the keyframe before them, FFmpeg threads) and resizes, normalises and patchifies them
           with torch on its GPU (``SpavaEngine.video_inputs``)
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
    # 4 GPUs: every method, and dense on rank 0
    torchrun --standalone --nproc_per_node 4 launch/bench_ttft.py --models 7b --out .bench/ttft_4gpu.jsonl
    # CPU smoke run: the embedded tiny checkpoint, a tiny video (also under torchrun --nproc_per_node 2)
    python launch/bench_ttft.py --tiny --out /tmp/ttft_tiny.jsonl
    python launch/bench_ttft.py --table .bench/ttft_1gpu.jsonl .bench/ttft_4gpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from fractions import Fraction
from typing import Dict, List

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast on the lent machines (GPU.md)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

LAUNCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(LAUNCH))
sys.path.insert(0, LAUNCH)

from bench_e2e import agree, build_model, gather_floats, parse_context, parse_resolution  # noqa: E402

METHODS = ["dense", "spava", "ring", "ulysses", "apb", "star"]
PIPELINES = ["new", "today"]
PARTS = ["metadata", "prompt", "decode", "preprocess", "wait", "vision", "lm", "first_token"]
QUESTION = "What is in this video?"
QWEN_VIDEO = dict(fps=2.0, min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28)  # Qwen2.5-VL's video defaults
TINY_VIDEO = dict(fps=2.0, min_pixels=56 * 56, max_pixels=112 * 112)


# ----------------------------------------------------------------------------------------------------------------
# The videos
# ----------------------------------------------------------------------------------------------------------------

def _texture(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth multi-scale noise (a landscape-like texture), zero mean and unit deviation, float32 [H, W]."""
    import torch.nn.functional as F

    out = torch.zeros(1, 1, height, width)
    for cells, amplitude in ((6, 1.0), (24, 0.5), (96, 0.25), (384, 0.12)):
        grid = rng.standard_normal((1, 1, max(2, cells * height // width), cells)).astype(np.float32)
        out += amplitude * F.interpolate(torch.from_numpy(grid), size=(height, width), mode="bicubic")
    return ((out - out.mean()) / out.std())[0, 0].numpy()


def _yuv_image(height: int, width: int, rng: np.random.Generator) -> List[np.ndarray]:
    """A textured picture as uint8 Y, U, V planes (4:2:0), in video range."""
    y = np.clip(128 + 45 * _texture(height, width, rng), 16, 235)
    u, v = (np.clip(128 + 18 * _texture(height // 2, width // 2, rng), 16, 240) for _ in range(2))
    return [p.astype(np.uint8) for p in (y, u, v)]


def write_bench_video(path: str, seconds: float, width: int, height: int, fps: int = 30, seed: int = 0,
                      preset: str = "veryfast", keyframe_seconds: float = 2.0) -> str:
    """Write an H.264 mp4 of natural-looking motion, fast: the frames are crops of one textured world (the camera
    pans along a smooth path) with textured discs moving on it, made directly as YUV planes; libx264 with its
    `preset` (veryfast: B-frames, CABAC) and all cores; a keyframe every `keyframe_seconds`."""
    import av

    rng = np.random.default_rng(seed)
    world_h, world_w = (int(height * 1.5) // 2) * 2, (int(width * 1.5) // 2) * 2
    world = _yuv_image(world_h, world_w, rng)
    sizes = [int(s) // 2 * 2 for s in rng.integers(height // 10, height // 4, 5)]
    objects = [(_yuv_image(s, s, rng), np.hypot(*np.mgrid[:s, :s] - (s - 1) / 2) < s / 2) for s in sizes]
    phases, speeds = rng.uniform(0, 2 * np.pi, (5, 2)), rng.uniform(0.03, 0.2, (5, 2))
    tmp = f"{path}.{os.getpid()}.tmp.mp4"
    with av.open(tmp, "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": preset, "g": str(round(keyframe_seconds * fps)), "crf": "23"}
        stream.codec_context.thread_count = 0
        for i in range(round(seconds * fps)):
            t = i / fps
            x0 = int((world_w - width) / 2 * (1 + math.sin(0.05 * t))) // 2 * 2  # the camera's smooth pan
            y0 = int((world_h - height) / 2 * (1 + math.sin(0.037 * t + 1))) // 2 * 2
            planes = [world[0][y0:y0 + height, x0:x0 + width].copy()] + \
                [p[y0 // 2:(y0 + height) // 2, x0 // 2:(x0 + width) // 2].copy() for p in world[1:]]
            for (image, disc), size, phase, speed in zip(objects, sizes, phases, speeds):
                ox, oy = ((np.array([width, height]) - size) / 2 * (1 + np.sin(2 * np.pi * speed * t + phase)))
                ox, oy = int(ox) // 2 * 2, int(oy) // 2 * 2
                for k, (plane, sub) in enumerate(zip(planes, image)):
                    step = 1 if k == 0 else 2
                    mask = disc[::step, ::step]
                    region = plane[oy // step:(oy + size) // step, ox // step:(ox + size) // step]
                    region[mask] = sub[mask]
            frame = av.VideoFrame(width, height, "yuv420p")
            for plane, data in zip(frame.planes, planes):
                plane.update(np.ascontiguousarray(data))
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    os.replace(tmp, path)  # atomic: a reader never sees half a video
    return path


def cached_video(folder: str, seconds: int, width: int, height: int, fps: int, rank: int) -> str:
    """The benchmark video of these parameters in `folder`, written once (by rank 0; the others wait)."""
    path = os.path.join(folder, f"bench_{width}x{height}_{fps}fps_{seconds}s.mp4")
    if rank == 0 and not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        start = time.perf_counter()
        write_bench_video(path, seconds, width, height, fps)
        log(f"  wrote {path} ({os.path.getsize(path) / 2**20:.0f} MiB) in {time.perf_counter() - start:.1f} s")
    if dist.is_initialized():
        dist.barrier()
    return path


def video_seconds(target: int, width: int, height: int, settings: dict, text_tokens: int = 40) -> int:
    """Seconds of video whose tokens at `settings` (2 frames a second = one temporal step a second) come closest
    to `target` context tokens from below."""
    from spava_ds.video import smart_resize

    h, w = smart_resize(height, width, 28, settings["min_pixels"], settings["max_pixels"])
    tokens_per_step = (h // 28) * (w // 28)
    steps_per_second = settings["fps"] / 2
    return max(2, int((target - text_tokens) // tokens_per_step / steps_per_second))


# ----------------------------------------------------------------------------------------------------------------
# One time-to-first-token run
# ----------------------------------------------------------------------------------------------------------------

def todays_inputs(engine, path: str, question: str, timings: dict) -> dict:
    """Today's path on every rank: decode and sample the whole video, resize and patchify it on the CPU, move the
    patches to the device."""
    from spava_ds.video import preprocess_video, read_video, resize_frames

    settings = engine.settings
    clock = time.perf_counter()
    frames, info = read_video(path, fps=settings["fps"], max_frames=settings["max_frames"])
    decoded = time.perf_counter()
    pixels, grid = preprocess_video(resize_frames(frames, settings["min_pixels"], settings["max_pixels"]))
    pixels = pixels.to(engine.device, engine.dtype)
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    preprocessed = time.perf_counter()
    inputs = engine.video_prompt(grid, info["second_per_grid_t"], question)
    timings.update(metadata=0.0, decode=decoded - clock, preprocess=preprocessed - decoded,
                   prompt=time.perf_counter() - preprocessed)
    return dict(inputs, pixel_values_videos=pixels, frames=len(frames))


def ttft_run(engine, path: str, pipeline: str) -> dict:
    """The file to the first token once, after a barrier; the wall time and its parts on this rank."""
    from spava_ds.engine import GenerationConfig

    if engine.world > 1:
        dist.barrier()
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    start = time.perf_counter()
    parts: Dict[str, float] = {}
    if pipeline == "new":
        inputs = engine.video_inputs(path, QUESTION, timings=parts)
    else:
        inputs = todays_inputs(engine, path, QUESTION, parts)
    answer = engine.generate(inputs, GenerationConfig(max_new_tokens=1))
    wall = time.perf_counter() - start
    parts.update(answer.timings)
    return dict(wall=wall, parts={k: parts.get(k, 0.0) for k in PARTS}, token=answer.tokens[0],
                logits=answer.first_logits, context=inputs["context_len"], frames=inputs["frames"],
                decoded_frames=parts.get("decoded_frames"))


def measure_method(engine, path: str, pipeline: str, args, device) -> dict:
    """Warm-up runs, then --iters timed runs; the median of the slowest rank's wall time, and each part's median
    of its largest value over the ranks."""
    warm = [ttft_run(engine, path, pipeline) for _ in range(args.warmup)]
    runs = [ttft_run(engine, path, pipeline) for _ in range(args.iters)]
    first = (warm or runs)[0]
    world = engine.world
    walls = [agree(r["wall"], device) if world > 1 else r["wall"] for r in runs]
    per_rank = [gather_floats([r["parts"][k] for k in PARTS] + [r["wall"]], device) if world > 1
                else [[r["parts"][k] for k in PARTS] + [r["wall"]]] for r in runs]
    median_run = sorted(range(len(runs)), key=lambda i: walls[i])[len(runs) // 2]
    ranks = per_rank[median_run]
    return dict(ttft=statistics.median(walls), ttft_all=walls,
                parts={k: max(r[i] for r in ranks) for i, k in enumerate(PARTS)},
                parts_per_rank=[dict(zip(PARTS + ["wall"], r)) for r in ranks],
                context_tokens=first["context"], frames=first["frames"], first_token=first["token"],
                decoded_frames=runs[median_run]["decoded_frames"], _logits=first["logits"])


def measure_shares(plan, worlds: List[int], args, device) -> List[dict]:
    """One GPU: rank r of W's decode + preprocess alone, for every r of every W in `worlds`."""
    from spava_ds.integrations.qwen_vision import temporal_range
    from spava_ds.video import video_pixels

    rows = []
    for world in worlds:
        for rank in range(world):
            first, stop = temporal_range(plan.num_steps, rank, world)
            samples = []
            for i in range(args.warmup + args.iters):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                timings, start = {}, time.perf_counter()
                video_pixels(plan, first, stop, device, timings=timings)
                timings["total"] = time.perf_counter() - start
                if i >= args.warmup:
                    samples.append(timings)
            middle = sorted(samples, key=lambda t: t["total"])[len(samples) // 2]
            rows.append(dict(world=world, rank=rank, steps=[first, stop], frames=2 * (stop - first),
                             decoded_frames=middle["decoded_frames"], decode=middle["decode"],
                             preprocess=middle["preprocess"], total=middle["total"],
                             decoders=middle.get("decoders"), decoder_threads=middle.get("decoder_threads")))
    return rows


def measure_decoding(plan, counts: List[int], worlds: List[int], args) -> List[dict]:
    """Decoding alone (RGB frames, no preprocessing) of the whole video and of rank 0's share at each W of
    `worlds`, with each decoder count of `counts` (FFmpeg's threads: the cores left to each decoder)."""
    from spava_ds.integrations.qwen_vision import temporal_range
    from spava_ds.video import iter_frames

    scopes = [("whole video", 0, plan.num_steps)] + [(f"rank 0 of W={w}", *temporal_range(plan.num_steps, 0, w))
                                                      for w in worlds]
    rows = []
    for scope, first, stop in scopes:
        indices = plan.frames_of_steps(first, stop)
        for count in counts:
            samples = []
            for i in range(args.warmup + args.iters):
                stats, start = {}, time.perf_counter()
                for _ in iter_frames(plan.metadata, indices, stats=stats, decoders=count):
                    pass
                stats["seconds"] = time.perf_counter() - start
                if i >= args.warmup:
                    samples.append(stats)
            middle = sorted(samples, key=lambda s: s["seconds"])[len(samples) // 2]
            rows.append(dict(scope=scope, asked=count, kept_frames=len(set(indices)), **middle))
    return rows


def measure_resize(plan, device, args, frames: int = 100) -> dict:
    """Seconds to resize, normalise and patchify `frames` frames of the video's size on `device` (as the pipeline
    does, without decoding), median of --iters after --warmup."""
    from spava_ds.video import preprocess_frames

    meta = plan.metadata
    pixels = torch.randint(0, 256, (frames, meta.height, meta.width, 3), dtype=torch.uint8, device=device)
    samples = []
    for i in range(args.warmup + args.iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        preprocess_frames(pixels, plan)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            samples.append(time.perf_counter() - start)
    return dict(frames=frames, size=[meta.width, meta.height], resized=[plan.resized_width, plan.resized_height],
                seconds=statistics.median(samples))


# ----------------------------------------------------------------------------------------------------------------
# Results: JSON lines, tables
# ----------------------------------------------------------------------------------------------------------------

def log(*a):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, flush=True)


def read_results(paths: List[str]) -> List[dict]:
    rows = []
    for path in paths:
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                rows += [json.loads(line) for line in f if line.strip()]
    return rows


def append_result(path: str, row: dict) -> None:
    """One line, flushed: a run stopped later keeps it."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def tables(rows: List[dict]) -> str:
    """Markdown tables: time to first token and its parts per method and pipeline; the one-rank shares."""
    out = ["| model | video | context | method | GPUs | pipeline | TTFT s | metadata | prompt | decode | preprocess | "
           "wait | vision | LM | first token | decode+prep. / TTFT | same 1st token as today |",
           "|" + "---|" * 17]
    ttft = [r for r in rows if r.get("kind") == "ttft" and r.get("status") == "ok"]
    today = {(r["case"], r["method"]): r for r in ttft if r["pipeline"] == "today"}
    for r in sorted(ttft, key=lambda r: (r["model"], r["resolution"], r["target"], METHODS.index(r["method"]),
                                         r["gpus"], PIPELINES.index(r["pipeline"]))):
        p = r["parts"]
        base = today.get((r["case"], r["method"]))
        same = "-" if r["pipeline"] == "today" or base is None else str(base["first_token"] == r["first_token"])
        out.append(f"| {r['model']} | {r['resolution']} | {r['context_tokens']} | {r['method']} | {r['gpus']} | "
                   f"{r['pipeline']} | {fmt(r['ttft'])} | " + " | ".join(fmt(p[k]) for k in PARTS)
                   + f" | {(p['decode'] + p['preprocess']) / r['ttft']:.1%} | {same} |")
    shares = [r for r in rows if r.get("kind") == "share"]
    if shares:
        out += ["", "| model | video | video tokens | W | slowest rank: decode + preprocess s | its decode | "
                "its preprocess | frames kept / decoded | metadata s | every rank's total s |", "|" + "---|" * 10]
        for r in sorted(shares, key=lambda r: (r["resolution"], r["target"], r["world"])):
            slow = max(r["ranks"], key=lambda x: x["total"])
            out.append(f"| {r['model']} | {r['resolution']} | {r['context_tokens']} | {r['world']} | "
                       f"{fmt(slow['total'])} | {fmt(slow['decode'])} | {fmt(slow['preprocess'])} | "
                       f"{slow['frames']} / {slow['decoded_frames']} | {fmt(r['metadata'])} | "
                       + ", ".join(fmt(x["total"], ".2f") for x in r["ranks"]) + " |")
    decoding = [r for r in rows if r.get("kind") == "decoding"]
    if decoding:
        out += ["", "| model | video | video tokens | card | decoding | decoders asked / used | FFmpeg threads each | "
                "seconds | frames kept / decoded | decoded frames/s | speedup over 1 decoder | preprocess 100 frames s |",
                "|" + "---|" * 12]
        for r in sorted(decoding, key=lambda r: (r["resolution"], r["target"])):
            ones = {x["scope"]: x["seconds"] for x in r["runs"] if x["asked"] == 1}
            for x in r["runs"]:
                speedup = fmt(ones[x["scope"]] / x["seconds"], ".2f") if x["scope"] in ones else "-"
                out.append(f"| {r['model']} | {r['resolution']} | {r['context_tokens']} | {r['card']} | {x['scope']} | "
                           f"{x['asked']} / {x['decoders']} | {x['decoder_threads']} | {fmt(x['seconds'])} | "
                           f"{x['kept_frames']} / {x['decoded_frames']} | {x['decoded_frames'] / x['seconds']:.0f} | "
                           f"{speedup} | {fmt(r['resize']['seconds'])} |")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, help="7b, 3b (default: 7b; --tiny: tiny)")
    p.add_argument("--resolutions", nargs="+", default=None, help="360p, 720p or WxH (default: 360p 720p)")
    p.add_argument("--contexts", nargs="+", default=None, help="target context tokens (default: 32K 64K 128K)")
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                   help="default: all (one process: dense only)")
    p.add_argument("--pipelines", nargs="+", default=PIPELINES, choices=PIPELINES)
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
    return p.parse_args(argv)


def setup(args):
    """Process group, device, model, engine settings and the measurement grid."""
    from transformers import AutoTokenizer

    from spava_ds import comm
    from spava_ds.assets import tiny_model_dir

    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        comm.init_distributed(backend="gloo" if args.tiny else None)
    rank, world = comm.group_rank_size(None)
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        raise SystemExit("no CUDA device: use --tiny for the CPU smoke run")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if args.tiny:
        torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir())
    settings = dict(TINY_VIDEO if args.tiny else QWEN_VIDEO, max_frames=1 << 20)  # no frame cap: the context decides
    if args.max_pixels is not None:
        settings["max_pixels"] = args.max_pixels or 1 << 40
    grid = dict(models=args.models or (["tiny"] if args.tiny else ["7b"]),
                resolutions=args.resolutions or (["128x96"] if args.tiny else ["360p", "720p"]),
                contexts=[parse_context(c) for c in args.contexts] if args.contexts else
                ([150] if args.tiny else [32768, 65536, 131072]),
                methods=[m for m in (args.methods or METHODS) if world > 1 or m == "dense"])
    return rank, world, device, tokenizer, settings, grid


def run_decoding(path: str, case: str, shares: List[int], decoding: bool, settings, args, device, base) -> None:
    """One GPU, rank 0: the plan from the metadata, then the one-rank shares of each W in `shares` and (when
    `decoding`) decoding alone with each of --decoder-counts and preprocessing alone; a result line each."""
    from spava_ds.video import plan_video

    clock = time.perf_counter()
    plan = plan_video(path, fps=settings["fps"], max_frames=settings["max_frames"],
                      min_pixels=settings["min_pixels"], max_pixels=settings["max_pixels"])
    metadata = time.perf_counter() - clock
    common = dict(case=case, context_tokens=plan.num_tokens,
                  **{k: base[k] for k in ("model", "resolution", "target", "video", "card", "date")})
    for w in shares:
        row = dict(kind="share", world=w, metadata=metadata, ranks=measure_shares(plan, [w], args, device), **common)
        append_result(args.out, row)
        slow = max(row["ranks"], key=lambda x: x["total"])
        log(f"[{case}] one rank of W={w}: slowest {slow['total']:.3f} s (decode {slow['decode']:.3f}, preprocess "
            f"{slow['preprocess']:.3f}; {slow['decoded_frames']} frames decoded for {slow['frames']}, "
            f"{slow['decoders']} decoders x {slow['decoder_threads']} threads); metadata {metadata:.3f} s")
    if decoding:
        row = dict(kind="decoding", runs=measure_decoding(plan, args.decoder_counts, args.share_worlds, args),
                   resize=measure_resize(plan, device, args), **common)
        append_result(args.out, row)
        for x in row["runs"]:
            log(f"[{case}] decoding {x['scope']} with {x['decoders']} decoders x {x['decoder_threads']} threads: "
                f"{x['seconds']:.3f} s, {x['decoded_frames'] / x['seconds']:.0f} frames/s")
        log(f"[{case}] preprocessing 100 frames on {device}: {row['resize']['seconds']:.4f} s")


def run_case(model, tokenizer, settings, args, key, base, path, device, rank, world, done, budget) -> bool:
    """Every method and pipeline of one (model, video) case; False when the time budget stopped it."""
    from spava_ds import SpavaConfig, comm
    from spava_ds.engine import SpavaEngine

    dense_logits = None
    for method in base["methods"]:
        single = method == "dense"
        engine = SpavaEngine(model, tokenizer, SpavaConfig(mode=method), comm.SELF if single else None, settings,
                             fused_vision=False)  # build_model installed the fused vision attention
        for pipeline in args.pipelines:
            if (key, method, pipeline) in done:
                continue
            if agree(1.0 if budget() else 0.0, device) > 0:
                return False
            row = dict(kind="ttft", case=key, method=method, pipeline=pipeline, gpus=1 if single else world,
                       **{k: base[k] for k in ("model", "resolution", "target", "video")})
            result = measure_method(engine, path, pipeline, args, device) if not single or rank == 0 else None
            if dist.is_initialized():
                dist.barrier()
            if rank == 0:
                logits = result.pop("_logits")
                dense_logits = logits if single and pipeline == "new" else dense_logits
                if dense_logits is not None and not single:
                    result["logit_max_abs_diff_vs_dense"] = (logits - dense_logits).abs().max().item()
                row.update(result, status="ok")
                append_result(args.out, row)
                log(f"  {method:>8} {pipeline:>5}: TTFT {row['ttft']:.3f} s ("
                    + ", ".join(f"{k} {row['parts'][k]:.3f}" for k in PARTS) + ")")
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table:
        print(tables(read_results(args.table)))
        return 0
    from transformers import __version__ as transformers_version

    rank, world, device, tokenizer, settings, grid = setup(args)
    done = {(r["case"], r["method"], r["pipeline"]) for r in read_results([args.out])
            if r.get("kind") == "ttft" and r.get("status") == "ok"}
    done |= {(r["case"], "share", r["world"]) for r in read_results([args.out]) if r.get("kind") == "share"}
    done |= {(r["case"], "decoding", 0) for r in read_results([args.out]) if r.get("kind") == "decoding"}
    if dist.is_initialized():
        dist.barrier()  # every rank has read --out before rank 0 appends to it
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    log(f"bench_ttft: {world} x {card}, torch {torch.__version__}, transformers {transformers_version}; "
        f"video settings {settings}")
    start = time.perf_counter()
    budget = lambda: args.time_budget is not None and time.perf_counter() - start > args.time_budget  # noqa: E731
    stopped = False
    meta = dict(card=card, date=time.strftime("%Y-%m-%d %H:%M"), torch=torch.__version__, world=world,
                command=" ".join(["launch/bench_ttft.py"] + (argv if argv is not None else sys.argv[1:])))
    for shape in grid["models"]:
        model = None
        for resolution in grid["resolutions"]:
            width, height = parse_resolution(resolution)
            for target in grid["contexts"]:
                key = f"{shape}/{resolution}/{target}/W{world}"
                shares = [w for w in args.share_worlds if (f"{shape}/{resolution}/{target}", "share", w) not in done]
                decoding = bool(args.decoder_counts) and (f"{shape}/{resolution}/{target}", "decoding", 0) not in done
                todo = [(m, p) for m in grid["methods"] for p in args.pipelines if (key, m, p) not in done]
                if stopped or budget() or not (todo or shares or decoding):  # the same decision on every rank
                    continue
                seconds = video_seconds(target, width, height, settings)
                path = cached_video(args.video_dir, seconds, width, height, args.video_fps, rank)
                base = dict(model=shape, resolution=resolution, target=target, methods=grid["methods"],
                            video=dict(path=os.path.basename(path), seconds=seconds, fps=args.video_fps,
                                       size=[width, height]), **meta)
                if (shares or decoding) and rank == 0:
                    run_decoding(path, f"{shape}/{resolution}/{target}", shares, decoding, settings, args, device,
                                 base)
                if not todo:
                    continue
                if model is None:
                    model = build_model(shape, tokenizer, device)
                log(f"[{key}] {seconds} s of {width}x{height} at {args.video_fps} fps")
                stopped = not run_case(model, tokenizer, settings, args, key, base, path, device, rank, world,
                                       done, budget)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if rank == 0:
        print(tables(read_results([args.out])), flush=True)
        print(f"\nresults: {args.out}" + ("; stopped by --time-budget: rerun to continue" if stopped else
                                          "; all measurements done"), flush=True)
    if dist.is_initialized():
        dist.barrier()
    return 0


if __name__ == "__main__":
    code = main()
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)
