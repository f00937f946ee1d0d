"""Hugging Face transformers: ``attn_implementation="spava"`` with a sharded KV cache for decoding.

The attention function is registered with ``AttentionInterface`` under the name ``"spava"`` and applies to the
language model only (``spava_attn_implementation()`` keeps the vision tower on SDPA). It runs inside a
``SpavaSession``, which holds the layout, the process group and a KV cache that it keeps itself, so nothing depends
on the version of transformers' cache classes:

* **prefill** (the first forward in a session): the model runs on this rank's tokens in the zigzag layout (ids or
  embeddings, and position ids, sharded with ``layout.shard``); every attention layer calls
  ``sp_attention`` in the session's mode, then keeps its share of the keys/values: its two blocks, and on rank 0
  also the anchor and the query block. The union over ranks is the whole sequence, each token once. On CUDA,
  without gradients, the calls go through CUDA graphs per ``SpavaConfig.cuda_graphs`` (``graphs.py``: the second
  layer of a signature is captured, the later ones replayed); they are freed when the prefill ends.
* **decode** (``session.decode()`` after the prefill): every rank runs the new token (replicated); each attention
  layer attends it to this rank's cache share and the partials merge by LSE across ranks: exact attention over the
  distributed cache. Rank 0 appends the new token's keys/values to its share.

Call the model with ``use_cache=False`` inside ``spava_session``: the session is the cache.

``SpavaCache`` is the same session as a transformers ``Cache``, for ``model.generate()``: its layers show this
rank's share, and it counts the tokens of the whole sequence (every rank's), which is what transformers' position
computations need. ``spava_ds.models.spava_cache(model)`` makes one and installs the hooks that shard the prompt
(see ``spava_ds/models/generate.py``).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from transformers.cache_utils import Cache, DynamicLayer

from .. import comm, kernels
from ..config import SpavaConfig
from ..graphs import AttentionGraphs
from ..layout import MeshLayout, ZigzagLayout
from ..profiling import span

ATTN_NAME = "spava"
_SESSION: contextvars.ContextVar[Optional["SpavaSession"]] = contextvars.ContextVar("spava_session", default=None)


class SpavaSession:
    """One sequence's prefill and decoding in a sharded layout (see the module docstring)."""

    def __init__(self, layout: ZigzagLayout, config: Optional[SpavaConfig] = None,
                 group: Optional[dist.ProcessGroup] = None, keep_cache: bool = True, simulate: bool = False):
        self.layout = layout
        self.keep_cache = keep_cache  # False for training: no decoding follows, keep no K/V around
        # simulate: one process holds the whole sequence in global order and the prefill runs reference_attention
        # for the layout's W (accuracy studies at any W on one device; exact modes: dense attention); decoding is
        # exact over the whole cache.
        self.simulate = simulate
        self.config = config if config is not None else layout.config
        self.group = group  # attention's group: the DeviceMesh in the two-dimensional mode (MeshLayout)
        # Decoding merges over every rank; the two-dimensional mode's mesh spans the world (comm.init_mesh).
        self.merge_group = None if isinstance(layout, MeshLayout) else group
        self.rank, self.world = comm.group_rank_size(self.merge_group)
        self.decoding = False
        self.cache: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> this rank's k, v [b, n, Hkv, d]
        self.graphs = AttentionGraphs(self.config.cuda_graphs)  # the prefill's CUDA graphs, if any

    def decode(self) -> None:
        """Switch from the prefill to decoding (one token per forward); the prefill's CUDA graphs are freed."""
        if not self.cache:
            raise RuntimeError("SpavaSession.decode(): run the prefill first")
        self.graphs.close()
        self.decoding = True

    def cache_ranges(self) -> List[Tuple[int, int]]:
        """Local (start, end) ranges of the prefill tokens this rank keeps: its layout's ``key_share`` (the same
        question for ``ZigzagLayout`` and ``MeshLayout``)."""
        if self.simulate:
            return [(0, self.layout.total_len)]
        return [(start, end) for start, end, _ in self.layout.key_share(self.rank)]

    def cached_tokens(self) -> int:
        """Tokens in this rank's share of the cache (the same for every layer)."""
        k, _ = next(iter(self.cache.values()))
        return k.shape[1]

    # ---- called by the attention function ------------------------------------------------------------------------
    def prefill(self, layer: int, q, k, v, scale) -> torch.Tensor:
        if not self.simulate:
            out = self.graphs.sp_attention(q, k, v, self.layout, self.config, self.group, layer_idx=layer, scale=scale)
        elif self.config.mode_spec.exact:
            out = kernels.dense_causal_attention(q, k, v, scale)
        else:
            from ..reference import reference_attention  # the test oracle, here as the explicit simulation

            out = reference_attention(q, k, v, self.layout, self.config, layer_idx=layer, scale=scale)
        if self.keep_cache:
            self.cache[layer] = tuple(torch.cat([t[:, s:e] for s, e in self.cache_ranges()], dim=1).detach()
                                      for t in (k, v))
        return out

    def decode_step(self, layer: int, q, k, v, scale) -> torch.Tensor:
        with span("spava.decode"):
            ck, cv = self.cache[layer]
            if self.rank == 0:  # rank 0 owns the query and the generated tokens
                ck, cv = torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1)
                self.cache[layer] = (ck, cv)
            out, lse = kernels.attend(q, ck, cv, backend=self.config.backend, scale=scale)
            return comm.merge_partials(out, lse, self.merge_group, self.world, q.dtype, async_op=False).wait()[0]


class SpavaCacheLayer(DynamicLayer):
    """One layer of a ``SpavaCache``: ``keys``/``values`` ``[b, Hkv, n, d]`` are this rank's share (views of the
    session's cache, set after every forward); the sequence length it reports is the whole sequence's."""

    is_croppable = False

    def __init__(self, cache: "SpavaCache"):
        super().__init__()
        self._cache = cache

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        # The attention function keeps the share (SpavaSession): it needs this forward's own keys and values.
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self._cache.seen_tokens

    def get_mask_sizes(self, query_length: int):
        return self._cache.seen_tokens + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a SpavaCache cannot be cropped (assisted decoding is not supported)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a SpavaCache holds one sequence (no beam search, one sequence per prompt)")

    batch_select_indices = reorder_cache = batch_repeat_interleave


class SpavaCache(Cache):
    """This rank's share of one sequence's keys and values, as a transformers ``Cache`` (``model.generate()``).

    The first forward that gets it is the prefill of the whole prompt (the hooks of ``spava_ds.models.generate``
    shard it into this rank's tokens; the layout is built then, from ``context_len``); every later forward decodes
    one token. ``seen_tokens`` counts the whole sequence so far, so positions computed from ``get_seq_length()``
    are global. Make one with ``spava_ds.models.spava_cache(model)``.
    """

    def __init__(self, num_layers: int, config: Optional[SpavaConfig] = None,
                 group: Optional[dist.ProcessGroup] = None, context_len: Optional[int] = None, family=None):
        super().__init__(layers=[SpavaCacheLayer(self) for _ in range(num_layers)])
        self.family = family  # the model's adapter (spava_ds.models), for the hooks that run generate()
        self.config = config if config is not None else SpavaConfig()
        self.config.check_num_layers(num_layers)
        if self.config.ulysses_degree > 1:
            raise ValueError("SpavaCache (model.generate()) runs the flat layout: the two-dimensional mode "
                             f"(ulysses_degree={self.config.ulysses_degree}) runs through spava_ds.SpavaEngine")
        self.group = group
        self.rank, self.world = comm.group_rank_size(group)
        self.context_len = context_len
        self.session: Optional[SpavaSession] = None
        self.seen_tokens = 0  # every rank's tokens so far: the next token's position
        self._forward_tokens = 0
        self._active = None
        self.scope = contextlib.ExitStack()  # what one forward opened (e.g. a frame-parallel vision tower)

    @property
    def layout(self) -> Optional[ZigzagLayout]:
        return None if self.session is None else self.session.layout

    @property
    def prefilling(self) -> bool:
        return self._active is not None and not self.session.decoding

    def begin(self, tokens: int, context_len: Optional[int] = None) -> None:
        """Start a forward of ``tokens`` tokens: the prefill of the whole prompt (its layout from the cache's
        ``context_len``, else ``context_len`` here, e.g. where the video ends), or one decoding step."""
        if self.session is None:
            context = self.context_len if self.context_len is not None else context_len
            if context is None:
                raise ValueError("SpavaCache: the prefill needs the number of prompt tokens before the question: "
                                 "spava_cache(model, context_len=N)")
            if not 0 < context < tokens:
                raise ValueError(f"SpavaCache: context_len {context} must leave a question in a prompt of "
                                 f"{tokens} tokens")
            self.session = SpavaSession(ZigzagLayout(context, tokens - context, self.world, self.config),
                                        self.config, self.group)
        elif tokens != 1:
            raise ValueError(f"SpavaCache: after the prefill every forward decodes one token, got {tokens}")
        elif not self.session.decoding:
            self.session.decode()
        self._forward_tokens = tokens
        self._active = _SESSION.set(self.session)

    def end(self) -> None:
        """End the forward: close what it opened, count its tokens, show this rank's share in the layers."""
        if self._active is None:
            return
        self.scope.close()
        _SESSION.reset(self._active)
        self._active = None
        self.session.graphs.close()  # the prefill's CUDA graphs (if any): decoding does not use them
        if len(self.session.cache) == len(self.layers):  # else the forward failed: the cache is unusable anyway
            self.seen_tokens += self._forward_tokens
            for idx, layer in enumerate(self.layers):
                k, v = self.session.cache[idx]
                layer.keys, layer.values, layer.is_initialized = k.transpose(1, 2), v.transpose(1, 2), True


@contextlib.contextmanager
def spava_session(layout: ZigzagLayout, config: Optional[SpavaConfig] = None,
                  group: Optional[dist.ProcessGroup] = None, keep_cache: bool = True, simulate: bool = False):
    """Run a model whose language model uses ``attn_implementation="spava"`` on one sharded sequence.

    For training (forward and backward, no decoding) pass ``keep_cache=False``. With ``simulate=True`` one process
    runs the whole sequence (global order) and the prefill simulates the layout's W ranks with
    ``reference_attention``.
    """
    session = SpavaSession(layout, config, group, keep_cache, simulate)
    token = _SESSION.set(session)
    try:
        yield session
    finally:
        _SESSION.reset(token)
        session.graphs.close()


def spava_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                            scaling: Optional[float] = None, **kwargs) -> Tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` function: q ``[b, Hq, s, d]``, k/v ``[b, Hkv, s, d]`` -> ``([b, s, Hq, d], None)``."""
    session = _SESSION.get()
    if session is None:
        raise RuntimeError("attn_implementation='spava' runs inside spava_ds.integrations.transformers."
                           "spava_session(layout, ...): shard the inputs with the layout and open a session")
    if dropout:
        raise ValueError("attn_implementation='spava' does not support attention dropout")
    if kwargs.get("sliding_window"):
        raise ValueError("attn_implementation='spava' does not support sliding-window layers")
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise ValueError("attn_implementation='spava' needs attention modules with a layer_idx")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    if session.decoding:
        out = session.decode_step(layer, q, k, v, scaling)
    else:
        out = session.prefill(layer, q, k, v, scaling)
    return out, None


def register() -> str:
    """Register ``"spava"`` with transformers' ``AttentionInterface`` (idempotent); returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, spava_attention_forward)
    try:  # masks: spava is causal by construction and takes no padding mask
        from transformers.masking_utils import AttentionMaskInterface

        AttentionMaskInterface.register(ATTN_NAME, lambda *args, **kwargs: None)
    except ImportError:  # pragma: no cover - older transformers
        pass
    return ATTN_NAME


def spava_attn_implementation(model_config) -> object:
    """The ``attn_implementation`` argument that routes the language model to Spava and keeps the rest on SDPA."""
    register()
    if hasattr(model_config, "vision_config"):
        return {"text_config": ATTN_NAME, "vision_config": "sdpa", "": "sdpa"}
    return ATTN_NAME


def text_decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack of a causal LM (Llama/Qwen2) or of Qwen2.5-VL's language model."""
    inner = model.model
    return getattr(inner, "language_model", inner)
