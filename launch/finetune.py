"""Fine-tune a video checkpoint (Qwen2.5-VL, Qwen3-VL, InternVL3) on video QA with sequence parallelism (DeepSpeed).

    deepspeed --num_gpus 2 launch/finetune.py --deepspeed-config configs/finetune_zero2_sp2.json \\
        --model spava_ds/assets/tiny-qwen2.5-vl --train data/train.jsonl --eval data/test.jsonl --output runs/tiny

    # the 7B architecture with random weights on synthetic 128K-token samples, 4 GPUs, ZeRO-3
    deepspeed --num_gpus 4 launch/finetune.py --deepspeed-config configs/train_zero3_bf16.json \\
        --model-shape 7b --synthetic-tokens 131072 --max-steps 10 --output runs/7b --no-export \\
        --freeze-vision --checkpoint-layers --mlp-shards 16

Every SP group (``sequence_parallel_size`` consecutive ranks) trains on one sequence at a time, sharded by
``ZigzagLayout``: the language model runs the JSON's ``"spava"`` mode (``ring``, exact, unless the block says
otherwise), the vision tower runs frame-parallel with its backward (or frozen), and the loss covers the answer
tokens only (``spava_ds.training``). Data-parallel groups take different samples. The memory options are
``spava_ds.train_model.MemoryOptions``.

Nothing is lost (``spava_ds.runs``): an existing run folder is refused without --resume or --overwrite; checkpoints
are written every --save-every-minutes (30) and --save-every steps, marked complete when every rank's files are on
disk, and on SIGTERM/SIGINT after the optimizer step in flight (exit code 143/130; a second signal stops at once);
--resume passes over a damaged newest checkpoint to the newest complete one and cuts metrics.jsonl back to it. Every
record of --train and --eval is checked before step 1 (``spava_ds.dataset``). An error is one line per rank
(``spava_ds.entry``; the traceback with --debug). See docs/finetune.md and docs/reliability.md.
"""

from __future__ import annotations

import os

# --model is a local checkpoint folder: transformers must never go looking for it on a model hub (set before
# transformers is imported; an explicit HF_HUB_OFFLINE=0 wins).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Optional  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from spava_ds import comm, dataset, entry, runs  # noqa: E402
from spava_ds.integrations.deepspeed import read_deepspeed_json, spava_config_from_deepspeed  # noqa: E402
from spava_ds.train_model import (MODEL_SHAPES, MemoryOptions, add_memory_arguments, memory_options,  # noqa: E402
                                  trainable_parameters)
from spava_ds.training import (VideoQAModel, add_answer, build_video_qa, exact_match, sp_group,  # noqa: E402
                               start_deepspeed, synthetic_sample, train_step)

log = logging.getLogger("spava_ds.finetune")
DEFAULT_LR = 1e-4  # AdamW's peak learning rate when the JSON has no optimizer block


def _option(p, name: str, **kwargs) -> None:
    """``--name-with-hyphens``, and ``--name_with_underscores``, the older spelling, as an alias."""
    p.add_argument(*dict.fromkeys([f"--{name}", f"--{name.replace('-', '_')}"]), **kwargs)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)  # the launchers'
    _option(p, "deepspeed-config", required=True, help="DeepSpeed JSON with a \"spava\" block (configs/)")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="local Hugging Face checkpoint folder (Qwen2.5-VL, Qwen3-VL, InternVL; the "
                       "family from its config); nothing is downloaded")
    model.add_argument("--model-shape", "--model_shape", choices=sorted(MODEL_SHAPES),
                       help="random initialisation of the Qwen2.5-VL architecture at this size (no tokenizer: "
                            "train on --synthetic-tokens)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--train", help="jsonl of {video, question, answer} (spava_ds.tasks writes one)")
    data.add_argument("--synthetic-tokens", "--synthetic_tokens", type=int,
                      help="train on synthetic samples of this many tokens (random pixels and text; for "
                           "measurements; Qwen2.5-VL), one new sample per micro step")
    _option(p, "synthetic-grid", type=int, nargs=2, default=[26, 46], metavar=("H", "W"),
            help="patches per frame of the synthetic video (default 26 x 46: 364 x 644 pixels)")
    p.add_argument("--eval", default=None, help="held-out jsonl for accuracy and loss")
    p.add_argument("--output", required=True, help="run folder: checkpoints/, metrics.jsonl, model/ (the export); an "
                   "existing run is refused without --resume or --overwrite")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its newest complete "
                   "checkpoint (a damaged one is passed over, and set aside)")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --output (deleted before step 1)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the training set")
    _option(p, "max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    _option(p, "max-minutes", type=float, default=None,
            help="stop training after this wall time (then checkpoint, evaluate, export as at the end)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate of AdamW when the JSON has no optimizer block (default {DEFAULT_LR:g})")
    _option(p, "warmup-ratio", type=float, default=0.1,
            help="warmup share of the steps (a torch schedule, or the JSON scheduler's \"auto\" warmup)")
    _option(p, "eval-every", type=int, default=0, help="optimizer steps between evaluations (0: at the end)")
    _option(p, "eval-limit", type=int, default=None, help="evaluate on the first N held-out records")
    _option(p, "eval-max-new-tokens", type=int, default=8)
    _option(p, "eval-mode", default=None, help="attention mode for evaluation (default: the training mode)")
    _option(p, "save-every", type=int, default=0, help="also checkpoint every N optimizer steps (0: no)")
    _option(p, "save-every-minutes", type=float, default=30.0,
            help="checkpoint when this many minutes have passed since the last checkpoint (0: no; default 30); "
                 "there is always one at the end and on SIGTERM/SIGINT")
    _option(p, "keep-checkpoints", type=int, default=2,
            help="keep the newest N complete checkpoints, delete older ones (0: keep all; default 2: the newest "
                 "and one to fall back to)")
    _option(p, "no-export", action="store_true", help="skip save_pretrained at the end")
    p.add_argument("--fps", type=float, default=None, help="video sampling rate (default: the checkpoint's)")
    _option(p, "max-frames", type=int, default=None, help="frame cap (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0, help="data order seed")
    _option(p, "num-workers", type=int, default=0,
            help="DataLoader processes that decode and preprocess the next videos while the GPU trains "
                 "(0: in the training process)")
    add_memory_arguments(p, MemoryOptions())
    entry.add_arguments(p)
    args = p.parse_args(argv)
    _check_args(p, args)
    args.memory = memory_options(args, p)
    return args


def _check_args(p: argparse.ArgumentParser, args) -> None:
    """Refuse a bad command line on every rank alike, before anything starts (argparse's exit code 2)."""
    if args.model_shape and args.eval:
        p.error("--eval needs a tokenizer: give --model DIR (a checkpoint), not --model-shape")
    if args.synthetic_tokens is not None and args.max_steps is None:
        p.error("--synthetic-tokens needs --max-steps (synthetic data has no epochs)")
    if args.model_shape and args.train:
        p.error("--model-shape has no tokenizer to read --train records: use --synthetic-tokens or --model DIR")
    for name, value, low in (("--max-steps", args.max_steps, 1), ("--eval-limit", args.eval_limit, 1),
                             ("--max-frames", args.max_frames, 1), ("--save-every", args.save_every, 0),
                             ("--keep-checkpoints", args.keep_checkpoints, 0), ("--eval-every", args.eval_every, 0),
                             ("--num-workers", args.num_workers, 0)):
        if value is not None and value < low:
            p.error(f"{name} must be >= {low}, got {value}")
    for name, value in (("--epochs", args.epochs), ("--fps", args.fps), ("--max-minutes", args.max_minutes),
                        ("--save-every-minutes", args.save_every_minutes or None), ("--lr", args.lr)):
        if value is not None and not 0 < value < math.inf:
            p.error(f"{name} must be > 0, got {value}")
    if not 0 <= args.warmup_ratio <= 1:  # a share of the steps
        p.error(f"--warmup-ratio must be in [0, 1], got {args.warmup_ratio}")


def check_model_dir(path: str) -> None:
    """--model is a local checkpoint folder; anything else fails here, at once."""
    if not os.path.isdir(path):
        raise ValueError(f"--model {path!r}: no such folder (give a local Hugging Face checkpoint folder; nothing "
                         "is downloaded)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"--model {path!r} holds no config.json: not a Hugging Face checkpoint folder")


# ---- setup ----------------------------------------------------------------------------------------------------------
def _join_deepspeed(args) -> None:
    """DeepSpeed's communication over the job's process group; a plain ``python launch/finetune.py`` (no launcher)
    makes a group of its own process, which DeepSpeed needs."""
    import deepspeed
    import deepspeed.ops

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(0)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=entry.collective_timeout(args))
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")  # what deepspeed.initialize reads of a launcher
    if not torch.cuda.is_available():
        # CPU runs: skip the JIT build of DeepSpeed's shared-memory comm op (25-50 s); gloo does the collectives.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend)


def _ds_config(args, world: int, train_micro_steps: int):
    """The JSON as DeepSpeed gets it: spava block validated and removed, mesh sizes and "auto" schedule filled.

    Every check here runs identically on every rank before any collective, so a bad config fails everywhere.
    ``train_micro_steps`` is the number of training records (0 for synthetic data, which has no epochs).
    """
    ds = read_deepspeed_json(args.deepspeed_config)
    if args.lr is not None and "optimizer" in ds:  # DeepSpeed would take the block's and drop --lr without a word
        raise ValueError(f"--lr {args.lr:g}: {args.deepspeed_config} has an \"optimizer\" block, whose params set the "
                         "learning rate: drop --lr, or the block")
    if ds.get("sequence_parallel_size") == "auto":  # one sequence over all processes
        ds["sequence_parallel_size"] = world
    block = dict(ds.get("spava") or {})
    block.setdefault("mode", "ring")  # exact attention is the training default; "spava" trains the approximation
    ds["spava"] = block
    spava_config, sp = spava_config_from_deepspeed(ds)
    del ds["spava"]
    src = args.deepspeed_config
    if world % sp:
        raise ValueError(f"{src}: sequence_parallel_size {sp} does not divide the {world} processes")
    dp = world // sp
    if ds.get("data_parallel_size", dp) != dp:
        raise ValueError(f"{src}: data_parallel_size {ds['data_parallel_size']} != processes / sequence_parallel_size"
                         f" = {dp}")
    if ds.get("train_micro_batch_size_per_gpu", 1) != 1:
        raise ValueError(f"{src}: train_micro_batch_size_per_gpu must be 1 (one video sequence per SP group; use "
                         "gradient_accumulation_steps for larger batches)")
    ds["train_micro_batch_size_per_gpu"] = 1
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from micro batch, accumulation and data parallelism
    # DeepSpeed sees plain data parallelism over all ranks; the SP groups are ours (spava_ds.training docstring).
    ds.pop("sequence_parallel_size", None)
    ds.pop("data_parallel_size", None)
    gas = ds.get("gradient_accumulation_steps", 1)
    micro_per_epoch = train_micro_steps // dp
    if train_micro_steps and micro_per_epoch < gas:
        raise ValueError(f"{args.train}: {train_micro_steps} records give {micro_per_epoch} sequences per "
                         f"data-parallel group, fewer than gradient_accumulation_steps={gas}")
    total = args.max_steps or max(1, math.floor(args.epochs * micro_per_epoch / gas))
    params = (ds.get("scheduler") or {}).get("params", {})
    for key, value in (("total_num_steps", total), ("warmup_num_steps", max(1, round(args.warmup_ratio * total)))):
        if params.get(key) == "auto":
            params[key] = value
    return ds, spava_config, sp, dp, gas, total, micro_per_epoch


def _torch_schedule(total: int, warmup: int):
    """Linear warmup to the peak, then cosine decay to 10% of it (used when the JSON has no "scheduler")."""
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build(run, device: torch.device):
    """``(qa, infer, zero3_handle)``: the model (checkpoint or shape) with its memory options, wrapped for training
    over this rank's SP group, and the SpavaEngine that builds its prompts (None without a tokenizer). Keep
    ``zero3_handle`` until ``start_engine``."""
    args = run.args
    group = sp_group(run.sp, entry.collective_timeout(args))
    qa, zero3_handle = build_video_qa(args.model or args.model_shape, run.ds, device, run.spava_config, group,
                                      args.memory, args.fused_vision)
    return qa, inference_engine(run, qa, group) if args.model else None, zero3_handle


def start_engine(run, qa: VideoQAModel, zero3_handle):
    """The DeepSpeed engine of ``qa``, with the JSON's optimizer and scheduler (else AdamW and ``_torch_schedule``)."""
    ds, args = run.ds, run.args
    optimizer = None if "optimizer" in ds else torch.optim.AdamW(trainable_parameters(qa), lr=args.lr or DEFAULT_LR,
                                                                  weight_decay=0.0)
    warmup = max(1, round(args.warmup_ratio * run.total_steps))
    scheduler = None if "scheduler" in ds else _torch_schedule(run.total_steps, warmup)
    return start_deepspeed(qa, ds, zero3_handle, optimizer=optimizer, lr_scheduler=scheduler)


def inference_engine(run, qa: VideoQAModel, group):
    """The SpavaEngine that builds the prompts (training and evaluation see the same one) and decodes for
    accuracy."""
    from transformers import AutoTokenizer

    from spava_ds.engine import SpavaEngine

    infer = SpavaEngine(qa.model, AutoTokenizer.from_pretrained(run.args.model, local_files_only=True),
                        run.spava_config, group, run.settings, fused_vision=False)
    if run.args.eval_mode is not None:
        infer.config = dataclasses.replace(run.spava_config, mode=run.args.eval_mode)
    return infer


class _MicroSteps(torch.utils.data.Dataset):
    """The training samples of micro steps ``first .. last - 1``, in order, for a DataLoader to prefetch."""

    def __init__(self, make, first: int, last: int):
        self.make, self.first, self.last = make, first, last

    def __len__(self):
        return max(0, self.last - self.first)

    def __getitem__(self, i):
        return self.make(self.first + i)


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a small CPU tensor over all ranks (through the GPU under NCCL, which reduces CUDA tensors only)."""
    if dist.get_backend() == "nccl":
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(t)
    return t.cpu()


def _memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux: peak RSS


class _TqdmHandler(logging.StreamHandler):
    """Log lines printed above the progress bar instead of through it."""

    def emit(self, record):
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


# ---- evaluation -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(ds_engine, qa: VideoQAModel, infer, held_out, args, dp_rank: int, dp: int, zero_stage: int) -> dict:
    """Held-out exact-match accuracy (greedy decoding by the SpavaEngine) and answer loss.

    Data-parallel groups split the records, except under ZeRO-3, where every rank must run the same module calls
    (parameters are all-gathered per module) and all groups evaluate all records.
    """
    from spava_ds.engine import GenerationConfig

    qa.eval()
    mine = held_out if zero_stage == 3 else held_out[dp_rank::dp]
    results, loss_sum = [], torch.zeros(2)
    for record in mine:
        inputs = infer.video_inputs(record["video"], record["question"], args.fps, args.max_frames)
        share = ds_engine(add_answer(infer, inputs, record["answer"]))
        answer = infer.generate(inputs, GenerationConfig(max_new_tokens=args.eval_max_new_tokens))
        loss_sum += torch.tensor([share.item(), 1.0 / qa.world])  # SP shares sum to the loss; count once per group
        results.append({"id": record.get("id"), "task": record.get("task"), "answer": record["answer"],
                        "prediction": answer.text, "correct": exact_match(answer.text, record["answer"])})
    qa.train()
    loss_sum = _all_reduce_sum(loss_sum)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results if qa.rank == 0 else [])
    if zero_stage == 3:  # every data-parallel group evaluated everything: keep group 0's results
        gathered = gathered[:1]
    predictions = [r for part in gathered for r in part]
    per_task = {}
    for r in predictions:
        per_task.setdefault(r["task"], []).append(r["correct"])
    loss = float(loss_sum[0] / loss_sum[1])  # per (group, record) pair: the mean answer loss
    return {"accuracy": sum(r["correct"] for r in predictions) / max(1, len(predictions)), "loss": loss,
            "per_task": {t: sum(v) / len(v) for t, v in sorted(per_task.items())}, "predictions": predictions}


# ---- export ---------------------------------------------------------------------------------------------------------
def export(qa: VideoQAModel, tokenizer, settings: dict, model_dir, out_dir: str, zero_stage: int) -> None:
    """save_pretrained of the trained model, its tokenizer and spava_ds.json (video settings), on rank 0
    (``model_dir`` None: the weights only)."""
    import contextlib

    import deepspeed

    gather = (deepspeed.zero.GatheredParameters(list(qa.model.parameters()), modifier_rank=None)
              if zero_stage == 3 else contextlib.nullcontext())
    with gather:  # ZeRO-3 holds 1/N of every parameter per rank: assemble them for the save
        if dist.get_rank() == 0:
            os.makedirs(out_dir, exist_ok=True)
            qa.model.save_pretrained(out_dir)
            if model_dir is not None:  # a --model-shape run has no tokenizer or video settings to save
                _save_inputs_setup(tokenizer, settings, model_dir, out_dir)
    dist.barrier()


def _save_inputs_setup(tokenizer, settings: dict, model_dir: str, out_dir: str) -> None:
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "spava_ds.json"), "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2)
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        if os.path.isfile(os.path.join(model_dir, name)):
            shutil.copy(os.path.join(model_dir, name), out_dir)


# ---- the run --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    """What the steps of ``train`` share: the validated inputs, the layout of the processes, the run folder."""

    args: argparse.Namespace
    rank: int
    world: int
    ds: dict
    spava_config: object
    sp: int
    dp: int
    gas: int
    total_steps: int
    micro_per_epoch: int
    train: Optional[dataset.RecordFile]
    held_out: Optional[dataset.RecordFile]
    settings: dict
    metrics: Optional[runs.MetricsFile] = None  # rank 0's, from ``open_metrics`` on
    saved_step: int = 0  # the step of the newest checkpoint

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp  # SP groups are blocks of consecutive ranks in DeepSpeed's (data, sequence) mesh

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.args.output, runs.CHECKPOINTS)

    @property
    def train_records(self) -> list:
        return self.train.records if self.train else []

    @property
    def eval_records(self) -> list:
        return self.held_out.records if self.held_out else []

    def write_metrics(self, line: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(line)


def plan_run(args, rank: int, world: int) -> Run:
    """The checks that need no model: the JSON, the text of every data record, the run folder; identical on every
    rank, before any collective."""
    from spava_ds.video import load_video_settings

    runs.check_output(args.output, args.resume, args.overwrite)  # first: the check that protects earlier work
    train = dataset.read_records(args.train) if args.train else None
    held_out = dataset.read_records(args.eval, args.eval_limit) if args.eval else None
    # bad records count here: they stop the run before step 1 (check_data), and the step count must not hide them
    ds, spava_config, sp, dp, gas, total_steps, micro_per_epoch = _ds_config(args, world, train.count if train else 0)
    settings = load_video_settings(args.model) if args.model else {}
    settings.update({k: v for k, v in (("fps", args.fps), ("max_frames", args.max_frames)) if v is not None})
    run = Run(args, rank, world, ds, spava_config, sp, dp, gas, total_steps, micro_per_epoch, train, held_out,
              settings)
    longest = max([r.get("frames", 0) for r in run.train_records + run.eval_records], default=0)
    if longest > settings.get("max_frames", longest):
        log.warning("records have up to %d frames but max_frames is %d: frames are subsampled and short needles "
                    "may be dropped (raise --max-frames)", longest, settings["max_frames"])
    return run


def check_data(run: Run, infer) -> None:
    """Every record of --train and --eval, before step 1: its text (``plan_run`` read it), its video on every rank's
    file system, and the video's plan under the checkpoint's settings with a temporal step for every SP rank (from
    the container's metadata; the ranks share the plans out). The problems of all ranks are gathered; rank 0 lists
    them and every rank raises the same one-line error."""
    files = [f for f in (run.train, run.held_out) if f is not None]
    if not files:
        return
    start = time.perf_counter()
    check = functools.partial(infer.check_video, fps=run.args.fps, max_frames=run.args.max_frames)
    mine = [p for f in files for p in dataset.video_problems(f, check, run.rank, run.world)]
    found = [p for f in files for p in f.problems] + [p for part in comm.all_gather_objects(mine) for p in part]
    dataset.raise_problems(found, report=run.rank == 0)
    log.info("checked the %d records of %s in %.1f s", sum(f.count for f in files),
             " and ".join(f.path for f in files), time.perf_counter() - start)


def replace_old_run(run: Run) -> None:
    """--overwrite: delete the old run, now that every check has passed (rank 0; the others wait)."""
    with entry.agreed("replacing the run in --output"):
        if run.rank == 0 and run.args.overwrite:
            runs.replace(run.args.output)


def open_metrics(run: Run) -> None:
    """Rank 0's metrics.jsonl (after ``resume`` has cut it back), appended from the first step on."""
    with entry.agreed("opening the metrics file"):
        if run.rank == 0:
            run.metrics = runs.MetricsFile(run.args.output)


# ---- checkpoints ----------------------------------------------------------------------------------------------------
def save_checkpoint(run: Run, engine, micro: int) -> None:
    """DeepSpeed's checkpoint of this step on every rank, then rank 0 marks it complete and deletes the complete ones
    beyond --keep-checkpoints."""
    step = engine.global_steps
    tag = runs.tag_of(step)
    engine.save_checkpoint(run.ckpt_dir, tag=tag, client_state={"micro_step": micro})  # ends with a barrier
    with entry.agreed(f"completing checkpoint {tag}"):
        if run.rank == 0:
            runs.mark_complete(run.ckpt_dir, tag, step=step, micro_step=micro)
            run.metrics.sync()
            runs.prune(run.ckpt_dir, run.args.keep_checkpoints)
    run.saved_step = step


def resume(run: Run, engine) -> int:
    """Load the newest checkpoint that every rank loads, passing over damaged or incomplete ones (set aside, never
    deleted); cut metrics.jsonl back to its step. Returns the micro step to continue from."""
    tags = comm.broadcast_object(runs.checkpoint_tags(run.ckpt_dir))  # rank 0's list: every rank tries the same
    passed = []
    for tag in tags:
        problem, client = runs.checkpoint_problem(run.ckpt_dir, tag), None
        if problem is None:
            problem, client = _load(engine, run.ckpt_dir, tag)
        failures = entry.agree(problem)
        if not failures:
            break
        passed.append(f"{tag}: {entry.describe_failures(failures, run.world)}")
        if run.rank == 0:
            log.warning("--resume: %s cannot be resumed from (%s); trying the checkpoint before it", tag,
                        entry.describe_failures(failures, run.world))
    else:
        raise ValueError(f"--resume: no checkpoint in {run.ckpt_dir!r} can be resumed from ({'; '.join(passed)})")
    with entry.agreed("setting damaged checkpoints aside"):
        if run.rank == 0:
            for name in tags[:len(passed)]:
                log.warning("--resume: %s set aside as %s", name, runs.set_aside(run.ckpt_dir, name))
            dropped = runs.cut_metrics(run.args.output, engine.global_steps)
            log.info("resumed from %s at step %d%s", os.path.join(run.ckpt_dir, tag), engine.global_steps,
                     f" ({dropped} line(s) after it cut from {runs.METRICS})" if dropped else "")
    run.saved_step = engine.global_steps
    return client["micro_step"]


def _load(engine, ckpt_dir: str, tag: str):
    """``(None, client state)``, or ``(why it failed, None)``."""
    try:
        path, client = engine.load_checkpoint(ckpt_dir, tag=tag)
    except Exception as err:  # noqa: BLE001 - a damaged checkpoint: agreed on, then the one before is tried
        return f"loading failed: {entry.one_line(err)}", None
    return (None, client) if path is not None else ("DeepSpeed could not load it", None)


# ---- training -------------------------------------------------------------------------------------------------------
def sample_maker(run: Run, qa: VideoQAModel, infer):
    """``make(m)``: the training sample of micro step ``m`` for this data-parallel group (CPU work only: safe in
    DataLoader worker processes). Records follow a fixed shuffle per epoch, so a resumed run continues the same
    order; synthetic samples are seeded by the step and the group."""
    args = run.args
    if args.synthetic_tokens is not None:
        # Made on the training device in its dtype unless DataLoader workers make them (a CUDA context does not
        # survive their fork): a long video's random pixels take seconds on a CPU.
        param = next(qa.model.parameters())
        device, dtype = (param.device, param.dtype) if args.num_workers == 0 else (torch.device("cpu"), torch.float32)
        return lambda m: synthetic_sample(qa.model, args.synthetic_tokens, tuple(args.synthetic_grid),
                                          seed=(args.seed * 1_000_003 + m) * run.dp + run.dp_rank, device=device,
                                          dtype=dtype, rank=qa.rank, world=qa.world)

    def make(m: int) -> dict:
        epoch, within = divmod(m, run.micro_per_epoch)
        order = torch.randperm(len(run.train_records), generator=torch.Generator().manual_seed(args.seed + epoch))
        record = run.train_records[int(order[within * run.dp + run.dp_rank])]
        inputs = infer.video_inputs(record["video"], record["question"], args.fps, args.max_frames)
        return add_answer(infer, inputs, record["answer"])

    return make


def run_eval(run: Run, engine, qa, infer, step: int):
    """Evaluate, log, and write the metrics and predictions (nothing without held-out records)."""
    if not run.eval_records:
        return None
    result = evaluate(engine, qa, infer, run.eval_records, run.args, run.dp_rank, run.dp,
                      engine.zero_optimization_stage())
    log.info("eval step %d | accuracy %.3f | loss %.4f | %s", step, result["accuracy"], result["loss"],
             " ".join(f"{t} {a:.2f}" for t, a in result["per_task"].items()))
    run.write_metrics({"step": step, "eval_accuracy": result["accuracy"], "eval_loss": result["loss"],
                       "eval_per_task": result["per_task"]})
    if run.rank == 0:
        with open(os.path.join(run.args.output, f"eval_step{step}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in result["predictions"])
    return result


def train_loop(run: Run, engine, qa, infer, micro: int):
    """Optimizer steps until ``total_steps``, --max-minutes or a stop signal, with the checkpoints of --save-every
    and --save-every-minutes; returns ``(micro steps done, last evaluation, the stop signal or None)``."""
    from tqdm.auto import tqdm

    args = run.args
    bar = tqdm(total=run.total_steps, initial=engine.global_steps, desc="finetune", unit="step",
               disable=run.rank != 0, dynamic_ncols=True)
    samples = iter(torch.utils.data.DataLoader(
        _MicroSteps(sample_maker(run, qa, infer), micro, run.total_steps * run.gas), batch_size=None,
        num_workers=args.num_workers, prefetch_factor=4 if args.num_workers else None,
        multiprocessing_context="fork" if args.num_workers else None,  # fork: the closure is not pickled
        worker_init_fn=_ignore_stop_signals if args.num_workers else None))
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else math.inf
    last_save, last_eval, out_of_time, stop = time.monotonic(), None, False, None
    loss_sum, step_tokens, start = 0.0, 0, time.perf_counter()
    while engine.global_steps < run.total_steps:
        sample = next(samples)
        loss_sum += train_step(engine, sample, run.sp).float().item()
        micro += 1
        step_tokens += sample["input_ids"].shape[1]
        if micro % run.gas:
            continue
        now = time.monotonic()
        save_due = bool(args.save_every_minutes) and now - last_save >= 60 * args.save_every_minutes
        loss, out_of_time, save_due, stop = _agree_on_step(run, loss_sum, now > deadline, save_due)
        line = _step_entry(engine, loss, step_tokens * run.dp, time.perf_counter() - start)
        run.write_metrics(line)
        bar.set_postfix(loss=f"{line['loss']:.4f}", lr=f"{line['lr']:.2e}")
        bar.update(1)
        step = engine.global_steps
        if step < run.total_steps and not (stop or out_of_time) and \
                (save_due or (args.save_every and step % args.save_every == 0)):
            save_checkpoint(run, engine, micro)
            last_save = time.monotonic()
        if stop or out_of_time:
            break
        if args.eval_every and step % args.eval_every == 0 and step < run.total_steps:
            last_eval = run_eval(run, engine, qa, infer, step)
        loss_sum, step_tokens, start = 0.0, 0, time.perf_counter()
    bar.close()
    if out_of_time:
        log.info("--max-minutes %g reached: stopping at step %d of %d", args.max_minutes, engine.global_steps,
                 run.total_steps)
    return micro, last_eval, stop


def _ignore_stop_signals(worker_id: int) -> None:
    """In a DataLoader worker: SIGTERM/SIGINT reach the rank's whole process group (torchrun, the deepspeed
    launcher, Ctrl-C), but the rank decides when to stop, and ends its workers itself."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def _agree_on_step(run: Run, loss_sum: float, out_of_time: bool, save_due: bool):
    """The end of an optimizer step, in one all-reduce: the step's loss (the SP shares summed, averaged over
    accumulation and data-parallel groups), rank 0's clock (time limit reached? a timed checkpoint due?), and the
    stop signal any rank received. Every rank then saves and stops after the same step."""
    got = entry.received_signal()
    votes = torch.tensor([loss_sum, run.rank == 0 and out_of_time, run.rank == 0 and save_due,
                          got == signal.SIGTERM, got == signal.SIGINT], dtype=torch.float64)
    votes = _all_reduce_sum(votes)
    stop = signal.SIGTERM if votes[3] else signal.SIGINT if votes[4] else None
    return votes[0].item() / (run.gas * run.dp), bool(votes[1]), bool(votes[2]), stop


def _step_entry(engine, loss: float, tokens: int, seconds: float) -> dict:
    """The metrics line of one optimizer step (also logged)."""
    grad_norm = engine.get_global_grad_norm()
    line = {"step": engine.global_steps, "time": time.time(), "loss": loss, "lr": engine.get_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else None, "tokens_per_s": tokens / seconds,
            "mem_gib": _memory_gib()}
    log.info("step %d | loss %.4f | lr %.3e | grad norm %s | %.0f tok/s | mem %.2f GiB", line["step"], loss,
             line["lr"], f"{line['grad_norm']:.3f}" if grad_norm is not None else "-", line["tokens_per_s"],
             line["mem_gib"])
    return line


# ---- main -----------------------------------------------------------------------------------------------------------
def train(args) -> dict:
    """The whole run in this process group (``main`` adds one-line errors and the exit code): checks, model, data,
    resume, training, the last checkpoint, evaluation and export. Returns ``{"steps", "eval", "stopped"}`` (the
    signal that stopped the run, or None)."""
    if args.model:
        check_model_dir(args.model)
    rank, world = entry.init_distributed(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[_TqdmHandler()], force=True)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    with entry.agreed("checking the inputs"):
        run = plan_run(args, rank, world)
    _join_deepspeed(args)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    qa, infer, zero3_handle = build(run, device)
    check_data(run, infer)
    replace_old_run(run)
    engine = start_engine(run, qa, zero3_handle)
    micro = resume(run, engine) if args.resume else 0
    open_metrics(run)
    _log_start(run, engine)
    stop = entry.stop_agreed()  # a signal during the start: stop before step 1
    qa.train()
    micro, last_eval, stop = train_loop(run, engine, qa, infer, micro) if not stop else (micro, None, stop)
    if run.saved_step != engine.global_steps:
        save_checkpoint(run, engine, micro)
    if stop:
        log.info("stopped by %s at step %d of %d%s", signal.Signals(stop).name, engine.global_steps,
                 run.total_steps, ": continue with the same command and --resume" if run.saved_step else "")
    else:
        last_eval = run_eval(run, engine, qa, infer, engine.global_steps) or last_eval
        _export(run, engine, qa, infer)
    if run.metrics is not None:
        run.metrics.close()
    return {"steps": engine.global_steps, "stopped": stop,
            "eval": {k: v for k, v in (last_eval or {}).items() if k != "predictions"}}


def _log_start(run: Run, engine) -> None:
    args = run.args
    log.info("training %s: %s, %d x %d (data x sequence parallel), %s, ZeRO %d, %d steps of %d sequence(s) per group",
             args.model or f"the {args.model_shape} shape",
             args.train or f"synthetic samples of {args.synthetic_tokens} tokens", run.dp, run.sp,
             run.spava_config.mode, engine.zero_optimization_stage(), run.total_steps, run.gas)


def _export(run: Run, engine, qa, infer) -> None:
    if run.args.no_export:
        return
    out = os.path.join(run.args.output, "model")
    export(qa, infer.tokenizer if infer else None, run.settings, run.args.model, out, engine.zero_optimization_stage())
    log.info("exported %s", out)


def _exit_code(args) -> int:
    stop = train(args)["stopped"]
    return 128 + stop if stop else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return entry.run_main(_exit_code, args, graceful_stop=True, in_flight="the optimizer step in flight")


if __name__ == "__main__":
    sys.exit(main())
