"""launch/bench_host.py on the CPU: one process stands for a rank of W, every mode runs, nothing is left behind."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
import torch.distributed as dist

from spava_ds import SpavaConfig, ZigzagLayout, comm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_host", os.path.join(ROOT, "launch", "bench_host.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_mode_runs_as_a_middle_rank_and_nothing_is_left_behind(tmp_path, capsys):
    bench = _load_script()
    outer = []  # a hook around the benchmark: the benchmark's own hook must take every call, then hand back
    out = tmp_path / "host.json"
    # 301 tokens: blocks of unequal length; W = 3 has an odd block count per half.
    with comm.collective_hook(lambda op, *args, **kwargs: outer.append(op)):
        assert bench.main(["--device", "cpu", "--tokens", "301", "--world", "2", "3", "--heads", "12", "6",
                           "--head-dim", "8", "--query", "7", "--iters", "1", "--warmup", "1", "--out",
                           str(out)]) == 0
        comm.all_reduce_async(torch.ones(1), None, 2)  # a collective after the benchmark reaches the outer hook
    assert len(outer) == 1, outer
    rows = json.loads(out.read_text())["rows"]
    assert {(r["mode"], r["world"]) for r in rows} == {(m, w) for m in bench.MODES for w in (2, 3)}
    for r in rows:
        layout = ZigzagLayout(294, 7, r["world"], SpavaConfig(mode=r["mode"]))
        assert r["local_tokens"] == layout.local_len(1), r
        assert r["ops"] > 0 and r["host_ms"] > 0, r
    # Spava is ring plus the selection: it must run more operators than ring at the same W.
    ops = {(r["mode"], r["world"]): r["ops"] for r in rows}
    assert all(ops["spava", w] > ops["ring", w] for w in (2, 3)), ops
    assert "| 301 | 3 | ulysses |" in capsys.readouterr().out
    assert not dist.is_initialized()  # the fake group is gone


def test_a_rank_outside_the_smallest_world_is_refused():
    with pytest.raises(SystemExit):
        _load_script().main(["--device", "cpu", "--world", "2", "4", "--rank", "2"])


def test_cuda_graph_rows_say_why_they_ran_eagerly_on_the_cpu(tmp_path, capsys):
    bench = _load_script()
    out = tmp_path / "host.json"
    assert bench.main(["--device", "cpu", "--tokens", "301", "--world", "2", "--heads", "4", "2", "--head-dim", "8",
                       "--modes", "spava", "ulysses", "--iters", "1", "--warmup", "2", "--cuda-graphs", "--out",
                       str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], r["graphs"]) for r in rows] == [("spava", False), ("spava", True), ("ulysses", False),
                                                        ("ulysses", True)]
    graph_rows = [r for r in rows if r["graphs"]]
    assert all(not r["replayed"] and r["eager_reason"] == "not on CUDA (cpu)" for r in graph_rows)
    assert all(r["call_ms"] > 0 for r in rows)
    text = capsys.readouterr().out
    assert "| 301 | 2 | spava |" in text and "eager: not on CUDA (cpu) |" in text
    # the summary: spava against the best exact mode (here ulysses), without and with graphs
    assert "| 301 | 2 | no | ulysses: " in text and "| 301 | 2 | yes | ulysses: " in text
    assert not dist.is_initialized()


def test_training_calls_run_forward_and_backward_without_a_sync(tmp_path):
    """--training: a call is a layer's forward and backward; it runs more operators than the prefill of the same
    mode and, like it, makes no synchronising call (tests/test_attention_syncs.py counts the same on real ranks)."""
    bench = _load_script()
    rows = {}
    for training in (False, True):
        out = tmp_path / f"host_{training}.json"
        assert bench.main(["--device", "cpu", "--tokens", "301", "--world", "4", "--heads", "4", "2", "--head-dim",
                           "8", "--query", "7", "--modes", "spava", "ring", "ulysses", "--iters", "1", "--warmup",
                           "1", "--out", str(out)] + (["--training"] if training else [])) == 0
        rows[training] = {r["mode"]: r for r in json.loads(out.read_text())["rows"]}
    for mode, r in rows[True].items():
        assert r["training"] and r["syncs"] == 0 and rows[False][mode]["syncs"] == 0, r
        assert r["ops"] > rows[False][mode]["ops"], (r, rows[False][mode])
    assert not dist.is_initialized()


def test_training_calls_refuse_cuda_graphs():
    with pytest.raises(SystemExit):
        _load_script().main(["--device", "cpu", "--training", "--cuda-graphs"])


@pytest.mark.gpu
def test_training_calls_make_no_cuda_sync_on_a_gpu(tmp_path):
    """On CUDA the count is torch's sync debug mode: also the syncs inside operators and libraries (cuDNN attention,
    sort, the compiled LSE merge at sizes that compile it: 8K local tokens x 28 heads x 128 > 2^21 elements)."""
    bench = _load_script()
    out = tmp_path / "host_gpu.json"
    assert bench.main(["--tokens", "32768", "--world", "4", "--heads", "28", "4", "--modes", "spava", "ring",
                       "ulysses", "--iters", "2", "--warmup", "2", "--training", "--out", str(out)]) == 0
    for r in json.loads(out.read_text())["rows"]:
        assert r["syncs"] == 0 and r["gpu_ms"] > 0, r
