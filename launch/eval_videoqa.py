"""Accuracy of a Qwen2.5-VL checkpoint on the synthetic video tasks of ``spava_ds.tasks`` against the video length, per
attention method (dense, ring, spava, star, apb) and world size.

Give one held-out jsonl per length (``python -m spava_ds.tasks --out data/test128 --train 0 --test 60 --frames 128``).
Every record is decoded greedily by ``SpavaEngine`` once per method; exact match as in training
(``spava_ds.training.exact_match``). Beside accuracy, per method: whether the generated tokens equal dense's and the
KL divergence of the first token's distribution from dense's. No frame is dropped: ``--max-frames`` defaults to the
longest video of the test files.

World sizes: real processes (torchrun, gloo on CPU or NCCL on GPUs; dense runs on rank 0 alone) or W ranks simulated
in one process through ``reference_attention`` (``--simulate 8``; ring is exact by construction and is skipped there,
real processes check it against dense).

    torchrun --standalone --nproc_per_node 2 launch/eval_videoqa.py --model runs/small/model \\
        --tests data/test16/test.jsonl data/test32/test.jsonl data/test64/test.jsonl data/test128/test.jsonl \\
        --out runs/videoqa/w2.jsonl
    torchrun --standalone --nproc_per_node 4 launch/eval_videoqa.py ... --out runs/videoqa/w4.jsonl
    python launch/eval_videoqa.py --simulate 8 ... --out runs/videoqa/w8sim.jsonl
    python launch/eval_videoqa.py --summarize runs/videoqa/w*.jsonl --table runs/videoqa/table.md \\
        --plot runs/videoqa/accuracy.png

One jsonl record per (case, method): ``id, task, frames, context_tokens, world_size, simulated, method, expected``
(the true answer), ``answer`` (the model's), ``correct``, and with dense in the same run ``same_as_dense`` and
``kl_first_token``.
"""

from __future__ import annotations

import argparse
import sys

from spava_ds import entry
from spava_ds.evaluation.methods import METHODS, add_common_args
from spava_ds.evaluation.report import summarize_videoqa
from spava_ds.evaluation.videoqa import evaluate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="trained Qwen2.5-VL checkpoint (e.g. runs/<name>/model)")
    p.add_argument("--tests", nargs="+", help="held-out jsonl files of spava_ds.tasks, e.g. one per frame count")
    p.add_argument("--limit", type=int, help="the first N records of each test file")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--simulate", type=int, help="simulate this many ranks in one process (reference_attention)")
    p.add_argument("--fps", type=float, help="sampling rate (default: the checkpoint's)")
    p.add_argument("--max-frames", "--max_frames", type=int,
                   help="frame cap (default: the longest test video, nothing dropped)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    add_common_args(p)
    args = p.parse_args(argv)
    if args.summarize:
        print(summarize_videoqa(args.summarize, args.table, args.plot))
        return 0
    if not args.model or not args.tests:
        p.error("--model and --tests are required (or --summarize)")
    return entry.run_main(evaluate, args)


if __name__ == "__main__":
    sys.exit(main())
