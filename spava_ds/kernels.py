"""Local attention that also returns the log-sum-exp (LSE), per backend, and the LSE merge.

Every backend computes, for q ``[b, sq, Hq, d]`` and k, v ``[b, sk, Hkv, d]`` (GQA: query head n uses KV head
n // (Hq / Hkv)), ``out [b, sq, Hq, d]`` in q's dtype and ``lse [b, Hq, sq]`` in fp32 (natural log). ``causal``
is only used on square pieces (sq == sk), where every convention agrees. Pieces of one row set over disjoint key
sets are combined exactly by ``merge``.

Backends: ``math`` (plain PyTorch, fp32 accumulation, any device), ``cpu_flash`` (aten's flash kernel for CPU,
native GQA), ``cudnn``, ``sdpa_flash`` and ``sdpa_efficient`` (the SDPA ops that return the LSE on CUDA; the
last one also takes fp32), ``flash_attn`` (the flash-attn package, when installed). ``dense_causal_attention`` is
exact causal attention over a whole sequence (SDPA): mode ``dense``, Ulysses' local attention, and the tests' oracle.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import os
import types
from typing import Callable, Dict, List, Optional, Tuple

import torch

AttnOut = Tuple[torch.Tensor, torch.Tensor]


@functools.lru_cache(maxsize=None)
def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@functools.lru_cache(maxsize=None)  # called for every attention piece: the import search alone costs ~30 us
def auto_backend(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    """The fastest measured backend for a device and dtype (see docs/benchmarks.md)."""
    if device.type == "cpu":
        return "cpu_flash" if dtype != torch.float64 else "math"
    if device.type == "cuda":
        if dtype == torch.float32:
            return "sdpa_efficient"  # the fused CUDA kernels for fp16/bf16 do not take fp32
        if dtype == torch.float64:
            return "math"
        if flash_attn_available():
            return "flash_attn"
        if torch.backends.cudnn.is_available() and torch.cuda.get_device_capability(device) >= (8, 0):
            return "cudnn"
        return "sdpa_flash"
    return "math"


def _math(q, k, v, causal, scale) -> AttnOut:
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(acc).view(b, sq, hkv, hq // hkv, d)
    scores = torch.einsum("bqhgd,bkhd->bhgqk", qg, k.to(acc)) * scale
    if causal:
        mask = torch.ones(sq, k.shape[1], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhgqk,bkhd->bqhgd", torch.exp(scores - lse.unsqueeze(-1)), v.to(acc))
    return out.reshape(b, sq, hq, d).to(q.dtype), lse.reshape(b, hq, sq).float()


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


def _expand_kv(x: torch.Tensor, hq: int) -> torch.Tensor:
    """[b, s, Hkv, d] -> [b, Hq, s, d] for kernels without native GQA."""
    g = hq // x.shape[2]
    return _bhsd(x) if g == 1 else _bhsd(x).repeat_interleave(g, dim=1)


def _cpu_flash(q, k, v, causal, scale) -> AttnOut:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _bhsd(q), _bhsd(k), _bhsd(v), 0.0, causal, scale=scale)
    return _bhsd(out), lse.float()


def _lse(lse: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The kernels' LSE ([b, H, s], [b, H, s, 1] or padded [b, H, s_pad]) as fp32 [b, H, s]."""
    b, sq, hq, _ = q.shape
    return lse.reshape(b, hq, -1)[..., :sq].float()


def _cudnn(q, k, v, causal, scale) -> AttnOut:
    # cuDNN takes fewer KV heads than query heads as they are (checked against repeated KV on H100, torch 2.11).
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        _bhsd(q), _bhsd(k), _bhsd(v), None, True, 0.0, causal, False, scale=scale)
    return _bhsd(res[0]), _lse(res[1], q)


def _sdpa_flash(q, k, v, causal, scale) -> AttnOut:
    hq = q.shape[2]
    res = torch.ops.aten._scaled_dot_product_flash_attention(
        _bhsd(q), _expand_kv(k, hq), _expand_kv(v, hq), 0.0, causal, False, scale=scale)
    return _bhsd(res[0]), _lse(res[1], q)


def _sdpa_efficient(q, k, v, causal, scale) -> AttnOut:
    hq = q.shape[2]
    res = torch.ops.aten._scaled_dot_product_efficient_attention(
        _bhsd(q), _expand_kv(k, hq), _expand_kv(v, hq), None, True, 0.0, causal, scale=scale)
    return _bhsd(res[0]), _lse(res[1], q)


def _flash_attn(q, k, v, causal, scale) -> AttnOut:
    from flash_attn import flash_attn_func

    out, lse, _ = flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, return_attn_probs=True)
    return out, lse.float()


_BACKENDS = {"math": _math, "cpu_flash": _cpu_flash, "cudnn": _cudnn, "sdpa_flash": _sdpa_flash,
             "sdpa_efficient": _sdpa_efficient, "flash_attn": _flash_attn}


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, backend: str = "auto",
           scale: Optional[float] = None) -> AttnOut:
    """Attention of q over k/v returning ``(out, lse)``; see the module docstring for shapes."""
    b, sq, hq, d = q.shape
    if causal and sq != k.shape[1]:
        raise ValueError(f"attend: causal pieces must be square, got {sq} queries and {k.shape[1]} keys")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if sq == 0 or k.shape[1] == 0:
        # No keys: zero output with LSE -inf, so the piece weighs nothing in a merge.
        return (q.new_zeros(b, sq, hq, v.shape[-1]),
                torch.full((b, hq, sq), float("-inf"), dtype=torch.float32, device=q.device))
    if backend == "auto":
        backend = auto_backend(q.device, q.dtype)
    return _BACKENDS[backend](q, k, v, causal, scale)


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           scale: Optional[float] = None) -> torch.Tensor:
    """Exact causal attention over the whole sequence ([b, s, h, d] in and out, GQA native), via SDPA."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale,
        enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


# ---- backward -------------------------------------------------------------------------------------------------
# Every piece's backward uses the *merged* output and LSE of its rows: with them, exp(s - lse) is the probability
# under the softmax over all pieces, so the per-piece gradients add up to the gradient of the whole attention.


def _math_backward(dout, q, k, v, out, lse, causal, scale):
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg, kf, vf = q.to(acc).view(b, sq, hkv, g, d), k.to(acc), v.to(acc)
    do = dout.to(acc).view(b, sq, hkv, g, d)
    scores = torch.einsum("bqhgd,bkhd->bhgqk", qg, kf) * scale
    if causal:
        mask = torch.ones(sq, k.shape[1], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.exp(scores - lse.to(acc).view(b, hkv, g, sq, 1))
    dv = torch.einsum("bhgqk,bqhgd->bkhd", probs, do)
    dprobs = torch.einsum("bqhgd,bkhd->bhgqk", do, vf)
    delta = (do * out.to(acc).view(b, sq, hkv, g, d)).sum(-1).permute(0, 2, 3, 1).unsqueeze(-1)
    dscores = probs * (dprobs - delta) * scale
    dq = torch.einsum("bhgqk,bkhd->bqhgd", dscores, kf).reshape(b, sq, hq, d)
    dk = torch.einsum("bhgqk,bqhgd->bkhd", dscores, qg)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _cpu_flash_backward(dout, q, k, v, out, lse, causal, scale):
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        _bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), lse.contiguous(), 0.0, causal, scale=scale)
    return _bhsd(dq), _bhsd(dk), _bhsd(dv)


def _fold_kv_grad(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """[b, Hq, s, d] gradient of repeated KV heads -> [b, s, Hkv, d]."""
    b, hq, s, d = x.shape
    return x.view(b, hkv, hq // hkv, s, d).sum(2).transpose(1, 2)


def _cuda_backward(op):
    def run(dout, q, k, v, out, lse, causal, scale):
        b, sq, hq, d = q.shape
        hkv = k.shape[2]
        args = [t.transpose(1, 2).contiguous() for t in (dout, q)]
        kv = [_expand_kv(t, hq).contiguous() for t in (k, v)]
        dq, dk, dv = op(args[0], args[1], kv[0], kv[1], _bhsd(out).contiguous(), lse.contiguous(), causal, scale)
        return _bhsd(dq), _fold_kv_grad(dk, hkv), _fold_kv_grad(dv, hkv)
    return run


def _cudnn_bwd_op(dout, q, k, v, out, lse, causal, scale):
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse.unsqueeze(-1), None, None, None, None, None, q.shape[2], k.shape[2], 0.0, causal,
        scale=scale)  # None: no dropout state, no bias, not variable-length


def _sdpa_flash_bwd_op(dout, q, k, v, out, lse, causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, None, None, q.shape[2], k.shape[2], 0.0, causal, None, None, scale=scale)


def _sdpa_efficient_bwd_op(dout, q, k, v, out, lse, causal, scale):
    pad = (-lse.shape[-1]) % 32  # the kernel keeps its LSE padded to a multiple of 32 rows
    res = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, None, out, torch.nn.functional.pad(lse, (0, pad)), None, None, 0.0,
        [True, True, True, False], causal, scale=scale)
    return res[0], res[1], res[2]


def _flash_attn_backward(dout, q, k, v, out, lse, causal, scale):
    from flash_attn.flash_attn_interface import _flash_attn_backward

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _flash_attn_backward(dout.contiguous(), q, k, v, out.contiguous(), lse.contiguous(), dq, dk, dv, 0.0, scale,
                         causal, (-1, -1), 0.0, None, False)
    return dq, dk, dv


def _sdpa_efficient_backward(dout, q, k, v, out, lse, causal, scale):
    # The efficient op's backward fed an outside LSE is right in fp32 only (bf16 gave wrong gradients on H100,
    # torch 2.11); half precision takes the FA2 op's backward, which is exact with any merged LSE.
    op = _sdpa_efficient_bwd_op if q.dtype == torch.float32 else _sdpa_flash_bwd_op
    return _cuda_backward(op)(dout, q, k, v, out, lse, causal, scale)


_BACKWARDS = {"math": _math_backward, "cpu_flash": _cpu_flash_backward, "cudnn": _cuda_backward(_cudnn_bwd_op),
              "sdpa_flash": _cuda_backward(_sdpa_flash_bwd_op), "sdpa_efficient": _sdpa_efficient_backward,
              "flash_attn": _flash_attn_backward}


def attend_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, causal: bool = False, backend: str = "auto",
                    scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of one piece, given the merged ``out``/``lse`` of its rows and their ``dout``."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if q.shape[1] == 0 or k.shape[1] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if backend == "auto":
        backend = auto_backend(q.device, q.dtype)
    return _BACKWARDS[backend](dout, q, k, v, out.to(q.dtype), lse, causal, scale)


def _merge_pair(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor,
                out_dtype: torch.dtype) -> AttnOut:
    lse = torch.logaddexp(l1, l2)
    safe = lse.masked_fill(torch.isinf(lse), 0.0)  # rows with no key in either piece keep weight 0, not nan
    w1 = torch.exp(l1 - safe).transpose(1, 2).unsqueeze(-1)
    w2 = torch.exp(l2 - safe).transpose(1, 2).unsqueeze(-1)
    return (o1.float() * w1 + o2.float() * w2).to(out_dtype), lse


# The pairwise merge is compiled on these device types (the CPU test of the recompile budget adds "cpu").
COMPILE_DEVICES = ("cuda",)
COMPILE_BACKEND = "inductor"
_compiled_merges: dict = {}  # (dtypes, layouts) -> (code copy, compiled function)
_compile_failed = False
_log = logging.getLogger("spava_ds")


def _own_code_copy(fn):
    """``fn`` with a code object of its own: dynamo keeps compiled variants, and its recompile limit (8), per code
    object, so one copy per dtype signature keeps the ring, Spava, fp32 and decode variants from crowding each other
    out (past the limit dynamo silently runs the function eagerly)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


# Below this many output elements the eager merge is used: a compiled call costs ~200 us of host time (guards,
# wrappers, launches) against ~100 us for the eager ops, and a few query rows' merge is no GPU work to speak of.
COMPILE_MIN_NUMEL = 1 << 21


def _merge_pair_for(o1: torch.Tensor, o2: torch.Tensor, out_dtype: torch.dtype):
    """On CUDA the pairwise merge of large pieces is compiled into one fused kernel: eager it costs ~10 memory
    passes over the block's output, about 1 ms per 16K-token block at Qwen2.5-VL-7B shapes on an H100."""
    if (o1.device.type not in COMPILE_DEVICES or os.environ.get("SPAVA_COMPILE", "1") == "0" or _compile_failed
            or o1.numel() < COMPILE_MIN_NUMEL):
        return _merge_pair
    key = (o1.dtype, o2.dtype, out_dtype, o1.is_contiguous(), o2.is_contiguous())
    if key not in _compiled_merges:
        code_copy = _own_code_copy(_merge_pair)
        _compiled_merges[key] = (code_copy, torch.compile(code_copy, dynamic=True, fullgraph=True,
                                                          backend=COMPILE_BACKEND))
    return _compiled_merges[key][1]


def compiled_merges() -> Dict[tuple, Callable]:
    """The pairwise merges compiled so far: signature (dtypes, contiguity) -> the function dynamo compiled (its own
    code copy, whose cache entries are that signature's compiled variants)."""
    return {key: code_copy for key, (code_copy, _) in _compiled_merges.items()}


def _pair(o1, l1, o2, l2, out_dtype) -> AttnOut:
    global _compile_failed
    fn = _merge_pair_for(o1, o2, out_dtype)
    if fn is _merge_pair:
        return fn(o1, l1, o2, l2, out_dtype)
    try:  # contiguous LSEs (small) keep their strides out of the compiled variants' guards
        return fn(o1, l1.contiguous(), o2, l2.contiguous(), out_dtype)
    except Exception as e:  # noqa: BLE001 - a compiler failure; eager is exact too
        _log.warning("spava_ds: compiled LSE merge failed (%s: %s); using the eager merge from now on",
                     type(e).__name__, str(e).splitlines()[0][:200])
        _compile_failed = True
        return _merge_pair(o1, l1, o2, l2, out_dtype)


def merge(parts: List[AttnOut], out_dtype: Optional[torch.dtype] = None) -> AttnOut:
    """Exact combination of attention pieces over disjoint key sets of the same query rows.

    Weights and accumulation are fp32; the result has ``out_dtype`` (default: the first piece's dtype).
    """
    out_dtype = out_dtype or parts[0][0].dtype
    out, lse = parts[0]
    for i, (o, l) in enumerate(parts[1:], start=2):
        out, lse = _pair(out, lse, o, l, out_dtype if i == len(parts) else torch.float32)
    return out.to(out_dtype), lse


def merge_stacked(out: torch.Tensor, lse: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> AttnOut:
    """``merge`` of n pieces stacked on a leading dimension, in one pass (a handful of ops whatever n is).

    ``out [n, b, s, H, d]`` and ``lse [n, b, s, H]`` (rows before heads, the layout in which partials travel
    packed); returns ``out [b, s, H, d]`` in ``out_dtype`` (default: ``out``'s) and ``lse [b, s, H]`` in fp32.
    """
    lse = lse.float()
    total = torch.logsumexp(lse, dim=0)
    weights = torch.exp(lse - total.masked_fill(torch.isinf(total), 0.0))  # rows with no key anywhere: weight 0
    merged = (out.float() * weights.unsqueeze(-1)).sum(dim=0)
    return merged.to(out_dtype or out.dtype), total
