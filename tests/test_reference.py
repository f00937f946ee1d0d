"""reference_attention against an independent naive implementation (explicit per-head global masks, float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spava_ds import SpavaConfig, ZigzagLayout, dense_causal_attention, reference_attention
from spava_ds.kernels import attend, merge, merge_stacked


def naive_spava(q, k, v, context_len, anchor_len, world, passing, pool):
    """Spava written from the spec with Python loops: who sees whom, per batch row and KV head, then softmax."""
    b, total, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    blocks = [list(map(int, x)) for x in np.array_split(np.arange(anchor_len, context_len), 2 * world)]
    out = torch.zeros_like(q)
    for bi in range(b):
        for g in range(hkv):
            qbar = q[bi, context_len:, g * group:(g + 1) * group].mean(dim=(0, 1))
            raw = {t: float(k[bi, t, g] @ qbar) for t in range(context_len)}
            selected = []
            for blk in blocks:
                pooled = {t: max(raw[u] for u in blk if abs(u - t) <= pool // 2) for t in blk}
                selected.append(sorted(blk, key=lambda t: (-pooled[t], t))[:min(passing, len(blk))])
            visible = torch.zeros(total, total, dtype=torch.bool)
            for i in range(total):
                if i < anchor_len or i >= context_len:  # anchor and query rows: causal
                    visible[i, :i + 1] = True
                    if i < anchor_len:
                        visible[i, anchor_len:] = False
                    continue
                vh = next(n for n, blk in enumerate(blocks) if i in blk)
                visible[i, :anchor_len] = True
                visible[i, blocks[vh][0]:i + 1] = True
                for u in range(vh):
                    visible[i, selected[u]] = True
            for n in range(g * group, (g + 1) * group):
                s = (q[bi, :, n] @ k[bi, :, g].T) / math.sqrt(d)
                out[bi, :, n] = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1) @ v[bi, :, g]
    return out


@pytest.mark.parametrize("context_len,query_len,world,anchor,passing,pool,hq,hkv",
                         [(23, 3, 2, 3, 2, 5, 4, 2), (31, 1, 3, 0, 1, 3, 2, 1), (29, 4, 1, 5, 3, 1, 3, 3),
                          (40, 2, 4, 2, 3, 5, 4, 2), (26, 2, 2, 4, 100, 5, 2, 2)])
def test_reference_equals_naive(context_len, query_len, world, anchor, passing, pool, hq, hkv):
    torch.manual_seed(context_len)
    b, d = 2, 8
    q = torch.randn(b, context_len + query_len, hq, d, dtype=torch.float64)
    k = torch.randn(b, context_len + query_len, hkv, d, dtype=torch.float64)
    v = torch.randn_like(k)
    layout = ZigzagLayout(context_len, query_len, world,
                          SpavaConfig(anchor_len=anchor, passing_len=passing, pool_kernel=pool))
    expected = naive_spava(q, k, v, context_len, anchor, world, passing, pool)
    torch.testing.assert_close(reference_attention(q, k, v, layout), expected, atol=1e-12, rtol=1e-12)


def test_ties_go_to_the_earlier_token():
    # Identical keys give identical scores: the passing block must be the first tokens of each block.
    context_len, query_len, world, passing = 20, 2, 2, 2
    q = torch.randn(1, 22, 2, 4, dtype=torch.float64)
    k = torch.ones(1, 22, 1, 4, dtype=torch.float64)
    v = torch.randn(1, 22, 1, 4, dtype=torch.float64)
    layout = ZigzagLayout(context_len, query_len, world, SpavaConfig(anchor_len=0, passing_len=passing))
    torch.testing.assert_close(reference_attention(q, k, v, layout),
                               naive_spava(q, k, v, context_len, 0, world, passing, 5), atol=1e-12, rtol=1e-12)


def test_full_budget_is_dense():
    q, k, v = torch.randn(2, 50, 4, 8), torch.randn(2, 50, 2, 8), torch.randn(2, 50, 2, 8)
    layout = ZigzagLayout(45, 5, 3, SpavaConfig(anchor_len=6, passing_len=64))
    torch.testing.assert_close(reference_attention(q, k, v, layout), dense_causal_attention(q, k, v),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["math", "cpu_flash"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_pieces_merge_to_dense(backend, dtype):
    # Attention split over disjoint key pieces and merged by LSE equals one causal call, for every backend.
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 37, h, 16).to(dtype) for h in (6, 2, 2))
    ctx = 30
    pieces = [attend(q[:, ctx:], k[:, :11], v[:, :11], backend=backend),
              attend(q[:, ctx:], k[:, 11:ctx], v[:, 11:ctx], backend=backend),
              attend(q[:, ctx:], k[:, ctx:], v[:, ctx:], causal=True, backend=backend),
              attend(q[:, ctx:], k[:, :0], v[:, :0], backend=backend)]  # an empty piece weighs nothing
    out, lse = merge(pieces)
    dense = dense_causal_attention(q.float(), k.float(), v.float())[:, ctx:]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), dense, atol=tol, rtol=tol)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float()[:, ctx:], k.float().repeat_interleave(3, 2)) / 4.0
    scores = scores.masked_fill(~torch.ones(7, 37, dtype=torch.bool).tril(ctx), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=tol, rtol=tol)


def test_stacked_merge_equals_dense_and_handles_rows_without_keys():
    # The one-pass merge of n stacked pieces (as the query partials arrive) against one causal call; one row has
    # keys in no piece at all and must come out as zeros with LSE -inf, not nan.
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 41, h, 8) for h in (4, 2, 2))
    ctx, cuts = 33, [0, 5, 19, 33]
    pieces = [attend(q[:, ctx:], k[:, s:e], v[:, s:e]) for s, e in zip(cuts, cuts[1:])]
    pieces.append(attend(q[:, ctx:], k[:, ctx:], v[:, ctx:], causal=True))
    out, lse = merge_stacked(torch.stack([o for o, _ in pieces]), torch.stack([l.transpose(1, 2) for _, l in pieces]))
    torch.testing.assert_close(out, dense_causal_attention(q, k, v)[:, ctx:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.transpose(1, 2), merge(pieces)[1], atol=1e-5, rtol=1e-5)
    empty = [(torch.randn(1, 3, 2, 4), torch.tensor([[0.5, -1.0], [-math.inf, -math.inf], [2.0, 0.0]]).view(1, 3, 2))
             for _ in range(3)]
    empty[1][1][0, 0, 0] = -math.inf
    out, lse = merge_stacked(torch.stack([o for o, _ in empty]), torch.stack([l for _, l in empty]))
    assert torch.isfinite(out).all() and (out[0, 1] == 0).all() and torch.isneginf(lse[0, 1]).all()
    assert torch.isfinite(lse[0, [0, 2]]).all()
