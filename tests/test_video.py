"""Video decoding, sampling, resizing and patchify (spava_ds.video), and the embedded tiny Qwen2.5-VL checkpoint.

The references are independent of the code under test: transformers' own smart_resize and PIL image processor,
PIL's bicubic resize, explicit per-patch loops, frames matched back to the synthetic source by content, hand-worked
sampling indices, and (where torchvision works, i.e. the GPU image) transformers' Qwen2VLVideoProcessor itself.
"""

import importlib.util
import json
import os
import threading

import numpy as np
import pytest
import torch
import transformers

from spava_ds.integrations.qwen_vision import temporal_range
from spava_ds.video import (DECODER_THREADS_ENV, DECODERS_ENV, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VideoError,
                            decoder_layout, hf_video_processor_available, iter_frames, load_video_settings,
                            plan_video, preprocess_video, preprocess_with_processor, rank_cores, read_metadata,
                            read_video, resize_by_matmul, resize_frames, sample_frame_indices, smart_resize,
                            natural_frames, synthetic_frames, video_pixels, write_synthetic_video, write_video)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN = np.array(OPENAI_CLIP_MEAN, np.float64)
STD = np.array(OPENAI_CLIP_STD, np.float64)


def _torchvision_works() -> bool:
    try:
        import torchvision  # noqa: F401
        return True
    except Exception:  # not installed, or built for another torch ("operator torchvision::nms does not exist")
        return False


needs_av = pytest.mark.skipif(importlib.util.find_spec("av") is None, reason="PyAV is not installed")
needs_torchvision = pytest.mark.skipif(not _torchvision_works(),
                                       reason="torchvision is not importable (CPU machines): the HF video processor "
                                              "needs it; this runs on the GPU image")


def _random_frames(t, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def _smooth_frames(t, h, w, seed=0):
    """Photo-like frames (smooth gradients) for resize comparisons, where pure noise exaggerates rounding."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w] / max(h, w)
    out = [127.5 + 120 * np.sin(rng.uniform(2, 9) * xs[..., None] + rng.uniform(2, 9) * ys[..., None]
                                + rng.uniform(0, 6, 3)) for _ in range(t)]
    return np.stack(out).astype(np.uint8)


def _nearest_source(frames, source):
    """Index of the synthetic source frame each decoded frame looks most like (mean absolute difference)."""
    src = source.astype(np.int16)
    return [int(np.argmin(np.abs(src - f.astype(np.int16)).mean(axis=(1, 2, 3)))) for f in frames]


# ------------------------------------------------------------------------------------------------ constants, sizes

def test_clip_constants_match_transformers():
    from transformers.image_utils import OPENAI_CLIP_MEAN as HF_MEAN, OPENAI_CLIP_STD as HF_STD

    assert list(OPENAI_CLIP_MEAN) == list(HF_MEAN) and list(OPENAI_CLIP_STD) == list(HF_STD)


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    budgets = [(56 * 56, 14 * 14 * 4 * 1280), (112 * 112, 224 * 224), (128 * 28 * 28, 768 * 28 * 28), (3136, 3136)]
    sizes = [(h, w) for h in (1, 13, 28, 57, 100, 120, 224, 360, 481, 720, 1080) for w in (28, 90, 160, 640, 1920)
             if max(h, w) / min(h, w) <= 200]
    for min_pixels, max_pixels in budgets:
        for h, w in sizes:
            ours = smart_resize(h, w, 28, min_pixels, max_pixels)
            hf = hf_smart_resize(h, w, 28, min_pixels, max_pixels)
            assert ours[0] % 28 == 0 and ours[1] % 28 == 0 and ours[0] * ours[1] <= max_pixels
            if hf[0] * hf[1] <= max_pixels:
                assert ours == hf, (h, w, min_pixels, max_pixels)
            else:  # transformers breaks the budget on thin frames (a side floored at 28 or rounded up to reach
                # min_pixels): only the long side differs
                assert min(ours) == min(hf) and max(ours) < max(hf), (h, w, ours, hf)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2100)
    with pytest.raises(ValueError, match="min_pixels"):
        smart_resize(100, 100, 28, 5000, 4000)


def test_smart_resize_keeps_thin_frames_within_the_budget():
    for h, w in [(20, 4000), (4000, 20), (30, 5000), (28, 2800), (14, 2000), (100, 19_000)]:
        for max_pixels in (28 * 28, 56 * 56, 112 * 112, 3 * 28 * 28, 768 * 28 * 28):
            new_h, new_w = smart_resize(h, w, 28, min(28 * 28, max_pixels), max_pixels)
            assert new_h * new_w <= max_pixels and min(new_h, new_w) >= 28, (h, w, max_pixels, new_h, new_w)
            assert new_h % 28 == 0 and new_w % 28 == 0
            assert (new_h > new_w) == (h > w) or new_h == new_w  # the orientation is kept
    with pytest.raises(ValueError, match="below one 28x28 block"):
        smart_resize(20, 4000, 28, 100, 28 * 27)


def test_resize_frames_is_bicubic_to_the_smart_size():
    from PIL import Image

    frames = synthetic_frames(3, 160, 120, seed=0)  # gradients and sharp-edged shapes
    out = resize_frames(frames, 112 * 112, 224 * 224)
    assert out.dtype == np.uint8 and out.shape == (3, *smart_resize(120, 160, 28, 112 * 112, 224 * 224), 3)
    assert out.shape == (3, 112, 168, 3)
    # PIL's antialiased bicubic (the HF image processor's) is the reference. The two implementations round between
    # their horizontal and vertical passes differently, so a few pixels next to sharp edges differ; bilinear or
    # non-antialiased bicubic differ on ~20% of the pixels, by 0.3 levels on average.
    for frame, got in zip(frames, out):
        pil = np.asarray(Image.fromarray(frame).resize((168, 112), Image.BICUBIC)).astype(int)
        diff = np.abs(got.astype(int) - pil)
        assert (diff > 0).mean() < 0.05 and diff.mean() < 0.08, ((diff > 0).mean(), diff.mean())
    # growing to min_pixels works the same way; a frame already at its target size is returned untouched
    small = resize_frames(_smooth_frames(2, 30, 40), 112 * 112, 224 * 224)
    assert small.shape[1:3] == smart_resize(30, 40, 28, 112 * 112, 224 * 224) == (112, 140)
    pil = np.asarray(Image.fromarray(_smooth_frames(2, 30, 40)[0]).resize((140, 112), Image.BICUBIC)).astype(int)
    assert np.abs(small[0].astype(int) - pil).max() <= 1
    assert resize_frames(out, 112 * 112, 224 * 224) is out
    with pytest.raises(ValueError, match="uint8"):
        resize_frames(frames.astype(np.float32))


def test_resize_by_matmul_equals_the_cpu_uint8_kernel():
    """The device path of the resize (float64 matrix products with the CPU kernel's integer weights) gives the CPU
    uint8 kernel's bytes exactly: down, up and mixed, strong shrinking (high weight precision), thin sizes, noise
    (the worst case for rounding and clamping between the passes) and photo-like frames."""
    import torch.nn.functional as F

    rng = np.random.default_rng(7)
    cases = [((64, 96), (112, 168)), ((120, 160), (56, 84)), ((360, 640), (364, 644)), ((720, 1280), (28, 56)),
             ((13, 7), (28, 28)), ((5, 333), (1, 3)), ((30, 40), (30, 333)), ((97, 61), (97, 28)),
             ((2, 2), (56, 28)), ((481, 353), (224, 168))]
    for (h, w), size in cases:
        for frames in (_random_frames(2, h, w, seed=int(rng.integers(1000))), _smooth_frames(1, h, w, seed=h)):
            x = torch.from_numpy(frames).permute(0, 3, 1, 2)
            want = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
            got = resize_by_matmul(x, size)
            assert got.dtype == torch.uint8 and torch.equal(got, want), ((h, w), size, (got.int() - want).abs().max())
    x = torch.from_numpy(_random_frames(1, 40, 50)).permute(0, 3, 1, 2)
    assert torch.equal(resize_by_matmul(x, (40, 50)), x)  # the size it has: untouched
    assert torch.equal(resize_by_matmul(x[0, 0], (28, 84)), resize_by_matmul(x, (28, 84))[0, 0])  # any leading dims
    with pytest.raises(ValueError, match="uint8"):
        resize_by_matmul(x.float(), (28, 28))


# ------------------------------------------------------------------------------------------------ patchify

def test_preprocess_video_against_explicit_patches():
    frames = _random_frames(4, 56, 84, seed=1)
    pixels, grid = preprocess_video(frames)
    assert pixels.dtype == torch.float32 and grid.dtype == torch.long
    gt, gh, gw = 2, 4, 6
    assert grid.tolist() == [[gt, gh, gw]] and pixels.shape == (gt * gh * gw, 3 * 2 * 14 * 14)
    normalised = (frames / 255.0 - MEAN) / STD  # float64, channels last
    # Row order: time step, then 2x2 groups in raster order, then the 4 patches of a group in raster order;
    # inside a row: channel, frame of the temporal patch, y, x.
    row = 0
    for t in range(gt):
        for hb in range(gh // 2):
            for wb in range(gw // 2):
                for hi in range(2):
                    for wi in range(2):
                        y0, x0 = (2 * hb + hi) * 14, (2 * wb + wi) * 14
                        expected = np.empty((3, 2, 14, 14))
                        for c in range(3):
                            for dt in range(2):
                                expected[c, dt] = normalised[2 * t + dt, y0:y0 + 14, x0:x0 + 14, c]
                        np.testing.assert_allclose(pixels[row].numpy(), expected.reshape(-1), atol=1e-5)
                        row += 1
    assert row == pixels.shape[0]


def test_preprocess_video_pads_odd_frames_and_rejects_bad_input():
    frames = _random_frames(3, 28, 56, seed=2)
    padded = np.concatenate([frames, frames[-1:]])  # the HF processor repeats the last frame
    got, grid = preprocess_video(frames)
    want, _ = preprocess_video(padded)
    assert grid.tolist() == [[2, 2, 4]] and torch.equal(got, want)
    with pytest.raises(ValueError, match="multiple of 28"):
        preprocess_video(_random_frames(2, 30, 56))
    with pytest.raises(ValueError, match="uint8"):
        preprocess_video(frames.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        preprocess_video(frames[0])


def test_static_video_equals_hf_pil_image_processor():
    """A video of two identical frames is one temporal patch of a still image: transformers' PIL image processor
    (no torchvision needed) must produce the same rows. (Its resize goes through float PIL conversions, so only the
    patchify is compared here; resizing is checked against PIL and against the HF video processor.)"""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image = _random_frames(1, 84, 112, seed=3)[0]
    processor = Qwen2VLImageProcessorPil(min_pixels=112 * 112, max_pixels=224 * 224, do_resize=False)
    ref = processor(images=[Image.fromarray(image)], return_tensors="pt")
    ours, grid = preprocess_video(np.stack([image, image]))
    assert grid.tolist() == ref["image_grid_thw"].tolist() == [[1, 6, 8]]
    assert (ours - ref["pixel_values"]).abs().max() < 1e-5



def test_hf_video_processor_unavailable_is_reported():
    if _torchvision_works():
        pytest.skip("torchvision works here: the processor is available (covered by the equivalence test)")
    assert hf_video_processor_available() is False
    with pytest.raises(RuntimeError, match="torchvision"):
        preprocess_with_processor(_random_frames(2, 28, 28))


@needs_torchvision
def test_preprocess_equals_hf_video_processor():
    assert hf_video_processor_available()
    # sizes that need resizing (down and up) and an odd frame count (padding)
    for t, h, w, seed in [(4, 120, 160, 0), (5, 360, 640, 1), (2, 50, 70, 2)]:
        frames = _smooth_frames(t, h, w, seed) if seed != 1 else _random_frames(t, h, w, seed)
        ours, grid = preprocess_video(resize_frames(frames, 112 * 112, 224 * 224))
        ref, ref_grid = preprocess_with_processor(frames, 112 * 112, 224 * 224)
        assert grid.tolist() == ref_grid.tolist()
        assert (ours - ref).abs().max() < 1e-5, (t, h, w, (ours - ref).abs().max())
        # the patchify alone, on frames already at the target size
        resized = resize_frames(frames, 112 * 112, 224 * 224)
        ref, _ = preprocess_with_processor(resized, do_resize=False)
        assert (preprocess_video(resized)[0] - ref).abs().max() < 1e-5


@needs_torchvision
def test_tiny_checkpoint_video_processor_config_matches_ours():
    """Qwen2VLVideoProcessor.from_pretrained reads the checkpoint's budget and gives our tensors."""
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from spava_ds.assets import tiny_model_dir

    settings = load_video_settings(tiny_model_dir())
    processor = Qwen2VLVideoProcessor.from_pretrained(tiny_model_dir())
    frames = _smooth_frames(4, 360, 640, seed=5)
    ref = processor(videos=[frames], return_tensors="pt")
    ours, grid = preprocess_video(resize_frames(frames, settings["min_pixels"], settings["max_pixels"]))
    assert grid.tolist() == ref["video_grid_thw"].tolist()
    assert (ours - ref["pixel_values_videos"]).abs().max() < 1e-5


@needs_torchvision
def test_sampling_equals_hf_video_processor():
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    processor = Qwen2VLVideoProcessor()
    for total, src_fps, fps, max_frames in [(20, 10, 2, None), (300, 30, 2, 8), (7, 1, 1, None), (6, 30, 2, None),
                                            (1000, 24, 2, None), (97, 25, 3, 16)]:
        meta = VideoMetadata(total_num_frames=total, fps=src_fps)
        ref = processor.sample_frames(meta, fps=fps, **({"max_frames": max_frames} if max_frames else {}))
        assert sample_frame_indices(total, src_fps, fps, max_frames) == [int(i) for i in ref]


# ------------------------------------------------------------------------------------------------ sampling, decoding

def test_sample_frame_indices_hand_worked():
    assert sample_frame_indices(20, 10.0, 2.0) == [0, 5, 10, 15]               # 2 s at 2 fps
    assert sample_frame_indices(6, 30.0, 2.0) == [0, 1, 3, 4]                  # 0.4 frames wanted -> min_frames 4
    assert sample_frame_indices(300, 30.0, 2.0, max_frames=8) == [0, 37, 75, 112, 150, 187, 225, 262]
    assert sample_frame_indices(7, 1.0, 1.0) == [0, 1, 2, 3, 4, 5]            # 7 wanted -> rounded down to even
    assert sample_frame_indices(3, 30.0, 2.0) == [0, 1]
    assert sample_frame_indices(1, 30.0, 2.0) == []                            # not one temporal patch
    assert len(sample_frame_indices(10_000, 25.0, 2.0)) == 768                 # Qwen's default cap
    with pytest.raises(ValueError, match="max_frames"):
        sample_frame_indices(20, 10.0, 2.0, max_frames=1)
    with pytest.raises(ValueError, match="fps"):
        sample_frame_indices(20, 10.0, 0.0)


@needs_av
@pytest.mark.parametrize("ext", ["mp4", "mkv", "webm"])
def test_read_video_samples_the_right_frames(tmp_path, ext):
    path = write_synthetic_video(tmp_path / f"v.{ext}", num_frames=20, width=96, height=64, fps=10, seed=1)
    frames, info = read_video(path)  # default 2 fps over 2 s
    assert frames.shape == (4, 64, 96, 3) and frames.dtype == np.uint8
    assert _nearest_source(frames, synthetic_frames(20, 96, 64, seed=1)) == info["indices"] == [0, 5, 10, 15]
    assert info["source_fps"] == pytest.approx(10) and info["duration"] == pytest.approx(2.0, abs=0.11)
    assert info["num_source_frames"] == 20 and info["timestamps"] == pytest.approx([0, 0.5, 1.0, 1.5])
    assert info["sampled_fps"] == pytest.approx(2.0) and info["second_per_grid_t"] == pytest.approx(1.0)
    assert (info["width"], info["height"]) == (96, 64)


@needs_av
def test_read_video_caps_frames_uniformly(tmp_path):
    path = write_synthetic_video(tmp_path / "v.mp4", num_frames=40, width=64, height=48, fps=8, seed=2)
    source = synthetic_frames(40, 64, 48, seed=2)
    frames, info = read_video(path, fps=4)  # 5 s at 4 fps = 20 frames
    assert _nearest_source(frames, source) == info["indices"] == list(range(0, 40, 2))
    frames, info = read_video(path, fps=4, max_frames=6)  # uniform over the whole video, not the first 6
    assert _nearest_source(frames, source) == info["indices"] == [0, 6, 13, 20, 26, 33]
    assert info["sampled_fps"] == pytest.approx(6 / 40 * 8)


@needs_av
def test_read_video_single_frame_is_repeated(tmp_path):
    path = write_synthetic_video(tmp_path / "one.mp4", num_frames=1, width=32, height=32, fps=2)
    frames, info = read_video(path)
    assert frames.shape[0] == 2 and np.array_equal(frames[0], frames[1]) and info["indices"] == [0, 0]


@needs_av
def test_synthetic_video_is_deterministic_and_varied(tmp_path):
    a = synthetic_frames(6, 64, 48, seed=5)
    assert np.array_equal(a, synthetic_frames(6, 64, 48, seed=5))
    assert not np.array_equal(a, synthetic_frames(6, 64, 48, seed=6))
    assert min(np.abs(a[i].astype(int) - a[i + 1]).mean() for i in range(5)) > 5  # every frame differs
    f1, _ = read_video(write_synthetic_video(tmp_path / "a.mp4", 6, 64, 48, fps=2, seed=5), fps=2)
    f2, _ = read_video(write_synthetic_video(tmp_path / "b.mp4", 6, 64, 48, fps=2, seed=5), fps=2)
    assert np.array_equal(f1, f2) and np.abs(f1.astype(int) - a).mean() < 4  # close to the source (lossy codec)
    with pytest.raises(ValueError, match="even"):
        write_synthetic_video(tmp_path / "odd.mp4", 4, 63, 48)


@needs_av
def test_write_video_from_planes_and_arrays(tmp_path):
    """The one writer: Y, U, V planes (natural_frames, no colour conversion) decode close to the planes written,
    with a keyframe every `gop` frames; an RGB array and an iterable of its frames give the same file's frames;
    bad input is refused before a file appears."""
    import av

    planes = list(natural_frames(12, 96, 64, fps=6, seed=3))
    assert [p.shape for p in planes[0]] == [(64, 96), (32, 48), (32, 48)] and planes[0][0].dtype == np.uint8
    assert np.abs(planes[0][0].astype(int) - planes[-1][0]).mean() > 1  # the camera and the discs move
    path = write_video(tmp_path / "n.mp4", iter(planes), fps=6, crf=10, gop=4, threads=1)
    with av.open(path) as container:
        decoded = [(f.to_ndarray(format="yuv420p")[:64], f.key_frame) for f in container.decode(video=0)]
    assert len(decoded) == 12 and [i for i, (_, key) in enumerate(decoded) if key] == [0, 4, 8]
    assert max(np.abs(y.astype(int) - p[0]).mean() for (y, _), p in zip(decoded, planes)) < 2
    rgb = synthetic_frames(5, 64, 48, seed=2)
    f1, info = read_video(write_video(tmp_path / "a.mp4", rgb, fps=2, reproducible=True), fps=2)
    f2, _ = read_video(write_video(tmp_path / "b.mp4", (frame for frame in rgb), fps=2, reproducible=True), fps=2)
    assert np.array_equal(f1, f2) and np.abs(f1.astype(int) - rgb[info["indices"]]).mean() < 6  # 4:2:0 chroma
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "c.mp4", rgb.astype(np.float32), fps=2)
    with pytest.raises(ValueError, match="frame_times"):
        write_video(tmp_path / "d.mp4", rgb, fps=2, frame_times=[0.0, 0.5])
    assert not (tmp_path / "c.mp4").exists() and not list(tmp_path.glob("*.tmp*"))


@needs_av
def test_write_video_reproducible_gives_the_same_bytes(tmp_path):
    """reproducible=True: the same frames written eight times give one file's bytes (libx264's default rate control
    gave 3 different files in 6 writes of these frames on one thread), and the decoded frames stay close to them."""
    rgb = synthetic_frames(32, 112, 112, seed=1)
    files = {write_video(tmp_path / f"{i}.mp4", rgb, fps=2, reproducible=True, threads=1 if i % 2 else None)
             for i in range(8)}
    assert len({open(path, "rb").read() for path in files}) == 1
    decoded, info = read_video(files.pop(), fps=2)
    assert np.abs(decoded.astype(int) - rgb[info["indices"]]).mean() < 6  # 4:2:0 chroma
    with pytest.raises(ValueError, match="one encoder thread"):
        write_video(tmp_path / "t.mp4", rgb, fps=2, reproducible=True, threads=2)


def _header_only_mkv(tmp_path):
    """A Matroska file cut where its first frame starts: a valid video stream with no frames."""
    import av

    path = write_synthetic_video(tmp_path / "full.mkv", 6, 64, 48, fps=2)
    with av.open(path) as container:
        first = next(p for p in container.demux(video=0) if p.size > 0).pos
    data = open(path, "rb").read()[:first]
    (tmp_path / "header.mkv").write_bytes(data)
    return str(tmp_path / "header.mkv")


@needs_av
def test_read_video_errors(tmp_path):
    import av

    good = write_synthetic_video(tmp_path / "good.mp4", 20, 64, 48, fps=10)
    data = open(good, "rb").read()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 2])  # index (moov) at the end is lost
    (tmp_path / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    (tmp_path / "empty.mp4").write_bytes(b"")
    with av.open(str(tmp_path / "audio.mp4"), "w") as container:  # an audio-only file
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    cases = {
        str(tmp_path / "missing.mp4"): "not found",
        str(tmp_path): "not a file",
        str(tmp_path / "truncated.mp4"): "not a readable media file",
        str(tmp_path / "garbage.mp4"): "not a readable media file",
        str(tmp_path / "empty.mp4"): "not a readable media file",
        str(tmp_path / "audio.mp4"): "no video stream",
        _header_only_mkv(tmp_path): "no frames",
    }
    for path, message in cases.items():
        with pytest.raises(VideoError, match=message) as err:
            read_video(path)
        assert os.path.basename(path) in str(err.value)  # the message names the file
    assert issubclass(VideoError, ValueError)


@needs_av
@pytest.mark.parametrize("ext", ["mp4", "mkv"])
def test_truncated_files_are_refused(tmp_path, ext):
    """A faststart mp4 (its index first: it announces 20 frames) or a Matroska file (its header gives the duration)
    cut before its end: today's path and the metadata plan both say so instead of answering from what decodes."""
    path = write_synthetic_video(tmp_path / f"full.{ext}", 20, 64, 48, fps=10, seed=7, gop=5,
                                 faststart=ext == "mp4")
    data = open(path, "rb").read()
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(VideoError, match="truncated") as err:
        plan_video(cut)
    assert "cut." in str(err.value)
    if ext == "mp4":  # Matroska announces no frame count: read_video samples the frames there (today's path)
        with pytest.raises(VideoError, match="truncated"):
            read_video(cut, fps=10)
    assert plan_video(path).metadata.num_frames == 20  # the whole file is fine


# ------------------------------------------------------------------------------------------------ settings, model

def test_load_video_settings(tmp_path):
    from spava_ds.assets import tiny_model_dir

    tiny = load_video_settings(tiny_model_dir())
    assert (tiny["min_pixels"], tiny["max_pixels"], tiny["fps"]) == (112 * 112, 224 * 224, 2.0)
    # the HF processor files of the checkpoint hold the same budget
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        (tmp_path / name).write_text(open(os.path.join(tiny_model_dir(), name)).read())
        assert load_video_settings(tmp_path)["max_pixels"] == 224 * 224
        os.remove(tmp_path / name)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 12845056}))
    hf = load_video_settings(tmp_path)
    assert (hf["min_pixels"], hf["max_pixels"], hf["patch_size"], hf["fps"]) == (3136, 12845056, 14, 2.0)
    assert load_video_settings(tmp_path / "nothing")["max_pixels"] == 768 * 28 * 28  # Qwen defaults


def _video_inputs(model_dir, tokenizer, config, seed):
    """Chat prompt with one video, <|video_pad|> expanded to the merged token count, and mm_token_type_ids."""
    settings = load_video_settings(model_dir)
    frames = resize_frames(synthetic_frames(4, 100, 80, seed=seed), settings["min_pixels"], settings["max_pixels"])
    pixels, grid = preprocess_video(frames)
    n_tokens = int(grid.prod()) // settings["merge_size"] ** 2
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What is moving?"}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.count("<|video_pad|>") == 1
    ids = tokenizer(text.replace("<|video_pad|>", "<|video_pad|>" * n_tokens), return_tensors="pt")["input_ids"]
    types = (ids == config.video_token_id).long() * 2  # 0 text, 1 image, 2 video
    assert int(types.sum()) == 2 * n_tokens
    return ids, types, pixels, grid


def test_tiny_checkpoint_loads_and_runs_video():
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from spava_ds.assets import tiny_model_dir

    model_dir = tiny_model_dir()
    size = sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir))
    assert size < 3 * 2**20
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    config = model.config
    assert model.dtype == torch.float32
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers,
            config.text_config.num_attention_heads, config.text_config.num_key_value_heads) == (128, 4, 4, 2)
    assert (config.vision_config.depth, config.vision_config.hidden_size, config.vision_config.out_hidden_size,
            config.vision_config.window_size, list(config.vision_config.fullatt_block_indexes)) == (2, 64, 128, 56, [1])
    assert config.text_config.vocab_size == len(tokenizer) == 1000
    for attr, token in [("video_token_id", "<|video_pad|>"), ("image_token_id", "<|image_pad|>"),
                        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]:
        assert getattr(config, attr) == tokenizer.convert_tokens_to_ids(token)
    assert tokenizer.eos_token == "<|im_end|>" and config.text_config.eos_token_id == tokenizer.eos_token_id

    ids, types, pixels, grid = _video_inputs(model_dir, tokenizer, config, seed=0)
    assert grid.tolist() == [[2, 8, 10]]  # 100x80 frames grow to 140x112 (min_pixels 112*112)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid, mm_token_type_ids=types,
                    second_per_grid_ts=torch.tensor([1.0]))
        logits = out.logits
        assert logits.shape == (1, ids.shape[1], 1000) and torch.isfinite(logits).all()
        # 3-D M-RoPE is in use: the video rows get distinct (t, h, w) positions, and dropping mm_token_type_ids
        # (1-D positions) changes the logits
        positions, _ = model.model.get_rope_index(ids, types, video_grid_thw=grid,
                                                  second_per_grid_ts=torch.tensor([1.0]))
        video = positions[:, 0, types[0] == 2]
        assert video.shape == (3, 40) and len({tuple(p) for p in video.T.tolist()}) == 40
        assert not torch.equal(video[1], video[2])
        flat = model(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid).logits
        assert (flat - logits).abs().max() > 1e-3
        # the video reaches the answer: another video changes the last row's logits
        _, _, other_pixels, _ = _video_inputs(model_dir, tokenizer, config, seed=1)
        other = model(input_ids=ids, pixel_values_videos=other_pixels, video_grid_thw=grid,
                      mm_token_type_ids=types, second_per_grid_ts=torch.tensor([1.0])).logits
        assert (other[0, -1] - logits[0, -1]).abs().max() > 1e-3
    # the logits are not flat: the random weights give a clear argmax (the engine's greedy tests rely on it)
    top2 = logits[0, -1].topk(2).values
    assert float(top2[0] - top2[1]) > 1e-3


def test_make_tiny_model_reproduces_the_committed_checkpoint(tmp_path):
    from spava_ds.assets import tiny_model_dir

    spec = importlib.util.spec_from_file_location("make_tiny_model", os.path.join(REPO, "launch",
                                                                                  "make_tiny_model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.write_checkpoint(str(tmp_path / "tiny"))
    committed = tiny_model_dir()
    assert sorted(os.listdir(out)) == sorted(os.listdir(committed))
    with open(os.path.join(out, "model.safetensors"), "rb") as a, \
            open(os.path.join(committed, "model.safetensors"), "rb") as b:
        assert a.read() == b.read(), "the weights differ from the committed checkpoint"
    with open(os.path.join(committed, "config.json")) as f:
        same_version = json.load(f)["transformers_version"] == transformers.__version__
    for name in sorted(os.listdir(out)):
        with open(os.path.join(out, name), "rb") as a, open(os.path.join(committed, name), "rb") as b:
            new, old = a.read(), b.read()
        if same_version:
            assert new == old, f"{name} differs from the committed checkpoint"
        elif name == "tokenizer.json":
            # another transformers/tokenizers version serialises configs differently; the vocabulary must not change
            new, old = [(d["model"]["vocab"], d["model"]["merges"], d["added_tokens"])
                        for d in (json.loads(new), json.loads(old))]
            assert new == old, "the tokenizer differs from the committed checkpoint"


# ------------------------------------------------------------------------------------------------ metadata plan, shares

# Videos for the per-rank pipeline, each against today's whole-video path. 61 frames at 30 fps (2.03 s): sampled at
# 2, 7 and 11 fps their frames fall on keyframes (0, 24, ...) and between them; 11 fps gives 11 temporal steps (odd,
# not divisible by 2 or 3).
_VFR = [round(t, 3) for t in np.cumsum(np.random.default_rng(3).choice([0.02, 0.033, 0.05], 61)) - 0.02]
SHARE_VIDEOS = {
    "bframes.mp4": dict(gop=12, bframes=3),
    "bframes.mkv": dict(gop=12, bframes=3),
    "vfr.mp4": dict(gop=10, bframes=2, frame_times=_VFR),
    "vfr.mkv": dict(gop=10, frame_times=_VFR),
    "nob.webm": dict(),
}
BUDGET = dict(min_pixels=56 * 56, max_pixels=112 * 112)


@pytest.fixture(scope="module")
def share_videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shares")
    return {name: write_synthetic_video(folder / name, 61, 96, 64, fps=30, seed=4, **options)
            for name, options in SHARE_VIDEOS.items()}


def _today(path, fps):
    """Today's whole-video path: decode and sample every frame, resize, patchify."""
    frames, info = read_video(path, fps=fps)
    pixels, grid = preprocess_video(resize_frames(frames, **BUDGET))
    return pixels, grid, info


@needs_av
@pytest.mark.parametrize("name", list(SHARE_VIDEOS))
def test_plan_from_metadata_equals_todays_path(share_videos, name):
    path = share_videos[name]
    meta = read_metadata(path)
    assert (meta.width, meta.height, meta.num_frames) == (96, 64, 61)
    if name != "nob.webm":  # libx264 with a fixed GOP: a keyframe every gop frames
        gop = SHARE_VIDEOS[name]["gop"]
        assert meta.keyframes == tuple(range(0, 61, gop))
    for fps in (2, 7, 11):
        plan = plan_video(path, fps=fps, **BUDGET)
        pixels, grid, info = _today(path, fps)
        assert list(plan.frame_indices) == info["indices"]
        assert list(plan.grid_thw) == grid[0].tolist() and plan.num_steps * plan.rows_per_step == pixels.shape[0]
        assert plan.second_per_grid_t == pytest.approx(info["second_per_grid_t"], rel=1e-12)
        assert plan.num_tokens == pixels.shape[0] // 4


@needs_av
@pytest.mark.parametrize("name", list(SHARE_VIDEOS))
def test_each_rank_decodes_only_its_share_equal_to_todays_rows(share_videos, name):
    path = share_videos[name]
    for fps in (2, 7, 11):
        plan = plan_video(path, fps=fps, **BUDGET)
        pixels, _, _ = _today(path, fps)
        rows = plan.rows_per_step
        for world in (1, 2, 3):
            for rank in range(world):
                first, stop = temporal_range(plan.num_steps, rank, world)
                stats, decoders = {}, 1 + (world + rank + fps) % 3  # 1, 2 or 3 concurrent decoders
                got = video_pixels(plan, first, stop, chunk_steps=1 + rank, timings=stats, decoders=decoders,
                                   threads=1 + rank % 2)
                assert torch.equal(got, pixels[first * rows:stop * rows]), (name, fps, world, rank, decoders)
                if first == stop:
                    continue
                # each keyframe group of the rank's frames is decoded from its keyframe to its last frame
                frames = sorted(set(plan.frames_of_steps(first, stop)))
                keys = [max(k for k in plan.metadata.keyframes if k <= f) for f in frames]
                spans = {key: max(f for f, k in zip(frames, keys) if k == key) - key + 1 for key in keys}
                bound = sum(spans.values()) + 3 * len(spans)  # + the B-frames decoded before the group's last
                assert len(frames) <= stats["decoded_frames"] <= bound, (stats, spans, frames)


def test_decoder_layout_divides_the_cores_of_the_rank(monkeypatch):
    monkeypatch.delenv(DECODERS_ENV, raising=False)
    monkeypatch.delenv(DECODER_THREADS_ENV, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert rank_cores() == 16  # torchrun's ranks all see the host's 64 cores: a quarter each
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8, 24)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert rank_cores() == 16  # pinned by the launcher: its cores are its own
    assert decoder_layout(14) == (8, 2)  # a decoder per 2 cores
    assert decoder_layout(3) == (3, 5) and decoder_layout(1) == (1, 16)  # one per keyframe group at most
    assert decoder_layout(100, decoders=4) == (4, 4) and decoder_layout(100, threads=1) == (16, 1)
    monkeypatch.setenv(DECODERS_ENV, "2")
    assert decoder_layout(100) == (2, 8) and decoder_layout(100, decoders=5) == (5, 3)  # the argument wins
    monkeypatch.setenv(DECODER_THREADS_ENV, "3")
    assert decoder_layout(100) == (2, 3)
    for bad in ("0", "-1", "two", "1.5"):
        monkeypatch.setenv(DECODERS_ENV, bad)
        with pytest.raises(ValueError, match=f"decoders must be a positive integer.*{DECODERS_ENV}"):
            decoder_layout(10)
    monkeypatch.delenv(DECODERS_ENV)
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="decoder threads must be a positive integer.*decoder threads"):
            decoder_layout(10, threads=bad)


def _decoder_threads():
    return [t for t in threading.enumerate() if t.name.startswith("spava-decoder")]


@needs_av
def test_decoders_stop_when_the_consumer_stops_or_fails(share_videos, tmp_path):
    path = share_videos["bframes.mp4"]
    meta = read_metadata(path)
    frames = iter_frames(meta, range(0, 61, 3), decoders=3, threads=1)
    first = next(frames)
    assert first.shape == (64, 96, 3) and len(_decoder_threads()) == 3
    frames.close()  # a consumer that stops early (an error on its side) ends the decoders
    assert _decoder_threads() == []
    # data zeroed in the middle of the file: every decoder layout gives the same error, and ends its threads
    data = bytearray(open(path, "rb").read())
    data[len(data) * 4 // 10:len(data) * 6 // 10] = bytes(len(data) * 6 // 10 - len(data) * 4 // 10)
    (tmp_path / "zeroed.mp4").write_bytes(bytes(data))
    plan = plan_video(tmp_path / "zeroed.mp4", fps=11, **BUDGET)
    errors = set()
    for decoders in (1, 2, 3):
        with pytest.raises(VideoError, match="zeroed.mp4") as err:
            video_pixels(plan, decoders=decoders)
        errors.add(str(err.value))
        assert _decoder_threads() == []
    assert len(errors) == 1, errors


class _LateSeeks:
    """A demuxer whose seeks land a keyframe late (as with a broken index); everything else is PyAV's."""

    def __init__(self, container, late):
        self._container, self._late = container, late

    def __getattr__(self, name):
        return getattr(self._container, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._container.__exit__(*exc)

    def seek(self, offset, **kwargs):
        return self._container.seek(offset + self._late, **kwargs)


@needs_av
def test_a_seek_that_misses_falls_back_to_decoding_from_the_start(share_videos, monkeypatch):
    import av

    path = share_videos["bframes.mp4"]
    plan = plan_video(path, fps=11, **BUDGET)
    first, stop = temporal_range(plan.num_steps, 1, 2)  # frames 33..60: groups at keyframes 24, 36 and 48
    seeking, from_start = {}, {}
    want = video_pixels(plan, first, stop, decoders=2, timings=seeking)
    meta = plan.metadata
    late = meta.frame_pts[12] - meta.frame_pts[0]  # one GOP
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *a, **k: _LateSeeks(real_open(*a, **k), late))
    assert torch.equal(video_pixels(plan, first, stop, decoders=2, timings=from_start), want)
    # the first group's seek landed at frame 36, after its frames: the rest was decoded from frame 0
    assert from_start["decoded_frames"] >= seeking["decoded_frames"] + 12, (seeking, from_start)


@needs_av
def test_plan_rejects_bad_settings(share_videos):
    path = share_videos["bframes.mp4"]
    for fps in (0, -2.0):
        with pytest.raises(ValueError, match="fps must be > 0"):
            plan_video(path, fps=fps)
    for max_frames in (0, -4):
        with pytest.raises(ValueError, match="max_frames must be > 0"):
            plan_video(path, max_frames=max_frames)
    with pytest.raises(VideoError, match="not found"):
        plan_video(os.path.join(os.path.dirname(path), "missing.mp4"))


def test_single_frame_video_plan(tmp_path):
    path = write_synthetic_video(tmp_path / "one.mp4", num_frames=1, width=32, height=32, fps=2)
    plan = plan_video(path)
    frames, info = read_video(path)
    assert plan.frame_indices == (0, 0) and info["indices"] == [0, 0]
    assert torch.equal(video_pixels(plan), preprocess_video(resize_frames(frames))[0])


def _difference(got: torch.Tensor, want: torch.Tensor) -> str:
    """Where two tensors differ: the largest difference, the fraction of values and the first positions."""
    if got.shape != want.shape:
        return f"shapes differ: {tuple(got.shape)} vs {tuple(want.shape)}"
    diff = (got.double() - want.double()).abs()
    where = diff.nonzero()[:5].tolist()
    return (f"max difference {diff.max().item():.6g}, {(diff > 0).double().mean().item():.4%} of the values differ, "
            f"first at {where}")


@pytest.mark.gpu
def test_gpu_preprocessing_equals_the_cpu(share_videos):
    """On a GPU the resize is `resize_by_matmul` (float64 matrix products with the CPU kernel's integer weights): the
    patch rows equal the CPU's bit for bit, and the resize alone equals the CPU kernel at the benchmark's sizes."""
    import torch.nn.functional as F

    for name, fps, budget in [("bframes.mp4", 7, BUDGET), ("vfr.mp4", 11, dict(min_pixels=28 * 28, max_pixels=2500)),
                              ("nob.webm", 2, dict(min_pixels=160 * 160, max_pixels=200 * 200))]:
        plan = plan_video(share_videos[name], fps=fps, **budget)
        cpu = video_pixels(plan)
        gpu = video_pixels(plan, device="cuda", decoders=2).cpu()
        assert torch.equal(gpu, cpu), f"{name}: " + _difference(gpu, cpu)
    for frames in (_smooth_frames(3, 720, 1280, seed=1), _random_frames(2, 720, 1280, seed=2)):
        x = torch.from_numpy(frames).permute(0, 3, 1, 2)
        for size in [(560, 1008), (728, 1288), (364, 644)]:  # Qwen's budget, the native size, 360p's
            want = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
            got = resize_by_matmul(x.cuda(), size).cpu()
            assert torch.equal(got, want), f"{size}: " + _difference(got, want)
    if hf_video_processor_available():  # the GPU image has torchvision: transformers' processor on the CPU agrees
        frames, _ = read_video(share_videos["bframes.mp4"], fps=7)
        ref, _ = preprocess_with_processor(frames, BUDGET["min_pixels"], BUDGET["max_pixels"])
        plan = plan_video(share_videos["bframes.mp4"], fps=7, **BUDGET)
        gpu = video_pixels(plan, device="cuda").cpu()
        assert (ref - gpu).abs().max() < 1e-5, _difference(gpu, ref)


# ------------------------------------------------------------------------------------------------ engine, W = 1 and 2

def _old_pipeline_inputs(engine, path, question, fps):
    """Today's engine inputs: every rank decodes, resizes and patchifies the whole video on the CPU."""
    settings = engine.settings
    frames, info = read_video(path, fps=fps, max_frames=settings["max_frames"])
    pixels, grid = preprocess_video(resize_frames(frames, settings["min_pixels"], settings["max_pixels"]))
    return dict(engine.video_prompt(grid, info["second_per_grid_t"], question), pixel_values_videos=pixels,
                frames=len(frames))


def _engine_new_vs_old(rank, world, path, truncated):
    from spava_ds import SpavaConfig
    from spava_ds.engine import GenerationConfig, SpavaEngine
    from spava_ds.assets import tiny_model_dir

    engine = SpavaEngine.from_pretrained(tiny_model_dir(), SpavaConfig(mode="ring", anchor_len=16),
                                         fused_vision=False)
    question = "What is moving?"
    new = engine.video_inputs(path, question, fps=3)
    old = _old_pipeline_inputs(engine, path, question, fps=3)
    plan = new["video_plan"]
    first, stop = temporal_range(plan.num_steps, rank, world)
    out = {"rows": new["pixel_values_videos"].shape[0], "own_rows": (stop - first) * plan.rows_per_step,
           "same_prompt": torch.equal(new["input_ids"], old["input_ids"]),
           "same_positions": torch.equal(new["position_ids"], old["position_ids"])}
    gen = GenerationConfig(max_new_tokens=3)
    for name, inputs in (("new", new), ("old", old)):
        answer = engine.generate(inputs, gen)
        out[name] = (answer.tokens, answer.first_logits)
    # a frame that does not decode on one rank: every rank raises, before the vision all-gather
    failing = dict(new, pixel_values_videos=None, video_error="frame 40 does not decode") if rank == world - 1 \
        else new
    with pytest.raises(VideoError, match=f"rank {world - 1} of {world}: frame 40 does not decode"
                       if world > 1 else "frame 40"):
        engine.generate(failing, gen)
    with pytest.raises(VideoError, match="truncated"):  # the metadata check fails alike on every rank
        engine.video_inputs(truncated, question)
    with pytest.raises(ValueError, match="fps must be > 0"):
        engine.video_inputs(path, question, fps=0)
    with pytest.raises(ValueError, match="max_frames must be > 0"):
        engine.video_inputs(path, question, max_frames=0)
    return out


@needs_av
@pytest.mark.timeout(300)
def test_engine_answers_from_own_frames_equal_the_whole_video_path(tmp_path):
    """The engine on the embedded model: each rank's inputs hold only its own patch rows, and the answers (tokens
    and first-token logits) equal those of today's whole-video inputs, at W = 1 and W = 2 (ring: exact)."""
    from dist_utils import run_distributed

    # 3 fps over 2.1 s of a 30 fps video: 6 frames sampled (0, 10, 21, ...), 3 temporal steps (2 + 1 on 2 ranks),
    # frames on and between keyframes
    path = write_synthetic_video(tmp_path / "v.mp4", 63, 100, 80, fps=30, seed=2, gop=15, bframes=2)
    full = write_synthetic_video(tmp_path / "t.mp4", 40, 64, 48, fps=10, faststart=True)
    data = open(full, "rb").read()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 2])
    truncated = str(tmp_path / "truncated.mp4")
    results = [_engine_new_vs_old(0, 1, path, truncated)] + run_distributed(_engine_new_vs_old, 2, path, truncated)
    for res in results:
        assert res["same_prompt"] and res["same_positions"]
        assert res["new"][0] == res["old"][0]
        assert (res["new"][1] - res["old"][1]).abs().max().item() < 1e-4
    assert results[0]["rows"] == results[0]["own_rows"] == 3 * 80  # 140x112 frames: a 3 x 8 x 10 grid
    assert [r["rows"] for r in results[1:]] == [r["own_rows"] for r in results[1:]] == [160, 80]
    assert results[1]["new"][0] == results[0]["new"][0]  # ring over 2 ranks answers as one process
