"""The Qwen vision towers' per-grid metadata computed once on the host (``qwen_vision.tower_grid_kwargs``).

For tiny Qwen2.5-VL and Qwen3-VL checkpoints (as tests/test_stream.py builds them), on random pixels of a 7-step
video: the features (DeepStack's included) equal transformers' own tower call on the whole video, through the
non-streamed path (``encode_pixels``) and streamed in chunks of 3 steps (3 + 3 + 1 at W = 1; 3 + 1 and 3 on two
gloo ranks), with transformers' attention and the fused one. The metadata is computed once per distinct chunk grid,
and the tower call of a chunk whose grid is cached makes no synchronising call at all (``profiling.host_syncs``),
while the same call without the metadata makes several (on a GPU too: ``pytest -m gpu`` on one GPU).
"""

from __future__ import annotations

import logging
import sys

import pytest
import torch

pytest.importorskip("transformers")

from dist_utils import run_distributed  # noqa: E402
from spava_ds.integrations import qwen_vision as qv  # noqa: E402
from spava_ds.profiling import host_syncs  # noqa: E402

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
STEPS, CHUNK = 7, 3
PATCHES = {"qwen2_5_vl": (8, 12), "qwen3_vl": (6, 10)}  # (h, w) in patches: windows cut the merged grid unevenly


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from spava_ds.assets import tiny_model_dir
    from spava_ds.benchmarks.tiny import write_family_checkpoint

    folder = tmp_path_factory.mktemp("vision_metadata")
    return {"qwen2_5_vl": tiny_model_dir(), "qwen3_vl": write_family_checkpoint(str(folder / "qwen3_vl"), "qwen3_vl")}


def _family(model_dir: str):
    from spava_ds.models import family_of, load_model

    return family_of(load_model(model_dir, torch.float32).eval())


def _video(family, name: str):
    """Random pixel rows of a ``STEPS``-step video, its CPU grid and the merged tokens of one step."""
    vcfg = family.config.vision_config
    h, w = PATCHES[name]
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(STEPS * h * w, 3 * vcfg.temporal_patch_size * vcfg.patch_size ** 2, generator=g)
    return rows, torch.tensor([[STEPS, h, w]]), h * w // vcfg.spatial_merge_size ** 2


def _streamed(family, rows, grid, tokens_per_step, first, stop, group=None):
    """``frame_parallel_stream`` over steps ``[first, stop)`` of the video in chunks of ``CHUNK`` steps."""
    _, h, w = grid[0].tolist()
    chunks = [(s, min(s + CHUNK, stop), rows[s * h * w:min(s + CHUNK, stop) * h * w])
              for s in range(first, stop, CHUNK)]

    def encode_steps(chunk_rows, begin, end):
        return family.encode_steps(chunk_rows, torch.tensor([[end - begin, h, w]]))

    return qv.frame_parallel_stream(encode_steps, chunks, STEPS, tokens_per_step, group)


def _largest_differences(family, name: str, group=None):
    """Per attention (transformers', fused): the largest difference of each path's fields from transformers' own
    tower call on the whole video, and the grids computed for the streamed path."""
    from spava_ds.comm import group_rank_size
    from spava_ds.integrations.qwen_vision import disable_fused_vision_attention

    rank, world = group_rank_size(group)
    rows, grid, per_step = _video(family, name)
    visual = family.model.model.visual
    out = {}
    with torch.no_grad():
        reference = qv.vision_fields(visual(rows, grid_thw=grid))
        for attention in ("transformers", "fused"):
            if attention == "fused":
                family.fuse_vision_attention()
            qv.GRID_METADATA.clear()
            first, stop = qv.temporal_range(STEPS, rank, world)
            paths = dict(whole=family.encode_pixels(rows, grid, group),
                         streamed=_streamed(family, rows, grid, per_step, first, stop, group))
            out[attention] = {path: [(a - b).abs().max().item() for a, b in zip(fields, reference)]
                              for path, fields in paths.items()}
            out[attention]["fields"] = (len(reference), len(paths["whole"]), len(paths["streamed"]))
            out[attention]["computed"] = dict(qv.GRID_METADATA.computed)
        disable_fused_vision_attention(family.model)
    return out


def _worker(rank, world, checkpoints):
    import torch.distributed as dist

    return {name: _largest_differences(_family(checkpoints[name]), name, dist.group.WORLD) for name in FAMILIES}


def _check(results: dict, name: str, world: int, rank: int):
    h, w = PATCHES[name]
    first, stop = qv.temporal_range(STEPS, rank, world)
    chunk_steps = {min(CHUNK, stop - s) for s in range(first, stop, CHUNK)}
    for attention, paths in results.items():
        fields = paths["fields"]
        assert fields[0] == fields[1] == fields[2] and (fields[0] > 1) == (name == "qwen3_vl"), fields  # DeepStack
        for path in ("whole", "streamed"):
            assert max(paths[path]) < 1e-5, (name, world, attention, path, paths[path])
        # once per distinct grid: the rank's whole share (non-streamed), then each chunk size
        whole = {((STEPS, h, w),) if world == 1 else ((stop - first, h, w),)}
        assert paths["computed"] == {g: 1 for g in whole | {((n, h, w),) for n in chunk_steps}}, paths["computed"]


@pytest.mark.parametrize("name", FAMILIES)
def test_features_equal_transformers_tower_one_rank(checkpoints, name):
    _check(_largest_differences(_family(checkpoints[name]), name), name, 1, 0)


@pytest.mark.timeout(300)
def test_features_equal_transformers_tower_two_ranks(checkpoints):
    results = run_distributed(_worker, 2, checkpoints, timeout=240)
    for rank, by_family in enumerate(results):
        for name in FAMILIES:
            _check(by_family[name], name, 2, rank)


# On a GPU (bf16: the fused attention's varlen kernel) the check also covers the copies between host and device.
DEVICES = [("cpu", torch.float32), pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device,dtype", DEVICES)
@pytest.mark.parametrize("name", FAMILIES)
def test_cached_grid_makes_no_synchronising_call(checkpoints, name, device, dtype):
    family = _family(checkpoints[name])
    family.model.to(device, dtype)
    family.fuse_vision_attention()  # as the engine runs it
    visual = family.model.model.visual
    rows, grid, _ = _video(family, name)
    _, h, w = grid[0].tolist()
    chunk, chunk_grid = rows[:CHUNK * h * w].to(device, dtype), torch.tensor([[CHUNK, h, w]])
    qv.GRID_METADATA.clear()
    with torch.no_grad():
        first = visual(chunk, **qv.tower_grid_kwargs(visual, chunk_grid, chunk.device))
        with host_syncs() as uncached:
            visual(chunk, grid_thw=chunk_grid.to(device))   # transformers computes the metadata itself
        cached = []
        for _ in range(2):                                   # chunks 2 and 3 of the same grid
            kwargs = qv.tower_grid_kwargs(visual, chunk_grid, chunk.device)
            with host_syncs() as syncs:
                out = visual(chunk, **kwargs)
            cached.append(syncs.calls)
    assert qv.GRID_METADATA.computed == {((CHUNK, h, w),): 1}
    assert cached == [[], []], cached
    assert uncached.count(device) >= 3, uncached            # the counter sees what the cache saves
    assert all(torch.equal(a, b) for a, b in zip(qv.vision_fields(first), qv.vision_fields(out)))


def test_transformers_without_the_metadata_path_gets_the_grid_alone(checkpoints, monkeypatch, caplog):
    family = _family(checkpoints["qwen2_5_vl"])
    visual = family.model.model.visual
    module = sys.modules[type(visual).__module__]
    monkeypatch.delattr(module, "get_vision_window_index")   # as in transformers 4.x
    qv.GRID_METADATA.clear()
    with caplog.at_level(logging.INFO, logger="spava_ds.vision"):
        for steps in (3, 1):
            kwargs = qv.tower_grid_kwargs(visual, torch.tensor([[steps, 8, 12]]), torch.device("cpu"))
            assert list(kwargs) == ["grid_thw"] and kwargs["grid_thw"].tolist() == [[steps, 8, 12]]
    said = [r.getMessage() for r in caplog.records if "precomputed grid metadata" in r.getMessage()]
    assert len(said) == 1 and all("Qwen2_5_VisionTransformerPretrainedModel" in s for s in said)


@pytest.mark.gpu
@pytest.mark.parametrize("name", FAMILIES)
def test_streamed_chunks_wait_for_nothing_on_the_gpu(checkpoints, name, tmp_path):
    """The engine's streamed path on a GPU: decoding, preprocessing and the tower of every chunk after the first
    (the short last one included: its metadata is made on the host) make no call that waits for the GPU."""
    pytest.importorskip("av")
    from spava_ds import SpavaConfig
    from spava_ds.engine import SpavaEngine
    from spava_ds.video import write_synthetic_video

    video = write_synthetic_video(str(tmp_path / "clip.mp4"), num_frames=15, width=160, height=128, fps=2, seed=3,
                                  gop=4)
    engine = SpavaEngine.from_pretrained(checkpoints[name], SpavaConfig(mode="dense"), stream_video=True,
                                         stream_chunk_steps=2)
    stream = engine.video_inputs(video, "What is in this video?")["pixel_values_videos"]
    _, h, w = engine.video_inputs(video, "What is in this video?", stream=False)["video_grid_thw"][0].tolist()
    family, syncs, chunks = engine.family, [], iter(stream)
    with torch.no_grad():
        for _ in range(4):                                   # 7 steps: 2 + 2 + 2 + 1
            with host_syncs() as counted:
                first, stop, rows = next(chunks)             # the chunk's decoding and preprocessing
                pixels = family.model_pixels(rows.to(engine.model.dtype))
                family.encode_steps(pixels, torch.tensor([[stop - first, h, w]]))
            syncs.append((stop - first, counted.count("cuda"), counted.by_name()))
    assert next(chunks, None) is None and rows.is_cuda and [n for n, _, _ in syncs] == [2, 2, 2, 1], syncs
    assert all(count == 0 for _, count, _ in syncs[1:]), syncs
