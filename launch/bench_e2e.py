"""End-to-end time to first token of a long-video question: Spava and the baselines on W GPUs against dense on one.

For Qwen2.5-VL-3B- and 7B-shaped models with random bf16 weights, at 360p and 720p, with frame counts giving about
16K, 32K, 64K and 128K context tokens, one command measures in the same run, on the same cards:

* time to first token (TTFT) = vision encoder + language-model prefill + first token (lm_head, argmax, broadcast),
  median of ``--iters`` runs after ``--warmup`` runs; every run starts after a barrier and ends with a CUDA
  synchronise, and a multi-GPU run counts as long as its slowest rank;
* the language-model prefill alone (the decoder forward, timed with CUDA events inside the same runs), so that no
  speedup in the table comes from the vision side;
* peak GPU memory per rank (``max_memory_allocated``; the weights included);
* for ``--breakdown-methods`` (default: spava) one extra instrumented run that splits the time into vision encoder,
  vision all-gather, embedding, linear layers, the rest of the language model (norms, RoPE, activations),
  attention kernels and merges, passing-block selection, exposed communication and the first token;
* a first-token check: the largest difference of the first token's logits against dense, relative to the largest
  dense logit (exact methods should show bf16 noise only).

Methods (``--methods``; all by default):

====================  ==================================================================================================
``dense``             one GPU (rank 0 alone): the whole video through the vision tower, the language model with SDPA's
                      default backend (cuDNN on H100, the fastest measured; ``dense_flash_attn`` is added when
                      flash-attn imports)
``ring`` ...          ``ring``, ``ulysses``, ``star``, ``apb``, ``spava``: the modes of ``SpavaConfig`` on all GPUs of
                      the job, frame-parallel vision (each GPU encodes about 1/W of the frames)
``torch_cp``          PyTorch's own context parallelism (``torch.distributed.tensor.experimental.context_parallel``,
                      exact ring attention with head-tail load balancing) on every attention layer of the language
                      model (whole-LM integration: the full sequence's embeddings and M-RoPE positions are the CP
                      buffers; SDPA inside is routed to PyTorch's ring); vision is the same frame-parallel encoder
``spava_no_overlap``  ablation: ``SpavaConfig(overlap=False)``, every collective waited on at once
``apb``               is also the "no zigzag" ablation (contiguous blocks, one per rank, twice the passing budget)
``spava_no_fused``    ablation, emulated with the public session API: a Spava prefill of the context with a one-token
                      dummy query (the scorer's query), then a second distributed forward of the real query over the
                      sharded KV cache (exact LSE-merged attention, as Star/APB's separate query pass). Speed only: the
                      query tokens see each other without a causal mask in that pass (same work)
``spava_no_fp``       ablation: no frame parallelism, every rank encodes the whole video
``spava_2d``          (not in the default sweep) the two-dimensional mode: Ulysses inside groups of
``ring_2d``           ``--ulysses-degree`` consecutive GPUs, Spava (ring: exact) over the W / U groups (docs/scaling.md)
====================  ==================================================================================================

Inputs are synthetic: random pixel values of the right grid (no video decoding; the GPU image has no PyAV), the
prompt, grid and positions of the model's family (``spava_ds.models``: its chat template, with the tiny tokenizer of
the family) for a made-up 2 fps video. Qwen frames are resized by Qwen's rule (sides rounded to multiples of 28, 32
for Qwen3-VL; ``--max-pixels`` 0 keeps the native resolution: 640x360 -> 644x364, 1280x720 -> 1288x728); one
temporal step (2 frames) gives (H/28)*(W/28) tokens for Qwen2.5-VL (299 at 360p, 1196 at 720p); InternVL takes one
448x448 tile per frame (256 tokens). The step count is the largest giving at most the target context. Models:
``--models 3b 7b internvl3-2b qwen3-vl-8b`` (random bf16 weights, built on the meta device); ``--share-of W ...``
in one process adds one rank's share of each W, the other ranks stood in for (see ``measure_shares``). The query is padded with newline tokens to a
multiple of 2W tokens (PyTorch's head-tail load balancing needs it). Preprocessing (tokenising, positions, pixels
on the GPU) is outside the timed region for every method.

Run under torchrun, one process per GPU (dense runs on rank 0 while the other ranks wait):

    # 2 GPUs / 4 GPUs: the whole sweep (7B first, 360p first, 128K first); rerun the same command until it prints
    # "all measurements done" (--out gets every measurement as it ends; a rerun skips what is there)
    torchrun --standalone --nproc_per_node 2 launch/bench_e2e.py --out .bench/e2e_2gpu.json --time-budget 420
    torchrun --standalone --nproc_per_node 4 launch/bench_e2e.py --out .bench/e2e_4gpu.json --time-budget 420

    # the plot (CPU, needs matplotlib) and the tables again from one or more result files
    python launch/bench_e2e.py --plot .bench/e2e_2gpu.json .bench/e2e_4gpu.json --plot-out docs/bench_e2e.png

    # CPU smoke test of every code path: the embedded tiny checkpoint, tiny synthetic inputs, gloo
    torchrun --standalone --nproc_per_node 2 launch/bench_e2e.py --tiny --out /tmp/bench_e2e_tiny.json

On the lent GPU machines (10 minutes a command, each machine starts bare) keep --out in a folder that
``.git/info/exclude`` ignores, carry it, and copy it to $OUT at the end of every command; put the returned files
back into that folder before the next call (see docs/benchmarks.md, "End-to-end benchmark: how to run").

An out-of-memory error in dense (one GPU) skips that measurement with a message. One in a multi-GPU method cannot
be recovered (the other ranks wait in a collective): the process exits, torchrun stops the job, and the
measurement stays marked "running" in --out; the next run retries it once (the job may have been stopped by a time
limit) and after a second failure marks it "crashed" and goes on. ``--max-context`` caps the contexts;
``--time-budget`` starts no measurement once that many seconds have passed, or when the slowest run seen so far
times (warm-ups + iterations + 1) would overrun it.
"""

from __future__ import annotations

import argparse
import os
import sys

from spava_ds import entry
from spava_ds.benchmarks.e2e import ALL_METHODS, GRAPH_SETTINGS, SHARE_METHODS, parse_context
from spava_ds.benchmarks.e2e_report import plot
from spava_ds.benchmarks.e2e_sweep import bench


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None,
                   help="3b, 7b, internvl3-2b, qwen3-vl-8b; on the CPU tiny, tiny-qwen3-vl, tiny-internvl "
                        "(default: 7b 3b; --tiny: tiny)")
    p.add_argument("--resolutions", nargs="+", default=None,
                   help="360p, 720p, 1080p or WxH (default: 360p 720p; --tiny: 112x112)")
    p.add_argument("--contexts", nargs="+", default=None,
                   help="target context tokens, e.g. 128K 64K 32K 16K (the default, in this order); --tiny: 320")
    p.add_argument("--max-context", type=parse_context, default=None, help="skip targets above this")
    p.add_argument("--methods", nargs="+", default=None, help=f"default: {' '.join(ALL_METHODS)} "
                   "(+ dense_flash_attn when flash-attn imports)")
    p.add_argument("--breakdown-methods", nargs="*", default=["spava"],
                   help="methods that get one extra instrumented run for the time breakdown (default: spava)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default="bench_e2e.json", help="results JSON; an existing file is resumed")
    p.add_argument("--fresh", action="store_true", help="ignore an existing --out (overwrite it)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds: start no measurement after this (leave ~90 s for the last one and the exit)")
    p.add_argument("--max-pixels", type=int, default=0, help="per-frame pixel cap of the resize (0: native)")
    p.add_argument("--min-pixels", type=int, default=4 * 28 * 28)
    p.add_argument("--passing-len", type=int, default=None,
                   help="override Spava's passing budget per block (apb gets twice it); default: the paper's rule "
                        "(--tiny: 16, so that the tiny blocks are really cut)")
    p.add_argument("--cp-backend", choices=["cudnn", "flash", "efficient", "auto"], default="cudnn",
                   help="SDPA backend inside PyTorch's CP ring (default cudnn; falls back to flash, efficient)")
    p.add_argument("--cp-gqa", choices=["repeat", "native"], default="repeat",
                   help="torch_cp: repeat KV heads (default) or pass enable_gqa=True")
    p.add_argument("--ulysses-degree", type=int, default=2,
                   help="GPUs per Ulysses group of the 2-D methods (spava_2d, ring_2d; ask for them in --methods)")
    p.add_argument("--cuda-graphs", choices=list(GRAPH_SETTINGS), default="auto",
                   help="SpavaConfig.cuda_graphs of every method (default auto; the breakdown run is always eager; "
                        "give another --out for each setting)")
    p.add_argument("--trace", default=None, help="folder: a Chrome trace of every breakdown run (torch.profiler)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: the embedded tiny checkpoint, tiny inputs")
    p.add_argument("--share-of", type=int, nargs="+", default=None, metavar="W",
                   help="one process only: also time one rank's share of each W (the other ranks stood in for by "
                        "PyTorch's fake process group, every collective returning at once, as launch/bench_host.py)"
                        f" for the methods of {SHARE_METHODS} in --methods")
    p.add_argument("--share-rank", type=int, default=1, help="the rank --share-of stands for (1: both blocks)")
    p.add_argument("--plot", nargs="+", default=None, metavar="JSON", help="only plot and tabulate result files")
    p.add_argument("--plot-out", default=None, help="PNG path for --plot (default: the first JSON with .png)")
    p.add_argument("--inject-oom", default=None, help=argparse.SUPPRESS)  # "METHOD@TARGET": test the skip path
    entry.add_arguments(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.plot:
        return plot(args.plot, args.plot_out or os.path.splitext(args.plot[0])[0] + ".png")
    return entry.run_main(bench, args)


if __name__ == "__main__":
    sys.exit(main())
