"""Streaming the video into the vision tower (``SpavaEngine(stream_video=True)``): each rank's tower encodes its
frames chunk by chunk as they decode (``video.VideoStream``, ``frame_parallel_stream``).

For Qwen2.5-VL, Qwen3-VL and InternVL3 tiny checkpoints, at W = 1 and W = 2 (gloo), on a video whose temporal steps
divide neither by the chunk nor by W: the streamed features (DeepStack's included) equal the non-streamed path's,
and the engine's answer and first-token logits equal the non-streamed engine's; a file whose middle is zeroed (its
metadata fine, some frames undecodable) makes every rank raise the same VideoError as without streaming, before the
vision all-gather.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("av")
pytest.importorskip("transformers")

from dist_utils import run_distributed  # noqa: E402

VIDEO_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "internvl")
QUESTION = "What is in this video?"
CHUNK_STEPS = 2  # Qwen: 7 steps (4 + 3 on two ranks); InternVL: 15 steps (8 + 7): neither divides by 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """{family: checkpoint dir}, a 15-frame video and a copy whose middle is zeroed."""
    from spava_ds.assets import tiny_model_dir
    from spava_ds.benchmarks.tiny import write_family_checkpoint
    from spava_ds.video import write_synthetic_video

    folder = tmp_path_factory.mktemp("stream")
    dirs = {f: write_family_checkpoint(str(folder / f), f) for f in VIDEO_FAMILIES if f != "qwen2_5_vl"}
    dirs["qwen2_5_vl"] = tiny_model_dir()
    video = write_synthetic_video(str(folder / "clip.mp4"), num_frames=15, width=160, height=128, fps=2, seed=3,
                                  gop=4)
    data = bytearray(open(video, "rb").read())
    data[len(data) * 4 // 10:len(data) * 6 // 10] = bytes(len(data) * 6 // 10 - len(data) * 4 // 10)
    zeroed = folder / "zeroed.mp4"
    zeroed.write_bytes(bytes(data))
    return dirs, video, str(zeroed)


def _error(call) -> str:
    from spava_ds.video import VideoError

    with pytest.raises(VideoError) as err:
        call()
    return str(err.value)


def _compare(rank, world, dirs, video, zeroed):
    """Per family on this rank: the largest feature and logit differences streamed vs not, the tokens of both,
    the steps of the streamed source, the timings' parts and both paths' errors on the zeroed file."""
    from spava_ds import SpavaConfig
    from spava_ds.engine import GenerationConfig, SpavaEngine

    out = {}
    for name, model_dir in dirs.items():
        plain = SpavaEngine.from_pretrained(model_dir, SpavaConfig(mode="ring", anchor_len=16), fused_vision=False)
        streamed = SpavaEngine(plain.model, plain.tokenizer, plain.config, None, plain.settings, fused_vision=False,
                               stream_video=True, stream_chunk_steps=CHUNK_STEPS)
        inputs, timings = plain.video_inputs(video, QUESTION), {}
        source = streamed.video_inputs(video, QUESTION, timings=timings)
        want, got = plain.family.encode(inputs), streamed.family.encode(source)
        gen = GenerationConfig(max_new_tokens=3)
        a, b = plain.generate(inputs, gen), streamed.generate(source, gen)  # the stream decodes again
        out[name] = dict(
            steps=(source["pixel_values_videos"].first_step, source["pixel_values_videos"].stop_step),
            num_steps=source["video_plan"].num_steps, fields=(len(want), len(got)),
            feature_diff=max((x - y).abs().max().item() for x, y in zip(want, got)),
            tokens=(a.tokens, b.tokens), logit_diff=(a.first_logits - b.first_logits).abs().max().item(),
            decode=timings["decode"], parts=b.timings, prefill=b.prefill_seconds,
            errors=(_error(lambda: plain.generate(plain.video_inputs(zeroed, QUESTION), gen)),
                    _error(lambda: streamed.generate(streamed.video_inputs(zeroed, QUESTION), gen))))
    return out


@pytest.mark.timeout(400)
def test_streamed_vision_equals_the_whole_rank_path(setup):
    dirs, video, zeroed = setup
    results = [_compare(0, 1, dirs, video, zeroed)] + run_distributed(_compare, 2, dirs, video, zeroed,
                                                                      timeout=360)
    for name in VIDEO_FAMILIES:
        runs = [r[name] for r in results]
        steps = runs[0]["num_steps"]
        assert steps % CHUNK_STEPS and steps % 2, (name, steps)
        assert [r["steps"] for r in runs] == [(0, steps), (0, (steps + 1) // 2), ((steps + 1) // 2, steps)]
        for r in runs:
            assert r["fields"][0] == r["fields"][1] and (r["fields"][0] > 1) == (name == "qwen3_vl")  # DeepStack
            assert r["feature_diff"] < 1e-5, (name, r["feature_diff"])
            assert r["tokens"][0] == r["tokens"][1] and r["logit_diff"] < 1e-5, (name, r["logit_diff"])
            parts = r["parts"]  # the decoding's exposed waits come out of the vision span: parts add up
            assert parts["decode"] > 0 and parts["vision"] > 0 and r["decode"] == parts["decode"]
            total = sum(parts[k] for k in ("decode", "preprocess", "vision", "lm", "first_token"))
            assert abs(total - r["prefill"]) < 0.05 * r["prefill"] + 0.01, (name, parts, r["prefill"])
        # the zeroed file: the same error streamed or not, on every rank of W = 2, and named at W = 1
        errors = [r["errors"] for r in runs]
        assert all(plain == stream for plain, stream in errors), (name, errors)
        assert "zeroed.mp4" in errors[0][0] and errors[1] == errors[2] and "of 2:" in errors[1][0]
        assert runs[1]["tokens"][0] == runs[0]["tokens"][0]  # ring over 2 ranks answers as one process


def test_stream_options_are_checked(setup):
    from spava_ds import SpavaConfig
    from spava_ds.engine import SpavaEngine
    from spava_ds.video import iter_video_pixels

    dirs, video, _ = setup
    engine = SpavaEngine.from_pretrained(dirs["qwen2_5_vl"], SpavaConfig(mode="dense"), fused_vision=False)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="stream_chunk_steps must be a positive integer"):
            SpavaEngine(engine.model, engine.tokenizer, stream_video=True, stream_chunk_steps=bad)
        with pytest.raises(ValueError, match="chunk_steps must be a positive integer"):
            iter_video_pixels(engine.video_plan(video), chunk_steps=bad)
    # the default chunk holds at least STREAM_CHUNK_PATCHES patches (the tiny video has fewer: one chunk)
    inputs = engine.video_inputs(video, QUESTION, stream=True)
    chunks = [(first, stop) for first, stop, _ in inputs["pixel_values_videos"]]
    assert chunks == [(0, inputs["video_plan"].num_steps)]
    assert torch.is_tensor(engine.video_inputs(video, QUESTION)["pixel_values_videos"])  # off by default
