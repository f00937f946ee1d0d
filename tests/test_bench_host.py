"""launch/bench_host.py on the CPU: one process stands for a rank of W, every mode runs, nothing is left behind."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch.distributed as dist

from spava_ds import SpavaConfig, ZigzagLayout, comm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_host", os.path.join(ROOT, "launch", "bench_host.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_mode_runs_as_a_middle_rank_and_the_collectives_come_back(tmp_path, capsys):
    bench = _load_script()
    gather, all_to_all = comm._all_gather_single, dist.all_to_all_single
    out = tmp_path / "host.json"
    # 301 tokens: blocks of unequal length; W = 3 has an odd block count per half.
    assert bench.main(["--device", "cpu", "--tokens", "301", "--world", "2", "3", "--heads", "12", "6",
                       "--head-dim", "8", "--query", "7", "--iters", "1", "--warmup", "1", "--out", str(out)]) == 0
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
    # The patched collectives are restored and the fake group is gone.
    assert comm._all_gather_single is gather and dist.all_to_all_single is all_to_all
    assert not dist.is_initialized()


def test_a_rank_outside_the_smallest_world_is_refused():
    with pytest.raises(SystemExit):
        _load_script().main(["--device", "cpu", "--world", "2", "4", "--rank", "2"])
