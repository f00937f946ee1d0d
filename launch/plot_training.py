"""Training curve of launch/finetune.py runs: loss per step (smoothed) and held-out accuracy per evaluation.

    python launch/plot_training.py runs/a/metrics.jsonl [runs/b/metrics.jsonl ...] --out docs/finetune_curve.png

Several metrics files are drawn one after another on one step axis (a run continued from an earlier run's exported
model starts where the earlier one stopped), so a curve can span restarts.
"""

from __future__ import annotations

import argparse
import json
import sys


def load(paths):
    """(step, loss) and (step, accuracy, per-task) rows of every file, steps offset so that later files continue."""
    losses, evals, offset = [], [], 0
    for path in paths:
        last = 0
        with open(path, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                if "loss" in r:
                    losses.append((offset + r["step"], r["loss"]))
                if "eval_accuracy" in r:
                    evals.append((offset + r["step"], r["eval_accuracy"], r.get("eval_per_task", {})))
                last = max(last, r["step"])
        offset += last
    return losses, evals


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", nargs="+", help="metrics.jsonl files of launch/finetune.py, in training order")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--smooth", type=int, default=50, help="moving-average window over steps for the loss")
    args = p.parse_args(argv)
    losses, evals = load(args.metrics)
    import matplotlib  # lazy: only this script needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    steps = [s for s, _ in losses]
    values = [v for _, v in losses]
    k = max(1, args.smooth)
    smooth = [sum(values[max(0, i - k + 1):i + 1]) / len(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]
    ax1.plot(steps, values, color="0.8", lw=0.6, label="per step")
    ax1.plot(steps, smooth, color="C0", lw=1.8, label=f"mean of {k} steps")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("answer-token loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    if evals:
        ax2.plot([e[0] for e in evals], [100 * e[1] for e in evals], "-o", color="black", lw=2, label="all tasks")
        for task in sorted({t for e in evals for t in e[2]}):
            ax2.plot([e[0] for e in evals], [100 * e[2].get(task, float("nan")) for e in evals], "--.", label=task)
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("held-out exact match (%)")
    ax2.set_ylim(0, 102)
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    for step, acc, per_task in evals:
        print(f"step {step}: accuracy {100 * acc:.1f} % " + " ".join(f"{t} {100 * a:.1f}" for t, a in per_task.items()))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
