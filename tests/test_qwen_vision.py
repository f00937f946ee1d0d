"""Frame-parallel Qwen2.5-VL vision encoding and the fused vision attention, against transformers' own vision tower.

The reference is always ``visual(pixel_values, grid_thw)`` of a tiny random Qwen2.5-VL run by transformers with its
stock SDPA attention (one call per window) on one process.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402

from spava_ds.integrations import qwen_vision as qv  # noqa: E402

from dist_utils import run_distributed  # noqa: E402

# Two videos, 5 + 3 temporal steps (16 frames). Video 0 has 2x3 windows of 16 patches per step; video 1's 3x2
# merged grid pads to windows of 16 and 8 patches. W = 2 splits the steps 4+4, W = 3 splits them 3+3+2: both cut
# video 0 and put its tail and video 1 on one rank.
GRID = [[5, 8, 12], [3, 6, 4]]


def _tiny_model(depth=3, hidden=32, heads=2, seed=0, dtype=torch.float32, device="cpu"):
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=depth, hidden_size=hidden, intermediate_size=2 * hidden, num_heads=heads,
                           out_hidden_size=64, patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
                           window_size=56, fullatt_block_indexes=[1]),
        image_token_id=249, video_token_id=250, vision_start_token_id=247, vision_end_token_id=248)
    config.vision_config._attn_implementation = "sdpa"
    torch.manual_seed(seed)   # identical weights on every rank
    return Qwen2_5_VLForConditionalGeneration(config).to(device=device, dtype=dtype).eval()


def _pixels(grid, seed=1, dtype=torch.float32, device="cpu"):
    rows = sum(t * h * w for t, h, w in grid)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 3 * 2 * 14 * 14, generator=g).to(device=device, dtype=dtype)


def _frame_parallel_worker(rank, world):
    model = _tiny_model()
    visual = model.model.visual
    grid = torch.tensor(GRID)
    pixels = _pixels(GRID)
    results = {}

    with torch.no_grad():
        reference = qv.encode_video(visual, pixels, grid)
        out = qv.frame_parallel_vision(visual, pixels, grid)
        results["no_grad"] = (out - reference).abs().max().item()
        results["shape"] = (tuple(out.shape), tuple(reference.shape))
        # Each rank passes only the rows of its own temporal steps (what the video pipeline decodes) and the global
        # grid: the same gathered features.
        step_rows = [h * w for t, h, w in GRID for _ in range(t)]
        first, stop = qv.temporal_range(len(step_rows), rank, world)
        own = pixels[sum(step_rows[:first]):sum(step_rows[:stop])]
        results["own_rows"] = (qv.frame_parallel_vision(visual, own, grid) - reference).abs().max().item()
        # The fused attention (flex with the block-diagonal mask, eager on the CPU) under frame parallelism.
        handle = qv.enable_fused_vision_attention(visual, backend="flex_eager", block_size=16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # flex_attention warns that it runs uncompiled
            out = qv.frame_parallel_vision(visual, pixels, grid)
        handle.remove()
        results["fused"] = (out - reference).abs().max().item()

    # Training: rank r's loss weights the gathered features by w_r; the total loss is the sum over ranks. With the
    # parameter gradients summed over ranks (as data/sequence parallel training does) they must equal one process's.
    params = [p for p in visual.parameters()]
    weights = [torch.randn(reference.shape, generator=torch.Generator().manual_seed(10 + r)) for r in range(world)]
    single = torch.autograd.grad(sum((qv.encode_video(visual, pixels, grid) * w).sum() for w in weights), params)
    local = torch.autograd.grad((qv.frame_parallel_vision(visual, pixels, grid) * weights[rank]).sum(), params)
    grad_err = 0.0
    for g_local, g_single in zip(local, single):
        g_local = g_local.clone()
        dist.all_reduce(g_local)
        grad_err = max(grad_err, ((g_local - g_single).abs().max() / g_single.abs().max().clamp_min(1e-12)).item())
    results["grad_rel"] = grad_err

    # Too few temporal steps: every rank raises before any collective; the barrier after shows no rank is stuck.
    short = [[1, 4, 4]] * (world - 1)
    try:
        qv.frame_parallel_vision(visual, _pixels(short), torch.tensor(short))
        results["short"] = None
    except ValueError as e:
        results["short"] = str(e)
    dist.barrier()
    return results


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3])
def test_frame_parallel_equals_one_device(world):
    for rank, r in enumerate(run_distributed(_frame_parallel_worker, world, timeout=110)):
        assert r["shape"][0] == r["shape"][1] == (sum(t * h * w for t, h, w in GRID) // 4, 64)
        assert r["no_grad"] < 1e-5 and r["own_rows"] < 1e-5, (rank, r)
        assert r["fused"] < 1e-5, (rank, r)
        assert r["grad_rel"] < 1e-5, (rank, r)
        assert r["short"] is not None and f"at least {2 * world} frames" in r["short"], (rank, r)


def test_plan_shares_and_local_grids():
    assert qv.temporal_shares(8, 3) == [3, 3, 2] and qv.temporal_shares(7, 7) == [1] * 7
    assert [qv.temporal_range(8, r, 3) for r in range(3)] == [(0, 3), (3, 6), (6, 8)]
    assert qv.temporal_range(5, 0, 1) == (0, 5)
    slices = qv._plan(GRID, 3, merge_unit=4, temporal_patch_size=2)
    assert [s.grid_thw for s in slices] == [[[3, 8, 12]], [[2, 8, 12], [1, 6, 4]], [[2, 6, 4]]]
    assert [s.rows for s in slices] == [(0, 288), (288, 504), (504, 552)]
    assert [s.tokens for s in slices] == [(0, 72), (72, 126), (126, 138)]
    with pytest.raises(ValueError, match="at least 10 frames"):
        qv._plan([[2, 4, 4], [2, 4, 4]], 5, merge_unit=4, temporal_patch_size=2)


def test_single_process_and_bad_input():
    model = _tiny_model(depth=2)
    visual, grid, pixels = model.model.visual, torch.tensor(GRID), _pixels(GRID)
    with torch.no_grad():
        torch.testing.assert_close(qv.frame_parallel_vision(visual, pixels, grid),
                                   qv.encode_video(visual, pixels, grid), atol=0, rtol=0)
        with pytest.raises(ValueError, match="rows"):
            qv.frame_parallel_vision(visual, pixels[:-1], grid)
    with pytest.raises(ValueError, match="unknown vision attention backend"):
        qv.enable_fused_vision_attention(model, backend="nope")
    with pytest.raises(ValueError, match="no Qwen vision attention"):
        qv.enable_fused_vision_attention(model.model.language_model)


def _brute_block_masks(cu, seq_len, block):
    segment = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.tensor(cu[1:]) - torch.tensor(cu[:-1]))
    same = segment[:, None] == segment[None, :]
    n = -(-seq_len // block)
    anyb, allb = torch.zeros(n, n, dtype=torch.bool), torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            tile = same[i * block:(i + 1) * block, j * block:(j + 1) * block]
            anyb[i, j], allb[i, j] = tile.any(), tile.all()
    return anyb & ~allb, allb


@pytest.mark.parametrize("lengths,block", [([16] * 6 + [8, 16, 8], 16), ([5, 40, 3, 64, 1, 20], 16),
                                           ([300, 7, 129, 128, 2], 128), ([10], 128), ([33, 31], 8)])
def test_block_mask_structure(lengths, block):
    # The kernel skips mask_mod on "full" blocks and never visits unlisted ones: both sets must be exact. (On the
    # CPU flex runs eagerly and ignores the block structure, so only this test checks it there.)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    partial, full = qv.doc_block_masks(torch.tensor(cu, dtype=torch.int32), cu[-1], block)
    want_partial, want_full = _brute_block_masks(cu, cu[-1], block)
    assert torch.equal(partial, want_partial) and torch.equal(full, want_full)
    mask = qv._block_mask(torch.tensor(cu, dtype=torch.int32), cu[-1], block)
    assert torch.equal(mask.to_dense()[0, 0].bool(), want_partial | want_full)


def test_fused_attention_equals_transformers_sdpa(monkeypatch):
    model = _tiny_model(depth=4)
    visual, grid, pixels = model.model.visual, torch.tensor(GRID), _pixels(GRID)
    attn_modules = [blk.attn for blk in visual.blocks]
    built = []
    real_block_mask = qv._block_mask
    monkeypatch.setattr(qv, "_block_mask", lambda *a, **k: built.append(a[1]) or real_block_mask(*a, **k))
    with torch.no_grad():
        reference = qv.encode_video(visual, pixels, grid)
        for backend in ("sdpa", "flex_eager", "auto"):
            built.clear()
            handle = qv.enable_fused_vision_attention(model, backend=backend, block_size=16)
            assert all("forward" in vars(m) for m in attn_modules)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = qv.encode_video(visual, pixels, grid)
            torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
            if backend == "flex_eager":
                # 4 layers, 2 distinct cu_seqlens (windows, whole steps): 2 masks built, not 4.
                assert len(built) == 2, built
            assert qv.disable_fused_vision_attention(model) == len(attn_modules)
            assert not any("forward" in vars(m) for m in attn_modules)
            assert handle.modules == []
        # Installing twice replaces; remove() then restores transformers' forward.
        qv.enable_fused_vision_attention(visual, backend="sdpa")
        handle = qv.enable_fused_vision_attention(visual, backend="flex_eager")
        assert all(m.forward.args[1] is handle for m in attn_modules)
        handle.remove()
        torch.testing.assert_close(qv.encode_video(visual, pixels, grid), reference, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_fused_attention_gpu_backends_match_sdpa():
    # A vision tower with the real head dim (80) and a grid large enough for many 128-token mask blocks.
    model = _tiny_model(depth=4, hidden=160, heads=2, dtype=torch.bfloat16, device="cuda")
    visual = model.model.visual
    grid_list = [[4, 26, 46], [3, 20, 14]]
    grid, pixels = torch.tensor(grid_list, device="cuda"), _pixels(grid_list, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        reference = qv.encode_video(visual, pixels, grid).float()
        exact = qv.encode_video(_tiny_model(depth=4, hidden=160, heads=2, device="cuda").model.visual,
                                pixels.float(), grid)   # fp32 scale of the bf16 rounding
        bf16_err = (reference - exact).abs().max().item()
        for backend in qv.available_backends("cuda"):
            handle = qv.enable_fused_vision_attention(model, backend=backend)
            out = qv.encode_video(visual, pixels, grid).float()
            handle.remove()
            err = (out - reference).abs().max().item()
            assert err <= max(2 * bf16_err, 2e-2 * reference.abs().max().item()), (backend, err, bf16_err)
