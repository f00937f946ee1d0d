"""SpavaConfig: the knobs of Spava attention, validated once, with the paper's default length rules."""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Mapping, Optional, Sequence, Union


@dataclasses.dataclass(frozen=True)
class Mode:
    """What one attention mode is. Every place where the mode matters reads it from ``MODE_TABLE``.

    Attributes:
        layout: ``"zigzag"`` (2W blocks, rank r holds blocks r and 2W-1-r) or ``"contiguous"`` (W blocks, rank r
            holds block r).
        passing: what a block sees of the earlier blocks: ``"topk"`` (each block's query-aware top-k keys),
            ``"whole"`` (every key: exact), ``"none"`` (the mode does not pass blocks).
        schedule: who computes what: ``"blocks"`` (the block schedule of ``attention.py``), ``"heads"`` (Ulysses:
            all-to-alls give every rank the whole sequence for W-th of the heads), ``"local"`` (one process).
        anchor: the default anchor: ``"rule"`` (``default_anchor_len``, capped at one block) or ``"block"`` (a whole
            block, as Star Attention has it).
        passing_scale: the default top-k budget as a multiple of ``default_passing_len`` (0: nothing is passed
            unless ``passing_len`` is set).
        exact: the mode computes dense causal attention.
        needs_query: the mode needs a query block (its selection scores keys against the query).
        mesh: the mode runs on the inter groups of the two-dimensional mode (``SpavaConfig.ulysses_degree > 1``):
            the block schedule does; ulysses is head-parallel already, dense is one process.
    """

    layout: str
    passing: str
    schedule: str
    anchor: str
    passing_scale: int
    exact: bool
    needs_query: bool
    mesh: bool


# spava: the approximation. ring, ulysses: exact sequence parallelism in the same layout. dense: one process.
# star, apb: baselines for benchmarks (one contiguous block per rank; star passes nothing, apb has no zigzag and
# twice Spava's budget per block, which keeps the per-rank total).
MODE_TABLE = {
    #               layout        passing  schedule  anchor   scale  exact  needs_query  mesh
    "spava":   Mode("zigzag",     "topk",  "blocks", "rule",  1,     False, True,        True),
    "ring":    Mode("zigzag",     "whole", "blocks", "rule",  0,     True,  False,       True),
    "ulysses": Mode("zigzag",     "none",  "heads",  "rule",  0,     True,  False,       False),
    "dense":   Mode("zigzag",     "none",  "local",  "rule",  0,     True,  False,       False),
    "star":    Mode("contiguous", "topk",  "blocks", "block", 0,     False, True,        True),
    "apb":     Mode("contiguous", "topk",  "blocks", "rule",  2,     False, True,        True),
}  # noqa: E241
MODES = tuple(MODE_TABLE)
CONTIGUOUS_MODES = tuple(m for m, spec in MODE_TABLE.items() if spec.layout == "contiguous")
MESH_MODES = tuple(m for m, spec in MODE_TABLE.items() if spec.mesh)  # those that run 2-D
# "auto" picks per device (see kernels.auto_backend); "math" is plain PyTorch and runs anywhere.
BACKENDS = ("auto", "math", "cpu_flash", "cudnn", "sdpa_flash", "sdpa_efficient", "flash_attn")

LengthRule = Union[None, str, int]


def _round_up_128(x: int) -> int:
    return 128 * math.ceil(x / 128)


def default_anchor_len(context_len: int) -> int:
    """The reference code's anchor rule: 128 * ceil(floor(L / 64) / 128), L = context tokens (query excluded)."""
    return _round_up_128(context_len // 64)


def default_passing_len(context_len: int) -> int:
    """Passing budget per virtual host per layer: 128 * ceil(floor(L / 128) / 128)."""
    return _round_up_128(context_len // 128)


def as_int(x: Any) -> Optional[int]:
    """``x`` as a Python int when it is an integral number (int, numpy or 0-d torch integer), else None.

    Booleans are not numbers here."""
    if isinstance(x, bool) or "bool" in str(getattr(x, "dtype", "")):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


def _length_rule(name: str, value: Any, per_layer: bool) -> Union[LengthRule, tuple]:
    """A validated length rule: None/"auto", an int >= 0, or (``per_layer``) a tuple of ints >= 0."""
    if value is None or (isinstance(value, str) and value == "auto"):
        return value
    n = as_int(value)
    if n is not None and n >= 0:
        return n
    if per_layer and isinstance(value, (list, tuple)):
        layers = [as_int(x) for x in value]
        if layers and all(x is not None and x >= 0 for x in layers):
            return tuple(layers)
        raise ValueError(f"SpavaConfig.{name} as a per-layer list must hold ints >= 0 (one per layer), got {value!r}")
    kinds = "None, 'auto', an int >= 0 or a list of ints >= 0" if per_layer else "None, 'auto' or an int >= 0"
    raise ValueError(f"SpavaConfig.{name} must be {kinds}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SpavaConfig:
    """Configuration of Spava attention.

    Args:
        mode: attention mode, one of ``MODES`` (described by ``MODE_TABLE``): ``"spava"`` (approximate, sequence
            parallel), ``"ring"`` and ``"ulysses"`` (exact, sequence parallel), ``"dense"`` (exact, one process),
            ``"star"`` and ``"apb"`` (baselines: one contiguous block per rank; star's anchor is a whole block and
            nothing is passed).
        anchor_len: ``None``/``"auto"`` for the default rule (``default_anchor_len``, capped at one block so short
            inputs still split) or an int >= 0 that overrides it.
        passing_len: top-k budget per virtual host per layer: ``None``/``"auto"`` for the default rule, an int >= 0,
            or a list of ints, one per layer (then ``spava_attention`` needs ``layer_idx``).
        pool_kernel: width of the max-pool that smooths the scores inside a block (odd, >= 1; 1 disables it).
        backend: local attention kernel, one of ``BACKENDS``.
        overlap: overlap the passing-block all-gathers with computation (off only for ablations).
        ulysses_degree: ranks per intra group of the two-dimensional mode (``MeshLayout``): Ulysses (all-to-all
            over heads) inside each group of this many consecutive ranks (a node), the zigzag ``mode`` over the
            W / ulysses_degree groups. 1 (the default) is the flat layout over all W ranks. Only the modes
            whose ``MODE_TABLE`` row has ``mesh`` (``MESH_MODES``: the block schedule; ``ulysses`` is head-parallel
            already, ``dense`` one process).
        cuda_graphs: inference prefill on CUDA through CUDA graphs of each layer's attention (``graphs.py``):
            ``"auto"`` (default: where the host time matters, at most ``graphs.AUTO_MAX_TOKENS_PER_RANK`` tokens
            per rank), ``True`` (every call that can be captured), ``False`` (never). Read by ``SpavaSession``;
            calls that need gradients, on the CPU or on gloo always run eagerly.

    Integral numbers of any kind (numpy, 0-d torch tensors) are taken as Python ints. ``config.mode_spec`` is the
    mode's ``Mode`` row.
    """

    mode: str = "spava"
    anchor_len: LengthRule = None
    passing_len: Union[LengthRule, Sequence[int]] = None
    pool_kernel: int = 5
    backend: str = "auto"
    overlap: bool = True
    ulysses_degree: int = 1
    cuda_graphs: Union[str, bool] = "auto"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"SpavaConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"SpavaConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        object.__setattr__(self, "anchor_len", _length_rule("anchor_len", self.anchor_len, per_layer=False))
        object.__setattr__(self, "passing_len", _length_rule("passing_len", self.passing_len, per_layer=True))
        pool = as_int(self.pool_kernel)
        if pool is None or pool < 1 or pool % 2 == 0:
            raise ValueError(f"SpavaConfig.pool_kernel must be an odd int >= 1, got {self.pool_kernel!r}")
        object.__setattr__(self, "pool_kernel", pool)
        if not isinstance(self.overlap, bool):
            raise ValueError(f"SpavaConfig.overlap must be True or False, got {self.overlap!r}")
        if not (self.cuda_graphs == "auto" or isinstance(self.cuda_graphs, bool)):
            raise ValueError(f"SpavaConfig.cuda_graphs must be 'auto', True or False, got {self.cuda_graphs!r}")
        object.__setattr__(self, "mode_spec", MODE_TABLE[self.mode])  # not a field: read on every call
        degree = as_int(self.ulysses_degree)
        if degree is None or degree < 1:
            raise ValueError(f"SpavaConfig.ulysses_degree must be an int >= 1, got {self.ulysses_degree!r}")
        object.__setattr__(self, "ulysses_degree", degree)
        if degree > 1 and not self.mode_spec.mesh:
            raise ValueError(f"SpavaConfig.ulysses_degree > 1 (the two-dimensional mode) needs a mode in {MESH_MODES}, "
                             f"got {self.mode!r}")

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]]) -> "SpavaConfig":
        """Build from a mapping such as the ``"spava"`` block of a DeepSpeed JSON; unknown keys are an error."""
        d = dict(d or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown SpavaConfig key(s) {unknown}; valid keys are {valid}")
        return cls(**d)

    @classmethod
    def from_json(cls, path: str) -> "SpavaConfig":
        """The ``"spava"`` block of a DeepSpeed JSON config file (defaults when the block is absent)."""
        import json

        with open(path, encoding="utf-8") as f:
            block = json.load(f).get("spava")
        try:
            return cls.from_dict(block)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(d["passing_len"], tuple):
            d["passing_len"] = list(d["passing_len"])
        return d

    def check_num_layers(self, num_layers: int) -> None:
        """Raise ``ValueError`` unless a per-layer ``passing_len`` has one entry per layer of the model.

        Engines and training loops call it once they know the model, so that a wrong list fails before the forward
        instead of at the first layer without an entry.
        """
        p = self.passing_len
        if isinstance(p, tuple) and len(p) != num_layers:
            raise ValueError(f"SpavaConfig.passing_len has {len(p)} per-layer budgets, but the model has {num_layers} "
                             "attention layers: give one budget per layer (or one int for all)")

    def resolve_anchor_len(self, context_len: int, world_size: int) -> int:
        """Anchor length for a context of ``context_len`` tokens over ``world_size`` ranks.

        An explicit int is taken as is (the layout checks it fits). The default rule is capped at
        ``context_len // (2W + 1)`` so that the anchor never outweighs a block on short inputs.
        """
        if isinstance(self.anchor_len, int):
            return self.anchor_len
        if self.mode_spec.anchor == "block":  # Star Attention: the anchor is a whole block
            return context_len // (world_size + 1)
        return min(default_anchor_len(context_len), context_len // (2 * world_size + 1))

    def resolve_passing_len(self, context_len: int, layer_idx: Optional[int] = None) -> int:
        """Passing budget (tokens per virtual host, per KV head) for one layer."""
        p = self.passing_len
        if isinstance(p, tuple):
            if layer_idx is None:
                raise ValueError("SpavaConfig.passing_len is a per-layer list: pass layer_idx to spava_attention")
            if not 0 <= layer_idx < len(p):
                raise ValueError(
                    f"layer_idx {layer_idx} is outside the per-layer passing_len list of length {len(p)}")
            return p[layer_idx]
        if isinstance(p, int):
            return p
        return self.mode_spec.passing_scale * default_passing_len(context_len)
