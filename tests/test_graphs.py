"""spava_ds.graphs: CUDA graphs of a layer's attention.

CPU: the eager fallbacks, and the cache's rules (which calls share a graph, the bound, freeing, failures agreed by
every rank) with a recorder that replays a captured call by calling it again on the new inputs, which is what a
graph does: a replay under the wrong signature (another budget, shape or layout) gives a wrong output.
GPU: real CUDA graphs replay the eager call bit for bit, for several signatures, with bounded memory, inside a
transformers model, and with NCCL collectives on 2 GPUs.
"""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
import torch.distributed as dist

from spava_ds import MODES, SpavaConfig, ZigzagLayout, comm, graphs, profiling, sp_attention
from spava_ds.graphs import AttentionGraphs
from spava_ds.integrations.transformers import spava_session

from dist_utils import run_distributed

ZIGZAG_MODES = [m for m in MODES if m != "dense"]


class CallRecorder:
    """A recorder for the CPU: keeps the captured call and replays it on new inputs; counts what happens."""

    def __init__(self, fail_on=()):
        self.fail_on = set(fail_on)  # which record() calls (1-based) raise
        self.records = self.replays = self.released = 0
        self.closed = False

    def unsupported(self, q, group):
        return None

    def warm_up(self, call, q, k, v):
        return call(q, k, v)

    def record(self, call, q, k, v):
        self.records += 1
        if self.records in self.fail_on:
            raise RuntimeError("operation not permitted when stream is capturing")

        def replay(q, k, v):
            self.replays += 1
            return call(q, k, v)
        return replay

    def release(self, replay):
        self.released += 1

    def device_bytes(self):
        return 0

    def close(self):
        self.closed = True


def _qkv(layout, rank=0, hq=4, hkv=2, d=8, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    n = layout.local_len(rank)
    return [torch.randn(1, n, h, d, generator=g).to(device=device, dtype=dtype) for h in (hq, hkv, hkv)]


@pytest.mark.parametrize("mode", MODES)
def test_each_layer_gets_its_own_output_and_layers_of_one_budget_share_a_graph(mode):
    budgets = [3, 7, 3, 7, 3, 11]  # two budgets repeat, one does not
    config = SpavaConfig(mode=mode, passing_len=budgets, anchor_len=5)
    layout = ZigzagLayout(90, 6, 1, config)
    cache = AttentionGraphs(True, recorder=CallRecorder())
    for layer in range(len(budgets)):
        q, k, v = _qkv(layout, seed=layer)
        out = cache.sp_attention(q, k, v, layout, layer_idx=layer)
        assert torch.equal(out, sp_attention(q, k, v, layout, layer_idx=layer)), (mode, layer)
        if mode == "spava" and layer in (2, 3):  # replayed: with another layer's budget it would differ
            other = sp_attention(q, k, v, layout, layer_idx=layer + 1)
            assert not torch.equal(out, other)
    if config.mode_spec.passing == "topk":
        # budget 3: layers 0 (eager), 2 (captured), 4 (replayed); budget 7: 1 (eager), 3 (captured); 11: eager
        assert (cache.stats["captures"], cache.stats["replays"], cache.stats["eager"]) == (2, 3, 3)
        assert len(cache) == 2
    else:  # the budget does not change the work: one signature for every layer
        assert (cache.stats["captures"], cache.stats["replays"], cache.stats["eager"]) == (1, 5, 1)


def test_shapes_dtypes_layouts_and_scales_are_signatures_of_their_own():
    recorder = CallRecorder()
    cache = AttentionGraphs(True, recorder=recorder)
    short, long = ZigzagLayout(60, 4, 1, SpavaConfig(anchor_len=2)), ZigzagLayout(61, 4, 1, SpavaConfig(anchor_len=2))
    calls = [(short, torch.float32, None), (long, torch.float32, None), (short, torch.float64, None),
             (short, torch.float32, 0.3)]
    for repeat in range(3):
        for i, (layout, dtype, scale) in enumerate(calls):
            q, k, v = _qkv(layout, dtype=dtype, seed=10 * repeat + i)
            out = cache.sp_attention(q, k, v, layout, scale=scale)
            assert torch.equal(out, sp_attention(q, k, v, layout, scale=scale))
    assert recorder.records == cache.stats["captures"] == 4 and recorder.replays == 8
    # Same lengths, another layout object: the same signature (a new session of the same length reuses nothing
    # of the old one only because SpavaSession closes its graphs).
    layout = ZigzagLayout(60, 4, 1, SpavaConfig(anchor_len=2))
    q, k, v = _qkv(layout, seed=99)
    assert torch.equal(cache.sp_attention(q, k, v, layout), sp_attention(q, k, v, layout))
    assert recorder.records == 4 and recorder.replays == 9


def test_the_bound_evicts_the_least_recently_used_graph():
    recorder = CallRecorder()
    cache = AttentionGraphs(True, max_graphs=2, recorder=recorder)
    config = SpavaConfig(passing_len=[2, 4, 6], anchor_len=3)
    layout = ZigzagLayout(70, 5, 1, config)
    order = [0, 0, 1, 1, 0, 2, 2, 1, 1]  # 2's capture evicts 1 (0 was used since); 1's second capture evicts 0
    for i, layer in enumerate(order):
        q, k, v = _qkv(layout, seed=i)
        assert torch.equal(cache.sp_attention(q, k, v, layout, layer_idx=layer),
                           sp_attention(q, k, v, layout, layer_idx=layer))
        assert len(cache) <= 2
    assert cache.stats["evictions"] == recorder.released == 2
    assert cache.stats["captures"] == 4  # 0, 1, 2, and 1 again after its eviction (seen once more, then captured)
    cache.close()
    assert len(cache) == 0 and recorder.closed and recorder.released == 4


def test_a_session_frees_its_graphs_when_the_prefill_ends():
    layout = ZigzagLayout(80, 6, 1, SpavaConfig(anchor_len=4))
    for decode in (False, True):
        with spava_session(layout) as session:
            assert session.graphs.setting == "auto"
            recorder = CallRecorder()
            session.graphs = AttentionGraphs(True, recorder=recorder)
            for layer in range(4):
                q, k, v = _qkv(layout, seed=layer)
                out = session.prefill(layer, q, k, v, None)
                assert torch.equal(out, sp_attention(q, k, v, layout))
            assert len(session.graphs) == 1 and recorder.replays == 3
            if decode:
                session.decode()
                assert len(session.graphs) == 0 and recorder.closed
        assert len(session.graphs) == 0 and recorder.closed


def _logged(caplog, text):
    return sum(text in r.getMessage() for r in caplog.records)


# A reason is logged once per process: an earlier test may have logged the commoner ones already.


def test_calls_that_cannot_be_captured_run_eagerly_and_say_why_once(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="spava_ds")
    layout = ZigzagLayout(80, 6, 1, SpavaConfig(anchor_len=4))
    q, k, v = _qkv(layout)
    expected = sp_attention(q, k, v, layout)

    cpu = AttentionGraphs(True)  # the default recorder: CUDA graphs
    for _ in range(3):
        assert torch.equal(cpu.sp_attention(q, k, v, layout), expected)
    assert cpu.stats["eager"] == 3 and _logged(caplog, "not on CUDA (cpu)") <= 1
    assert cpu.eager_reason(q, k, v, layout, None) == "not on CUDA (cpu)"

    recorder = CallRecorder()
    cache = AttentionGraphs(True, recorder=recorder)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    for _ in range(3):  # training: gradients flow, nothing is captured
        out = cache.sp_attention(qg, kg, vg, layout)
        assert out.requires_grad and torch.equal(out.detach(), expected)
    out.sum().backward()
    assert qg.grad is not None and recorder.records == 0
    assert _logged(caplog, "gradients are needed") <= 1
    assert "gradients are needed" in cache.eager_reason(qg, kg, vg, layout, None)
    with profiling.span_hook(lambda name: contextlib.nullcontext()):
        for _ in range(3):
            assert torch.equal(cache.sp_attention(q, k, v, layout), expected)
        assert "span hook" in cache.eager_reason(q, k, v, layout, None)
    assert recorder.records == 0 and _logged(caplog, "a span hook times the steps") <= 1

    monkeypatch.setattr(graphs, "AUTO_MAX_TOKENS_PER_RANK", 40)  # 86 tokens on one rank: above it
    auto = AttentionGraphs("auto", recorder=CallRecorder())
    for _ in range(3):
        assert torch.equal(auto.sp_attention(q, k, v, layout), expected)
    assert auto.recorder.records == 0 and _logged(caplog, "more than 40 tokens per rank") == 1
    off = AttentionGraphs(False, recorder=CallRecorder())
    for _ in range(3):
        assert torch.equal(off.sp_attention(q, k, v, layout), expected)
    assert off.recorder.records == 0 and off.stats["eager"] == 3


def test_a_failed_capture_leaves_the_session_eager(caplog):
    caplog.set_level(logging.INFO, logger="spava_ds")
    layout = ZigzagLayout(80, 6, 1, SpavaConfig(anchor_len=4))
    recorder = CallRecorder(fail_on={1})
    cache = AttentionGraphs(True, recorder=recorder)
    for layer in range(5):
        q, k, v = _qkv(layout, seed=layer)
        assert torch.equal(cache.sp_attention(q, k, v, layout), sp_attention(q, k, v, layout))
    assert recorder.records == 1 and cache.stats["failures"] == 1 and cache.stats["eager"] == 5
    assert "operation not permitted when stream is capturing" in cache.disabled
    assert _logged(caplog, "CUDA graphs of the attention off for this session") == 1


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="cuda_graphs must be 'auto', True or False"):
        SpavaConfig(cuda_graphs="yes")
    with pytest.raises(ValueError, match="cuda_graphs must be 'auto', True or False"):
        SpavaConfig(cuda_graphs=1)
    assert SpavaConfig.from_dict({"cuda_graphs": False}).cuda_graphs is False
    with pytest.raises(ValueError, match="max_graphs must be an int >= 1"):
        AttentionGraphs(True, max_graphs=0)


def _one_rank_fails(rank, world):
    config = SpavaConfig(passing_len=3, anchor_len=4)
    layout = ZigzagLayout(90, 5, world, config)
    cache = AttentionGraphs(True, recorder=CallRecorder(fail_on={1} if rank == 1 else ()))
    equal = []
    for layer in range(4):
        q, k, v = _qkv(layout, rank, seed=layer)
        equal.append(torch.equal(cache.sp_attention(q, k, v, layout), sp_attention(q, k, v, layout)))
    return equal, dict(cache.stats), cache.disabled


def test_a_capture_failing_on_one_rank_makes_every_rank_run_eagerly():
    (eq0, stats0, why0), (eq1, stats1, why1) = run_distributed(_one_rank_fails, 2)
    assert all(eq0) and all(eq1)
    assert stats0["captures"] == stats1["captures"] == 0 and stats0["replays"] == stats1["replays"] == 0
    assert why0 == "a capture failed on another rank" and "operation not permitted" in why1


# ---- GPU: real CUDA graphs -------------------------------------------------------------------------------------
def _replicating_hook(op, *args, **kwargs):
    """A collective of a group whose every rank holds this rank's tensors (deterministic, captured like any
    kernel): an all-gather repeats the input, an all-to-all keeps this rank's share, an all-reduce is a no-op."""
    name = getattr(op, "__name__", "")
    if name.startswith("all_gather"):
        out, x = args[0], args[1]
        out.view(-1, *x.shape).copy_(x.unsqueeze(0).expand(out.numel() // x.numel(), *x.shape))
    elif name == "all_to_all_single":
        out, x = args[0], args[1]
        n = min(out.numel(), x.numel())
        out.zero_()
        out[:n].copy_(x.reshape(-1)[:n])
    return None


@contextlib.contextmanager
def _fake_rank(rank, world):
    """This process as rank ``rank`` of ``world`` (no group at W = 1), collectives by ``_replicating_hook``."""
    if world == 1:
        yield
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        with comm.collective_hook(_replicating_hook):
            yield
    finally:
        dist.destroy_process_group()


def _compare_layers(layout, config, rank, layers, dtype, device, **kw):
    """Eager and graph outputs of ``layers`` calls with fresh inputs; returns the cache and the largest error."""
    cache = AttentionGraphs(True)
    worst = 0.0
    for layer in range(layers):
        q, k, v = _qkv(layout, rank, seed=layer, dtype=dtype, device=device, **kw)
        with torch.inference_mode():
            expected = sp_attention(q, k, v, layout, config, layer_idx=layer)
            out = cache.sp_attention(q, k, v, layout, config, layer_idx=layer)
        worst = max(worst, (out.float() - expected.float()).abs().max().item())
        assert not torch.equal(out, torch.zeros_like(out))
    return cache, worst


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_graph_replays_equal_the_eager_calls(dtype):
    device = torch.device("cuda", torch.cuda.current_device())
    for world in (1, 2, 4):
        for mode in ZIGZAG_MODES:
            if mode == "ulysses" and world > 1:
                continue  # its all-to-alls need every rank's tokens; the 2-GPU test runs it
            config = SpavaConfig(mode=mode, passing_len=[64, 128] * 3 if mode == "spava" else None)
            layout = ZigzagLayout(2000 + 37, 29, world, config)
            with _fake_rank(world - 1, world):
                cache, worst = _compare_layers(layout, config, world - 1, 6, dtype, device, hq=8, hkv=2, d=64)
            assert cache.stats["replays"] >= 3, (world, mode, cache.stats, cache.disabled)
            assert worst <= (1e-6 if dtype == torch.float32 else 0.0), (world, mode, worst)
            cache.close()


@pytest.mark.gpu
def test_memory_stays_bounded_over_many_layers():
    device = torch.device("cuda", torch.cuda.current_device())
    config = SpavaConfig(mode="spava")
    layout = ZigzagLayout(8000, 48, 2, config)
    q, k, v = _qkv(layout, 1, hq=16, hkv=2, d=128, dtype=torch.bfloat16, device=device)
    with _fake_rank(1, 2), torch.inference_mode():
        sp_attention(q, k, v, layout, config)  # lazy state (library workspaces) is made before the count
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
        cache = AttentionGraphs(True)
        allocated = []
        for layer in range(40):
            out = cache.sp_attention(q * (1 + layer / 40), k, v, layout, config)
            del out
            allocated.append(torch.cuda.memory_allocated(device))
        assert cache.stats["captures"] == 1 and cache.stats["replays"] == 39, (cache.stats, cache.disabled)
        assert max(allocated[5:]) == allocated[5], allocated  # the pool and the buffers, once
        held = cache.device_bytes()
        q_bytes = q.numel() * q.element_size()
        assert 2 * q_bytes < held < 64 * q_bytes, (held, q_bytes)  # static q, k, v, the output, one call's scratch
        cache.close()
        torch.cuda.synchronize()
    # freed; a library workspace made for the capture's stream (cuBLAS: 32 MiB at most) may stay
    assert torch.cuda.memory_allocated(device) <= before + (64 << 20)


def _tiny_qwen2(device, dtype):
    from transformers import Qwen2Config, Qwen2Model

    from spava_ds.integrations.transformers import register

    cfg = Qwen2Config(hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=1000)
    torch.manual_seed(0)
    model = Qwen2Model(cfg).to(device=device, dtype=dtype).eval()
    model.set_attn_implementation(register())
    return model


def _prefill(model, ids, setting, recorder=None):
    """The model's hidden states through a session with ``cuda_graphs=setting`` and the session's graph stats."""
    layout = ZigzagLayout(ids.shape[1] - 30, 30, 1, SpavaConfig(cuda_graphs=setting))
    with torch.no_grad(), spava_session(layout, keep_cache=False) as session:
        if recorder is not None:
            session.graphs = AttentionGraphs(setting, recorder=recorder)
        hidden = model(input_ids=ids, use_cache=False).last_hidden_state
        return hidden, dict(session.graphs.stats)


def test_a_transformers_model_prefills_through_one_signature_for_all_layers():
    model = _tiny_qwen2("cpu", torch.float32)
    ids = torch.randint(0, 1000, (1, 300))
    eager, _ = _prefill(model, ids, False)
    replayed, stats = _prefill(model, ids, True, CallRecorder())
    assert stats["captures"] == 1 and stats["replays"] == 5, stats
    assert torch.equal(replayed, eager)


@pytest.mark.gpu
def test_a_transformers_model_prefills_the_same_with_cuda_graphs():
    device = torch.device("cuda", torch.cuda.current_device())
    model = _tiny_qwen2(device, torch.bfloat16)
    ids = torch.randint(0, 1000, (1, 1500), device=device)
    eager, _ = _prefill(model, ids, False)
    replayed, stats = _prefill(model, ids, True)
    assert stats["captures"] == 1 and stats["replays"] == 5, stats
    assert torch.equal(replayed, eager), (replayed.float() - eager.float()).abs().max()


def _nccl_graphs(rank, world):
    device = torch.device("cuda", rank)
    results = []
    for mode in ("spava", "ring", "ulysses"):
        config = SpavaConfig(mode=mode)
        layout = ZigzagLayout(3000 + 11, 40, world, config)
        cache, worst = _compare_layers(layout, config, rank, 5, torch.bfloat16, device, hq=8, hkv=2, d=64)
        results.append((mode, worst, dict(cache.stats), cache.disabled))
        cache.close()
    return results


@pytest.mark.gpu(count=2)
def test_nccl_collectives_replay_inside_the_graphs_on_two_gpus():
    for results in run_distributed(_nccl_graphs, 2, backend="nccl"):
        for mode, worst, stats, disabled in results:
            assert stats["captures"] == 1 and stats["replays"] == 4, (mode, stats, disabled)
            assert worst == 0.0, (mode, worst)


def test_auto_off_cuda_says_so_only_at_debug_level(caplog, monkeypatch):
    import spava_ds.graphs as graphs_module

    monkeypatch.setattr(graphs_module, "_LOGGED", set())  # a fresh session's "say it once"
    caplog.set_level(logging.DEBUG, logger="spava_ds")
    layout = ZigzagLayout(80, 6, 1, SpavaConfig(anchor_len=4))
    q, k, v = _qkv(layout)
    AttentionGraphs("auto").sp_attention(q, k, v, layout)
    said = [r for r in caplog.records if "not on CUDA (cpu)" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.DEBUG]
    assert not said[0].getMessage().startswith("spava_ds:")  # the logger's name carries it
    AttentionGraphs(True).sp_attention(q, k, v, layout)     # asked for explicitly: nothing new, said once already
    assert len([r for r in caplog.records if "not on CUDA (cpu)" in r.getMessage()]) == 1
