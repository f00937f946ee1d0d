"""CUDA graphs of one layer's sequence-parallel attention, for inference: one capture, a replay per layer.

Why: at short contexts a zigzag call's GPU work (0.5-2 ms at 16K-32K tokens) is less than the host time Python takes
to issue its few hundred operators (about 2.3 ms), so the GPU waits for the host (docs/benchmarks.md, "Short
contexts"). A CUDA graph replays every kernel of the call, the collectives included, for one launch (tens of µs).

How (``AttentionGraphs.sp_attention``, a drop-in for ``attention.sp_attention``):

* a call's **signature** is what decides the work it issues: the layout's blocks, the config, the layer's passing
  budget (layers with the same budget share a signature: a constant budget gives one for the whole prefill, a
  per-layer list a few), the group, the scale, the collective hook in force, the grad/inference mode, and the
  shape, strides, dtype and device of q, k and v;
* the first call of a signature runs eagerly on the capture stream (it is also the warm-up: compiled merges, cuDNN
  plans, library workspaces, NCCL communicators and P2P connections are made then, outside any capture; PyTorch's
  CUDA-graph notes ask for a warm-up on a side stream); the second is captured into a ``torch.cuda.CUDAGraph`` that
  reads static q/k/v buffers and writes a static output, then replayed; every later call copies its q/k/v in,
  replays and returns a copy of the output (the next replay overwrites the static one);
* all graphs of one ``AttentionGraphs`` share one memory pool, which holds the intermediates of one call (replays
  run one after the other on one stream, so the graphs may reuse each other's scratch), plus each graph's output
  and the static inputs (shared by graphs of equal shapes). At most ``max_graphs`` graphs are kept (least recently
  used out first); ``close()`` frees them all (``SpavaSession`` calls it when its prefill ends);
* a call runs eagerly, and the log says why once per process, when the setting is off, on the CPU, when gradients
  are needed, when ``profiling.span_hook`` times the steps, on a gloo group, under ``TORCH_NCCL_BLOCKING_WAIT``,
  inside someone else's capture, in ``"auto"`` above ``AUTO_MAX_TOKENS_PER_RANK``, and for the rest of the session
  after a failed capture. Every rank agrees that its capture worked before any replays (one all-reduce per
  capture): a captured NCCL call must be launched by every rank of the group or by none (NCCL's "Using NCCL with
  CUDA Graphs").

Collectives inside a capture: ``ProcessGroupNCCL`` does not hand captured work to its watchdog (pytorch PR #103503),
an ``async_op`` collective and its ``wait()`` inside the capture become graph nodes on the NCCL stream and the
capture stream's dependency on them (PyTorch's ``test_allreduce_in_cudagraph`` and ``test_nccl_watchdog_cudagraph``
in test/distributed/test_c10d_nccl.py capture ``pg.allreduce(x).wait()`` right after eager collectives; NCCL >= 2.9.6).
The capture runs in ``"thread_local"`` mode so that the watchdog thread's event queries of earlier eager work cannot
invalidate it (pytorch PRs #104555, #105182). ``torch.cuda.graph`` is not used because its ``__enter__``
synchronises and empties the allocator's cache, which in the middle of a prefill would make the next layers
allocate from the driver again; the capture calls ``CUDAGraph.capture_begin``/``capture_end`` on a side stream
instead, as that context manager does. A hang inside a replayed collective is not seen by NCCL's watchdog timeout
(captured work is not enqueued for it). Under ``comm.collective_hook`` the graph holds whatever the hook did while
it was captured (``launch/bench_host.py``'s hook does nothing: the graph has no collective).
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import time
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist

from . import comm, profiling
from .attention import sp_attention
from .config import SpavaConfig
from .layout import MeshLayout, ZigzagLayout

_log = logging.getLogger("spava_ds")

# "auto" captures calls of at most this many tokens per rank. Above it a call's GPU time is several times its host
# time (about 2 ms of host time per call against 4 ms of GPU time at 24K tokens per rank, 3B shape, H200), so a
# graph saves nothing the GPU would notice, while its pool and static buffers would hold up to a few GB.
AUTO_MAX_TOKENS_PER_RANK = 24576

# A signature seen once is not captured (a per-layer budget list may give every layer its own); this many are
# remembered before the record starts over.
_MAX_SEEN = 256

_LOGGED: set = set()


def _log_once(level: int, message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        _log.log(level, "%s", message)  # the logger's name says spava_ds


def _meta(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), t.stride(), t.dtype, t.device)


class _Replay:
    """One captured call: static inputs in, ``replay()``, a copy of the static output out."""

    def __init__(self, graph, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor, meta: tuple):
        self.graph, self.inputs, self.output, self.meta = graph, inputs, output, meta

    def __call__(self, q, k, v) -> torch.Tensor:
        for static, t in zip(self.inputs, (q, k, v)):
            static.copy_(t)
        self.graph.replay()
        return self.output.clone()


class CudaGraphRecorder:
    """Captures calls into CUDA graphs that share one memory pool and, per shape, one set of static inputs.

    ``unsupported(q, group)`` says why a call cannot be captured here (None when it can); ``warm_up(call, q, k, v)``
    runs the first call of a signature eagerly where its capture will run: on the capture stream, so that the
    libraries' lazy per-stream state (cuBLAS and cuDNN workspaces) is made then and not during the capture, as
    vLLM and SGLang do; ``record(call, q, k, v)`` captures ``call`` on static copies of q, k and v and returns the
    replay (a callable of q, k, v), or raises; ``release(replay)`` forgets an evicted one; ``device_bytes()`` is
    what it holds on the device; ``close()`` frees everything.
    """

    def __init__(self):
        self._pool = None
        self._stream: Optional[torch.cuda.Stream] = None
        self._inputs: Dict[tuple, list] = {}  # (meta of q, k, v) -> [(static q, k, v), graphs using them]
        self._groups: Dict[int, Optional[str]] = {}  # id(group) -> why its collectives cannot be captured

    def unsupported(self, q: torch.Tensor, group) -> Optional[str]:
        if q.device.type != "cuda":
            return f"not on CUDA ({q.device.type})"
        if torch.cuda.is_current_stream_capturing():
            return "the caller is capturing a CUDA graph already (the call joins that capture)"
        if comm.active_collective_hook() is not None:
            return None  # the graph captures what the hook does
        key = id(group)
        if key not in self._groups:
            self._groups[key] = _group_unsupported(group)
        return self._groups[key]

    def warm_up(self, call: Callable, q, k, v) -> torch.Tensor:
        stream, current = self._capture_stream(q.device), torch.cuda.current_stream(q.device)
        stream.wait_stream(current)
        with torch.cuda.device(q.device), torch.cuda.stream(stream):
            out = call(q, k, v)
        current.wait_stream(stream)
        out.record_stream(current)  # made on the capture stream, used on the caller's
        return out

    def record(self, call: Callable, q, k, v) -> _Replay:
        meta = (_meta(q), _meta(k), _meta(v))
        entry = self._inputs.get(meta)
        if entry is None:  # empty_like keeps the strides: the replay's kernels are the eager call's
            entry = self._inputs[meta] = [tuple(torch.empty_like(t) for t in (q, k, v)), 0]
        try:
            graph, output = self._capture(call, entry[0], q.device)
        except BaseException:
            if entry[1] == 0:
                del self._inputs[meta]
            raise
        entry[1] += 1
        return _Replay(graph, entry[0], output, meta)

    def _capture_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _capture(self, call: Callable, inputs, device):
        graph = torch.cuda.CUDAGraph()
        stream, current = self._capture_stream(device), torch.cuda.current_stream(device)
        stream.wait_stream(current)  # the capture stream follows the current one (nothing runs in a capture)
        try:
            with torch.cuda.device(device), torch.cuda.stream(stream):
                graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    output = call(*inputs)
                except BaseException:
                    try:
                        graph.capture_end()
                    except Exception:  # noqa: BLE001 - the capture is void anyway; report the first error
                        pass
                    raise
                graph.capture_end()
        finally:
            current.wait_stream(stream)
        if self._pool is None:
            self._pool = graph.pool()
        return graph, output

    def release(self, replay: _Replay) -> None:
        entry = self._inputs.get(replay.meta)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                del self._inputs[replay.meta]

    def device_bytes(self) -> int:
        """The static inputs, and the segments of the graphs' pool (one call's intermediates and every output)."""
        held = sum(t.numel() * t.element_size() for tensors, _ in self._inputs.values() for t in tensors)
        if self._pool is not None:
            pool = tuple(self._pool)
            held += sum(s["total_size"] for s in torch.cuda.memory_snapshot()
                        if tuple(s.get("segment_pool_id", ())) == pool)
        return held

    def close(self) -> None:
        self._inputs.clear()
        self._pool = None


def _group_unsupported(group) -> Optional[str]:
    """Why the collectives of ``group`` cannot be captured (None: they can, or there are none)."""
    if comm.group_rank_size(group)[1] == 1:
        return None
    backend = dist.get_backend(group)
    if backend != "nccl":
        return f"the {backend} backend's collectives cannot be captured in a CUDA graph"
    for name in ("TORCH_NCCL_BLOCKING_WAIT", "NCCL_BLOCKING_WAIT"):
        if os.environ.get(name, "0") not in ("", "0"):
            return f"{name} makes every wait() block the host, which a capture cannot do"
    return None


def _all_ranks_ok(ok: bool, group, device: torch.device) -> bool:
    """Whether ``ok`` on every rank of ``group`` (one all-reduce; through ``comm``, so hooks see it)."""
    world = comm.group_rank_size(group)[1]
    if world == 1:
        return ok
    failed = torch.tensor([0.0 if ok else 1.0], device=device)
    comm.all_reduce_async(failed, group, world).wait()
    return float(failed.item()) == 0.0


class AttentionGraphs:
    """CUDA graphs of ``attention.sp_attention``, per call signature (see the module docstring).

    Args:
        setting: ``SpavaConfig.cuda_graphs``: ``"auto"`` (capture calls of at most ``AUTO_MAX_TOKENS_PER_RANK``
            tokens per rank, where the host time matters), ``True`` (capture every call that can be), ``False``
            (never: every call is ``sp_attention``).
        max_graphs: graphs kept at most (least recently used evicted first).
        recorder: how calls are captured and replayed (default: ``CudaGraphRecorder``); any object with its
            ``unsupported``/``warm_up``/``record``/``release``/``device_bytes``/``close`` methods.

    ``stats`` counts the calls run ``eager``, the ``captures``, ``replays``, ``evictions`` and ``failures``, and
    ``capture_seconds`` (host time spent capturing); ``disabled`` holds the reason after a failed capture.
    """

    def __init__(self, setting="auto", max_graphs: int = 8, recorder=None):
        if not (setting == "auto" or isinstance(setting, bool)):
            raise ValueError(f"AttentionGraphs setting must be 'auto', True or False, got {setting!r}")
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be an int >= 1, got {max_graphs!r}")
        self.setting, self.max_graphs = setting, max_graphs
        self.recorder = recorder if recorder is not None else CudaGraphRecorder()
        self.disabled: Optional[str] = None
        self.stats = collections.Counter(eager=0, captures=0, replays=0, evictions=0, failures=0)
        self.capture_seconds = 0.0
        self._graphs: "collections.OrderedDict[tuple, _Replay]" = collections.OrderedDict()
        self._seen: set = set()  # signatures run once (eagerly), captured if they come again

    def __len__(self) -> int:
        return len(self._graphs)

    def sp_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: ZigzagLayout,
                     config: Optional[SpavaConfig] = None, group: Optional[dist.ProcessGroup] = None,
                     layer_idx: Optional[int] = None, scale: Optional[float] = None) -> torch.Tensor:
        """``attention.sp_attention(q, k, v, layout, config, group, layer_idx, scale)``, replayed from a CUDA graph
        when this signature was captured, captured on its second call, eager otherwise. A replay runs the eager
        call's kernels on the same inputs (static buffers with the inputs' strides), so it gives the same result."""
        config = config if config is not None else layout.config
        call = functools.partial(sp_attention, layout=layout, config=config, group=group, layer_idx=layer_idx,
                                 scale=scale)
        reason = self.eager_reason(q, k, v, layout, group)
        if reason is not None:
            self.stats["eager"] += 1
            return call(q, k, v)
        budget = config.resolve_passing_len(layout.context_len, layer_idx) \
            if config.mode_spec.passing == "topk" else None
        key = (layout.world_size, layout.query_len, tuple(layout.block_bounds), config, budget, id(group), scale,
               comm.active_collective_hook(), torch.is_inference_mode_enabled(), _meta(q), _meta(k), _meta(v))
        return self._run(key, call, q, k, v, group)

    def eager_reason(self, q, k, v, layout: ZigzagLayout, group) -> Optional[str]:
        """Why this call runs eagerly (None: it is replayed or captured); every reason but "off" is logged once."""
        if self.setting is False:
            return "off"
        if self.disabled is not None:
            reason = self.disabled
        elif torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            reason = "gradients are needed (training runs eagerly)"
        elif isinstance(layout, MeshLayout):
            reason = "the two-dimensional mode (MeshLayout) is not captured"
        elif profiling.span_hook_active():
            reason = "a span hook times the steps of every call (profiling.span_hook)"
        elif self.setting == "auto" and layout.total_len > AUTO_MAX_TOKENS_PER_RANK * layout.world_size:
            reason = (f"more than {AUTO_MAX_TOKENS_PER_RANK} tokens per rank: the GPU, not the host, sets the pace "
                      "(cuda_graphs=True captures anyway)")
        else:
            reason = self.recorder.unsupported(q, group)
        if reason is not None:
            # "auto" off CUDA is the expected case, not news: only a debug line
            quiet = self.setting == "auto" and reason.startswith("not on CUDA")
            _log_once(logging.DEBUG if quiet else logging.INFO, f"CUDA graphs of the attention not used: {reason}")
        return reason

    def _run(self, key: tuple, call: Callable, q, k, v, group) -> torch.Tensor:
        replay = self._graphs.get(key)
        if replay is not None:
            self._graphs.move_to_end(key)
            self.stats["replays"] += 1
            return replay(q, k, v)
        if key not in self._seen:  # first sight: run eagerly (the warm-up); capture if it comes again
            if len(self._seen) >= _MAX_SEEN:
                self._seen.clear()
            self._seen.add(key)
            self.stats["eager"] += 1
            return self.recorder.warm_up(call, q, k, v)
        self._seen.discard(key)
        replay = self._capture(call, q, k, v, group)
        if replay is None:
            self.stats["eager"] += 1
            return call(q, k, v)
        self._graphs[key] = replay
        while len(self._graphs) > self.max_graphs:
            _, old = self._graphs.popitem(last=False)
            self.recorder.release(old)
            self.stats["evictions"] += 1
        self.stats["replays"] += 1
        return replay(q, k, v)

    def _capture(self, call: Callable, q, k, v, group) -> Optional[_Replay]:
        start, error = time.perf_counter(), None
        try:
            replay = self.recorder.record(call, q, k, v)
        except Exception as e:  # noqa: BLE001 - any failure: this session runs eagerly
            replay, error = None, e
        self.capture_seconds += time.perf_counter() - start
        if _all_ranks_ok(error is None, group, q.device):
            self.stats["captures"] += 1
            return replay
        if replay is not None:
            self.recorder.release(replay)
        self.stats["failures"] += 1
        self.disabled = ("a capture failed on another rank" if error is None else
                         f"a capture failed ({type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]})")
        _log_once(logging.WARNING, f"CUDA graphs of the attention off for this session: {self.disabled}")
        return None

    def device_bytes(self) -> int:
        """Device memory the graphs hold beyond what the eager calls would: their pool and static buffers."""
        return self.recorder.device_bytes()

    def close(self) -> None:
        """Free every graph, its pool and the static buffers (the next call of a signature starts over)."""
        for replay in self._graphs.values():
            self.recorder.release(replay)
        self._graphs.clear()
        self._seen.clear()
        self.recorder.close()
