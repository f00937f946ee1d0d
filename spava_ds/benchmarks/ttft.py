"""The time-to-first-token benchmark's measurement (``launch/bench_ttft.py``): the cached benchmark videos (natural-
looking H.264, ``spava_ds.video.natural_frames``), one run from the file to the first token by a pipeline
(``new``: each rank decodes and preprocesses its own frames; ``streamed``: the same, its vision tower encoding each
chunk as it decodes; ``today``: every rank decodes the whole video), the
one-rank shares and the decoders' scaling, and the sweep over models, videos, methods and pipelines, resumed from
the JSON-lines results file."""

from __future__ import annotations

import os
import statistics
import time
from typing import Dict, List

import torch
import torch.distributed as dist

from .e2e import case_key, parse_context, parse_resolution, prepare_model
from .records import append_jsonl, read_jsonls
from .timing import agree, gather_floats, log

METHODS = ["dense", "spava", "ring", "ulysses", "apb", "star"]
PIPELINES = ["new", "streamed", "today"]
PARTS = ["metadata", "prompt", "decode", "preprocess", "wait", "vision", "lm", "first_token"]
QUESTION = "What is in this video?"
QWEN_VIDEO = dict(fps=2.0, min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28)  # Qwen2.5-VL's video defaults
TINY_VIDEO = dict(fps=2.0, min_pixels=56 * 56, max_pixels=112 * 112)


def write_bench_video(path: str, seconds: float, width: int, height: int, fps: int = 30, seed: int = 0) -> str:
    """An H.264 mp4 of natural-looking motion (``natural_frames``), fast: libx264's veryfast preset (B-frames,
    CABAC) on all cores, crf 23, a keyframe every 2 seconds."""
    from ..video import natural_frames, write_video

    return write_video(path, natural_frames(round(seconds * fps), width, height, fps, seed), fps, crf=23,
                       preset="veryfast", gop=round(2 * fps), threads=0)


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
    if pipeline in ("new", "streamed"):  # streamed: decode/preprocess are the waits inside the tower's span
        inputs = engine.video_inputs(path, QUESTION, timings=parts, stream=pipeline == "streamed")
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
        append_jsonl(args.out, row)
        slow = max(row["ranks"], key=lambda x: x["total"])
        log(f"[{case}] one rank of W={w}: slowest {slow['total']:.3f} s (decode {slow['decode']:.3f}, preprocess "
            f"{slow['preprocess']:.3f}; {slow['decoded_frames']} frames decoded for {slow['frames']}, "
            f"{slow['decoders']} decoders x {slow['decoder_threads']} threads); metadata {metadata:.3f} s")
    if decoding:
        row = dict(kind="decoding", runs=measure_decoding(plan, args.decoder_counts, args.share_worlds, args),
                   resize=measure_resize(plan, device, args), **common)
        append_jsonl(args.out, row)
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
                append_jsonl(args.out, row)
                log(f"  {method:>8} {pipeline:>5}: TTFT {row['ttft']:.3f} s ("
                    + ", ".join(f"{k} {row['parts'][k]:.3f}" for k in PARTS) + ")")
    return True


def finished(path: str) -> set:
    """The measurements already in the results file: (case, method, pipeline), (video case, "share", W) and
    (video case, "decoding", 0)."""
    rows = read_jsonls([path], missing_ok=True)
    done = {(r["case"], r["method"], r["pipeline"]) for r in rows
            if r.get("kind") == "ttft" and r.get("status") == "ok"}
    done |= {(r["case"], "share", r["world"]) for r in rows if r.get("kind") == "share"}
    done |= {(r["case"], "decoding", 0) for r in rows if r.get("kind") == "decoding"}
    return done


def bench(args, command: List[str]) -> bool:
    """Every model x resolution x context of the grid: the decoding rows, then every method and pipeline; rank 0
    appends a result line as each measurement ends. ``command``: the arguments, recorded. False when
    --time-budget stopped it."""
    from transformers import __version__ as transformers_version

    rank, world, device, tokenizer, settings, grid = setup(args)
    done = finished(args.out)
    if dist.is_initialized():
        dist.barrier()  # every rank has read --out before rank 0 appends to it
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    log(f"bench_ttft: {world} x {card}, torch {torch.__version__}, transformers {transformers_version}; "
        f"video settings {settings}")
    start = time.perf_counter()
    budget = lambda: args.time_budget is not None and time.perf_counter() - start > args.time_budget  # noqa: E731
    meta = dict(card=card, date=time.strftime("%Y-%m-%d %H:%M"), torch=torch.__version__, world=world,
                command=" ".join(["launch/bench_ttft.py"] + command))
    stopped = False
    for shape in grid["models"]:
        model = None
        for resolution in grid["resolutions"]:
            for target in grid["contexts"]:
                if stopped or budget():  # the same decision on every rank
                    continue
                model, stopped = run_video(shape, resolution, target, model, tokenizer, settings, grid, meta,
                                           args, device, rank, world, done, budget)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if dist.is_initialized():
        dist.barrier()
    return not stopped


def run_video(shape, resolution, target, model, tokenizer, settings, grid, meta, args, device, rank, world, done,
              budget):
    """One (model, video) case: its video (written once), the decoding rows on rank 0, then every method and
    pipeline not ``done``. Returns (the model, built on first need; whether the budget stopped it)."""
    width, height = parse_resolution(resolution)
    key = case_key(shape, resolution, target, world)
    video_case = f"{shape}/{resolution}/{target}"
    shares = [w for w in args.share_worlds if (video_case, "share", w) not in done]
    decoding = bool(args.decoder_counts) and (video_case, "decoding", 0) not in done
    todo = [(m, p) for m in grid["methods"] for p in args.pipelines if (key, m, p) not in done]
    if not (todo or shares or decoding):
        return model, False
    seconds = video_seconds(target, width, height, settings)
    path = cached_video(args.video_dir, seconds, width, height, args.video_fps, rank)
    base = dict(model=shape, resolution=resolution, target=target, methods=grid["methods"],
                video=dict(path=os.path.basename(path), seconds=seconds, fps=args.video_fps, size=[width, height]),
                **meta)
    if (shares or decoding) and rank == 0:
        run_decoding(path, video_case, shares, decoding, settings, args, device, base)
    if not todo:
        return model, False
    if model is None:
        model = prepare_model(shape, tokenizer, device)
    log(f"[{key}] {seconds} s of {width}x{height} at {args.video_fps} fps")
    return model, not run_case(model, tokenizer, settings, args, key, base, path, device, rank, world, done, budget)
