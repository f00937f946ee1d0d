"""Long-sequence fine-tuning at scale, on the CPU with the tiny shape (spava_ds.train_model, spava_ds.training,
launch/finetune.py): every memory option in every mode, against one process.

* One step through ``deepspeed.initialize`` and ``train_step``'s backward, as launch/finetune.py runs it, on a
  synthetic sample whose blocks have unequal lengths: in the exact modes (``ring``, ``ulysses``, DeepSpeed's own
  ``DistributedAttention`` on contiguous shards) the loss and every parameter's gradient after DeepSpeed's reduction
  equal transformers' own model on the whole sequence (SDPA, its own label shift and loss); in mode ``spava`` they
  equal the single-process simulation of the W ranks (``spava_session(simulate=True)``). Each mode runs with ZeRO-3
  (the shipped configs, fp32 here) and every option at once: frozen vision tower, activation checkpointing with CPU
  offload, the MLP in 3 pieces (TiledMLP), the loss in pieces of 4 labels; ring also with ZeRO-2 and no option.
  W = 2, and W = 3 for the exact modes with the optimizer-offload config.
* 20 optimizer steps of ring and ulysses on 2 ranks give dense's losses and gradient norms on one process.
* ``launch/check_train_parity.py``: ring and ulysses at W = 1, and over 2 gloo ranks through torch.distributed.run
  (``--world 2``), follow transformers' own training on one process.
* ``launch/finetune.py --model-shape tiny --synthetic-tokens N`` trains with every memory flag and exports weights
  that load; bad input gets clear errors.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from dist_utils import child_env, run_distributed  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = 300  # 60 frame pairs of 4 video tokens, 60 text tokens; on 2 ranks the zigzag blocks differ in length
GRID = (4, 4)
ALL_OPTIONS = dict(freeze_vision=True, checkpoint_layers=True, offload_checkpoints=True, mlp_shards=3, loss_tile=4)


def _config(name: str, **overrides) -> dict:
    """A shipped config in fp32 (gradients compare at 1e-4 here) without its schedule and spava block."""
    with open(os.path.join(ROOT, "configs", name), encoding="utf-8") as f:
        ds = json.load(f)
    for key in ("scheduler", "spava", "sequence_parallel_size"):
        ds.pop(key, None)
    ds["bf16"] = {"enabled": False}
    ds["optimizer"]["params"]["lr"] = 1e-3
    return dict(ds, **overrides)


ZERO2 = dict(_config("train_zero3_bf16.json"), zero_optimization={"stage": 2})
ZERO3 = _config("train_zero3_bf16.json")
ZERO3_OFFLOAD = _config("train_zero3_offload.json")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny shape, randomly initialised once and saved, so that every process starts from the same weights."""
    from spava_ds.train_model import build_model

    torch.manual_seed(0)
    model, _ = build_model("tiny", torch.float32, torch.device("cpu"), "sdpa")
    path = str(tmp_path_factory.mktemp("tiny"))
    model.save_pretrained(path)
    return path


def _sample(model):
    from spava_ds.training import synthetic_sample

    return synthetic_sample(model, TOKENS, GRID)


def _reference(model_dir: str, mode: str, world: int):
    """(loss, grads) of one process: transformers' model on the whole sequence with its own label shift and loss;
    for spava its attention is the simulation of ``world`` ranks."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from spava_ds import SpavaConfig, ZigzagLayout, comm
    from spava_ds.integrations.transformers import spava_attn_implementation, spava_session

    attn = "sdpa" if mode != "spava" else spava_attn_implementation(AutoConfig.from_pretrained(model_dir))
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    sample = _sample(model)
    ids = sample["input_ids"]
    labels = torch.full_like(ids, -100)
    labels[:, 1:] = sample["labels"][:, :-1]  # ours are pre-shifted: labels[i] is token i + 1
    config = SpavaConfig(mode="spava")
    layout = ZigzagLayout(sample["context_len"], sample["query_len"], world, config)
    simulated = mode == "spava"
    with spava_session(layout, config, comm.SELF, False, True) if simulated else contextlib.nullcontext():
        out = model(input_ids=ids, labels=labels, mm_token_type_ids=(ids == model.config.video_token_id).int() * 2,
                    pixel_values_videos=sample["pixel_values_videos"], video_grid_thw=sample["video_grid_thw"],
                    second_per_grid_ts=torch.tensor([1.0]))
    out.loss.backward()
    return out.loss.item(), {n: p.grad for n, p in model.named_parameters()}


def _step_worker(rank, world, model_dir, runs):
    """One forward and backward per (mode, options, DeepSpeed config) through deepspeed.initialize; the loss summed
    over the SP group and the full gradients after DeepSpeed's reduction (before the optimizer step)."""
    import deepspeed
    import deepspeed.ops
    from deepspeed.utils import safe_get_full_grad

    from spava_ds import SpavaConfig
    from spava_ds.step_timer import StepTimer
    from spava_ds.train_model import MemoryOptions, apply_memory_options, build_model, trainable_parameters
    from spava_ds.training import VideoQAModel, sequence_loss, sp_group, training_attn_implementation

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    group = sp_group(world)
    results = []
    for mode, options, ds in runs:
        options = MemoryOptions(**options)
        model, handle = build_model(model_dir, torch.float32, torch.device("cpu"), training_attn_implementation(), ds)
        apply_memory_options(model, options)
        qa = VideoQAModel(model, SpavaConfig(), group, options)
        qa.set_mode(mode)
        engine, *_ = deepspeed.initialize(model=qa, model_parameters=trainable_parameters(qa), config=ds)
        del handle
        qa.train()  # transformers checkpoints layers in training mode only
        timer = StepTimer(torch.device("cpu"))
        qa.set_timer(timer)
        share = engine(_sample(model))
        timer.in_backward = True  # as train_step: attention calls from here on are recomputations
        engine.backward(share * world)
        grads = {n: safe_get_full_grad(p).clone() for n, p in qa.model.named_parameters() if p.requires_grad}
        results.append({"loss": sequence_loss(share, group).item(), "grads": grads, "phases": set(timer.seconds()),
                        "frozen": [n for n, p in qa.model.named_parameters() if not p.requires_grad]})
        engine.destroy()
    return results


def _check_against_one_process(model_dir: str, world: int, runs):
    results = run_distributed(_step_worker, world, model_dir, runs, timeout=600)
    references = {}
    for i, (mode, options, _) in enumerate(runs):
        key = "spava" if mode == "spava" else "exact"
        if key not in references:
            references[key] = _reference(model_dir, mode, world)
        ref_loss, ref_grads = references[key]
        mine = results[0][i]
        for r in results:  # the ranks agree with each other and with the reference
            assert r[i]["loss"] == pytest.approx(ref_loss, rel=1e-5), (mode, options, r[i]["loss"], ref_loss)
        assert mine["grads"], (mode, options)
        for name, grad in mine["grads"].items():
            ref = ref_grads[name]
            err = (grad - ref).abs().max().item() / (ref.abs().max().item() + 1e-8)
            assert err < 2e-4, (mode, options, name, err)
        # the timer saw the attention's forward and backward, and the recomputation exactly when checkpointing
        assert {"vision", "loss", "attention_forward", "attention_backward"} <= mine["phases"], mine["phases"]
        assert ("attention_recompute" in mine["phases"]) == bool(options.get("checkpoint_layers")), mine["phases"]
        frozen = mine["frozen"]
        if options.get("freeze_vision"):
            assert frozen and all(".visual." in n or n.startswith("model.visual") for n in frozen), frozen
            assert not any("visual" in n for n in mine["grads"])
        else:
            assert not frozen and any("visual" in n for n in mine["grads"])  # the vision tower trained


def test_every_option_in_every_mode_matches_one_process_w2(checkpoint):
    modes = ("ring", "ulysses", "deepspeed-ulysses", "spava")
    runs = [("ring", {}, ZERO2)] + [(m, ALL_OPTIONS, ZERO3) for m in modes]
    _check_against_one_process(checkpoint, 2, runs)


def test_exact_modes_with_every_option_and_optimizer_offload_w3(checkpoint):
    runs = [(m, ALL_OPTIONS, ZERO3_OFFLOAD) for m in ("ring", "ulysses", "deepspeed-ulysses")]
    _check_against_one_process(checkpoint, 3, runs)


# ---- 20 steps: ring and ulysses on 2 ranks follow dense on one -----------------------------------------------------
def _twenty_steps(rank, world, model_dir, modes):
    """Loss and gradient norm of 20 steps per mode; ``dense`` runs on every rank alone (its group is the rank
    itself: DeepSpeed averages equal gradients, which changes nothing)."""
    import deepspeed
    import deepspeed.ops

    from spava_ds import SpavaConfig, comm
    from spava_ds.train_model import build_model, trainable_parameters
    from spava_ds.training import VideoQAModel, sequence_loss, sp_group, synthetic_sample, train_step
    from spava_ds.training import training_attn_implementation

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    group = sp_group(world)
    curves = {}
    for mode in modes:
        model, _ = build_model(model_dir, torch.float32, torch.device("cpu"), training_attn_implementation())
        sp = 1 if mode == "dense" else world
        qa = VideoQAModel(model, SpavaConfig(mode=mode), comm.SELF if sp == 1 else group)
        engine, *_ = deepspeed.initialize(model=qa, model_parameters=trainable_parameters(qa), config=ZERO2)
        qa.train()
        curve = []
        for step in range(20):
            share = train_step(engine, synthetic_sample(model, TOKENS, GRID, seed=step % 4), sp)
            curve.append((sequence_loss(share, qa.group).item(), float(engine.get_global_grad_norm())))
        curves[mode] = curve
        engine.destroy()
    return curves


def test_twenty_steps_of_ring_and_ulysses_give_dense_losses_and_grad_norms(checkpoint):
    sp = run_distributed(_twenty_steps, 2, checkpoint, ["dense", "ring", "ulysses"], timeout=600)[0]
    dense = sp["dense"]
    losses = [loss for loss, _ in dense]
    assert losses[-1] < losses[0] - 0.5, losses  # it trains: the comparison is not between flat lines
    for mode in ("ring", "ulysses"):
        for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(sp[mode], dense)):
            assert loss == pytest.approx(ref_loss, rel=1e-4), (mode, step, loss, ref_loss)
            assert norm == pytest.approx(ref_norm, rel=1e-3), (mode, step, norm, ref_norm)


# ---- launch/finetune.py at a named shape on synthetic samples ------------------------------------------------------
def _finetune(rank, world, argv):
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import deepspeed.ops

    import finetune

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return finetune.train(finetune.parse_args(argv))


def test_finetune_trains_a_model_shape_on_synthetic_samples_with_every_memory_flag(tmp_path):
    from transformers import AutoModelForImageTextToText

    config = tmp_path / "ds.json"
    config.write_text(json.dumps(dict(_config("train_zero3_offload.json"), sequence_parallel_size="auto",
                                      spava={"mode": "spava"})))
    out = tmp_path / "run"
    summary = run_distributed(_finetune, 2, [
        "--deepspeed_config", str(config), "--model-shape", "tiny", "--synthetic-tokens", str(TOKENS),
        "--synthetic-grid", *map(str, GRID), "--max_steps", "2", "--output", str(out), "--freeze-vision",
        "--checkpoint-layers", "--offload-checkpoints", "--mlp-shards", "2", "--loss-tile", "8"], timeout=600)[0]
    assert summary["steps"] == 2
    with open(out / "metrics.jsonl", encoding="utf-8") as f:
        entries = [json.loads(line) for line in f]
    assert [e["step"] for e in entries] == [1, 2] and all(e["loss"] > 0 for e in entries)
    assert len({round(e["loss"], 6) for e in entries}) == 2  # a new sample every step
    model = AutoModelForImageTextToText.from_pretrained(str(out / "model"))
    assert model.config.text_config.num_attention_heads == 12


def test_bad_input_gets_clear_errors(checkpoint):
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import finetune

    from spava_ds import SpavaConfig
    from spava_ds.train_model import MemoryOptions, build_model, shape_config
    from spava_ds.training import VideoQAModel, synthetic_sample

    with pytest.raises(ValueError, match="offload_checkpoints needs checkpoint_layers"):
        MemoryOptions(offload_checkpoints=True)
    with pytest.raises(ValueError, match="mlp_shards"):
        MemoryOptions(mlp_shards=-1)
    with pytest.raises(ValueError, match="unknown model shape '13b'"):
        shape_config("13b")
    model, _ = build_model(checkpoint, torch.float32, torch.device("cpu"), "sdpa")
    with pytest.raises(ValueError, match="cannot hold one frame pair"):
        synthetic_sample(model, 40, GRID)
    qa = VideoQAModel(model, SpavaConfig())
    with pytest.raises(ValueError, match="training mode must be one of"):
        qa.set_mode("star-ring")
    qa.set_mode("deepspeed-ulysses")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    torch.distributed.init_process_group("fake", store=FakeStore(), rank=0, world_size=7)
    try:  # the layout is checked before any collective: a group that moves nothing shows the errors
        qa.set_group(None)
        with pytest.raises(ValueError, match="12 query and 6 KV heads do not split over 7 ranks"):
            qa.layout({"context_len": 250, "query_len": 52})
        torch.distributed.destroy_process_group()
        torch.distributed.init_process_group("fake", store=FakeStore(), rank=0, world_size=3)
        qa.set_group(None)
        with pytest.raises(ValueError, match="302 tokens do not split over 3 ranks"):
            qa.layout({"context_len": 250, "query_len": 52})
    finally:
        torch.distributed.destroy_process_group()
    for argv, message in (
            (["--model-shape", "tiny", "--train", "x.jsonl"], "no tokenizer to read --train"),
            (["--model-shape", "tiny", "--synthetic-tokens", "300", "--max_steps", "1", "--eval", "t.jsonl"],
             "--eval needs a tokenizer"),
            (["--model", checkpoint, "--synthetic-tokens", "300"], "needs --max_steps"),
            (["--model-shape", "tiny", "--synthetic-tokens", "300", "--max_steps", "1", "--offload-checkpoints"],
             "offload_checkpoints needs checkpoint_layers")):
        with pytest.raises(SystemExit):
            finetune.parse_args(["--deepspeed_config", "c.json", "--output", "o"] + argv)


# ---- launch/check_train_parity.py: exact modes at W = 1 against transformers itself ---------------------------------
def _parity(rank, world, argv):
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import check_train_parity

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    return check_train_parity.main(argv)


def test_parity_script_passes_on_the_cpu(tmp_path, capsys):
    """fp32 on the CPU: ring and ulysses at W = 1 follow transformers' own training to 1e-4 over 3 steps."""
    config = tmp_path / "fp32.json"
    config.write_text(json.dumps(ZERO3))
    out = tmp_path / "parity.jsonl"
    assert run_distributed(_parity, 1, ["--shape", "tiny", "--tokens", str(TOKENS), "--grid", *map(str, GRID),
                                        "--steps", "3", "--lr", "1e-3", "--floor", "1e-4", "--config", str(config),
                                        "--out", str(out)], timeout=600) == [0]
    with open(out, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    assert sorted({e["run"] for e in lines}) == ["eager", "ring", "transformers", "ulysses"] and len(lines) == 12
    losses = [e["loss"] for e in lines if e["run"] == "transformers"]
    assert len(set(losses)) == 3  # steps see different samples and weights
    assert {e["world"] for e in lines} == {1}


def _parity_script(argv, gpu: bool) -> subprocess.CompletedProcess:
    """launch/check_train_parity.py in a process of its own: it starts its runs' processes itself."""
    env = child_env(DS_ACCELERATOR="cuda" if gpu else "cpu")
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on the CPU even on a GPU machine
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "check_train_parity.py"), *argv],
                          capture_output=True, text=True, env=env, timeout=600)


def test_parity_script_runs_ring_and_ulysses_over_two_ranks_on_the_cpu(tmp_path):
    """--world 2: ring and ulysses on 2 gloo ranks follow transformers on one process to 1e-4 over 3 fp32 steps."""
    config = tmp_path / "fp32.json"
    config.write_text(json.dumps(ZERO3))
    out = tmp_path / "parity.jsonl"
    res = _parity_script(["--shape", "tiny", "--tokens", str(TOKENS), "--grid", *map(str, GRID), "--steps", "3",
                          "--lr", "1e-3", "--floor", "1e-4", "--config", str(config), "--world", "2", "--out",
                          str(out)], gpu=False)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    verdict = res.stdout.splitlines()[-3:]
    assert verdict[0].startswith("ring at W = 2:") and verdict[1].startswith("ulysses at W = 2:"), verdict
    assert verdict[2] == "PASS", verdict
    with open(out, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == 12 and {(e["run"], e["world"]) for e in lines} == {
        ("transformers", 1), ("eager", 1), ("ring", 2), ("ulysses", 2)}


def test_parity_script_refuses_a_bad_world(monkeypatch, capsys):
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import check_train_parity

    with pytest.raises(SystemExit):
        check_train_parity.parse_args(["--world", "0"])
    assert "--world 0: the ranks of ring and ulysses must be at least 1" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit):
        check_train_parity.parse_args(["--world", "2"])
    assert "--world 2: a rank takes a GPU and this machine shows 1" in capsys.readouterr().err


@pytest.mark.gpu
def test_parity_on_one_gpu_in_bf16(tmp_path):
    """The GPU check at a small size (the full one: ``python launch/check_train_parity.py``, docs/finetune.md)."""
    assert run_distributed(_parity, 1, ["--shape", "tiny", "--tokens", "4096", "--steps", "20", "--lr", "1e-4"],
                           backend="nccl", timeout=600) == [0]


@pytest.mark.gpu(count=2)
def test_parity_over_two_gpus_in_bf16():
    """ring and ulysses over 2 GPUs (NCCL) against transformers on one, at the one-GPU test's size."""
    res = _parity_script(["--shape", "tiny", "--tokens", "4096", "--steps", "20", "--lr", "1e-4", "--world", "2"],
                         gpu=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert res.stdout.splitlines()[-1] == "PASS"
