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
