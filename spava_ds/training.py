"""Reusable parts of sequence-parallel fine-tuning on videos (``launch/finetune.py`` and ``launch/bench_train.py``
drive them).

One training sample is the inference prompt of ``SpavaEngine.video_inputs`` followed by the answer and the chat
template's end of turn (``<|im_end|>``; any family of ``spava_ds.models``): for Qwen2.5-VL the context is
``[system, <vision_start>, video tokens, <vision_end>]``, the query is
``[question, <im_end>, assistant prefix, answer, <im_end>]``. The answer therefore lies in the query block, which
``ZigzagLayout`` replicates on every rank of the sequence-parallel (SP) group. ``synthetic_sample`` builds a sample
of any token count directly as pixel tensors and token ids (measurements need no video file).

Attention: ``VideoQAModel`` routes the language model's attention to ``training_attention`` (registered with
transformers as ``TRAIN_ATTN``), which runs ``sp_attention`` in the mode of the ``SpavaConfig`` (``spava``, ``ring``,
``ulysses``, ``dense``) on the zigzag layout, or ``DEEPSPEED_ULYSSES``: DeepSpeed's own
``deepspeed.sequence.layer.DistributedAttention`` on DeepSpeed's contiguous sharding (a baseline for benchmarks).
The step's layout and group sit on the attention modules themselves, not in a context variable, because activation
checkpointing runs the attention again inside the backward, which on GPUs runs on autograd's own threads.

Loss: mean cross-entropy over the answer tokens (and the closing ``<|im_end|>``). Each SP rank computes logits only
where labels exist (in checkpointed pieces when they are many) and weighs every labelled token by
``ZigzagLayout.replicated_token_weights`` (``1/W`` in the query), so the *sum* of the ranks' losses is the sequence's
mean loss, and the sum of their gradients is its gradient. The frame-parallel vision towers keep to this: their
all-gather's backward sums the feature gradients over the ranks.

Gradient reduction: DeepSpeed 0.19.8 is *not* given ``sequence_parallel_size``. With it, ``engine.backward`` gave
gradients that differ from the SP sum by 0-30% per tensor on the CPU (tests/test_finetune.py found it; the same
backward followed by a plain all-reduce is exact), so the SP groups are built here (``sp_group``) and DeepSpeed sees
plain data parallelism over all ranks: it averages gradients over the world, and ``engine.backward(loss * W)``
turns that average into the sum over the SP ranks and the mean over the data-parallel groups (``train_step``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import comm
from .attention import sp_attention
from .config import SpavaConfig
from .integrations.transformers import spava_attention_forward, text_decoder
from .layout import ZigzagLayout
from .integrations.qwen_vision import temporal_range
from .models import family_of
from .step_timer import StepTimer
from .train_model import MemoryOptions, apply_memory_options, build_model, model_dtype, trainable_parameters

IGNORE_INDEX = -100
TRAIN_ATTN = "spava_ds_train"
DEEPSPEED_ULYSSES = "deepspeed-ulysses"
TRAIN_MODES = ("spava", "ring", "ulysses", "dense", DEEPSPEED_ULYSSES)
_STATE_ATTR = "spava_ds_step"  # the attribute of every text attention module that holds the step's _StepAttention


# ---- samples --------------------------------------------------------------------------------------------------------
def build_sample(engine, video: str, question: str, answer: str, fps: Optional[float] = None,
                 max_frames: Optional[int] = None) -> Dict:
    """One training/eval sample: the engine's prompt for ``video`` and ``question`` plus the answer tokens.

    ``engine`` is a ``SpavaEngine`` over the model being trained (it owns the tokenizer and the video settings, so
    the prompt is the one greedy decoding sees at evaluation). See ``add_answer`` for what is returned.
    """
    return add_answer(engine, engine.video_inputs(video, question, fps, max_frames), answer)


def add_answer(engine, inputs: Dict, answer: str) -> Dict:
    """A copy of the engine's prompt ``inputs`` with ``input_ids``, ``position_ids`` and ``query_len`` extended by
    the answer and ``<|im_end|>``, and ``labels`` ``[1, S]`` already shifted: ``labels[i]`` is the token position
    ``i`` must predict, ``IGNORE_INDEX`` outside the answer."""
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError("empty answer: every record needs a non-empty \"answer\"")
    answer_ids = engine.family.answer_ids(answer.strip())  # the answer and the chat template's end of turn
    n = len(answer_ids)
    ids = torch.cat([inputs["input_ids"], torch.tensor([answer_ids])], dim=1)
    # The answer continues the text positions after the prompt, as decoding does (engine.generate: max + 1, ...).
    positions = inputs["position_ids"]
    extra = (positions.max() + 1 + torch.arange(n)).to(positions.dtype)
    extra = extra.view(*([1] * (positions.dim() - 1)), n).expand(*positions.shape[:-1], n)
    return dict(inputs, input_ids=ids, position_ids=torch.cat([positions, extra], dim=-1),
                labels=_answer_labels(ids, n), query_len=inputs["query_len"] + n, answer=answer.strip())


def _answer_labels(ids: torch.Tensor, n: int) -> torch.Tensor:
    """Pre-shifted labels of the last ``n`` tokens: position i predicts token i + 1 (the last prompt token predicts
    the answer's first), ``IGNORE_INDEX`` elsewhere."""
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, -n - 1:-1] = ids[0, -n:]
    return labels


def synthetic_sample(model, tokens: int, grid_hw=(26, 46), question_len: int = 32, answer_len: int = 16,
                     seed: int = 0, device=None, dtype: torch.dtype = torch.float32, rank: int = 0,
                     world: int = 1) -> Dict:
    """A sample of exactly ``tokens`` tokens for measurements: random pixels of a video whose frames are ``grid_hw``
    patches (default 26 x 46: 364 x 644 pixels, 299 tokens per 2 frames), random text around it, labels on the last
    ``answer_len`` tokens, and the model's own M-RoPE positions. The pixels are made on ``device`` in ``dtype`` (a
    long video's pixels are the largest input: 9.4 GB in bf16 at 1M tokens), and only those of the temporal steps
    that rank ``rank`` of ``world`` encodes (``video_steps``), as a sample read from a video file holds them. Each
    step's pixels come from their own seed, so every world size sees the same video. Qwen2.5-VL only (the
    ``MODEL_SHAPES`` of ``train_model`` and its checkpoints): the other families write text between frames."""
    cfg = model.config
    if cfg.model_type != "qwen2_5_vl":
        raise ValueError(f"synthetic samples are made for Qwen2.5-VL; this model is {cfg.model_type!r} (train it on "
                         "records: --train)")
    vision = cfg.vision_config
    h, w = grid_hw
    merge = vision.spatial_merge_size
    if h % merge or w % merge:
        raise ValueError(f"synthetic_sample: grid_hw {grid_hw} must be multiples of the merge size {merge}")
    per_step = (h // merge) * (w // merge)
    text = 8 + 2 + question_len + answer_len  # system text, <vision_start>, <vision_end>, question, answer
    steps = (tokens - text) // per_step
    if steps < 1:
        raise ValueError(f"synthetic_sample: {tokens} tokens cannot hold one frame pair of {per_step} video tokens "
                         f"and {text} text tokens")
    n_video = steps * per_step
    gen = torch.Generator().manual_seed(seed)

    def words(n: int) -> torch.Tensor:  # ordinary text tokens: below the special tokens (151643 on, in Qwen's)
        return torch.randint(16, min(cfg.text_config.vocab_size, 151643), (n,), generator=gen)

    ids = torch.cat([words(tokens - n_video - 2 - question_len - answer_len), torch.tensor([cfg.vision_start_token_id]),
                     torch.full((n_video,), cfg.video_token_id), torch.tensor([cfg.vision_end_token_id]),
                     words(question_len + answer_len)])[None]
    grid = torch.tensor([[steps, h, w]])
    first, stop = temporal_range(steps, rank, world)
    pixel_gen = torch.Generator(device=device)
    row = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    pixels = torch.cat([torch.randn(h * w, row, generator=pixel_gen.manual_seed(seed * 1_000_003 + t), device=device,
                                    dtype=dtype) for t in range(first, stop)])
    positions = family_of(model).positions(ids, video_grid_thw=grid, second_per_grid_t=1.0)
    return dict(input_ids=ids, position_ids=positions, labels=_answer_labels(ids, answer_len),
                context_len=tokens - question_len - answer_len, query_len=question_len + answer_len,
                pixel_values_videos=pixels, video_grid_thw=grid, video_steps=(first, stop),
                frames=steps * vision.temporal_patch_size)


# ---- attention ------------------------------------------------------------------------------------------------------
class DeepSpeedUlysses:
    """DeepSpeed's own Ulysses: ``deepspeed.sequence.layer.DistributedAttention`` wrapping causal SDPA, on DeepSpeed's
    contiguous sharding (rank r holds tokens [r S/W, (r+1) S/W)). KV heads fewer than W are repeated to W, as
    DeepSpeed's ALST does, so the all-to-all splits them evenly."""

    def __init__(self, group, world: int):
        from deepspeed.sequence.layer import DistributedAttention

        from .kernels import dense_causal_attention

        self.world = world
        self.local = dense_causal_attention
        # [b, s, h, d] layout: DeepSpeed's batch_dim_idx=0 with the sequence gathered on dim 1.
        self.attention = DistributedAttention(dense_causal_attention, group, scatter_idx=2, gather_idx=1) \
            if world > 1 else None

    def __call__(self, q, k, v, scale):
        if self.attention is None:
            return self.local(q, k, v, scale)
        if k.shape[2] < self.world:
            k, v = (t.repeat_interleave(self.world // k.shape[2], dim=2) for t in (k, v))
        return self.attention(q, k, v, 0, None, scale)


@dataclasses.dataclass
class _StepAttention:
    """What the attention of the current step needs, shared by every text attention module of one VideoQAModel."""

    layout: Optional[ZigzagLayout] = None
    config: Optional[SpavaConfig] = None
    group: object = None
    ulysses: Optional[DeepSpeedUlysses] = None
    timer: Optional[StepTimer] = None
    in_forward: bool = False

    def begin(self, layout, config, group, ulysses, timer) -> None:
        """A new step (the modules keep this object, so it is updated, never replaced)."""
        self.layout, self.config, self.group, self.ulysses, self.timer = layout, config, group, ulysses, timer
        self.in_forward = True

    def active(self) -> bool:
        # Inside VideoQAModel.forward, or in the backward's recompute (grad on) of the last training forward.
        # Greedy decoding by a SpavaEngine on the same model runs without grad and takes its session's path.
        return self.layout is not None and (self.in_forward or torch.is_grad_enabled())

    def attend(self, q, k, v, layer_idx: int, scale: Optional[float]) -> torch.Tensor:
        if self.ulysses is not None:
            return self.ulysses(q, k, v, scale)
        return sp_attention(q, k, v, self.layout, self.config, self.group, layer_idx=layer_idx, scale=scale)


def training_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                       **kwargs):
    """The ``AttentionInterface`` function of training: q ``[b, Hq, s, d]``, k/v ``[b, Hkv, s, d]`` ->
    ``([b, s, Hq, d], None)``. Outside a training step it is ``spava_attention_forward`` (the inference session)."""
    state = getattr(module, _STATE_ATTR, None)
    if state is None or not state.active():
        return spava_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if dropout:
        raise ValueError("spava_ds training does not support attention dropout")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    timer = state.timer
    if timer is None:
        return state.attend(q, k, v, module.layer_idx, scaling), None
    q, k, v = timer.mark_inputs(q, k, v)
    with timer.phase(timer.attention_phase()):
        out = state.attend(q, k, v, module.layer_idx, scaling)
    return timer.mark_output(out), None


def register_training_attention() -> str:
    """Register ``TRAIN_ATTN`` with transformers (idempotent). Like ``"spava"`` it takes no mask: the attention is
    causal by construction, and a dense mask of a long local sequence would not fit in memory."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(TRAIN_ATTN, training_attention)
    AttentionMaskInterface.register(TRAIN_ATTN, lambda *args, **kwargs: None)
    return TRAIN_ATTN


def training_attn_implementation() -> dict:
    """The ``attn_implementation`` of a model built for training: the language model on ``training_attention``,
    the vision tower on SDPA."""
    return {"text_config": register_training_attention(), "vision_config": "sdpa", "": "sdpa"}


# ---- the model ------------------------------------------------------------------------------------------------------
class VideoQAModel(torch.nn.Module):
    """A video model of a supported family (``spava_ds.models``) whose forward returns this rank's share of the
    answer loss of one sharded sample.

    DeepSpeed wraps this module: ``loss = engine(sample)``, then ``engine.backward(loss * W)`` (see ``train_step``).
    The SP group is set after ``deepspeed.initialize`` with ``set_group``; ``set_mode`` picks the attention
    (``TRAIN_MODES``) and ``set_timer`` a ``StepTimer`` for the breakdown of a step. The language model's attention
    is switched to ``training_attention`` here; ``options`` are the memory options already applied to the model
    (``train_model.apply_memory_options``); this class reads ``freeze_vision`` and ``loss_tile``.
    """

    def __init__(self, model: torch.nn.Module, config: SpavaConfig, group=None,
                 options: MemoryOptions = MemoryOptions()):
        super().__init__()
        self.model = model
        self.options = options
        model.set_attn_implementation({"text_config": register_training_attention()})
        self._step = _StepAttention()
        for layer in text_decoder(model).layers:
            setattr(layer.self_attn, _STATE_ATTR, self._step)
        self.config = config
        config.check_num_layers(len(text_decoder(model).layers))
        self.mode = config.mode
        self.timer: Optional[StepTimer] = None
        self.set_group(group)

    def set_group(self, group) -> None:
        self.group = group
        self.rank, self.world = comm.group_rank_size(group)
        self._ulysses = None

    def set_mode(self, mode: str) -> None:
        if mode not in TRAIN_MODES:
            raise ValueError(f"training mode must be one of {TRAIN_MODES}, got {mode!r}")
        self.mode = mode
        if mode != DEEPSPEED_ULYSSES:
            self.config = dataclasses.replace(self.config, mode=mode)

    def set_timer(self, timer: Optional[StepTimer]) -> None:
        self.timer = timer

    def layout(self, sample: Dict) -> ZigzagLayout:
        """The zigzag layout of the sample, or for ``DEEPSPEED_ULYSSES`` DeepSpeed's contiguous split: the
        contiguous variant of ``ZigzagLayout`` (the star/apb baselines' plan) with no anchor and no query block.
        Lengths and head counts a mode cannot take are errors here, on every rank, before any collective."""
        if self.mode in ("ulysses", DEEPSPEED_ULYSSES):
            text = self.model.config.text_config
            heads, kv = text.num_attention_heads, text.num_key_value_heads
            if heads % self.world or (kv % self.world and self.world % kv):
                raise ValueError(f"{self.mode}: {heads} query and {kv} KV heads do not split over {self.world} "
                                 "ranks (head parallelism needs W to divide the query heads, and the KV heads to "
                                 "divide or be divided by W)")
        if self.mode != DEEPSPEED_ULYSSES:
            return ZigzagLayout(sample["context_len"], sample["query_len"], self.world, self.config)
        total = sample["context_len"] + sample["query_len"]
        if total % self.world:
            raise ValueError(f"{DEEPSPEED_ULYSSES}: DeepSpeed's all-to-all needs equal shards: {total} tokens do not "
                             f"split over {self.world} ranks")
        return ZigzagLayout(total, 0, self.world, SpavaConfig(mode="star", anchor_len=0))

    def _phase(self, name: str):
        return self.timer.phase(name) if self.timer is not None else contextlib.nullcontext()

    def _embeddings(self, sample: Dict, layout: ZigzagLayout, device, dtype):
        """This rank's input embeddings, visual tokens replaced by the frame-parallel vision features, and the
        decoder's extra arguments (the model family's: ``spava_ds.models``). Each rank encodes ~1/W of the frames (a
        sample read from a video holds only its own); the all-gather's backward sums the feature gradients. The
        vision tower runs in the timer's "vision" phase, under ``no_grad`` when frozen."""
        return family_of(self.model).local_embeddings(sample, lambda x, dim=1: layout.shard(x, self.rank, dim),
                                                      self.group, device, dtype, vision_scope=self._vision_scope())

    @contextlib.contextmanager
    def _vision_scope(self):
        with self._phase("vision"), torch.no_grad() if self.options.freeze_vision else contextlib.nullcontext():
            yield

    def forward(self, sample: Dict) -> torch.Tensor:
        param = next(self.model.parameters())
        device, dtype = param.device, param.dtype
        layout = self.layout(sample)
        positions = sample["position_ids"]
        local_pos = layout.shard(positions, self.rank, dim=positions.dim() - 1).to(device)
        labels = layout.shard(sample["labels"], self.rank).to(device)[0]
        if self.mode == DEEPSPEED_ULYSSES and self._ulysses is None:
            self._ulysses = DeepSpeedUlysses(self.group, self.world)
        self._step.begin(layout, self.config, self.group, self._ulysses if self.mode == DEEPSPEED_ULYSSES else None,
                         self.timer)
        try:
            embeds, extras = self._embeddings(sample, layout, device, dtype)
            hidden = text_decoder(self.model)(inputs_embeds=embeds, position_ids=local_pos, use_cache=False,
                                              **extras).last_hidden_state[0]
        finally:
            self._step.in_forward = False
        with self._phase("loss"):
            total = int((sample["labels"] != IGNORE_INDEX).sum())
            weights = layout.replicated_token_weights(self.rank, device)
            return self._loss(hidden, labels, weights, math.ceil(total / self.options.loss_tile)) / total

    def _loss(self, hidden: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, tiles: int) -> torch.Tensor:
        """Sum over this rank's labelled tokens of weight x cross entropy. Logits exist only for labelled tokens (the
        vocabulary projection of the whole video would dominate memory), and only for one of ``tiles`` pieces at a
        time: each piece is checkpointed, so its logits are made again in the backward instead of being kept.

        Every rank makes the same number of pieces (from the sequence's label count; some may be empty), so the
        vocabulary projection runs equally often everywhere, as ZeRO-3's parameter gathering needs. DeepSpeed's
        ``TiledFusedLogitsLoss`` would do the tiling but computes the projection's gradient inside the forward; with
        tied input and output embeddings (Qwen2.5-VL-3B) ZeRO-3 then receives the shared weight's gradient twice
        in one backward and fails an assertion.
        """
        mask = labels != IGNORE_INDEX
        rows, targets, weights = hidden[mask], labels[mask], weights[mask]
        lm_head = self.model.get_output_embeddings()
        if tiles <= 1:
            return _weighted_cross_entropy(lm_head, rows, targets, weights)
        pieces = zip(*(torch.tensor_split(t, tiles) for t in (rows, targets, weights)))
        return sum(checkpoint(_weighted_cross_entropy, lm_head, *piece, use_reentrant=False) for piece in pieces)


def _weighted_cross_entropy(lm_head, rows, targets, weights) -> torch.Tensor:
    return (F.cross_entropy(lm_head(rows).float(), targets, reduction="none") * weights).sum()


# ---- setting up a run -----------------------------------------------------------------------------------------------
def build_video_qa(source: str, ds_config: dict, device: torch.device, config: SpavaConfig, group=None,
                   memory: MemoryOptions = MemoryOptions(), fused_vision: bool = False):
    """``(qa, zero3_handle)``: the model of ``source`` (a checkpoint folder or a ``MODEL_SHAPES`` name) built in the
    JSON's dtype with the training attention, its memory options applied, the vision attention fused if asked, and
    wrapped in a ``VideoQAModel``. Pass ``zero3_handle`` on to ``start_deepspeed`` (see ``train_model.build_model``)."""
    model, zero3_handle = build_model(source, model_dtype(ds_config), device, training_attn_implementation(),
                                      ds_config)
    apply_memory_options(model, memory)
    if fused_vision:
        family_of(model).fuse_vision_attention()
    return VideoQAModel(model, config, group, options=memory), zero3_handle


def start_deepspeed(module: torch.nn.Module, ds_config: dict, zero3_handle, **initialize_kwargs):
    """The DeepSpeed engine of ``module``: ``deepspeed.initialize`` with its trainable parameters only (a frozen
    vision tower gets no optimizer state) and ``initialize_kwargs`` (``optimizer``, ``lr_scheduler``).
    ``zero3_handle`` (from ``build_model``) is taken only to be held until here: transformers reads the ZeRO-3
    config through a weak reference to it while DeepSpeed partitions the model."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=module, model_parameters=trainable_parameters(module), config=ds_config,
                                      **initialize_kwargs)
    return engine


def train_step(engine, sample: Dict, sp_size: int, timer: Optional[StepTimer] = None) -> torch.Tensor:
    """One micro step: forward, ``engine.backward(loss * sp_size)`` (the SP sum, see the module docstring) and
    ``engine.step()`` (an optimizer step at the accumulation boundary). Returns this rank's loss share (detached)."""
    phase: Callable = timer.phase if timer is not None else (lambda name: contextlib.nullcontext())
    with phase("forward"):
        share = engine(sample)
    if timer is not None:
        timer.in_backward = True  # attention calls from here on are activation checkpointing's recompute
    try:
        with phase("backward"):
            engine.backward(share * sp_size)
    finally:
        if timer is not None:
            timer.in_backward = False
    with phase("optimizer"):
        engine.step()
    return share.detach()


def sp_group(sp_size: int, timeout=None):
    """This rank's sequence-parallel group: blocks of ``sp_size`` consecutive ranks (every rank builds them all, as
    ``new_group`` requires). ``comm.SELF`` when ``sp_size`` is 1. ``timeout`` (a timedelta): how long its collectives
    wait for a stuck rank (default: torch's, 10-30 minutes; entry points pass ``entry.collective_timeout``)."""
    if sp_size == 1:
        return comm.SELF
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % sp_size:
        raise ValueError(f"sequence parallel size {sp_size} does not divide the {world} processes")
    mine = None
    for start in range(0, world, sp_size):
        group = dist.new_group(list(range(start, start + sp_size)), timeout=timeout)
        if start <= rank < start + sp_size:
            mine = group
    return mine


def sequence_loss(share: torch.Tensor, group) -> torch.Tensor:
    """The sequence's mean loss from this rank's share: the sum over the SP group (detached)."""
    total = share.detach().float().clone()
    if comm.group_rank_size(group)[1] > 1:
        dist.all_reduce(total, group=group)
    return total


def exact_match(prediction: str, answer: str) -> bool:
    """Case-insensitive match after stripping spaces and a final full stop (answers are one word or number)."""
    def norm(s):
        return s.strip().rstrip(".").strip().lower()

    return norm(prediction) == norm(answer)
