"""Single-process simulation of Spava over the 2W virtual hosts: the ground truth for tests and accuracy studies.

It works on full-sequence tensors in global order, walks the virtual hosts one by one with explicit masks and
plain PyTorch, and never communicates, so it runs at any W on one device. Production code imports it only for the
explicit simulate mode (``spava_session(..., simulate=True)``); the exact oracle, dense causal attention, lives in
``kernels.py``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .config import SpavaConfig
from .kernels import dense_causal_attention  # noqa: F401 - the exact oracle, kept importable from here
from .layout import ZigzagLayout
from .select import query_summary, select_passing


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: Optional[float] = None) -> torch.Tensor:
    """Softmax attention with an explicit boolean ``mask [sq, sk]`` (True = visible), GQA by head groups.

    q ``[b, sq, Hq, d]``, k/v ``[b, sk, Hkv, d]``; computed in fp32 (fp64 for fp64 inputs).
    """
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores = torch.einsum("bqhgd,bkhd->bhgqk", q.to(acc).view(b, sq, hkv, hq // hkv, d), k.to(acc)) * scale
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("bhgqk,bkhd->bqhgd", probs, v.to(acc)).reshape(b, sq, hq, d).to(q.dtype)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: ZigzagLayout,
                        config: Optional[SpavaConfig] = None, layer_idx: Optional[int] = None,
                        scale: Optional[float] = None) -> torch.Tensor:
    """Spava's output for the whole sequence, computed in one process.

    q ``[b, L + lq, Hq, d]``, k/v ``[b, L + lq, Hkv, d]`` in global order (context then query). Returns
    ``[b, L + lq, Hq, d]``; ``layout.shard(out, r)`` is what rank r's ``spava_attention`` returns.
    """
    config = config if config is not None else layout.config
    if config.mode_spec.passing != "topk":
        raise ValueError(f"reference_attention simulates the modes that pass top-k keys (spava, star, apb); mode "
                         f"{config.mode!r} is exact: compare it with dense_causal_attention")
    if q.shape[1] != layout.total_len:
        raise ValueError(f"reference_attention: got {q.shape[1]} tokens, the layout has {layout.total_len}")
    if layout.query_len == 0:
        raise ValueError("reference_attention needs a query block (query_len >= 1)")
    la, (qs, qe) = layout.anchor_len, layout.query_range
    dev = q.device
    passing = config.resolve_passing_len(layout.context_len, layer_idx)
    qbar = query_summary(q[:, qs:qe], k.shape[2])

    def causal(n: int) -> torch.Tensor:
        return torch.ones(n, n, dtype=torch.bool, device=dev).tril()

    outputs = [masked_attention(q[:, :la], k[:, :la], v[:, :la], causal(la), scale)]
    passing_k, passing_v = [], []  # selections of the virtual hosts seen so far, in sequence order
    for start, end in layout.block_bounds:
        n = end - start
        pk = torch.cat(passing_k + [k[:, :la], k[:, start:end]], dim=1)
        pv = torch.cat(passing_v + [v[:, :la], v[:, start:end]], dim=1)
        visible_prefix = pk.shape[1] - n  # passing and anchor: fully visible to the block rows
        mask = torch.cat([torch.ones(n, visible_prefix, dtype=torch.bool, device=dev), causal(n)], dim=1)
        outputs.append(masked_attention(q[:, start:end], pk, pv, mask, scale))
        if passing > 0:
            sel = select_passing(k[:, start:end], v[:, start:end], qbar, min(passing, n), config.pool_kernel)
            d = k.shape[-1]
            passing_k.append(sel[..., :d])
            passing_v.append(sel[..., d:])
    # The query rows see everything before them: exact causal attention.
    lq = qe - qs
    mask = torch.cat([torch.ones(lq, qs, dtype=torch.bool, device=dev), causal(lq)], dim=1)
    outputs.append(masked_attention(q[:, qs:qe], k, v, mask, scale))
    return torch.cat(outputs, dim=1)
