"""launch/host_before_after.py on the CPU: both halves run (here the same tree twice) and the table pairs them."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script():
    spec = importlib.util.spec_from_file_location("host_before_after", os.path.join(ROOT, "launch",
                                                                                   "host_before_after.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(180)
def test_before_and_after_run_interleaved_and_pair_up(tmp_path, capsys):
    script = _load_script()
    assert [r[:2] for r in script.plan_runs(["3b", "7b"], 2)][:4] == [("before", "3b"), ("after", "3b"),
                                                                      ("before", "7b"), ("after", "7b")]
    out = tmp_path / "h.json"
    assert script.main(["--before", ROOT, "--device", "cpu", "--tokens", "301", "--world", "2", "--shapes", "3b",
                        "--repeats", "1", "--iters", "1", "--warmup", "1", "--head-dim", "16", "--out",
                        str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert sorted(runs) == ["after_3b_1", "before_3b_1"] and runs["before_3b_1"]["header"].startswith("# CPU")
    modes = {r["mode"] for r in runs["after_3b_1"]["rows"]}
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 3b | 301 | 2 |")]
    assert len(lines) == len(modes) == 5  # one row per mode, with both halves in it
    # The same code twice runs the same operators.
    ops = {(r["mode"], v): r["ops"] for v in ("before", "after") for r in runs[f"{v}_3b_1"]["rows"]}
    assert all(ops[m, "before"] == ops[m, "after"] for m in modes), ops
    with pytest.raises(SystemExit):
        script.main(["--before", str(tmp_path), "--out", str(out)])  # no bench_host.py there


def test_graph_rows_of_the_newer_tree_are_compared_with_the_older_eager_rows():
    script = _load_script()
    row = dict(tokens=301, world=2, ops=100, gpu_ms=1.0)
    runs = {"before_3b_1": {"rows": [dict(row, mode="spava", host_ms=2.0)]},  # an older tree: no "graphs" key
            "after_3b_1": {"rows": [dict(row, mode="spava", host_ms=1.5, graphs=False),
                                    dict(row, mode="spava", host_ms=0.1, ops=6, graphs=True)]}}
    lines = script.table(runs, ["3b"]).splitlines()[2:]
    assert lines == ["| 3b | 301 | 2 | spava | 100 → 100 | 2.00 | 1.50 | -25 % | 1.00 → 1.00 |",
                     "| 3b | 301 | 2 | spava + graphs | 100 → 6 | 2.00 | 0.10 | -95 % | 1.00 → 1.00 |"]
