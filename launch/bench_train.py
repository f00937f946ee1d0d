"""Training step of a long-video sample per sequence-parallel mode: time, throughput, MFU, memory, where the time goes.

Per optimizer step, for ``spava``, ``ring``, ``ulysses`` (spava_ds's modes on the zigzag layout) and
``deepspeed-ulysses`` (DeepSpeed's own ``deepspeed.sequence.layer.DistributedAttention`` wrapping causal SDPA, on
DeepSpeed's contiguous sharding), with the same model, the same synthetic sample, the same DeepSpeed JSON (ZeRO-3 by
default) and the same memory options, in one run:

* ``step_s``: seconds per optimizer step (median of ``--steps``, after one step at ``--warmup-tokens`` per mode and
  ``--warmup`` (1) at the length itself; the device synchronised around each), ``tokens_per_s_per_gpu`` = sample
  tokens / W / step_s, ``mfu`` = model FLOPs per rank / step_s / peak;
* ``peak_gib``: peak allocated memory of the rank; ``resident_gib``: what stays allocated between steps (weights,
  optimizer state, gradient partitions, the sample with its pixels, ``pixels_gib``); ``activations_gib``: the
  difference, what one step adds at its peak;
* ``breakdown`` (seconds per step, CUDA events around named steps, ``spava_ds.step_timer``): ``vision``,
  ``attention_forward``, ``attention_recompute`` (activation checkpointing), ``attention_backward``, ``loss``,
  ``optimizer``, and ``rest`` = forward + backward minus those: the linear layers with everything else of the
  decoder (norms, RoPE, activations, ZeRO-3's parameter gathers and gradient reduction). The attention's own
  communication is inside its times. ``--profile`` adds one profiled step and the device time per kernel class
  (``kernels``; ``spava_ds.profiling.kernel_class``: ``gemm``, ``attention``, ``elementwise``, ``copy``, ``nccl``,
  ``other``) and what the host did in it (``host``: ``step_s`` wall, ``blocked_s`` inside synchronising CUDA calls,
  their count ``syncs``, kernel ``launches``, ``aten_ops``; ``benchmarks.host.host_times``): a step whose host was
  blocked for little of its wall time is host-bound, and its GPU idles for the wall time minus the kernels' time;
* ``--frontier START``: per mode, the sample length doubled from START until a step no longer fits (the CUDA OOM is
  caught; the process that hit it ends, so the memory is really free) or ``--frontier-max``.

Model FLOPs (``model_flops``) count 2 per multiply-add, for the linear layers, the exact causal attention over the
whole sample (S^2/2 query-key pairs per head and layer: also for spava, which does less), the vocabulary projection
of the labelled tokens and the vision tower (``spava_ds.benchmarks.flops``); a backward costs twice its forward (the
vision tower's none when frozen); recomputation by checkpointing or tiling is not counted. Per rank: the total / W.

One-rank mode (``--one-rank``, one GPU): the process is rank 0 of a W-rank group whose other ranks are PyTorch's fake
process group (``torch.testing._internal.distributed.fake_pg``): collectives return at once, an all-gather copies
the local input into every slot, the other collectives leave their outputs as they are. ``deepspeed.initialize``
runs on it unchanged: ZeRO-3's parameter shards, gradient partitions and optimizer state have their real per-rank
sizes (contents are fake), so the compute and memory are one rank's of W, without communication time. Rank 0 stands
for the group because ZeRO-3 checks after its first step that every rank recorded the same module order, by a
broadcast from rank 0, which the fake group does not move (rank 0 compares with itself). Every (shape, W) runs in a
child process (a frontier: every (shape, W, mode)); a child that hits an OOM records it and ends.

Results: one JSON line per measurement in ``--out``, written when it ends; a rerun skips what is there (resume).

    # one H200 standing for one rank of W = 4: the 7B shape at 128K tokens, every mode
    python launch/bench_train.py --one-rank --world 4 --shape 7b --tokens 131072 --out runs/train.jsonl
    # the longest sample that trains per mode on one GPU as one rank of W = 4
    python launch/bench_train.py --one-rank --world 4 --shape 7b --frontier 262144 --frontier-max 1048576 \\
        --offload-checkpoints --out runs/train.jsonl
    # real ranks (torchrun or the deepspeed launcher): W = the processes
    torchrun --standalone --nproc_per_node 4 launch/bench_train.py --shape 7b --tokens 131072 --out runs/train.jsonl
    # the tables
    python launch/bench_train.py --table runs/train.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from spava_ds.benchmarks.flops import vision_tower_flops
from spava_ds.benchmarks.host import host_times
from spava_ds.benchmarks.records import append_jsonl, read_jsonls
from spava_ds.profiling import kernel_times
from spava_ds.step_timer import StepTimer
from spava_ds.train_model import MODEL_SHAPES, MemoryOptions, add_memory_arguments, measurement_config, memory_options
from spava_ds.training import DEEPSPEED_ULYSSES, build_video_qa, start_deepspeed, synthetic_sample, train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ["spava", "ring", "ulysses", DEEPSPEED_ULYSSES]
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, SXM: the peak MFU is counted against
OOM_EXIT = 3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--local-rank", "--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    p.add_argument("--shape", nargs="+", default=["7b"], choices=sorted(MODEL_SHAPES),
                   help="model shapes (random weights)")
    p.add_argument("--model", default=None, help="a Qwen2.5-VL checkpoint directory instead of --shape")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "train_zero3_bf16.json"),
                   help="DeepSpeed JSON (its \"spava\" block sets everything but the mode)")
    p.add_argument("--one-rank", action="store_true", help="one process stands for rank 0 of each --world")
    p.add_argument("--world", type=int, nargs="+", default=[2, 4], help="W in one-rank mode")
    p.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    p.add_argument("--tokens", type=int, nargs="*", default=[65536, 131072], help="sample lengths (tokens)")
    p.add_argument("--frontier", type=int, default=None, metavar="START",
                   help="per mode, double the length from START until a step does not fit")
    p.add_argument("--frontier-max", type=int, default=1 << 20, help="the longest sample the frontier tries")
    p.add_argument("--grid", type=int, nargs=2, default=[26, 46], metavar=("H", "W"),
                   help="patches per frame of the synthetic video (26 x 46: 364 x 644 pixels)")
    p.add_argument("--steps", type=int, default=2, help="timed optimizer steps per measurement")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed steps at the measured length before them (the first step of a mode at a new "
                        "length can carry one-time costs, e.g. compiling a merge for larger pieces: 3-4 s at 64K)")
    p.add_argument("--warmup-tokens", type=int, default=8192,
                   help="one untimed step at this length per mode and process, before its first measurement "
                        "(ZeRO-3 records its prefetch order in a first step; 0: none)")
    p.add_argument("--profile", action="store_true",
                   help="one more step under torch.profiler: kernel classes and host activity")
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU (default: 989 on H100/H200)")
    p.add_argument("--out", default=None, help="JSON lines, appended as measured; a rerun skips what is there")
    p.add_argument("--table", nargs="+", default=None, metavar="JSONL", help="print the tables of these files")
    p.add_argument("--rows", default=None, help=argparse.SUPPRESS)  # a child's share of the measurements
    # the same for every mode; long-sample defaults
    add_memory_arguments(p, MemoryOptions(freeze_vision=True, checkpoint_layers=True, mlp_shards=16))
    args = p.parse_args(argv)
    if args.table is None and args.out is None:
        p.error("--out is required (or --table to print results)")
    if args.config:  # a bad JSON fails here, not in each child process it would start
        try:
            measurement_config(args.config)
        except ValueError as e:
            p.error(str(e))
    args.memory = memory_options(args, p)
    return args


# ---- what to measure ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Row:
    """One measurement: a model, W, a mode and a sample length; ``frontier`` rows take one step, in doubling order."""

    source: str
    world: int
    mode: str
    tokens: int
    frontier: bool = False

    def key(self, args) -> str:
        options = dataclasses.asdict(args.memory)
        return json.dumps([self.source, self.world, self.mode, self.tokens, self.frontier, args.one_rank,
                           os.path.basename(args.config), options, args.grid], sort_keys=True)

    @property
    def group(self):
        """Rows measured by one process: one model per (source, W); a frontier per mode."""
        return (self.source, self.world) + ((self.mode,) if self.frontier else ())


def plan_rows(args, world: Optional[int] = None) -> List[Row]:
    """Every measurement, grouped by model and W, shortest first (a frontier doubling per mode)."""
    sources = [args.model] if args.model else args.shape
    worlds = [world] if world is not None else args.world
    rows = []
    for source in sources:
        for w in worlds:
            rows += [Row(source, w, m, n) for n in sorted(args.tokens) for m in args.modes]
            if args.frontier:
                lengths = [args.frontier << i for i in range(64) if args.frontier << i <= args.frontier_max]
                rows += [Row(source, w, m, n, frontier=True) for m in args.modes for n in lengths]
    return rows


class Results:
    """The JSON lines of ``path``: what is measured (by key), appended one line at a time."""

    def __init__(self, path: str):
        self.path = path
        self.rows: Dict[str, dict] = {r["key"]: r for r in read_jsonls([path], missing_ok=True)}

    def append(self, row: dict) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        append_jsonl(self.path, row)
        self.rows[row["key"]] = row

    def pending(self, rows: List[Row], args) -> List[Row]:
        """Rows not measured yet; in a frontier, none past a length that did not fit."""
        out, stopped = [], set()
        for row in rows:
            done = self.rows.get(row.key(args))
            if row.frontier and row.group in stopped:
                continue
            if done is None:
                out.append(row)
            elif done["status"] != "ok" and row.frontier:
                stopped.add(row.group)
        return out


# ---- one process's measurements -------------------------------------------------------------------------------------
def join_world(args, world: Optional[int]):
    """``(rank, W, device)``: torch.distributed as DeepSpeed uses it; in one-rank mode rank 0 of a fake W."""
    import deepspeed
    import deepspeed.ops

    cuda = torch.cuda.is_available()
    if not cuda:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a 25-50 s JIT build on the CPU
    if args.one_rank:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(world))
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def setup(args, source: str, device: torch.device):
    """``(engine, qa)``: the model under DeepSpeed, every rank of the world one sequence-parallel group."""
    ds, spava = measurement_config(args.config)
    qa, zero3_handle = build_video_qa(source, ds, device, spava, memory=args.memory, fused_vision=args.fused_vision)
    engine = start_deepspeed(qa, ds, zero3_handle)
    qa.set_group(None)
    qa.train()
    return engine, qa


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _slowest(values: List[float], device: torch.device) -> List[float]:
    """Element-wise maximum over the ranks (a step lasts as long as its slowest rank)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def time_steps(engine, qa, sample: dict, row: Row, args, device):
    """``(seconds per timed step, phase seconds per timed step, resident bytes, peak bytes)`` after the warm-up
    steps; resident: what stays allocated between steps (weights, optimizer state, gradient partitions, the
    sample)."""
    warmup, steps = (0, 1) if row.frontier else (args.warmup, args.steps)
    for _ in range(warmup):
        train_step(engine, sample, row.world)
    resident = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    timer = StepTimer(device)
    qa.set_timer(timer)
    seconds, phases = [], []
    try:
        for _ in range(steps):
            timer.reset()
            _sync(device)
            start = time.perf_counter()
            train_step(engine, sample, row.world, timer)
            _sync(device)
            seconds.append(time.perf_counter() - start)
            phases.append(timer.seconds())
    finally:
        qa.set_timer(None)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return seconds, phases, resident, peak


def breakdown(phases: List[Dict[str, float]]) -> Dict[str, float]:
    """Mean seconds per phase; ``rest`` is the forward and backward outside vision, attention and loss."""
    names = set().union(*phases)
    mean = {k: statistics.fmean(p.get(k, 0.0) for p in phases) for k in names}
    inside = ("vision", "loss", "attention_forward", "attention_recompute", "attention_backward")
    mean["rest"] = mean.get("forward", 0.0) + mean.get("backward", 0.0) - sum(mean.get(k, 0.0) for k in inside)
    return mean


def model_flops(config, sample: dict, train_vision: bool) -> Dict[str, float]:
    """Model FLOPs of one training step on the whole sample (see the module docstring for what counts)."""
    t, v = config.text_config, config.vision_config
    s = sample["input_ids"].shape[1]
    d = t.hidden_size // t.num_attention_heads
    per_layer = t.hidden_size * d * (2 * t.num_attention_heads + 2 * t.num_key_value_heads) \
        + 3 * t.hidden_size * t.intermediate_size
    labels = int((sample["labels"] != -100).sum())
    fwd = dict(linear=2 * t.num_hidden_layers * per_layer * s,
               attention=t.num_hidden_layers * 2 * d * t.num_attention_heads * s * (s + 1),
               lm_head=2 * t.hidden_size * t.vocab_size * labels)
    out = {k: 3 * x for k, x in fwd.items()}  # a backward costs twice its forward
    vision = vision_tower_flops(v, sample["video_grid_thw"])["total"]
    out["vision"] = (3 if train_vision else 1) * vision
    out["total"] = sum(out.values())
    return out


def peak_tflops(args, device: torch.device) -> Optional[float]:
    if args.peak_tflops is not None or device.type != "cuda":
        return args.peak_tflops
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def profile_step(engine, sample: dict, row: Row, device: torch.device) -> dict:
    """One more step under torch.profiler: ``kernels``, the device seconds per kernel class
    (``profiling.kernel_class``; CUDA only), and ``host``, what the host did (``benchmarks.host.host_times``: ATen
    operators, kernel launches, synchronising CUDA calls and the seconds blocked in them) with ``step_s``, the
    profiled step's wall time. Host-bound: ``step_s - blocked_s`` about ``step_s``; the device then idles
    ``step_s`` minus its kernels' seconds, syncs or not."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        train_step(engine, sample, row.world)
        _sync(device)
        wall = time.perf_counter() - start
    return dict(kernels=kernel_times(prof)["classes"] if cuda else None, host=dict(host_times(prof), step_s=wall))


def measure(engine, qa, sample: dict, row: Row, args, rank: int, device: torch.device) -> dict:
    """One row: time, throughput, MFU, memory and the breakdown of the steps."""
    layout = qa.layout(sample)  # a bad length fails here, on every rank, before any collective
    seconds, phases, resident, peak = time_steps(engine, qa, sample, row, args, device)
    *seconds, resident, peak = _slowest(seconds + [float(resident), float(peak)], device)
    step = statistics.median(seconds)
    flops = model_flops(qa.model.config, sample, train_vision=not args.memory.freeze_vision)
    peak_rate = peak_tflops(args, device)
    per_rank = flops["total"] / row.world
    return dict(status="ok", local_tokens=layout.local_len(rank), step_s=step, step_s_all=seconds,
                tokens_per_s_per_gpu=row.tokens / row.world / step, tflops_per_gpu=per_rank / step / 1e12,
                mfu=per_rank / step / (peak_rate * 1e12) if peak_rate else None, peak_gib=peak / 2 ** 30,
                resident_gib=resident / 2 ** 30, activations_gib=(peak - resident) / 2 ** 30,
                pixels_gib=sample["pixel_values_videos"].nbytes / 2 ** 30,
                breakdown=breakdown(phases), flops=flops,
                **(profile_step(engine, sample, row, device) if args.profile else dict(kernels=None, host=None)))


def describe(row: Row, args, rank: int, device: torch.device) -> dict:
    """What every result line says about where and how it was measured."""
    import deepspeed
    import transformers

    return dict(key=row.key(args), source=row.source, world=row.world, rank=rank, one_rank=args.one_rank,
                mode=row.mode, tokens=row.tokens, frontier=row.frontier, options=dataclasses.asdict(args.memory),
                config=os.path.basename(args.config), grid=args.grid,
                card=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
                date=datetime.date.today().isoformat(), torch=torch.__version__,
                transformers=transformers.__version__, deepspeed=deepspeed.__version__)


# ---- drivers --------------------------------------------------------------------------------------------------------
def run_rows(args, rows: List[Row], rank: int, device: torch.device) -> None:
    """Measure ``rows`` in this process (a one-rank child, or every rank of a real job), one model per source; the
    results are written by rank 0 as they come. A CUDA OOM is written by the rank that hit it, which then ends the
    process (under torchrun the launcher stops the other ranks; a rerun goes on with the next row)."""
    results = Results(args.out)
    samples: Dict[int, dict] = {}

    def sample(tokens: int) -> dict:
        if tokens not in samples:
            samples.clear()  # one sample at a time: a long video's pixels are large
            samples[tokens] = synthetic_sample(qa.model, tokens, tuple(args.grid), device=device,
                                               dtype=next(qa.model.parameters()).dtype, rank=qa.rank, world=qa.world)
        return samples[tokens]

    for source in dict.fromkeys(r.source for r in rows):
        engine, qa = setup(args, source, device)
        warmed = set()
        for row in (r for r in rows if r.source == source):
            entry = describe(row, args, rank, device)
            try:
                qa.set_mode(row.mode)
                if args.warmup_tokens and row.mode not in warmed:
                    train_step(engine, sample(args.warmup_tokens), row.world)
                    warmed.add(row.mode)
                entry.update(measure(engine, qa, sample(row.tokens), row, args, rank, device))
            except ValueError as e:  # a length or head count the mode cannot take: raised before any collective
                entry.update(status="error", error=str(e))
            except RuntimeError as e:
                if not out_of_memory(e):
                    raise
                results.append(dict(entry, status="oom", error=str(e).splitlines()[0]))
                print(f"{row}: out of memory", flush=True)
                os._exit(OOM_EXIT)  # the only sure way to give all of it back
            if rank == 0:
                results.append(entry)
                print(summary_line(entry), flush=True)
        engine.destroy()
        del engine, qa
        samples.clear()


def run_one_rank(args, argv: List[str]) -> int:
    """One child process per group of rows (``Row.group``); a child ended by an OOM is followed by another for the
    rows left (a frontier stops at its first OOM)."""
    rows = plan_rows(args)
    groups: Dict[tuple, List[Row]] = {}
    for row in rows:
        groups.setdefault(row.group, []).append(row)
    for group, members in groups.items():
        for _ in members:  # at most one child per row
            todo = Results(args.out).pending(members, args)
            if not todo:
                break
            rows_arg = json.dumps([dataclasses.asdict(r) for r in todo])
            code = subprocess.run([sys.executable, os.path.abspath(__file__)] + argv + ["--rows", rows_arg]).returncode
            if code not in (0, OOM_EXIT):
                print(f"# {group}: the child process failed (exit {code}); its rows stay to measure", flush=True)
                break
    print_tables([args.out])
    return 0


def out_of_memory(error: RuntimeError) -> bool:
    """A CUDA OOM, also as cuBLAS or cuDNN report a failed workspace allocation."""
    text = str(error)
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text


def summary_line(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['source']} W={r['world']} {r['mode']} {r['tokens']}: {r['status']} {r.get('error', '')}"
    line = (f"{r['source']} W={r['world']} {r['mode']} {r['tokens']}: {r['step_s']:.3f} s/step, "
            f"{r['tokens_per_s_per_gpu']:.0f} tok/s/GPU, peak {r['peak_gib']:.1f} GiB")
    if r.get("kernels"):
        line += f"; profiled step: kernels {sum(r['kernels'].values()):.3f} s"
    if r.get("host"):
        h = r["host"]
        line += (f"{'' if r.get('kernels') else '; profiled step:'} wall {h['step_s']:.3f} s, host blocked "
                 f"{h['blocked_s']:.3f} s in {h['syncs']} syncs, {h['launches']} launches, {h['aten_ops']} ATen ops")
    return line


# ---- tables ---------------------------------------------------------------------------------------------------------
PHASES = ["vision", "attention_forward", "attention_recompute", "attention_backward", "loss", "optimizer", "rest"]


def _fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def _where(r: dict) -> str:
    return f"1 of {r['world']} (fake)" if r["one_rank"] else str(r["world"])


def print_tables(paths: List[str]) -> None:
    """Markdown: every step measurement, spava's speed-up per case, and the frontier per mode."""
    rows = [r for p in paths for r in Results(p).rows.values()]
    steps = [r for r in rows if not r["frontier"]]
    print("| card | date | model | ranks | mode | tokens | local | s/step | tok/s/GPU | MFU % | peak GiB | resident GiB"
          " | " + " | ".join(PHASES) + " | status |")
    print("|" + "---|" * (13 + len(PHASES)))
    for r in sorted(steps, key=lambda r: (r["card"], r["source"], r["world"], r["tokens"], r["mode"])):
        b = r.get("breakdown") or {}
        mfu = r.get("mfu")
        print(f"| {r['card']} | {r['date']} | {r['source']} | {_where(r)} | {r['mode']} | {r['tokens']} | "
              f"{r.get('local_tokens', '-')} | {_fmt(r.get('step_s'), '.3f')} | "
              f"{_fmt(r.get('tokens_per_s_per_gpu'), '.0f')}"
              f" | {_fmt(100 * mfu if mfu is not None else None, '.1f')} | {_fmt(r.get('peak_gib'), '.1f')} | "
              f"{_fmt(r.get('resident_gib'), '.1f')} | "
              + " | ".join(_fmt(b.get(k), ".3f") for k in PHASES) + f" | {r['status']} |")
    print_speedups(steps)
    print_frontier([r for r in rows if r["frontier"]])


def print_speedups(steps: List[dict]) -> None:
    cases: Dict[tuple, Dict[str, float]] = {}
    for r in steps:
        if r["status"] == "ok":
            cases.setdefault((r["card"], r["source"], _where(r), r["tokens"]), {})[r["mode"]] = r["step_s"]
    print("\n| card | model | ranks | tokens | spava s/step | vs ring | vs ulysses | vs deepspeed-ulysses |")
    print("|---|---|---|---|---|---|---|---|")
    for (card, source, where, tokens), t in sorted(cases.items()):
        if "spava" in t:
            ratios = [_fmt(t[m] / t["spava"] if m in t else None) for m in ("ring", "ulysses", DEEPSPEED_ULYSSES)]
            print(f"| {card} | {source} | {where} | {tokens} | {t['spava']:.3f} | " + " | ".join(ratios) + " |")


def print_frontier(rows: List[dict]) -> None:
    best: Dict[tuple, dict] = {}
    for r in rows:
        key = (r["card"], r["source"], _where(r), r["mode"], json.dumps(r["options"], sort_keys=True))
        entry = best.setdefault(key, {"fits": None, "peak": None, "fails": None})
        if r["status"] == "ok" and (entry["fits"] is None or r["tokens"] > entry["fits"]):
            entry.update(fits=r["tokens"], peak=r["peak_gib"])
        elif r["status"] == "oom" and (entry["fails"] is None or r["tokens"] < entry["fails"]):
            entry["fails"] = r["tokens"]
    print("\n| card | model | ranks | mode | longest that trains | its peak GiB | first that does not fit | options |")
    print("|---|---|---|---|---|---|---|---|")
    for (card, source, where, mode, options), e in sorted(best.items()):
        print(f"| {card} | {source} | {where} | {mode} | {_fmt(e['fits'], 'd')} | {_fmt(e['peak'], '.1f')} | "
              f"{_fmt(e['fails'], 'd')} | {options} |")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.table:
        print_tables(args.table)
        return 0
    if args.rows is not None:  # a one-rank child
        rows = [Row(**r) for r in json.loads(args.rows)]
        rank, _, device = join_world(args, rows[0].world)
        run_rows(args, rows, rank, device)
        return 0
    if args.one_rank:
        return run_one_rank(args, argv)
    created = not dist.is_initialized()
    rank, world, device = join_world(args, None)
    run_rows(args, Results(args.out).pending(plan_rows(args, world), args), rank, device)
    if rank == 0:
        print_tables([args.out])
    if created:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
