"""The seams of spava_ds: the collective hook (observe and replace every collective), the exact merge of partials
across ranks, the profiler spans, and init_distributed without a launcher."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from spava_ds import SpavaConfig, ZigzagLayout, comm, dense_causal_attention, sp_attention, spava_attention
from spava_ds.kernels import attend
from spava_ds.profiling import span_hook

from dist_utils import run_distributed


def _qkv(total, seed, hq=4, hkv=2, d=8, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, total, h, d, generator=g).requires_grad_(requires_grad) for h in (hq, hkv, hkv)]


def _counting(calls, through=True):
    """A hook that records each collective's name and calls it (``through``), or replaces it by torch's list-based
    collectives that fill the same outputs."""

    def hook(op, *args, **kwargs):
        calls.append(op.__name__)
        if through:
            return op(*args, **kwargs)
        if op.__name__ in ("all_gather_into_tensor", "all_gather_single"):
            out, x = args
            return dist.all_gather(list(out.chunk(dist.get_world_size(kwargs["group"]))), x, **kwargs)
        raise AssertionError(f"unexpected collective {op.__name__}")

    return hook


def _hooked_calls(rank, world):
    results = {}
    layout = ZigzagLayout(61, 5, world, SpavaConfig(anchor_len=7, passing_len=3))
    q, k, v = (layout.shard(t, rank).detach().requires_grad_() for t in _qkv(66, seed=1))
    plain = spava_attention(q, k, v, layout)

    calls = []
    with comm.collective_hook(_counting(calls)):
        out = spava_attention(q, k, v, layout)
        out.backward(torch.ones_like(out))
    results["spava calls"] = calls
    results["spava observed err"] = (out - plain).abs().max().item()

    replaced = []
    with comm.collective_hook(_counting(replaced, through=False)):
        out = spava_attention(q, k, v, layout)
    results["spava replaced calls"] = replaced
    results["spava replaced err"] = (out - plain).abs().max().item()

    calls = []
    uly = ZigzagLayout(61, 5, world, SpavaConfig(mode="ulysses", anchor_len=7))
    with comm.collective_hook(_counting(calls)):
        sp_attention(*(uly.shard(t, rank) for t in _qkv(66, seed=2, hq=6, hkv=6)), uly)
    results["ulysses calls"] = calls

    # A rank without peers: every collective returns at once and moves nothing, so no rank waits for another.
    with comm.collective_hook(lambda op, *args, **kwargs: None):
        alone = spava_attention(q.detach(), k.detach(), v.detach(), layout)
    results["alone shape"] = tuple(alone.shape)
    t = torch.ones(1)  # the group is intact: nothing was left half-way through a collective
    dist.all_reduce(t)
    results["after"] = t.item()

    # The merge collective: each rank's partial over its part of the keys merges into attention over all keys.
    q_rows, keys, values = _qkv(40, seed=3)
    mine = slice(rank * 40 // world, (rank + 1) * 40 // world)
    out, lse = attend(q_rows[:, :6], keys[:, mine], values[:, mine])
    merged, merged_lse = comm.merge_partials(out, lse, None, world, torch.float32).wait()
    full, full_lse = attend(q_rows[:, :6], keys, values)
    results["merge err"] = max((merged - full).abs().max().item(), (merged_lse - full_lse).abs().max().item())
    return results


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3])
def test_collective_hook_observes_and_replaces_every_collective(world):
    layout = ZigzagLayout(61, 5, world, SpavaConfig(anchor_len=7))
    for rank, res in enumerate(run_distributed(_hooked_calls, world)):
        gather = [c for c in res["spava calls"] if c.startswith("all_gather")]
        # Forward: the two passing halves and the query partials; backward: the query rows' output gradient, then
        # each half's gradient back to the rank that selected it.
        scatter = [c for c in res["spava calls"][4:] if c.startswith("reduce_scatter")]
        assert len(gather) == 3 and res["spava calls"][3] == "all_reduce" and len(scatter) == 2, res["spava calls"]
        assert res["spava observed err"] == 0.0
        assert len(res["spava replaced calls"]) == 3 and res["spava replaced err"] < 1e-6  # torch's gathers instead
        assert res["ulysses calls"] == ["all_to_all_single"] * 4  # q, k, v to heads; the output back
        assert res["alone shape"] == (1, layout.local_len(rank), 4, 8)
        assert res["after"] == world
        assert res["merge err"] < 1e-5


def test_spans_name_the_steps_of_a_layer():
    layout = ZigzagLayout(40, 4, 1, SpavaConfig(anchor_len=3, passing_len=100))
    q, k, v = _qkv(44, seed=4, requires_grad=True)
    names = []

    def record(name):
        names.append(name)
        return torch.profiler.record_function(name)

    with span_hook(record):
        out = spava_attention(q, k, v, layout)
        forward = list(names)
        out.backward(torch.ones_like(out))
    # One process: block 0 sends its selection to block 1 (the second half has no reader).
    assert forward == ["spava.select", "spava.attend.query", "spava.attend.block1", "spava.attend.block2",
                       "spava.merge.query"]
    assert names[len(forward):] == ["spava.backward.block2", "spava.backward.block1", "spava.backward.query"]
    # Without a hook, a running profiler sees the same steps as ranges, each timed around its own ops.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        spava_attention(q.detach(), k.detach(), v.detach(), layout)
    ranges = {e.key: e for e in prof.key_averages() if e.key.startswith("spava.")}
    assert set(ranges) == set(forward) and ranges["spava.attend.block1"].cpu_time_total > 0
    torch.testing.assert_close(out, dense_causal_attention(q, k, v), atol=1e-5, rtol=0)  # budget > blocks: exact


def test_init_distributed_without_a_launcher(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert comm.init_distributed() == (0, 1)
    assert not dist.is_initialized()
