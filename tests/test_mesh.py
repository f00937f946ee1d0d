"""The two-dimensional mode (``SpavaConfig.ulysses_degree``): ``MeshLayout`` and ``mesh_attention``.

Distributed checks run on gloo processes (2 x 2 and 1 x 4 meshes, 4 processes) and on PyTorch's multi-threaded
process group (a 3 x 2 mesh as 6 threads of one process: CI allows at most 4 processes per test). Every rank's
output and gradients are compared with single-process references: ``reference_attention`` at the inter size for
spava and apb (with the KV heads repeated when there are fewer than U), dense causal attention for ring. Tokens held
by several ranks (anchor and query, once per inter group) count once in the loss; their partial gradients are
summed over the ranks that hold them.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch
import torch.distributed as dist

from spava_ds import (MODE_TABLE, MeshLayout, SpavaConfig, ZigzagLayout, comm, dense_causal_attention, make_layout,
                      reference_attention, sp_attention)
from spava_ds.config import MESH_MODES
from spava_ds.profiling import span_hook

from dist_utils import run_distributed, run_threaded

# (mode, config overrides, context_len, query_len, Hq, Hkv, d, batch)
CASES = [
    ("spava", dict(anchor_len=5, passing_len=3), 61, 5, 8, 2, 8, 1),
    ("spava", dict(passing_len=4, pool_kernel=3), 53, 3, 8, 1, 8, 2),    # default anchor; 1 KV head: replicated
    ("spava", dict(anchor_len=2, passing_len=[1, 3]), 44, 2, 8, 4, 8, 1),  # per-layer budgets (layer 1)
    ("spava", dict(anchor_len=3, passing_len=100), 39, 4, 4, 4, 8, 1),   # budget covers every block: exact
    ("ring", dict(anchor_len=4), 47, 4, 8, 2, 8, 2),
    ("ring", dict(anchor_len=0), 41, 0, 4, 1, 8, 1),                       # no anchor, no query (Megatron's CP)
    ("apb", dict(anchor_len=4, passing_len=3), 46, 3, 8, 2, 8, 1),
]


def _config(case, ulysses_degree):
    return SpavaConfig(mode=case[0], ulysses_degree=ulysses_degree, **case[1])


def _tensors(case, seed):
    _, _, L, lq, hq, hkv, d, b = case
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, L + lq, h, d, generator=g) for h in (hq, hkv, hkv, hq)]  # q, k, v, output gradient


def _holders(layout, total):
    """How many ranks hold each global token."""
    count = torch.zeros(total)
    for r in range(layout.world_size):
        count.index_add_(0, layout.positions(r), torch.ones(layout.local_len(r)))
    return count


def _rank_results(rank, world, ulysses_degree):
    """Per case: this rank's positions, output and gradients of the 2-D mode on a (W / U) x U mesh."""
    mesh = comm.init_mesh(ulysses_degree)
    out = []
    for n, case in enumerate(CASES):
        if case[4] % ulysses_degree or (case[5] % ulysses_degree and ulysses_degree % case[5]):
            out.append(None)
            continue
        config = _config(case, ulysses_degree)
        layout = make_layout(case[2], case[3], world, config)
        q, k, v, grad_out = _tensors(case, seed=10 + n)
        ql, kl, vl = (layout.shard(t, rank).clone().requires_grad_() for t in (q, k, v))
        layer_idx = 1 if isinstance(config.passing_len, tuple) else None
        o = sp_attention(ql, kl, vl, layout, group=mesh, layer_idx=layer_idx)
        weight = 1.0 / _holders(layout, q.shape[1])[layout.positions(rank)]
        (o * layout.shard(grad_out, rank) * weight[None, :, None, None]).sum().backward()
        out.append((layout.positions(rank), o.detach(), ql.grad, kl.grad, vl.grad))
    return out


def _reference(case, ulysses_degree, world):
    """Output and gradients of the whole sequence in one process: the flat mode at the inter size."""
    q, k, v, grad_out = (t.clone().requires_grad_() for t in _tensors(case, seed=10 + CASES.index(case)))
    config = _config(case, ulysses_degree)
    if case[0] == "ring":
        out = dense_causal_attention(q, k, v)
    else:
        flat = dataclasses.replace(config, ulysses_degree=1)
        inter = ZigzagLayout(case[2], case[3], world // ulysses_degree, flat)
        copies = max(1, ulysses_degree // k.shape[2])  # fewer KV heads than U: each copy selects on its own
        out = reference_attention(q, k.repeat_interleave(copies, 2), v.repeat_interleave(copies, 2), inter,
                                  layer_idx=1 if isinstance(flat.passing_len, tuple) else None)
    (out * grad_out).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _check(per_rank, ulysses_degree, world):
    checked = 0
    for n, case in enumerate(CASES):
        if per_rank[0][n] is None:
            continue
        ref_out, *ref_grads = _reference(case, ulysses_degree, world)
        grads = [torch.zeros_like(g) for g in ref_grads]
        for res in per_rank:
            pos, out, *local_grads = res[n]
            err = (out - ref_out[:, pos]).abs().max().item()
            assert err < 1e-5, (case, ulysses_degree, err)
            for total, g in zip(grads, local_grads):
                total.index_add_(1, pos, g)
        for name, g, ref in zip("qkv", grads, ref_grads):
            err = (g - ref).abs().max().item() / ref.abs().max().item()
            assert err < 1e-5, (case, ulysses_degree, name, err)
        checked += 1
    assert checked >= 5


def _bad_inputs(rank, world):
    """Errors raised identically on every rank before any collective; the groups still work afterwards."""
    mesh = comm.init_mesh(2)
    layout = make_layout(40, 3, world, SpavaConfig(anchor_len=4, passing_len=2, ulysses_degree=2))
    n = layout.local_len(rank)
    messages = []
    for hq, hkv, tokens, group in ((3, 1, n, mesh), (6, 3, n, mesh), (4, 2, n + 1, mesh), (4, 2, n, None)):
        try:
            sp_attention(torch.randn(1, tokens, hq, 8), torch.randn(1, tokens, hkv, 8),
                         torch.randn(1, tokens, hkv, 8), layout, group=group)
        except ValueError as e:
            messages.append(str(e).replace(f"rank {rank} ", "rank r ").split(" got ")[0])
    try:  # the other mesh shape
        sp_attention(*(torch.randn(1, n, 4, 8) for _ in range(3)), layout, group=comm.init_mesh(1))
    except ValueError as e:
        messages.append(str(e)[:40])
    t = torch.ones(1)
    dist.all_reduce(t)
    return messages, t.item()


@pytest.mark.timeout(300)
def test_2x2_and_1x4_meshes_on_gloo_processes_match_references():
    per_rank = run_distributed(_both_meshes, 4)
    for u in (2, 4):
        _check([r[u] for r in per_rank], u, 4)
    # The intra all-to-alls are comm's collectives (seen by the hook) and the 2-D steps are spans, around the flat
    # schedule of the inter group (two passing halves and the query merge gathered; no reduce in the forward).
    for r in per_rank:
        (calls, names), (back_calls, back_names) = r["observed"]
        assert calls[0] == calls[-1] == "all_to_all_single" and calls.count("all_to_all_single") == 2, calls
        assert sum(c.startswith("all_gather") for c in calls) == 3, calls
        assert names[0] == "spava.mesh.to_heads" and names[-1] == "spava.mesh.to_tokens", names
        assert "spava.attend.query" in names and "spava.merge.query" in names, names
        assert back_calls.count("all_to_all_single") == 2 and "all_reduce" in back_calls, back_calls
        assert back_names[0] == "spava.backward.block2", back_names  # the all-to-all's backward has no span


def _both_meshes(rank, world):
    return {u: _rank_results(rank, world, u) for u in (2, 4)} | {"observed": _observed(rank, world)}


def _observed(rank, world):
    """The collectives (``comm.collective_hook``) and spans (``profiling.span_hook``) of one forward and backward
    of spava on a 2 x 2 mesh."""
    case = CASES[0]
    layout = make_layout(case[2], case[3], world, _config(case, 2))
    q, k, v = (layout.shard(t, rank).requires_grad_() for t in _tensors(case, seed=1)[:3])
    calls, names = [], []

    def hook(op, *args, **kwargs):
        calls.append(op.__name__)
        return op(*args, **kwargs)

    def record(name):
        names.append(name)
        return contextlib.nullcontext()

    with comm.collective_hook(hook), span_hook(record):
        out = sp_attention(q, k, v, layout, group=comm.init_mesh(2))
        forward = (list(calls), list(names))
        out.sum().backward()
    return forward, (calls[len(forward[0]):], names[len(forward[1]):])


@pytest.mark.timeout(300)
def test_3x2_mesh_on_six_threads_matches_references():
    per_rank = run_threaded(_rank_results, 6, 2)
    _check(per_rank, 2, 6)


@pytest.mark.timeout(120)
def test_bad_inputs_raise_on_every_rank_before_any_collective():
    per_rank = run_threaded(_bad_inputs, 4)
    for messages, total in per_rank:
        assert messages == per_rank[0][0] and total == 4, per_rank
    text = " | ".join(per_rank[0][0])
    assert "query heads do not split" in text and "KV heads neither split" in text, text
    assert "mesh_attention: rank r" in text and "DeviceMesh with dims" in text and "the mesh is" in text, text


# ---- the layout alone ---------------------------------------------------------------------------------------------
LAYOUTS = [(61, 5, 4, 2), (53, 3, 6, 2), (40, 0, 4, 4), (75, 9, 6, 3), (29, 2, 2, 2), (33, 1, 3, 1)]


@pytest.mark.parametrize("context_len,query_len,world,u", LAYOUTS)
def test_mesh_layout_shards_every_token(context_len, query_len, world, u):
    config = SpavaConfig(anchor_len=3, ulysses_degree=u)
    layout = MeshLayout(context_len, query_len, world, config)
    total = context_len + query_len
    x = torch.randn(2, total, 3)
    parts = [layout.shard(x, r) for r in range(world)]
    assert torch.equal(layout.unshard(parts), x)
    index = torch.arange(total)[None]
    for r in range(world):
        assert torch.equal(layout.shard(index, r)[0], layout.positions(r))
        assert parts[r].shape[1] == layout.local_len(r) >= 1
    # Each intra group holds its inter rank's local sequence, split in order among its U ranks.
    for i in range(layout.inter_size):
        group = torch.cat([layout.positions(i * u + j) for j in range(u)])
        assert torch.equal(group, layout.inter.positions(i))
    # Anchor and query once per inter group, every other token once; the KV cache keeps each token once.
    holders = _holders(layout, total)
    replicated = (torch.arange(total) < layout.inter.anchor_len) | (torch.arange(total) >= context_len)
    assert torch.equal(holders, torch.where(replicated, float(layout.inter_size), 1.0))
    # The key shares (what decoding keeps) hold each token once; only the query's keys are seen causally.
    shares = [(r, s, e, causal) for r in range(world) for s, e, causal in layout.key_share(r)]
    kept = torch.cat([layout.positions(r)[s:e] for r, s, e, _ in shares])
    assert torch.equal(kept.sort().values, torch.arange(total))
    causal = torch.cat([layout.positions(r)[s:e] for r, s, e, c in shares if c] or [torch.zeros(0, dtype=int)])
    assert torch.equal(causal.sort().values, torch.arange(context_len, total))
    assert layout.positions(layout.last_token_rank())[-1] == total - 1
    if u == 1:  # one rank per intra group: the flat layout
        flat = ZigzagLayout(context_len, query_len, world, config)
        assert all(torch.equal(layout.shard(x, r), flat.shard(x, r)) for r in range(world))
        assert all(layout.key_share(r) == flat.key_share(r) for r in range(world))


def test_make_layout_and_config_validation():
    assert isinstance(make_layout(40, 2, 4, SpavaConfig()), ZigzagLayout)
    assert isinstance(make_layout(40, 2, 4, SpavaConfig(ulysses_degree=2)), MeshLayout)
    assert SpavaConfig.from_dict({"ulysses_degree": 4}).to_dict()["ulysses_degree"] == 4
    assert SpavaConfig(ulysses_degree=np.int64(2)).ulysses_degree == 2  # integral numbers of any kind
    assert MeshLayout(40, 2, torch.tensor(4), SpavaConfig(ulysses_degree=2)).world_size == 4
    for bad in (0, -2, 1.5, "2", True):
        with pytest.raises(ValueError, match="ulysses_degree must be an int >= 1"):
            SpavaConfig(ulysses_degree=bad)
    # Which modes run 2-D is the mode table's column: the block schedule does.
    assert MESH_MODES == ("spava", "ring", "star", "apb")
    for mode, spec in MODE_TABLE.items():
        assert spec.mesh == (spec.schedule == "blocks"), mode
        if not spec.mesh:
            with pytest.raises(ValueError, match="needs a mode in"):
                SpavaConfig(mode=mode, ulysses_degree=2)
    with pytest.raises(ValueError, match="do not split into intra groups"):
        MeshLayout(40, 2, 6, SpavaConfig(ulysses_degree=4))
    with pytest.raises(ValueError, match="fewer than the 8 ranks"):
        MeshLayout(12, 1, 16, SpavaConfig(anchor_len=0, ulysses_degree=8))
    layout = ZigzagLayout(40, 2, 1, SpavaConfig(ulysses_degree=2))  # a flat layout with a 2-D config
    with pytest.raises(ValueError, match="needs a MeshLayout"):
        sp_attention(*(torch.randn(1, 42, 2, 8) for _ in range(3)), layout)
