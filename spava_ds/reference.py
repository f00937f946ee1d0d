"""Single-process simulation of Spava over the 2W virtual hosts: the ground truth for tests and accuracy studies.

It works on full-sequence tensors in global order, walks the virtual hosts one by one with explicit masks and
plain PyTorch, and never communicates, so it runs at any W on one device.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .config import SpavaConfig
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


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           scale: Optional[float] = None) -> torch.Tensor:
    """Exact causal attention over the whole sequence ([b, s, h, d] in and out), via SDPA."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: ZigzagLayout,
                        config: Optional[SpavaConfig] = None, layer_idx: Optional[int] = None,
                        scale: Optional[float] = None) -> torch.Tensor:
    """Spava's output for the whole sequence, computed in one process.

    q ``[b, L + lq, Hq, d]``, k/v ``[b, L + lq, Hkv, d]`` in global order (context then query). Returns
    ``[b, L + lq, Hq, d]``; ``layout.shard(out, r)`` is what rank r's ``spava_attention`` returns.
    """
    config = config if config is not None else layout.config
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
