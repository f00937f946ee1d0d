"""SpavaCoreAttention inside Megatron-core TransformerBlocks on CPU (gloo, spawned processes).

References are independent of spava_ds's distributed code: Megatron's own DotProductAttention at CP = 1 for the
exact modes, and a block whose core attention is the single-process ``reference_attention`` for Spava. All the
distributed cases run in one spawn of 2 processes (the CI machine has 2 cores); each test reads its case.
"""

import inspect
import math
import traceback
import warnings

import pytest
import torch

pytest.importorskip("megatron.core")

from dist_utils import run_distributed  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from spava_ds import SpavaConfig, ZigzagLayout, reference_attention, use_layout  # noqa: E402
from spava_ds.integrations.megatron import SpavaCoreAttention, get_gpt_layer_spec_with_spava  # noqa: E402

CP = 2
SEED = 1234
# Spava case: 40 context tokens (anchor 4, four blocks of 9) and a 6-token query; a passing budget of 3 < 9 keeps
# the approximation non-trivial.
SPAVA = SpavaConfig(mode="spava", anchor_len=4, passing_len=3)
SPAVA_CONTEXT, SPAVA_QUERY = 40, 6
EXACT_LEN = 32  # a multiple of 2 * CP, as Megatron's CP sharding requires
BATCH = 2


def _config(cp: int, **overrides) -> TransformerConfig:
    kw = dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=128,
              use_cpu_initialization=True, params_dtype=torch.float32, context_parallel_size=cp,
              attention_dropout=0.0, hidden_dropout=0.0)
    kw.update(overrides)
    return TransformerConfig(**kw)


def _core_attention_kwargs(config, layer_number=1):
    """The keywords Megatron's SelfAttention builds core attention with (CoreAttentionBuilder, 0.16 to 0.19)."""
    return dict(config=config, layer_number=layer_number, attn_mask_type=AttnMaskType.causal, attention_type="self",
                cp_comm_type=None, softmax_scale=None, pg_collection=None)


def _masked_attention_sbhd(q, k, v, visible):
    """Plain softmax attention in Megatron's layout: q [s, b, Hq, d], k/v [s, b, Hkv, d] -> [s, b, Hq*d]."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    out = torch.einsum("bhqk,kbhd->qbhd", probs, v.double())
    return out.reshape(q.shape[0], q.shape[1], -1).to(q.dtype)


# ---- in-process tests (no torch.distributed: one process is CP = 1 without a group) ----------------------------
def test_builds_from_spec_with_extra_kwargs():
    spava = SpavaConfig(mode="ring")
    spec = get_gpt_layer_spec_with_spava(spava)
    core = spec.submodules.self_attention.submodules.core_attention
    assert isinstance(core, ModuleSpec) and core.module is SpavaCoreAttention
    # Built the way SelfAttention builds it, plus keywords newer Megatron versions (or MLA/TE paths) pass.
    module = core(**_core_attention_kwargs(_config(1), layer_number=3), attention_dropout=0.0, k_channels=8,
                  v_channels=8, some_future_option=True)
    assert module.spava_config is spava and module.layer_number == 3
    with pytest.raises(ValueError, match="multi-latent"):
        get_gpt_layer_spec_with_spava(multi_latent_attention=True)
    with pytest.raises(ValueError, match="causal"):
        SpavaCoreAttention(**dict(_core_attention_kwargs(_config(1)), attn_mask_type=AttnMaskType.padding))
    with pytest.raises(ValueError, match="softmax_type"):
        SpavaCoreAttention(**_core_attention_kwargs(_config(1, softmax_type="off-by-one")))


def _qkv_sbhd(s, b=2, hq=4, hkv=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(s, b, hq, d, generator=g), torch.randn(s, b, hkv, d, generator=g),
            torch.randn(s, b, hkv, d, generator=g))


def test_single_process_spava_matches_reference():
    """W = 1: the sbhd <-> bshd plumbing against reference_attention, and a causal mask is accepted."""
    layout = ZigzagLayout(20, 5, 1, SpavaConfig(anchor_len=3, passing_len=2))
    q, k, v = _qkv_sbhd(layout.total_len)
    module = SpavaCoreAttention(**_core_attention_kwargs(_config(1)))
    with use_layout(layout):
        out = module(q, k, v, None)
        causal_hidden = torch.ones(layout.total_len, layout.total_len, dtype=torch.bool).triu(1)
        out_masked = module(q, k, v, causal_hidden[None, None].expand(2, 1, -1, -1))
    ref = reference_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), layout)
    assert out.shape == (layout.total_len, 2, 4 * 8)
    torch.testing.assert_close(out, ref.transpose(0, 1).reshape(out.shape), atol=1e-5, rtol=0)
    torch.testing.assert_close(out_masked, out, atol=0, rtol=0)


def test_single_process_ring_without_layout_is_causal_attention():
    """No layout, no group: Megatron-equivalent layout at CP = 1, exact causal attention, forward and backward."""
    q, k, v = (t.requires_grad_() for t in _qkv_sbhd(12, seed=1))
    module = SpavaCoreAttention(**_core_attention_kwargs(_config(1)))  # no spava_config: mode ring
    out = module(q, k, v, None)
    visible = torch.ones(12, 12, dtype=torch.bool).tril()
    ref_inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = _masked_attention_sbhd(*ref_inputs, visible)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    for got, want in zip((q, k, v), ref_inputs):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-5, rtol=0)


def test_clear_errors():
    q, k, v = _qkv_sbhd(12)
    module = SpavaCoreAttention(**_core_attention_kwargs(_config(1)), spava_config=SpavaConfig(mode="spava"))
    with pytest.raises(ValueError, match="needs a layout"):
        module(q, k, v, None)
    layout = ZigzagLayout(8, 4, 1, SpavaConfig(anchor_len=2))
    with use_layout(layout):
        padding = torch.zeros(2, 1, 12, 12, dtype=torch.bool)
        padding[0, ..., 10:] = True  # a padding mask: causal it is not
        with pytest.raises(ValueError, match="causal attention only"):
            module(q, k, v, padding)
        with pytest.raises(ValueError, match="causal"):
            module(q, k, v, None, attn_mask_type=AttnMaskType.no_mask)
        with pytest.raises(NotImplementedError, match="packed"):
            module(q, k, v, None, packed_seq_params=object())
        with pytest.raises(ValueError, match="3 ranks"):
            with use_layout(ZigzagLayout(20, 4, 3, SpavaConfig(anchor_len=2))):
                module(q, k, v, None)
    with pytest.raises(ValueError, match="1 per-layer budgets, but the model has 2 attention layers"):
        SpavaCoreAttention(**_core_attention_kwargs(_config(1)), spava_config=SpavaConfig(passing_len=[3]))
    dropout = SpavaCoreAttention(**_core_attention_kwargs(_config(1, attention_dropout=0.1)))
    with pytest.raises(ValueError, match="attention_dropout=0.0"):
        dropout(q, k, v, None)  # modules start in training mode
    dropout.eval()
    assert dropout(q, k, v, None).shape == (12, 2, 32)  # no dropout at inference: accepted


# ---- distributed: CP = 2 blocks against CP = 1 references ---------------------------------------------------------
class _ReferenceCoreAttention(MegatronModule):
    """Test-only core attention: spava_ds.reference_attention on the full sequence in one process."""

    def __init__(self, config, layer_number, layout, **kwargs):
        super().__init__(config=config)
        self.layout, self.layer_idx = layout, layer_number - 1

    def forward(self, query, key, value, attention_mask, **kwargs):
        out = reference_attention(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), self.layout,
                                  layer_idx=self.layer_idx)
        return out.transpose(0, 1).reshape(query.shape[0], query.shape[1], -1)


def _init_weights(block, seed):
    """Deterministic weights, identical on every rank and in every block built from the same layer structure."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.15 * noise)


def _rope_table(positions, head_dim=8, base=10000.0):
    """RoPE angles ``[s, 1, 1, head_dim]`` for the given global positions (Megatron's non-interleaved layout)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    return torch.cat([angles, angles], dim=-1)[:, None, None, :]


def _run_block(block, x, g, attention_mask=None, positions=None):
    """Forward and backward of ``sum(block(x) * g)`` with RoPE at ``positions`` (global ids of x's rows).

    Returns (output, input grad, {param: grad}).
    """
    block.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    if positions is None:
        positions = torch.arange(x.shape[0], device=x.device)
    out = block(x, attention_mask, rotary_pos_emb=_rope_table(positions))
    (out * g).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in block.named_parameters()}


def _to_global(local, positions, total, group):
    """Sum every rank's token rows ``[s_local, ...]`` into their global positions: replicated rows add up."""
    import torch.distributed as dist

    full = local.new_zeros((total,) + tuple(local.shape[1:])).index_add_(0, positions, local)
    dist.all_reduce(full, group=group)
    return full


def _all_reduce_grads(grads, group):
    import torch.distributed as dist

    for grad in grads.values():
        dist.all_reduce(grad, group=group)  # Megatron reduces parameter gradients over DP x CP
    return grads


def _errors(got, want):
    """Max abs error of outputs, input grads and every parameter grad, each relative to the reference's max."""
    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))

    out, dx, dparams = got
    r_out, r_dx, r_dparams = want
    assert dparams.keys() == r_dparams.keys()
    return {"out": rel(out, r_out), "dx": rel(dx, r_dx),
            "dparams": max(rel(dparams[n], r_dparams[n]) for n in r_dparams)}


def _megatron_cp_shard(batch, cp_group):
    """Megatron's own CP sharding of a batch dict; its signature changed in 0.19 (``is_hybrid_cp`` positional)."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters:
        return get_batch_on_this_cp_rank(batch, False, cp_group=cp_group)
    return get_batch_on_this_cp_rank(batch, cp_group=cp_group)


def _megatron_cases(rank, world, cases, device_type="cpu"):
    """Runs in each spawned process: the CP = 2 blocks, then the CP = 1 references; returns errors per case."""
    warnings.filterwarnings("ignore")
    import contextlib

    import megatron.core.tensor_parallel.random as mrandom
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlock

    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    hidden = 64
    x_exact, g_exact = (torch.randn(EXACT_LEN, BATCH, hidden, generator=gen).to(device) for _ in range(2))
    spava_layout = ZigzagLayout(SPAVA_CONTEXT, SPAVA_QUERY, world, SPAVA)
    total = spava_layout.total_len
    x_spava, g_spava = (torch.randn(total, BATCH, hidden, generator=gen).to(device) for _ in range(2))

    def block(cp, spec):
        b = TransformerBlock(_config(cp), spec)
        _init_weights(b, SEED)
        return b.to(device)

    results, distributed = {}, {}
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, context_parallel_size=world)
    cp_group = parallel_state.get_context_parallel_group()

    # Megatron's own CP sharding (seq dim 1 of [b, s, ...]; dim 2 of the [b, 1, s, s] mask) and the token positions.
    causal_hidden = torch.ones(EXACT_LEN, EXACT_LEN, dtype=torch.bool, device=device).triu(1)
    causal_hidden = causal_hidden[None, None].expand(BATCH, 1, -1, -1)
    shard = _megatron_cp_shard({"x": x_exact.transpose(0, 1), "g": g_exact.transpose(0, 1),
                                "pos": torch.arange(EXACT_LEN, device=device)[None], "attention_mask": causal_hidden},
                               cp_group)
    x_local, g_local = shard["x"].transpose(0, 1), shard["g"].transpose(0, 1)
    pos_local = shard["pos"][0]
    for mode in ("ring", "ulysses"):
        if mode not in cases:
            continue
        try:
            # ring gets Megatron's causal mask ([b, 1, s_local, s] after sharding), ulysses none.
            mask = shard["attention_mask"] if mode == "ring" else None
            out, dx, dparams = _run_block(block(world, get_gpt_layer_spec_with_spava(SpavaConfig(mode=mode))),
                                          x_local, g_local, mask, pos_local)
            distributed[mode] = (_to_global(out, pos_local, EXACT_LEN, cp_group),
                                 _to_global(dx, pos_local, EXACT_LEN, cp_group), _all_reduce_grads(dparams, cp_group))
        except Exception:  # noqa: BLE001 - reported per case
            results[mode] = traceback.format_exc()

    if "spava" in cases:
        try:
            # Replicated tokens (anchor, query): each rank counts 1/W of their loss; their gradients are partial.
            weights = torch.ones(total, device=device)
            weights[:spava_layout.anchor_len] = weights[spava_layout.context_len:] = 1.0 / world
            g_local = spava_layout.shard(g_spava * weights[:, None, None], rank, dim=0)
            pos = spava_layout.positions(rank, device=device)
            with use_layout(spava_layout):
                out, dx, dparams = _run_block(block(world, get_gpt_layer_spec_with_spava(SPAVA)),
                                              spava_layout.shard(x_spava, rank, dim=0), g_local, positions=pos)
            # Forward: this rank's rows must equal the reference's rows, replicated ones included (checked below).
            distributed["spava"] = (out, _to_global(dx, pos, total, cp_group), _all_reduce_grads(dparams, cp_group))
        except Exception:  # noqa: BLE001
            results["spava"] = traceback.format_exc()

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, context_parallel_size=1)

    if any(m in distributed for m in ("ring", "ulysses")) or "dense" in cases:
        if device.type == "cpu":
            # Megatron's DotProductAttention on CPU needs the workarounds of notes/cpu_env_feasibility.md 2e: its
            # buffers ask for a CUDA device, its dropout forks the CUDA RNG (this process only).
            torch.cuda.current_device = lambda: "cpu"

            @contextlib.contextmanager
            def no_fork(self, name=None):
                yield

            mrandom.CudaRNGStatesTracker.fork = no_fork
        else:
            mrandom.model_parallel_cuda_manual_seed(SEED)  # its dropout forks this RNG state even at p = 0
        reference = _run_block(block(1, get_gpt_layer_local_spec()), x_exact, g_exact, causal_hidden)
        for mode in ("ring", "ulysses"):
            if mode in distributed:
                results[mode] = _errors(distributed[mode], reference)
        if "dense" in cases:
            try:
                results["dense"] = _errors(
                    _run_block(block(1, get_gpt_layer_spec_with_spava(SpavaConfig(mode="dense"))), x_exact, g_exact),
                    reference)
            except Exception:  # noqa: BLE001
                results["dense"] = traceback.format_exc()

    if "spava" in distributed:
        ref_spec = get_gpt_layer_local_spec()
        ref_spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
            module=_ReferenceCoreAttention, params={"layout": spava_layout})
        ref_out, ref_dx, ref_dparams = _run_block(block(1, ref_spec), x_spava, g_spava)
        out, dx, dparams = distributed["spava"]
        results["spava"] = _errors((out, dx, dparams),
                                   (spava_layout.shard(ref_out, rank, dim=0), ref_dx, ref_dparams))
    parallel_state.destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def megatron_results():
    return run_distributed(_megatron_cases, CP, ("ring", "ulysses", "dense", "spava"), timeout=120)


def _check(results, case, tol):
    for rank, res in enumerate(results):
        err = res.get(case)
        assert err is not None, f"case {case} did not run on rank {rank}"
        assert isinstance(err, dict), f"case {case} failed on rank {rank}:\n{err}"
        assert max(err.values()) < tol, f"case {case}, rank {rank}: relative errors {err}"


@pytest.mark.timeout(150)
def test_cp2_ring_block_equals_cp1_megatron(megatron_results):
    """TransformerBlock, CP = 2, mode ring, Megatron's CP sharding and causal mask == Megatron's DotProductAttention at
    CP = 1: output, input gradient and parameter gradients (all-reduced over CP)."""
    _check(megatron_results, "ring", 1e-5)


@pytest.mark.timeout(150)
def test_cp2_ulysses_block_equals_cp1_megatron(megatron_results):
    _check(megatron_results, "ulysses", 1e-5)


@pytest.mark.timeout(150)
def test_dense_block_equals_megatron(megatron_results):
    _check(megatron_results, "dense", 1e-5)


@pytest.mark.timeout(150)
def test_cp2_spava_block_equals_reference(megatron_results):
    """Mode spava with a user layout (anchor and query replicated) == the block with reference_attention in one
    process: forward rows of every rank, input gradient (partials summed over CP) and parameter gradients."""
    _check(megatron_results, "spava", 1e-5)


@pytest.mark.gpu(count=2)
@pytest.mark.timeout(600)
def test_megatron_cases_nccl_two_gpus():
    """The same four cases on 2 GPUs under NCCL (fp32; the GPU kernels differ from the CPU ones)."""
    results = run_distributed(_megatron_cases, 2, ("ring", "ulysses", "dense", "spava"), "cuda", backend="nccl",
                              timeout=540)
    for case in ("ring", "ulysses", "dense", "spava"):
        _check(results, case, 1e-4)
