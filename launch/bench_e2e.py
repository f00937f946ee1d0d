"""End-to-end time to first token of a long-video question: Spava and the baselines on W GPUs against dense on one.

For Qwen2.5-VL-3B- and 7B-shaped models with random bf16 weights, at 360p and 720p, with frame counts giving about
16K, 32K, 64K and 128K context tokens, one command measures in the same run, on the same cards:

* time to first token (TTFT) = vision encoder + language-model prefill + first token (lm_head, argmax, broadcast),
  median of ``--iters`` runs after ``--warmup`` runs; every run starts after a barrier and ends with a CUDA
  synchronise, and a multi-GPU run counts as long as its slowest rank;
* the language-model prefill alone (the decoder forward, timed with CUDA events inside the same runs), so that no
  speedup in the table comes from the vision side;
* peak GPU memory per rank (``max_memory_allocated``; the weights included);
* for ``--breakdown-methods`` (default: spava) one extra instrumented run that splits the time into vision encoder,
  vision all-gather, embedding, linear layers, the rest of the language model (norms, RoPE, activations),
  attention kernels and merges, passing-block selection, exposed communication and the first token;
* a first-token check: the largest difference of the first token's logits against dense, relative to the largest
  dense logit (exact methods should show bf16 noise only).

Methods (``--methods``; all by default):

====================  ==================================================================================================
``dense``             one GPU (rank 0 alone): the whole video through the vision tower, the language model with SDPA's
                      default backend (cuDNN on H100, the fastest measured; ``dense_flash_attn`` is added when
                      flash-attn imports)
``ring`` ...          ``ring``, ``ulysses``, ``star``, ``apb``, ``spava``: the modes of ``SpavaConfig`` on all GPUs of
                      the job, frame-parallel vision (each GPU encodes about 1/W of the frames)
``torch_cp``          PyTorch's own context parallelism (``torch.distributed.tensor.experimental.context_parallel``,
                      exact ring attention with head-tail load balancing) on every attention layer of the language
                      model (whole-LM integration: the full sequence's embeddings and M-RoPE positions are the CP
                      buffers; SDPA inside is routed to PyTorch's ring); vision is the same frame-parallel encoder
``spava_no_overlap``  ablation: ``SpavaConfig(overlap=False)``, every collective waited on at once
``apb``               is also the "no zigzag" ablation (contiguous blocks, one per rank, twice the passing budget)
``spava_no_fused``    ablation, emulated with the public session API: a Spava prefill of the context with a one-token
                      dummy query (the scorer's query), then a second distributed forward of the real query over the
                      sharded KV cache (exact LSE-merged attention, as Star/APB's separate query pass). Speed only: the
                      query tokens see each other without a causal mask in that pass (same work)
``spava_no_fp``       ablation: no frame parallelism, every rank encodes the whole video
``spava_2d``          (not in the default sweep) the two-dimensional mode: Ulysses inside groups of
``ring_2d``           ``--ulysses-degree`` consecutive GPUs, Spava (ring: exact) over the W / U groups (docs/scaling.md)
====================  ==================================================================================================

Inputs are synthetic: random pixel values of the right grid (no video decoding; the GPU image has no PyAV), the
prompt, grid and positions of the model's family (``spava_ds.models``: its chat template, with the tiny tokenizer of
the family) for a made-up 2 fps video. Qwen frames are resized by Qwen's rule (sides rounded to multiples of 28, 32
for Qwen3-VL; ``--max-pixels`` 0 keeps the native resolution: 640x360 -> 644x364, 1280x720 -> 1288x728); one
temporal step (2 frames) gives (H/28)*(W/28) tokens for Qwen2.5-VL (299 at 360p, 1196 at 720p); InternVL takes one
448x448 tile per frame (256 tokens). The step count is the largest giving at most the target context. Models:
``--models 3b 7b internvl3-2b qwen3-vl-8b`` (random bf16 weights, built on the meta device); ``--share-of W ...``
in one process adds one rank's share of each W, the other ranks stood in for (see ``measure_shares``). The query is padded with newline tokens to a
multiple of 2W tokens (PyTorch's head-tail load balancing needs it). Preprocessing (tokenising, positions, pixels
on the GPU) is outside the timed region for every method.

Run under torchrun, one process per GPU (dense runs on rank 0 while the other ranks wait):

    # 2 GPUs / 4 GPUs: the whole sweep (7B first, 360p first, 128K first); rerun the same command until it prints
    # "all measurements done" (--out gets every measurement as it ends; a rerun skips what is there)
    torchrun --standalone --nproc_per_node 2 launch/bench_e2e.py --out .bench/e2e_2gpu.json --time-budget 420
    torchrun --standalone --nproc_per_node 4 launch/bench_e2e.py --out .bench/e2e_4gpu.json --time-budget 420

    # the plot (CPU, needs matplotlib) and the tables again from one or more result files
    python launch/bench_e2e.py --plot .bench/e2e_2gpu.json .bench/e2e_4gpu.json --plot-out docs/bench_e2e.png

    # CPU smoke test of every code path: the embedded tiny checkpoint, tiny synthetic inputs, gloo
    torchrun --standalone --nproc_per_node 2 launch/bench_e2e.py --tiny --out /tmp/bench_e2e_tiny.json

On the lent GPU machines (10 minutes a command, each machine starts bare) keep --out in a folder that
``.git/info/exclude`` ignores, carry it, and copy it to $OUT at the end of every command; put the returned files
back into that folder before the next call (see docs/benchmarks.md, "End-to-end benchmark: how to run").

An out-of-memory error in dense (one GPU) skips that measurement with a message. One in a multi-GPU method cannot
be recovered (the other ranks wait in a collective): the process exits, torchrun stops the job, and the
measurement stays marked "running" in --out; the next run retries it once (the job may have been stopped by a time
limit) and after a second failure marks it "crashed" and goes on. ``--max-context`` caps the contexts;
``--time-budget`` starts no measurement once that many seconds have passed, or when the slowest run seen so far
times (warm-ups + iterations + 1) would overrun it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast on the lent machines (GPU.md)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

LAUNCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(LAUNCH))
sys.path.insert(0, LAUNCH)

RESOLUTIONS = {"360p": (640, 360), "720p": (1280, 720), "1080p": (1920, 1080)}
DEFAULT_CONTEXTS = [131072, 65536, 32768, 16384]
ALL_METHODS = ["dense", "spava", "ring", "torch_cp", "apb", "ulysses", "star", "spava_no_overlap", "spava_no_fused",
               "spava_no_fp"]
MESH_METHODS = ["spava_2d", "ring_2d"]  # on request (--methods): the two-dimensional mode, --ulysses-degree per group
LABELS = {
    "dense": "dense, 1 GPU (SDPA)", "dense_flash_attn": "dense, 1 GPU (flash-attn)", "spava": "spava",
    "ring": "ring (ours, exact)", "torch_cp": "PyTorch context_parallel (exact ring)", "apb": "apb (= spava -zigzag)",
    "ulysses": "ulysses (exact)", "star": "star", "spava_no_overlap": "spava -overlap",
    "spava_no_fused": "spava -fused query pass (emulated)", "spava_no_fp": "spava -frame parallelism",
    "spava_2d": "spava x ulysses (2-D)", "ring_2d": "ring x ulysses (2-D, exact)",
}
GRAPH_SETTINGS = {"auto": "auto", "on": True, "off": False}  # --cuda-graphs -> SpavaConfig.cuda_graphs
QUESTION = "What is in this video?"
BREAKDOWN_KEYS = [
    ("vision", "vision encoder"), ("vision_gather", "vision all-gather"), ("embed", "embedding + scatter"),
    ("linear", "linear layers"), ("lm_other", "other LM ops (norms, RoPE, act.)"),
    ("attn_kernels", "attention kernels + merges"), ("selection", "selection"),
    ("communication", "communication (exposed)"), ("head", "first token"), ("gaps", "unattributed"),
]


def parse_context(text: str) -> int:
    t = text.strip().lower()
    return int(float(t[:-1]) * 1024) if t.endswith("k") else int(t)


def parse_resolution(name: str):
    if name in RESOLUTIONS:
        return RESOLUTIONS[name]
    w, h = name.lower().split("x")
    return int(w), int(h)


def context_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def log(*a):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Timing: CUDA events on GPUs, the wall clock on the CPU (where every op is synchronous)
# ----------------------------------------------------------------------------------------------------------------

class Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)


class Probe:
    """Spans recorded through spava_ds's seams (``probes``) while ``on`` (the breakdown run only)."""

    def __init__(self):
        self.on = False
        self.clock: Optional[Clock] = None
        self.records: List[tuple] = []
        self.in_attention = 0
        self.in_vision = 0
        self.collectives = 0  # collectives launched inside attention

    @contextlib.contextmanager
    def span(self, category: Optional[str]):
        if not self.on or category is None:
            yield
            return
        a = self.clock.mark()
        try:
            yield
        finally:
            self.records.append((category, a, self.clock.mark()))

    def totals(self) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for cat, a, b in self.records:
            out[cat] = out.get(cat, 0.0) + self.clock.seconds(a, b)
        return out


PROBE = Probe()


class Route:
    """Where the language model's attention goes: Spava's session (default), PyTorch CP, or flash-attn dense."""
    name = "spava"
    cp_gqa = "repeat"


def _bench_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Registered as the "spava" attention of the language model: routes, and times the call when probing."""
    from spava_ds.integrations.transformers import spava_attention_forward

    PROBE.in_attention += 1
    try:
        with PROBE.span("attention"):
            if Route.name == "torch_cp":
                return _cp_attention(query, key, value, scaling)
            if Route.name == "flash_attn":
                from flash_attn import flash_attn_func

                out = flash_attn_func(*(t.transpose(1, 2) for t in (query, key, value)), softmax_scale=scaling,
                                      causal=True)
                return out, None
            return spava_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    finally:
        PROBE.in_attention -= 1


def _cp_attention(query, key, value, scaling):
    """Causal SDPA on this rank's CP shard; inside ``context_parallel`` PyTorch turns it into its ring attention.

    ``torch.nn.functional.scaled_dot_product_attention`` is looked up at call time: ``context_parallel`` patches
    it. KV heads are repeated (``--cp-gqa repeat``, the safe default) or passed with ``enable_gqa``.
    """
    hq, hkv = query.shape[1], key.shape[1]
    kw = {}
    if hq != hkv:
        if Route.cp_gqa == "repeat":
            key, value = (t.repeat_interleave(hq // hkv, dim=1) for t in (key, value))
        else:
            kw["enable_gqa"] = True
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, **kw)
    return out.transpose(1, 2), None


def install_attention():
    """(Re)register the routing wrapper under the name "spava" (``spava_attn_implementation`` registers the plain
    function again whenever it is called, e.g. when a model is built)."""
    from transformers import AttentionInterface

    from spava_ds.integrations.transformers import register

    register()  # the mask function (none) stays Spava's
    AttentionInterface.register("spava", _bench_attention)


class _TimedWork:
    """A collective's work handle whose ``wait()`` (the exposed part of an async collective) is a span."""

    def __init__(self, work, category: Optional[str]):
        self.work, self.category = work, category

    def wait(self):
        with PROBE.span(self.category):
            return self.work.wait()


def _timed_collective(op, *args, **kwargs):
    """spava_ds's collective hook: the launch of each collective (a synchronous one with its wait) and the wait
    of an asynchronous one count as communication inside attention, as the vision all-gather inside the vision
    encoder; anything else is not counted."""
    category = "communication" if PROBE.in_attention else "vision_gather" if PROBE.in_vision else None
    PROBE.collectives += PROBE.on and category == "communication"
    with PROBE.span(category):
        work = op(*args, **kwargs)
    return _TimedWork(work, category) if work is not None else None


@contextlib.contextmanager
def _timed_step(name: str):
    """spava_ds's span hook: the passing-block selection is reported on its own; every step stays a profiler range
    (for --trace)."""
    with torch.profiler.record_function(name), PROBE.span("selection" if name == "spava.select" else None):
        yield


@contextlib.contextmanager
def probes(decoder):
    """The breakdown's probes: spava_ds's collective and span hooks, and forward hooks timing the linear layers."""
    from spava_ds import comm, profiling

    stack: List = []

    def pre(mod, args):
        if PROBE.on:
            stack.append(PROBE.clock.mark())

    def post(mod, args, out):
        if PROBE.on and stack:
            PROBE.records.append(("linear", stack.pop(), PROBE.clock.mark()))

    handles = []
    for m in decoder.modules():
        if isinstance(m, torch.nn.Linear):
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
    try:
        with comm.collective_hook(_timed_collective), profiling.span_hook(_timed_step):
            yield
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------------------------------------------
# Model and inputs
# ----------------------------------------------------------------------------------------------------------------

TINY_FAMILIES = {"tiny-qwen3-vl": "qwen3_vl", "tiny-internvl": "internvl"}  # CPU runs of the other families
SHAPE_LABELS = {"3b": "Qwen2.5-VL-3B", "7b": "Qwen2.5-VL-7B", "internvl3-2b": "InternVL3-2B",
                "qwen3-vl-8b": "Qwen3-VL-8B", "tiny": "tiny Qwen2.5-VL", "tiny-qwen3-vl": "tiny Qwen3-VL",
                "tiny-internvl": "tiny InternVL3"}


def shape_tokenizer(shape: str):
    """The tokenizer of a shape's prompts: the tiny one of its family (its special tokens and chat template)."""
    import make_tiny_model
    from bench_engine import shape_tokenizer as published

    if shape in TINY_FAMILIES:
        spec = make_tiny_model.FAMILIES[TINY_FAMILIES[shape]]
        return make_tiny_model.build_tokenizer(spec["specials"], spec["template"])
    return make_tiny_model.build_tokenizer() if shape == "tiny" else published(shape)


def build_model(shape: str, tokenizer, device: torch.device):
    """A random-weight model of a published shape (``launch/bench_engine.py``: built on the meta device, initialised
    on the GPU), the embedded tiny checkpoint (``tiny``) or a tiny random model of another family (``tiny-...``)."""
    from spava_ds.integrations.transformers import spava_attn_implementation
    from spava_ds.models import family_class, family_of

    if shape == "tiny":
        from spava_ds.assets import tiny_model_dir
        from spava_ds.models import load

        model = load(tiny_model_dir(), torch.device("cpu"), torch.float32, tokenizer=False)[0].eval()
    elif shape in TINY_FAMILIES:
        import make_tiny_model

        config = make_tiny_model.build_family_config(TINY_FAMILIES[shape], tokenizer)
        model = family_class(config.model_type).model_class()._from_config(
            config, dtype=torch.float32, attn_implementation=spava_attn_implementation(config)).eval()
        make_tiny_model.init_weights(model)
    else:
        from bench_engine import build_model as build_shaped

        model = build_shaped(shape, tokenizer, device)
    family_of(model).fuse_vision_attention()  # the same (fastest) vision attention for every method, dense included
    install_attention()
    return model


@dataclasses.dataclass
class Case:
    model: str
    resolution: str
    size: tuple            # (W, H) after the resize
    target: int
    steps: int
    frames: int
    ids: torch.Tensor      # [1, S] (CPU)
    positions: torch.Tensor  # [3, 1, S] or [1, S] (CPU)
    context_len: int
    query_len: int
    grid: torch.Tensor     # [[t, h, w]] (device)
    pixels: Optional[torch.Tensor] = None  # the whole video, as the model takes it (device)


def case_key(shape: str, resolution: str, target: int, world: int) -> str:
    """One measurement point; the GPU count is part of it (the query is padded to a multiple of 2W)."""
    return f"{shape}/{resolution}/{target}/W{world}"


def synthetic_plan(family, width: int, height: int, steps: int, args):
    """The ``VideoPlan`` of a video of ``steps`` temporal steps at ``width`` x ``height`` and 2 fps, every frame
    kept, from made-up metadata: the family's own sampling and resize rules (``--min-pixels``/``--max-pixels``)."""
    from spava_ds.video import VideoMetadata

    frames = steps * family.frames_per_step
    meta = VideoMetadata("synthetic", width, height, 2.0, frames / 2.0, frames, None, (0,))
    settings = dict(family.default_video_settings, min_pixels=args.min_pixels,
                    max_pixels=args.max_pixels if args.max_pixels > 0 else 1 << 40)
    return family.plan(meta, settings, fps=2.0, max_frames=frames)


def plan_size(family, resolution: str, args) -> list:
    width, height = parse_resolution(resolution)
    plan = synthetic_plan(family, width, height, 1, args)
    return [plan.resized_width, plan.resized_height]


def make_case(model, tokenizer, shape, resolution, target, world, args, device, dtype) -> Case:
    """The family's prompt (its chat template) for the largest video at ``resolution`` within ``target`` tokens,
    the query padded with newlines to a multiple of 2W, and random pixels of every frame on ``device``."""
    from spava_ds.models import family_of

    family = family_of(model, tokenizer)
    width, height = parse_resolution(resolution)
    one, two = (family.plan_prompt(synthetic_plan(family, width, height, n, args), QUESTION)["input_ids"].shape[1]
                for n in (1, 2))
    per_step = two - one  # a step's tokens: its features, and its timestamp or frame line where the family writes one
    steps = max(world, (target - (one - per_step)) // per_step)
    plan = synthetic_plan(family, width, height, steps, args)
    prompt = family.plan_prompt(plan, QUESTION)
    ids = prompt["input_ids"][0].tolist()
    context = prompt["context_len"]
    pad = -len(ids) % (2 * world)  # PyTorch CP's head-tail split needs a multiple of 2W
    ids = torch.tensor([ids[:context] + tokenizer("\n", add_special_tokens=False)["input_ids"][:1] * pad +
                        ids[context:]])
    positions = family.positions(ids, video_grid_thw=prompt["video_grid_thw"],
                                 second_per_grid_t=plan.second_per_grid_t)
    gen = torch.Generator(device=device).manual_seed(1234 + target)
    width = 3 * plan.temporal_patch_size * plan.patch_size ** 2
    rows = torch.randn(plan.num_steps * plan.rows_per_step, width, generator=gen, device=device)
    return Case(shape, resolution, (plan.resized_width, plan.resized_height), target, steps,
                len(plan.frame_indices), ids, positions, context, ids.shape[1] - context,
                prompt["video_grid_thw"].to(device), family.model_pixels(rows.to(dtype)))


# ----------------------------------------------------------------------------------------------------------------
# One method: the prepared (untimed) state and one timed time-to-first-token run
# ----------------------------------------------------------------------------------------------------------------

class Runner:
    def __init__(self, model, case: Case, method: str, device, clock: Clock, rank: int, world: int, args):
        from spava_ds import MODE_TABLE, MeshLayout, SpavaConfig, ZigzagLayout, comm, make_layout
        from spava_ds.integrations.transformers import text_decoder
        from spava_ds.models import family_of
        from spava_ds.models.base import visual_slots

        self.model, self.case, self.method, self.device, self.clock = model, case, method, device, clock
        self.decoder, self.lm_head = text_decoder(model), model.get_output_embeddings()
        self.family = family_of(model)
        self.args = args
        single = method.startswith("dense")
        self.group = comm.SELF if single else None
        self.attention_group = self.group
        self.rank, self.world = (0, 1) if single else (rank, world)
        self.frame_parallel = self.world > 1 and method != "spava_no_fp"
        mode = {"dense_flash_attn": "dense", "torch_cp": "ring", "spava_no_overlap": "spava",
                "spava_no_fused": "spava", "spava_no_fp": "spava",
                "spava_2d": "spava", "ring_2d": "ring"}.get(method, method)
        budget = {}
        scale = MODE_TABLE[mode].passing_scale  # apb: twice, as its default rule does; star: none
        if args.passing_len is not None and scale:
            budget = dict(passing_len=args.passing_len * scale)
        self.config = SpavaConfig(mode=mode, overlap=method != "spava_no_overlap",
                                  ulysses_degree=args.ulysses_degree if method in MESH_METHODS else 1,
                                  cuda_graphs=GRAPH_SETTINGS[args.cuda_graphs], **budget)
        self.route = {"torch_cp": "torch_cp", "dense_flash_attn": "flash_attn"}.get(method, "spava")
        vid = case.ids == self.family.feature_token_id
        S = case.ids.shape[1]
        self.holder = 0  # the rank whose last local row is the sequence's last token
        if self.route == "torch_cp":
            self.mesh = get_mesh(device.type, world)
            self.ids_full = case.ids.to(device)
            self.pos_full = case.positions.to(device)
            self.slots = visual_slots(vid, lambda x, dim=1: x.to(device))
            self.holder = self._cp_holder(S)
            return
        if method == "spava_no_fused":
            # pass 1: the context with a one-token dummy query (the first query token) for the scorer
            n1 = case.context_len + 1
            self.layout = ZigzagLayout(case.context_len, 1, self.world, self.config)
            ids, pos, vid1 = case.ids[:, :n1], case.positions[..., :n1], vid[:, :n1]
            self.query_ids = case.ids[:, case.context_len:].to(device)
            self.query_pos = case.positions[..., case.context_len:].to(device)
        else:
            self.layout = make_layout(case.context_len, case.query_len, self.world, self.config)
            ids, pos, vid1 = case.ids, case.positions, vid
            if isinstance(self.layout, MeshLayout):  # attention's group is the mesh; the last token has one holder
                self.attention_group = get_mesh(device.type, world, self.config.ulysses_degree)
                self.holder = self.layout.last_token_rank()
        lay = self.layout
        self.local_ids = lay.shard(ids, self.rank).to(device)
        self.local_pos = lay.shard(pos, self.rank, dim=pos.dim() - 1).to(device)
        self.slots = visual_slots(vid1, lambda x, dim=1: lay.shard(x, self.rank, dim).to(device))

    # -- pieces ---------------------------------------------------------------------------------------------------
    def _features(self):
        """The visual features (and Qwen3-VL's DeepStack fields) of the whole video on every rank of the method."""
        from spava_ds import comm

        c = self.case
        PROBE.in_vision += 1
        try:
            with PROBE.span("vision_total"):
                return self.family.encode_pixels(c.pixels, c.grid, self.group if self.frame_parallel else comm.SELF)
        finally:
            PROBE.in_vision -= 1

    def _broadcast(self, token: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.broadcast(token, src=self.holder)
        return token

    @torch.no_grad()
    def run(self) -> dict:
        """One time-to-first-token run; returns the seconds of each segment on this rank, and the first logits."""
        from spava_ds.integrations.transformers import spava_session
        from spava_ds.models.base import scatter_features

        Route.name, Route.cp_gqa = self.route, self.args.cp_gqa
        clock = self.clock
        if self.world > 1:
            dist.barrier()
        clock.sync()
        wall0 = time.perf_counter()
        m0 = clock.mark()
        fields = self._features()
        embed = self.decoder.embed_tokens
        embeds = scatter_features(embed(self.ids_full if self.route == "torch_cp" else self.local_ids), fields[0],
                                  self.slots)
        extras = self.family.decoder_extras(fields, self.slots)  # Qwen3-VL: this rank's DeepStack rows
        del fields
        m1 = clock.mark()
        if self.route == "torch_cp":
            hidden = self._cp_forward(embeds)
        else:
            keep = self.method == "spava_no_fused"
            with spava_session(self.layout, self.config, self.attention_group, keep_cache=keep) as session:
                hidden = self.decoder(inputs_embeds=embeds, position_ids=self.local_pos, use_cache=False,
                                      **extras).last_hidden_state
                if keep:  # the separate query pass over the sharded KV cache
                    del hidden
                    session.decode()
                    hidden = self.decoder(inputs_embeds=embed(self.query_ids), position_ids=self.query_pos,
                                          use_cache=False).last_hidden_state
        del embeds
        m2 = clock.mark()
        logits = self.lm_head(hidden[:, -1]).float()[0]
        del hidden
        token = self._broadcast(logits.argmax().reshape(1))
        m3 = clock.mark()
        clock.sync()
        wall = time.perf_counter() - wall0
        return dict(wall=wall, vision=clock.seconds(m0, m1), lm=clock.seconds(m1, m2), head=clock.seconds(m2, m3),
                    total=clock.seconds(m0, m3), logits=logits, token=int(token))

    def _cp_forward(self, embeds):
        from torch.distributed.tensor.experimental import context_parallel

        pos = self.pos_full.clone()
        buffers = [embeds, pos]
        with _cp_backend(self.device, self.args.cp_backend), \
                context_parallel(self.mesh, buffers=buffers, buffer_seq_dims=[1, 2],
                                 no_restore_buffers=set(buffers)):
            return self.decoder(inputs_embeds=embeds, position_ids=pos, use_cache=False).last_hidden_state

    def _cp_holder(self, S: int) -> int:
        """The rank whose CP shard ends with the sequence's last token (rank 0 under head-tail balancing): shard
        the token indices the way context_parallel shards the buffers, untimed."""
        from torch.distributed.tensor.experimental import context_parallel

        gidx = torch.arange(S, device=self.device)[None]
        with context_parallel(self.mesh, buffers=[gidx], buffer_seq_dims=[1], no_restore_buffers={gidx}):
            pass
        mine = torch.tensor([self.rank if int(gidx[0, -1]) == S - 1 else -1], device=self.device)
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        if int(mine) < 0:
            raise RuntimeError("torch_cp: no rank's shard ends with the sequence's last token")
        return int(mine)


@contextlib.contextmanager
def _cp_backend(device, backend: str):
    if device.type != "cuda" or backend == "auto":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]
    with sdpa_kernel([which]):
        yield


_MESHES: Dict[tuple, object] = {}


def get_mesh(device_type: str, world: int, ulysses_degree: int = 0):
    """One device mesh over the job, made once: 1-D for PyTorch CP, or the 2-D mode's (``ulysses_degree`` > 0)."""
    if (device_type, world, ulysses_degree) not in _MESHES:
        from torch.distributed.device_mesh import init_device_mesh

        from spava_ds import comm

        _MESHES[device_type, world, ulysses_degree] = (comm.init_mesh(ulysses_degree, device_type) if ulysses_degree
                                                       else init_device_mesh(device_type, (world,)))
    return _MESHES[device_type, world, ulysses_degree]


def install_cpu_cp_shim(world: int) -> Optional[str]:
    """CPU only (the --tiny test): PyTorch's CP dispatches the CUDA SDPA ops to its ring attention; register the
    CPU flash op the same way, onto PyTorch's own ``_templated_ring_attention``. Returns an error text if the
    internals differ. Never used on GPUs."""
    try:
        from torch.distributed.tensor import DTensor, Shard
        try:
            from torch.distributed.tensor.experimental._context_parallel import _attention as cpa
        except ImportError:
            from torch.distributed.tensor.experimental import _attention as cpa
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default

        def handler(op_call, args, kwargs):
            mesh = get_mesh("cpu", world)
            local = [a.to_local() if isinstance(a, DTensor) else a for a in args]
            rest = dict(zip(["dropout_p", "is_causal"], local[3:]))
            rest.update({k: (v.to_local() if isinstance(v, DTensor) else v) for k, v in kwargs.items()})
            causal = rest.pop("is_causal", False)
            outs = cpa._templated_ring_attention(mesh.get_group(), 2, op, *local[:3], is_causal=causal, **rest)
            return tuple(DTensor.from_local(t, mesh, [Shard(2)], run_check=False) for t in outs[:2])

        cpa.custom_ops = {**cpa.custom_ops, op: handler}
        return None
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------------------------------------------
# Measuring, results file, tables
# ----------------------------------------------------------------------------------------------------------------

class Results:
    """The --out JSON (rank 0 writes it after every measurement) and the dense first-token logits beside it."""

    def __init__(self, path: str, fresh: bool, meta: dict, rank: int):
        self.path, self.rank = path, rank
        self.data = {"meta": meta, "results": []}
        self.logits: Dict[str, torch.Tensor] = {}
        if os.path.exists(path) and not fresh:
            with open(path, encoding="utf-8") as f:
                self.data = json.load(f)
            self.data.setdefault("runs", []).append(meta)
            for r in self.data["results"]:
                if r.get("status") == "running":  # the job ended during it: a time limit, or out of memory
                    if r.get("attempts", 1) >= 2:
                        r["status"] = "crashed"
                        r["message"] = (f"the job ended during this measurement {r.get('attempts')} times "
                                        "(out of memory on a rank?); not retried")
                    else:
                        r["status"] = "interrupted"  # retried once
            if os.path.exists(self.logits_path):
                self.logits = torch.load(self.logits_path)
        else:
            self.data["runs"] = [meta]

    @property
    def logits_path(self) -> str:
        return self.path + ".dense_logits.pt"

    def find(self, key: str, method: str) -> Optional[dict]:
        for r in self.data["results"]:
            if r["case"] == key and r["method"] == method:
                return r
        return None

    def done(self, key: str, method: str) -> bool:
        r = self.find(key, method)
        return r is not None and r.get("status") != "interrupted"

    def put(self, entry: dict):
        old = self.find(entry["case"], entry["method"])
        if old is not None:
            self.data["results"].remove(old)
        self.data["results"].append(entry)
        self.save()

    def save(self):
        if self.rank != 0:
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)
        if self.logits:
            torch.save(self.logits, self.logits_path)


def agree(value: float, device, op=dist.ReduceOp.MAX) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return float(t)


def gather_floats(values: List[float], device) -> List[List[float]]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


def breakdown(runner: Runner, clock: Clock, trace_path: Optional[str]) -> dict:
    """One instrumented run (after the timed ones, so the probes cost them nothing): the spans, from this rank."""
    PROBE.on, PROBE.clock, PROBE.records, PROBE.collectives = True, clock, [], 0
    prof = None
    if trace_path:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if clock.cuda else [])
        prof = profile(activities=acts)
        prof.__enter__()
    try:
        with probes(runner.decoder):
            seg = runner.run()
    finally:
        PROBE.on = False
        if prof is not None:
            prof.__exit__(None, None, None)
    clock.sync()
    t = PROBE.totals()
    PROBE.records = []
    attn = t.get("attention", 0.0)
    sel, com = t.get("selection", 0.0), t.get("communication", 0.0)
    vis_total = t.get("vision_total", 0.0)
    vg = t.get("vision_gather", 0.0)
    out = dict(vision=vis_total - vg, vision_gather=vg, embed=seg["vision"] - vis_total,
               linear=t.get("linear", 0.0), lm_other=seg["lm"] - attn - t.get("linear", 0.0),
               attn_kernels=attn - sel - com, selection=sel, communication=com, head=seg["head"])
    out["gaps"] = seg["total"] - sum(out.values())
    out["attention"] = attn
    out["total"] = seg["total"]
    out["collectives"] = PROBE.collectives
    if prof is not None:
        prof.export_chrome_trace(trace_path)
        nccl = 0.0
        for evt in prof.key_averages():
            if "nccl" in evt.key.lower():
                nccl += getattr(evt, "self_device_time_total", getattr(evt, "self_cuda_time_total", 0.0))
        out["nccl_kernels_total"] = nccl / 1e6  # microseconds -> seconds; overlapped time included
    return out


def measure(runner: Runner, args, clock: Clock, device, dense_logits: Optional[torch.Tensor], trace: Optional[str],
            want_breakdown: bool) -> dict:
    """Warm-up, check, timed runs (and the breakdown run) of one method on the ranks that run it."""
    first = runner.run()  # warm-up 1 (compiles, plans) and the logits check
    if runner.holder != 0 and runner.world > 1:  # the first token's logits live on the holder
        dist.broadcast(first["logits"], src=runner.holder)
    for _ in range(max(1, args.warmup) - 1):
        runner.run()
    runs = [runner.run() for _ in range(args.iters)]
    entry = {}
    for k in ("wall", "vision", "lm", "head", "total"):
        per_iter = [agree(r[k], device) if runner.world > 1 else r[k] for r in runs]  # the slowest rank
        entry[k + "_all"] = per_iter
        entry[k] = statistics.median(per_iter)
    entry["ttft"], entry["ttft_all"] = entry["wall"], entry["wall_all"]  # wall clock, barrier to synchronise
    if want_breakdown:
        bd = breakdown(runner, clock, trace)
        keys = sorted(bd)
        per_rank = gather_floats([bd[k] for k in keys], device) if runner.world > 1 else [[bd[k] for k in keys]]
        entry["breakdown_per_rank"] = [dict(zip(keys, v)) for v in per_rank]
    logits = first["logits"].cpu()
    entry["first_token"] = first["token"]
    if dense_logits is not None:
        diff = (logits - dense_logits).abs().max().item()
        entry["logit_max_abs_diff"] = diff
        entry["logit_rel_diff"] = diff / max(dense_logits.abs().max().item(), 1e-30)
        entry["same_first_token"] = bool(first["token"] == int(dense_logits.argmax()))
    entry["_logits"] = logits
    return entry


def free_memory(device):
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def method_label(r: dict) -> str:
    """A results row's method as the tables say it (a ``--share-of`` row: one rank of W, alone)."""
    method = r["method"].split("@")[0]
    label = LABELS.get(method, method)
    if "share_of" in r:
        label += f", rank {r.get('share_rank', 1)} of {r['share_of']} alone (no communication)"
    return label


def fmt(x, spec=".3f", none="-"):
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def tables(data: dict) -> str:
    """Markdown: per model/resolution, the methods at every context; then Spava's breakdown."""
    results = [r for r in data["results"] if "case" in r]
    lines = []
    metas = data.get("runs") or [data.get("meta", {})]
    m = metas[-1]
    groups = []
    for r in results:
        g = (r["model"], r["resolution"], r.get("gpus_job"))
        if g not in groups:
            groups.append(g)
    for model, res, gpus in groups:
        rows = [r for r in results if (r["model"], r["resolution"], r.get("gpus_job")) == (model, res, gpus)]
        size = rows[0].get("size")
        lines.append(f"\n### {SHAPE_LABELS.get(model, model)} shape, {res} ({size[0]}x{size[1]} after resize), "
                     f"{gpus} GPU(s) in "
                     f"the job; {m.get('card', '?')}; {m.get('date', '')}")
        lines.append("TTFT = vision + LM prefill + first token, median of the runs; speedups against the fastest "
                     "dense row at the same context; memory = peak per rank (weights included), max over ranks.")
        lines.append("")
        lines.append("| context | frames | method | GPUs | TTFT (s) | speedup | vision (s) | LM prefill (s) | "
                     "LM speedup | peak mem (GiB) | first-token logits vs dense (rel.) |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        targets = sorted({r["target"] for r in rows})
        for target in targets:
            at = [r for r in rows if r["target"] == target]
            dense = [r for r in at if r["method"].startswith("dense") and r.get("status") == "ok"]
            d_ttft = min((r["ttft"] for r in dense), default=None)
            d_lm = min((r["lm"] for r in dense), default=None)
            order = {name: i for i, name in enumerate(["dense", "dense_flash_attn"] + ALL_METHODS)}
            if all(r.get("status") == "skipped" for r in at):  # one line for a target skipped as a whole
                lines.append(f"| ~{context_label(target)} | | all methods | | skipped: {at[0].get('message', '')} "
                             "| | | | | | |")
                continue
            for r in sorted(at, key=lambda r: (r.get("share_of", 0), order.get(r["method"].split("@")[0], 99))):
                label = method_label(r)
                ctx = f"{r.get('context_tokens', '?')} (~{context_label(target)})"
                if r.get("status") != "ok":
                    lines.append(f"| {ctx} | {r.get('frames', '')} | {label} | {r.get('gpus', '')} | "
                                 f"{r.get('status')}: {r.get('message', '')} | | | | | | |")
                    continue
                sp = f"{d_ttft / r['ttft']:.2f}x" if d_ttft else "-"
                lsp = f"{d_lm / r['lm']:.2f}x" if d_lm else "-"
                mem = max(r["peak_mem_gib"]) if r.get("peak_mem_gib") else float("nan")
                check = "-"
                if "logit_rel_diff" in r:
                    check = f"{r['logit_rel_diff']:.1e}" + ("" if r.get("same_first_token") else " (other token)")
                lines.append(f"| {ctx} | {r['frames']} | {label} | {r['gpus']} | {r['ttft']:.3f} | {sp} | "
                             f"{r['vision']:.3f} | {r['lm']:.3f} | {lsp} | {fmt(mem, '.1f')} | {check} |")
        bds = [r for r in rows if r.get("breakdown_per_rank") and r.get("status") == "ok"]
        if bds:
            lines.append("")
            lines.append("Breakdown of one instrumented run (seconds on the default stream of the slowest rank, "
                         "CUDA events; communication = time the GPU waited for a collective):")
            lines.append("")
            lines.append("| context | method | " + " | ".join(lbl for _, lbl in BREAKDOWN_KEYS) + " | total |")
            lines.append("|---|---|" + "---|" * (len(BREAKDOWN_KEYS) + 1))
            for r in sorted(bds, key=lambda r: (r["target"], r["method"])):
                slow = max(r["breakdown_per_rank"], key=lambda b: b["total"])
                cells = " | ".join(f"{slow.get(k, 0.0):.3f}" for k, _ in BREAKDOWN_KEYS)
                lines.append(f"| ~{context_label(r['target'])} | {LABELS.get(r['method'], r['method'])} | {cells} | "
                             f"{slow['total']:.3f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# The plot (CPU, separate step)
# ----------------------------------------------------------------------------------------------------------------

def plot(paths: List[str], out: str) -> int:
    datas = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            datas.append(json.load(f))
    for d in datas:
        print(tables(d))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not importable here: install it (pip install matplotlib) and rerun --plot; "
              f"no PNG written ({out})")
        return 0
    # one row of panels per (model, resolution, GPUs in the job, card): ratios only within one run on one card
    series: Dict[tuple, Dict[str, list]] = {}
    for d in datas:
        card = d.get("meta", {}).get("card", "")
        results = [r for r in d["results"] if r.get("status") == "ok"]
        for r in results:
            if r["method"].startswith("dense"):
                continue
            dense = [x for x in results if x["case"] == r["case"] and x["method"].startswith("dense")
                     and x.get("gpus_job") == r.get("gpus_job")]
            if not dense:
                continue
            panel = (r["model"], r["resolution"], r["gpus"], card)
            s = series.setdefault(panel, {}).setdefault(r["method"], [])
            s.append((r["context_tokens"], min(x["ttft"] for x in dense) / r["ttft"],
                      min(x["lm"] for x in dense) / r["lm"]))
    if not series:
        print("nothing to plot (no method with a dense baseline at the same context)")
        return 0
    panels = sorted(series)
    methods = sorted({m for panel in panels for m in series[panel]})
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}  # one colour per method everywhere
    fig, axes = plt.subplots(len(panels), 2, figsize=(13, 4.2 * len(panels)), squeeze=False)
    for row, panel in enumerate(panels):
        model, resolution, gpus, card = panel
        for col, (idx, what) in enumerate(((1, "time to first token"), (2, "LM prefill only"))):
            ax = axes[row][col]
            for method, pts in sorted(series[panel].items()):
                pts = sorted(pts)
                full = method in ("spava", "ring", "ulysses", "star", "apb", "torch_cp")
                ax.plot([p[0] for p in pts], [p[idx] for p in pts], "-o" if full else "--.",
                        lw=2.5 if method == "spava" else 1.2, color=colours[method],
                        label=LABELS.get(method, method))
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xscale("log", base=2)
            ticks = sorted({p[0] for pts in series[panel].values() for p in pts})
            ax.set_xticks(ticks, [f"{t / 1024:.0f}K" if t >= 1024 else str(t) for t in ticks])
            ax.minorticks_off()
            ax.set_xlabel("context tokens")
            ax.set_ylabel("speedup vs dense on 1 GPU")
            ax.set_title(f"{model} shape, {resolution}, {gpus} GPUs ({card}): {what}", fontsize=10)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("bench_e2e: speedup against dense attention on one GPU of the same machine")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (4.2 * len(panels))))  # room for the suptitle
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None,
                   help="3b, 7b, internvl3-2b, qwen3-vl-8b; on the CPU tiny, tiny-qwen3-vl, tiny-internvl "
                        "(default: 7b 3b; --tiny: tiny)")
    p.add_argument("--resolutions", nargs="+", default=None,
                   help="360p, 720p, 1080p or WxH (default: 360p 720p; --tiny: 112x112)")
    p.add_argument("--contexts", nargs="+", default=None,
                   help="target context tokens, e.g. 128K 64K 32K 16K (the default, in this order); --tiny: 320")
    p.add_argument("--max-context", type=parse_context, default=None, help="skip targets above this")
    p.add_argument("--methods", nargs="+", default=None, help=f"default: {' '.join(ALL_METHODS)} "
                   "(+ dense_flash_attn when flash-attn imports)")
    p.add_argument("--breakdown-methods", nargs="*", default=["spava"],
                   help="methods that get one extra instrumented run for the time breakdown (default: spava)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default="bench_e2e.json", help="results JSON; an existing file is resumed")
    p.add_argument("--fresh", action="store_true", help="ignore an existing --out (overwrite it)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds: start no measurement after this (leave ~90 s for the last one and the exit)")
    p.add_argument("--max-pixels", type=int, default=0, help="per-frame pixel cap of the resize (0: native)")
    p.add_argument("--min-pixels", type=int, default=4 * 28 * 28)
    p.add_argument("--passing-len", type=int, default=None,
                   help="override Spava's passing budget per block (apb gets twice it); default: the paper's rule "
                        "(--tiny: 16, so that the tiny blocks are really cut)")
    p.add_argument("--cp-backend", choices=["cudnn", "flash", "efficient", "auto"], default="cudnn",
                   help="SDPA backend inside PyTorch's CP ring (default cudnn; falls back to flash, efficient)")
    p.add_argument("--cp-gqa", choices=["repeat", "native"], default="repeat",
                   help="torch_cp: repeat KV heads (default) or pass enable_gqa=True")
    p.add_argument("--ulysses-degree", type=int, default=2,
                   help="GPUs per Ulysses group of the 2-D methods (spava_2d, ring_2d; ask for them in --methods)")
    p.add_argument("--cuda-graphs", choices=list(GRAPH_SETTINGS), default="auto",
                   help="SpavaConfig.cuda_graphs of every method (default auto; the breakdown run is always eager; "
                        "give another --out for each setting)")
    p.add_argument("--trace", default=None, help="folder: a Chrome trace of every breakdown run (torch.profiler)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: the embedded tiny checkpoint, tiny inputs")
    p.add_argument("--share-of", type=int, nargs="+", default=None, metavar="W",
                   help="one process only: also time one rank's share of each W (the other ranks stood in for by "
                        "PyTorch's fake process group, every collective returning at once, as launch/bench_host.py)"
                        f" for the methods of {SHARE_METHODS} in --methods")
    p.add_argument("--share-rank", type=int, default=1, help="the rank --share-of stands for (1: both blocks)")
    p.add_argument("--plot", nargs="+", default=None, metavar="JSON", help="only plot and tabulate result files")
    p.add_argument("--plot-out", default=None, help="PNG path for --plot (default: the first JSON with .png)")
    p.add_argument("--inject-oom", default=None, help=argparse.SUPPRESS)  # "METHOD@TARGET": test the skip path
    from spava_ds import entry

    entry.add_arguments(p)
    args = p.parse_args(argv)

    if args.plot:
        return plot(args.plot, args.plot_out or os.path.splitext(args.plot[0])[0] + ".png")
    return entry.run_main(bench, args)


def bench(args) -> int:
    """Every model x resolution x context x method of ``args``; rank 0 writes the JSON and prints the tables."""
    from transformers.utils import logging as hf_logging

    from spava_ds import entry
    from spava_ds.models import family_of

    hf_logging.set_verbosity_error()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if args.tiny:
        torch.set_num_threads(1)
    rank, world = entry.init_distributed(args, backend="gloo" if args.tiny else None) if distributed else (0, 1)
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    clock = Clock(device)
    if args.tiny and args.passing_len is None:
        args.passing_len = 16
    if not cuda and not args.tiny:
        log("no CUDA device: use --tiny for the CPU smoke run")
        return 2
    models = args.models or (["tiny"] if args.tiny else ["7b", "3b"])
    resolutions = args.resolutions or (["112x112"] if args.tiny else ["360p", "720p"])
    contexts = [parse_context(c) for c in args.contexts] if args.contexts else ([320] if args.tiny
                                                                                else DEFAULT_CONTEXTS)
    methods = list(args.methods or ALL_METHODS)
    from spava_ds.kernels import flash_attn_available

    if args.methods is None and cuda and flash_attn_available():
        methods.insert(1, "dense_flash_attn")
    unknown = [m for m in methods if m not in ALL_METHODS + MESH_METHODS + ["dense_flash_attn"]]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from "
                         f"{ALL_METHODS + MESH_METHODS + ['dense_flash_attn']}")
    if any(m in MESH_METHODS for m in methods) and (args.ulysses_degree < 1 or world % args.ulysses_degree):
        raise SystemExit(f"--ulysses-degree {args.ulysses_degree} does not divide the {world} process(es)")
    if "dense_flash_attn" in methods and not (cuda and flash_attn_available()):
        log("dense_flash_attn needs CUDA and the flash-attn package: skipped")
        methods.remove("dense_flash_attn")
    share_methods = [m for m in methods if m in SHARE_METHODS] if args.share_of else []
    share_names = [share_name(m, w) for w in args.share_of or [] for m in share_methods]
    if args.share_of and world > 1:
        raise SystemExit("--share-of runs in one process (it stands for one rank of each W): start without torchrun")
    if world == 1:
        multi = [m for m in methods if not m.startswith("dense") and m not in share_methods]
        if multi:
            log(f"one process: only the dense methods run (skipping {multi}); start with torchrun --nproc_per_node N")
        methods = [m for m in methods if m.startswith("dense")]
    methods.sort(key=lambda m: 0 if m.startswith("dense") else 1)  # dense first: its logits check the others

    import transformers

    card = torch.cuda.get_device_name(device) if cuda else "CPU"
    meta = dict(card=card, gpus=world, torch=torch.__version__, transformers=transformers.__version__,
                date=time.strftime("%Y-%m-%d %H:%M"), command=" ".join(["launch/bench_e2e.py"] + sys.argv[1:]),
                dtype=str(dtype), iters=args.iters, warmup=args.warmup, cuda_graphs=args.cuda_graphs,
                inputs="synthetic: random pixel values of the Qwen grid, no video decoding (no PyAV on the GPU "
                       "image); preprocessing outside the timed region",
                torch_cp="whole language model: every attention layer through context_parallel's ring (SDPA "
                         f"backend {args.cp_backend}, KV heads {args.cp_gqa}); vision frame-parallel as ours")
    results = Results(args.out, args.fresh, meta, rank)
    if distributed:
        dist.barrier()  # every rank has read --out before rank 0 writes it
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    results.save()
    log(f"bench_e2e: {world} x {card}, torch {torch.__version__}, transformers {transformers.__version__}, {dtype}")
    log("inputs are synthetic (random pixel values of the right grid): no video decoding")

    if args.tiny and "torch_cp" in methods:
        err = install_cpu_cp_shim(world)
        if err:
            log(f"torch_cp cannot run on the CPU here ({err}); skipped")
            methods.remove("torch_cp")

    start = time.perf_counter()
    slowest_run = 0.0
    stopped = False
    for shape in models:
        if stopped:
            break
        plan = [(res, t) for res in resolutions for t in contexts]
        todo = [(res, t) for res, t in plan
                if not all(results.done(case_key(shape, res, t, world), m) for m in methods + share_names)]
        if not todo:
            log(f"[{shape}] everything already in {args.out}")
            continue
        free_memory(device)
        tokenizer = shape_tokenizer(shape)
        model = build_model(shape, tokenizer, device)
        for res, target in todo:
            if stopped:
                break
            key = case_key(shape, res, target, world)
            if args.max_context and target > args.max_context:
                for mth in methods:
                    if not results.done(key, mth):
                        results.put(dict(case=key, model=shape, resolution=res, target=target, method=mth,
                                         gpus_job=world, status="skipped", message=f"above --max-context "
                                         f"{args.max_context}", size=plan_size(family_of(model), res, args)))
                log(f"[{key}] skipped: above --max-context {args.max_context}")
                continue
            free_memory(device)
            case = make_case(model, tokenizer, shape, res, target, world, args, device, dtype)
            log(f"\n[{key}] {case.frames} frames at {case.size[0]}x{case.size[1]} (grid {case.grid.tolist()[0]}), "
                f"{case.context_len} context + {case.query_len} query tokens")
            base = dict(case=key, model=shape, resolution=res, target=target, size=list(case.size),
                        frames=case.frames, context_tokens=case.context_len, query_tokens=case.query_len,
                        gpus_job=world)
            dense_logits = results.logits.get(key)
            for mth in methods:
                if results.done(key, mth):
                    continue
                if over_budget(args, start, slowest_run, device):
                    stopped = True
                    break
                single = mth.startswith("dense")
                gpus = 1 if single else world
                if mth == "torch_cp" and family_of(model).decoder_inputs:
                    results.put(dict(base, method=mth, gpus=gpus, status="skipped", message="context_parallel "
                                     "does not shard DeepStack's inputs (Qwen3-VL)"))
                    continue
                previous = results.find(key, mth)
                entry = dict(base, method=mth, gpus=gpus, status="running",
                             attempts=(previous or {}).get("attempts", 0) + 1)
                t_method = time.perf_counter()
                results.put(entry)
                free_memory(device)
                status, message, m = "ok", "", {}
                if not single or rank == 0:
                    try:
                        if args.inject_oom == f"{mth}@{target}":
                            raise torch.OutOfMemoryError("injected by --inject-oom (test)")
                        runner = Runner(model, case, mth, device, clock, rank, world, args)
                        trace = None
                        if args.trace and mth in args.breakdown_methods:
                            os.makedirs(args.trace, exist_ok=True)
                            trace = os.path.join(args.trace, f"{shape}_{res}_{target}_{mth}_rank{rank}.json")
                        m = _measure_with_fallback(runner, args, clock, device, dense_logits, trace,
                                                   mth in args.breakdown_methods)
                        del runner
                    except torch.OutOfMemoryError as e:
                        if not single:
                            print(f"[rank {rank}] {key} {mth}: out of memory ({str(e).splitlines()[0][:200]}); "
                                  "a multi-GPU method cannot skip it (the other ranks wait in a collective): "
                                  "exiting; rerun the same command to go on", file=sys.stderr, flush=True)
                            os._exit(3)
                        status, message = "oom", f"out of memory on 1 GPU: {str(e).splitlines()[0][:160]}"
                        m = {}
                    Route.name = "spava"
                peak = peak_gib(device)
                free_memory(device)
                # every rank learns the single-GPU status from rank 0
                code = agree({"ok": 0, "oom": 1}[status] if rank == 0 else 0, device)
                if single:
                    status = "ok" if code == 0 else "oom"
                peaks = gather_floats([peak], device) if not single else [[peak]]
                if status != "ok":
                    entry.update(status=status, message=message or "out of memory on 1 GPU")
                    results.put(entry)
                    log(f"  {mth:>18}: skipped ({entry['message']})")
                    continue
                if rank == 0:
                    logits = m.pop("_logits")
                    if mth == "dense" or (mth.startswith("dense") and dense_logits is None):
                        dense_logits = results.logits[key] = logits
                    entry.update(m, status="ok", peak_mem_gib=[p[0] for p in peaks[:gpus]],
                                 measured_in_s=round(time.perf_counter() - t_method, 1))
                    slowest_run = max(slowest_run, entry["ttft"])
                    log(f"  {mth:>18}: TTFT {entry['ttft']:.3f} s (vision {entry['vision']:.3f}, LM "
                        f"{entry['lm']:.3f}, head {entry['head']:.4f}); peak {max(entry['peak_mem_gib']):.1f} GiB; "
                        f"{entry['measured_in_s']} s"
                        + (f"; logits vs dense rel. {entry['logit_rel_diff']:.1e}" if 'logit_rel_diff' in entry
                           else ""))
                else:
                    entry.update(status="ok")
                results.put(entry)
            del case
            free_memory(device)
            if share_names and not stopped:
                slowest_run, stopped = measure_shares(model, tokenizer, shape, res, target, share_methods, args,
                                                      device, dtype, clock, results, start, slowest_run)
        del model
        free_memory(device)

    if rank == 0:
        missing = [(r["case"], r["method"]) for r in results.data["results"] if r.get("status") == "running"]
        print(tables(results.data), flush=True)
        print(f"\nresults: {args.out}" + ("" if stopped or missing else "; all measurements done"), flush=True)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return 0


SHARE_METHODS = ("spava", "ring", "ulysses", "star", "apb")


def share_name(method: str, world: int) -> str:
    return f"{method}@share{world}"


def over_budget(args, start: float, slowest_run: float, device) -> bool:
    """Whether the next measurement would overrun --time-budget (rank 0 decides for every rank)."""
    elapsed = time.perf_counter() - start
    over = args.time_budget is not None and elapsed + slowest_run * (args.iters + args.warmup + 1) > args.time_budget
    if agree(1.0 if over and (not dist.is_initialized() or dist.get_rank() == 0) else 0.0, device) > 0:
        log(f"time budget reached ({elapsed:.0f} s of {args.time_budget:.0f} s): stopping; rerun the same command "
            "to continue")
        return True
    return False


def measure_shares(model, tokenizer, shape, res, target, methods, args, device, dtype, clock, results, start,
                   slowest_run):
    """One process stands for rank ``--share-rank`` of each W of ``--share-of``: its vision share, its tokens of
    the prefill and the first token, every collective returning at once (PyTorch's fake process group and
    spava_ds's collective hook, as ``launch/bench_host.py``), so the time is that rank's work with no communication:
    what W GPUs would take if the collectives were free. Returns (slowest run, stopped)."""
    from bench_host import alone, fake_group

    for world in args.share_of:
        case = make_case(model, tokenizer, shape, res, target, world, args, device, dtype)
        key = case_key(shape, res, target, 1)
        for mth in methods:
            name = share_name(mth, world)
            if results.done(key, name):
                continue
            if over_budget(args, start, slowest_run, device):
                return slowest_run, True
            entry = dict(case=key, model=shape, resolution=res, target=target, size=list(case.size), frames=case.frames,
                         context_tokens=case.context_len, query_tokens=case.query_len, gpus_job=1, gpus=world,
                         method=name, share_of=world, share_rank=args.share_rank, status="ok")
            free_memory(device)
            t_method = time.perf_counter()
            try:
                fake_group(args.share_rank, world)
                with alone():
                    m = measure(Runner(model, case, mth, device, clock, args.share_rank, world, args), args, clock,
                                device, None, None, False)
            except torch.OutOfMemoryError as e:
                entry.update(status="oom", message=f"out of memory: {str(e).splitlines()[0][:160]}")
                results.put(entry)
                log(f"  {name:>18}: skipped ({entry['message']})")
                continue
            m.pop("_logits")  # the features and partials of the absent ranks are garbage: no first-token check
            entry.update(m, peak_mem_gib=[peak_gib(device)], measured_in_s=round(time.perf_counter() - t_method, 1))
            slowest_run = max(slowest_run, entry["ttft"])
            results.put(entry)
            log(f"  {name:>18}: TTFT {entry['ttft']:.3f} s (vision {entry['vision']:.3f}, LM {entry['lm']:.3f}); "
                f"peak {entry['peak_mem_gib'][0]:.1f} GiB; rank {args.share_rank} of {world} alone")
        del case
    return slowest_run, False


def _measure_with_fallback(runner, args, clock, device, dense_logits, trace, want_breakdown):
    """torch_cp on CUDA: if the chosen SDPA backend fails inside PyTorch's ring, try the next one (same on every
    rank: the failure is deterministic). Other methods: one attempt."""
    if runner.route != "torch_cp" or device.type != "cuda" or args.cp_backend == "auto":
        return measure(runner, args, clock, device, dense_logits, trace, want_breakdown)
    order = [args.cp_backend] + [b for b in ("cudnn", "flash", "efficient") if b != args.cp_backend]
    errors = []
    for b in order:
        args.cp_backend = b
        try:
            m = measure(runner, args, clock, device, dense_logits, trace, want_breakdown)
            m["cp_backend"] = b
            if errors:
                m["cp_backend_errors"] = errors
            return m
        except (RuntimeError, NotImplementedError) as e:  # e.g. "No available kernel" for this backend
            if isinstance(e, torch.OutOfMemoryError):
                raise
            errors.append(f"{b}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            log(f"  torch_cp with SDPA backend {b} failed ({errors[-1]}); trying the next")
            free_memory(device)
    raise RuntimeError("torch_cp: no SDPA backend worked: " + "; ".join(errors))


if __name__ == "__main__":
    sys.exit(main())
