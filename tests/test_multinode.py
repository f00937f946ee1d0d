"""Past one machine: the two-dimensional mode launched as two "nodes" on this machine, and the engine sharded by it.

Two torchrun agents with ``--nnodes 2 --nproc_per_node 2`` meet at a c10d rendezvous on localhost (4 processes in
all, 2 per "node"); each node is one intra group of the 2 x 2 mesh. In one launch (``tests/two_node_job.py``) they
run the attention demo in the 2-D mode, then the inference CLI on the embedded model (ring x Ulysses must give
dense attention's first-token logits). The
deepspeed launcher's hostfile recipe (``--no_ssh --node_rank``) runs the demo as well. In-process, the engine's 2-D
Spava (4 ranks as threads) equals one process simulating flat Spava at the inter size.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dist_utils import _free_port, child_env, run_threaded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_NEW = 4


def _run_nodes(cmds, env, timeout):
    """Start one launcher per node at once; returns each one's (return code, stdout, stderr)."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for c in cmds]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def _two_nodes(script, *args, timeout=240):
    """``script`` under two torchrun agents (node ranks 0 and 1) meeting at a c10d rendezvous on localhost."""
    port = _free_port()
    cmds = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
             "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}",
             "--rdzv-id", f"spava-test-{port}", os.path.join(ROOT, script), *args] for node in (0, 1)]
    return _run_nodes(cmds, child_env(OMP_NUM_THREADS="1"), timeout)


def _deepspeed_two_nodes(hostfile, script, *args, timeout=240):
    """The deepspeed launcher's hostfile recipe without ssh: one ``deepspeed --no_ssh --node_rank i`` per node."""
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    port = str(_free_port())
    cmds = [[launcher, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node), "--master_addr",
             "127.0.0.1", "--master_port", port, "--no_local_rank", os.path.join(ROOT, script), *args]
            for node in (0, 1)]
    return _run_nodes(cmds, child_env(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu"), timeout)


def _value(text, label):
    return float(text.split(label)[1].split()[0])


@pytest.mark.timeout(300)
def test_two_nodes_run_the_2d_attention_and_the_engine():
    runs = _two_nodes("tests/two_node_job.py", "--context-len", "700", "--query-len", "9", "--heads", "4",
                      "--kv-heads", "2", "--head-dim", "16", "--ulysses-degree", "2", "--repeat", "1", "--",
                      "--deepspeed_config", os.path.join(ROOT, "configs", "spava_2d_sp4.json"), "--mode", "ring",
                      "--check", "--max-new-tokens", str(MAX_NEW))
    assert all(code == 0 for code, _, _ in runs), [err[-3000:] for _, _, err in runs]
    out = "".join(o for _, o, _ in runs)  # rank 0 prints, on whichever agent the rendezvous made node 0
    assert "spava on 4 rank(s) (MeshLayout(inter 2 x intra 2" in out, out
    assert _value(out, "max |spava - reference|          :") < 1e-5, out
    assert "mode ring on 4 process(es)" in out and "answer:" in out, out
    assert _value(out, "largest first-token logit difference") < 1e-4, out  # ring x Ulysses is exact


@pytest.mark.timeout(300)
def test_deepspeed_hostfile_without_ssh_runs_the_2d_attention(tmp_path):
    if not os.path.exists(os.path.join(os.path.dirname(sys.executable), "deepspeed")):
        pytest.skip("the deepspeed launcher is not installed")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=2\nnode-b slots=2\n")  # names only: --no_ssh never contacts them
    runs = _deepspeed_two_nodes(hostfile, "launch/demo_attention.py", "--context-len", "700", "--query-len", "9",
                                "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--ulysses-degree", "2",
                                "--mode", "ring", "--repeat", "1")
    assert all(code == 0 for code, _, _ in runs), [err[-2000:] for _, _, err in runs]
    out = "".join(o for _, o, _ in runs)
    assert "ring on 4 rank(s) (MeshLayout(inter 2 x intra 2" in out, out
    assert _value(out, "max |ring - reference|          :") < 1e-5, out  # exact: against dense attention


@pytest.mark.timeout(120)
def test_engine_2d_spava_equals_flat_spava_at_the_inter_size():
    """4 ranks as threads of this process (PyTorch's multi-threaded process group) share one loaded model."""
    pytest.importorskip("transformers")
    from spava_ds import SpavaConfig, comm
    from spava_ds.assets import tiny_model_dir
    from spava_ds.engine import GenerationConfig, SpavaEngine

    from test_engine import _inputs

    dense = SpavaEngine.from_pretrained(tiny_model_dir(), SpavaConfig(mode="dense"), group=comm.SELF,
                                        fused_vision=False)
    model, tokenizer = dense.model, dense.tokenizer

    def rank_answer(rank, world):
        engine = SpavaEngine(model, tokenizer, SpavaConfig(anchor_len=16, passing_len=6, ulysses_degree=2),
                             fused_vision=False)
        answer = engine.generate(_inputs(engine), GenerationConfig(max_new_tokens=MAX_NEW))
        return answer.first_logits, answer.tokens

    per_rank = run_threaded(rank_answer, 4)
    # The tiny model has 2 KV heads = U: no replication, so 2 x 2 is flat Spava over 2 ranks, head by head.
    sim = SpavaEngine(model, tokenizer, SpavaConfig(anchor_len=16, passing_len=6), group=comm.SELF,
                      fused_vision=False, simulate_world=2)
    answer = sim.generate(_inputs(sim), GenerationConfig(max_new_tokens=MAX_NEW))
    for logits, tokens in per_rank:
        assert (logits - answer.first_logits).abs().max().item() < 1e-4
        assert tokens == answer.tokens
    # On random weights the approximation shows: Spava's logits are not dense attention's.
    dense_logits = dense.generate(_inputs(dense), GenerationConfig(max_new_tokens=1)).first_logits
    assert (per_rank[0][0] - dense_logits).abs().max().item() > 1e-4
