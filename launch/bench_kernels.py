"""Local Spava attention on one GPU against dense causal SDPA, at Qwen2.5-VL-7B head shapes.

One virtual host's work per layer: rows ``[anchor | block]`` attend causally to ``[anchor | block]`` and the block
rows also attend to the passing block (every key of it). The achieved rate counts only unmasked work:
``4 * d * Hq * pairs``. Every variant is checked against an fp32 reference before it is timed.

    python launch/bench_kernels.py                       # blocks of 16K and 32K, the default rules at W = 4
    python launch/bench_kernels.py --blocks 16384 --world 4 --out docs/kernels.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from spava_ds import default_anchor_len, default_passing_len, entry
from spava_ds.kernels import attend, flash_attn_available, merge


def cuda_time(fn, warmup=3, iters=10) -> float:
    """Median milliseconds of ``fn`` over ``iters`` runs after ``warmup``, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def split_block1(backend):
    """As spava_attention does for block r: causal over [A|B], then B rows x passing, merged by LSE."""
    def run(q, k, v, pk, pv, la):
        out_ab, lse_ab = attend(q, k, v, causal=True, backend=backend)
        out_b, _ = merge([(out_ab[:, la:], lse_ab[:, :, la:]), attend(q[:, la:], pk, pv, backend=backend)])
        return torch.cat([out_ab[:, :la], out_b], dim=1)
    return run


def split_block2(backend):
    """As spava_attention does for block 2W-1-r: B rows x [passing | anchor] (one concat), then B causal."""
    def run(q, k, v, pk, pv, la):
        out_a, _ = attend(q[:, :la], k[:, :la], v[:, :la], causal=True, backend=backend)
        prefix_k, prefix_v = torch.cat([pk, k[:, :la]], 1), torch.cat([pv, v[:, :la]], 1)
        out_b, _ = merge([attend(q[:, la:], prefix_k, prefix_v, backend=backend),
                          attend(q[:, la:], k[:, la:], v[:, la:], causal=True, backend=backend)])
        return torch.cat([out_a, out_b], dim=1)
    return run


def calls_only(backend):
    """The two kernel calls of the block-r split without the merge: how much the merge costs."""
    def run(q, k, v, pk, pv, la):
        attend(q, k, v, causal=True, backend=backend)
        attend(q[:, la:], pk, pv, backend=backend)
    return run


def flex_variant():
    """One flex_attention call (compiled) over [P | A | B] keys with the Spava block mask, LSE returned."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    cache = {}

    def run(q, k, v, pk, pv, la):
        p = pk.shape[1]
        key = (q.shape[1], p, la)
        if key not in cache:
            def mask_mod(b, h, qi, kv):
                anchor_row = (kv >= p) & (kv - p <= qi)
                block_row = (kv < p + la) | (kv - p <= qi)
                return torch.where(qi < la, anchor_row, block_row)
            cache[key] = create_block_mask(mask_mod, None, None, q.shape[1], p + q.shape[1], device=q.device)
        kk, vv = torch.cat([pk, k], 1).transpose(1, 2), torch.cat([pv, v], 1).transpose(1, 2)
        out, _ = compiled(q.transpose(1, 2), kk, vv, block_mask=cache[key], enable_gqa=True, return_lse=True)
        return out.transpose(1, 2)
    return run


def reference(q, k, v, pk, pv, la):
    """fp32 reference on a slice of rows (checks, not timed)."""
    n = q.shape[1]
    keys, vals = torch.cat([pk, k], 1).float(), torch.cat([pv, v], 1).float()
    p = pk.shape[1]
    g = q.shape[2] // k.shape[2]
    rows = torch.cat([torch.arange(0, min(la, 64)), torch.arange(n - 64, n)]).to(q.device)
    s = torch.einsum("bqhd,bkhd->bhqk", q[:, rows].float(), keys.repeat_interleave(g, 2)) / q.shape[-1] ** 0.5
    kv = torch.arange(p + n, device=q.device)[None]
    qi = rows[:, None]
    mask = torch.where(qi < la, (kv >= p) & (kv - p <= qi), (kv < p + la) | (kv - p <= qi))
    probs = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    return rows, torch.einsum("bhqk,bkhd->bqhd", probs, vals.repeat_interleave(g, 2))


def probe_cudnn_gqa(hq, hkv, d) -> str:
    """Does the cuDNN op accept fewer KV heads than query heads, and is the result right?"""
    q, k, v = (torch.randn(1, h, 512, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    try:
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False)[0]
    except Exception as e:  # noqa: BLE001
        return f"no ({type(e).__name__}: {str(e)[:120]})"
    g = hq // hkv
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), is_causal=True)
    return f"runs, max abs err vs repeated KV {(out.float() - ref.float()).abs().max().item():.1e}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, nargs="+", default=[16384, 32768], help="tokens per virtual host")
    parser.add_argument("--world", type=int, default=4, help="W: sets the context length L = 2W blocks")
    parser.add_argument("--heads", type=int, default=28)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--no-flex", action="store_true", help="skip flex_attention (compiles for a while)")
    parser.add_argument("--out", help="also write the results as JSON")
    entry.add_arguments(parser)
    return entry.run_main(bench, parser.parse_args(argv))


def bench(args) -> None:
    """Every variant at every block size against dense SDPA on one GPU; prints the table."""
    if not torch.cuda.is_available():
        raise ValueError("bench_kernels needs a CUDA GPU")
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    print(f"# {name}, torch {torch.__version__}, bf16, Hq={args.heads}, Hkv={args.kv_heads}, d={args.head_dim}, "
          f"flash-attn {'yes' if flash_attn_available() else 'no'}, {time.strftime('%Y-%m-%d')}")
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    print(f"# cuDNN op with un-repeated KV heads (native GQA): {probe_cudnn_gqa(hq, hkv, d)}")
    variants = {"cudnn split (block r)": split_block1("cudnn"), "cudnn split (block 2W-1-r)": split_block2("cudnn"),
                "sdpa_flash split (block r)": split_block1("sdpa_flash"),
                "cudnn calls without merge (block r)": calls_only("cudnn")}
    if flash_attn_available():
        variants["flash_attn split (block r)"] = split_block1("flash_attn")
    if not args.no_flex:
        variants["flex_attention (one call)"] = flex_variant()
    rows = []
    for block in args.blocks:
        context = 2 * args.world * block
        la = default_anchor_len(context)
        p = (2 * args.world - 1) * default_passing_len(context)  # the last virtual host's passing block
        gen = torch.Generator(device=dev).manual_seed(block)
        mk = lambda n, h: torch.randn(1, n, h, d, device=dev, generator=gen, dtype=torch.bfloat16)  # noqa: E731
        q, k, v, pk, pv = mk(la + block, hq), mk(la + block, hkv), mk(la + block, hkv), mk(p, hkv), mk(p, hkv)
        pairs = la * (la + 1) / 2 + block * (p + la) + block * (block + 1) / 2
        flops = 4 * d * hq * pairs
        ref_rows, ref = reference(q, k, v, pk, pv, la)

        def dense_rate(n):
            qq, kk, vv = mk(n, hq).transpose(1, 2), mk(n, hkv).transpose(1, 2), mk(n, hkv).transpose(1, 2)
            ms = cuda_time(lambda: F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True))
            return ms, 4 * d * hq * n * (n + 1) / 2 / ms / 1e9

        for label, n in (("dense causal SDPA over [A|B]", la + block), ("dense causal SDPA over [P|A|B]",
                                                                        p + la + block)):
            ms, rate = dense_rate(n)
            rows.append(dict(block=block, anchor=la, passing=p, variant=label, ms=ms, tflops=rate, max_err=None))
        dense_best = max(r["tflops"] for r in rows if r["block"] == block)
        for label, fn in variants.items():
            try:
                out = fn(q, k, v, pk, pv, la)
                err = None if out is None else (out[:, ref_rows].float() - ref).abs().max().item()
                ms = cuda_time(lambda: fn(q, k, v, pk, pv, la))
            except Exception as e:  # noqa: BLE001 - report and go on with the other variants
                print(f"  {label}: failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            rows.append(dict(block=block, anchor=la, passing=p, variant=label, ms=ms, tflops=flops / ms / 1e9,
                             max_err=err, of_dense=flops / ms / 1e9 / dense_best))
        torch.cuda.empty_cache()
    print("\n| block | anchor | passing | variant | ms | TFLOP/s | of dense | max abs err |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        of = f"{100 * r['of_dense']:.0f}%" if r.get("of_dense") else "-"
        err = f"{r['max_err']:.1e}" if r["max_err"] is not None else "-"
        print(f"| {r['block']} | {r['anchor']} | {r['passing']} | {r['variant']} | {r['ms']:.2f} | "
              f"{r['tflops']:.0f} | {of} | {err} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(card=name, torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
