"""What every model family shares, and the text-only family (Qwen2, Llama).

A family adapter answers, for one kind of checkpoint: which transformers class loads it, how a prompt is built from
the tokenizer's own chat template, where its context ends and its question begins, its positions (1-D RoPE here),
how visual features enter the embeddings of this rank's tokens, and what else its decoder needs. ``video.py`` and
the vision towers stay generic; the engine, fine-tuning, the benchmarks and ``model.generate()`` ask the adapter.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..integrations.qwen_vision import frame_parallel_stream, rank_pixels, rank_stream
from ..integrations.transformers import text_decoder
from ..video import VideoStream

# Splits a rendered chat prompt between the context and the question (never a token of any vocabulary we know).
_QUESTION_MARK = "\u2063SPAVA-QUESTION\u2063"

Shard = Callable[..., torch.Tensor]  # shard(x, dim=1): this rank's tokens of a full-sequence tensor


class ModelFamily:
    """Text-only causal language models (``qwen2``, ``llama``): chat-template prompts, 1-D RoPE positions.

    Args:
        model: the loaded transformers model (weights may be on the meta device: nothing here reads them).
        tokenizer: its tokenizer (prompts need it; embeddings do not).
    """

    model_types: Tuple[str, ...] = ("qwen2", "llama")
    label = "Qwen2 / Llama (text)"
    has_vision = False
    decoder_inputs: Tuple[str, ...] = ()  # the decoder's extra per-token arguments (``decoder_extras``)

    def __init__(self, model: torch.nn.Module, tokenizer=None):
        self.model, self.config, self.tokenizer = model, model.config, tokenizer

    @classmethod
    def model_class(cls):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    @property
    def decoder(self) -> torch.nn.Module:
        return text_decoder(self.model)

    # ---- prompts ------------------------------------------------------------------------------------------------
    def ids(self, text: str) -> List[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def render(self, messages: List[dict], add_generation_prompt: bool = True) -> str:
        """The tokenizer's own chat template applied to ``messages`` (text, not ids)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer of this {self.label} checkpoint has no chat template: spava_ds builds "
                             "prompts with it (add one to tokenizer_config.json / chat_template.jinja)")
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def chat_inputs(self, context: str, question: str, system: Optional[str] = None,
                    answer_prefix: str = "") -> dict:
        """A text prompt through the chat template: one user turn ``context + question`` (after an optional system
        turn), then the assistant prefix of the template and ``answer_prefix``. The context is everything before
        ``question``; the query is the question and what follows."""
        messages = ([dict(role="system", content=system)] if system else []) + \
            [dict(role="user", content=context + _QUESTION_MARK + question)]
        text = self.render(messages)
        if text.count(_QUESTION_MARK) != 1:
            raise ValueError("the chat template did not keep the user's text as written: cannot tell the context "
                             "from the question")
        before, after = text.split(_QUESTION_MARK)
        return self._prompt(self.ids(before), self.ids(after + answer_prefix))

    def _prompt(self, context: List[int], query: List[int], **positions) -> dict:
        ids = torch.tensor([context + query])
        return dict(input_ids=ids, position_ids=self.positions(ids, **positions), context_len=len(context),
                    query_len=len(query))

    def end_of_turn(self) -> List[int]:
        """The tokens the chat template writes after an assistant answer, up to its first special token (the end of
        the turn, e.g. ``<|im_end|>``): what a trained answer ends with."""
        probe = [dict(role="user", content="?"), dict(role="assistant", content=_QUESTION_MARK)]
        tail = self.ids(self.render(probe, add_generation_prompt=False).split(_QUESTION_MARK)[-1])
        special = set(self.tokenizer.all_special_ids)
        ends = [i for i, t in enumerate(tail) if t in special]
        if not ends:
            raise ValueError("the chat template ends an assistant turn with no special token")
        return tail[:ends[0] + 1]

    def answer_ids(self, answer: str) -> List[int]:
        """``answer`` as the model should write it: its tokens, then the template's end of turn."""
        return self.ids(answer) + self.end_of_turn()

    # ---- positions ----------------------------------------------------------------------------------------------
    def positions(self, input_ids: torch.Tensor, **video) -> torch.Tensor:
        """Global positions of a whole prompt: ``[1, S]`` (1-D RoPE)."""
        return torch.arange(input_ids.shape[1])[None]

    # ---- embeddings ---------------------------------------------------------------------------------------------
    def local_embeddings(self, inputs: dict, shard: Shard, group=None, device=None, dtype=None,
                         vision_scope=None) -> Tuple[torch.Tensor, Dict]:
        """This rank's input embeddings (``shard`` picks its tokens) and the extra keyword arguments of the decoder
        forward (none for text models). ``vision_scope``: a context manager the vision tower runs in (training's
        timer phase, ``no_grad`` for a frozen tower)."""
        return self.decoder.embed_tokens(shard(inputs["input_ids"]).to(device)), {}

    def shard_decoder_kwargs(self, kwargs: dict, shard: Shard) -> dict:
        """The decoder's family-specific keyword arguments of the whole sequence, cut to this rank's tokens
        (``model.generate()``; none for this family)."""
        return kwargs

    def context_len(self, input_ids: torch.Tensor) -> Optional[int]:
        """Where the context ends in a whole prompt, when the prompt says (a video's end); None for text."""
        return None

    def generate_inputs(self, inputs: dict, group=None, device=None) -> dict:
        """The keyword arguments of ``model.generate`` for a prompt of this adapter (``chat_inputs``)."""
        return dict(input_ids=inputs["input_ids"].to(device))

    def vision_parallel(self, group, input_ids: Optional[torch.Tensor]):
        """A context in which the model's own forward runs its vision tower frame-parallel over ``group``
        (``model.generate()``'s prefill); nothing for text models."""
        return contextlib.nullcontext()


def visual_slots(is_visual: torch.Tensor, shard: Shard) -> Tuple[torch.Tensor, torch.Tensor]:
    """For a ``[1, S]`` mask of the visual tokens of the whole sequence: this rank's mask ``[1, s]`` and, for each of
    its visual tokens, the index of that token among all visual tokens (the row of the visual features)."""
    local = shard(is_visual)
    order = shard(torch.cumsum(is_visual.long(), dim=1) - 1)
    return local, order[local]


def scatter_features(embeds: torch.Tensor, features: torch.Tensor, slots) -> torch.Tensor:
    """A copy of ``embeds`` ``[1, s, D]`` whose visual tokens hold their rows of ``features`` ``[N, D]``."""
    local, rows = slots
    local = local.to(embeds.device)
    embeds = embeds.clone()  # the embedding's output may be needed by autograd as it is
    embeds[local] = features[rows.to(features.device)].to(embeds.dtype)
    return embeds


def expand_tokens(ids: Sequence[int], token: int, count: int) -> List[int]:
    """``ids`` with each ``token`` repeated ``count`` times (a processor's placeholder expansion, on ids)."""
    out: List[int] = []
    for t in ids:
        if t == token:
            out.extend([token] * count)
        else:
            out.append(t)
    return out


class VideoFamily(ModelFamily):
    """A vision-language family answering questions about one video. Subclasses say what the chat template writes for
    a video (``placeholder``), what the processor puts there (``video_text``: one feature token per group of
    frames), how many feature tokens a group holds, the plan of the frames and how they are encoded."""

    has_vision = True
    default_video_settings: dict = {}
    modality, pixel_key = "video", "pixel_values_videos"  # how the model takes the frames

    @property
    def feature_token_id(self) -> int:
        """The token whose embeddings the visual features replace."""
        raise NotImplementedError

    @property
    def frames_per_step(self) -> int:
        """Frames of one temporal step of the plan (the unit of the frame split)."""
        raise NotImplementedError

    def placeholder(self) -> str:
        """The text the chat template writes for a video item, which the processor replaces."""
        raise NotImplementedError

    def video_text(self, grid_thw: torch.Tensor, step_times: Optional[Sequence[float]]) -> str:
        """The processor's replacement of ``placeholder``, with one feature token per group."""
        raise NotImplementedError

    def group_tokens(self, grid_thw: torch.Tensor) -> Tuple[int, int]:
        """(groups, feature tokens per group) of a video of grid ``[[t, h, w]]``."""
        raise NotImplementedError

    def plan(self, video, settings: dict, fps: Optional[float] = None, max_frames: Optional[int] = None):
        """The ``VideoPlan`` of a video file under ``settings`` (the checkpoint's video settings)."""
        raise NotImplementedError

    def encode(self, inputs: dict, group=None, device=None, dtype=None) -> List[torch.Tensor]:
        """The visual features of the video of ``inputs`` (``SpavaEngine.video_inputs``) on every rank of ``group``:
        this rank's frames (``rank_pixels``: decoded if the inputs hold another rank's) through ``encode_pixels``,
        or, when the inputs hold a ``VideoStream``, chunk by chunk as they decode (``encode_stream``)."""
        if isinstance(inputs.get("pixel_values_videos"), VideoStream):
            return self.encode_stream(inputs, group, device, dtype)
        pixels = self.model_pixels(rank_pixels(inputs, group, device, dtype))
        return self.encode_pixels(pixels, inputs["video_grid_thw"], group)

    def encode_stream(self, inputs: dict, group=None, device=None, dtype=None) -> List[torch.Tensor]:
        """``encode`` of streamed inputs: this rank's ``VideoStream`` (``rank_stream``) through the vision tower a
        chunk at a time (``encode_steps`` on the chunk's grid), then one all-gather (``frame_parallel_stream``)."""
        grid = inputs["video_grid_thw"]
        steps, height, width = (int(v) for v in grid[0])
        groups, per_group = self.group_tokens(grid)

        def encode_steps(rows: torch.Tensor, first: int, stop: int) -> List[torch.Tensor]:
            pixels = self.model_pixels(rows.to(device, dtype))
            return self.encode_steps(pixels, torch.tensor([[stop - first, height, width]]))  # on the CPU

        return frame_parallel_stream(encode_steps, rank_stream(inputs, group), steps, groups * per_group // steps,
                                     group)

    def encode_steps(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> List[torch.Tensor]:
        """The vision tower on some temporal steps of a video (``model_pixels`` of their rows, ``grid_thw`` of those
        steps alone, on the CPU), on this device: ``[features, *extra per-token fields]``, as ``encode_pixels`` lists
        them."""
        raise NotImplementedError

    def vision_patches_per_step(self, plan) -> int:
        """The vision tower's patches in one temporal step of ``plan`` (what sizes a streamed chunk)."""
        return plan.rows_per_step

    def encode_pixels(self, pixels: torch.Tensor, grid_thw: torch.Tensor, group=None) -> List[torch.Tensor]:
        """The features of a video of grid ``grid_thw`` from every pixel or this rank's (``model_pixels`` shape),
        the vision tower split over ``group`` (each rank encodes its own frames, then one all-gather):
        ``[features [N, D], *extra per-token fields]``, the same on every rank."""
        raise NotImplementedError

    def decoder_extras(self, fields: List[torch.Tensor], slots) -> dict:
        """The decoder's extra keyword arguments for this rank's tokens, from ``encode``'s extra fields (none)."""
        return {}

    def vision_modules(self) -> List[torch.nn.Module]:
        """The modules that turn pixels into the language model's visual features (what a frozen tower freezes)."""
        raise NotImplementedError

    def fuse_vision_attention(self) -> None:
        """Run the vision tower's attention as one variable-length call where spava_ds knows how (Qwen towers)."""

    # ---- prompt ---------------------------------------------------------------------------------------------------
    def video_prompt(self, grid_thw: torch.Tensor, second_per_grid_t: float, question: str,
                     step_times: Optional[Sequence[float]] = None) -> dict:
        """The prompt of one video and a question, from the chat template: ids split into the context (up to the
        video's end) and the query (the question, the template's end of turn and assistant prefix), and the global
        positions of the whole sequence. ``step_times``: seconds of each temporal step (families that write
        timestamps need them)."""
        content = [dict(type="video"), dict(type="text", text=question)]
        text = self.render([dict(role="user", content=content)])
        placeholder = self.placeholder()
        if text.count(placeholder) != 1:
            raise ValueError(f"the chat template wrote {text.count(placeholder)} video placeholders "
                             f"({placeholder!r}) for one video")
        ids = self.ids(text.replace(placeholder, self.video_text(grid_thw, step_times)))
        groups, per_group = self.group_tokens(grid_thw)
        if ids.count(self.feature_token_id) != groups:
            token = self.tokenizer.convert_ids_to_tokens(self.feature_token_id)
            raise ValueError(f"the tokenizer does not keep {token!r} as one token: is it a special token of this "
                             "checkpoint?")
        ids = expand_tokens(ids, self.feature_token_id, per_group)
        end = self.context_len(torch.tensor([ids]))
        return dict(self._prompt(ids[:end], ids[end:], video_grid_thw=grid_thw,
                                 second_per_grid_t=second_per_grid_t), video_grid_thw=grid_thw,
                    second_per_grid_t=second_per_grid_t)

    def plan_prompt(self, plan, question: str) -> dict:
        """``video_prompt`` of a ``VideoPlan``."""
        return self.video_prompt(torch.tensor([plan.grid_thw]), plan.second_per_grid_t, question,
                                 step_seconds(plan.frame_indices, plan.metadata.fps, plan.temporal_patch_size))

    def generate_inputs(self, inputs: dict, group=None, device=None) -> dict:
        """The keyword arguments of ``model.generate`` for a prompt of ``SpavaEngine.video_inputs``, frame-parallel:
        this rank's pixels (``rank_pixels``) go to the model, whose vision tower then runs frame-parallel inside the
        prefill (transformers 5.17). Where the model takes pre-encoded features (``mm_encoder_outputs``, newer
        versions, whose ``generate`` encodes the pixels before the prefill, where no hook runs), they are encoded
        here instead, frame-parallel over ``group`` (a collective: every rank calls it)."""
        out = self.prompt_kwargs(inputs, device)
        if "pixel_values_videos" not in inputs:
            return out
        pixels = self.model_pixels(rank_pixels(inputs, group, device, self.model.dtype))
        if "mm_encoder_outputs" not in inspect.signature(self.model.forward).parameters:
            return dict(out, **{self.pixel_key: pixels})
        with self.vision_parallel(group, out["input_ids"]):
            encoded = self.encode_for_model(pixels, out)
        return dict(out, mm_encoder_outputs={self.modality: encoded})

    def prompt_kwargs(self, inputs: dict, device=None) -> dict:
        """The model's non-pixel inputs of a prompt (ids, and what its positions need)."""
        raise NotImplementedError

    def model_pixels(self, rows: torch.Tensor) -> torch.Tensor:
        """``video_pixels``' rows in the shape the model takes."""
        return rows

    def encode_for_model(self, pixels: torch.Tensor, prompt: dict):
        """The model's own feature method on ``pixels`` (``get_video_features`` / ``get_image_features``): what
        transformers' ``generate`` passes as ``mm_encoder_outputs``."""
        raise NotImplementedError

    def context_len(self, input_ids: torch.Tensor) -> Optional[int]:
        """The prompt up to the end of the video, from the ids alone (``model.generate()`` has no tokenizer): to the
        last video-end token (``video_end_id``) included, or, without one, to the token after the last feature
        token (InternVL's ``</img>``)."""
        end = self.video_end_id
        found = (input_ids[0] == (self.feature_token_id if end is None else end)).nonzero()
        if not len(found):
            return None
        return int(found[-1]) + (2 if end is None else 1)

    @property
    def video_end_id(self) -> Optional[int]:
        """The token that closes the video's part of the prompt, when the config names it."""
        return None

    # ---- embeddings -----------------------------------------------------------------------------------------------
    def local_embeddings(self, inputs: dict, shard: Shard, group=None, device=None, dtype=None,
                         vision_scope=None) -> Tuple[torch.Tensor, Dict]:
        """This rank's embeddings: its tokens' embeddings, its visual tokens replaced by their rows of the features
        of the whole video (every rank encodes its own frames, ``encode``, inside ``vision_scope``), and the
        decoder's extra arguments."""
        embeds, _ = super().local_embeddings(inputs, shard, group, device, dtype)
        if "pixel_values_videos" not in inputs:  # (None with a "video_error": every rank raises in ``encode``)
            return embeds, {}
        with vision_scope or contextlib.nullcontext():
            fields = self.encode(inputs, group, device, dtype)
        slots = visual_slots(inputs["input_ids"] == self.feature_token_id, shard)
        return scatter_features(embeds, fields[0], slots), self.decoder_extras(fields, slots)


def step_seconds(frame_indices: Sequence[int], fps: float, temporal_patch_size: int) -> List[float]:
    """The time of each temporal step of sampled frames: the mean of its first and last frame's time (as
    transformers' Qwen3-VL processor computes its timestamps)."""
    tp = temporal_patch_size
    return [(frame_indices[i] / fps + frame_indices[i + tp - 1] / fps) / 2 for i in range(0, len(frame_indices), tp)]


@contextlib.contextmanager
def patched(obj, name: str, value):
    """``obj.name = value`` (an instance attribute, e.g. a module's ``forward``) inside the block, then as before."""
    had, old = name in vars(obj), vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)
