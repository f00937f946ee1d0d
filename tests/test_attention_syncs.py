"""A training layer call of the attention (forward, then backward) never makes the host wait for the device.

Counted with ``profiling.host_syncs`` on the CPU, which tells the calls that would stall a GPU (``.item()``,
``.tolist()``, ``nonzero``...): at W = 2 over gloo, and as rank 0 of W = 4 on PyTorch's fake process group, the
way ``launch/bench_train.py --one-rank`` stands in for the other ranks. The W = 2 results equal the single-process
references (the simulation for Spava, dense causal attention for the exact modes), so the counts are of a call that
computes the right thing.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from spava_ds import SpavaConfig, ZigzagLayout, dense_causal_attention, reference_attention
from spava_ds.attention import sp_attention
from spava_ds.benchmarks.host import fake_group
from spava_ds.profiling import host_syncs

from dist_utils import run_distributed

# Synchronising calls per layer call that could not be removed (none: every size comes from the layout, every check
# is on shapes before the first collective).
EXPECTED_SYNCS = {"forward": 0, "backward": 0}
# (mode, config overrides, context_len, query_len, Hq, Hkv): unequal blocks, GQA, a pooled selection.
CASES = [
    ("spava", dict(anchor_len=5, passing_len=3, pool_kernel=3), 53, 5, 6, 2),
    ("ring", dict(anchor_len=4), 47, 3, 4, 2),
    ("ulysses", dict(anchor_len=3), 45, 4, 4, 2),
]


def _layer_call(layout, rank, q, k, v, grad_out):
    """This rank's forward and backward under the sync counter: (output, q/k/v gradients, {phase: syncs})."""
    ql, kl, vl = (layout.shard(t, rank).clone().requires_grad_() for t in (q, k, v))
    dout = layout.shard(grad_out, rank).clone()
    for s, e in (layout.local_segments(rank).anchor, layout.local_segments(rank).query):
        dout[:, s:e] /= layout.world_size  # replicated rows: every rank holds them, the group counts them once
    with host_syncs() as forward:
        out = sp_attention(ql, kl, vl, layout)
    with host_syncs() as backward:
        out.backward(dout)
    return out.detach(), (ql.grad, kl.grad, vl.grad), {"forward": forward.calls, "backward": backward.calls}


def _check_against_reference(layout, rank, world, case, q, k, v, grad_out, out, grads):
    """Max errors of the output and of the gradients of the rows this rank alone holds (its two blocks; the
    replicated rows' gradients are partial on each rank)."""
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = dense_causal_attention(qr, kr, vr) if case[0] != "spava" else reference_attention(qr, kr, vr, layout)
    (ref * grad_out).sum().backward()
    seg = layout.local_segments(rank)
    errors = [(out - layout.shard(ref.detach(), rank)).abs().max().item()]
    for local, whole in zip(grads, (qr.grad, kr.grad, vr.grad)):
        for s, e in (seg.block1, seg.block2):
            errors.append((local[:, s:e] - layout.shard(whole, rank)[:, s:e]).abs().max().item())
    return errors


def _world_of_two(rank, world):
    results = []
    for i, case in enumerate(CASES):
        mode, overrides, context, query, hq, hkv = case
        layout = ZigzagLayout(context, query, world, SpavaConfig(mode=mode, **overrides))
        g = torch.Generator().manual_seed(10 + i)
        q, k, v, grad_out = (torch.randn(1, context + query, h, 8, generator=g) for h in (hq, hkv, hkv, hq))
        out, grads, syncs = _layer_call(layout, rank, q, k, v, grad_out)
        results.append((mode, syncs, _check_against_reference(layout, rank, world, case, q, k, v, grad_out, out,
                                                              grads)))
    return results


@pytest.mark.timeout(120)
def test_a_layer_call_at_w2_syncs_no_more_than_expected_and_equals_the_references():
    for rank, results in enumerate(run_distributed(_world_of_two, 2)):
        for mode, syncs, errors in results:
            assert {phase: len(calls) for phase, calls in syncs.items()} == EXPECTED_SYNCS, (rank, mode, syncs)
            assert max(errors) < 1e-5, (rank, mode, errors)


@pytest.mark.parametrize("mode", [case[0] for case in CASES])
def test_a_layer_call_on_the_one_rank_stand_in_syncs_no_more_than_expected(mode):
    """Rank 0 of W = 4 on the fake process group, its collectives as bench_train's --one-rank runs them."""
    fake_group(0, 4)
    try:
        layout = ZigzagLayout(91, 5, 4, SpavaConfig(mode=mode, anchor_len=4, passing_len=3))
        g = torch.Generator().manual_seed(3)
        q, k, v, grad_out = (torch.randn(1, 96, h, 8, generator=g) for h in (4, 4, 4, 4))
        _, _, syncs = _layer_call(layout, 0, q, k, v, grad_out)
    finally:
        dist.destroy_process_group()
    assert {phase: len(calls) for phase, calls in syncs.items()} == EXPECTED_SYNCS, syncs
