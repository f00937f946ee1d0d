"""Model families: one small adapter per family, chosen by the checkpoint config's ``model_type``.

==============  =====================================  ===================================================
``model_type``  family                                 what differs
==============  =====================================  ===================================================
qwen2_5_vl      ``Qwen2_5_VLFamily``                   M-RoPE with absolute time; one video pad run
qwen3_vl        ``Qwen3VLFamily``                      timestamps as text per step, interleaved M-RoPE,
                                                       DeepStack features in the first decoder layers
internvl        ``InternVLFamily``                     a 448x448 tile per frame, a line per frame, 1-D RoPE
qwen2, llama    ``ModelFamily``                        text only, 1-D RoPE
==============  =====================================  ===================================================

The engine, fine-tuning, the benchmarks and ``model.generate()`` (``spava_cache``) ask the adapter for prompts,
positions, the frame split and the merge of visual features; see ``base.py`` for what an adapter answers.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch

from .base import ModelFamily, VideoFamily, step_seconds
from .internvl import InternVLFamily
from .qwen import Qwen2_5_VLFamily, Qwen3VLFamily

FAMILIES: Dict[str, type] = {t: cls for cls in (ModelFamily, Qwen2_5_VLFamily, Qwen3VLFamily, InternVLFamily)
                             for t in cls.model_types}

__all__ = ["FAMILIES", "ModelFamily", "VideoFamily", "Qwen2_5_VLFamily", "Qwen3VLFamily", "InternVLFamily",
           "family_class", "family_of", "load", "load_model", "step_seconds", "spava_cache", "cache_kwarg"]


def family_class(model_type: str) -> type:
    """The adapter class of a checkpoint's ``model_type``; a clear error for the others."""
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported architecture {model_type!r}: spava_ds runs "
                         f"{', '.join(sorted(t for t, c in FAMILIES.items() if c.has_vision))} (videos) and "
                         f"{', '.join(sorted(t for t, c in FAMILIES.items() if not c.has_vision))} (text)")
    return FAMILIES[model_type]


def family_of(model: torch.nn.Module, tokenizer=None) -> ModelFamily:
    """The adapter of a loaded model (by its config's ``model_type``)."""
    return family_class(model.config.model_type)(model, tokenizer)


def load_model(model_dir: str, dtype: torch.dtype, attn_implementation=None) -> torch.nn.Module:
    """The model of a local checkpoint of a supported family (its config's ``model_type`` picks the class), as
    ``from_pretrained`` builds it: not moved (under ZeRO-3, DeepSpeed has already placed each rank's partitions).
    ``attn_implementation`` defaults to the language model on ``"spava"`` and the vision tower on SDPA."""
    from transformers import AutoConfig

    from ..integrations.transformers import spava_attn_implementation

    if not os.path.isdir(model_dir):
        raise ValueError(f"--model {model_dir!r} is not a directory (a local Hugging Face checkpoint)")
    hf_config = AutoConfig.from_pretrained(model_dir)
    cls = family_class(hf_config.model_type)
    if attn_implementation is None:
        attn_implementation = spava_attn_implementation(hf_config)
    return cls.model_class().from_pretrained(model_dir, dtype=dtype, attn_implementation=attn_implementation)


def load(model_dir: str, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
         tokenizer: bool = True) -> Tuple[torch.nn.Module, object, ModelFamily]:
    """Load a local checkpoint of a supported family with the language model on ``attn_implementation="spava"``
    (the vision tower keeps SDPA): ``(model, tokenizer, family)``. ``device``/``dtype`` default to this rank's
    GPU in bf16, else the CPU in fp32."""
    from transformers import AutoTokenizer

    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else \
            torch.device("cpu")
    dtype = dtype if dtype is not None else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = load_model(model_dir, dtype).to(device)
    tok = AutoTokenizer.from_pretrained(model_dir) if tokenizer else None
    return model, tok, family_of(model, tok)


from .generate import cache_kwarg, spava_cache  # noqa: E402  (it needs family_of above)
