"""Fault injection on ``spava-infer --batch`` and ``launch/finetune.py`` (torchrun, 2 gloo processes, the tiny
checkpoint). Batch inference, on a 12-frame video:

* an uninterrupted run of a batch with bad records mid-batch (malformed JSON, a missing video, ``"video": 5``, no
  question, a non-string question, a non-object) answers every good record and writes one error record per bad one;
* kill -9 of rank 0 (the writer) mid-batch: the output holds complete JSON lines only, the job ends non-zero, rank 1
  names rank 0; ``--resume`` then answers only the rest, and the union equals the uninterrupted run's answers;
* SIGTERM to torchrun mid-batch: every rank stops after the same record, the output is complete, the job ends
  well before torchrun's 30 s SIGKILL;
* a stuck rank (SIGSTOP) with ``--timeout 5``: rank 0 gives up after the timeout and names rank 1.

Fine-tuning (2 sequence-parallel ranks, 4 tiny videos, 30 optimizer steps):

* one run, interrupted again and again: kill -9 of rank 1 (rank 0 names it), ``--resume``, SIGTERM to torchrun
  (every rank stops after the same step and saves a complete checkpoint; timed checkpoints before it), the same
  command without ``--resume`` (refused, naming what the folder holds), the newest checkpoint damaged, ``--resume``
  (passes over it, says so): the losses of every step equal the uninterrupted run's, and metrics.jsonl holds each
  step once;
* bad records mid-dataset are all reported with file:line before step 1, and ``--overwrite`` then leaves the old run
  untouched; a nonexistent ``--model`` and a bad option fail at once; a second stop signal stops at once; the run
  folder's pieces (``spava_ds.runs``) on their own.

Each case is bounded by a timeout; the runs are kept small (about 15 s each here; the interrupted fine-tuning
run 76 s). The CPU cases hide the GPUs (gloo everywhere); ``test_faults_with_nccl`` and
``test_finetune_faults_with_nccl`` run the faults on 2 GPUs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers")
pytest.importorskip("av")

from dist_utils import child_env  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = 30  # good records: enough that a fault lands mid-batch
BAD = {  # batch line -> (the line, what its error record must say)
    3: ('{"video": "V", "question": ', "malformed JSON"),
    6: ('{"video": "MISSING", "question": "Where?"}', "missing.mp4"),
    9: ('{"video": 5, "question": "Why?"}', '"video" must be a string'),
    12: ('{"video": "V"}', 'no "question"'),
    15: ('{"video": "V", "question": 7}', '"question" must be a string'),
    18: ('[1, 2]', "must be a JSON object"),
}


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    return _write_batch(tmp_path_factory.mktemp("faults"), GOOD)


def _write_batch(folder, good_records: int):
    """A batch file: ``good_records`` records with the bad ones of BAD at their lines, and a blank line."""
    from spava_ds.video import write_synthetic_video

    video = write_synthetic_video(str(folder / "v.webm"), num_frames=12, width=112, height=112, fps=2, seed=1)
    lines, good = [], 0
    while good < good_records:
        n = len(lines) + 1
        if n in BAD:
            lines.append(BAD[n][0].replace("MISSING", str(folder / "missing.mp4")).replace('"V"', json.dumps(video)))
        elif n == 20:
            lines.append("")
        else:
            lines.append(json.dumps({"video": video, "question": f"What moves in clip {good}?", "id": good}))
            good += 1
    path = folder / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _command(batch, output, *extra):
    from spava_ds.assets import tiny_model_dir

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            os.path.join(ROOT, "launch", "infer.py"), "--model", tiny_model_dir(), "--batch", str(batch),
            "--output", str(output), "--max-new-tokens", "8", *extra]


def _env(gpu: bool):
    env = child_env(OMP_NUM_THREADS="1")
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on the CPU even on a GPU machine
    return env


def _run(batch, output, *extra, gpu=False, timeout=150):
    return subprocess.run(_command(batch, output, *extra), capture_output=True, text=True, timeout=timeout,
                          env=_env(gpu))


def _records(output):
    """The output's records; every line must be complete JSON (a newline-terminated object)."""
    text = output.read_text()
    assert text == "" or text.endswith("\n"), "the last line is incomplete"
    return [json.loads(line) for line in text.splitlines()]


def _answers(records):
    """batch line -> answer text of the answer records (each line answered at most once)."""
    answers = {}
    for r in records:
        if "error" not in r:
            assert r["batch_line"] not in answers, f"line {r['batch_line']} answered twice"
            answers[r["batch_line"]] = r["answer"]
    return answers


@pytest.fixture(scope="module")
def reference(batch, tmp_path_factory):
    """The uninterrupted run's result and records."""
    output = tmp_path_factory.mktemp("reference") / "answers.jsonl"
    res = _run(batch, output)
    return res, _records(output)


def _start_and_wait(batch, output, lines: int, *extra, gpu=False):
    """Start the job; return it once ``output`` has ``lines`` lines (a fault then lands mid-batch)."""
    proc = subprocess.Popen(_command(batch, output, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(gpu))
    deadline = time.monotonic() + 120
    while not (output.exists() and output.read_text().count("\n") >= lines):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the batch did not start"
        time.sleep(0.02)
    return proc


def _rank_pid(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker of ``rank`` (a child of the launcher with RANK=rank in its environment)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if parent == launcher_pid and f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank}")


@pytest.mark.timeout(200)
def test_bad_records_mid_batch(batch, reference):
    res, records = reference
    assert res.returncode != 0, "some records failed: the exit code must say so"
    assert f"{len(BAD)} of {GOOD + len(BAD)} record(s) failed" in res.stdout, res.stdout[-2000:]
    errors = {r["batch_line"]: r for r in records if "error" in r}
    assert sorted(errors) == sorted(BAD)
    for line, (_, reason) in BAD.items():
        assert reason in errors[line]["error"] and errors[line]["batch"] == str(batch), errors[line]
    answers = _answers(records)
    assert len(answers) == GOOD and not set(answers) & set(BAD)
    first = next(r for r in records if r["batch_line"] == 1)
    assert first["id"] == 0 and first["question"] == "What moves in clip 0?" and isinstance(first["answer"], str)


@pytest.mark.timeout(300)
def test_kill9_of_the_writer_then_resume(batch, reference, tmp_path):
    output = tmp_path / "answers.jsonl"
    proc = _start_and_wait(batch, output, 4)
    os.kill(_rank_pid(proc.pid, 0), signal.SIGKILL)
    _, stderr = proc.communicate(timeout=90)
    assert proc.returncode != 0
    assert "[rank 1] error: rank 0 did not answer" in stderr, stderr[-3000:]
    first = _records(output)
    assert 4 <= len(first) < GOOD + len(BAD)
    # --resume answers only what is not answered yet; the union is the uninterrupted run's answers
    resumed = _run(batch, output, "--resume")
    assert "resuming" in resumed.stdout, resumed.stderr[-3000:]
    both = _records(output)
    assert both[:len(first)] == first, "resume must keep the earlier lines as they were"
    again = set(_answers(both[len(first):])) & set(_answers(first))
    assert not again, f"lines answered again: {again}"
    assert _answers(both) == _answers(reference[1])


@pytest.mark.timeout(200)
def test_sigterm_to_the_launcher(batch, tmp_path):
    _sigterm_to_the_launcher(batch, tmp_path / "answers.jsonl")


def _sigterm_to_the_launcher(batch, output, *extra, gpu=False):
    proc = _start_and_wait(batch, output, 4, *extra, gpu=gpu)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=90)
    assert time.monotonic() - signalled < 25, "the ranks did not stop before torchrun's SIGKILL"
    assert proc.returncode != 0
    assert "stopped by SIGTERM" in stdout and "--resume" in stdout, (stdout[-2000:], stderr[-3000:])
    for rank in (0, 1):
        assert f"[rank {rank}] SIGTERM: stopping after the record in flight" in stderr
    assert "error:" not in stderr, stderr[-3000:]
    assert 4 <= len(_records(output)) < len(open(batch).read().splitlines())


@pytest.mark.timeout(200)
def test_stuck_rank_times_out(batch, tmp_path):
    output = tmp_path / "answers.jsonl"
    proc = _start_and_wait(batch, output, 4, "--timeout", "5")
    rank0, rank1 = _rank_pid(proc.pid, 0), _rank_pid(proc.pid, 1)
    os.kill(rank1, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        while _state(rank0) not in ("Z", "gone") and time.monotonic() - stopped < 60:
            time.sleep(0.1)
        waited = time.monotonic() - stopped
    finally:
        os.kill(rank1, signal.SIGCONT)  # torchrun's SIGTERM then reaches it at once, not after 30 s
    _, stderr = proc.communicate(timeout=90)
    assert 5 <= waited < 30, waited  # the timeout, then at most HEALTH_WAIT_S to name the silent rank
    assert proc.returncode != 0
    assert "[rank 0] error: rank 1 did not answer" in stderr and "Timed out" in stderr, stderr[-3000:]
    assert len(_records(output)) >= 4


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


@pytest.mark.gpu(count=2)
@pytest.mark.timeout(500)
def test_faults_with_nccl(tmp_path):
    """The faults on 2 GPUs (NCCL, fp32): SIGTERM to torchrun stops every rank after the same record; kill -9 of the
    writer leaves complete lines and ends the job (a survivor waiting in a GPU collective runs no Python, so the NCCL
    watchdog or torchrun ends it, and torchrun's summary names the dead rank); --resume then completes the
    uninterrupted run's answers."""
    batch = _write_batch(tmp_path, 300)  # a GPU answers the tiny model's questions fast: keep the fault mid-batch
    fp32 = ("--dtype", "float32")
    reference = tmp_path / "reference.jsonl"
    res = _run(batch, reference, *fp32, gpu=True, timeout=300)
    assert f"{len(BAD)} of {300 + len(BAD)} record(s) failed" in res.stdout, res.stderr[-3000:]
    _sigterm_to_the_launcher(batch, tmp_path / "stopped.jsonl", *fp32, gpu=True)
    output = tmp_path / "killed.jsonl"
    proc = _start_and_wait(batch, output, 4, *fp32, gpu=True)
    killed = time.monotonic()
    os.kill(_rank_pid(proc.pid, 0), signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.monotonic() - killed < 60
    assert "Signal 9 (SIGKILL)" in stderr, stderr[-3000:]
    first = _records(output)
    _run(batch, output, "--resume", *fp32, gpu=True, timeout=300)
    assert _records(output)[:len(first)] == first
    assert _answers(_records(output)) == _answers(_records(reference))


# ---- fine-tuning (launch/finetune.py) -------------------------------------------------------------------------------
STEPS = 30  # ~0.1 s each here: long enough for a fault to land mid-run


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    from spava_ds.tasks import generate_split

    return generate_split(str(tmp_path_factory.mktemp("finetune")), "train", 4, frames=8, width=64, height=64)


def _finetune_command(train, output, *extra, nproc=2, steps=STEPS):
    from spava_ds.assets import tiny_model_dir

    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*(launcher if nproc > 1 else [sys.executable]), os.path.join(ROOT, "launch", "finetune.py"),
            "--deepspeed-config", os.path.join(ROOT, "configs", "finetune_cpu_sp2.json"), "--model",
            tiny_model_dir(), "--train", str(train), "--output", str(output), "--max-steps", str(steps),
            "--no-export", *extra]


def _finetune(train, output, *extra, nproc=2, steps=STEPS, gpu=False):
    return subprocess.run(_finetune_command(train, output, *extra, nproc=nproc, steps=steps), capture_output=True,
                          text=True, timeout=300 if gpu else 150, env=_env(gpu))


def _steps(run_dir):
    """step -> loss of metrics.jsonl's step lines; every line complete, each step once."""
    text = (run_dir / "metrics.jsonl").read_text()
    assert text.endswith("\n"), "the last line is incomplete"
    steps = [json.loads(line) for line in text.splitlines()]
    numbers = [e["step"] for e in steps if "loss" in e]
    assert numbers == sorted(set(numbers)), f"steps repeated or out of order: {numbers}"
    return {e["step"]: e["loss"] for e in steps if "loss" in e}


def _start_finetune(train, output, first_step: int, *extra, steps=STEPS, gpu=False):
    """Start a fine-tuning job; return it once metrics.jsonl has a line of step ``first_step`` or later."""
    proc = subprocess.Popen(_finetune_command(train, output, *extra, steps=steps), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(gpu))
    metrics, deadline = output / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.exists() and f'"step": {first_step},' in metrics.read_text()):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run did not reach the step"
        time.sleep(0.01)
    return proc


def _complete_steps(run_dir):
    """The steps of the checkpoints marked complete, newest first."""
    from spava_ds import runs

    return [int(tag[4:]) for tag in runs.complete_tags(str(run_dir / "checkpoints"))]


@pytest.mark.timeout(400)
def test_finetune_survives_kill_sigterm_and_a_damaged_checkpoint(train_data, tmp_path):
    reference = tmp_path / "reference"
    res = _finetune(train_data, reference)
    assert res.returncode == 0, res.stderr[-3000:]
    expected = _steps(reference)
    assert sorted(expected) == list(range(1, STEPS + 1)) and len({round(v, 5) for v in expected.values()}) > 20

    # kill -9 of rank 1 mid-run: rank 0 names it; the checkpoints of --save-every 5 stay
    run = tmp_path / "run"
    proc = _start_finetune(train_data, run, 8, "--save-every", "5")
    os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
    _, stderr = proc.communicate(timeout=90)
    assert proc.returncode != 0 and "[rank 0] error: rank 1 did not answer" in stderr, stderr[-3000:]
    killed_at = max(_steps(run))
    assert killed_at < STEPS and _complete_steps(run)[0] % 5 == 0

    # --resume, timed checkpoints (every step), SIGTERM to torchrun: every rank stops after the same step and saves it
    proc = _start_finetune(train_data, run, killed_at + 6, "--resume", "--save-every-minutes", "0.0001")
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=90)
    assert time.monotonic() - signalled < 25, "the ranks did not stop before torchrun's SIGKILL"
    for rank in (0, 1):
        assert f"[rank {rank}] SIGTERM: stopping after the optimizer step in flight" in stderr, stderr[-3000:]
    assert "stopped by SIGTERM" in stderr and "error:" not in stderr, stderr[-3000:]
    stopped_at = max(_steps(run))
    assert stopped_at < STEPS and _complete_steps(run) == [stopped_at, stopped_at - 1]  # --keep-checkpoints 2

    # the same command without --resume: refused, the run untouched
    res = _finetune(train_data, run, nproc=1)
    assert res.returncode == 1, res.stderr[-3000:]
    assert f"already holds a run (2 checkpoint(s), 2 complete, the newest complete step{stopped_at}; metrics.jsonl " \
           f"of {stopped_at} line(s)): pass --resume to continue it or --overwrite to replace it" in res.stderr
    assert max(_steps(run)) == stopped_at

    # the newest checkpoint damaged: --resume passes over it to the one before and says so
    model_states = run / "checkpoints" / f"step{stopped_at}" / "mp_rank_00_model_states.pt"
    model_states.write_bytes(model_states.read_bytes()[:1000])
    res = _finetune(train_data, run, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"--resume: step{stopped_at} cannot be resumed from (mp_rank_00_model_states.pt has 1000 bytes" \
           in res.stderr, res.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step{stopped_at - 1}'} at step {stopped_at - 1}" in res.stderr
    resumed = _steps(run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5), (step, expected, resumed)


@pytest.mark.gpu(count=2)
@pytest.mark.timeout(500)
def test_finetune_faults_with_nccl(train_data, tmp_path):
    """The fine-tuning faults on 2 GPUs (NCCL, fp32): SIGTERM to torchrun stops every rank after the same step with a
    complete checkpoint; kill -9 of rank 1 ends the job (torchrun names it: a survivor waiting in a GPU collective runs
    no Python); --resume after each continues the uninterrupted run's losses (GPU kernels may reduce in another
    order: 1e-3 over the first steps after each resume)."""
    steps = 300  # a GPU step of the tiny model takes milliseconds: keep the faults mid-run
    reference = tmp_path / "reference"
    res = _finetune(train_data, reference, steps=steps, gpu=True)
    assert res.returncode == 0, res.stderr[-3000:]
    expected = _steps(reference)
    run = tmp_path / "run"
    proc = _start_finetune(train_data, run, 20, steps=steps, gpu=True)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=90)
    assert "stopped by SIGTERM" in stderr and "error:" not in stderr, stderr[-3000:]
    stopped_at = max(_steps(run))
    assert _complete_steps(run)[0] == stopped_at < steps
    proc = _start_finetune(train_data, run, stopped_at + 20, "--resume", "--save-every", "10", steps=steps, gpu=True)
    killed = time.monotonic()
    os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.monotonic() - killed < 60 and "Signal 9 (SIGKILL)" in stderr, stderr[-3000:]
    saved_at = _complete_steps(run)[0]
    res = _finetune(train_data, run, "--resume", steps=steps, gpu=True)
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = _steps(run)
    assert sorted(resumed) == list(range(1, steps + 1))
    for step in [*range(1, stopped_at + 6), *range(saved_at + 1, saved_at + 6)]:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-3), (step, expected[step], resumed[step])


@pytest.mark.timeout(200)
def test_finetune_reports_every_bad_record_before_step_1(train_data, tmp_path):
    from spava_ds.video import write_synthetic_video

    lines = open(train_data).read().splitlines()
    good = json.loads(lines[0])
    short = write_synthetic_video(str(tmp_path / "short.mp4"), num_frames=2, width=64, height=64, fps=2)
    bad = {2: '{"video": "train/00001.mp4", "question": ', 4: json.dumps(dict(good, video="train/missing.mp4")),
           5: json.dumps(dict(good, answer="")), 7: json.dumps(dict(good, video=short))}
    for line, text in sorted(bad.items()):
        lines.insert(line - 1, text)
    data = os.path.join(os.path.dirname(train_data), "bad.jsonl")
    with open(data, "w") as f:
        f.write("\n".join(lines) + "\n")
    old_run = tmp_path / "old"
    old_run.mkdir()
    (old_run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    res = _finetune(data, old_run, "--overwrite")
    assert res.returncode != 0
    for rank in (0, 1):
        assert f"[rank {rank}] error: 4 bad record(s), nothing was trained: {data}:2: malformed JSON" in res.stderr
    for line, reason in ((2, "malformed JSON"), (4, "video file not found"), (5, '"answer" is empty'),
                         (7, f"video {short!r} gives 2 frames after sampling: at least 4 are needed for 2 ranks")):
        assert f"{data}:{line}: {reason}" in res.stderr, res.stderr[-3000:]
    assert "step 1 |" not in res.stderr
    assert os.listdir(old_run) == ["metrics.jsonl"] and "loss" in (old_run / "metrics.jsonl").read_text()


@pytest.mark.timeout(60)
def test_finetune_refuses_a_missing_model_and_bad_options_at_once(train_data, tmp_path):
    command = _finetune_command(train_data, tmp_path / "run", nproc=1)
    command[command.index("--model") + 1] = str(tmp_path / "no-such-model")
    start = time.monotonic()
    res = subprocess.run(command, capture_output=True, text=True, timeout=50, env=_env(False))
    assert res.returncode == 1 and time.monotonic() - start < 30
    assert res.stderr.strip().splitlines()[-1] == (f"[rank 0] error: --model {str(tmp_path / 'no-such-model')!r}: "
                                                   "no such folder (give a local Hugging Face checkpoint folder; "
                                                   "nothing is downloaded)"), res.stderr[-3000:]
    assert not (tmp_path / "run").exists()
    # a bad option (underscore spelling: the alias of --max-steps) is argparse's exit 2, before anything starts
    res = subprocess.run(_finetune_command(train_data, tmp_path / "run", "--max_steps", "0", nproc=1),
                         capture_output=True, text=True, timeout=50, env=_env(False))
    assert res.returncode == 2 and "error: --max-steps must be >= 1, got 0" in res.stderr, res.stderr[-3000:]


@pytest.mark.timeout(60)
def test_finetune_refuses_lr_beside_an_optimizer_block(train_data, tmp_path):
    """--lr with a JSON whose optimizer block sets the rate is an error, not a flag that DeepSpeed drops silently."""
    res = subprocess.run(_finetune_command(train_data, tmp_path / "run", "--lr", "0.001", nproc=1),
                         capture_output=True, text=True, timeout=50, env=_env(False))
    config = os.path.join(ROOT, "configs", "finetune_cpu_sp2.json")
    assert res.returncode == 1 and res.stderr.strip().splitlines()[-1] == (
        f"[rank 0] error: --lr 0.001: {config} has an \"optimizer\" block, whose params set the learning rate: "
        "drop --lr, or the block"), res.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_run_folder_pieces(tmp_path):
    """``spava_ds.runs`` alone: which folders a run may use, which checkpoints count, how metrics.jsonl is cut."""
    from spava_ds import runs

    folder = str(tmp_path / "run")
    runs.check_output(folder, resume=False, overwrite=False)  # new, or empty: a fresh run may use it
    os.makedirs(folder)
    runs.check_output(folder, resume=False, overwrite=False)
    with pytest.raises(ValueError, match="--resume: no complete checkpoint in .*nothing there"):
        runs.check_output(folder, resume=True, overwrite=False)
    with pytest.raises(ValueError, match="pass one of them"):
        runs.check_output(folder, resume=True, overwrite=True)

    metrics = runs.MetricsFile(folder)
    for step in range(1, 6):
        metrics.write({"step": step, "loss": 1.0 / step})
        assert open(metrics.path).read().count("\n") == step  # in the file when write returns
    metrics.close()
    with open(metrics.path, "a") as f:
        f.write('{"step": 6, "lo')  # a line cut short by a kill
    with pytest.raises(ValueError, match=r"already holds a run \(metrics.jsonl of 6 line\(s\)\): pass --resume"):
        runs.check_output(folder, resume=False, overwrite=False)
    runs.check_output(folder, resume=False, overwrite=True)
    assert runs.cut_metrics(folder, 3) == 3  # steps 4, 5 and the torn line
    assert [json.loads(line)["step"] for line in open(metrics.path)] == [1, 2, 3]

    ckpt_dir = os.path.join(folder, runs.CHECKPOINTS)
    for step in (2, 4, 6, 8):
        os.makedirs(os.path.join(ckpt_dir, runs.tag_of(step), "sub"))
        for name in ("a.pt", "sub/b.pt"):
            with open(os.path.join(ckpt_dir, runs.tag_of(step), name), "wb") as f:
                f.write(bytes(10 * step))
        if step < 8:  # step 8: a save cut short
            runs.mark_complete(ckpt_dir, runs.tag_of(step), step=step)
    assert runs.checkpoint_tags(ckpt_dir) == ["step8", "step6", "step4", "step2"]
    assert runs.complete_tags(ckpt_dir) == ["step6", "step4", "step2"]
    assert runs.checkpoint_problem(ckpt_dir, "step6") is None
    assert "a save that did not finish" in runs.checkpoint_problem(ckpt_dir, "step8")
    os.remove(os.path.join(ckpt_dir, "step6", "sub", "b.pt"))
    assert runs.checkpoint_problem(ckpt_dir, "step6") == "sub/b.pt is missing"
    with open(os.path.join(ckpt_dir, "step4", "a.pt"), "ab") as f:
        f.write(b"x")
    assert runs.checkpoint_problem(ckpt_dir, "step4") == "a.pt has 41 bytes, 40 when saved"
    assert runs.set_aside(ckpt_dir, "step6").startswith("step6.damaged-")
    assert runs.prune(ckpt_dir, keep=1) == ["step2"] and runs.complete_tags(ckpt_dir) == ["step4"]
    runs.check_output(folder, resume=True, overwrite=False)  # one complete checkpoint: resumable
    with pytest.raises(ValueError, match="holds files but no run"):
        other = tmp_path / "other"
        other.mkdir()
        (other / "notes.txt").write_text("mine")
        runs.check_output(str(other), resume=False, overwrite=True)


_TWO_SIGNALS = """
import argparse, os, signal, sys, time
from spava_ds import entry

def job(args):
    os.kill(os.getpid(), signal.SIGTERM)
    assert entry.received_signal() == signal.SIGTERM  # the first one only asks to stop after the step in flight
    print("still running", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # the second stops at once
    time.sleep(30)
    print("not stopped", flush=True)

sys.exit(entry.run_main(job, argparse.Namespace(debug=False), graceful_stop=True,
                        in_flight="the optimizer step in flight"))
"""


@pytest.mark.timeout(60)
def test_an_error_is_one_line_written_at_once(monkeypatch):
    """Each rank's error line reaches stderr in one write, newline included, so the ranks' lines never interleave."""
    import argparse

    from spava_ds import entry

    writes = []

    class Stderr:
        def write(self, text):
            writes.append(text)
            return len(text)

        def flush(self):
            pass

    def job(args):
        raise ValueError("the question is empty")

    monkeypatch.setattr(sys, "stderr", Stderr())
    assert entry.run_main(job, argparse.Namespace(debug=False)) == 1
    assert writes == ["[rank 0] error: the question is empty\n"]


def test_a_second_stop_signal_stops_at_once():
    res = subprocess.run([sys.executable, "-c", _TWO_SIGNALS], capture_output=True, text=True, timeout=50,
                         env=_env(False))
    assert res.returncode == 143 and res.stdout == "still running\n", (res.stdout, res.stderr)
    assert res.stderr == ("[rank 0] SIGTERM: stopping after the optimizer step in flight (send it again to stop at "
                          "once)\n[rank 0] error: stopped by SIGTERM\n"), res.stderr
