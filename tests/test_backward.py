"""Forward and backward of every mode on real processes (gloo) against single-process autograd references.

Replicated tokens (anchor, query) hold partial gradients on each rank: the loss counts them once over the group
(weight 1/W per rank) and their gradients are summed over the group before the comparison.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from spava_ds import SpavaConfig, ZigzagLayout, dense_causal_attention, reference_attention
from spava_ds.attention import sp_attention

from dist_utils import run_distributed

# (mode, config overrides, context_len, query_len, Hq, Hkv, d, batch)
CASES = [
    ("spava", dict(anchor_len=5, passing_len=3), 47, 4, 4, 2, 8, 2),
    ("spava", dict(anchor_len=2, passing_len=[1, 4], pool_kernel=3), 41, 3, 6, 3, 8, 1),
    ("spava", dict(anchor_len=3, passing_len=100), 29, 2, 2, 1, 8, 1),     # budget covers the blocks: exact
    ("ring", dict(anchor_len=4), 43, 3, 4, 2, 8, 2),
    ("ring", dict(anchor_len=0), 40, 0, 4, 2, 8, 1),                      # Megatron's CP layout
    ("ulysses", dict(anchor_len=3), 37, 2, 12, 1, 8, 1),                  # KV heads < W: replicated
    ("ulysses", dict(anchor_len=0), 48, 0, 12, 12, 8, 2),
    ("star", dict(), 45, 3, 4, 2, 8, 1),
    ("apb", dict(anchor_len=4, passing_len=3), 46, 3, 4, 2, 8, 1),
]
EXACT = ("ring", "ulysses", "dense")


def _case_tensors(case, seed):
    _, _, L, lq, hq, hkv, d, b = case
    g = torch.Generator().manual_seed(seed)
    q, k, v, grad_out = (torch.randn(b, L + lq, h, d, generator=g) for h in (hq, hkv, hkv, hq))
    return q, k, v, grad_out


def _reference_grads(layout, q, k, v, grad_out, exact, layer_idx):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = dense_causal_attention(q, k, v) if exact else reference_attention(q, k, v, layout, layer_idx=layer_idx)
    (out * grad_out).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _distributed_grads(layout, rank, world, q, k, v, grad_out, layer_idx):
    ql, kl, vl = (layout.shard(t, rank).clone().requires_grad_() for t in (q, k, v))
    out = sp_attention(ql, kl, vl, layout, layer_idx=layer_idx)
    weight = layout.shard(grad_out, rank).clone()
    seg = layout.local_segments(rank)
    for s, e in (seg.anchor, seg.query):  # replicated rows: counted once over the group
        weight[:, s:e] /= world
    (out * weight).sum().backward()
    grads = []
    for g in (ql.grad, kl.grad, vl.grad):
        for s, e in (seg.anchor, seg.query):
            part = g[:, s:e].contiguous()
            dist.all_reduce(part)
            g[:, s:e] = part
        grads.append(g)
    return out.detach(), grads


def _check_modes(rank, world):
    results = []
    for i, case in enumerate(CASES):
        mode, overrides = case[0], case[1]
        config = SpavaConfig(mode=mode, **overrides)
        layout = ZigzagLayout(case[2], case[3], world, config)
        q, k, v, grad_out = _case_tensors(case, seed=100 + i)
        layer_idx = 1 if isinstance(config.passing_len, tuple) else None
        ref_out, *ref_grads = _reference_grads(layout, q, k, v, grad_out, mode in EXACT, layer_idx)
        out, grads = _distributed_grads(layout, rank, world, q, k, v, grad_out, layer_idx)
        errs = [(out - layout.shard(ref_out, rank)).abs().max().item()]
        for g, ref in zip(grads, ref_grads):
            scale = ref.abs().max().item()
            errs.append((g - layout.shard(ref, rank)).abs().max().item() / scale)
        results.append((mode, errs))
    return results


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_forward_and_backward_match_references(world):
    per_rank = run_distributed(_check_modes, world)
    for rank, results in enumerate(per_rank):
        for mode, (out_err, *grad_errs) in results:
            assert out_err < 1e-5, (rank, mode, out_err)
            assert max(grad_errs) < 1e-5, (rank, mode, grad_errs)


def test_dense_mode_single_process():
    case = ("dense", {}, 30, 3, 4, 2, 8, 2)
    q, k, v, grad_out = _case_tensors(case, seed=7)
    layout = ZigzagLayout(30, 3, 1, SpavaConfig(mode="dense", anchor_len=2))
    ref_out, *ref_grads = _reference_grads(layout, q, k, v, grad_out, True, None)
    ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
    out = sp_attention(ql, kl, vl, layout)
    (out * grad_out).sum().backward()
    torch.testing.assert_close(out, ref_out)
    for g, ref in zip((ql.grad, kl.grad, vl.grad), ref_grads):
        torch.testing.assert_close(g, ref)


def _dense_needs_one_rank(rank, world):
    layout = ZigzagLayout(30, 3, world, SpavaConfig(mode="dense", anchor_len=2))
    n = layout.local_len(rank)
    try:
        sp_attention(torch.randn(1, n, 4, 8), torch.randn(1, n, 2, 8), torch.randn(1, n, 2, 8), layout)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.timeout(120)
def test_dense_mode_rejects_a_group():
    for msg in run_distributed(_dense_needs_one_rank, 2):
        assert msg and "runs in one process" in msg
