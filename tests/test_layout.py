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


# ---- the topology the layout answers for attention.py and the integrations ------------------------------------------
@pytest.mark.parametrize("mode", ["spava", "apb"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("budget", [0, 2, 5, None])
def test_passing_plan_follows_the_spec(mode, world, budget):
    """Block v sees the selections of blocks 0..v-1 in sequence order, min(budget, block length) tokens each; each
    gather half carries every rank's first (second) block padded to the half's largest; a block no later block
    reads sends nothing; in the zigzag layout every rank receives 2W-1 selections."""
    layout = ZigzagLayout(53 + world, 3, world, SpavaConfig(mode=mode, anchor_len=4))
    tokens = [layout.block_len(v) if budget is None else min(budget, layout.block_len(v))
              for v in range(layout.num_blocks)]
    for rank in range(world):
        plan = layout.passing_plan(rank, budget)
        assert plan is layout.passing_plan(rank, budget)  # built once per layout, rank and budget
        hosts = layout.virtual_hosts(rank)
        if budget == 0 or layout.num_blocks == 1:
            assert plan.gather_sizes == (0, 0) and not any(plan.send) and not any(plan.receive)
            continue
        for which, v in enumerate(hosts):
            got = [(layout.virtual_hosts(r)[half], n) for half, r, n in plan.receive[which]]
            assert got == [(u, tokens[u]) for u in range(v)], (rank, v)
            assert plan.send[which] == (tokens[v] if v < layout.num_blocks - 1 else 0)
        for half in range(len(hosts)):
            blocks = [layout.virtual_hosts(r)[half] for r in range(world)]
            readers = [u for u in blocks if u < layout.num_blocks - 1]
            assert plan.gather_sizes[half] == (max(tokens[u] for u in blocks) if readers else 0)
        if layout.zigzag:
            assert sum(len(r) for r in plan.receive) == 2 * world - 1


@pytest.mark.parametrize("mode", ["spava", "star"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_key_shares_cover_every_token_once(mode, world):
    """The query rows' keys and the decode cache: over the ranks every token of the sequence exactly once, the
    query's own keys (causal) on rank 0 only; with no query, none."""
    for query_len in (5, 0):
        layout = ZigzagLayout(71, query_len, world, SpavaConfig(mode=mode, anchor_len=6))
        seen = []
        for rank in range(world):
            positions = layout.positions(rank)
            for start, end, causal in layout.key_share(rank):
                tokens = positions[start:end].tolist()
                assert causal == (rank == 0 and start == layout.local_segments(0).query[0]), (rank, start)
                assert not causal or tokens == list(range(*layout.query_range))
                seen += tokens
        assert sorted(seen) == list(range(layout.total_len))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_replicated_token_weights_count_every_token_once(world):
    layout = ZigzagLayout(61, 7, world, SpavaConfig(anchor_len=5))
    total = torch.zeros(layout.total_len)
    for rank in range(world):
        total.index_add_(0, layout.positions(rank), layout.replicated_token_weights(rank))
    torch.testing.assert_close(total, torch.ones(layout.total_len), atol=1e-6, rtol=0)


def test_any_integral_number_is_a_length():
    import numpy as np

    layout = ZigzagLayout(np.int64(61), torch.tensor(5), np.int32(2),
                          SpavaConfig(anchor_len=np.int64(7), passing_len=[np.int16(3), torch.tensor(4)]))
    assert layout.total_len == 66 and layout.world_size == 2 and layout.anchor_len == 7
    assert all(type(x) is int for x in (layout.context_len, layout.query_len, layout.world_size))
    assert layout.config.passing_len == (3, 4) and layout.config.to_dict()["passing_len"] == [3, 4]
    for bad in (True, 2.0, np.float32(3), "4", torch.tensor(True)):
        with pytest.raises(ValueError, match="world_size must be an int >= 1"):
            ZigzagLayout(61, 5, bad)


def test_per_layer_budgets_must_match_the_model():
    per_layer = SpavaConfig(passing_len=[4, 4, 2])
    per_layer.check_num_layers(3)
    SpavaConfig(passing_len=4).check_num_layers(36)  # one budget for all layers fits any model
    for layers in (2, 4):
        with pytest.raises(ValueError, match=f"3 per-layer budgets, but the model has {layers} attention layers"):
            per_layer.check_num_layers(layers)


def test_mode_table_describes_every_mode():
    from spava_ds import MODE_TABLE, MODES

    assert tuple(MODE_TABLE) == MODES
    for mode, spec in MODE_TABLE.items():
        layout = ZigzagLayout(100, 4, 2, SpavaConfig(mode=mode))
        assert layout.zigzag == (spec.layout == "zigzag") and layout.num_blocks == (4 if layout.zigzag else 2)
        assert spec.exact == (mode in ("ring", "ulysses", "dense"))
        assert spec.needs_query == (spec.passing == "topk")
        # The default budget: Spava's rule, twice it for apb, nothing for star and the modes that pass no top-k.
        assert SpavaConfig(mode=mode).resolve_passing_len(64 * 1024) == 512 * spec.passing_scale
    assert SpavaConfig(mode="star").resolve_anchor_len(100, 2) == 33  # Star's anchor is a whole block
