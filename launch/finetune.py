"""Fine-tune a video checkpoint (Qwen2.5-VL, Qwen3-VL, InternVL3) on video QA with sequence parallelism (DeepSpeed).

    deepspeed --num_gpus 2 launch/finetune.py --deepspeed_config configs/finetune_zero2_sp2.json \\
        --model spava_ds/assets/tiny-qwen2.5-vl --train data/train.jsonl --eval data/test.jsonl --output runs/tiny

    # the 7B architecture with random weights on synthetic 128K-token samples, 4 GPUs, ZeRO-3
    deepspeed --num_gpus 4 launch/finetune.py --deepspeed_config configs/train_zero3_bf16.json \\
        --model-shape 7b --synthetic-tokens 131072 --max_steps 10 --output runs/7b --no_export \\
        --freeze-vision --checkpoint-layers --mlp-shards 16

Every SP group (``sequence_parallel_size`` consecutive ranks) trains on one sequence at a time, sharded by
``ZigzagLayout``: the language model runs the JSON's ``"spava"`` mode (``ring``, exact, unless the block says
otherwise), the vision tower runs frame-parallel with its backward (or frozen), and the loss covers the answer
tokens only (``spava_ds.training``). Data-parallel groups take different samples. The memory options are
``spava_ds.train_model.MemoryOptions``. See docs/finetune.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import resource
import shutil
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spava_ds.integrations.deepspeed import spava_config_from_deepspeed  # noqa: E402
from spava_ds.models import family_of  # noqa: E402
from spava_ds.tasks import load_records  # noqa: E402
from spava_ds.train_model import (MODEL_SHAPES, MemoryOptions, add_memory_arguments,  # noqa: E402
                                  apply_memory_options, build_model, memory_options, model_dtype,
                                  trainable_parameters)
from spava_ds.training import (VideoQAModel, add_answer, exact_match, sp_group, synthetic_sample,  # noqa: E402
                               train_step, training_attn_implementation)

log = logging.getLogger("spava_ds.finetune")
CHECKPOINTS = "checkpoints"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    p.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON with a \"spava\" block (configs/)")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="Hugging Face checkpoint directory (Qwen2.5-VL, Qwen3-VL, InternVL; the family "
                       "from its config)")
    model.add_argument("--model-shape", choices=sorted(MODEL_SHAPES),
                       help="random initialisation of the Qwen2.5-VL architecture at this size (no tokenizer: "
                            "train on --synthetic-tokens)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--train", help="jsonl of {video, question, answer} (spava_ds.tasks writes one)")
    data.add_argument("--synthetic-tokens", type=int, help="train on synthetic samples of this many tokens (random "
                      "pixels and text; for measurements; Qwen2.5-VL), one new sample per micro step")
    p.add_argument("--synthetic-grid", type=int, nargs=2, default=[26, 46], metavar=("H", "W"),
                   help="patches per frame of the synthetic video (default 26 x 46: 364 x 644 pixels)")
    p.add_argument("--eval", default=None, help="held-out jsonl for accuracy and loss")
    p.add_argument("--output", required=True, help="run folder: checkpoints/, metrics.jsonl, model/ (the export)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the training set")
    p.add_argument("--max_steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--max_minutes", type=float, default=None,
                   help="stop training after this wall time (then checkpoint, evaluate, export as at the end)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate when the JSON has no optimizer block")
    p.add_argument("--warmup_ratio", type=float, default=0.1,
                   help="warmup share of the steps (a torch schedule, or the JSON scheduler's \"auto\" warmup)")
    p.add_argument("--eval_every", type=int, default=0, help="optimizer steps between evaluations (0: at the end)")
    p.add_argument("--eval_limit", type=int, default=None, help="evaluate on the first N held-out records")
    p.add_argument("--eval_max_new_tokens", type=int, default=8)
    p.add_argument("--eval_mode", default=None, help="attention mode for evaluation (default: the training mode)")
    p.add_argument("--save_every", type=int, default=0, help="optimizer steps between checkpoints (0: at the end)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoints (its 'latest' tag)")
    p.add_argument("--no_export", action="store_true", help="skip save_pretrained at the end")
    p.add_argument("--fps", type=float, default=None, help="video sampling rate (default: the checkpoint's)")
    p.add_argument("--max_frames", type=int, default=None, help="frame cap (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0, help="data order seed")
    p.add_argument("--num_workers", type=int, default=0,
                   help="DataLoader processes that decode and preprocess the next videos while the GPU trains "
                        "(0: in the training process)")
    add_memory_arguments(p, MemoryOptions())
    args = p.parse_args(argv)
    if args.model_shape and args.eval:
        p.error("--eval needs a tokenizer: give --model DIR (a checkpoint), not --model-shape")
    if args.synthetic_tokens is not None and args.max_steps is None:
        p.error("--synthetic-tokens needs --max_steps (synthetic data has no epochs)")
    if args.model_shape and args.train:
        p.error("--model-shape has no tokenizer to read --train records: use --synthetic-tokens or --model DIR")
    args.memory = memory_options(args, p)
    return args


# ---- setup ----------------------------------------------------------------------------------------------------------
def _init_distributed():
    import deepspeed
    import deepspeed.ops

    created = not dist.is_initialized()
    if not torch.cuda.is_available():
        # CPU runs: skip the JIT build of DeepSpeed's shared-memory comm op (25-50 s); gloo does the collectives.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return created


def _ds_config(args, world: int, train_micro_steps: int):
    """The JSON as DeepSpeed gets it: spava block validated and removed, mesh sizes and "auto" schedule filled.

    Every check here runs identically on every rank before any collective, so a bad config fails everywhere.
    ``train_micro_steps`` is the number of training records (0 for synthetic data, which has no epochs).
    """
    with open(args.deepspeed_config, encoding="utf-8") as f:
        ds = json.load(f)
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


def setup_training(args, ds: dict, spava_config, total_steps: int, device: torch.device):
    """``(engine, qa)``: the model built (checkpoint or shape), its memory options applied, under DeepSpeed."""
    import deepspeed

    model, zero3_handle = build_model(args.model or args.model_shape, model_dtype(ds), device,
                                      training_attn_implementation(), ds)
    apply_memory_options(model, args.memory)
    if args.fused_vision:
        family_of(model).fuse_vision_attention()
    qa = VideoQAModel(model, spava_config, options=args.memory)
    optimizer = None if "optimizer" in ds else torch.optim.AdamW(trainable_parameters(qa), lr=args.lr,
                                                                  weight_decay=0.0)
    warmup = max(1, round(args.warmup_ratio * total_steps))
    scheduler = None if "scheduler" in ds else _torch_schedule(total_steps, warmup)
    engine, *_ = deepspeed.initialize(model=qa, model_parameters=trainable_parameters(qa), optimizer=optimizer,
                                      lr_scheduler=scheduler, config=ds)
    del zero3_handle  # transformers needed it while the model was built and partitioned
    return engine, qa


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
def evaluate(ds_engine, qa: VideoQAModel, infer, records, args, dp_rank: int, dp: int, zero_stage: int) -> dict:
    """Held-out exact-match accuracy (greedy decoding by the SpavaEngine) and answer loss.

    Data-parallel groups split the records, except under ZeRO-3, where every rank must run the same module calls
    (parameters are all-gathered per module) and all groups evaluate all records.
    """
    from spava_ds.engine import GenerationConfig

    qa.eval()
    mine = records if zero_stage == 3 else records[dp_rank::dp]
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


# ---- training -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    """What the steps of ``main`` share: the validated inputs and the layout of the processes."""

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
    train_records: list
    eval_records: list
    settings: dict

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp  # SP groups are blocks of consecutive ranks in DeepSpeed's (data, sequence) mesh

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.args.output, CHECKPOINTS)

    def write_metrics(self, entry: dict) -> None:
        if self.rank == 0:
            with open(os.path.join(self.args.output, "metrics.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")


def plan_run(args, rank: int, world: int) -> Run:
    """Everything that can fail on bad input does so here, identically on every rank, before any collective."""
    from spava_ds.video import load_video_settings

    train_records = load_records(args.train) if args.train else []
    eval_records = load_records(args.eval)[:args.eval_limit] if args.eval else []
    ds, spava_config, sp, dp, gas, total_steps, micro_per_epoch = _ds_config(args, world, len(train_records))
    if args.resume and not os.path.isfile(os.path.join(args.output, CHECKPOINTS, "latest")):
        raise FileNotFoundError(f"--resume: no DeepSpeed checkpoint in {os.path.join(args.output, CHECKPOINTS)} "
                                "(its 'latest' file is missing)")
    settings = load_video_settings(args.model) if args.model else {}
    settings.update({k: v for k, v in (("fps", args.fps), ("max_frames", args.max_frames)) if v is not None})
    longest = max([r.get("frames", 0) for r in train_records + eval_records], default=0)
    if longest > settings.get("max_frames", longest):
        log.warning("records have up to %d frames but max_frames is %d: frames are subsampled and short needles "
                    "may be dropped (raise --max_frames)", longest, settings["max_frames"])
    return Run(args, rank, world, ds, spava_config, sp, dp, gas, total_steps, micro_per_epoch, train_records,
               eval_records, settings)


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
    """Optimizer steps until ``total_steps`` or ``--max_minutes``; returns ``(micro steps done, last evaluation)``."""
    from tqdm.auto import tqdm

    args = run.args
    bar = tqdm(total=run.total_steps, initial=engine.global_steps, desc="finetune", unit="step",
               disable=run.rank != 0, dynamic_ncols=True)
    samples = iter(torch.utils.data.DataLoader(
        _MicroSteps(sample_maker(run, qa, infer), micro, run.total_steps * run.gas), batch_size=None,
        num_workers=args.num_workers, prefetch_factor=4 if args.num_workers else None,
        multiprocessing_context="fork" if args.num_workers else None))  # fork: the closure is not pickled
    step_loss, step_tokens, start = torch.zeros(2), 0, time.perf_counter()  # [loss sum, stop vote]
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else None
    last_eval = None
    while engine.global_steps < run.total_steps:
        sample = next(samples)
        step_loss[0] += train_step(engine, sample, run.sp).float().cpu()
        micro += 1
        step_tokens += sample["input_ids"].shape[1]
        if micro % run.gas:
            continue
        # Rank 0's clock decides, shared by the reduction below, so every rank stops after the same step.
        step_loss[1] = float(run.rank == 0 and deadline is not None and time.monotonic() > deadline)
        # the step's loss: the sum of the SP shares, averaged over accumulation and data-parallel groups
        step_loss = _all_reduce_sum(step_loss)
        entry = _step_entry(engine, step_loss[0].item() / (run.gas * run.dp), step_tokens * run.dp,
                            time.perf_counter() - start)
        run.write_metrics(entry)
        bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry['lr']:.2e}")
        bar.update(1)
        step = engine.global_steps
        if args.save_every and step % args.save_every == 0 and step < run.total_steps:
            engine.save_checkpoint(run.ckpt_dir, tag=f"step{step}", client_state={"micro_step": micro})
        if args.eval_every and step % args.eval_every == 0 and step < run.total_steps:
            last_eval = run_eval(run, engine, qa, infer, step)
        if step_loss[1] > 0:
            log.info("--max_minutes %g reached: stopping at step %d of %d", args.max_minutes, step, run.total_steps)
            break
        step_loss, step_tokens, start = torch.zeros(2), 0, time.perf_counter()
    bar.close()
    return micro, last_eval


def _step_entry(engine, loss: float, tokens: int, seconds: float) -> dict:
    """The metrics line of one optimizer step (also logged)."""
    grad_norm = engine.get_global_grad_norm()
    entry = {"step": engine.global_steps, "time": time.time(), "loss": loss, "lr": engine.get_lr()[0],
             "grad_norm": float(grad_norm) if grad_norm is not None else None, "tokens_per_s": tokens / seconds,
             "mem_gib": _memory_gib()}
    log.info("step %d | loss %.4f | lr %.3e | grad norm %s | %.0f tok/s | mem %.2f GiB", entry["step"], loss,
             entry["lr"], f"{entry['grad_norm']:.3f}" if grad_norm is not None else "-", entry["tokens_per_s"],
             entry["mem_gib"])
    return entry


def main(argv=None) -> dict:
    args = parse_args(argv)
    created = _init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[_TqdmHandler()], force=True)
    if rank != 0:
        log.setLevel(logging.WARNING)
    run = plan_run(args, rank, world)

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    engine, qa = setup_training(args, run.ds, run.spava_config, run.total_steps, device)
    group = sp_group(run.sp)
    qa.set_group(group)
    infer = inference_engine(run, qa, group) if args.model else None
    qa.train()
    micro = 0
    if args.resume:
        path, client = engine.load_checkpoint(run.ckpt_dir)
        if path is None:
            raise RuntimeError(f"--resume: DeepSpeed could not load a checkpoint from {run.ckpt_dir}")
        micro = client["micro_step"]
        log.info("resumed from %s at step %d", path, engine.global_steps)
    if rank == 0:
        os.makedirs(args.output, exist_ok=True)
        log.info("training %s: %s, %d x %d (data x sequence parallel), %s, ZeRO %d, %d steps of %d sequence(s) per "
                 "group", args.model or f"the {args.model_shape} shape", args.train or
                 f"synthetic samples of {args.synthetic_tokens} tokens", run.dp, run.sp, run.spava_config.mode,
                 engine.zero_optimization_stage(), run.total_steps, run.gas)

    micro, last_eval = train_loop(run, engine, qa, infer, micro)
    step = engine.global_steps
    engine.save_checkpoint(run.ckpt_dir, tag=f"step{step}", client_state={"micro_step": micro})
    last_eval = run_eval(run, engine, qa, infer, step) or last_eval
    if not args.no_export:
        export(qa, infer.tokenizer if infer else None, run.settings, args.model, os.path.join(args.output, "model"),
               engine.zero_optimization_stage())
        log.info("exported %s", os.path.join(args.output, "model"))
    summary = {"steps": step, "eval": {k: v for k, v in (last_eval or {}).items() if k != "predictions"}}
    if created:
        dist.destroy_process_group()  # an orderly exit: without it gloo can abort at interpreter shutdown
    return summary


def inference_engine(run: Run, qa: VideoQAModel, group):
    """The SpavaEngine that builds the prompts (training and evaluation see the same one) and decodes for
    accuracy."""
    from transformers import AutoTokenizer

    from spava_ds.engine import SpavaEngine

    infer = SpavaEngine(qa.model, AutoTokenizer.from_pretrained(run.args.model), run.spava_config, group,
                        run.settings, fused_vision=False)
    if run.args.eval_mode is not None:
        infer.config = dataclasses.replace(run.spava_config, mode=run.args.eval_mode)
    return infer


if __name__ == "__main__":
    main()
