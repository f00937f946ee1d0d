"""20 optimizer steps: spava_ds's exact modes, at W = 1 or over W ranks, train like plain transformers on one device.

    python launch/check_train_parity.py                  # one GPU: 3B shape, 2K-token samples, bf16, ZeRO-3
    python launch/check_train_parity.py --world 2        # ring and ulysses over 2 GPUs (NCCL), the reference on one
    python launch/check_train_parity.py --shape tiny --tokens 300 --grid 4 4 --config CPU_FP32.json   # a CPU

Every run starts from the same weights (the same seed) and sees the same samples under the same DeepSpeed JSON:

* ``transformers``: Qwen2.5-VL as transformers runs it, SDPA attention, logits of the whole sequence, its own
  label shift and loss (no spava_ds on the model's path);
* ``eager``: the same with transformers' eager attention: another exact attention, whose distance from the first
  is the noise of the run's precision (bf16 on a GPU);
* ``ring``, ``ulysses``: ``spava_ds.training.VideoQAModel`` (spava_ds's attention, logits at the labels) with
  sequence parallelism over ``--world`` W processes (one GPU each, or gloo on a CPU) started by torch.distributed.run;
  every rank builds the whole sample and ``train_step`` shards it; the loss is the whole sequence's, the gradient
  norm the global one.

Per step the loss and the gradient norm are compared with ``transformers``; the check passes when the largest
relative difference of each exact mode is within ``max(--floor, 3 x eager's)``. One JSON line per run and step in
``--out`` (optional, with the run's ``world``); the table last; exit status 1 when the check fails. On a GPU, or
with W > 1, each run is a fresh child process (group) of this script.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
from typing import Dict, List

import torch
import torch.distributed as dist

from spava_ds import SpavaConfig
from spava_ds.train_model import MODEL_SHAPES, build_model, measurement_config, model_dtype
from spava_ds.training import (build_video_qa, sequence_loss, sp_group, start_deepspeed, synthetic_sample,
                               train_step)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = ["transformers", "eager", "ring", "ulysses"]
SP_RUNS = ("ring", "ulysses")  # the runs with sequence parallelism over --world ranks
# the runs of transformers' own training: the attention implementation each builds its model with
TRANSFORMERS_ATTN = {"transformers": "sdpa", "eager": {"text_config": "eager", "vision_config": "sdpa", "": "sdpa"}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="3b", choices=sorted(MODEL_SHAPES))
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "train_zero3_bf16.json"))
    p.add_argument("--tokens", type=int, default=2048,
                   help="sample length (eager attention keeps every layer's score matrix: 4K tokens of the 3B shape "
                        "do not fit on one H200 beside ZeRO-3's states)")
    p.add_argument("--grid", type=int, nargs=2, default=[26, 46], metavar=("H", "W"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world", type=int, default=1,
                   help="ranks of ring's and ulysses' sequence parallelism (a process and a GPU each); transformers "
                        "and eager run on one device")
    p.add_argument("--floor", type=float, default=5e-3, help="smallest relative tolerance")
    p.add_argument("--out", default=None, help="JSON lines of every step")
    # one run, in a child process (not "--run": torch.distributed.run reads that as its own --run-path)
    p.add_argument("--only-run", choices=RUNS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--curve-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else None
    if args.world < 1:
        p.error(f"--world {args.world}: the ranks of ring and ulysses must be at least 1")
    if gpus is not None and args.world > gpus:
        p.error(f"--world {args.world}: a rank takes a GPU and this machine shows {gpus}")
    return args


class TransformersLoss(torch.nn.Module):
    """The model as transformers trains it: ``model(**inputs, labels=...)`` on the whole sequence."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample: dict) -> torch.Tensor:
        ids = sample["input_ids"]
        labels = torch.full_like(ids, -100)
        labels[:, 1:] = sample["labels"][:, :-1]  # transformers shifts the labels itself
        device = next(self.model.parameters()).device
        out = self.model(input_ids=ids.to(device), labels=labels.to(device),
                         mm_token_type_ids=((ids == self.model.config.video_token_id).int() * 2).to(device),
                         pixel_values_videos=sample["pixel_values_videos"].to(device),
                         video_grid_thw=sample["video_grid_thw"].to(device),
                         second_per_grid_ts=torch.tensor([1.0], device=device))
        return out.loss


def train(run: str, args, device: torch.device) -> List[Dict[str, float]]:
    """Loss and gradient norm of every step of one run."""
    ds, _ = measurement_config(args.config)
    ds["optimizer"]["params"]["lr"] = args.lr
    sp = args.world if run in SP_RUNS else 1
    group = sp_group(sp)  # comm.SELF at 1
    torch.manual_seed(args.seed)  # the same initial weights in every run
    if run in TRANSFORMERS_ATTN:
        model, zero3_handle = build_model(args.shape, model_dtype(ds), device, TRANSFORMERS_ATTN[run], ds)
        module = TransformersLoss(model)
    else:
        module, zero3_handle = build_video_qa(args.shape, ds, device, SpavaConfig(mode=run), group)
        model = module.model
    engine = start_deepspeed(module, ds, zero3_handle)
    del zero3_handle
    module.train()
    curve = []
    for step in range(args.steps):
        sample = synthetic_sample(model, args.tokens, tuple(args.grid), seed=args.seed + step % 4, device=device,
                                  dtype=model_dtype(ds))
        loss = sequence_loss(train_step(engine, sample, sp), group)
        curve.append({"run": run, "world": sp, "step": step + 1, "loss": loss.item(),
                      "grad_norm": float(engine.get_global_grad_norm())})
    engine.destroy()
    del engine, module, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return curve


def train_in_child(run: str, argv, world: int) -> List[Dict[str, float]]:
    """``train(run)`` in a child process of this script, or in ``world`` of them started by torch.distributed.run;
    rank 0's curve comes back through a JSON file."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "curve.json")
        argv = list(sys.argv[1:] if argv is None else argv)
        script = [os.path.abspath(__file__), *argv, "--only-run", run, "--curve-out", path]
        env = dict(os.environ)
        env.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast on the lent machines (GPU.md)
        if world > 1:  # the launcher sets every rank's RANK, LOCAL_RANK, WORLD_SIZE and rendezvous
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
        else:
            command = [sys.executable]
            with socket.socket() as s:  # the child's own rendezvous: this process may hold a group already
                s.bind(("127.0.0.1", 0))
                env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_PORT=str(s.getsockname()[1]))
        subprocess.run(command + script, env=env, check=True)
        with open(path, encoding="utf-8") as f:
            return json.load(f)


def train_here(args, cuda: bool) -> Dict[str, List[Dict[str, float]]]:
    """The curves of ``--only-run`` (or of every run) in this process, a rank of the group it joins or makes."""
    import deepspeed
    import deepspeed.ops

    if not cuda:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    created = not dist.is_initialized()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    curves = {run: train(run, args, device) for run in ([args.only_run] if args.only_run else RUNS)}
    if created:
        dist.destroy_process_group()
    return curves


def largest_difference(curve, reference, key: str) -> float:
    return max(abs(a[key] - b[key]) / max(abs(b[key]), 1e-12) for a, b in zip(curve, reference))


def report(curves: Dict[str, list], floor: float) -> bool:
    """The table of every step, the largest differences and the verdict."""
    print("| step | " + " | ".join(f"{r} loss | {r} grad norm" for r in curves) + " |")
    print("|---|" + "---|---|" * len(curves))
    for i in range(len(curves["transformers"])):
        print(f"| {i + 1} | " + " | ".join(f"{c[i]['loss']:.5f} | {c[i]['grad_norm']:.4f}" for c in curves.values())
              + " |")
    reference = curves["transformers"]
    noise = max(largest_difference(curves["eager"], reference, k) for k in ("loss", "grad_norm"))
    tolerance = max(floor, 3 * noise)
    ok = True
    for run in SP_RUNS:
        worst = {k: largest_difference(curves[run], reference, k) for k in ("loss", "grad_norm")}
        ok &= all(v <= tolerance for v in worst.values())
        print(f"{run} at W = {curves[run][0]['world']}: largest relative difference from transformers on one device: "
              f"loss {worst['loss']:.2e}, gradient norm {worst['grad_norm']:.2e} (tolerance {tolerance:.2e}: eager's "
              f"{noise:.2e} x 3, at least {floor:g})")
    print("PASS" if ok else "FAIL")
    return ok


def main(argv=None) -> int:
    args = parse_args(argv)
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29517")):
        os.environ.setdefault(key, value)
    cuda = torch.cuda.is_available()
    if args.only_run or not (cuda or args.world > 1):
        curves = train_here(args, cuda)
    else:  # fresh processes per run: a destroyed ZeRO-3 engine keeps part of its GPU memory
        curves = {run: train_in_child(run, argv, args.world if run in SP_RUNS else 1) for run in RUNS}
    if args.only_run:
        if os.environ["RANK"] == "0":
            with open(args.curve_out, "w", encoding="utf-8") as f:
                json.dump(curves[args.only_run], f)
        return 0
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(dict(e, shape=args.shape, tokens=args.tokens)) + "\n"
                         for c in curves.values() for e in c)
    return 0 if report(curves, args.floor) else 1


if __name__ == "__main__":
    sys.exit(main())
