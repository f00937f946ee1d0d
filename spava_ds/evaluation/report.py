"""Summaries of the evaluations' JSON-lines records (plain or ``.jsonl.gz``): markdown tables and accuracy plots."""

from __future__ import annotations

from typing import Dict, List, Optional

from ..benchmarks.records import read_jsonls
from ..tasks import TASKS
from .methods import METHODS


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


def summarize_niah(paths: List[str], table: Optional[str], plot: Optional[str]) -> str:
    """A markdown table (method x W x length; real and simulated world sizes apart) and optionally a PNG of accuracy
    against length, one panel per world size."""
    rows: Dict[tuple, List[dict]] = {}
    for r in read_jsonls(paths):
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
    return _write_summary(lines, rows, "context tokens", table, plot)


def _pct(values) -> str:
    values = list(values)
    return f"{100 * sum(values) / len(values):.1f}" if values else "-"


def summarize_videoqa(paths: List[str], table: Optional[str] = None, plot: Optional[str] = None) -> str:
    """A markdown table (method x W x frames: accuracy overall and per task, same answer as dense, KL) and
    optionally a PNG of accuracy against frames per method, one panel per world size."""
    rows: Dict[tuple, List[dict]] = {}
    for r in read_jsonls(paths):
        rows.setdefault((r["method"], r["world_size"], r["simulated"], r["frames"]), []).append(r)
    order = {m: i for i, m in enumerate(METHODS)}
    tasks = [t for t in TASKS if any(r.get("task") == t for rs in rows.values() for r in rs)]
    lines = ["| method | W | frames | context tokens | cases | accuracy % | "
             + "".join(f"{t} % | " for t in tasks) + "same answer as dense % | mean KL first token |",
             "|---|---|---|---|---|---|" + "---|" * len(tasks) + "---|---|"]
    for (method, w, sim, frames), rs in sorted(rows.items(),
                                               key=lambda kv: (kv[0][1], kv[0][2], kv[0][3], order.get(kv[0][0], 99))):
        ctx = round(sum(r["context_tokens"] for r in rs) / len(rs))
        per_task = "".join(f"{_pct(r['correct'] for r in rs if r.get('task') == t)} | " for t in tasks)
        kls = [r["kl_first_token"] for r in rs if "kl_first_token" in r]
        lines.append(f"| {method} | {w}{' (sim.)' if sim else ''} | {frames} | {ctx} | {len(rs)} | "
                     f"{_pct(r['correct'] for r in rs)} | {per_task}"
                     f"{_pct(r['same_as_dense'] for r in rs if 'same_as_dense' in r)} | "
                     f"{f'{sum(kls) / len(kls):.2e}' if kls else '-'} |")
    return _write_summary(lines, rows, "video frames (2 fps)", table, plot)


def _write_summary(lines: List[str], rows: Dict[tuple, List[dict]], xlabel: str, table: Optional[str],
                   plot: Optional[str]) -> str:
    """The table's text, written to ``table`` and drawn to ``plot`` when given."""
    text = "\n".join(lines)
    if table:
        with open(table, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    if plot:
        _plot(rows, xlabel, plot)
    return text


def _plot(rows: Dict[tuple, List[dict]], xlabel: str, path: str) -> None:
    """``plot_accuracy`` of summary rows keyed (method, W, simulated, length): one panel per world size, accuracy
    against the length (context tokens or frames) per method."""
    panels: Dict[str, Dict[str, list]] = {}
    for (method, w, sim, length), rs in rows.items():
        panels.setdefault(f"W = {w}{' (simulated)' if sim else ''}", {}).setdefault(method, []).append(
            (length, 100 * sum(r["correct"] for r in rs) / len(rs)))
    plot_accuracy(panels, xlabel, path)
