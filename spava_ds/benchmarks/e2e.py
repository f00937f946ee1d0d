"""The end-to-end benchmark's measurement (``launch/bench_e2e.py``): the synthetic case of a model, resolution and
context (the family's prompt and random pixels), one method's prepared state and one timed time-to-first-token run
(``Runner``), the warm-up, check and timed runs of a method (``measure``) and the instrumented breakdown run, whose
spans come through spava_ds's seams (the collective hook, the span hook, forward hooks on the linear layers)."""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from ..step_timer import Clock
from .shapes import load_model
from .timing import agree, free_memory, gather_floats, log

RESOLUTIONS = {"360p": (640, 360), "720p": (1280, 720), "1080p": (1920, 1080)}
DEFAULT_CONTEXTS = [131072, 65536, 32768, 16384]
ALL_METHODS = ["dense", "spava", "ring", "torch_cp", "apb", "ulysses", "star", "spava_no_overlap", "spava_no_fused",
               "spava_no_fp"]
MESH_METHODS = ["spava_2d", "ring_2d"]  # on request (--methods): the two-dimensional mode, --ulysses-degree per group
GRAPH_SETTINGS = {"auto": "auto", "on": True, "off": False}  # --cuda-graphs -> SpavaConfig.cuda_graphs
QUESTION = "What is in this video?"
SHARE_METHODS = ("spava", "ring", "ulysses", "star", "apb")  # --share-of: one rank of W alone


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



# ----------------------------------------------------------------------------------------------------------------
# Routing and probes
# ----------------------------------------------------------------------------------------------------------------

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
    from ..integrations.transformers import spava_attention_forward

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

    from ..integrations.transformers import register

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
    from .. import comm, profiling

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

def prepare_model(shape: str, tokenizer, device: torch.device):
    """The model of ``shape`` (``shapes.load_model``) with the fastest vision attention of its family (the same for
    every method, dense included) and the benchmark's attention routing registered."""
    from ..models import family_of

    model = load_model(shape, tokenizer, device)
    family_of(model).fuse_vision_attention()
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
    from ..video import VideoMetadata

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
    from ..models import family_of

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
        from .. import MODE_TABLE, MeshLayout, SpavaConfig, ZigzagLayout, comm, make_layout
        from ..integrations.transformers import text_decoder
        from ..models import family_of
        from ..models.base import visual_slots

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
        from .. import comm

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
        from ..integrations.transformers import spava_session
        from ..models.base import scatter_features

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

        from .. import comm

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
# Measuring one method
# ----------------------------------------------------------------------------------------------------------------

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




def measure_with_fallback(runner, args, clock, device, dense_logits, trace, want_breakdown):
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
