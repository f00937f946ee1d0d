"""Query-aware selection of the passing block: which keys of a block travel to the later virtual hosts.

Score of a context token t for KV head g: <k[t, g], qbar[g]>, with qbar[g] the mean of the post-RoPE query vectors
over the query block's tokens and over the query heads of group g (no 1/sqrt(d), no softmax), in fp32 (fp64 for
fp64 inputs). Scores are max-pooled inside the block (the window never crosses a block boundary) and the top-k are
taken per KV head. Ties go to the earlier token, so the choice is deterministic on every device and in the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def query_summary(q_query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[b, lq, Hq, d]`` query rows -> ``[b, Hkv, d]`` fp32 mean over tokens and over each KV group's heads."""
    b, lq, hq, d = q_query.shape
    if lq == 0:
        raise ValueError("Spava's selection needs a query block (query_len >= 1): it scores keys against the query")
    acc = torch.float64 if q_query.dtype == torch.float64 else torch.float32
    return q_query.to(acc).view(b, lq, num_kv_heads, hq // num_kv_heads, d).mean(dim=(1, 3))


def block_scores(k_block: torch.Tensor, qbar: torch.Tensor, pool_kernel: int) -> torch.Tensor:
    """Pooled scores ``[b, Hkv, n]`` of the ``n`` keys of one block ``[b, n, Hkv, d]``."""
    scores = torch.einsum("bnhd,bhd->bhn", k_block.to(qbar.dtype), qbar)
    if pool_kernel > 1:
        # max_pool1d pads with -inf, so the window stays inside the block.
        scores = F.max_pool1d(scores, pool_kernel, stride=1, padding=pool_kernel // 2)
    return scores


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[b, Hkv, k]`` of the k best scores per head, ties to the earlier token, in position order."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.sort(order, dim=-1).values


def gather_passing(k_block: torch.Tensor, v_block: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Selected keys and values of one block, packed as ``[b, k, Hkv, 2d]`` (K then V on the last dim)."""
    d = k_block.shape[-1]
    index = idx.transpose(1, 2).unsqueeze(-1).expand(-1, -1, -1, d)
    return torch.cat([k_block.gather(1, index), v_block.gather(1, index)], dim=-1)


def select_passing(k_block: torch.Tensor, v_block: torch.Tensor, qbar: torch.Tensor, k: int,
                   pool_kernel: int) -> torch.Tensor:
    """The passing block of one virtual host: its top-``k`` keys/values per KV head, ``[b, k, Hkv, 2d]``."""
    idx = topk_indices(block_scores(k_block, qbar, pool_kernel), k)
    return gather_passing(k_block, v_block, idx)
