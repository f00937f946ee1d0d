"""``model.generate()`` with ``attn_implementation="spava"``: transformers' own loop, prefill then decoding, over the
ranks of a group.

Every rank calls ``model.generate`` with the WHOLE prompt (ids, and the pixels of every frame or only of its own)
and a ``SpavaCache`` from ``spava_cache(model)``. transformers then computes the inputs of the whole sequence as it
does on one device: the embeddings, the visual features (frame-parallel here: each rank encodes its own frames and
the features are all-gathered), and the global positions (``arange``, or M-RoPE from ``get_rope_index`` and its
``rope_deltas``). Hooks on the model do the rest:

* model, before the forward: open the cache's session (its layout is made at the prefill, the context ending where
  the video ends, or at ``context_len``), drop the attention mask (Spava takes none; padding is refused), and at the
  prefill run the vision tower frame-parallel and give every rank rank 0's random state, so that sampling draws
  the same numbers everywhere;
* decoder, before the prefill: shard the embeddings (or ids), the positions and the family's extra inputs
  (Qwen3-VL's DeepStack rows) into this rank's tokens with the layout;
* decoder, after the prefill: the last row (the last query token, on every rank) becomes rank 0's on every rank, so
  the logits, hence the sampled tokens, are the same everywhere (decoding steps give the same rows by construction:
  the merged attention is identical on every rank);
* model, after the forward: close the session, count the tokens.

A decoding step's positions come from transformers (the prompt's positions plus one), or, for a forward called
without ``position_ids``, from ``cache.get_seq_length()``, which counts every rank's tokens: both global.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch

from .. import comm
from ..integrations.transformers import ATTN_NAME, SpavaCache, text_decoder
from . import family_of

_INSTALLED = "_spava_generate_hooks"


def spava_cache(model: torch.nn.Module, config=None, group=None, context_len: Optional[int] = None) -> SpavaCache:
    """A ``SpavaCache`` for one ``model.generate(..., past_key_values=cache)`` call (a new one per prompt), and the
    hooks that run it (installed once per model).

    Args:
        model: a model of a supported family loaded with ``attn_implementation=spava_attn_implementation(config)``.
        config: the ``SpavaConfig`` (mode, budgets); default ``SpavaConfig()``.
        group: the sequence-parallel group (default: the world).
        context_len: prompt tokens before the question; default for video models: up to the end of the video.
    """
    family = family_of(model)
    decoder = text_decoder(model)
    attn = decoder.config._attn_implementation
    if attn != ATTN_NAME:
        raise ValueError(f"the language model runs attn_implementation={attn!r}: load it with attn_implementation="
                         "spava_ds.integrations.transformers.spava_attn_implementation(config)")
    if not hasattr(model, _INSTALLED):
        handles = [model.register_forward_pre_hook(_model_pre, with_kwargs=True),
                   model.register_forward_hook(_model_post, with_kwargs=True, always_call=True),
                   decoder.register_forward_pre_hook(_decoder_pre, with_kwargs=True),
                   decoder.register_forward_hook(_decoder_post, with_kwargs=True)]
        setattr(model, _INSTALLED, handles)
    return SpavaCache(len(decoder.layers), config, group, context_len, family)


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name under which this transformers passes a cache to ``generate`` and ``forward``: ``cache`` (>= 5.2x;
    ``past_key_values`` still works there, with a deprecation warning) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache(kwargs: dict) -> Optional[SpavaCache]:
    for name in ("past_key_values", "cache"):
        if isinstance(kwargs.get(name), SpavaCache):
            return kwargs[name]
    return None


def _model_pre(module, args, kwargs):
    cache = _cache(kwargs)
    if cache is None:
        return None
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    if args:
        ids = args[0]
    tokens = (ids if ids is not None else embeds).shape
    if tokens[0] != 1:
        raise ValueError(f"a SpavaCache holds one sequence: got a batch of {tokens[0]}")
    _check_no_padding(kwargs.get("attention_mask"))
    prefill = cache.session is None
    cache.begin(tokens[1], cache.family.context_len(ids) if prefill and ids is not None else None)
    if prefill and cache.world > 1:
        _share_random_state(cache.group)
        cache.scope.enter_context(cache.family.vision_parallel(cache.group, ids))
    return args, dict(kwargs, attention_mask=None)


def _model_post(module, args, kwargs, output):
    cache = _cache(kwargs)
    if cache is not None:
        cache.end()


def _decoder_pre(module, args, kwargs):
    cache = _cache(kwargs)
    if cache is None or not cache.prefilling:
        return None
    if args:
        raise ValueError("call the language model with keyword arguments under a SpavaCache")
    layout, rank = cache.layout, cache.rank

    def shard(x, dim=1):
        return layout.shard(x, rank, dim)

    out = dict(kwargs, attention_mask=None)
    for name in ("input_ids", "inputs_embeds"):
        if out.get(name) is not None:
            out[name] = shard(out[name])
            device = out[name].device
    positions = out.get("position_ids")
    if positions is None:  # the prefill starts at 0
        positions = torch.arange(layout.total_len, device=device)[None]
    out["position_ids"] = shard(positions, positions.dim() - 1)
    return args, cache.family.shard_decoder_kwargs(out, shard)


def _decoder_post(module, args, kwargs, output):
    cache = _cache(kwargs)
    if cache is None or not cache.prefilling or cache.world == 1:
        return None
    hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
    hidden[:, -1:] = comm.broadcast_(hidden[:, -1:].contiguous(), cache.group)
    return None


def _check_no_padding(mask) -> None:
    if mask is None:
        return
    if mask.dim() != 2 or not bool(mask.all()):
        raise ValueError("attn_implementation='spava' takes no padding: pass one unpadded sequence (an attention "
                         "mask of ones, or none)")


def _share_random_state(group) -> None:
    """Every rank of ``group`` takes rank 0's random state (CPU and the current GPU): sampling on identical logits
    then draws the same token everywhere."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    cpu_state, cuda_state = comm.broadcast_object((torch.get_rng_state(), torch.cuda.get_rng_state() if cuda
                                                   else None), group)
    torch.set_rng_state(cpu_state)
    if cuda_state is not None:
        torch.cuda.set_rng_state(cuda_state)
