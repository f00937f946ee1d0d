"""The inference engine: answer questions about a video (or a long text) with a checkpoint of a supported family
(``spava_ds.models``: Qwen2.5-VL, Qwen3-VL, InternVL3; Qwen2/Llama text models) over W processes.

One question, every rank alike (the anchor and the query are replicated, so every rank runs the same code):

1. every rank plans the video from the container's metadata (``video.py``: sampled frames, size, grid; the prompt
   and the positions need nothing more), then decodes and preprocesses (on its GPU) only the frames of its own
   temporal steps, about 1/W of them, runs the vision tower on them, and the features are all-gathered;
2. the prompt comes from the checkpoint's chat template, its video placeholder expanded as the family's processor
   does; the context ends with the video, the query is the question and the assistant prefix; positions (M-RoPE,
   interleaved M-RoPE or 1-D) are computed on the whole sequence (the family adapter);
3. ids, embeddings and positions are sharded with ``ZigzagLayout`` (``MeshLayout`` in the two-dimensional mode,
   ``SpavaConfig.ulysses_degree > 1``); one prefill forward with
   ``attn_implementation="spava"`` gives the first token from the query block's last row;
4. decoding attends each new token to the sharded KV cache with an LSE merge (``integrations/transformers.py``);
   rank 0 samples and broadcasts every token.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import time
from typing import List, Optional

import torch
import torch.distributed as dist

from . import comm
from .config import SpavaConfig
from .layout import MeshLayout, ZigzagLayout, make_layout
from .integrations.transformers import spava_session, text_decoder
from .models import family_of
from .video import VideoStream

log = logging.getLogger("spava_ds.engine")

# Vision-tower patches of a streamed chunk at least (``SpavaEngine(stream_video=True)``): enough work per call to
# keep a GPU busy while the next chunk decodes.
STREAM_CHUNK_PATCHES = 8192


@dataclasses.dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        # checked where it is made, identically on every rank: a bad value must not reach rank 0's sampler alone
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, numbers.Integral) \
                or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1: no nucleus cut), got {self.top_p!r}")


@dataclasses.dataclass
class Answer:
    text: str
    tokens: List[int]
    context_tokens: int
    query_tokens: int
    prefill_seconds: float
    first_logits: torch.Tensor  # logits of the first generated token (fp32, CPU)
    # seconds of the prefill's parts: "wait" (for the other ranks, before the prefill starts), "vision" (vision
    # tower, all-gather and embeddings), "lm" (language-model prefill), "first_token" (head, sampling, broadcast);
    # with a streamed video also "decode" and "preprocess" (its exposed waits, out of the vision span)
    timings: dict = dataclasses.field(default_factory=dict)


def _sample(logits: torch.Tensor, gen: GenerationConfig, generator: torch.Generator) -> int:
    if gen.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / gen.temperature, dim=-1)
    if gen.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < gen.top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


class SpavaEngine:
    """Prefill and decoding of a Hugging Face model whose language model runs Spava (or an exact mode).

    Args:
        model: a transformers model whose language model uses ``attn_implementation="spava"`` (see
            ``from_pretrained``, which loads a local checkpoint that way).
        tokenizer: its tokenizer.
        config: the ``SpavaConfig`` (mode, budgets, backend).
        group: the sequence-parallel group (default: the world); ``comm.SELF`` runs this process alone.
        settings: engine defaults (``spava_ds.json`` of a checkpoint: fps, max_frames, min/max_pixels).
        fused_vision: run the vision tower's attention as one variable-length call.
        simulate_world: run the whole sequence in this process and simulate W ranks with ``reference_attention``
            in the prefill (accuracy studies at any W on one device; decoding is exact, as in the real engine).
        stream_video: ``video_inputs`` hands over a ``VideoStream`` (decoding starts, nothing waits) and the vision
            tower encodes this rank's frames chunk by chunk as they decode, hiding the decoding behind the tower.
            Off by default until a GPU measurement shows it faster (docs/inference.md).
        stream_chunk_steps: temporal steps of a streamed chunk (default: enough for ``STREAM_CHUNK_PATCHES``
            patches of the vision tower).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, config: Optional[SpavaConfig] = None, group=None,
                 settings: Optional[dict] = None, fused_vision: bool = True, simulate_world: Optional[int] = None,
                 stream_video: bool = False, stream_chunk_steps: Optional[int] = None):
        if stream_chunk_steps is not None and (isinstance(stream_chunk_steps, bool) or
                                               not isinstance(stream_chunk_steps, int) or stream_chunk_steps < 1):
            raise ValueError(f"stream_chunk_steps must be a positive integer, got {stream_chunk_steps!r}")
        self.stream_video, self.stream_chunk_steps = bool(stream_video), stream_chunk_steps
        self.config = config if config is not None else SpavaConfig()
        self.config.check_num_layers(len(text_decoder(model).layers))
        self.group = group
        self.rank, self.world = comm.group_rank_size(group)
        if simulate_world is not None and self.world != 1:
            raise ValueError("simulate_world runs in one process: pass group=spava_ds.comm.SELF")
        self.simulate_world = simulate_world
        self.mesh = None  # the two-dimensional mode's DeviceMesh (over the whole job)
        if self.config.ulysses_degree > 1:
            if group is not None or simulate_world is not None:
                raise ValueError("the two-dimensional mode (ulysses_degree > 1) runs over every process of the job: "
                                 "leave group and simulate_world unset")
            self.mesh = comm.init_mesh(self.config.ulysses_degree)
        self.model = model.eval()
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.tokenizer = tokenizer
        self.family = family_of(model, tokenizer)
        self.settings = {**getattr(self.family, "default_video_settings", {}), **(settings or {})}
        self.is_video_model = self.family.has_vision
        if self.is_video_model and fused_vision:
            self.family.fuse_vision_attention()
        self.stop_ids = self._stop_ids()

    @classmethod
    def from_pretrained(cls, model_dir: str, config: Optional[SpavaConfig] = None, group=None,
                        device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                        fused_vision: bool = True, simulate_world: Optional[int] = None, stream_video: bool = False,
                        stream_chunk_steps: Optional[int] = None) -> "SpavaEngine":
        """Load a local checkpoint of a supported family (``spava_ds.models``, from its config's ``model_type``).

        ``device``/``dtype`` default to this rank's GPU in bf16, else the CPU in fp32.
        """
        from . import models
        from .video import load_video_settings

        model, tokenizer, family = models.load(model_dir, device, dtype)
        settings = load_video_settings(model_dir, getattr(family, "default_video_settings", None))
        return cls(model, tokenizer, config, group, settings, fused_vision, simulate_world, stream_video,
                   stream_chunk_steps)

    # ---- inputs ---------------------------------------------------------------------------------------------------
    def _stop_ids(self) -> set:
        ids = set()
        for tok in ("<|im_end|>", "<|endoftext|>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                ids.add(tid)
        eos = self.model.generation_config.eos_token_id
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        return ids

    def _ids(self, text: str) -> List[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def video_plan(self, video_path: str, fps: Optional[float] = None, max_frames: Optional[int] = None):
        """The ``VideoPlan`` of a video file (sampled frames, size, grid) under this checkpoint's settings, from the
        container's metadata alone. ``fps``/``max_frames`` override the settings; 0 or less is an error."""
        if not self.is_video_model:
            raise ValueError("this checkpoint has no vision tower: it cannot answer questions about a video")
        return self.family.plan(video_path, self.settings, fps, max_frames)

    def check_video(self, video_path: str, fps: Optional[float] = None, max_frames: Optional[int] = None):
        """``video_plan``, and a ValueError unless the video gives every rank of this engine a temporal step (its
        frame-parallel share): what ``video_inputs`` needs of a video, from the container's metadata alone."""
        plan = self.video_plan(video_path, fps, max_frames)
        if plan.num_steps < self.world:
            raise ValueError(f"video {video_path!r} gives {len(plan.frame_indices)} frames after sampling: at "
                             f"least {plan.temporal_patch_size * self.world} are needed for {self.world} ranks "
                             "(raise --fps or --max-frames, or use fewer processes)")
        return plan

    def video_prompt(self, video_grid_thw: torch.Tensor, second_per_grid_t: float, question: str,
                     step_times: Optional[List[float]] = None) -> dict:
        """The prompt of one video and a question (the checkpoint's chat template, the family's expansion of the
        video): ids split into context and query, and the global positions. They need only the grid, the seconds
        per temporal step and, for Qwen3-VL, the time of each step (``models.step_seconds``)."""
        _check_question(question)
        return self.family.video_prompt(video_grid_thw, second_per_grid_t, question, step_times)

    def video_inputs(self, video_path: str, question: str, fps: Optional[float] = None,
                     max_frames: Optional[int] = None, timings: Optional[dict] = None,
                     stream: Optional[bool] = None) -> dict:
        """The prompt, positions and this rank's patches of a video question.

        Every rank plans the video from the container's metadata (``check_video``: the prompt and the positions
        need nothing else), then decodes and preprocesses only the frames of its ``temporal_range`` for the
        frame-parallel vision tower, on this engine's device (the CPU inside a DataLoader worker).
        ``pixel_values_videos`` holds the rows of the steps ``video_steps``. With W > 1, frames that do not
        decode are reported in ``video_error`` rather than raised here, and every rank raises them together before
        the vision all-gather (``rank_pixels``). ``timings`` (optional) gets the seconds of each part.

        ``stream`` (default: the engine's ``stream_video``; never inside a DataLoader worker): ``pixel_values_videos``
        is a started ``VideoStream`` instead, encoded as it decodes in ``generate``, where its frames' errors are
        raised on every rank together; ``timings`` then gets the decoding's exposed waits during ``generate``.
        """
        from .integrations.qwen_vision import temporal_range
        from .video import VideoError, video_pixels

        _check_question(question)
        clock = time.perf_counter()
        plan = self.check_video(video_path, fps, max_frames)
        metadata_done = time.perf_counter()
        inputs = self.family.plan_prompt(plan, question)
        prompt_done = time.perf_counter()
        steps = temporal_range(plan.num_steps, self.rank, self.world)
        # CUDA cannot be used in a (forked) DataLoader worker: preprocess on the CPU there.
        in_worker = torch.utils.data.get_worker_info() is not None
        device = self.device if not in_worker else torch.device("cpu")
        if (self.stream_video if stream is None else stream) and not in_worker:
            if timings is not None:
                timings.update(metadata=metadata_done - clock, prompt=prompt_done - metadata_done)
            source = VideoStream(plan, *steps, device, self._chunk_steps(plan),
                                 timings if timings is not None else {}).start()
            return dict(inputs, pixel_values_videos=source, video_plan=plan, video_steps=steps, video_error=None,
                        frames=len(plan.frame_indices))
        parts = {}
        pixels, error = None, None
        try:
            pixels = video_pixels(plan, *steps, device=device, timings=parts if timings is not None else None)
        except VideoError as err:
            if self.world == 1:
                raise
            error = str(err)
        if timings is not None:
            timings.update(metadata=metadata_done - clock, prompt=prompt_done - metadata_done, **parts)
        return dict(inputs, pixel_values_videos=pixels, video_plan=plan, video_steps=steps, video_error=error,
                    frames=len(plan.frame_indices))

    def _chunk_steps(self, plan) -> int:
        """Temporal steps of a streamed chunk: ``stream_chunk_steps``, else enough for ``STREAM_CHUNK_PATCHES``."""
        patches = self.family.vision_patches_per_step(plan)
        return self.stream_chunk_steps or max(1, -(-STREAM_CHUNK_PATCHES // patches))

    def text_inputs(self, context: str, question: str) -> dict:
        """A plain text prompt (no chat template): ``context`` (e.g. a long document) then ``question``."""
        _check_question(question)
        ctx = self._ids(context)
        query = self._ids(question)
        ids = torch.tensor([ctx + query])
        return dict(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None], context_len=len(ctx),
                    query_len=len(query))

    def chat_inputs(self, context: str, question: str, system: Optional[str] = None,
                    answer_prefix: str = "") -> dict:
        """A text prompt through the checkpoint's chat template (``ModelFamily.chat_inputs``): the context, then
        the question, the template's assistant prefix and ``answer_prefix``."""
        _check_question(question)
        return self.family.chat_inputs(context, question, system, answer_prefix)

    # ---- prefill and decoding -------------------------------------------------------------------------------------
    def _shard(self, x: torch.Tensor, layout: ZigzagLayout, dim: int = 1) -> torch.Tensor:
        """This rank's tokens (all of them when simulating)."""
        return x if self.simulate_world else layout.shard(x, self.rank, dim)

    def _local_embeddings(self, inputs: dict, layout: ZigzagLayout):
        """This rank's input embeddings and the decoder's extra arguments (``ModelFamily.local_embeddings``)."""
        return self.family.local_embeddings(inputs, lambda x, dim=1: self._shard(x, layout, dim), self.group,
                                            self.device, self.dtype)

    def _broadcast(self, token: int) -> int:
        if self.world == 1:
            return token
        t = torch.tensor([token], device=self.device if self.device.type == "cuda" else "cpu")
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        dist.broadcast(t, src=src, group=self.group)
        return int(t.item())

    def _mark(self):
        """A point in time on this rank's device: a CUDA event (no synchronisation), else the wall clock."""
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.world > 1:
            dist.barrier(group=self.group)

    @torch.no_grad()
    def generate(self, inputs: dict, gen: Optional[GenerationConfig] = None) -> Answer:
        """Prefill (with the vision encoder) and decode one sequence; returns the answer with timings."""
        gen = gen or GenerationConfig()
        layout = make_layout(inputs["context_len"], inputs["query_len"], self.simulate_world or self.world,
                             self.config)
        decoder, lm_head = text_decoder(self.model), self.model.get_output_embeddings()
        positions = inputs["position_ids"]
        local_pos = self._shard(positions, layout, dim=positions.dim() - 1).to(self.device)
        generator = torch.Generator().manual_seed(gen.seed)
        waiting = time.perf_counter()
        self._sync()
        start = time.perf_counter()
        marks = [self._mark()]
        keep_cache = gen.max_new_tokens > 1  # a one-token answer needs no KV cache
        group = self.mesh if self.mesh is not None else self.group
        with spava_session(layout, self.config, group, keep_cache, simulate=bool(self.simulate_world)) as session:
            embeds, extras = self._local_embeddings(inputs, layout)
            marks.append(self._mark())
            hidden = decoder(inputs_embeds=embeds, position_ids=local_pos, use_cache=False,
                             **extras).last_hidden_state
            marks.append(self._mark())
            first_logits = lm_head(hidden[:, -1]).float()[0]
            if isinstance(layout, MeshLayout):  # one rank holds the query's last token: it sends the logits
                dist.broadcast(first_logits, src=layout.last_token_rank())
            token = self._broadcast(_sample(first_logits, gen, generator) if self.rank == 0 else -1)
            marks.append(self._mark())
            self._sync()
            prefill_seconds = time.perf_counter() - start
            timings = dict(wait=start - waiting, **{name: _elapsed(a, b) for name, a, b in
                                                    zip(("vision", "lm", "first_token"), marks, marks[1:])})
            _split_stream_waits(timings, inputs.get("pixel_values_videos"))
            tokens = [token]
            if keep_cache:
                session.decode()
            next_pos = int(positions.max()) + 1
            while len(tokens) < gen.max_new_tokens and tokens[-1] not in self.stop_ids:
                pos = torch.full((1, 1), next_pos + len(tokens) - 1, device=self.device)
                if positions.dim() == 3:
                    pos = pos.expand(3, 1, 1)
                tok = torch.tensor([[tokens[-1]]], device=self.device)
                hidden = decoder(inputs_embeds=decoder.embed_tokens(tok), position_ids=pos,
                                 use_cache=False).last_hidden_state
                logits = lm_head(hidden[:, -1]).float()[0]
                tokens.append(self._broadcast(_sample(logits, gen, generator) if self.rank == 0 else -1))
        text_tokens = [t for t in tokens if t not in self.stop_ids]
        return Answer(self.tokenizer.decode(text_tokens, skip_special_tokens=True).strip(), tokens,
                      inputs["context_len"], inputs["query_len"], prefill_seconds, first_logits.cpu(), timings)

    def answer(self, video_path: str, question: str, gen: Optional[GenerationConfig] = None,
               fps: Optional[float] = None, max_frames: Optional[int] = None) -> Answer:
        return self.generate(self.video_inputs(video_path, question, fps, max_frames), gen)


def _split_stream_waits(timings: dict, source) -> None:
    """A streamed video decodes inside the vision span: its exposed waits become the "decode" and "preprocess"
    parts and "vision" keeps the rest of the span, so the parts still add up to the prefill."""
    if isinstance(source, VideoStream):
        waits = {k: source.timings.get(k, 0.0) for k in ("decode", "preprocess")}
        timings.update(waits, vision=timings["vision"] - sum(waits.values()))


def _elapsed(a, b) -> float:
    """Seconds between two ``SpavaEngine._mark`` points (after a synchronisation, for CUDA events)."""
    return a.elapsed_time(b) / 1e3 if isinstance(a, torch.cuda.Event) else b - a


def _check_question(question: str) -> None:
    if not isinstance(question, str):
        raise ValueError(f"the question must be a string, got {type(question).__name__} {question!r}")
    if not question.strip():
        raise ValueError("the question is empty: pass --question \"...\"")


def dense_engine_like(engine: SpavaEngine) -> SpavaEngine:
    """A single-process engine in mode ``dense`` sharing ``engine``'s model (for --check and tests)."""
    clone = object.__new__(SpavaEngine)
    clone.__dict__.update(engine.__dict__)
    clone.config = dataclasses.replace(engine.config, mode="dense", ulysses_degree=1)
    clone.group, clone.rank, clone.world, clone.mesh = comm.SELF, 0, 1, None
    return clone
