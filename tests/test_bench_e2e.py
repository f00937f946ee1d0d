"""launch/bench_e2e.py on the CPU: every code path of the GPU benchmark, with the tiny checkpoint over 2 processes.

One ``torchrun --nproc_per_node 2 launch/bench_e2e.py --tiny`` run (about 15 s here) covers: dense on rank 0 alone,
ring, ulysses, star, apb, spava, PyTorch's context_parallel (its own ring code, through a CPU shim of the op it
dispatches), the Spava ablations; the first-token check against dense; the breakdown probes and a profiler
trace; the --max-context skip; an out-of-memory skip of dense (injected); resuming from an existing --out (a done
measurement kept, one interrupted once retried, one interrupted twice not). Then ``--plot`` tabulates the JSON
and, with matplotlib, draws the PNG; in one process (no torchrun) only dense runs, and --time-budget 0 runs nothing.
The Spava ablations are four rows: -overlap, -fused query pass, -frame parallelism, and apb as -zigzag.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from dist_utils import child_env  # noqa: E402

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "bench_e2e.py")
ALL = ["dense", "spava", "ring", "torch_cp", "apb", "ulysses", "star", "spava_no_overlap", "spava_no_fused",
       "spava_no_fp"]


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_e2e", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_e2e")
    out = tmp / "tiny.json"
    # A previous run's file at 640 tokens: star done (kept as is); apb left "running" by a second interrupted job
    # (crashed: not retried); spava_no_fp left "running" once (retried).
    prior = {"meta": {"card": "CPU"}, "runs": [{"card": "CPU"}], "results": [
        dict(case="tiny/112x112/640/W2", model="tiny", resolution="112x112", target=640, method="star", gpus=2,
             gpus_job=2, status="ok", ttft=123.0, lm=100.0, vision=20.0, frames=0, context_tokens=0,
             size=[112, 112], peak_mem_gib=[0.0, 0.0]),
        dict(case="tiny/112x112/640/W2", model="tiny", resolution="112x112", target=640, method="apb", gpus=2,
             gpus_job=2, status="running", attempts=2, size=[112, 112]),
        dict(case="tiny/112x112/640/W2", model="tiny", resolution="112x112", target=640, method="spava_no_fp",
             gpus=2, gpus_job=2, status="running", attempts=1, size=[112, 112]),
    ]}
    out.write_text(json.dumps(prior))
    env = child_env(OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT, "--tiny",
           "--contexts", "320", "640", "4096", "--max-context", "1000", "--iters", "1", "--out", str(out),
           "--trace", str(tmp / "traces"), "--breakdown-methods", "spava", "ulysses", "--inject-oom", "dense@640"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=170, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res, json.loads(out.read_text()), tmp


def _tiny_layers() -> int:
    from spava_ds.assets import tiny_model_dir

    with open(os.path.join(tiny_model_dir(), "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    return config.get("text_config", config)["num_hidden_layers"]


def _entries(data, target):
    return {r["method"]: r for r in data["results"] if r["target"] == target}


@pytest.mark.timeout(180)
def test_tiny_run_measures_every_method(tiny_run):
    res, data, tmp = tiny_run
    at = _entries(data, 320)
    assert sorted(at) == sorted(ALL)
    for method, r in at.items():
        assert r["status"] == "ok", r
        assert r["ttft"] > 0 and r["lm"] > 0 and r["vision"] > 0 and len(r["ttft_all"]) == 1
        assert r["gpus"] == (1 if method == "dense" else 2) and r["context_tokens"] + r["query_tokens"] > 300
        assert (r["context_tokens"] + r["query_tokens"]) % 4 == 0  # padded for PyTorch CP's head-tail split
    for method in ("ring", "ulysses", "torch_cp"):  # exact: the same first token as dense (fp32 on the CPU)
        assert at[method]["logit_rel_diff"] < 1e-4 and at[method]["same_first_token"], at[method]
    for method in ("spava", "apb", "star", "spava_no_fused"):  # approximate with these budgets: differ
        assert at[method]["logit_rel_diff"] > 1e-6, at[method]
    # The ablations that change only the schedule compute what spava computes.
    for method in ("spava_no_overlap", "spava_no_fp"):
        assert at[method]["logit_rel_diff"] == pytest.approx(at["spava"]["logit_rel_diff"], rel=1e-4, abs=1e-6)


@pytest.mark.timeout(180)
def test_tiny_run_breakdown_skips_and_resume(tiny_run):
    res, data, tmp = tiny_run
    layers = _tiny_layers()
    spava = _entries(data, 320)["spava"]
    assert len(spava["breakdown_per_rank"]) == 2
    for b in spava["breakdown_per_rank"]:
        assert b["selection"] > 0 and b["attention"] > b["selection"] and b["linear"] > 0 and b["vision"] > 0
        # Seen through spava_ds's collective hook: per layer the two passing halves and the query partials.
        assert b["vision_gather"] > 0 and b["communication"] > 0 and b["collectives"] == 3 * layers, b
        assert abs(b["gaps"]) < 0.5 * b["total"]
    uly = _entries(data, 320)["ulysses"]["breakdown_per_rank"][0]
    assert uly["communication"] > 0 and uly["selection"] == 0 and uly["collectives"] == 4 * layers  # q, k, v, out
    traces = sorted(os.listdir(tmp / "traces"))
    assert any("spava_rank0" in t for t in traces) and any("spava_rank1" in t for t in traces)
    # 640: dense out of memory (injected) is skipped with a message, the others run; star came from the old file,
    # apb had crashed there.
    at = _entries(data, 640)
    assert at["dense"]["status"] == "oom" and "out of memory" in at["dense"]["message"]
    assert at["spava"]["status"] == "ok" and "logit_rel_diff" not in at["spava"]
    assert at["star"]["ttft"] == 123.0
    assert at["apb"]["status"] == "crashed"
    assert at["spava_no_fp"]["status"] == "ok" and at["spava_no_fp"]["attempts"] == 2
    assert all(r["status"] == "skipped" for r in _entries(data, 4096).values()) and len(_entries(data, 4096)) == 10
    # The markdown tables come last.
    tail = res.stdout[res.stdout.index("### tiny Qwen2.5-VL shape"):]
    assert "| context | frames | method |" in tail and "spava -overlap" in tail and "oom:" in tail
    assert "| ~4K | | all methods | | skipped: above --max-context 1000" in tail
    assert "Breakdown of one instrumented run" in tail and "all measurements done" in tail
    assert "no video decoding" in res.stdout


@pytest.mark.timeout(120)
def test_plot_step(tiny_run, capsys):
    _, data, tmp = tiny_run
    bench = _load_script()
    png = tmp / "plot.png"
    assert bench.main(["--plot", str(tmp / "tiny.json"), "--plot-out", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "| context | frames | method |" in printed
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not importable" in printed and not png.exists()
    else:
        assert png.exists() and png.stat().st_size > 10_000


@pytest.mark.timeout(120)
def test_one_process_and_time_budget(tmp_path, capsys):
    """Without torchrun only dense runs; --time-budget 0 starts nothing and still prints the tables."""
    import torch

    bench = _load_script()
    threads = torch.get_num_threads()
    try:
        out = tmp_path / "one.json"
        assert bench.main(["--tiny", "--out", str(out), "--iters", "1", "--breakdown-methods", "dense"]) == 0
        (entry,) = json.loads(out.read_text())["results"]
        assert entry["method"] == "dense" and entry["status"] == "ok" and entry["case"] == "tiny/112x112/320/W1"
        dense = entry["breakdown_per_rank"][0]
        assert dense["communication"] == 0 and dense["collectives"] == 0 and dense["linear"] > 0
        assert "only the dense methods run" in capsys.readouterr().out
        none = tmp_path / "none.json"
        assert bench.main(["--tiny", "--out", str(none), "--time-budget", "0"]) == 0
        printed = capsys.readouterr().out
        assert "time budget reached" in printed and "all measurements done" not in printed
        assert json.loads(none.read_text())["results"] == []
    finally:
        torch.set_num_threads(threads)


@pytest.mark.timeout(120)
def test_published_shapes_build_and_make_cases():
    """Every GPU shape builds (meta device: no weights) with the published parameter count, and its case at 4K
    tokens has the family's prompt and grid: Qwen's resize to multiples of 28 (32 for Qwen3-VL), InternVL's 448x448
    tiles, the context within a step of the target, the query padded to a multiple of 2W."""
    import torch

    from spava_ds.benchmarks import e2e, shapes
    from spava_ds.models import family_class

    args = SimpleNamespace(min_pixels=4 * 28 * 28, max_pixels=0)
    expect = {"3b": (4.07, [644, 364], 299), "7b": (8.29, [644, 364], 299), "internvl3-2b": (2.09, [448, 448], 256),
              "qwen3-vl-8b": (8.77, [640, 352], 220)}
    for shape, (billions, size, features_per_step) in expect.items():
        tokenizer = shapes.shape_tokenizer(shape)
        config = shapes.build_config(shape, tokenizer)
        with torch.device("meta"):
            model = family_class(config.model_type).model_class()._from_config(config, dtype=torch.bfloat16)
        assert abs(sum(p.numel() for p in model.parameters()) / 1e9 - billions) < 0.01, shape
        family = family_class(config.model_type)(model, tokenizer)
        assert e2e.plan_size(family, "360p", args) == size, shape
        case = e2e.make_case(model, tokenizer, shape, "360p", 4096, 2, args, torch.device("cpu"), torch.bfloat16)
        total = case.context_len + case.query_len
        features = int((case.ids == family.feature_token_id).sum())
        assert total % 4 == 0 and 4096 - 2 * features_per_step < total <= 4096 + 4 + 30, (shape, total)
        assert features == case.steps * features_per_step and case.positions.shape[-1] == total, shape
        assert int(case.grid[0, 0]) == case.steps and case.pixels.shape[0] == (
            case.steps if shape == "internvl3-2b" else int(case.grid.prod())), shape
    assert e2e.parse_context("128K") == 131072 and e2e.parse_context("16384") == 16384


@pytest.mark.timeout(180)
def test_share_of_one_rank_for_each_family(tmp_path, capsys):
    """One process: dense, then one rank's share of W = 2 and 3 (the others stood in for by the fake process
    group) for the tiny Qwen3-VL and InternVL3 models; the tables name the rank and W."""
    import torch

    bench = _load_script()
    threads = torch.get_num_threads()
    try:
        out = tmp_path / "share.json"
        assert bench.main(["--tiny", "--models", "tiny-qwen3-vl", "tiny-internvl", "--methods", "dense", "spava",
                           "ring", "--share-of", "2", "3", "--iters", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    results = json.loads(out.read_text())["results"]
    for model in ("tiny-qwen3-vl", "tiny-internvl"):
        rows = {r["method"]: r for r in results if r["model"] == model}
        assert sorted(rows) == sorted(["dense", "spava@share2", "ring@share2", "spava@share3", "ring@share3"])
        assert all(r["status"] == "ok" and r["ttft"] > 0 and r["lm"] > 0 and r["vision"] > 0 for r in rows.values())
        assert rows["spava@share3"]["share_of"] == 3 and rows["spava@share3"]["share_rank"] == 1
        assert rows["dense"]["context_tokens"] + rows["dense"]["query_tokens"] <= 320 + 2 + 30
    printed = capsys.readouterr().out
    assert "spava, rank 1 of 3 alone (no communication)" in printed and "### tiny InternVL3 shape" in printed
