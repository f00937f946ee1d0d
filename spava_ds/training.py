"""Reusable parts of sequence-parallel fine-tuning on videos (``launch/finetune.py`` drives them).

One training sample is the inference prompt of ``SpavaEngine.video_inputs`` followed by the answer and the chat
template's end of turn (``<|im_end|>``; any family of ``spava_ds.models``): for Qwen2.5-VL the context is
``[system, <vision_start>, video tokens, <vision_end>]``, the query is
``[question, <im_end>, assistant prefix, answer, <im_end>]``. The answer therefore lies in the query block, which
``ZigzagLayout`` replicates on every rank of the sequence-parallel (SP) group.

Loss: mean cross-entropy over the answer tokens (and the closing ``<|im_end|>``). Each SP rank computes logits only
where labels exist and weighs every labelled token by ``replicated_token_weights`` (``1/W`` in the query), so the
*sum* of the ranks' losses is the sequence's mean loss, and the sum of their gradients is its gradient.
``frame_parallel_vision`` keeps to this: its backward sums the feature gradients over the ranks.

Gradient reduction: DeepSpeed 0.19.8 is *not* given ``sequence_parallel_size``. With it, ``engine.backward`` gave
gradients that differ from the SP sum by 0-30% per tensor on the CPU (tests/test_finetune.py found it; the same
backward followed by a plain all-reduce is exact), so the SP groups are built here (``sp_group``) and DeepSpeed sees
plain data parallelism over all ranks: it averages gradients over the world, and ``engine.backward(loss * W)``
turns that average into the sum over the SP ranks and the mean over the data-parallel groups.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import comm
from .config import SpavaConfig
from .integrations.deepspeed import replicated_token_weights
from .integrations.transformers import spava_session, text_decoder
from .layout import ZigzagLayout
from .models import family_of

IGNORE_INDEX = -100


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
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, -n - 1:-1] = ids[0, -n:]  # position i predicts token i + 1: the last prompt token predicts the answer
    return dict(inputs, input_ids=ids, position_ids=torch.cat([positions, extra], dim=-1), labels=labels,
                query_len=inputs["query_len"] + n, answer=answer.strip())


class VideoQAModel(torch.nn.Module):
    """A video model of a supported family (``spava_ds.models``) whose forward returns this rank's share of the
    answer loss of one sharded sample.

    DeepSpeed wraps this module: ``loss = engine(sample)``, then ``engine.backward(loss)``. The SP group is set
    after ``deepspeed.initialize`` (which builds it) with ``set_group``.

    The language model must be loaded with ``attn_implementation=spava_attn_implementation(config)``.
    """

    def __init__(self, model: torch.nn.Module, config: SpavaConfig, group=None):
        super().__init__()
        self.model = model
        self.config = config
        config.check_num_layers(len(text_decoder(model).layers))
        self.set_group(group)

    def set_group(self, group) -> None:
        self.group = group
        self.rank, self.world = comm.group_rank_size(group)

    def layout(self, sample: Dict) -> ZigzagLayout:
        return ZigzagLayout(sample["context_len"], sample["query_len"], self.world, self.config)

    def _embeddings(self, sample: Dict, layout: ZigzagLayout, device, dtype):
        """This rank's input embeddings, visual tokens replaced by the frame-parallel vision features (each rank
        encodes its own frames; the all-gather's backward sums the feature gradients), and the decoder's extra
        arguments (the model family's: ``spava_ds.models``)."""
        return family_of(self.model).local_embeddings(sample, lambda x, dim=1: layout.shard(x, self.rank, dim),
                                                      self.group, device, dtype)

    def forward(self, sample: Dict) -> torch.Tensor:
        param = next(self.model.parameters())
        device, dtype = param.device, param.dtype
        layout = self.layout(sample)
        positions = sample["position_ids"]
        local_pos = layout.shard(positions, self.rank, dim=positions.dim() - 1).to(device)
        labels = layout.shard(sample["labels"], self.rank).to(device)[0]
        with spava_session(layout, self.config, self.group, keep_cache=False):
            embeds, extras = self._embeddings(sample, layout, device, dtype)
            hidden = text_decoder(self.model)(inputs_embeds=embeds, position_ids=local_pos, use_cache=False,
                                              **extras).last_hidden_state[0]
        mask = labels != IGNORE_INDEX
        # Logits only where a label exists: the vocabulary projection of the whole video would dominate memory.
        logits = self.model.get_output_embeddings()(hidden[mask]).float()
        token_loss = F.cross_entropy(logits, labels[mask], reduction="none")
        weights = replicated_token_weights(layout, self.rank, device)[mask]
        total = int((sample["labels"] != IGNORE_INDEX).sum())
        return (token_loss * weights).sum() / total


def sp_group(sp_size: int):
    """This rank's sequence-parallel group: blocks of ``sp_size`` consecutive ranks (every rank builds them all, as
    ``new_group`` requires). ``comm.SELF`` when ``sp_size`` is 1."""
    if sp_size == 1:
        return comm.SELF
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % sp_size:
        raise ValueError(f"sequence parallel size {sp_size} does not divide the {world} processes")
    mine = None
    for start in range(0, world, sp_size):
        group = dist.new_group(list(range(start, start + sp_size)))
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
