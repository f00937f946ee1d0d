"""launch/bench_train.py on the CPU with the tiny shape.

* one-rank mode: a child process stands for rank 0 of W = 2 on the fake process group, with DeepSpeed ZeRO-3 on it,
  and measures every mode; a rerun measures nothing again; the tables print;
* real ranks: 2 gloo processes measure through the same code;
* the frontier stops at the first length that did not fit; the tables say what fit;
* the model FLOPs equal a count from the model's own modules.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from dist_utils import run_distributed  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = 300
COMMON = ["--shape", "tiny", "--tokens", str(TOKENS), "--grid", "4", "4", "--steps", "1", "--warmup", "0",
          "--warmup-tokens", "200", "--mlp-shards", "3"]


def _script():
    spec = importlib.util.spec_from_file_location("bench_train", os.path.join(ROOT, "launch", "bench_train.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """The shipped ZeRO-3 config in fp32 (bf16 matrix products are slow on a CPU)."""
    with open(os.path.join(ROOT, "configs", "train_zero3_bf16.json"), encoding="utf-8") as f:
        ds = json.load(f)
    ds["bf16"] = {"enabled": False}
    path = tmp_path_factory.mktemp("cfg") / "zero3_fp32.json"
    path.write_text(json.dumps(ds))
    return str(path)


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _check_rows(rows, modes, one_rank):
    from spava_ds import SpavaConfig, ZigzagLayout

    assert sorted(r["mode"] for r in rows) == sorted(modes)
    for r in rows:
        assert r["status"] == "ok" and r["one_rank"] == one_rank and r["world"] == 2, r
        assert r["step_s"] > 0 and r["tokens_per_s_per_gpu"] == pytest.approx(TOKENS / 2 / r["step_s"])
        b = r["breakdown"]
        assert {"vision", "attention_forward", "attention_recompute", "attention_backward", "optimizer"} <= set(b)
        assert 0 < b["attention_backward"] < b["backward"] and b["forward"] + b["backward"] <= r["step_s"] * 1.01
        # contiguous shards for DeepSpeed's Ulysses; the zigzag share (anchor and query replicated) otherwise
        expected = TOKENS // 2 if r["mode"] == "deepspeed-ulysses" else \
            ZigzagLayout(TOKENS - 48, 48, 2, SpavaConfig(mode=r["mode"])).local_len(r["rank"])
        assert r["local_tokens"] == expected, r


def test_one_rank_mode_measures_every_mode_once(config, tmp_path, capsys):
    bench = _script()
    out = str(tmp_path / "bench.jsonl")
    argv = ["--one-rank", "--world", "2", "--config", config, "--out", out] + COMMON
    assert bench.main(argv) == 0
    rows = _lines(out)
    _check_rows(rows, bench.MODES, one_rank=True)
    assert all(r["rank"] == 0 and r["card"] == "CPU" and r["mfu"] is None for r in rows)
    assert bench.main(argv) == 0  # resumed: nothing left to measure, no child started
    assert len(_lines(out)) == len(rows)
    printed = capsys.readouterr().out
    assert "| tiny | 1 of 2 (fake) | deepspeed-ulysses | 300 |" in printed
    assert "| CPU | tiny | 1 of 2 (fake) | 300 |" in printed  # spava's speed-up table


def _real(rank, world, argv):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))  # as torchrun sets them
    return _script().main(argv)


def test_real_ranks_measure_through_the_same_code(config, tmp_path):
    out = str(tmp_path / "bench.jsonl")
    run_distributed(_real, 2, ["--config", config, "--out", out, "--modes", "spava", "deepspeed-ulysses", "--profile"]
                    + COMMON, timeout=600)
    rows = _lines(out)
    _check_rows(rows, ["spava", "deepspeed-ulysses"], one_rank=False)
    for r in rows:  # the profiled step on a CPU: host activity, no CUDA calls, no kernel classes
        h = r["host"]
        assert r["kernels"] is None and h["aten_ops"] > 100 and h["step_s"] > 0, r
        assert h["launches"] == h["syncs"] == 0 and h["blocked_s"] == 0, h


def test_frontier_stops_at_the_first_length_that_does_not_fit(tmp_path, capsys):
    bench = _script()
    out = str(tmp_path / "frontier.jsonl")
    args = bench.parse_args(["--one-rank", "--world", "4", "--shape", "7b", "--tokens", "--frontier", "1000",
                             "--frontier-max", "8000", "--modes", "spava", "ring", "--out", out])
    rows = bench.plan_rows(args)
    assert [(r.mode, r.tokens) for r in rows] == [(m, n) for m in ("spava", "ring") for n in (1000, 2000, 4000, 8000)]
    results = bench.Results(out)
    base = dict(card="H200", date="2026-11-29", source="7b", world=4, rank=0, one_rank=True, frontier=True,
                options=json.loads(json.dumps(bench.dataclasses.asdict(args.memory))))
    for row, status in zip(rows, ["ok", "ok", "oom", None, "ok", None, None, None]):
        if status:
            results.append(dict(base, key=row.key(args), mode=row.mode, tokens=row.tokens, status=status,
                                peak_gib=100.0 + row.tokens / 1000))
    pending = bench.Results(out).pending(rows, args)
    assert [(r.mode, r.tokens) for r in pending] == [("ring", 2000), ("ring", 4000), ("ring", 8000)]
    bench.print_tables([out])
    printed = capsys.readouterr().out
    assert "| H200 | 7b | 1 of 4 (fake) | spava | 2000 | 102.0 | 4000 |" in printed
    # the plot's series (launch/plot_bench_train.py): memory per mode, and where it stopped fitting
    spec = importlib.util.spec_from_file_location("plot_bench_train", os.path.join(ROOT, "launch",
                                                                                   "plot_bench_train.py"))
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    panel = plot.load_series([out])[("H200", "7b", "1 of 4 (fake)")]
    assert panel == {"time": {}, "frontier_time": {}, "oom": {"spava": 4000},
                     "memory": {"spava": [(1000, 101.0), (2000, 102.0)], "ring": [(1000, 101.0)]}}
    offloaded = dict(json.loads(open(out).readline()), options={"offload_checkpoints": True}, step_s=2.5)
    assert plot.series_name(offloaded) == "spava +offload"
    with open(out, "a") as f:
        f.write(json.dumps(dict(offloaded, key="another")) + "\n")
    panel = plot.load_series([out])[("H200", "7b", "1 of 4 (fake)")]
    assert panel["frontier_time"] == {"spava +offload": [(1000, 2.5)]}
    assert panel["memory"]["spava"] == [(1000, 101.0), (2000, 102.0)]  # the other options' curve is its own


def test_a_bad_config_is_a_command_line_error(config, tmp_path, capsys):
    """A missing JSON or a bad "spava" block stops the benchmark before it starts any child process."""
    bench = _script()
    argv = ["--one-rank", "--world", "2", "--shape", "tiny", "--out", str(tmp_path / "out.jsonl"), "--config"]
    assert bench.parse_args(argv + [config]).config == config
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"spava": {"mdoe": "ring"}}))
    for path, message in ((str(tmp_path / "missing.json"), "missing.json': no such file"),
                          (str(bad), "unknown SpavaConfig key(s) ['mdoe']")):
        with pytest.raises(SystemExit) as exit_info:
            bench.parse_args(argv + [path])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_model_flops_equal_a_count_from_the_modules():
    from spava_ds.train_model import build_model
    from spava_ds.training import synthetic_sample

    bench = _script()
    model, _ = build_model("tiny", torch.float32, torch.device("cpu"), "sdpa")
    sample = synthetic_sample(model, TOKENS, (4, 4))
    flops = bench.model_flops(model.config, sample, train_vision=False)

    def linear_weights(module):
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))

    layers = model.model.language_model.layers
    assert flops["linear"] == 3 * 2 * TOKENS * linear_weights(layers)
    t = model.config.text_config
    pairs = TOKENS * (TOKENS + 1) // 2  # causal query-key pairs
    assert flops["attention"] == 3 * len(layers) * 2 * 2 * pairs * t.hidden_size
    assert flops["lm_head"] == 3 * 2 * 16 * model.lm_head.weight.numel()  # 16 answer tokens
    visual = model.model.visual
    patches = sample["pixel_values_videos"].shape[0]
    conv = visual.patch_embed.proj.weight.numel()
    vision_linear = 2 * patches * (linear_weights(visual.blocks) + conv) + 2 * patches // 4 * linear_weights(
        visual.merger)
    # forward only (frozen); attention: one windowed block (4 x 4 patches a window), one full over a 4 x 4 frame
    assert flops["vision"] == vision_linear + 4 * patches * visual.config.hidden_size * (16 + 16)
    assert bench.model_flops(model.config, sample, train_vision=True)["vision"] == 3 * flops["vision"]
    assert flops["total"] == sum(v for k, v in flops.items() if k != "total")


def test_kernel_classes_by_name():
    from spava_ds.profiling import kernel_class

    for name, kind in (("ncclDevKernel_AllGather_RING_LL", "nccl"),
                       ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
                       ("flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel", "attention"),
                       ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "gemm"),
                       ("nvjet_tst_192x192_64x4_1x2_h_bz_coopB_TNT", "gemm"),
                       ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add>",
                        "elementwise"),
                       ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16>",
                        "elementwise"),
                       ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::"
                        "direct_copy_kernel_cuda(at::TensorIteratorBase&)>>", "copy"),
                       ("void at::native::index_elementwise_kernel<128, 4>", "copy"),
                       ("Memcpy DtoD (Device -> Device)", "copy"),
                       ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<float, 4, 64>", "copy"),
                       ("aten::addmm", "gemm"), ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
                       ("aten::gelu", "elementwise"), ("aten::copy_", "copy"),
                       ("void truncate_kernel<float>", "other"), ("aten::empty", "other")):
        assert kernel_class(name) == kind, name


def test_out_of_memory_is_recognised_in_its_forms():
    bench = _script()
    assert bench.out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert bench.out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not bench.out_of_memory(RuntimeError("shape mismatch"))


@pytest.mark.gpu
def test_one_rank_mode_on_a_gpu(tmp_path):
    """The GPU path before the long runs: the fake group with CUDA tensors under DeepSpeed ZeRO-3 (bf16, the
    shipped config), every mode, the profiled kernel classes, and a two-step frontier."""
    bench = _script()
    out = str(tmp_path / "gpu.jsonl")
    assert bench.main(["--one-rank", "--world", "2", "--shape", "tiny", "--tokens", "8192", "--frontier", "16384",
                       "--frontier-max", "32768", "--profile", "--out", out]) == 0
    rows = _lines(out)
    steps = [r for r in rows if not r["frontier"]]
    assert sorted(r["mode"] for r in steps) == sorted(bench.MODES)
    for r in steps:
        assert r["status"] == "ok" and r["peak_gib"] > r["resident_gib"] > 0 and (r["mfu"] or 1) > 0, r
        assert r["kernels"].get("gemm", 0) > 0 and r["kernels"].get("attention", 0) > 0, r["kernels"]
        h = r["host"]  # at least the closing synchronize; blocked for part of the profiled step's wall time
        assert h["launches"] > 100 and h["syncs"] >= 1 and 0 < h["blocked_s"] < h["step_s"], h
    assert {(r["mode"], r["tokens"]) for r in rows if r["frontier"]} == {(m, n) for m in bench.MODES
                                                                        for n in (16384, 32768)}
