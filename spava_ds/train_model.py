"""The model of long-sequence fine-tuning: a video checkpoint of a supported family (``spava_ds.models``) or
Qwen2.5-VL built at 3B/7B shape, and its memory options.

* ``build_model``: a checkpoint (``models.load_model``: the family from its config) or a random initialisation of
  the real architecture at a named shape (``MODEL_SHAPES``: Qwen2.5-VL-3B/7B's published configs, and ``tiny`` for
  tests). Under ZeRO-3 both go through transformers' DeepSpeed path (``HfDeepSpeedConfig``), so
  ``deepspeed.zero.Init`` partitions every module as it is built and transformers initialises the weights module by
  module on the GPU: no rank ever holds the whole 7B model, and nothing loops over 7B parameters on the CPU. Without
  ZeRO-3 the model is built directly on the target device.
* ``MemoryOptions`` / ``apply_memory_options``: the vision tower frozen (no gradient, no optimizer state, run under
  ``no_grad`` by ``VideoQAModel``), activation checkpointing of the decoder (and vision) layers with transformers'
  own switch, optionally holding the checkpoints in pinned CPU memory (``offload``: transformers wraps each layer's
  checkpoint in ``torch.autograd.graph.save_on_cpu``), and the MLP computed in shards along the sequence with
  DeepSpeed's ``TiledMLP`` (forward without keeping the intermediate activations, recomputed shard by shard in the
  backward).

Why transformers' checkpointing rather than DeepSpeed's ``activation_checkpointing.cpu_checkpointing``: the decoder
layers checkpoint through transformers' own hook (``GradientCheckpointingLayer``), whose only public switch takes
torch's checkpoint; DeepSpeed's function could be put there only by setting a private attribute of every layer. The
offload itself is the same idea (the layer inputs wait in host memory until the backward needs them).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
from typing import Dict, Optional

import torch

from .models.shapes import PUBLISHED_SHAPES, ModelShape

# Qwen2.5-VL-3B/7B's published configs (``models.shapes``), and ``tiny`` for tests: every structural feature of the
# real shapes (GQA, M-RoPE sections, windowed and full vision layers); 12 query and 6 KV heads split over 2 and 3
# ranks for the head-parallel modes.
MODEL_SHAPES: Dict[str, ModelShape] = {
    "3b": PUBLISHED_SHAPES["3b"],
    "7b": PUBLISHED_SHAPES["7b"],
    "tiny": ModelShape("tiny Qwen2.5-VL", "qwen2_5_vl", text=dict(
        hidden_size=192, intermediate_size=256, num_hidden_layers=2, num_attention_heads=12, num_key_value_heads=6,
        vocab_size=512, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                    temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1], hidden_act="silu"),
        tie_word_embeddings=True, tokens=dict(bos_token_id=0, eos_token_id=2, vision_start_token_id=3,
                                              vision_end_token_id=4, image_token_id=5, video_token_id=6)),
}


def shape_config(shape: str):
    """The ``Qwen2_5_VLConfig`` of a named shape (``MODEL_SHAPES``), with the checkpoint's token ids and tying."""
    from transformers import Qwen2_5_VLConfig

    if shape not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known shapes: {sorted(MODEL_SHAPES)}")
    spec = MODEL_SHAPES[shape]
    text = dict(copy.deepcopy(spec.text), rms_norm_eps=1e-6, hidden_act="silu", max_position_embeddings=1 << 21,
                tie_word_embeddings=spec.tie_word_embeddings, bos_token_id=spec.tokens["bos_token_id"],
                eos_token_id=spec.tokens["eos_token_id"])
    vision = dict(copy.deepcopy(spec.vision), out_hidden_size=spec.text["hidden_size"])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=spec.tie_word_embeddings,
                            **spec.tokens)


def measurement_config(path: str):
    """``(DeepSpeed dict, SpavaConfig)`` of a JSON for measurements (benchmarks, checks): one sample per optimizer
    step, no schedule, the ``"spava"`` block read off (it sets everything but the mode) and the sequence-parallel
    sizes removed (the caller makes every rank one sequence-parallel group)."""
    from .config import SpavaConfig
    from .integrations.deepspeed import read_deepspeed_json

    ds = read_deepspeed_json(path)
    spava = SpavaConfig.from_dict(ds.pop("spava", None))
    for key in ("sequence_parallel_size", "data_parallel_size", "scheduler", "train_batch_size"):
        ds.pop(key, None)
    ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    return ds, spava


def model_dtype(ds_config: dict) -> torch.dtype:
    """The dtype DeepSpeed trains in by its JSON (build the model in it: a 7B model is not made in fp32 first)."""
    if (ds_config.get("bf16") or {}).get("enabled"):
        return torch.bfloat16
    return torch.float16 if (ds_config.get("fp16") or {}).get("enabled") else torch.float32


def build_model(source: str, dtype: torch.dtype, device: torch.device, attn_implementation,
                ds_config: Optional[dict] = None):
    """``(model, zero3_handle)``: a video model from a checkpoint directory of a supported family
    (``spava_ds.models``) or a Qwen2.5-VL of a ``MODEL_SHAPES`` name.

    With a ZeRO-3 ``ds_config`` the model is partitioned while it is built (see the module docstring); keep
    ``zero3_handle`` (transformers' ``HfDeepSpeedConfig``, or None) alive until ``deepspeed.initialize`` has run,
    since transformers finds the DeepSpeed config through a weak reference to it.
    """
    from transformers import AutoModelForImageTextToText

    zero3 = (ds_config or {}).get("zero_optimization", {}).get("stage", 0) == 3
    handle = None
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        handle = HfDeepSpeedConfig(ds_config)
    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation)
    if source in MODEL_SHAPES:
        # ZeRO-3: zero.Init places the partitions on this rank's device itself; otherwise built and initialised on
        # the device: no CPU loop over the weights
        with contextlib.nullcontext() if zero3 else torch.device(device):
            return AutoModelForImageTextToText.from_config(shape_config(source), **kwargs), handle
    from . import models

    model = models.load_model(source, dtype, attn_implementation)
    if not models.family_of(model).has_vision:
        raise ValueError(f"{source}: a {model.config.model_type!r} checkpoint has no vision tower; fine-tuning runs "
                         "video models")
    return (model if zero3 else model.to(device)), handle


# ---- memory options -----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MemoryOptions:
    """What a long sample may cost in memory, and what is traded for it.

    Args:
        freeze_vision: the vision tower gets no gradient and no optimizer state, and runs under ``no_grad``.
        checkpoint_layers: activation checkpointing of the decoder layers (and of the vision blocks when trained):
            only each layer's input is kept; the layer runs again in the backward.
        offload_checkpoints: keep those layer inputs in pinned CPU memory (needs ``checkpoint_layers``).
        mlp_shards: compute each decoder MLP in this many pieces along the sequence (DeepSpeed's ``TiledMLP``;
            0 or 1: off). A fixed count, not a tile length: the module calls per step then do not depend on the
            sample length, so ZeRO-3's prefetch trace stays valid from one sample to the next.
        loss_tile: labelled tokens per piece of the vocabulary projection and cross entropy (each piece
            checkpointed, see ``VideoQAModel._loss``); fewer labels than this are one piece.
    """

    freeze_vision: bool = False
    checkpoint_layers: bool = False
    offload_checkpoints: bool = False
    mlp_shards: int = 0
    loss_tile: int = 4096

    def __post_init__(self):
        if self.offload_checkpoints and not self.checkpoint_layers:
            raise ValueError("offload_checkpoints needs checkpoint_layers: only the checkpoints are offloaded")
        for name in ("mlp_shards", "loss_tile"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "mlp_shards" else 1):
                raise ValueError(f"MemoryOptions.{name} must be an int >= {0 if name == 'mlp_shards' else 1}, "
                                 f"got {value!r}")


def add_memory_arguments(parser, defaults: MemoryOptions) -> None:
    """The command-line flags of ``MemoryOptions`` (and ``--fused-vision``), with these defaults; read them back
    with ``memory_options(args)``."""
    flag = argparse.BooleanOptionalAction
    group = parser.add_argument_group("memory options (docs/finetune.md, 'Memory options')")
    group.add_argument("--freeze-vision", action=flag, default=defaults.freeze_vision,
                       help="no gradient, no optimizer state for the vision tower; it runs under no_grad")
    group.add_argument("--checkpoint-layers", action=flag, default=defaults.checkpoint_layers,
                       help="activation checkpointing of the decoder (and trained vision) layers")
    group.add_argument("--offload-checkpoints", action=flag, default=defaults.offload_checkpoints,
                       help="keep the checkpointed layer inputs in pinned CPU memory (with --checkpoint-layers)")
    group.add_argument("--mlp-shards", type=int, default=defaults.mlp_shards,
                       help="compute each MLP in this many pieces along the sequence (DeepSpeed's TiledMLP; 0: off)")
    group.add_argument("--loss-tile", type=int, default=defaults.loss_tile,
                       help="labelled tokens per piece of the vocabulary projection and loss")
    group.add_argument("--fused-vision", action=flag, default=True,
                       help="the vision tower's attention as one variable-length call per layer (spava_ds."
                            "integrations.qwen_vision; a CPU keeps transformers' per-window loop)")


def memory_options(args, parser=None) -> MemoryOptions:
    """``MemoryOptions`` of the flags of ``add_memory_arguments``; a bad combination is ``parser.error`` (or a
    ValueError without a parser)."""
    try:
        return MemoryOptions(args.freeze_vision, args.checkpoint_layers, args.offload_checkpoints, args.mlp_shards,
                             args.loss_tile)
    except ValueError as e:
        if parser is None:
            raise
        parser.error(str(e))


def apply_memory_options(model: torch.nn.Module, options: MemoryOptions) -> None:
    """Freeze the vision tower, switch on checkpointing and tile the MLPs, as ``options`` says (before
    ``deepspeed.initialize``, which must then get only the parameters that require a gradient)."""
    if options.freeze_vision:
        from .models import family_of

        for module in family_of(model).vision_modules():
            module.requires_grad_(False)
    if options.checkpoint_layers:
        enable_checkpointing(model, options.offload_checkpoints)
    if options.mlp_shards > 1:
        from .integrations.transformers import text_decoder

        for layer in text_decoder(model).layers:
            layer.mlp.forward = functools.partial(_tiled_mlp_forward, layer.mlp, options.mlp_shards)


def enable_checkpointing(model: torch.nn.Module, offload: bool) -> None:
    """transformers' activation checkpointing (non-reentrant), offloading the checkpoints to pinned CPU memory if
    asked; ``activation_checkpointing_enable`` from transformers 5.24, ``gradient_checkpointing_enable`` before.

    Without CUDA the offload is skipped: the checkpoints already are in host memory, and transformers' offload asks
    for pinned memory, which needs an accelerator.
    """
    offload = offload and torch.cuda.is_available()
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, offload=offload)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, offload=offload)


def _mlp(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return type(mlp).forward(mlp, x)  # the class's own forward: calls the projections, so ZeRO-3's hooks run


def _tiled_mlp_forward(mlp: torch.nn.Module, shards: int, x: torch.Tensor) -> torch.Tensor:
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    weights = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    return TiledMLP.apply(_mlp, mlp, x, shards, weights)


def trainable_parameters(model: torch.nn.Module):
    """The parameters the optimizer gets (a frozen vision tower has none)."""
    return [p for p in model.parameters() if p.requires_grad]
