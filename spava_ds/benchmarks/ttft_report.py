"""The time-to-first-token benchmark's report (``launch/bench_ttft.py --table``): markdown tables of the JSON-lines
results (each method and pipeline with its parts, the one-rank shares, the decoders' scaling) and the plot of the
parts."""

from __future__ import annotations

from typing import List

from .ttft import METHODS, PARTS, PIPELINES


def fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def tables(rows: List[dict]) -> str:
    """Markdown tables: time to first token and its parts per method and pipeline; the one-rank shares."""
    out = ["| model | video | context | method | GPUs | pipeline | TTFT s | metadata | prompt | decode | preprocess | "
           "wait | vision | LM | first token | decode+prep. / TTFT | same 1st token as today |",
           "|" + "---|" * 17]
    ttft = [r for r in rows if r.get("kind") == "ttft" and r.get("status") == "ok"]
    today = {(r["case"], r["method"]): r for r in ttft if r["pipeline"] == "today"}
    for r in sorted(ttft, key=lambda r: (r["model"], r["resolution"], r["target"], METHODS.index(r["method"]),
                                         r["gpus"], PIPELINES.index(r["pipeline"]))):
        p = r["parts"]
        base = today.get((r["case"], r["method"]))
        same = "-" if r["pipeline"] == "today" or base is None else str(base["first_token"] == r["first_token"])
        out.append(f"| {r['model']} | {r['resolution']} | {r['context_tokens']} | {r['method']} | {r['gpus']} | "
                   f"{r['pipeline']} | {fmt(r['ttft'])} | " + " | ".join(fmt(p[k]) for k in PARTS)
                   + f" | {(p['decode'] + p['preprocess']) / r['ttft']:.1%} | {same} |")
    shares = [r for r in rows if r.get("kind") == "share"]
    if shares:
        out += ["", "| model | video | video tokens | W | slowest rank: decode + preprocess s | its decode | "
                "its preprocess | frames kept / decoded | metadata s | every rank's total s |", "|" + "---|" * 10]
        for r in sorted(shares, key=lambda r: (r["resolution"], r["target"], r["world"])):
            slow = max(r["ranks"], key=lambda x: x["total"])
            out.append(f"| {r['model']} | {r['resolution']} | {r['context_tokens']} | {r['world']} | "
                       f"{fmt(slow['total'])} | {fmt(slow['decode'])} | {fmt(slow['preprocess'])} | "
                       f"{slow['frames']} / {slow['decoded_frames']} | {fmt(r['metadata'])} | "
                       + ", ".join(fmt(x["total"], ".2f") for x in r["ranks"]) + " |")
    decoding = [r for r in rows if r.get("kind") == "decoding"]
    if decoding:
        out += ["", "| model | video | video tokens | card | decoding | decoders asked / used | FFmpeg threads each | "
                "seconds | frames kept / decoded | decoded frames/s | speedup over 1 decoder | preprocess 100 frames s |",
                "|" + "---|" * 12]
        for r in sorted(decoding, key=lambda r: (r["resolution"], r["target"])):
            ones = {x["scope"]: x["seconds"] for x in r["runs"] if x["asked"] == 1}
            for x in r["runs"]:
                speedup = fmt(ones[x["scope"]] / x["seconds"], ".2f") if x["scope"] in ones else "-"
                out.append(f"| {r['model']} | {r['resolution']} | {r['context_tokens']} | {r['card']} | {x['scope']} | "
                           f"{x['asked']} / {x['decoders']} | {x['decoder_threads']} | {fmt(x['seconds'])} | "
                           f"{x['kept_frames']} / {x['decoded_frames']} | {x['decoded_frames'] / x['seconds']:.0f} | "
                           f"{speedup} | {fmt(r['resize']['seconds'])} |")
    return "\n".join(out)


def plot(rows: List[dict], out: str) -> None:
    """A PNG of the time to first token from the file and its parts, per resolution and context, for each method,
    GPU count and pipeline of the ``ttft`` rows (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ttft = [r for r in rows if r.get("kind") == "ttft" and r.get("status") == "ok"]
    card = next((r["card"] for r in rows if r.get("card")), "")
    resolutions = sorted({r["resolution"] for r in ttft})
    fig, axes = plt.subplots(1, len(resolutions), figsize=(6.5 * len(resolutions), 4.5), squeeze=False)
    colours = dict(zip(PARTS, plt.get_cmap("tab10").colors))
    for ax, resolution in zip(axes[0], resolutions):
        mine = sorted((r for r in ttft if r["resolution"] == resolution),
                      key=lambda r: (r["target"], METHODS.index(r["method"]), r["gpus"], PIPELINES.index(r["pipeline"])))
        labels = []
        for x, r in enumerate(mine):
            bottom = 0.0
            for part in PARTS:
                ax.bar(x, r["parts"][part], bottom=bottom, color=colours[part], label=part if x == 0 else None)
                bottom += r["parts"][part]
            labels.append(f"{r['context_tokens'] // 1000}K\n{r['method']} x{r['gpus']}\n{r['pipeline']}")
        ax.set_xticks(range(len(mine)), labels, fontsize=7)
        ax.set_ylabel("seconds from the file to the first token")
        ax.set_title(f"{mine[0]['model']} shape, {resolution}, {card}" if mine else resolution)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
