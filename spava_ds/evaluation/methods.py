"""What the evaluations share: the engines of each attention method over one copy of the weights (dense on rank 0
alone, the others over the job's ranks or simulated at several W in one process), one answer of each, the fields
that compare an answer with dense's, and the options of the methods."""

from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .. import SpavaConfig, comm, entry
from ..engine import GenerationConfig, SpavaEngine

METHODS = ("dense", "spava", "star", "apb", "ring")


def method_config(method: str, args) -> SpavaConfig:
    overrides = {k: v for k, v in (("anchor_len", args.anchor_len), ("passing_len", args.passing_len),
                                   ("pool_kernel", args.pool_kernel)) if v is not None and method in ("spava", "apb")}
    return SpavaConfig(mode=method, **overrides)


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> float:
    """KL(p || q) of the softmax distributions (p = dense)."""
    logp, logq = torch.log_softmax(logits_p.double(), -1), torch.log_softmax(logits_q.double(), -1)
    return float((logp.exp() * (logp - logq)).sum())


def against_dense(answer, dense) -> dict:
    """The fields that compare a generated answer with dense's: same tokens, first-token KL (none without dense)."""
    if dense is None:
        return {}
    return dict(same_as_dense=answer.tokens == dense.tokens,
                kl_first_token=kl_divergence(dense.first_logits, answer.first_logits))


def method_engines(base: SpavaEngine, args, rank: int, world: int, worlds: List[int],
                   settings: Optional[dict] = None) -> Dict[tuple, SpavaEngine]:
    """(method, W) -> engine over ``base``'s weights. Dense (key W = None) runs on rank 0 alone; with
    ``args.simulate`` every other method is simulated at each of ``worlds`` in one process (ring is skipped there:
    exact by construction, real processes check it against dense); otherwise the methods run over the job's ranks."""
    engines: Dict[tuple, SpavaEngine] = {}
    for method in args.methods:
        if method == "dense":
            if rank == 0:
                engines[method, None] = base
        elif args.simulate:
            if method != "ring":
                for w in worlds:
                    engines[method, w] = SpavaEngine(base.model, base.tokenizer, method_config(method, args),
                                                     comm.SELF, settings, simulate_world=w)
        else:
            engines[method, world] = SpavaEngine(base.model, base.tokenizer, method_config(method, args), None,
                                                 settings)
    return engines


def run_methods(engines: Dict[tuple, SpavaEngine], inputs: dict, gen: GenerationConfig, world: int):
    """Every engine's answer to one input and its wall time; barriers keep the ranks together around rank 0's
    dense run."""
    results, seconds = {}, {}
    for key, engine in engines.items():
        if key[0] != "dense" and world > 1:
            dist.barrier()  # rank 0 may still be in the dense run
        tic = time.perf_counter()
        results[key] = engine.generate(inputs, gen)
        seconds[key] = time.perf_counter() - tic
    if world > 1:
        dist.barrier()
    return results, seconds



def start_run(args) -> Tuple[int, int]:
    """Start an evaluation: (rank, world) of the job; ``--simulate`` needs one process."""
    rank, world = entry.init_distributed(args)
    if args.simulate and world > 1:
        raise ValueError("--simulate runs in one process (python, not torchrun)")
    if rank == 0 and not args.out:
        print("no --out: the answers are not kept and no accuracy table is printed (--out FILE.jsonl keeps them)")
    return rank, world


def finish_run(rank: int, world: int, progress, out, message: str,
               summary: Optional[Callable[[], str]] = None) -> None:
    """End an evaluation: rank 0 closes its progress bar and results file, prints ``message`` and then
    ``summary()`` (the accuracy table of the results file); every rank leaves the process group together."""
    if rank == 0:
        progress.close()
        if out:
            out.close()
        print(message)
        if summary is not None:
            print(summary())
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()



def _budget(text: str):
    """``--passing-len``: an int, or a comma-separated per-layer list of ints."""
    values = [int(v) for v in text.split(",") if v.strip()]
    return values if "," in text else values[0]


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Options of both evaluations (launch/eval_niah.py, launch/eval_videoqa.py): budget overrides, precision,
    output and summaries."""
    p.add_argument("--anchor-len", type=int, help="Spava's/APB's anchor length (default: the paper's rule)")
    p.add_argument("--passing-len", type=_budget,
                   help="Spava's/APB's passing budget: tokens per block, or one per layer, comma-separated "
                        "(default: the paper's rule)")
    p.add_argument("--pool-kernel", type=int, help="Spava's/APB's score pooling width (odd; 1 = none)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype (CPU and GPU)")
    p.add_argument("--out", help="results .jsonl (rank 0 writes it)")
    p.add_argument("--summarize", nargs="+", help="summarize results .jsonl files instead of evaluating")
    p.add_argument("--table", help="with --summarize: write the markdown table here")
    p.add_argument("--plot", help="with --summarize: write a PNG plot of accuracy against length here")
    entry.add_arguments(p)
