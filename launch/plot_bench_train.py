"""Step time and peak memory per rank against sample length, per mode, from launch/bench_train.py's JSON lines.

    python launch/plot_bench_train.py runs/train.jsonl [more.jsonl ...] --out docs/bench_train.png

One row of two panels per (card, model, ranks): seconds per optimizer step and peak GiB per rank, both against the
sample's tokens (log scales), one line per mode ("mode +offload" when the checkpoints went to CPU memory: another
memory curve); frontier probes add their memory points, their one step's time where the mode has no timed rows
(dashed), and a dotted line marks the first length that did not fit. Ratios are only read within one panel.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Tuple

Series = Dict[str, List[Tuple[int, float]]]


def load_series(paths: List[str]) -> Dict[tuple, dict]:
    """``{(card, model, ranks): {"time": {series: [(tokens, s)]}, "frontier_time": {...}, "memory": {series:
    [(tokens, GiB)]}, "oom": {series: tokens}}}`` (``series_name``), points sorted by tokens; the last line of a key
    in the files wins."""
    rows = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            rows.update({r["key"]: r for r in map(json.loads, filter(str.strip, f))})
    panels: Dict[tuple, dict] = {}
    for r in rows.values():
        ranks = f"1 of {r['world']} (fake)" if r["one_rank"] else f"{r['world']} GPUs"
        panel = panels.setdefault((r["card"], r["source"], ranks),
                                  {"time": {}, "frontier_time": {}, "memory": {}, "oom": {}})
        series = series_name(r)
        if r["status"] == "oom":
            first = panel["oom"].get(series)
            panel["oom"][series] = r["tokens"] if first is None else min(first, r["tokens"])
        elif r["status"] == "ok":
            if "step_s" in r:
                panel["frontier_time" if r["frontier"] else "time"].setdefault(series, []).append(
                    (r["tokens"], r["step_s"]))
            panel["memory"].setdefault(series, []).append((r["tokens"], r["peak_gib"]))
    for panel in panels.values():
        for kind in ("time", "frontier_time", "memory"):
            for mode, points in panel[kind].items():
                panel[kind][mode] = sorted(dict(points).items())
    return panels


def series_name(row: dict) -> str:
    """The line a result belongs to: its mode, "+offload" when its checkpoints were kept in CPU memory."""
    return row["mode"] + (" +offload" if (row.get("options") or {}).get("offload_checkpoints") else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="JSON lines of launch/bench_train.py")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    panels = load_series(args.results)
    if not panels:
        p.error("no measurements in the files")
    import matplotlib  # lazy: only this script needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.6 * len(panels)), squeeze=False)
    for (ax_time, ax_mem), ((card, model, ranks), panel) in zip(axes, sorted(panels.items())):
        for i, mode in enumerate(sorted(set(panel["time"]) | set(panel["memory"]) | set(panel["oom"]))):
            color = f"C{i}"
            timed = panel["time"].get(mode, [])
            if timed:
                ax_time.plot(*zip(*timed), "-o", color=color, label=mode)
            elif panel["frontier_time"].get(mode):
                ax_time.plot(*zip(*panel["frontier_time"][mode]), "--o", color=color, label=f"{mode} (frontier)")
            if panel["memory"].get(mode):
                ax_mem.plot(*zip(*panel["memory"][mode]), "-o", color=color, label=mode)
            if mode in panel["oom"]:
                ax_mem.axvline(panel["oom"][mode], color=color, ls=":", lw=1.5, label=f"{mode}: does not fit")
        for ax, label in ((ax_time, "seconds per optimizer step"), (ax_mem, "peak GiB per rank")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sample tokens")
            ax.set_ylabel(label)
            ax.set_title(f"{model} shape, {ranks}, {card}", fontsize=10)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
