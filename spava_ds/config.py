"""SpavaConfig: the knobs of Spava attention, validated once, with the paper's default length rules."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence, Union

# spava: the approximation. ring, ulysses: exact sequence parallelism in the same layout. dense: one process.
# star, apb: baselines for benchmarks (one contiguous block per rank; star has no passing, apb no zigzag).
MODES = ("spava", "ring", "ulysses", "dense", "star", "apb")
CONTIGUOUS_MODES = ("star", "apb")
# Modes that run on the inter groups of the two-dimensional mode (SpavaConfig.ulysses_degree > 1).
MESH_MODES = ("spava", "ring", "star", "apb")
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


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class SpavaConfig:
    """Configuration of Spava attention.

    Args:
        mode: attention mode, one of ``MODES``: ``"spava"`` (approximate, sequence parallel), ``"ring"`` and
            ``"ulysses"`` (exact, sequence parallel), ``"dense"`` (exact, one process), ``"star"`` and ``"apb"``
            (baselines: one contiguous block per rank; star's anchor is a whole block and nothing is passed).
        anchor_len: ``None``/``"auto"`` for the default rule (``default_anchor_len``, capped at one block so short
            inputs still split) or an int >= 0 that overrides it.
        passing_len: top-k budget per virtual host per layer: ``None``/``"auto"`` for the default rule, an int >= 0,
            or a list of ints, one per layer (then ``spava_attention`` needs ``layer_idx``).
        pool_kernel: width of the max-pool that smooths the scores inside a block (odd, >= 1; 1 disables it).
        backend: local attention kernel, one of ``BACKENDS``.
        overlap: overlap the passing-block all-gathers with computation (off only for ablations).
        ulysses_degree: ranks per intra group of the two-dimensional mode (``MeshLayout``): Ulysses (all-to-all
            over heads) inside each group of this many consecutive ranks (a node), the zigzag ``mode`` over the
            W / ulysses_degree groups. 1 (the default) is the flat layout over all W ranks. Modes ``spava``,
            ``ring``, ``star`` and ``apb`` only (``ulysses`` is head-parallel already, ``dense`` one process).
    """

    mode: str = "spava"
    anchor_len: LengthRule = None
    passing_len: Union[LengthRule, Sequence[int]] = None
    pool_kernel: int = 5
    backend: str = "auto"
    overlap: bool = True
    ulysses_degree: int = 1

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"SpavaConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"SpavaConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if not (self.anchor_len in (None, "auto") or (_is_int(self.anchor_len) and self.anchor_len >= 0)):
            raise ValueError(f"SpavaConfig.anchor_len must be None, 'auto' or an int >= 0, got {self.anchor_len!r}")
        p = self.passing_len
        if isinstance(p, (list, tuple)):
            if not p or not all(_is_int(x) and x >= 0 for x in p):
                raise ValueError(
                    f"SpavaConfig.passing_len as a per-layer list must hold ints >= 0 (one per layer), got {p!r}")
            object.__setattr__(self, "passing_len", tuple(p))
        elif not (p in (None, "auto") or (_is_int(p) and p >= 0)):
            raise ValueError(
                f"SpavaConfig.passing_len must be None, 'auto', an int >= 0 or a list of ints >= 0, got {p!r}")
        if not (_is_int(self.pool_kernel) and self.pool_kernel >= 1 and self.pool_kernel % 2 == 1):
            raise ValueError(f"SpavaConfig.pool_kernel must be an odd int >= 1, got {self.pool_kernel!r}")
        if not isinstance(self.overlap, bool):
            raise ValueError(f"SpavaConfig.overlap must be True or False, got {self.overlap!r}")
        if not (_is_int(self.ulysses_degree) and self.ulysses_degree >= 1):
            raise ValueError(f"SpavaConfig.ulysses_degree must be an int >= 1, got {self.ulysses_degree!r}")
        if self.ulysses_degree > 1 and self.mode not in MESH_MODES:
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

    def resolve_anchor_len(self, context_len: int, world_size: int) -> int:
        """Anchor length for a context of ``context_len`` tokens over ``world_size`` ranks.

        An explicit int is taken as is (the layout checks it fits). The default rule is capped at
        ``context_len // (2W + 1)`` so that the anchor never outweighs a block on short inputs.
        """
        if _is_int(self.anchor_len):
            return self.anchor_len
        if self.mode == "star":  # Star Attention: the anchor is a whole block
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
        if _is_int(p):
            return p
        if self.mode == "star":
            return 0
        if self.mode == "apb":  # one block per rank instead of two: twice the budget keeps the per-rank total
            return 2 * default_passing_len(context_len)
        return default_passing_len(context_len)
