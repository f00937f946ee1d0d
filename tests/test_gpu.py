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


@pytest.mark.gpu
@pytest.mark.parametrize("backend,dtype", [("cudnn", torch.bfloat16), ("sdpa_flash", torch.bfloat16),
                                           ("sdpa_efficient", torch.float32), ("sdpa_efficient", torch.bfloat16),
                                           ("math", torch.float32)])
def test_cuda_kernel_backward_with_merged_lse(backend, dtype):
    # Pieces' backward with the merged out/LSE add up to the gradient of one causal attention.
    from spava_ds.kernels import attend_backward

    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(2, 301, h, 64, device="cuda").to(dtype) for h in (8, 2, 2, 8))
    ctx = 250
    pieces = [(0, 97, False), (97, ctx, False), (ctx, 301, True)]
    out, lse = merge([attend(q[:, ctx:], k[:, s:e], v[:, s:e], causal=c, backend=backend) for s, e, c in pieces])
    dq = torch.zeros_like(q[:, ctx:], dtype=torch.float32)
    dk, dv = torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)
    for s, e, c in pieces:
        gq, gk, gv = attend_backward(dout[:, ctx:], q[:, ctx:], k[:, s:e], v[:, s:e], out, lse, causal=c,
                                     backend=backend)
        dq += gq
        dk[:, s:e] += gk
        dv[:, s:e] += gv
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    (dense_causal_attention(qf, kf, vf)[:, ctx:] * dout[:, ctx:].float()).sum().backward()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for got, want in ((dq, qf.grad[:, ctx:]), (dk, kf.grad), (dv, vf.grad)):
        torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=tol)


def _nccl_backward(rank, world):
    from test_backward import _case_tensors, _distributed_grads, _reference_grads

    device = torch.device("cuda", rank)
    results = []
    cases = [("spava", dict(anchor_len=64, passing_len=48), 901, 33, 8, 2, 64, 1),
             ("ring", dict(anchor_len=0), 1024, 0, 8, 2, 64, 2),
             ("ulysses", dict(anchor_len=16), 700, 20, 8, 1, 64, 1)]
    for dtype in (torch.float32, torch.bfloat16):
        for i, case in enumerate(cases):
            layout = ZigzagLayout(case[2], case[3], world, SpavaConfig(mode=case[0], **case[1]))
            # Rounded to the dtype first, so the reference sees the same values (and picks the same keys).
            q, k, v, grad_out = (t.to(device).to(dtype).float() for t in _case_tensors(case, seed=i))
            exact = case[0] != "spava"
            ref_out, *ref_grads = _reference_grads(layout, q, k, v, grad_out, exact, None)
            out, grads = _distributed_grads(layout, rank, world, *(t.to(dtype) for t in (q, k, v, grad_out)), None)
            errs = [(out.float() - layout.shard(ref_out, rank)).abs().max().item()]
            errs += [((g.float() - layout.shard(r, rank)).abs().max() / r.abs().max()).item()
                     for g, r in zip(grads, ref_grads)]
            results.append((case[0], str(dtype), errs))
    return results


@pytest.mark.gpu(count=2)
@pytest.mark.timeout(600)
def test_nccl_forward_backward_two_gpus():
    for results in run_distributed(_nccl_backward, 2, backend="nccl"):
        for mode, dtype, errs in results:
            tol = 1e-4 if dtype == "torch.float32" else 4e-2
            assert max(errs) < tol, (mode, dtype, errs)


@pytest.mark.gpu(count=2)
@pytest.mark.timeout(600)
def test_compiled_merges_stay_within_the_recompile_limit_on_cuda():
    """The CUDA version of the CPU check: with inductor (whose guards the CPU's eager backend does not add), every
    mode, dtype and length keeps each merge signature to at most two compiled variants, and the result is right."""
    from test_attention_dist import _compiled_merge_variants

    modes = ("spava", "ring", "star", "apb", "ulysses")
    for errors, entries in run_distributed(_compiled_merge_variants, 2, "cuda", (300, 1001, 4099), 64, modes, (),
                                           backend="nccl"):
        assert entries and max(entries.values()) <= 2, entries
        assert max(errors) < 3e-2, errors
