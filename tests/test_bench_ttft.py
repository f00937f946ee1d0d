"""launch/bench_ttft.py on the CPU: the embedded tiny checkpoint from a tiny H.264 file, one process and two.

Every measurement's parts (metadata, prompt, decode, preprocess, wait, vision, LM, first token), each timed on its
own, add up to the wall time of the run on every rank; the new pipeline's first token is today's; the one-rank-share
rows cover every rank; a rerun skips what --out holds; --table prints it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

pytest.importorskip("av")

from dist_utils import run_distributed  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "bench_ttft.py")


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_ttft", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_ttft", module)
    spec.loader.exec_module(module)
    return module


def _rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _check_ttft_rows(rows, methods, gpus, pipelines=("new", "today")):
    ttft = {(r["method"], r["pipeline"]): r for r in rows if r["kind"] == "ttft"}
    assert set(ttft) == {(m, p) for m in methods for p in pipelines}
    for (method, pipeline), r in ttft.items():
        assert r["status"] == "ok" and r["gpus"] == (1 if method == "dense" else gpus)
        assert len(r["parts_per_rank"]) == r["gpus"]
        for parts in r["parts_per_rank"]:
            total = sum(v for k, v in parts.items() if k != "wall")
            assert abs(parts["wall"] - total) <= 0.1 * parts["wall"] + 0.03, (method, pipeline, parts)
            assert parts["decode"] > 0 and parts["vision"] > 0 and parts["lm"] > 0
        assert r["ttft"] >= max(p["wall"] for p in r["parts_per_rank"]) * 0.5
        assert (r["parts"]["metadata"] > 0) == (pipeline != "today")  # today's path reads no separate metadata
        assert r["first_token"] == ttft[(method, "today")]["first_token"], method
    return ttft


@pytest.mark.timeout(240)
def test_bench_ttft_tiny_one_process(tmp_path, capsys):
    bench = _load_script()
    out, videos = str(tmp_path / "ttft.jsonl"), str(tmp_path / "videos")
    args = ["--tiny", "--out", out, "--video-dir", videos, "--share-worlds", "2", "3", "--iters", "1",
            "--decoder-counts", "1", "3", "--pipelines", "new", "streamed", "today"]
    assert bench.main(args) == 0
    rows = _rows(out)
    _check_ttft_rows(rows, ["dense"], 1, ("new", "streamed", "today"))
    shares = {r["world"]: r for r in rows if r["kind"] == "share"}
    assert sorted(shares) == [2, 3]
    for world, r in shares.items():
        assert [x["rank"] for x in r["ranks"]] == list(range(world))
        assert sum(x["frames"] for x in r["ranks"]) == 2 * sum(x["steps"][1] - x["steps"][0] for x in r["ranks"])
        assert all(x["decoded_frames"] >= x["frames"] // 2 and x["total"] > 0 for x in r["ranks"])
        assert all(x["decoders"] >= 1 and x["decoder_threads"] >= 1 for x in r["ranks"])
    # decoding alone: the whole video and rank 0 of each W, with 1 and 3 decoders, the same frames each time
    (decoding,) = [r for r in rows if r["kind"] == "decoding"]
    runs = {(x["scope"], x["asked"]): x for x in decoding["runs"]}
    assert set(runs) == {(s, k) for s in ("whole video", "rank 0 of W=2", "rank 0 of W=3") for k in (1, 3)}
    for (scope, asked), x in runs.items():
        assert x["decoders"] == min(asked, x["decoders"]) and x["seconds"] > 0
        assert x["kept_frames"] == runs[(scope, 1)]["kept_frames"] <= x["decoded_frames"]
    assert runs[("whole video", 3)]["decoders"] == 3 and decoding["resize"]["seconds"] > 0
    # the written video is cached: one file, reused by the rerun, which finds everything done
    assert len(os.listdir(videos)) == 1
    assert bench.main(args) == 0 and len(_rows(out)) == len(rows)
    capsys.readouterr()
    assert bench.main(["--table", out]) == 0
    table = capsys.readouterr().out
    assert "| tiny | 128x96 |" in table and "dense | 1 | new" in table and "slowest rank" in table
    assert "| whole video | 3 / 3 |" in table


def _run_main(rank, world, args):
    bench = _load_script()
    return bench.main(args)


@pytest.mark.timeout(300)
def test_bench_ttft_tiny_two_processes(tmp_path):
    out = str(tmp_path / "ttft2.jsonl")
    args = ["--tiny", "--out", out, "--video-dir", str(tmp_path / "videos"), "--iters", "1", "--warmup", "0",
            "--methods", "dense", "spava", "ring", "--pipelines", "new", "streamed", "today"]
    assert run_distributed(_run_main, 2, args) == [0, 0]
    ttft = _check_ttft_rows(_rows(out), ["dense", "spava", "ring"], 2, ("new", "streamed", "today"))
    assert ttft[("spava", "streamed")]["logit_max_abs_diff_vs_dense"] == \
        pytest.approx(ttft[("spava", "new")]["logit_max_abs_diff_vs_dense"], abs=1e-5)
    assert ttft[("ring", "new")]["first_token"] == ttft[("dense", "new")]["first_token"]  # ring is exact
    assert ttft[("ring", "new")]["logit_max_abs_diff_vs_dense"] < 1e-4
