"""ZigzagLayout and SpavaConfig: block plan, shard/unshard round trips, Megatron CP equivalence, validation."""

from __future__ import annotations

import pytest
import torch

from spava_ds import SpavaConfig, ZigzagLayout, default_anchor_len, default_passing_len

from dist_utils import run_distributed


@pytest.mark.parametrize("context_len,query_len,world,anchor", [
    (10, 0, 1, 0), (61, 5, 2, 7), (1000, 17, 3, 129), (33, 1, 4, 0), (8 + 9, 4, 4, 9), (5003, 31, 4, None)])
def test_block_plan(context_len, query_len, world, anchor):
    layout = ZigzagLayout(context_len, query_len, world, SpavaConfig(anchor_len=anchor))
    bounds = layout.block_bounds
    assert len(bounds) == 2 * world
    assert bounds[0][0] == layout.anchor_len and bounds[-1][1] == context_len
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # in sequence order, no gaps
    sizes = [e - s for s, e in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)  # earlier blocks take extras
    for r in range(world):
        assert layout.virtual_hosts(r) == (r, 2 * world - 1 - r)
        assert layout.local_len(r) == layout.anchor_len + sizes[r] + sizes[2 * world - 1 - r] + query_len
    # Every anchor token is in exactly one rank's share.
    shares = [layout.anchor_share(r) for r in range(world)]
    covered = sorted(i for s, e in shares for i in range(s, e))
    assert covered == list(range(layout.anchor_len))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_unshard_round_trip(world):
    layout = ZigzagLayout(97, 6, world, SpavaConfig(anchor_len=10))
    n = layout.total_len
    ids = torch.arange(n).repeat(2, 1)
    hidden = torch.randn(2, n, 3, 5)
    mrope = torch.randint(0, 100, (3, 2, n))
    for x, dim in ((ids, 1), (hidden, 1), (mrope, 2)):
        parts = [layout.shard(x, r, dim) for r in range(world)]
        assert torch.equal(layout.unshard(parts, dim), x)
    for r in range(world):
        local = layout.shard(ids, r)
        assert torch.equal(local[0], layout.positions(r))
        seg = layout.local_segments(r)
        assert torch.equal(local[0, slice(*seg.query)], torch.arange(97, n))
        v1, v2 = layout.virtual_hosts(r)
        assert torch.equal(local[0, slice(*seg.block2)], torch.arange(*layout.block_bounds[v2]))


class _FakeGroup:
    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def _megatron_chunks(rank, _world):
    from megatron.core.utils import get_batch_on_this_cp_rank

    results = []
    for cp in (1, 2, 3, 4):
        seq = 8 * cp * 3
        layout = ZigzagLayout(seq, 0, cp, SpavaConfig(anchor_len=0))
        tokens = torch.arange(2 * seq).view(2, seq)
        mask = torch.ones(2, 1, seq, seq, dtype=torch.bool).tril()
        for r in range(cp):
            batch = get_batch_on_this_cp_rank({"tokens": tokens.clone(), "attention_mask": mask.clone()},
                                              cp_group=_FakeGroup(r, cp))
            results.append(torch.equal(batch["tokens"], layout.shard(tokens, r))
                           and torch.equal(batch["attention_mask"], layout.shard(mask, r, dim=2)))
    return results


@pytest.mark.timeout(120)
def test_layout_equals_megatron_context_parallel_chunks():
    pytest.importorskip("megatron.core")
    (results,) = run_distributed(_megatron_chunks, 1)
    assert results and all(results), results


def test_default_rules():
    # The spec's rules: anchor = 128*ceil(floor(L/64)/128), passing = 128*ceil(floor(L/128)/128).
    assert default_anchor_len(128 * 1024) == 2048 and default_passing_len(128 * 1024) == 1024
    assert default_anchor_len(10_000) == 256 and default_passing_len(10_000) == 128
    assert default_anchor_len(63) == 0 and default_passing_len(127) == 0
    cfg = SpavaConfig()
    assert ZigzagLayout(128 * 1024, 50, 8, cfg).anchor_len == 2048
    assert ZigzagLayout(300, 5, 2, cfg).anchor_len == 60  # the rule's 128 is capped at one block on short inputs
    assert cfg.resolve_passing_len(64 * 1024) == 512 and SpavaConfig(passing_len=7).resolve_passing_len(10**6) == 7
    per_layer = SpavaConfig(passing_len=[5, 0, 3])
    assert [per_layer.resolve_passing_len(100, i) for i in range(3)] == [5, 0, 3]
    with pytest.raises(ValueError, match="layer_idx"):
        per_layer.resolve_passing_len(100)
    with pytest.raises(ValueError, match="outside"):
        per_layer.resolve_passing_len(100, 3)


@pytest.mark.parametrize("kwargs,field", [
    ({"mode": "nope"}, "mode"), ({"anchor_len": -1}, "anchor_len"), ({"anchor_len": 1.5}, "anchor_len"),
    ({"passing_len": -3}, "passing_len"), ({"passing_len": [1, -1]}, "passing_len"), ({"passing_len": []},
                                                                                       "passing_len"),
    ({"pool_kernel": 4}, "pool_kernel"), ({"pool_kernel": 0}, "pool_kernel"), ({"backend": "cuda"}, "backend"),
    ({"overlap": 1}, "overlap")])
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=f"SpavaConfig.{field}"):
        SpavaConfig(**kwargs)


def test_config_dict_round_trip_and_unknown_keys():
    cfg = SpavaConfig(anchor_len=256, passing_len=[128, 64], pool_kernel=3)
    assert SpavaConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="valid keys are"):
        SpavaConfig.from_dict({"anchor": 3})


def test_layout_errors():
    with pytest.raises(ValueError, match="needs at least 15 context tokens"):
        ZigzagLayout(14, 2, 4, SpavaConfig(anchor_len=7))
    with pytest.raises(ValueError, match="world_size"):
        ZigzagLayout(100, 2, 0)
    layout = ZigzagLayout(40, 2, 2, SpavaConfig(anchor_len=4))
    with pytest.raises(ValueError, match="expects 42"):
        layout.shard(torch.zeros(1, 41), 0)
    with pytest.raises(ValueError, match="got 1 parts"):
        layout.unshard([torch.zeros(1, layout.local_len(0))])
    with pytest.raises(ValueError, match="rank 2"):
        layout.virtual_hosts(2)


def test_example_configs_parse():
    import glob
    import os

    paths = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.json")))
    assert paths
    configs = [SpavaConfig.from_json(p) for p in paths]
    assert any(isinstance(c.passing_len, tuple) for c in configs)


def test_json_config_errors_name_the_file(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{"spava": {"pool_kernel": 5, "budget": 3}}')
    with pytest.raises(ValueError, match=r"ds.json: unknown SpavaConfig key\(s\) \['budget'\]"):
        SpavaConfig.from_json(str(bad))
