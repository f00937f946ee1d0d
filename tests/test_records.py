"""Result files of the benchmarks and evaluations (spava_ds.benchmarks.records): JSON lines plain and gzip, the
resume of complete cases, and the committed raw evaluation records (results/*.jsonl.gz) behind docs/accuracy.md."""

from __future__ import annotations

import glob
import gzip
import os
import shutil

from spava_ds.benchmarks.records import append_jsonl, complete_cases, read_jsonl, read_jsonls
from spava_ds.evaluation.report import summarize_niah

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_jsonl_plain_and_gzip_and_complete_cases(tmp_path):
    path = str(tmp_path / "r.jsonl")
    records = [dict(case=0, method="dense"), dict(case=0, method="spava"), dict(case=1, method="dense")]
    for r in records:
        append_jsonl(path, r)
    assert read_jsonl(path) == records
    with open(path, "rb") as src, gzip.open(path + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    assert read_jsonl(path + ".gz") == records
    assert read_jsonls([path, str(tmp_path / "missing.jsonl")], missing_ok=True) == records
    assert complete_cases(path, 2) == records[:2]  # case 1 was cut short: it runs again


def test_committed_niah_records_summarize():
    """The raw NIAH records are read compressed; a row of the summary equals the records' own count."""
    paths = sorted(glob.glob(os.path.join(ROOT, "results", "niah_w8_cpu.jsonl.gz")))
    assert paths, "results/niah_w8_cpu.jsonl.gz is missing"
    records = read_jsonl(paths[0])
    spava = [r for r in records if r["method"] == "spava"]
    accuracy = 100 * sum(r["correct"] for r in spava) / len(spava)
    w, length = spava[0]["world_size"], spava[0]["length"]
    table = summarize_niah(paths, None, None)
    assert f"| spava | {w} | {length} | {len(spava)} | {accuracy:.1f} |" in table
