"""launch/scaling_model.py (the cost model of docs/scaling.md) and the benchmarks' two-dimensional options.

The model's work is checked against an independent count of the pairs every mode attends, its collectives against
the tensors the code really sends (recorded under PyTorch's fake process group), its closed forms against its piece
sums; its three subcommands run on the CPU at tiny sizes. bench_host and bench_e2e run the 2-D mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from spava_ds import MeshLayout, SpavaConfig, ZigzagLayout, comm
from dist_utils import child_env  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "launch", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


sm = _load("scaling_model")


def _pairs_by_rows(lay: ZigzagLayout, budget: int, shape) -> int:
    """Every (query, key) pair Spava attends over all ranks, row by row as reference_attention defines them:
    anchor rows on every rank; block v's rows see the passing tokens of blocks u < v, the anchor and their own
    block causally; the query rows see everything before them once."""
    la, lq, ctx = lay.anchor_len, lay.query_len, lay.context_len
    pairs = lay.world_size * la * (la + 1) // 2
    for v in range(lay.num_blocks):
        n = lay.block_len(v)
        passing = sum(min(budget, lay.block_len(u)) for u in range(v))
        pairs += sum(passing + la + i + 1 for i in range(n))
    return pairs + sum(ctx + i + 1 for i in range(lq))


@pytest.mark.parametrize("tokens,world", [(1000, 1), (1000, 2), (1237, 3), (3001, 4), (4099, 7)])
@pytest.mark.parametrize("exact", [False, True])
def test_work_counts_every_attended_pair(tokens, world, exact):
    shape = sm.Shape("t", 4, 2, 8, 1, query=9)
    lay = sm.zigzag_layout(exact, tokens, world, shape)
    budget = max(lay.block_len(u) for u in range(lay.num_blocks)) if exact else \
        SpavaConfig().resolve_passing_len(lay.context_len)
    per_pair = 4 * shape.head_dim * shape.heads
    model = sum(sm.zigzag_work(exact, tokens, world, shape, shape.heads, shape.kv_heads, r)[0].flops
                for r in range(world))
    assert model == per_pair * _pairs_by_rows(lay, budget, shape)
    ulysses = sm.ulysses_work(tokens, 2, shape).flops * 2
    assert ulysses == per_pair * tokens * (tokens + 1) // 2


@pytest.mark.parametrize("world", [4, 16, 64])
def test_closed_forms_of_the_docs_match_the_piece_sums(world):
    tokens, shape = 2 ** 20, sm.SHAPES["7b"]
    per_pair = 4 * shape.head_dim * shape.heads
    for mode in ("spava", "ring"):
        pieces = sm.zigzag_work(mode == "ring", tokens, world, shape, shape.heads, shape.kv_heads)[0].flops
        assert pieces / per_pair == pytest.approx(sm.closed_form_pairs(mode, tokens, world), rel=0.02), mode
    assert sm.ulysses_work(tokens, 4, shape).flops / per_pair == pytest.approx(
        sm.closed_form_pairs("ulysses", tokens, 4), rel=1e-3)


def test_predictions_show_the_floor_of_flat_spava():
    shape, card = sm.SHAPES["7b"], sm.CARDS["h200"]
    tokens = 2 ** 20
    flat = {p: sm.predict(sm.Mode("spava", p), tokens, shape, card) for p in (16, 32, 64)}
    twod = {p: sm.predict(sm.Mode("spava", p, 4), tokens, shape, card) for p in (16, 32, 64)}
    # The passing work per rank ((2W-1) blocks of L/2W rows times L/128 keys) does not shrink with W: flat Spava
    # gains little from 16 to 64 GPUs, and at 64 its budget L/128 covers a block L/128: it is the exact ring.
    assert flat[64].compute_s > 0.8 * flat[16].compute_s
    assert flat[64].flops == sm.predict(sm.Mode("ring", 64), tokens, shape, card).flops
    # The 2-D mode divides that work by U and keeps shrinking; it also moves fewer bytes between nodes.
    assert twod[64].layer_s < 0.5 * flat[64].layer_s and twod[64].layer_s < twod[16].layer_s
    assert twod[64].inter_bytes < flat[64].inter_bytes / 4
    rows = sm.prediction_grid(shape, card, [tokens], [8, 16, 32, 64])
    assert sm.crossover(rows, tokens) == 16  # on one node (8 GPUs) the two are alike


# ---- the model's collectives against what the code sends -------------------------------------------------------------
@contextlib.contextmanager
def _recording():
    """Collectives record what each sends and move nothing (this process is one rank of a fake group), through
    spava_ds's collective hook; the fake group is destroyed at the end."""
    sent = []

    def record(op, out, x, *args, **kwargs):
        name = op.__name__
        kind = "all_gather" if name.startswith("all_gather") else "all_to_all" if name == "all_to_all_single" else name
        sent.append((kind, x.numel() * x.element_size()))

    try:
        with comm.collective_hook(record):
            yield sent
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("mode", [sm.Mode("spava", 4), sm.Mode("ring", 4), sm.Mode("ulysses", 4),
                                  sm.Mode("spava", 8, 2), sm.Mode("ring", 8, 4)])
def test_collectives_are_what_the_code_sends(mode):
    bench_host = _load("bench_host")
    shape = sm.Shape("t", 8, 2, 16, 1, query=8)
    tokens, card = 4096, sm.CARDS["h200"]
    u = mode.ulysses_degree
    with _recording() as sent:
        call, _ = bench_host.make_call(mode.name, tokens, mode.world, u, (shape.heads, shape.kv_heads),
                                       shape.head_dim, shape.query, torch.device("cpu"), torch.bfloat16, u)
        call()
    model = sm.collectives(mode, tokens, shape, card)
    gathers = [c.bytes for c in model if c.kind == "all_gather" and c.group > 1]
    real_gathers = [b for kind, b in sent if kind == "all_gather"]
    if mode.name != "ulysses":
        # the passing halves in bf16; the query partials in fp32 (real: one extra for the LSE per head)
        assert real_gathers[:2] == gathers[:2] and real_gathers[2] == gathers[2], (real_gathers, gathers)
    moved = sum(c.bytes for c in model if c.kind == "all_to_all")
    group = mode.world if mode.name == "ulysses" else u
    real = sum(b for kind, b in sent if kind == "all_to_all") * (group - 1) / group  # less what stays here
    assert moved == pytest.approx(real, rel=0.05 if u == 1 else 0.02) if group > 1 else moved == 0


# ---- the command lines -----------------------------------------------------------------------------------------------
def test_measure_then_validate_and_predict_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "scaling.json"
    assert sm.main(["measure", "--out", str(out), "--device", "cpu", "--tokens", "700", "--heads", "4", "2",
                    "--head-dim", "16", "--query", "7", "--configs", "spava:2", "ring:4", "ulysses:2", "spava:4:2",
                    "ring:4:2", "--calibration-tokens", "64", "256", "--copy-mib", "2", "--iters", "1",
                    "--calls", "1"]) == 0
    data = json.loads(out.read_text())
    kinds = ["causal", "full", "full", "full", "full", "full", "select", "select"]
    assert [r["kind"] for r in data["calibration"]] == kinds * 2 + ["copy"] * 3
    assert sm.calibration_notes(data["calibration"]) == []  # every term has its calibration rows
    assert [(r["mode"], r["world"], r["ulysses_degree"]) for r in data["shares"]] == [
        ("spava", 2, 1), ("ring", 4, 1), ("ulysses", 2, 1), ("spava", 4, 2), ("ring", 4, 2)]
    mesh = MeshLayout(693, 7, 4, SpavaConfig(ulysses_degree=2))
    assert data["shares"][3]["local_tokens"] == mesh.local_len(2)  # inter rank 1, intra rank 0
    assert all(r["seconds"] > 0 for r in data["shares"]) and not dist.is_initialized()
    capsys.readouterr()
    assert sm.main(["validate", "--measured", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("| 700 |") == 5 and "constants fitted on the calibration only" in text
    assert "e2e_2xh200_7b_720p.json | 7b/720p/131072/W2 | ulysses" in text  # the end-to-end comparison
    assert sm.main(["predict", "--shapes", "3b", "--tokens", str(2 ** 20), "--gpus", "8", "64",
                    "--plot", str(tmp_path / "p.png")]) == 0
    text = capsys.readouterr().out
    assert "| 1M | 64 |" in text and "1M tokens: 2-D Spava overtakes flat Spava (by 5% or more) from" in text


def test_measure_with_cuda_graphs_and_cross_validation(tmp_path, capsys):
    out = tmp_path / "graphs.json"
    assert sm.main(["measure", "--out", str(out), "--device", "cpu", "--tokens", "600", "900", "--heads", "4", "2",
                    "--head-dim", "16", "--query", "7", "--configs", "spava:2", "ring:2", "--calibration-tokens",
                    "64", "--copy-mib", "1", "--iters", "1", "--calls", "1", "--cuda-graphs"]) == 0
    data = json.loads(out.read_text())
    assert data["cuda_graphs"] is True and [r["graphs"] for r in data["shares"]] == [False] * 4  # CPU: eager
    capsys.readouterr()
    assert sm.main(["validate", "--measured", str(out), "--cross-validate", "--e2e"]) == 0
    text = capsys.readouterr().out
    assert "shares timed as CUDA graph replays" in text and "## Cross-validation (NOT the verdict" in text
    assert "| 600 | " in text and "| 900 | " in text  # one fold per held-out token count


def test_old_calibration_keeps_the_first_model():
    """A calibration without the new pieces (today's H200 file) predicts as the first model did: the query rows'
    FLOPs at the rectangular rate plus a piece's cost, the selection one read of the keys at the copy bandwidth."""
    data = json.load(open(os.path.join(ROOT, "docs", "results", "scaling_1xh200.json")))
    shape = sm.Shape(**data["shape"])
    card = sm.fit_card(data["calibration"], sm.CARDS["h200"], shape)
    notes = sm.calibration_notes(data["calibration"])
    assert len(notes) == 4 and card.wide_tflops == card.full_tflops and card.pass_us == 0
    w, _ = sm.work(sm.Mode("spava", 4), 2 ** 16, shape)
    lay = sm.zigzag_layout(False, 2 ** 16, 4, shape)
    b1, b2 = (lay.block_len(v) for v in lay.virtual_hosts(1))
    first = dataclasses.replace(w, few_row_keys=0, few_row_pieces=0, scored=0, selections=0)
    first.full_flops += w.few_row_flops
    first.pieces += 1
    first.bytes += (b1 + b2) * shape.kv_heads * shape.head_dim * sm.BF16
    assert w.seconds(card) == pytest.approx(first.seconds(card), rel=1e-9)


@pytest.mark.parametrize("tokens,world", [(1000, 1), (1237, 3), (3001, 4)])
def test_selection_and_query_terms_count_what_the_code_selects(tokens, world):
    """The model selects every block that precedes another (each sends its top-k to later blocks), scoring all of
    its keys for every KV head, and has one few-row piece per rank: the query rows over the rank's key share."""
    shape = sm.Shape("t", 4, 2, 8, 1, query=9)
    lay = sm.zigzag_layout(False, tokens, world, shape)
    scored = selections = 0
    for r in range(world):
        w, _ = sm.zigzag_work(False, tokens, world, shape, shape.heads, shape.kv_heads, r)
        scored, selections = scored + w.scored, selections + w.selections
        share = sum(e - s for s, e, causal in lay.key_share(r) if not causal)
        assert (w.few_row_keys, w.few_row_pieces) == (share, 1)
        assert sm.zigzag_work(True, tokens, world, shape, shape.heads, shape.kv_heads, r)[0].selections == 0
    every_block_but_the_last = range(lay.num_blocks - 1)
    assert selections == len(every_block_but_the_last)
    assert scored == shape.kv_heads * sum(lay.block_len(v) for v in every_block_but_the_last)


def test_calibration_fits_each_new_term():
    rows = [dict(kind="full", rows=48, keys=n, flops=0.0, seconds=3e-5 + n * 30e-9) for n in (4096, 16384)]
    rows += [dict(kind="full", rows=n, keys=4 * n, flops=f, seconds=f / 550e12 + 1e-5)
             for n, f in ((4096, 1e12), (8192, 4e12))]
    rows += [dict(kind="select", keys=n, kv_heads=4, seconds=2e-5 + 4 * n * 5e-9) for n in (4096, 65536)]
    rows += [dict(kind="copy", bytes=b, seconds=3e-6 + b / 4e12) for b in (1e7, 1e9)]
    card = sm.fit_card(rows, sm.CARDS["h200"])
    assert card.query_ns == pytest.approx(30) and card.query_us == pytest.approx(30)
    assert card.wide_tflops == pytest.approx(550) and card.call_us == pytest.approx(10)
    assert card.select_ns == pytest.approx(5) and card.select_us == pytest.approx(20)
    assert card.copy_gbs == pytest.approx(4000) and card.pass_us == pytest.approx(3)


def test_fitted_constants_recover_known_rates():
    rows = [dict(kind="causal", flops=f, seconds=f / 500e12 + 2e-5) for f in (1e12, 4e12, 9e12)]
    rows += [dict(kind="full", flops=f, seconds=f / 650e12 + 1e-5) for f in (1e11, 3e12)]
    rows += [dict(kind="copy", bytes=1e9, seconds=1e9 / 3e12)]
    card = sm.fit_card(rows, sm.CARDS["h200"])
    assert card.causal_tflops == pytest.approx(500) and card.full_tflops == pytest.approx(650)
    assert card.call_us == pytest.approx(15) and card.copy_gbs == pytest.approx(3000)


# ---- the benchmarks' 2-D options -------------------------------------------------------------------------------------
def test_bench_host_runs_the_2d_mode():
    bench_host = _load("bench_host")
    rows, outer = [], []
    with comm.collective_hook(lambda op, *args, **kwargs: outer.append(op)):
        for mode in ("spava", "ring", "ulysses"):
            args = bench_host.main.__globals__["argparse"].Namespace(
                ulysses_degree=2, heads=(4, 2), head_dim=8, query=5, warmup=1, iters=1, top=0, python_profile=0,
                training=False)
            with bench_host.alone():
                rows.append(bench_host.measure(mode, 301, 4, 1, args, torch.device("cpu"), torch.float32))
    mesh = MeshLayout(296, 5, 4, SpavaConfig(ulysses_degree=2))
    assert [r["ulysses_degree"] for r in rows] == [2, 2, 1]  # ulysses stays flat over W
    assert rows[0]["local_tokens"] == rows[1]["local_tokens"] == mesh.local_len(2)
    assert rows[2]["local_tokens"] == ZigzagLayout(296, 5, 4, SpavaConfig(mode="ulysses")).local_len(1)
    assert outer == [] and not dist.is_initialized()  # bench_host's hook took every collective, the group is gone


@pytest.mark.timeout(300)
def test_bench_e2e_runs_the_2d_methods(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "e2e.json"
    env = child_env(OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.join(ROOT, "launch", "bench_e2e.py"), "--tiny", "--methods", "dense", "ring_2d",
                          "spava_2d", "--ulysses-degree", "2", "--out", str(out), "--iters", "1",
                          "--breakdown-methods", "spava_2d"],
                         capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["ring_2d"]["status"] == "ok" and rows["ring_2d"]["logit_rel_diff"] < 1e-5  # exact
    assert rows["spava_2d"]["status"] == "ok" and rows["spava_2d"]["gpus"] == 2
    # Seen through the collective hook: a 1 x 2 mesh has one inter rank (no gathers), so per layer the two intra
    # all-to-alls (q, k, v to heads; the output back) are all there is.
    from test_bench_e2e import _tiny_layers

    for b in rows["spava_2d"]["breakdown_per_rank"]:
        assert b["collectives"] == 2 * _tiny_layers() and b["communication"] > 0, b
    assert "ring x ulysses (2-D, exact)" in res.stdout
