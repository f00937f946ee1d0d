"""DeepSpeed integration: spava_ds DistributedAttention against DeepSpeed's own module and the reference, and the
"spava" block of a DeepSpeed JSON through deepspeed.initialize (CPU, gloo, spawned processes)."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch

pytest.importorskip("deepspeed")

from spava_ds import SpavaConfig, ZigzagLayout, dense_causal_attention, reference_attention, use_layout  # noqa: E402
from spava_ds.integrations.deepspeed import (DistributedAttention, bind_sequence_parallel_group,  # noqa: E402
                                             read_deepspeed_json, replicated_token_weights, sequence_parallel_group,
                                             sp_shard_batch, spava_config_from_deepspeed)

from dist_utils import run_distributed  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPAVA_JSON = os.path.join(REPO, "configs", "ds_zero2_spava_sp2.json")
OUT_TOL, GRAD_TOL = 1e-5, 2e-5  # fp32 on CPU


# ---- helpers run inside the workers ---------------------------------------------------------------------------------
def _init_deepspeed(rank, world, accelerator="cpu", backend="gloo"):
    """DeepSpeed without JIT builds (notes: cpu_env_feasibility 2d), in a process that run_distributed started
    (torch.distributed is up; the launcher's variables, which deepspeed.initialize checks, are not)."""
    os.environ.update(DS_ACCELERATOR=accelerator, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # else init_distributed JIT-compiles for ~40 s
    deepspeed.init_distributed(dist_backend=backend)
    return deepspeed


def _randn(seed, *shapes, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device) for s in shapes]


def _to_layout(x, batch_dim_idx):
    """[b, s, ...] <-> the module's layout ([s, b, ...] for batch_dim_idx 1); contiguous like a real activation."""
    return x.contiguous() if batch_dim_idx == 0 else x.transpose(0, 1).contiguous()


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


def _gather(x, group):
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return parts


def _sum_to_global(local, layout, rank, group):
    """Every rank's tokens put at their global positions ([b, S, ...]) and summed over the group: the blocks are
    disjoint, and the replicated anchor/query rows add up, which is the true gradient of those (partial) rows."""
    import torch.distributed as dist

    full = local.new_zeros((local.shape[0], layout.total_len) + tuple(local.shape[2:]))
    for (gs, ge), (ls, le) in zip(layout.global_ranges(rank), layout.local_segments(rank)):
        full[:, gs:ge] += local[:, ls:le]
    dist.all_reduce(full, group=group)
    return full


def _err(a, b):
    return (a.float() - b.float()).abs().max().item()


def _local_attention_checker(batch_dim_idx, shape, calls):
    """A DeepSpeed-style local attention (causal SDPA, GQA) that checks what it is given: its layout, the head
    split and the extra forward arguments."""

    def local_attention(q, k, v, *args, **kwargs):
        assert tuple(q.shape) == shape, f"local_attention got q {tuple(q.shape)}, expected {shape}"
        assert args == ("extra",) and kwargs == {"tag": 7}, f"local_attention got args {args}, kwargs {kwargs}"
        calls.append(1)
        t = (lambda x: x) if batch_dim_idx == 0 else (lambda x: x.transpose(0, 1))
        return t(dense_causal_attention(t(q), t(k), t(v)))

    return local_attention


def _rotary(seq_len, rot_dim, base=100.0):
    """(cos, sin) [1, S, 1, rot_dim] in DeepSpeed's convention (the two halves share the frequencies)."""
    inv = 1.0 / base ** (torch.arange(0, rot_dim, 2).float() / rot_dim)
    angles = torch.outer(torch.arange(seq_len).float(), inv)
    angles = torch.cat([angles, angles], dim=-1)[None, :, None, :]
    return angles.cos(), angles.sin()


def _ulysses_vs_deepspeed(group, b, S, hq, hkv, d, batch_dim_idx, seed, rot_dim=0, device="cpu"):
    """Mode ulysses on zigzag shards against deepspeed.sequence.layer.DistributedAttention on contiguous shards
    of the same sequence (and both against dense attention), forward and backward. Returns named max errors."""
    import torch.distributed as dist
    from deepspeed.sequence.layer import DistributedAttention as DeepSpeedAttention

    rank, W = dist.get_rank(group), dist.get_world_size(group)
    q, k, v, g = _randn(seed, (b, S, hq, d), (b, S, hkv, d), (b, S, hkv, d), (b, S, hq, d), device=device)
    rotary = tuple(t.to(device) for t in _rotary(S, rot_dim)) if rot_dim else None
    expect = (b, S, hq // W, d) if batch_dim_idx == 0 else (S, b, hq // W, d)
    tl = lambda x: _to_layout(x, batch_dim_idx)  # noqa: E731
    back = lambda x: x if batch_dim_idx == 0 else x.transpose(0, 1)  # noqa: E731

    # DeepSpeed: contiguous shards; it needs KV heads >= W, so KV heads are repeated first (what ALST does).
    ds_calls = []
    ds = DeepSpeedAttention(_local_attention_checker(batch_dim_idx, expect, ds_calls), group, scatter_idx=2,
                            gather_idx=1 if batch_dim_idx == 0 else 0)
    rep = max(1, W // hkv)
    chunk = lambda x: tl(x.chunk(W, dim=1)[rank])  # noqa: E731
    dq, dk, dv = _leaf(chunk(q)), _leaf(chunk(k)), _leaf(chunk(v))
    out_ds = ds(dq, dk.repeat_interleave(rep, dim=2), dv.repeat_interleave(rep, dim=2), batch_dim_idx, rotary,
                "extra", tag=7)
    (out_ds * chunk(g)).sum().backward()

    # spava_ds: zigzag shards, native GQA.
    calls = []
    layout = ZigzagLayout(S, 0, W, SpavaConfig(mode="ulysses", anchor_len=0))
    ours = DistributedAttention(_local_attention_checker(batch_dim_idx, expect, calls), group,
                                config=SpavaConfig(mode="ulysses", anchor_len=0))
    shard = lambda x: tl(layout.shard(x, rank))  # noqa: E731
    sq, sk, sv = _leaf(shard(q)), _leaf(shard(k)), _leaf(shard(v))
    with use_layout(layout):
        out = ours(sq, sk, sv, batch_dim_idx, rotary, "extra", tag=7)
    assert out.shape == sq.shape, f"output {tuple(out.shape)} is not in the input's layout {tuple(sq.shape)}"
    (out * shard(g)).sum().backward()
    assert len(calls) == 1 and len(ds_calls) == 1

    def full_ds(x):
        return torch.cat([back(p) for p in _gather(x, group)], dim=1)

    def full_ours(x):
        return layout.unshard([back(p) for p in _gather(x, group)])

    tag = f"ulysses W={W} bdi={batch_dim_idx} Hq={hq} Hkv={hkv}{' rotary' if rot_dim else ''}"
    errors = {f"{tag} out vs deepspeed": _err(full_ours(out.detach()), full_ds(out_ds.detach()))}
    for name, mine, theirs in (("dq", sq, dq), ("dk", sk, dk), ("dv", sv, dv)):
        errors[f"{tag} {name} vs deepspeed"] = _err(full_ours(mine.grad), full_ds(theirs.grad))
    if rotary is None:  # DeepSpeed itself against dense attention: the comparison is not vacuous
        errors[f"{tag} deepspeed out vs dense"] = _err(full_ds(out_ds.detach()), dense_causal_attention(q, k, v))
    return errors


def _spava_vs_reference(group, case, batch_dim_idx, seed, mode="spava", module_config=None, device="cpu"):
    """spava_ds DistributedAttention against the single-process ground truth (reference_attention, or dense
    attention for the exact modes), forward and backward. Replicated rows count 1/W in every rank's loss."""
    import torch.distributed as dist

    rank, W = dist.get_rank(group), dist.get_world_size(group)
    L, lq, hq, hkv, d, anchor, passing, b = case
    config = SpavaConfig(mode=mode, anchor_len=anchor, passing_len=passing)
    layout = ZigzagLayout(L, lq, W, config)
    q, k, v, g = _randn(seed, (b, L + lq, hq, d), (b, L + lq, hkv, d), (b, L + lq, hkv, d), (b, L + lq, hq, d),
                        device=device)
    rq, rk, rv = _leaf(q), _leaf(k), _leaf(v)
    ref = reference_attention(rq, rk, rv, layout) if mode == "spava" else dense_causal_attention(rq, rk, rv)
    (ref * g).sum().backward()

    tl = lambda x: _to_layout(x, batch_dim_idx)  # noqa: E731
    back = lambda x: x if batch_dim_idx == 0 else x.transpose(0, 1)  # noqa: E731
    sq, sk, sv = (_leaf(tl(layout.shard(x, rank))) for x in (q, k, v))
    module = DistributedAttention(None, group, config=module_config)
    out = back(module(sq, sk, sv, batch_dim_idx, layout=layout))
    weight = replicated_token_weights(layout, rank, device)
    (out * layout.shard(g, rank) * weight[None, :, None, None]).sum().backward()

    tag = f"{mode} W={W} bdi={batch_dim_idx} case={case}"
    errors = {f"{tag} out": _err(out.detach(), layout.shard(ref.detach(), rank))}
    for name, mine, theirs in (("dq", sq, rq), ("dk", sk, rk), ("dv", sv, rv)):
        errors[f"{tag} {name}"] = _err(_sum_to_global(back(mine.grad), layout, rank, group), theirs.grad)
    return errors


def _contiguous_shards_refused(group):
    """DeepSpeed's contiguous shards fed to the module inside use_layout: with no anchor and no query they have the
    zigzag shares' length (96 tokens at W = 2: 48 each) and would give wrong attention (max error 1.33 against
    dense before the check), so the module refuses tokens its layout did not shard; the layout's shards give dense
    attention."""
    import torch.distributed as dist

    rank, W = dist.get_rank(group), dist.get_world_size(group)
    config = SpavaConfig(mode="ring", anchor_len=0)
    layout = ZigzagLayout(96, 0, W, config)
    q, k, v = _randn(30, (1, 96, 4, 8), (1, 96, 2, 8), (1, 96, 2, 8))
    module = DistributedAttention(None, group, config=config)
    with use_layout(layout), pytest.raises(ValueError, match="were not sharded with this layout"):
        module(*(x.chunk(W, dim=1)[rank] for x in (q, k, v)), 0)
    with use_layout(layout):
        out = module(*(layout.shard(x, rank) for x in (q, k, v)), 0)
    return {f"ring W={W} contiguous shards refused, zigzag shards out": _err(
        out, layout.shard(dense_causal_attention(q, k, v), rank))}


class _TinyAttentionModel(torch.nn.Module):
    """One attention layer: qkv projection, spava_ds DistributedAttention ([s, b, h, d], as Megatron-DeepSpeed)."""

    def __init__(self, hidden=32, heads=4, kv_heads=2, config=None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.qkv = torch.nn.Linear(hidden, (heads + 2 * kv_heads) * self.head_dim)
        self.attn = DistributedAttention(None, None, config=config)  # the group exists after deepspeed.initialize
        self.proj = torch.nn.Linear(hidden, hidden)

    def forward(self, x):  # x [s_local, b, hidden]
        s, b, _ = x.shape
        q, k, v = self.qkv(x).view(s, b, -1, self.head_dim).split([self.heads, self.kv_heads, self.kv_heads], dim=2)
        return self.proj(self.attn(q, k, v, 1).reshape(s, b, -1))


def _worker(rank, world):
    """Everything that needs processes, in one spawn of 4 ranks (CI has 2 cores): W = 4 on the world group, then
    deepspeed.initialize with the example JSON (dp 2 x sp 2) and W = 2 on the SP groups it builds."""
    import torch.distributed as dist

    deepspeed = _init_deepspeed(rank, world)
    errors = {}
    world_group = dist.group.WORLD

    # W = 4: GQA with fewer KV heads (2) than ranks, both layouts; Spava against the reference.
    for bdi in (0, 1):
        errors.update(_ulysses_vs_deepspeed(world_group, 2, 40, 8, 2, 8, bdi, seed=bdi))
    errors.update(_spava_vs_reference(world_group, (61, 5, 4, 2, 8, 7, 3, 1), 0, seed=10))
    errors.update(_spava_vs_reference(world_group, (75, 9, 4, 1, 8, None, None, 2), 1, seed=11,
                                      module_config=SpavaConfig()))

    # The JSON path: the example config, with data_parallel_size 2 so that 4 ranks make a (dp 2, sp 2) mesh.
    with open(SPAVA_JSON, encoding="utf-8") as f:
        ds_config = json.load(f)
    ds_config["data_parallel_size"] = 2
    ds_config["bf16"] = {"enabled": False}  # fp32 keeps the one training step comparable across the SP pair
    spava_config, sp_size = spava_config_from_deepspeed(ds_config)
    torch.manual_seed(0)
    model = _TinyAttentionModel(config=spava_config)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    group = sequence_parallel_group(engine)
    assert group is sequence_parallel_group(), "engine.seq_parallel_group is not DeepSpeed's SP group"
    ranks = dist.get_process_group_ranks(group)
    assert sp_size == 2 and engine.sequence_parallel_size == 2 and ranks == [rank // 2 * 2, rank // 2 * 2 + 1], \
        f"sequence_parallel_size {sp_size}/{engine.sequence_parallel_size}, SP group ranks {ranks}"
    assert bind_sequence_parallel_group(engine.module, group) == 1

    # W = 2 on the SP group: MQA (1 KV head < W), both layouts, DeepSpeed's rotary path, Spava, exact ulysses.
    for bdi in (0, 1):
        errors.update(_ulysses_vs_deepspeed(group, 3, 40, 4, 1, 8, bdi, seed=20 + bdi))
    errors.update(_ulysses_vs_deepspeed(group, 2, 40, 4, 2, 8, 1, seed=22, rot_dim=4))
    errors.update(_spava_vs_reference(group, (53, 4, 6, 2, 8, 5, 4, 2), 1, seed=23))
    errors.update(_spava_vs_reference(group, (41, 3, 4, 2, 8, 6, 2, 1), 1, seed=24, mode="ulysses"))
    errors.update(_contiguous_shards_refused(group))

    # One training step of the engine on a Spava-sharded sequence; the SP pair shares one sample.
    sp_rank = dist.get_rank(group)
    x, y = _randn(100 + rank // 2, (1, 45, 32), (1, 45, 32))
    layout, local = sp_shard_batch({"inputs_embeds": x, "labels": y}, 5, group, spava_config)
    assert layout.world_size == 2 and local["inputs_embeds"].shape[1] == layout.local_len(sp_rank)
    weight = replicated_token_weights(layout, sp_rank)[:, None, None]
    before = [p.detach().clone() for p in engine.module.parameters()]
    with use_layout(layout):
        pred = engine(local["inputs_embeds"].transpose(0, 1))
    loss = (((pred - local["labels"].transpose(0, 1)) ** 2) * weight).sum()
    engine.backward(loss)
    engine.step()
    moved = min((p.detach() - p0).abs().max().item() for p, p0 in zip(engine.module.parameters(), before))
    assert torch.isfinite(loss) and moved > 0, f"loss {loss.item()}, smallest parameter change {moved}"
    return errors


def _assert_small(results, n_checks, out_tol=OUT_TOL, grad_tol=GRAD_TOL):
    failures = []
    for rank, errors in enumerate(results):
        assert len(errors) == n_checks, f"rank {rank} ran {len(errors)} checks, expected {n_checks}: {sorted(errors)}"
        for name, err in errors.items():
            tol = out_tol if name.endswith("out") or "out vs" in name else grad_tol
            if not err < tol:
                failures.append(f"rank {rank}: {name}: {err:.3g} (tolerance {tol})")
    assert not failures, "\n".join(failures)


@pytest.mark.timeout(150)
def test_deepspeed_distributed():
    _assert_small(run_distributed(_worker, 4, timeout=140), 41)


def _gpu_worker(rank, world):
    """The module on CUDA under NCCL, at longer sequences and head_dim 64: ulysses against DeepSpeed, spava against
    the reference."""
    import torch.distributed as dist

    _init_deepspeed(rank, world, accelerator="cuda", backend="nccl")
    device, group = torch.device("cuda", rank), dist.group.WORLD
    errors = {}
    for bdi in (0, 1):
        errors.update(_ulysses_vs_deepspeed(group, 2, 4096, 8, 1, 64, bdi, seed=bdi, device=device))
    errors.update(_ulysses_vs_deepspeed(group, 1, 2048, 8, 2, 64, 1, seed=2, rot_dim=32, device=device))
    errors.update(_spava_vs_reference(group, (3001, 37, 8, 2, 64, 130, 40, 1), 0, seed=3, device=device))
    errors.update(_spava_vs_reference(group, (2047, 16, 8, 1, 64, None, None, 2), 1, seed=4, device=device))
    return errors


@pytest.mark.gpu(count=2)
@pytest.mark.timeout(300)
def test_deepspeed_nccl():
    # fp32 on CUDA: other kernels than the CPU's (cuDNN/efficient SDPA, cuBLAS), longer sums.
    _assert_small(run_distributed(_gpu_worker, 2, backend="nccl", timeout=280), 22, out_tol=1e-4, grad_tol=1e-4)


# ---- in one process: config parsing and the module's errors ---------------------------------------------------------
@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.json"))))
def test_shipped_configs_parse(path):
    config, sp = spava_config_from_deepspeed(path)
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    assert sp == raw["sequence_parallel_size"]
    assert config == SpavaConfig.from_dict(raw.get("spava"))
    assert config.to_dict().items() >= raw.get("spava", {}).items()  # every key of the block was read
    if "optimizer" in raw:  # nothing may JIT-compile on a CPU machine
        assert raw["optimizer"]["params"].get("torch_adam") is True


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown SpavaConfig key\(s\) \['passing'\]; valid keys are .*passing_len"):
        spava_config_from_deepspeed({"sequence_parallel_size": 2, "spava": {"passing": 4}})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"spava": {"mode": "fast"}}))
    with pytest.raises(ValueError, match=r"bad.json.*mode must be one of"):
        spava_config_from_deepspeed(str(bad))
    with pytest.raises(ValueError, match="sequence_parallel_size must be an int >= 1"):
        spava_config_from_deepspeed({"sequence_parallel_size": 0})
    with pytest.raises(ValueError, match="block must be an object"):
        spava_config_from_deepspeed({"spava": [1]})
    assert spava_config_from_deepspeed({}) == (SpavaConfig(), 1)


def test_a_missing_or_malformed_json_names_the_file(tmp_path):
    missing = tmp_path / "no-such.json"
    with pytest.raises(ValueError, match=r"DeepSpeed config '.*no-such.json': no such file"):
        spava_config_from_deepspeed(str(missing))
    broken = tmp_path / "broken.json"
    broken.write_text('{"sequence_parallel_size": 2,}')
    with pytest.raises(ValueError, match=r"DeepSpeed config '.*broken.json': not valid JSON \(.*line 1"):
        spava_config_from_deepspeed(str(broken))
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"list.json': expected a JSON object, got list"):
        read_deepspeed_json(listed)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"sequence_parallel_size": 2, "spava": {"mode": "ring"}}))
    assert read_deepspeed_json(good) == {"sequence_parallel_size": 2, "spava": {"mode": "ring"}}
    assert spava_config_from_deepspeed(good) == (SpavaConfig(mode="ring"), 2)


def test_module_single_process():
    """W = 1 needs no process group: the module against the reference, and its clear errors."""
    layout = ZigzagLayout(40, 4, 1, SpavaConfig(anchor_len=3, passing_len=5))
    q, k, v = _randn(0, (2, 44, 4, 8), (2, 44, 2, 8), (2, 44, 2, 8))
    module = DistributedAttention(None, None)
    with use_layout(layout):
        out = module(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), 1)
    assert out.shape == (44, 2, 4, 8)
    assert _err(out.transpose(0, 1), reference_attention(q, k, v, layout)) < OUT_TOL

    # Rotary applied here equals rotating the full q/k first (positions are global; W = 1 keeps them in order).
    cos, sin = _rotary(44, 8)
    half = lambda x: torch.cat([-x[..., 4:], x[..., :4]], dim=-1)  # noqa: E731
    qr, kr = q * cos + half(q) * sin, k * cos + half(k) * sin
    out = module(q, k, v, 0, (cos, sin), layout=layout)
    assert _err(out, reference_attention(qr, kr, v, layout)) < OUT_TOL

    with pytest.raises(ValueError, match="use_layout"):
        module(q, k, v, 0)
    with pytest.raises(ValueError, match="batch_dim_idx must be 0"):
        module(q, k, v, 2, layout=layout)
    with pytest.raises(ValueError, match=r"whole sequence \(S = 44"):
        module(q, k, v, 0, (cos[:, :10], sin[:, :10]), layout=layout)
    with pytest.raises(ValueError, match="num_kv_heads=4, but the key has 2"):
        DistributedAttention(None, None, num_kv_heads=4)(q, k, v, 0, layout=layout)
    with pytest.raises(ValueError, match="mode 'star' needs a contiguous layout"):
        DistributedAttention(None, None, config=SpavaConfig(mode="star"))(q, k, v, 0, layout=layout)
    with pytest.raises(TypeError, match="config must be a SpavaConfig"):
        DistributedAttention(None, None, config={"mode": "spava"})
    with pytest.warns(UserWarning, match="not used"):
        module(q, k, v, 0, None, "mask", layout=layout)
    # The batch helper: the layout for the group (here one process) and the sharded batch.
    ids = torch.arange(44).view(1, 44)
    lay, local = sp_shard_batch({"input_ids": ids, "pixel_values": torch.ones(3, 5)}, 4, config=layout.config)
    assert lay.query_len == 4 and lay.context_len == 40 and torch.equal(local["input_ids"], ids)
    assert local["pixel_values"].shape == (3, 5)
    # Replicated tokens weigh 1/W: rank 1 of W = 2 with a 3-token anchor, blocks of 11/10 tokens, a 4-token query.
    lay = ZigzagLayout(45, 4, 2, SpavaConfig(anchor_len=3))
    expect = torch.tensor([0.5] * 3 + [1.0] * 21 + [0.5] * 4)
    assert torch.equal(replicated_token_weights(lay, 1), expect)
