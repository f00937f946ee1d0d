"""The end-to-end benchmark's report (``launch/bench_e2e.py --plot``): markdown tables of a results file (per model,
resolution and job size: every method at every context, speedups against the fastest dense row, then the time
breakdown) and the plot of speedups against dense over the context."""

from __future__ import annotations

import json
import math
from typing import Dict, List

from .e2e import ALL_METHODS, context_label
from .shapes import SHAPE_LABELS

LABELS = {
    "dense": "dense, 1 GPU (SDPA)", "dense_flash_attn": "dense, 1 GPU (flash-attn)", "spava": "spava",
    "ring": "ring (ours, exact)", "torch_cp": "PyTorch context_parallel (exact ring)", "apb": "apb (= spava -zigzag)",
    "ulysses": "ulysses (exact)", "star": "star", "spava_no_overlap": "spava -overlap",
    "spava_no_fused": "spava -fused query pass (emulated)", "spava_no_fp": "spava -frame parallelism",
    "spava_2d": "spava x ulysses (2-D)", "ring_2d": "ring x ulysses (2-D, exact)",
}
BREAKDOWN_KEYS = [
    ("vision", "vision encoder"), ("vision_gather", "vision all-gather"), ("embed", "embedding + scatter"),
    ("linear", "linear layers"), ("lm_other", "other LM ops (norms, RoPE, act.)"),
    ("attn_kernels", "attention kernels + merges"), ("selection", "selection"),
    ("communication", "communication (exposed)"), ("head", "first token"), ("gaps", "unattributed"),
]


def method_label(r: dict) -> str:
    """A results row's method as the tables say it (a ``--share-of`` row: one rank of W, alone)."""
    method = r["method"].split("@")[0]
    label = LABELS.get(method, method)
    if "share_of" in r:
        label += f", rank {r.get('share_rank', 1)} of {r['share_of']} alone (no communication)"
    return label


def fmt(x, spec=".3f", none="-"):
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def tables(data: dict) -> str:
    """Markdown: per model/resolution, the methods at every context; then Spava's breakdown."""
    results = [r for r in data["results"] if "case" in r]
    lines = []
    metas = data.get("runs") or [data.get("meta", {})]
    m = metas[-1]
    groups = []
    for r in results:
        g = (r["model"], r["resolution"], r.get("gpus_job"))
        if g not in groups:
            groups.append(g)
    for model, res, gpus in groups:
        rows = [r for r in results if (r["model"], r["resolution"], r.get("gpus_job")) == (model, res, gpus)]
        size = rows[0].get("size")
        lines.append(f"\n### {SHAPE_LABELS.get(model, model)} shape, {res} ({size[0]}x{size[1]} after resize), "
                     f"{gpus} GPU(s) in "
                     f"the job; {m.get('card', '?')}; {m.get('date', '')}")
        lines.append("TTFT = vision + LM prefill + first token, median of the runs; speedups against the fastest "
                     "dense row at the same context; memory = peak per rank (weights included), max over ranks.")
        lines.append("")
        lines.append("| context | frames | method | GPUs | TTFT (s) | speedup | vision (s) | LM prefill (s) | "
                     "LM speedup | peak mem (GiB) | first-token logits vs dense (rel.) |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        targets = sorted({r["target"] for r in rows})
        for target in targets:
            at = [r for r in rows if r["target"] == target]
            dense = [r for r in at if r["method"].startswith("dense") and r.get("status") == "ok"]
            d_ttft = min((r["ttft"] for r in dense), default=None)
            d_lm = min((r["lm"] for r in dense), default=None)
            order = {name: i for i, name in enumerate(["dense", "dense_flash_attn"] + ALL_METHODS)}
            if all(r.get("status") == "skipped" for r in at):  # one line for a target skipped as a whole
                lines.append(f"| ~{context_label(target)} | | all methods | | skipped: {at[0].get('message', '')} "
                             "| | | | | | |")
                continue
            for r in sorted(at, key=lambda r: (r.get("share_of", 0), order.get(r["method"].split("@")[0], 99))):
                label = method_label(r)
                ctx = f"{r.get('context_tokens', '?')} (~{context_label(target)})"
                if r.get("status") != "ok":
                    lines.append(f"| {ctx} | {r.get('frames', '')} | {label} | {r.get('gpus', '')} | "
                                 f"{r.get('status')}: {r.get('message', '')} | | | | | | |")
                    continue
                sp = f"{d_ttft / r['ttft']:.2f}x" if d_ttft else "-"
                lsp = f"{d_lm / r['lm']:.2f}x" if d_lm else "-"
                mem = max(r["peak_mem_gib"]) if r.get("peak_mem_gib") else float("nan")
                check = "-"
                if "logit_rel_diff" in r:
                    check = f"{r['logit_rel_diff']:.1e}" + ("" if r.get("same_first_token") else " (other token)")
                lines.append(f"| {ctx} | {r['frames']} | {label} | {r['gpus']} | {r['ttft']:.3f} | {sp} | "
                             f"{r['vision']:.3f} | {r['lm']:.3f} | {lsp} | {fmt(mem, '.1f')} | {check} |")
        bds = [r for r in rows if r.get("breakdown_per_rank") and r.get("status") == "ok"]
        if bds:
            lines.append("")
            lines.append("Breakdown of one instrumented run (seconds on the default stream of the slowest rank, "
                         "CUDA events; communication = time the GPU waited for a collective):")
            lines.append("")
            lines.append("| context | method | " + " | ".join(lbl for _, lbl in BREAKDOWN_KEYS) + " | total |")
            lines.append("|---|---|" + "---|" * (len(BREAKDOWN_KEYS) + 1))
            for r in sorted(bds, key=lambda r: (r["target"], r["method"])):
                slow = max(r["breakdown_per_rank"], key=lambda b: b["total"])
                cells = " | ".join(f"{slow.get(k, 0.0):.3f}" for k, _ in BREAKDOWN_KEYS)
                lines.append(f"| ~{context_label(r['target'])} | {LABELS.get(r['method'], r['method'])} | {cells} | "
                             f"{slow['total']:.3f} |")
    return "\n".join(lines)



def plot(paths: List[str], out: str) -> int:
    datas = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            datas.append(json.load(f))
    for d in datas:
        print(tables(d))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not importable here: install it (pip install matplotlib) and rerun --plot; "
              f"no PNG written ({out})")
        return 0
    # one row of panels per (model, resolution, GPUs in the job, card): ratios only within one run on one card
    series: Dict[tuple, Dict[str, list]] = {}
    for d in datas:
        card = d.get("meta", {}).get("card", "")
        results = [r for r in d["results"] if r.get("status") == "ok"]
        for r in results:
            if r["method"].startswith("dense"):
                continue
            dense = [x for x in results if x["case"] == r["case"] and x["method"].startswith("dense")
                     and x.get("gpus_job") == r.get("gpus_job")]
            if not dense:
                continue
            panel = (r["model"], r["resolution"], r["gpus"], card)
            s = series.setdefault(panel, {}).setdefault(r["method"], [])
            s.append((r["context_tokens"], min(x["ttft"] for x in dense) / r["ttft"],
                      min(x["lm"] for x in dense) / r["lm"]))
    if not series:
        print("nothing to plot (no method with a dense baseline at the same context)")
        return 0
    panels = sorted(series)
    methods = sorted({m for panel in panels for m in series[panel]})
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}  # one colour per method everywhere
    fig, axes = plt.subplots(len(panels), 2, figsize=(13, 4.2 * len(panels)), squeeze=False)
    for row, panel in enumerate(panels):
        model, resolution, gpus, card = panel
        for col, (idx, what) in enumerate(((1, "time to first token"), (2, "LM prefill only"))):
            ax = axes[row][col]
            for method, pts in sorted(series[panel].items()):
                pts = sorted(pts)
                full = method in ("spava", "ring", "ulysses", "star", "apb", "torch_cp")
                ax.plot([p[0] for p in pts], [p[idx] for p in pts], "-o" if full else "--.",
                        lw=2.5 if method == "spava" else 1.2, color=colours[method],
                        label=LABELS.get(method, method))
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xscale("log", base=2)
            ticks = sorted({p[0] for pts in series[panel].values() for p in pts})
            ax.set_xticks(ticks, [f"{t / 1024:.0f}K" if t >= 1024 else str(t) for t in ticks])
            ax.minorticks_off()
            ax.set_xlabel("context tokens")
            ax.set_ylabel("speedup vs dense on 1 GPU")
            ax.set_title(f"{model} shape, {resolution}, {gpus} GPUs ({card}): {what}", fontsize=10)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("bench_e2e: speedup against dense attention on one GPU of the same machine")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (4.2 * len(panels))))  # room for the suptitle
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0

