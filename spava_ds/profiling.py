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
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional

from torch.autograd import _profiler_enabled
from torch.autograd.profiler import record_function

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
