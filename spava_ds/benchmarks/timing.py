"""Agreement across ranks for the benchmarks: the slowest rank's value, every rank's values, memory peaks, and rank
0's log. The benchmarks time with ``step_timer.Clock`` (CUDA events on GPUs, the wall clock on the CPU)."""

from __future__ import annotations

import gc
from typing import List

import torch
import torch.distributed as dist


def log(*a) -> None:
    """Print on rank 0 only (or without a process group), flushed."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, flush=True)


def agree(value: float, device, op=dist.ReduceOp.MAX) -> float:
    """``value`` reduced over the ranks (default: the largest, i.e. the slowest rank's time)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return float(t)


def gather_floats(values: List[float], device) -> List[List[float]]:
    """Every rank's ``values``, in rank order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


def free_memory(device) -> None:
    """Return cached GPU memory and restart the peak count (nothing on the CPU)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
