"""Named ranges around the steps of spava_ds's attention, for profilers and benchmarks.

Each step of a layer runs inside ``span(name)``. Names (``attention.py``, ``integrations/transformers.py``):

==========================  ==========================================================================================
``spava.select``            scoring and top-k selection of one block's passing keys (once per block)
``spava.attend.query``      the query rows over this rank's share of the keys
``spava.attend.block1``     anchor and first block (with the passing keys of the earlier blocks)
``spava.attend.block2``     second block (passing keys, anchor, own block)
``spava.merge.query``       waiting for the query partials of every rank and merging them by LSE
``spava.backward.*``        the same steps in the backward pass (``block2``, ``block1``, ``query``)
``spava.ulysses``           mode ulysses: the all-to-alls and the local attention of one call
``spava.mesh.to_heads``     two-dimensional mode: the intra group's all-to-all of q, k, v (tokens to heads)
``spava.mesh.to_tokens``    two-dimensional mode: the all-to-all of the output back (heads to tokens)
``spava.decode``            one decoding step of one layer (attention over the cache share and the merge)
==========================  ==========================================================================================

With a torch profiler running (``torch.profiler.profile``, or ``torch.autograd.profiler.emit_nvtx`` for Nsight
Systems) a span is a ``record_function`` range of that name; otherwise it is a shared no-op context (about 0.3 us:
one check of the profiler state). The collectives themselves are observed with ``comm.collective_hook``.

``span_hook(fn)`` lets a benchmark time the steps without a profiler: inside the block every span is
``fn(name)``, a context manager of the caller's (for example one that records CUDA events around the step). While a
span hook is in force the attention runs eagerly, never from a CUDA graph (``graphs.py``), so that every call's
steps reach it. A profiler alone leaves the graphs on: a replayed call shows as one graph launch, and the ranges
appear only on the calls that ran eagerly or were captured (``SpavaConfig(cuda_graphs=False)`` to see every step).

For the benchmarks' ``--profile`` runs, ``kernel_times(prof)`` reads a finished ``torch.profiler.profile``: device
seconds per kernel class (``kernel_class``: gemm, attention, elementwise, copy, nccl, other) and the kernels that
took the most device time. Without CUDA activity it reads the CPU operators' self time the same way.

``host_syncs()`` counts the calls that make the host wait for the device (``.item()``, ``.tolist()``, ``nonzero``,
``torch.unique``...; see its docstring), with the device of each call's tensor: on a GPU, any count on a ``cuda``
device inside a step that should only queue kernels is a stall; on a CPU run it tells which calls would stall.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Callable, ContextManager, Dict, List, Optional, Tuple

import torch
from torch.autograd import DeviceType, _profiler_enabled
from torch.autograd.profiler import record_function
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_NO_SPAN = contextlib.nullcontext()
_SPAN_HOOK: Optional[Callable[[str], ContextManager]] = None


def span(name: str) -> ContextManager:
    """The context of one named step: the hook's, a profiler range, or nothing (see the module docstring)."""
    hook = _SPAN_HOOK
    if hook is not None:
        return hook(name)
    if _profiler_enabled():
        return record_function(name)
    return _NO_SPAN


def span_hook_active() -> bool:
    """Whether a ``span_hook`` is in force (then every call of the attention runs eagerly, its steps timed)."""
    return _SPAN_HOOK is not None


@contextlib.contextmanager
def span_hook(fn: Callable[[str], ContextManager]):
    """Inside the block, every ``span(name)`` of this process is ``fn(name)`` (nested hooks: the innermost wins)."""
    global _SPAN_HOOK
    previous, _SPAN_HOOK = _SPAN_HOOK, fn
    try:
        yield fn
    finally:
        _SPAN_HOOK = previous


# Name fragments of each class, checked in this order (the first match wins): a copy kernel is often an elementwise
# template (``elementwise_kernel<..., direct_copy_kernel_cuda>``), so copies come before elementwise. Lower case;
# GPU kernel names and the ATen operators of a CPU run. Fragments are specific ("catarray", not "cat": "truncate").
KERNEL_CLASSES = (
    ("nccl", ("nccl",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "attn")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "sm90_", "sm80_", "aten::mm", "aten::addmm",
              "aten::bmm", "aten::baddbmm", "aten::linear", "convolution", "conv2d", "conv3d")),
    ("copy", ("copy", "memcpy", "memset", "gather", "scatter", "index", "catarray", "aten::cat", "fill",
              "aten::pad", "constant_pad")),
    ("elementwise", ("elementwise", "norm", "reduce", "softmax", "gelu", "silu", "triton_poi", "triton_red",
                     "triton_per", "aten::add", "aten::mul", "aten::sub", "aten::div", "aten::neg", "aten::exp",
                     "aten::sum", "aten::mean", "aten::pow", "aten::rsqrt", "aten::cos", "aten::sin", "aten::where")),
)


def kernel_class(name: str) -> str:
    """The class of a GPU kernel (or a CPU run's ATen operator) by its name: one of ``KERNEL_CLASSES``' names,
    else ``other``."""
    n = name.lower()
    return next((kind for kind, fragments in KERNEL_CLASSES if any(f in n for f in fragments)), "other")


def kernel_times(prof, top: int = 15) -> dict:
    """Where a finished ``torch.profiler.profile`` spent its device time: ``{"device": "cuda" | "cpu",
    "total_s", "classes": {class: seconds}, "top": [{"name", "kind", "seconds", "calls"}, ...]}`` (the ``top`` kernels
    by time, longest first). CUDA kernels and memory copies when the profile has them, else the CPU operators' self
    time; profiler ranges (``span``, ``record_function``) are never counted, so nothing is counted twice."""
    events = [e for e in prof.events() if not e.is_user_annotation]
    cuda = [e for e in events if e.device_type == DeviceType.CUDA]
    timed = [(e.name, e.time_range.elapsed_us()) for e in cuda] if cuda else \
        [(e.name, e.self_cpu_time_total) for e in events if e.device_type == DeviceType.CPU]
    per_name: Dict[str, list] = {}  # name -> [microseconds, calls]
    for name, us in timed:
        entry = per_name.setdefault(name, [0.0, 0])
        entry[0] += us
        entry[1] += 1
    classes = {kind: 0.0 for kind, _ in KERNEL_CLASSES} | {"other": 0.0}
    for name, (us, _) in per_name.items():
        classes[kernel_class(name)] += us / 1e6
    longest = sorted(per_name.items(), key=lambda item: -item[1][0])[:top]
    return dict(device="cuda" if cuda else "cpu", total_s=sum(classes.values()), classes=classes,
                top=[dict(name=name, kind=kernel_class(name), seconds=us / 1e6, calls=calls)
                     for name, (us, calls) in longest])


# --------------------------------------------------------------------------------------------------------------
# Device -> host synchronisations
# --------------------------------------------------------------------------------------------------------------

# ATen operators whose result (a Python number, or an output size that depends on the data) needs the device's
# values on the host, so the host waits for every queued kernel. ``repeat_interleave`` is listed apart: it syncs
# only without ``output_size``.
SYNCING_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique_consecutive", "_unique", "_unique2",
               "unique_dim", "unique_dim_consecutive", "equal", "is_nonzero")
# Tensor methods that read the data on the host without a syncing ATen operator of their own on a CPU tensor.
SYNCING_METHODS = ("tolist",)
# Factories that copy host data to ``device=`` (without an ATen copy that a dispatch mode would see).
HOST_DATA_FACTORIES = ("tensor", "as_tensor")


class HostSyncs:
    """The synchronising calls seen inside one ``host_syncs()`` block: ``calls`` lists ``(name, device type)`` in
    order (``("tolist", "cuda")``, ``("copy_to_device", "cuda")``, ``("_local_scalar_dense", "cpu")``, ...)."""

    def __init__(self):
        self.calls: List[Tuple[str, str]] = []

    def count(self, device: Optional[str] = None) -> int:
        """How many calls, on tensors of ``device`` (a device type: ``"cuda"``, ``"cpu"``) or on any."""
        return sum(1 for _, dev in self.calls if device is None or dev == device)

    def by_name(self) -> Dict[str, int]:
        """Calls per name (``{"_local_scalar_dense": 3, "tolist": 1}``)."""
        return dict(Counter(name for name, _ in self.calls))

    def __repr__(self) -> str:
        return f"HostSyncs({self.calls})"


def _tensor_device(args, kwargs) -> str:
    for value in (*args, *(kwargs or {}).values()):
        if isinstance(value, torch.Tensor):
            return value.device.type
    return "none"


class _SyncingMethods(TorchFunctionMode):
    """Records ``Tensor.tolist`` and ``torch.tensor(data, device=...)`` off the CPU (and keeps the ATen operators
    they run from being counted again)."""

    def __init__(self, record):
        super().__init__()
        self.record, self.inside = record, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name, kwargs = getattr(func, "__name__", ""), kwargs or {}
        if self.inside:
            return func(*args, **kwargs)
        if name in SYNCING_METHODS:
            self.record(name, _tensor_device(args, kwargs))
        elif name in HOST_DATA_FACTORIES and kwargs.get("device") is not None and \
                torch.device(kwargs["device"]).type != "cpu" and not isinstance(args[0], torch.Tensor):
            self.record("copy_to_device", torch.device(kwargs["device"]).type)
        else:
            return func(*args, **kwargs)
        self.inside = True
        try:
            return func(*args, **kwargs)
        finally:
            self.inside = False


class _SyncingOps(TorchDispatchMode):
    """Records the ATen operators of ``SYNCING_OPS``, ``repeat_interleave`` without ``output_size`` and blocking
    copies between the host and a device (``copy_to_host``, ``copy_to_device``: a blocking copy waits for the
    device's queue)."""

    def __init__(self, record, methods: _SyncingMethods):
        super().__init__()
        self.record, self.methods = record, methods

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.methods.inside:
            name = func.overloadpacket.__name__
            copy = _blocking_copy(name, args, kwargs, out)
            if copy is not None:
                self.record(*copy)
            elif name in SYNCING_OPS or _syncing_repeat(name, func, kwargs):
                self.record(name, _tensor_device(args, kwargs))
        return out


def _syncing_repeat(name: str, func, kwargs) -> bool:
    # aten.repeat_interleave.Tensor (the count-only form, which the tensor forms decompose to) sizes its output
    # from the data unless told the size.
    return name == "repeat_interleave" and func._overloadname == "Tensor" and (kwargs or {}).get("output_size") is None


def _blocking_copy(name: str, args, kwargs, out) -> Optional[Tuple[str, str]]:
    """``("copy_to_host" | "copy_to_device", device type)`` for a blocking copy between the host and a device."""
    if name not in ("_to_copy", "copy_") or not isinstance(out, torch.Tensor):
        return None
    source = args[1] if name == "copy_" else args[0]
    non_blocking = (kwargs or {}).get("non_blocking", False) or (name == "copy_" and len(args) > 2 and args[2])
    on_host = (source.device.type == "cpu", out.device.type == "cpu") if isinstance(source, torch.Tensor) else None
    if on_host is None or non_blocking or on_host[0] == on_host[1]:
        return None
    return ("copy_to_host", source.device.type) if out.device.type == "cpu" else ("copy_to_device", out.device.type)


@contextlib.contextmanager
def host_syncs():
    """Count the calls inside the block that make the host read the device's data (and so wait for its queue):
    ``.item()`` / ``int()`` / ``bool()`` of a tensor (``_local_scalar_dense``), ``.tolist()``, ``nonzero``,
    ``masked_select``, ``torch.unique*``, ``torch.equal``, ``repeat_interleave`` without ``output_size`` and
    blocking copies between the host and a device (``copy_to_host``, ``copy_to_device``, ``torch.tensor(data,
    device=...)`` included). Yields a ``HostSyncs`` whose ``calls`` name each with its tensor's
    device type; ``count("cuda")`` is what stalls a GPU. Works on any device (a CPU run tells which calls would
    stall on a GPU) and for this thread's calls only; slows the host while counting (a Python hook per operator)."""
    found = HostSyncs()

    def record(name: str, device: str) -> None:
        found.calls.append((name, device))

    methods = _SyncingMethods(record)
    with methods, _SyncingOps(record, methods):
        yield found
