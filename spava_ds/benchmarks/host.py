"""One rank of W alone, for host-cost and share benchmarks: this process stands for rank r of W through PyTorch's fake
process group, and spava_ds's collective hook makes every collective return at once; timers of a call's host and
GPU cost, its operator count, and what the host did in a profiled run (``host_times``)."""

from __future__ import annotations

import collections
import contextlib
import statistics
import time
import warnings
from typing import Optional

import torch
import torch.distributed as dist

from .. import MODE_TABLE, MeshLayout, SpavaConfig, comm, make_layout
from ..attention import sp_attention
from ..graphs import AttentionGraphs
from ..profiling import host_syncs


def fake_group(rank: int, world: int) -> None:
    """This process as rank ``rank`` of ``world`` (its collectives return at once: ``alone``)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)


def _no_collective(op, *args, **kwargs):
    return None  # no work handle: the caller treats it as a finished collective


@contextlib.contextmanager
def alone():
    """Until the block ends, every collective of spava_ds returns at once and moves nothing; then the fake group
    is destroyed."""
    try:
        with comm.collective_hook(_no_collective):
            yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def count_ops(fn, top: int = 0) -> int:
    """ATen operators of one call; ``top`` > 0 also prints the operators taking the most host time, and what
    called each copy (copies hide in casts, ``contiguous()`` and kernels that want another memory layout)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=bool(top)) as prof:
        fn()
    if top:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top), flush=True)
        callers = collections.Counter()
        for e in prof.events():
            if e.name == "aten::copy_":
                chain, p = [], e.cpu_parent
                while p is not None and len(chain) < 3:
                    chain.append(p.name)
                    p = p.cpu_parent
                callers[(" < ".join(chain), str(e.input_shapes[:2]))] += 1
        for (chain, shapes), n in callers.most_common():
            print(f"copy_ x{n}: {chain} {shapes}")
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


# CUDA runtime calls that hold the host until the device has caught up: the synchronisations themselves (``.item()``,
# ``.tolist()``, ``nonzero`` of a GPU tensor end in ``cudaStreamSynchronize``) and the blocking copy.
BLOCKING_CUDA_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
LAUNCH_CUDA_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")


def host_times(prof) -> dict:
    """What the host did in a finished ``torch.profiler.profile``: ``aten_ops`` (ATen operators, nested ones
    included), ``launches`` (kernel launches), ``syncs`` (calls of ``BLOCKING_CUDA_CALLS``) and ``blocked_s``
    (seconds the host spent inside them, waiting for the device). The host was busy for the profiled wall time minus
    ``blocked_s``: when that is about the wall time, the run is host-bound, and the device idled for the difference
    between the wall time and its kernels' time whatever the syncs. A CPU-only profile has no CUDA calls (zeros)."""
    ops = launches = syncs = 0
    blocked_us = 0.0
    for e in prof.events():
        name = e.name.split("_v")[0]  # CUPTI names some calls by version: cudaLaunchKernelExC_v11060
        if e.name.startswith("aten::"):
            ops += 1
        elif name in LAUNCH_CUDA_CALLS:
            launches += 1
        elif name in BLOCKING_CUDA_CALLS:
            syncs += 1
            blocked_us += e.time_range.elapsed_us()
    return dict(aten_ops=ops, launches=launches, syncs=syncs, blocked_s=blocked_us / 1e6)


def time_call(fn, device: torch.device, iters: int, calls: int = 8):
    """(host seconds to issue one call, GPU seconds of one call) over ``iters`` bursts of ``calls`` calls: the
    least host time of a burst (the host is shared; the least disturbed burst is the cost itself) and the median
    GPU time.

    Each burst is issued back to back, as a model's layers are, behind a sleep kernel long enough that the host
    never waits for the GPU (a few calls' kernels stay well inside CUDA's launch queue); the GPU then runs the
    burst's kernels without gaps, so the events time its work alone.
    """
    host, gpu = [], []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda._sleep(400_000_000)  # ~0.2 s of GPU time
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        host.append((time.perf_counter() - t0) / calls)
        if device.type == "cuda":
            end.record()
            torch.cuda.synchronize()
            gpu.append(start.elapsed_time(end) / 1e3 / calls)
    return min(host), (statistics.median(gpu) if gpu else float("nan"))


def time_back_to_back(fn, device: torch.device, iters: int, calls: int = 8) -> float:
    """Median wall seconds per call of ``calls`` calls issued back to back from an idle GPU, then waited for."""
    per_call = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        per_call.append((time.perf_counter() - t0) / calls)
    return statistics.median(per_call)


def make_call(mode: str, tokens: int, world: int, rank: int, heads, head_dim: int, query: int, device, dtype,
              ulysses_degree: int = 1, graphs: Optional[AttentionGraphs] = None, training: bool = False):
    """(one call of global rank ``rank``'s attention, its layout) on random inputs, the other ranks faked. With
    ``ulysses_degree`` U > 1 the modes that run 2-D (``MODE_TABLE``'s ``mesh`` column) run it on a (W / U) x U mesh;
    with ``graphs`` the call goes through its CUDA graphs; with ``training`` a call is a training layer's: the
    forward with gradients, then its backward (``torch.autograd.grad``, nothing accumulates). The call's inputs are
    ``call.inputs`` (q, k, v). Call it inside ``alone()``: the fake group moves nothing, the collective hook makes
    every collective return."""
    if training and graphs is not None:
        raise ValueError("make_call: CUDA graphs replay the prefill only; a training call runs eagerly")
    fake_group(rank, world)
    config = SpavaConfig(mode=mode, ulysses_degree=ulysses_degree if MODE_TABLE[mode].mesh else 1)
    layout = make_layout(tokens - query, query, world, config)
    group = comm.init_mesh(config.ulysses_degree) if isinstance(layout, MeshLayout) else None
    n = layout.local_len(rank)
    hq, hkv = heads
    q = torch.randn(1, n, hq, head_dim, device=device, dtype=dtype, requires_grad=training)
    k = torch.randn(1, n, hkv, head_dim, device=device, dtype=dtype, requires_grad=training)
    v = torch.randn_like(k, requires_grad=training)
    dout = torch.randn_like(q) if training else None
    attention = graphs.sp_attention if graphs is not None else sp_attention

    def call():
        if training:
            out = attention(q, k, v, layout, config, group=group, layer_idx=0)
            torch.autograd.grad(out, (q, k, v), dout)
            return
        with torch.inference_mode():
            attention(q, k, v, layout, config, group=group, layer_idx=0)

    call.inputs = (q, k, v)
    return call, layout


def count_syncs(fn, device: torch.device) -> int:
    """Synchronising calls of one call of ``fn``. On CUDA every synchronising CUDA runtime call that
    ``torch.cuda.set_sync_debug_mode`` sees (those inside operators too: a blocking copy, a data-dependent size);
    elsewhere ``profiling.host_syncs``' count of the calls that would stall a GPU (``.item()``, ``nonzero``...)."""
    if device.type != "cuda":
        with host_syncs() as found:
            fn()
        return found.count(device.type)
    torch.cuda.synchronize(device)
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()  # a backward's warnings come back to this thread when it ends (autograd replays them)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchronizing CUDA operation" in str(w.message) for w in caught)
