"""GPU checks (marker ``gpu``; skipped without CUDA): the CUDA kernels and spava_attention under NCCL."""

from __future__ import annotations

import pytest
import torch

from spava_ds import SpavaConfig, ZigzagLayout, dense_causal_attention, reference_attention, spava_attention
from spava_ds.kernels import attend, merge

from dist_utils import run_distributed


@pytest.mark.gpu
@pytest.mark.parametrize("backend,dtype", [("cudnn", torch.bfloat16), ("sdpa_flash", torch.bfloat16),
                                           ("sdpa_efficient", torch.float32), ("sdpa_efficient", torch.bfloat16),
                                           ("auto", torch.float16)])
def test_cuda_kernel_pieces_merge_to_dense(backend, dtype):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 301, h, 64, device="cuda").to(dtype) for h in (8, 2, 2))
    ctx = 250
    out, lse = merge([attend(q[:, ctx:], k[:, :97], v[:, :97], backend=backend),
                      attend(q[:, ctx:], k[:, 97:ctx], v[:, 97:ctx], backend=backend),
                      attend(q[:, ctx:], k[:, ctx:], v[:, ctx:], causal=True, backend=backend)])
    dense = dense_causal_attention(q.float(), k.float(), v.float())[:, ctx:]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), dense, atol=tol, rtol=tol)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float()[:, ctx:], k.float().repeat_interleave(4, 2)) / 8.0
    scores = scores.masked_fill(~torch.ones(51, 301, dtype=torch.bool, device="cuda").tril(ctx), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=tol, rtol=tol)


# (context_len, query_len, Hq, Hkv, d, anchor_len, passing_len, dtype)
GPU_CASES = [(1003, 37, 8, 2, 64, 130, 40, torch.float32), (2051, 64, 28, 4, 128, None, None, torch.bfloat16),
             (777, 5, 16, 2, 128, 64, 1000, torch.bfloat16)]


def _nccl_spava(rank, world):
    device = torch.device("cuda", rank)
    errors = []
    for L, lq, hq, hkv, d, anchor, passing, dtype in GPU_CASES:
        g = torch.Generator(device=device).manual_seed(L)
        q, k, v = (torch.randn(2, L + lq, h, d, device=device, generator=g).to(dtype) for h in (hq, hkv, hkv))
        layout = ZigzagLayout(L, lq, world, SpavaConfig(anchor_len=anchor, passing_len=passing))
        out = spava_attention(layout.shard(q, rank), layout.shard(k, rank), layout.shard(v, rank), layout)
        ref = reference_attention(q, k, v, layout)
        errors.append((out.float() - layout.shard(ref, rank).float()).abs().max().item())
        if passing is not None and passing >= L:
            dense = dense_causal_attention(q.float(), k.float(), v.float())
            errors.append((out.float() - layout.shard(dense, rank)).abs().max().item())
    return errors


@pytest.mark.gpu(count=2)
@pytest.mark.timeout(600)
def test_spava_nccl_two_gpus_matches_reference():
    per_rank = run_distributed(_nccl_spava, 2, backend="nccl")
    for errs in per_rank:
        assert errs[0] < 1e-4, errs           # fp32
        assert max(errs[1:]) < 3e-2, errs     # bf16 against the fp32-accumulated reference
