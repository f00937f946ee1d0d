"""Fine-tuning (launch/finetune.py, spava_ds.training) and the synthetic tasks (spava_ds.tasks), on the CPU.

* one training step on 2 sequence-parallel processes in mode ring, through deepspeed.initialize (ZeRO-2) and
  engine.backward as launch/finetune.py runs them, gives the loss and, after DeepSpeed's gradient reduction, the gradients of every
  parameter (vision tower included) that transformers' own model computes on one process with SDPA and its own
  label shifting and loss on the whole sequence;
* a run resumed from a DeepSpeed checkpoint continues with the losses of an uninterrupted run;
* Qwen3-VL and InternVL checkpoints train through the same launcher with a frozen vision tower;
* the task generator: the mp4 files decode, the needles are where the annotations say (and nowhere else), the
  answers agree with what the decoded frames show, the splits are disjoint.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from dist_utils import run_distributed  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMES = 8  # 4 temporal steps of 16 merged tokens at the tiny model's 112x112 minimum: ~64 video tokens
# No "sequence_parallel_size" for DeepSpeed: the SP group is spava_ds.training.sp_group (see its docstring).
DS_CONFIG = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 1.0, "zero_optimization": {"stage": 2},
             "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}


def _model_dir():
    from spava_ds.assets import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from spava_ds.tasks import generate_split

    out = str(tmp_path_factory.mktemp("tasks"))
    train = generate_split(out, "train", 4, frames=FRAMES, width=64, height=64)
    test = generate_split(out, "test", 3, frames=FRAMES, width=64, height=64)
    return out, train, test


def _infer(model, group):
    from transformers import AutoTokenizer

    from spava_ds import SpavaConfig
    from spava_ds.engine import SpavaEngine
    from spava_ds.video import load_video_settings

    return SpavaEngine(model, AutoTokenizer.from_pretrained(_model_dir()), SpavaConfig(mode="ring"), group,
                       load_video_settings(_model_dir()), fused_vision=False)


def _load(attn):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(_model_dir(), dtype=torch.float32,
                                                              attn_implementation=attn)


# ---- (a) one step: 2 SP ranks in mode ring == one process, dense ---------------------------------------------------
def _sp_step(rank, world, record):
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import deepspeed
    import deepspeed.ops
    from deepspeed.utils import safe_get_full_grad

    from spava_ds import SpavaConfig
    from spava_ds.integrations.transformers import spava_attn_implementation
    from spava_ds.training import VideoQAModel, build_sample, sequence_loss, sp_group

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    model = _load(spava_attn_implementation(_load("sdpa").config))
    qa = VideoQAModel(model, SpavaConfig(mode="ring"))
    engine, *_ = deepspeed.initialize(model=qa, model_parameters=qa.parameters(), config=DS_CONFIG)
    group = sp_group(2)
    qa.set_group(group)
    sample = build_sample(_infer(model, group), record["video"], record["question"], record["answer"])
    share = engine(sample)
    engine.backward(share * 2)  # as launch/finetune.py: DeepSpeed's average over 2 ranks becomes the SP sum
    grads = {name: safe_get_full_grad(p).detach().clone() for name, p in qa.model.named_parameters()}
    return {"loss": sequence_loss(share, group).item(), "share": share.item(), "grads": grads,
            "input_ids": sample["input_ids"], "labels": sample["labels"]}


def test_sp_ring_step_matches_dense_single_process(data):
    from spava_ds.tasks import load_records
    from spava_ds.video import read_video

    record = load_records(data[1])[1]
    results = run_distributed(_sp_step, 2, record)
    # The reference: transformers' model with SDPA on the whole sequence, its own M-RoPE, label shift and loss.
    ids, labels = results[0]["input_ids"], results[0]["labels"]
    hf_labels = torch.full_like(ids, -100)
    hf_labels[:, 1:] = labels[:, :-1]  # ours are pre-shifted: labels[i] is token i + 1
    model = _load("sdpa")
    from spava_ds import comm

    infer = _infer(model, comm.SELF)
    inputs = infer.video_inputs(record["video"], record["question"])
    assert torch.equal(ids[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])  # training prompt == eval prompt
    answer_ids = infer._ids(record["answer"]) + infer._ids("<|im_end|>")
    assert ids[0, -len(answer_ids):].tolist() == answer_ids and int((labels != -100).sum()) == len(answer_ids)
    _, info = read_video(record["video"], fps=infer.settings["fps"], max_frames=infer.settings["max_frames"])
    model.train()
    out = model(input_ids=ids, labels=hf_labels, mm_token_type_ids=(ids == model.config.video_token_id).int() * 2,
                pixel_values_videos=inputs["pixel_values_videos"], video_grid_thw=inputs["video_grid_thw"],
                second_per_grid_ts=torch.tensor([info["second_per_grid_t"]]))
    out.loss.backward()

    for r in results:
        assert abs(r["loss"] - out.loss.item()) < 1e-5, (r["loss"], out.loss.item())
        # each rank's share is half: the answer tokens are replicated on both ranks and weigh 1/W there
        assert abs(r["share"] - out.loss.item() / 2) < 1e-5
    reference = dict(model.named_parameters())
    worst = 0.0
    for name, grad in results[0]["grads"].items():
        ref = reference[name].grad
        scale = ref.abs().max().item() + 1e-8
        worst = max(worst, (grad - ref).abs().max().item() / scale)
        torch.testing.assert_close(results[1]["grads"][name], grad, rtol=0, atol=0)  # both ranks see the same
    assert worst < 2e-4, worst
    vision = [g for n, g in results[0]["grads"].items() if "visual" in n]
    assert vision and all(g.abs().sum() > 0 for g in vision)  # the frame-parallel backward reached the tower


# ---- (b) resume: identical losses ----------------------------------------------------------------------------------
def _finetune(rank, world, argv_runs):
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import deepspeed.ops

    import finetune

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return [finetune.train(finetune.parse_args(argv)) for argv in argv_runs]


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return {e["step"]: e["loss"] for e in map(json.loads, f) if "loss" in e}


def test_resume_continues_with_identical_losses(data, tmp_path):
    out, train, test = data
    config = tmp_path / "ds.json"
    config.write_text(json.dumps(dict(DS_CONFIG, scheduler={"type": "WarmupCosineLR", "params": {
        "total_num_steps": "auto", "warmup_num_steps": 1, "warmup_type": "linear", "warmup_min_ratio": 0.1}},
        spava={"mode": "ring"})))
    # the older underscore spellings on purpose: they stay aliases of --deepspeed-config, --max-steps, ...
    common = ["--deepspeed_config", str(config), "--model", _model_dir(), "--train", train, "--max_steps", "4",
              "--no_export"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    summaries = run_distributed(_finetune, 2, [
        common + ["--output", full],
        common + ["--output", part, "--save_every", "2", "--max_steps", "2"],  # stops after the step-2 checkpoint
        # resumed with a DataLoader worker prefetching the samples: the same samples, so the same losses
        common + ["--output", part, "--resume", "--eval", test, "--eval_limit", "2", "--eval_max_new_tokens", "2",
                  "--num_workers", "1"],
    ])
    assert os.path.isfile(os.path.join(part, "checkpoints", "latest"))
    a, b = _losses(full), _losses(part)
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [1, 2, 3, 4]
    assert len({round(v, 6) for v in a.values()}) == 4  # the steps differ (else the check below proves nothing)
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), (step, a, b)
    final = summaries[0][2]
    assert final["steps"] == 4 and 0.0 <= final["eval"]["accuracy"] <= 1.0 and final["eval"]["loss"] > 0


def test_finetune_trains_the_other_families_with_a_frozen_tower(data, tmp_path):
    """launch/finetune.py on Qwen3-VL and InternVL checkpoints (the family from the config): 2 SP ranks, frozen vision,
    checkpointed layers; finite losses, an evaluation, and an export that loads as the same family, whose vision
    weights are the checkpoint's and whose language model has moved."""
    import importlib.util

    from spava_ds import models

    out, train, test = data
    spec = importlib.util.spec_from_file_location("make_tiny_model", os.path.join(ROOT, "launch", "make_tiny_model.py"))
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    config = tmp_path / "ds.json"
    config.write_text(json.dumps(dict(DS_CONFIG, sequence_parallel_size=2, spava={"mode": "ring"})))
    runs = {}
    vision = {"qwen3_vl": ("model.visual.",), "internvl": ("model.vision_tower.", "model.multi_modal_projector.")}
    for family in vision:
        source = make.write_family_checkpoint(str(tmp_path / family), family)
        runs[family] = (source, str(tmp_path / f"run-{family}"))
    summaries = run_distributed(_finetune, 2, [
        ["--deepspeed_config", str(config), "--model", source, "--train", train, "--max_steps", "2", "--output", run,
         "--eval", test, "--eval_limit", "1", "--eval_max_new_tokens", "2", "--freeze-vision", "--checkpoint-layers"]
        for source, run in runs.values()])
    for (family, (source, run)), summary in zip(runs.items(), summaries[0]):
        losses = _losses(run)
        assert sorted(losses) == [1, 2] and all(np.isfinite(v) and v > 0 for v in losses.values()), losses
        assert summary["steps"] == 2 and summary["eval"]["loss"] > 0
        model, tokenizer, _ = models.load(os.path.join(run, "model"), torch.device("cpu"))
        assert model.config.model_type == family and tokenizer is not None
        before = dict(models.load(source, torch.device("cpu"), tokenizer=False)[0].named_parameters())
        after = dict(model.named_parameters())
        frozen = [n for n in before if n.startswith(vision[family])]
        assert frozen and all(torch.equal(before[n], after[n]) for n in frozen), family
        assert any(not torch.equal(before[n], after[n]) for n in before if "layers.0.self_attn" in n), family


# ---- (c) the task generator ----------------------------------------------------------------------------------------
def _best_text(frame, candidates):
    """The candidate whose rendered card is closest to the decoded frame's card (template matching)."""
    from spava_ds.tasks import card_box, draw_card

    x0, y0, x1, y1 = card_box(frame.shape[1], frame.shape[0])
    blank = np.zeros_like(frame)
    errors = {t: np.abs(draw_card(blank, t)[y0:y1, x0:x1].astype(float) - frame[y0:y1, x0:x1]).mean()
              for t in candidates}
    return min(errors, key=errors.get)


def test_task_generator_videos_answers_and_splits(data):
    from spava_ds.tasks import DIGITS, WORDS, card_fraction, load_records, split_seeds
    from spava_ds.video import read_video

    out, train, test = data
    train_records, test_records = load_records(train), load_records(test)
    assert [r["task"] for r in train_records] == ["retrieval", "ordering", "counting", "retrieval"]
    assert not {r["seed"] for r in train_records} & {r["seed"] for r in test_records}
    assert not set(split_seeds("train", 10 ** 5)) & set(split_seeds("test", 10 ** 5))
    assert len({r["video"] for r in train_records + test_records}) == 7
    for r in train_records + test_records:
        frames, info = read_video(r["video"], fps=r["fps"], max_frames=r["frames"])
        assert frames.shape == (FRAMES, 64, 64, 3) and info["indices"] == list(range(FRAMES))
        # an independent detector on the decoded frames: where is the bright card?
        shown = [card_fraction(f) > 0.5 for f in frames]
        expected = [any(n["start"] <= t < n["end"] for n in r["needles"]) for t in range(FRAMES)]
        assert shown == expected, (r["id"], shown, expected)
        starts = [t for t in range(FRAMES) if shown[t] and (t == 0 or not shown[t - 1])]  # events in the video
        if r["task"] == "counting":
            assert r["answer"] == str(len(starts))
        elif r["task"] == "retrieval":
            assert len(starts) == 1 and _best_text(frames[starts[0]], WORDS + DIGITS) == r["answer"]
        else:
            first, second = (q.strip("?, ") for q in r["question"].split("first,")[1].split(" or "))
            assert len(starts) == 2 and {first, second} == {n["text"] for n in r["needles"]}
            assert _best_text(frames[starts[0]], [first, second]) == r["answer"]


def test_task_generator_workers_and_mixed_lengths(tmp_path):
    """Neither the records nor the video files depend on the worker count (1: this test's process, whatever
    libraries earlier tests loaded; 2, 3: fresh worker processes); mixed lengths cycle per task."""
    from spava_ds.tasks import generate_split, load_records
    from spava_ds.video import read_video

    kwargs = dict(frames=[6, 8], width=32, height=32, seed=7)
    runs = [load_records(generate_split(str(tmp_path / str(w)), "train", 7, workers=w, **kwargs)) for w in (1, 2, 3)]
    strip = lambda r: {k: v for k, v in r.items() if k != "video"}  # noqa: E731 - paths differ by folder only
    assert [strip(r) for r in runs[0]] == [strip(r) for r in runs[1]] == [strip(r) for r in runs[2]]
    for records in zip(*runs):
        videos = [open(r["video"], "rb").read() for r in records]
        assert videos[0] == videos[1] == videos[2], records[0]["id"]
        frames, _ = read_video(records[0]["video"], fps=records[0]["fps"], max_frames=records[0]["frames"])
        assert frames.shape[0] == records[0]["frames"]
    assert [(r["task"], r["frames"]) for r in runs[0]] == [
        ("retrieval", 6), ("ordering", 6), ("counting", 6), ("retrieval", 8), ("ordering", 8), ("counting", 8),
        ("retrieval", 6)]


# ---- GPU: the shipped ZeRO-2 / ZeRO-3 bf16 configs through launch/finetune.py on 2 NCCL processes ----------------
def _finetune_gpu(rank, world, argv_runs):
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import finetune

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    return [finetune.train(finetune.parse_args(argv)) for argv in argv_runs]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_finetune_gpu_zero2_zero3_bf16_configs(data, tmp_path, monkeypatch):
    """configs/finetune_zero{2,3}_sp2.json (bf16, SP 2, ring) train, evaluate and export on GPUs; the two ZeRO
    stages see the same losses (bf16 tolerance), and the export differs from the initial weights."""
    from safetensors.torch import load_file

    out, train, test = data
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    runs = {}
    for stage in (2, 3):
        runs[stage] = str(tmp_path / f"zero{stage}")
        summary, = run_distributed(_finetune_gpu, 2, [[
            "--deepspeed_config", os.path.join(ROOT, "configs", f"finetune_zero{stage}_sp2.json"), "--model",
            _model_dir(), "--train", train, "--eval", test, "--max_steps", "4", "--num_workers", "1",
            "--eval_max_new_tokens", "2", "--output", runs[stage]]], backend="nccl", timeout=300)[0]
        assert summary["steps"] == 4 and 0.0 <= summary["eval"]["accuracy"] <= 1.0
    losses = {stage: _losses(path) for stage, path in runs.items()}
    assert sorted(losses[2]) == sorted(losses[3]) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert np.isfinite(losses[2][step]) and losses[3][step] == pytest.approx(losses[2][step], rel=3e-2)
    # the warmup starts at lr 0: the first steps repeat the initial loss; by step 4 the weights have moved
    assert abs(losses[2][4] - losses[2][1]) > 1e-3 * abs(losses[2][1])
    initial = load_file(os.path.join(_model_dir(), "model.safetensors"))
    for path in runs.values():
        exported = load_file(os.path.join(path, "model", "model.safetensors"))
        assert exported.keys() == initial.keys()
        assert any(not torch.equal(exported[k].float(), initial[k].float()) for k in initial)


@pytest.mark.parametrize("option, value, message", [
    ("--lr", "-1", "--lr must be > 0, got -1.0"), ("--lr", "0", "--lr must be > 0, got 0.0"),
    ("--warmup-ratio", "1.5", "--warmup-ratio must be in [0, 1], got 1.5")])
def test_finetune_refuses_a_bad_learning_rate_or_warmup(option, value, message, capsys):
    """A bad --lr or --warmup-ratio is argparse's error (exit 2), not a run that trains with it."""
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import finetune

    argv = ["--deepspeed-config", "ds.json", "--model", _model_dir(), "--train", "train.jsonl", "--output", "run"]
    assert finetune.parse_args(argv + [option, "0.5" if option == "--warmup-ratio" else "1e-4"])  # good values pass
    with pytest.raises(SystemExit) as exit_info:
        finetune.parse_args(argv + [option, value])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
