"""Bad input at every entry point: one line per rank (the traceback only with --debug), a non-zero exit, no hang.

* spava-infer refuses bad options on every rank before any collective (--top-p 0 on 2 processes, --fps 0,
  --max-frames 0, --timeout 0, option clashes), never truncates an existing --output nor writes over --batch (same
  path, a symlink, another spelling, a hard link) nor lets two jobs write one output, refuses --resume on a file of
  another batch, and cuts a torn last line on --resume; the synthetic task videos' folders are removed, also on
  error;
* sampling settings and non-string questions are checked by the engine's public API;
* ``entry.agreed``: an error one rank sees reaches every rank (3 gloo processes), the ranks stay in step;
* launch/eval_videoqa.py, demo_attention.py and bench_kernels.py report errors in one line.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from dist_utils import child_env, run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "launch", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _infer(capsys, *argv):
    """spava-infer in this process (one rank): (exit code, stdout, stderr)."""
    from spava_ds import cli

    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_error_line(stderr: str, expected: str) -> None:
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("[rank 0] error: ") and expected in lines[0], stderr[-2000:]
    assert "Traceback" not in stderr


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)


def test_sampling_settings_are_checked():
    from spava_ds.engine import GenerationConfig

    for bad, match in ((dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=math.nan), "top_p"),
                       (dict(temperature=-1.0), "temperature"), (dict(temperature=math.inf), "temperature"),
                       (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=2.5), "max_new_tokens"),
                       (dict(max_new_tokens=True), "max_new_tokens")):
        with pytest.raises(ValueError, match=match):
            GenerationConfig(**bad)
    GenerationConfig(max_new_tokens=np.int64(3), temperature=0.0, top_p=1.0)
    GenerationConfig(max_new_tokens=1, temperature=2.0, top_p=1e-6)


def test_a_non_string_question_is_named():
    from spava_ds import SpavaConfig
    from spava_ds.assets import tiny_model_dir
    from spava_ds.engine import SpavaEngine

    engine = SpavaEngine.from_pretrained(tiny_model_dir(), SpavaConfig(mode="dense"), fused_vision=False)
    with pytest.raises(ValueError, match="question must be a string, got int 5"):
        engine.video_inputs("clip.mp4", 5)
    with pytest.raises(ValueError, match="question is empty"):
        engine.text_inputs("some context", "   ")


@pytest.mark.timeout(120)
def test_top_p_zero_is_refused_on_every_rank_before_any_collective():
    env = child_env(OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.join(ROOT, "launch", "infer.py"), "--top-p", "0"],
                         capture_output=True, text=True, timeout=100, env=env)
    assert res.returncode != 0
    assert "] error: top_p must be in (0, 1]" in res.stderr, res.stderr[-3000:]
    assert "gloo" not in res.stderr and "Connection" not in res.stderr  # no rank waited in a collective


@pytest.mark.parametrize("argv, expected", [
    (["--fps", "0"], "--fps must be > 0"),
    (["--fps", "nan"], "--fps must be > 0"),
    (["--max-frames", "0"], "--max-frames must be >= 1"),
    (["--timeout", "0"], "--timeout must be a number of seconds > 0"),
    (["--temperature", "-0.5"], "temperature must be >= 0"),
    (["--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
    (["--batch", "q.jsonl", "--video", "v.mp4"], "drop --video/--question"),
    (["--batch", "q.jsonl", "--resume", "--overwrite"], "pass one of them"),
    (["--output", "a.jsonl"], "go with --batch"),
    (["--question", " "], "the question is empty"),
    (["--video", "/nonexistent/clip.mp4"], "video file not found"),
    (["--batch", "/nonexistent/q.jsonl"], "no such file"),
])
def test_bad_options_are_refused_in_one_line(capsys, argv, expected):
    code, _, err = _infer(capsys, *argv)
    assert code == 1
    _one_error_line(err, expected)


def test_the_traceback_only_with_debug(capsys):
    code, _, err = _infer(capsys, "--fps", "0", "--debug")
    assert code == 1 and "Traceback" in err and "[rank 0] error: --fps must be > 0" in err


def _batch(folder, count=2):
    from spava_ds.video import write_synthetic_video

    video = write_synthetic_video(str(folder / "v.webm"), num_frames=8, width=112, height=112, fps=2, seed=2)
    path = folder / "q.jsonl"
    path.write_text("".join(json.dumps({"video": video, "question": f"What is in clip {i}?", "answer": "red"}) + "\n"
                            for i in range(count)))
    return path


def test_outputs_are_never_truncated_nor_the_batch_overwritten(capsys, tmp_path):
    batch = _batch(tmp_path)
    questions = batch.read_bytes()
    (tmp_path / "sub").mkdir()
    os.symlink(batch, tmp_path / "link.jsonl")
    os.link(batch, tmp_path / "hard.jsonl")
    for same in (batch, tmp_path / "link.jsonl", tmp_path / "sub" / ".." / "q.jsonl", tmp_path / "hard.jsonl"):
        for flags in ([], ["--overwrite"], ["--resume"]):
            code, _, err = _infer(capsys, "--batch", str(batch), "--output", str(same), *flags)
            assert code == 1
            _one_error_line(err, "is the --batch file itself")
    assert batch.read_bytes() == questions
    earlier = tmp_path / "earlier.jsonl"
    earlier.write_text('{"answer": "an earlier run"}\n')
    code, _, err = _infer(capsys, "--batch", str(batch), "--output", str(earlier))
    assert code == 1
    _one_error_line(err, "exists: pass --resume")
    code, _, err = _infer(capsys, "--batch", str(batch), "--output", str(earlier), "--resume")
    assert code == 1
    _one_error_line(err, "is not a record of spava-infer's answers")
    assert earlier.read_text() == '{"answer": "an earlier run"}\n'
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    code, _, err = _infer(capsys, "--batch", str(empty))
    assert code == 1
    _one_error_line(err, "has no records")
    other = tmp_path / "other.jsonl"  # the answers of another batch
    other.write_text(json.dumps({"video": "x.mp4", "question": "Other?", "batch_line": 1, "answer": "no"}) + "\n")
    code, _, err = _infer(capsys, "--batch", str(batch), "--output", str(other), "--resume")
    assert code == 1
    _one_error_line(err, "the batch changed")


def test_a_second_job_cannot_write_into_the_same_output(tmp_path):
    from spava_ds.cli import AnswerFile, OutputPlan

    path = str(tmp_path / "answers.jsonl")
    first = AnswerFile(OutputPlan(path, "new", set()))
    try:
        with pytest.raises(ValueError, match="being written by another job"):
            AnswerFile(OutputPlan(path, "resume", set()))
    finally:
        first.close()


@pytest.mark.timeout(120)
def test_resume_cuts_a_torn_last_line_and_answers_the_rest(capsys, tmp_path):
    from spava_ds.assets import tiny_model_dir

    batch = _batch(tmp_path, count=3)
    full = tmp_path / "full.jsonl"
    common = ["--model", tiny_model_dir(), "--batch", str(batch), "--max-new-tokens", "3"]
    code, out, _ = _infer(capsys, *common, "--output", str(full))
    assert code == 0 and "3 answer(s) written" in out
    lines = full.read_text().splitlines(keepends=True)
    assert [json.loads(line)["expected"] for line in lines] == ["red"] * 3  # the record's own answer is kept
    cut = tmp_path / "cut.jsonl"
    cut.write_text(lines[0] + lines[1][:len(lines[1]) // 2])  # a write cut short in the middle of line 2
    code, out, _ = _infer(capsys, *common, "--output", str(cut), "--resume")
    assert code == 0 and "1 record(s) answered before, 2 to go" in out
    assert cut.read_text().endswith("\n")

    def answers(path):  # everything but the timing
        return [{k: v for k, v in json.loads(line).items() if k != "prefill_seconds"}
                for line in path.read_text().splitlines()]

    assert answers(cut) == answers(full)


@pytest.mark.timeout(120)
def test_task_video_folders_are_removed(capsys, tmp_path, monkeypatch):
    from spava_ds.assets import tiny_model_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    common = ["--model", tiny_model_dir(), "--task-frames", "6", "--max-new-tokens", "2"]
    code, out, _ = _infer(capsys, *common)
    assert code == 0 and "answer:" in out
    code, _, err = _infer(capsys, *common, "--max-frames", "1")  # fails after the video is written
    assert code == 1 and "[rank 0] error:" in err
    assert not [p for p in os.listdir(tmp_path) if p.startswith("spava_task_")]


def _agreed_worker(rank, world):
    from spava_ds import entry

    seen = []
    for failing in (1, None):
        try:
            with entry.agreed("the step"):
                if rank == failing:
                    raise ValueError(f"rank {rank} cannot read its file")
            seen.append("ok")
        except entry.PeerFailure as err:
            seen.append(f"peer: {err}")
        except ValueError as err:
            seen.append(f"own: {err}")
    seen.append(entry.describe_failures(entry.agree("same"), world))
    return seen


@pytest.mark.timeout(120)
def test_an_error_one_rank_sees_reaches_every_rank():
    per_rank = run_distributed(_agreed_worker, 3)
    assert per_rank[1] == ["own: rank 1 cannot read its file", "ok", "same"]
    for rank in (0, 2):
        assert per_rank[rank] == ["peer: the step failed on rank 1: rank 1 cannot read its file", "ok", "same"]


def test_rank_health_names_failed_and_silent_ranks(monkeypatch):
    import gc
    import time

    import torch.distributed as dist

    from spava_ds import comm

    host = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # stands for rank 0's store
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(host.port))
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    ranks = [comm.RankHealth.connect(r, 3) for r in range(3)]
    assert ranks[0].store_host == "rank 0"
    ranks[1].post("error: out of memory")
    start = time.monotonic()
    assert ranks[0].peers(0.3) == {1: "error: out of memory", 2: None}  # rank 2 stays silent: waited for
    assert time.monotonic() - start >= 0.3
    ranks[2].post("peer-failure")
    assert ranks[0].peers(60) == {1: "error: out of memory", 2: "peer-failure"}  # all answered: no wait
    del host
    gc.collect()
    with pytest.raises(dist.DistError):  # the store's host is gone
        ranks[0].peers(1)
    ranks[0].post("error: too late")  # best effort: no error


def test_the_timeout_default_comes_from_the_environment():
    code = "import spava_ds.comm as c; print(c.DEFAULT_TIMEOUT.total_seconds())"
    env = child_env(SPAVA_DIST_TIMEOUT="42")
    ok = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert ok.stdout.strip() == "42.0", ok.stderr[-2000:]
    env["SPAVA_DIST_TIMEOUT"] = "ten"
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode != 0 and "SPAVA_DIST_TIMEOUT must be a number of seconds > 0, got 'ten'" in bad.stderr


@pytest.mark.parametrize("script, argv, expected", [
    ("eval_videoqa", ["--model", "/nonexistent/model", "--tests", "/nonexistent/test.jsonl"], "No such file"),
    ("demo_attention", ["--context-len", "64", "--heads", "3", "--kv-heads", "2"], "not a multiple of 2 KV heads"),
    ("bench_kernels", [], "needs a CUDA GPU"),
])
def test_other_entry_points_report_one_line(capsys, script, argv, expected):
    import torch

    if script == "bench_kernels" and torch.cuda.is_available():
        pytest.skip("a GPU is here: bench_kernels would run")
    module = _load_script(script)
    assert module.main(argv) == 1
    _one_error_line(capsys.readouterr().err, expected)
    assert module.main(argv + ["--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err
