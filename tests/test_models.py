"""Model families (``spava_ds.models``): Qwen2.5-VL, Qwen3-VL, InternVL3, Qwen2 and Llama, each a tiny random
checkpoint (``spava_ds.benchmarks.tiny``, ``launch/make_tiny_model.py``; the new ones made here in a temporary folder).

* prompts: the video part of each family's prompt is what transformers' own processor writes (Qwen3-VL's timestamps,
  InternVL's line per frame), through the checkpoint's chat template; the embedded Qwen2.5-VL prompt is unchanged;
* at W = 2 and 3 (gloo): the exact modes (ring, ulysses) and Spava with budgets covering the blocks give
  transformers' own tokens and logits (its ``generate`` with SDPA and its own KV cache on one process), through the
  engine and through ``model.generate()`` with a ``SpavaCache``; Spava with a small budget differs from dense but the
  engine and ``generate()`` agree on it; the frame-parallel vision features (Qwen3-VL's DeepStack ones included)
  equal one device's;
* sampling: ``generate(do_sample=True, ...)`` draws transformers' own tokens for the same seed at W = 1, and at
  W = 2 every rank draws rank 0's tokens (each rank seeded differently);
* fine-tuning: the loss and gradients of Qwen3-VL and InternVL on 2 ranks (ring) equal transformers' own on one;
  their memory options (frozen tower, checkpointed layers) keep the loss and the decoder's gradients;
* bad inputs to ``generate()`` are refused with a message.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from spava_ds import SpavaConfig, comm  # noqa: E402
from spava_ds.models import cache_kwarg  # noqa: E402

from dist_utils import child_env, run_distributed  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("qwen2_5_vl", "qwen3_vl", "internvl", "qwen2", "llama")
MAX_NEW = 5
QUESTION = "What is in this video?"
CONTEXT = " ".join(["the quick brown fox jumps over the lazy dog"] * 8)
EXACT = {"ring": SpavaConfig(mode="ring", anchor_len=16),
         "spava_full": SpavaConfig(anchor_len=16, passing_len=10_000),
         "ulysses": SpavaConfig(mode="ulysses", anchor_len=8)}
APPROX = SpavaConfig(anchor_len=16, passing_len=4)
SAMPLING = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """{family: checkpoint dir} and a video of 12 frames (6 temporal steps) at 160x128."""
    from spava_ds.assets import tiny_model_dir
    from spava_ds.video import write_synthetic_video

    folder = tmp_path_factory.mktemp("families")
    from spava_ds.benchmarks.tiny import write_family_checkpoint

    dirs = {f: write_family_checkpoint(str(folder / f), f) for f in FAMILIES if f != "qwen2_5_vl"}
    dirs["qwen2_5_vl"] = tiny_model_dir()
    video = write_synthetic_video(str(folder / "clip.mp4"), num_frames=12, width=160, height=128, fps=2, seed=1)
    return dirs, video


def _engine(model_dir, config, base=None, group=None):
    from spava_ds.engine import SpavaEngine

    if base is None:
        return SpavaEngine.from_pretrained(model_dir, config, group=group, fused_vision=False)
    return SpavaEngine(base.model, base.tokenizer, config, group, base.settings, fused_vision=False)


def _inputs(engine, video):
    return engine.video_inputs(video, QUESTION) if engine.is_video_model else engine.chat_inputs(CONTEXT, QUESTION)


def _generate(engine, inputs, config, group=None, **kwargs):
    """``model.generate`` with a SpavaCache: (new tokens, logits of every step [steps, V])."""
    from spava_ds.models import spava_cache

    model = engine.model
    args = engine.family.generate_inputs(inputs, group)
    cache = spava_cache(model, config, group, None if engine.is_video_model else inputs["context_len"])
    with torch.no_grad():
        out = model.generate(**args, **{cache_kwarg(model): cache}, max_new_tokens=MAX_NEW,
                             output_logits=True, return_dict_in_generate=True, **kwargs)
    return out.sequences[0, args["input_ids"].shape[1]:].tolist(), torch.stack(out.logits)[:, 0].float()


def _heads_split(engine, world) -> bool:
    """Whether Ulysses splits this model's heads over ``world`` ranks (the embedded Qwen2.5-VL has 4 and 2)."""
    cfg = engine.model.config.get_text_config()
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    return hq % world == 0 and (hkv % world == 0 or world % hkv == 0)


# ---- prompts ------------------------------------------------------------------------------------------------------
def test_prompts_follow_the_processors(setup):
    """Each family's video text is what transformers' own processor writes, called on the same frames."""
    from types import SimpleNamespace

    from transformers.models.internvl.processing_internvl import InternVLProcessor
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.video_utils import VideoMetadata

    dirs, video = setup
    engines = {f: _engine(dirs[f], SpavaConfig(mode="dense")) for f in FAMILIES}
    # Qwen2.5-VL: the prompt the embedded checkpoints were trained and evaluated with, written out.
    qwen25 = engines["qwen2_5_vl"]
    inputs = _inputs(qwen25, video)
    ids = qwen25.tokenizer(f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           f"<|vision_start|>{'<|video_pad|>' * int(inputs['video_grid_thw'].prod() // 4)}"
                           f"<|vision_end|>{QUESTION}<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    assert inputs["input_ids"][0].tolist() == ids
    assert inputs["context_len"] == ids.index(qwen25.model.config.vision_end_token_id) + 1
    assert qwen25.family.answer_ids("yes") == qwen25.tokenizer("yes<|im_end|>")["input_ids"]

    # Qwen3-VL: <t seconds><|vision_start|> pads <|vision_end|> per temporal step, the template's outer pair kept.
    qwen3 = engines["qwen3_vl"]
    plan = qwen3.video_plan(video)
    inputs = _inputs(qwen3, video)
    tok = qwen3.tokenizer
    stand_in = SimpleNamespace(video_processor=SimpleNamespace(merge_size=2, temporal_patch_size=2),
                               vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>",
                               video_token="<|video_pad|>")
    stand_in._calculate_timestamps = lambda *a: Qwen3VLProcessor._calculate_timestamps(stand_in, *a)
    meta = VideoMetadata(total_num_frames=plan.metadata.num_frames, fps=plan.metadata.fps,
                         frames_indices=list(plan.frame_indices))
    expanded = Qwen3VLProcessor.replace_video_token(
        stand_in, {"video_grid_thw": inputs["video_grid_thw"], "video_metadata": [meta]}, 0)
    text = qwen3.family.render([dict(role="user", content=[dict(type="video"), dict(type="text", text=QUESTION)])])
    assert inputs["input_ids"][0].tolist() == tok(text.replace("<|video_pad|>", expanded))["input_ids"]
    assert "<0.2 seconds><|vision_start|>" in tok.decode(inputs["input_ids"][0])
    assert tok.decode(inputs["input_ids"][0, inputs["context_len"]:]).startswith(QUESTION)
    assert inputs["position_ids"].shape == (3, 1, inputs["input_ids"].shape[1])

    # InternVL: a line per frame, <img> <IMG_CONTEXT> x tokens-per-frame </img>
    intern = engines["internvl"]
    inputs = _inputs(intern, video)
    frames = len(intern.video_plan(video).frame_indices)
    stand_in = SimpleNamespace(start_image_token="<img>", end_image_token="</img>", image_token="<IMG_CONTEXT>",
                               image_seq_length=intern.family.tokens_per_frame)
    expanded = InternVLProcessor.replace_video_token(stand_in, {"pixel_values_videos": [torch.zeros(frames)]}, 0)
    text = intern.family.render([dict(role="user", content=[dict(type="video"), dict(type="text", text=QUESTION)])])
    assert inputs["input_ids"][0].tolist() == intern.tokenizer(text.replace("<video>", expanded))["input_ids"]
    assert torch.equal(inputs["position_ids"], torch.arange(inputs["input_ids"].shape[1])[None])
    assert intern.tokenizer.decode(inputs["input_ids"][0, inputs["context_len"]:]).startswith("\n" + QUESTION)

    # Text: the chat template around context + question; the question starts the query.
    text_engine = engines["qwen2"]
    inputs = text_engine.chat_inputs(CONTEXT, QUESTION, answer_prefix="The")
    decoded = text_engine.tokenizer.decode(inputs["input_ids"][0])
    assert decoded.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text_engine.tokenizer.decode(inputs["input_ids"][0, inputs["context_len"]:]) == \
        f"{QUESTION}<|im_end|>\n<|im_start|>assistant\nThe"


def test_fused_vision_attention_of_qwen3_vl(setup):
    """The one-call variable-length vision attention (flex_attention with a block-diagonal mask, eager on the CPU)
    gives the Qwen3-VL tower's own features, DeepStack's included."""
    from spava_ds.integrations.qwen_vision import disable_fused_vision_attention, enable_fused_vision_attention

    dirs, video = setup
    engine = _engine(dirs["qwen3_vl"], SpavaConfig(mode="dense"))
    inputs = _inputs(engine, video)
    with torch.no_grad():
        plain = engine.family.encode(inputs, comm.SELF)
        enable_fused_vision_attention(engine.model, backend="flex_eager", block_size=16)
        fused = engine.family.encode(inputs, comm.SELF)
        assert disable_fused_vision_attention(engine.model) == 3
    assert len(plain) == 3 and all(_close(a, b, 1e-5) for a, b in zip(plain, fused))


# ---- engine, generate() and fine-tuning against transformers: W = 2 and 3 spawned once each, W = 1 here --------------
def _reference(engine, video):
    """transformers' own model (SDPA) and generate on one process, from the whole video's pixels: greedy tokens and
    logits, and the tokens sampled with seed 100."""
    args = _hf_inputs(engine, _inputs(engine, video))
    ref = engine.family.model_class().from_pretrained(engine.model.name_or_path, attn_implementation="sdpa").eval()
    with torch.no_grad():
        greedy = ref.generate(**args, max_new_tokens=MAX_NEW, output_logits=True, return_dict_in_generate=True)
        torch.manual_seed(100)
        sampled = ref.generate(**args, max_new_tokens=MAX_NEW, **SAMPLING)
    new = args["input_ids"].shape[1]
    return dict(tokens=greedy.sequences[0, new:].tolist(), logits=torch.stack(greedy.logits)[:, 0].float(),
                sampled=sampled[0, new:].tolist())


def _hf_inputs(engine, inputs) -> dict:
    """What the family's processor gives transformers' model for ``inputs``: every pixel of the video."""
    family = engine.family
    if not engine.is_video_model:
        return family.generate_inputs(inputs)
    return dict(family.prompt_kwargs(inputs), **{family.pixel_key: family.model_pixels(inputs["pixel_values_videos"])})


@pytest.fixture(scope="module")
def references(setup):
    dirs, video = setup
    out = {}
    for name, model_dir in dirs.items():
        dense = _engine(model_dir, SpavaConfig(mode="dense"), group=comm.SELF)
        out[name] = _reference(dense, video)
        if dense.is_video_model:
            out[name]["features"] = dense.family.encode(_inputs(dense, video), comm.SELF)
    return out


def _checks(rank, world, dirs, video):
    """On every rank of W: each family through the engine and generate() in the exact modes and Spava, sampling,
    the frame-parallel features; at W = 2 also one fine-tuning step of the two new video families."""
    from spava_ds.training import add_answer

    torch.manual_seed(100 + rank)  # every rank differently: generate() must make them agree
    out = {}
    for name, model_dir in dirs.items():
        base = _engine(model_dir, EXACT["ring"])
        inputs = _inputs(base, video)
        res = out[name] = {}
        answer = base.generate(inputs, _gen())
        res["engine_ring"] = (answer.tokens, answer.first_logits)
        res["generate_spava_full"] = _generate(base, inputs, EXACT["spava_full"])
        if _heads_split(base, world):
            res["generate_ulysses"] = _generate(base, inputs, EXACT["ulysses"])
        approx = _engine(model_dir, APPROX, base)
        res["engine_spava"] = approx.generate(inputs, _gen()).first_logits
        res["generate_spava"] = _generate(approx, inputs, APPROX)[1][0]
        if base.is_video_model:
            res["features"] = base.family.encode(inputs, None)
        if world == 2 and name == "qwen3_vl":
            res["sampled"] = _generate(base, inputs, EXACT["ring"], **SAMPLING)[0]
        if world == 2 and name in TRAINED:
            res["train"] = _loss_and_grads(base.model.train(), add_answer(base, inputs, ANSWER))
    return out


_RUNS = {}


def _run(setup, world):
    """The spawned checks at ``world`` ranks, run once for the tests that read them."""
    if world not in _RUNS:
        dirs, video = setup
        _RUNS[world] = run_distributed(_checks, world, dirs, video, timeout=540)
    return _RUNS[world]


def _gen():
    from spava_ds.engine import GenerationConfig

    return GenerationConfig(max_new_tokens=MAX_NEW)


def _close(a, b, tol=1e-4):
    return (a - b).abs().max().item() < tol


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world", [2, 3])
def test_families_match_transformers(setup, references, world):
    per_rank = _run(setup, world)
    for name, ref in references.items():
        for rank, res in enumerate(per_rank):
            got = res[name]
            tokens, first = got["engine_ring"]
            assert tokens[:len(ref["tokens"])] == ref["tokens"] and _close(first, ref["logits"][0]), (name, rank)
            for key in ("generate_spava_full", "generate_ulysses"):
                if key in got:
                    assert got[key][0] == ref["tokens"] and _close(got[key][1], ref["logits"]), (name, rank, key)
            # Spava with a small budget is an approximation here, the same through the engine and generate().
            assert not _close(got["engine_spava"], ref["logits"][0]), (name, rank)
            assert _close(got["generate_spava"], got["engine_spava"], 1e-5), (name, rank)
            if "features" in ref:  # frame-parallel encoding == one device's (DeepStack fields included)
                assert len(got["features"]) == len(ref["features"]) and all(
                    _close(a, b, 1e-5) for a, b in zip(got["features"], ref["features"])), (name, rank)
    assert all("generate_ulysses" in per_rank[0][f] for f in ("qwen3_vl", "internvl", "qwen2", "llama"))
    if world == 2:  # sampling: every rank draws rank 0's tokens, which are transformers' for rank 0's seed
        ref = references["qwen3_vl"]
        assert all(r["qwen3_vl"]["sampled"] == ref["sampled"] for r in per_rank)
        assert ref["sampled"] != ref["tokens"]


def test_generate_at_one_rank_is_transformers(setup, references):
    """W = 1 (no process group): greedy and sampled tokens are transformers' own for the same seed."""
    dirs, video = setup
    for name in ("qwen3_vl", "internvl", "llama"):
        engine = _engine(dirs[name], SpavaConfig())
        ref = references[name]
        inputs = _inputs(engine, video)
        tokens, logits = _generate(engine, inputs, SpavaConfig())
        assert tokens == ref["tokens"] and _close(logits, ref["logits"]), name
        torch.manual_seed(100)
        assert _generate(engine, inputs, SpavaConfig(), **SAMPLING)[0] == ref["sampled"], name


# Fine-tuning: a few parameters of each part (embeddings, a decoder layer, the DeepStack merger, InternVL's
# projector, both patch embeddings)
TRAINED = ("qwen3_vl", "internvl")
ANSWER = "a red square"
GRADS = ("embed_tokens.weight", "layers.0.self_attn.q_proj.weight", "deepstack_merger_list.0.linear_fc1.weight",
         "multi_modal_projector.linear_1.weight", "patch_embed.proj.weight", "patch_embeddings.projection.weight")


def _loss_and_grads(model, sample):
    from spava_ds.training import VideoQAModel

    share = VideoQAModel(model, EXACT["ring"])(sample)
    share.backward()
    return share.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                          if p.grad is not None and any(g in n for g in GRADS)}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", TRAINED)
def test_finetune_step_matches_transformers(setup, name):
    """One training step's loss and gradients on 2 ranks (ring; their sum over the ranks) equal transformers' own
    loss and backward on one process, for the video families with DeepStack and with InternVL's tiles."""
    from spava_ds.training import IGNORE_INDEX, add_answer

    dirs, video = setup
    results = [r[name]["train"] for r in _run(setup, 2)]
    engine = _engine(dirs[name], SpavaConfig(mode="dense"), group=comm.SELF)
    sample = add_answer(engine, _inputs(engine, video), ANSWER)
    labels = torch.full_like(sample["labels"], IGNORE_INDEX)
    labels[:, 1:] = sample["labels"][:, :-1]  # transformers shifts them itself
    ref = engine.family.model_class().from_pretrained(dirs[name], attn_implementation="sdpa").train()
    loss = ref(**_hf_inputs(engine, sample), labels=labels).loss
    loss.backward()
    reference = dict(ref.named_parameters())
    assert abs(sum(r[0] for r in results) - loss.item()) < 1e-5
    assert len(results[0][1]) >= 4, sorted(results[0][1])
    for n, grad in results[0][1].items():
        total = grad + results[1][1][n]  # the SP sum of the ranks' gradients
        ref_grad = reference[n].grad
        assert _close(total, ref_grad, 1e-5 * (1 + ref_grad.abs().max().item())), n


VISION_PARAMS = {"qwen3_vl": ("model.visual.",), "internvl": ("model.vision_tower.", "model.multi_modal_projector.")}


@pytest.mark.parametrize("name", TRAINED)
def test_memory_options_hold_for_the_families(setup, name):
    """A family checkpoint built for training (``train_model.build_model``: the class from its config) with the vision
    tower frozen and the decoder layers checkpointed gives the plain model's loss and decoder gradients; exactly the
    tower's parameters are frozen and get none; the timer times the vision phase. Synthetic samples refuse it."""
    from spava_ds.step_timer import StepTimer
    from spava_ds.train_model import MemoryOptions, apply_memory_options, build_model
    from spava_ds.training import VideoQAModel, add_answer, synthetic_sample, training_attn_implementation

    dirs, video = setup
    engine = _engine(dirs[name], SpavaConfig(mode="dense"), group=comm.SELF)
    sample = add_answer(engine, _inputs(engine, video), ANSWER)

    def step(options):
        model = build_model(dirs[name], torch.float32, torch.device("cpu"), training_attn_implementation())[0]
        apply_memory_options(model, options)
        qa = VideoQAModel(model.train(), EXACT["ring"], comm.SELF, options)
        qa.set_timer(StepTimer(torch.device("cpu")))
        loss = qa(sample)
        loss.backward()
        return loss.item(), dict(model.named_parameters()), qa.timer.seconds(), model

    plain_loss, plain, _, _ = step(MemoryOptions())
    loss, params, seconds, model = step(MemoryOptions(freeze_vision=True, checkpoint_layers=True))
    assert abs(loss - plain_loss) < 1e-6 and seconds["vision"] > 0
    frozen = {n for n, p in params.items() if not p.requires_grad}
    assert frozen == {n for n in params if n.startswith(VISION_PARAMS[name])} and frozen
    assert all(params[n].grad is None for n in frozen)
    trained = [n for n in params if n not in frozen and plain[n].grad is not None]
    assert any("layers.0.self_attn" in n for n in trained)
    for n in trained:
        assert _close(params[n].grad, plain[n].grad, 1e-5 * (1 + plain[n].grad.abs().max().item())), n
    with pytest.raises(ValueError, match="synthetic samples are made for Qwen2.5-VL"):
        synthetic_sample(model, 4096)


def test_generate_refuses_bad_inputs(setup):
    from spava_ds.models import spava_cache

    dirs, video = setup
    engine = _engine(dirs["qwen2"], SpavaConfig())
    model, inputs = engine.model, engine.chat_inputs(CONTEXT, QUESTION)
    ids = inputs["input_ids"]
    kw = cache_kwarg(model)
    with pytest.raises(ValueError, match="number of prompt tokens before the question"):
        model.generate(input_ids=ids, **{kw: spava_cache(model)}, max_new_tokens=2)
    with pytest.raises(ValueError, match="one sequence: got a batch of 2"):
        model.generate(input_ids=ids.repeat(2, 1), **{kw: spava_cache(model, context_len=10)}, max_new_tokens=2)
    padded = torch.ones_like(ids)
    padded[0, 0] = 0
    with pytest.raises(ValueError, match="takes no padding"):
        model(input_ids=ids, attention_mask=padded, **{kw: spava_cache(model, context_len=10)})
    sdpa = engine.family.model_class().from_pretrained(dirs["qwen2"], attn_implementation="sdpa")
    with pytest.raises(ValueError, match="load it with attn_implementation=spava_ds"):
        spava_cache(sdpa, context_len=10)
    with pytest.raises(ValueError, match="the two-dimensional mode"):
        spava_cache(model, SpavaConfig(ulysses_degree=2), context_len=10)
    cache = spava_cache(model, context_len=inputs["context_len"])
    with torch.no_grad():
        model(input_ids=ids, **{kw: cache})
        assert cache.get_seq_length() == ids.shape[1]  # the whole sequence's tokens: decoding positions are global
        with pytest.raises(ValueError, match="decodes one token, got 2"):
            model(input_ids=ids[:, :2], **{kw: cache})


# ---- the docs' example ----------------------------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_docs_generate_example_runs(tmp_path):
    text = open(os.path.join(ROOT, "docs", "inference.md"), encoding="utf-8").read()
    code = re.search(r"<!-- generate\(\) example -->\n```python\n(.*?)```", text, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code)
    env = child_env(OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], capture_output=True, text=True, timeout=280, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "answer:" in res.stdout, res.stdout
