"""Where one training step spends its time: named phases timed on the device's own timeline.

A ``StepTimer`` collects intervals between events recorded on the current stream (CUDA events on GPUs; the wall
clock on the CPU, where every operator is synchronous), so reading them costs one synchronisation at the end of the
step and nothing inside it. Every phase is also a ``torch.profiler`` range (``spava_ds.<name>``), so a profiler
trace of the same step shows the same names.

Phases a training step records (``spava_ds.training``): ``forward``, ``backward``, ``optimizer`` around the three
engine calls; inside them ``vision`` (the vision tower), ``loss`` (vocabulary projection and cross entropy),
``attention_forward``, ``attention_recompute`` (the forward run again by activation checkpointing, inside the
backward) and ``attention_backward``. The attention's backward has no call of its own to wrap: two identity
autograd nodes stand on either side of it (``mark_inputs`` on q/k/v, ``mark_output`` on the output), and the
interval between their backward calls is the attention's backward.
"""

from __future__ import annotations

import collections
import contextlib
import time
from typing import Dict, List, Tuple

import torch


class Clock:
    """Marks on the timeline of ``device`` and the seconds between two of them: CUDA events recorded on the current
    stream on a GPU, ``time.perf_counter`` on the CPU. ``StepTimer`` and the benchmarks (``benchmarks.timing``) both
    time with it."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        """Seconds from mark ``a`` to mark ``b`` (on a GPU, after ``sync``)."""
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)


class StepTimer:
    """Seconds per named phase of the steps recorded since ``reset``."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.clock = Clock(self.device)
        self.in_backward = False
        self.reset()

    def reset(self) -> None:
        self._spans: List[Tuple[str, object, object]] = []  # (phase, start mark, stop mark) of self.clock
        self._open: Dict[str, List[object]] = collections.defaultdict(list)

    def start(self, name: str) -> None:
        self._open[name].append(self.clock.mark())

    def stop(self, name: str) -> None:
        self._spans.append((name, self._open[name].pop(), self.clock.mark()))

    @contextlib.contextmanager
    def phase(self, name: str):
        """Time the block as ``name`` (and name it for a profiler)."""
        with torch.profiler.record_function(f"spava_ds.{name}"):
            self.start(name)
            try:
                yield
            finally:
                self.stop(name)

    def attention_phase(self) -> str:
        return "attention_recompute" if self.in_backward else "attention_forward"

    def mark_inputs(self, *tensors: torch.Tensor):
        """q, k, v unchanged; their gradients' arrival ends an ``attention_backward`` interval."""
        return _Mark.apply(self, "stop", *tensors)

    def mark_output(self, out: torch.Tensor) -> torch.Tensor:
        """The output unchanged; its gradient's arrival starts an ``attention_backward`` interval."""
        return _Mark.apply(self, "start", out)[0]

    def seconds(self) -> Dict[str, float]:
        """Total seconds per phase (waits for the device)."""
        self.clock.sync()
        total: Dict[str, float] = collections.defaultdict(float)
        for name, start, stop in self._spans:
            total[name] += self.clock.seconds(start, stop)
        return dict(total)


class _Mark(torch.autograd.Function):
    """Identity whose backward starts or stops the timer's ``attention_backward`` interval."""

    @staticmethod
    def forward(ctx, timer: StepTimer, action: str, *tensors):
        ctx.timer, ctx.action = timer, action
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        getattr(ctx.timer, ctx.action)("attention_backward")
        return (None, None) + grads
