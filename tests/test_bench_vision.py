"""launch/bench_vision.py on the CPU with the tiny tower.

* the vision tower's model FLOPs (``spava_ds.benchmarks.flops``) equal torch's FLOP counter over transformers' own
  tower (its per-window SDPA on the math backend: the attention as matrix products), on awkward grids;
* ``--profile --out``: the timing table with TFLOP/s, the kernel classes and top kernels of the profiled run (CPU
  operators here), and the same in the JSON;
* frame parallel (torchrun, 2 gloo processes): TFLOP/s per GPU counts the FLOPs / W.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from dist_utils import child_env  # noqa: E402

from spava_ds.benchmarks.flops import vision_tower_flops  # noqa: E402
from spava_ds.profiling import KERNEL_CLASSES  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--tiny", "--iters", "1", "--warmup", "0", "--backends", "sdpa"]


def _script():
    spec = importlib.util.spec_from_file_location("bench_vision", os.path.join(ROOT, "launch", "bench_vision.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# Patch grids (steps, rows, columns): windows of 4 x 4 merged tokens cut short at the edges, windows that fit
# exactly (transformers pads an empty window there), one step, and two videos at once.
GRIDS = [[[3, 20, 14]], [[2, 16, 8]], [[1, 6, 22]], [[2, 10, 12], [1, 8, 18]]]


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_vision_flops_equal_a_count_from_the_modules(grid):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    visual = _script().build_visual("tiny", torch.device("cpu"), torch.float32)
    grid_thw = torch.tensor(grid)
    pixels = torch.randn(int(grid_thw.prod(-1).sum()), 3 * 2 * 14 * 14)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        visual(pixels, grid_thw=grid_thw)
    counted = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    flops = vision_tower_flops(visual.config, grid_thw)
    assert set(counted) == {"aten.convolution", "aten.addmm", "aten.bmm"}, counted
    assert counted["aten.convolution"] + counted["aten.addmm"] == flops["linear"] + flops["merger"]
    assert counted["aten.bmm"] == flops["window_attention"] + flops["full_attention"]
    assert flops["window_attention"] > 0 and flops["full_attention"] > 0
    assert flops["total"] == counter.get_total_flops()
    assert vision_tower_flops(visual.config, grid) == flops  # lists as well as a tensor


def test_profile_tables_and_json_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "vision.json"
    assert _script().main(FAST + ["--profile", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["card"] == "CPU" and record["world"] == 1
    rows = record["rows"]
    assert [r["attention"] for r in rows] == ["transformers", "sdpa"]
    for r in rows:
        assert r["tflops_per_gpu"] == pytest.approx(r["flops"]["total"] / r["seconds"] / 1e12)
    assert "profile" not in rows[0]
    profile = rows[1]["profile"]  # the only fused backend, at the only frame count
    assert profile["device"] == "cpu"
    assert set(profile["classes"]) == {kind for kind, _ in KERNEL_CLASSES} | {"other"}
    assert profile["classes"]["gemm"] > 0 and profile["classes"]["attention"] > 0
    assert profile["total_s"] == pytest.approx(sum(profile["classes"].values()))
    top = profile["top"]
    assert 0 < len(top) <= 15 and [k["seconds"] for k in top] == sorted((k["seconds"] for k in top), reverse=True)
    assert {"aten::addmm", "aten::_scaled_dot_product_flash_attention_for_cpu"} <= {k["name"] for k in top}
    printed = capsys.readouterr().out
    assert "| model | frames | merged tokens | attention | GPUs | time (ms) | TFLOP/s per GPU |" in printed
    assert "| kernel class | seconds | share of kernel time | TFLOP/s |" in printed
    assert "| aten::addmm | gemm |" in printed


def test_frame_parallel_rows_count_flops_per_gpu(tmp_path):
    out = tmp_path / "vision.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "launch", "bench_vision.py")] + FAST + ["--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=child_env(OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["attention"], r["gpus"]) for r in rows] == [("transformers", 1), ("sdpa", 1), ("transformers", 2),
                                                            ("sdpa", 2)]
    for r in rows:
        assert r["tflops_per_gpu"] == pytest.approx(r["flops"]["total"] / r["gpus"] / r["seconds"] / 1e12)


@pytest.mark.gpu
def test_profile_on_a_gpu(tmp_path):
    """The CUDA path before the long runs: the tiny tower in bf16, every available fused backend, the profiled
    kernels' classes from the GPU's own kernels."""
    out = tmp_path / "vision.json"
    assert _script().main(["--models", "tiny", "--frames", "8", "--size", "224", "168", "--iters", "2",
                           "--profile", "--out", str(out)]) == 0
    profiled = [r for r in json.loads(out.read_text())["rows"] if "profile" in r]
    assert len(profiled) == 1 and profiled[0]["attention"] != "transformers", profiled
    profile = profiled[0]["profile"]
    assert profile["device"] == "cuda" and profile["classes"]["gemm"] > 0, profile
    assert profile["classes"]["attention"] > 0, profile["top"]


def test_chunked_rows_per_call_against_cached_metadata(tmp_path):
    """``--chunk-steps``: the tower on chunks (7 steps in 3 + 3 + 1) equals the whole video's features either way;
    with the cached metadata no chunk makes a call that waits for the device, per call each chunk makes several."""
    out = tmp_path / "vision.json"
    assert _script().main(FAST + ["--frames", "14", "--chunk-steps", "3", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["attention"] for r in rows] == ["transformers", "sdpa", "sdpa, chunks of 3, per-call metadata",
                                              "sdpa, chunks of 3, cached metadata"]
    per_call, cached = rows[2:]
    assert per_call["max_abs_diff"] < 1e-5 and cached["max_abs_diff"] < 1e-5
    assert cached["syncs_per_chunk"] == 0 and per_call["syncs_per_chunk"] >= 3
