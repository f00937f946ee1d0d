"""launch/eval_videoqa.py on the CPU: two synthetic video cases with the embedded tiny model over 2 real processes
(torchrun, gloo), then the same cases with 4 simulated ranks in one process, then the summary table and plot."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from spava_ds.evaluation.report import summarize_videoqa
from dist_utils import child_env  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "eval_videoqa.py")


def _transformers_answers(model_dir, tests, max_frames, max_new_tokens):
    """The reference: every case answered greedily by transformers' own Qwen2.5-VL (SDPA attention, its own KV
    cache) from the same preprocessed inputs (the engine's video path, M-RoPE positions given explicitly)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from spava_ds import SpavaConfig, comm
    from spava_ds.engine import SpavaEngine
    from spava_ds.tasks import load_records

    engine = SpavaEngine.from_pretrained(model_dir, SpavaConfig(mode="dense"), group=comm.SELF)  # inputs only
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    answers = {}
    for case in load_records(tests):
        inputs = engine.video_inputs(case["video"], case["question"], None, max_frames)
        with torch.no_grad():
            out = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=True,
                        pixel_values_videos=inputs["pixel_values_videos"], video_grid_thw=inputs["video_grid_thw"])
            tokens, next_pos = [int(out.logits[0, -1].argmax())], int(inputs["position_ids"].max()) + 1
            while len(tokens) < max_new_tokens and tokens[-1] not in engine.stop_ids:
                pos = torch.full((3, 1, 1), next_pos + len(tokens) - 1)
                out = model(input_ids=torch.tensor([[tokens[-1]]]), position_ids=pos, use_cache=True,
                            past_key_values=out.past_key_values)
                tokens.append(int(out.logits[0, -1].argmax()))
        text = engine.tokenizer.decode([t for t in tokens if t not in engine.stop_ids], skip_special_tokens=True)
        answers[case["id"]] = text.strip()
    return answers


@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
def test_eval_videoqa_two_processes_and_simulated(tmp_path):
    from spava_ds.assets import tiny_model_dir
    from spava_ds.tasks import generate_split

    tests = generate_split(str(tmp_path / "data"), "test", 2, frames=8, width=64, height=64)
    env = child_env(OMP_NUM_THREADS="1")
    common = ["--model", tiny_model_dir(), "--tests", tests, "--max-new-tokens", "3", "--passing-len", "2"]
    w2, w4 = tmp_path / "w2.jsonl", tmp_path / "w4sim.jsonl"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT,
                          *common, "--methods", "dense", "ring", "spava", "--out", str(w2)],
                         capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run([sys.executable, SCRIPT, *common, "--methods", "dense", "ring", "spava", "star",
                          "--simulate", "4", "--out", str(w4)], capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert summarize_videoqa([str(w4)]) in res.stdout  # the run ends with its accuracy table

    records = [json.loads(line) for line in w2.read_text().splitlines()]
    assert len(records) == 2 * 3 and {r["world_size"] for r in records} == {2}
    assert {r["frames"] for r in records} == {8} and all(not r["simulated"] for r in records)
    expected = {json.loads(line)["id"]: json.loads(line)["answer"] for line in open(tests)}
    for r in records:
        assert r["expected"] == expected[r["id"]] and isinstance(r["answer"], str)
        assert r["correct"] == (r["answer"].strip().lower() == r["expected"].lower())
        if r["method"] in ("dense", "ring"):  # exact attention over 2 processes gives dense's tokens
            assert r["same_as_dense"] and r["kl_first_token"] < 1e-6, r
    sim = [json.loads(line) for line in w4.read_text().splitlines()]
    # ring is skipped when simulating (exact by construction); dense is the reference in the same process
    assert sorted({r["method"] for r in sim}) == ["dense", "spava", "star"] and len(sim) == 2 * 3
    assert {r["world_size"] for r in sim} == {4} and all(r["simulated"] for r in sim)
    # dense in both runs answers as transformers' own model does (an implementation independent of spava_ds's)
    reference = _transformers_answers(tiny_model_dir(), tests, max_frames=8, max_new_tokens=3)
    dense = [r for r in records + sim if r["method"] == "dense"]
    assert len(dense) == 4 and all(r["answer"] == reference[r["id"]] for r in dense), (dense, reference)

    table = summarize_videoqa([str(w2), str(w4)], str(tmp_path / "t.md"), None)
    assert "| ring | 2 | 8 |" in table and "| spava | 4 (sim.) | 8 |" in table
    ring_row = next(line for line in table.splitlines() if line.startswith("| ring | 2 |"))
    assert ring_row.split("|")[-3].strip() == "100.0"  # same answer as dense: 100%
    if importlib.util.find_spec("matplotlib") is not None:
        summarize_videoqa([str(w2), str(w4)], None, str(tmp_path / "acc.png"))
        assert (tmp_path / "acc.png").stat().st_size > 0
