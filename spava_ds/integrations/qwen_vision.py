"""The Qwen vision towers (Qwen2.5-VL, Qwen3-VL) for long videos: frame parallelism and a fused variable-length
attention.

* ``frame_parallel_vision(visual, pixel_values_videos, video_grid_thw, group)``: each rank encodes a contiguous run of
  about 1/W of the temporal grid steps (a step is ``temporal_patch_size`` = 2 frames), then the merged features (and
  Qwen3-VL's DeepStack features, ``frame_parallel_forward``) are all-gathered in order, so every rank holds the
  features of the whole video, equal to encoding on one device. This works because the ViT never mixes temporal
  steps: full attention spans one step of one video, windows lie inside a step, the rotary positions (and Qwen3-VL's
  interpolated position embeddings) are (h, w) only, and the patch mergers act on 2x2 blocks of one step.
  ``temporal_range`` is also the frame split of the other families (InternVL: a step is one frame).

* ``enable_fused_vision_attention(model)``: transformers' vision attention, for any implementation other than
  flash-attn, calls SDPA once per window (thousands of 64-token calls for a long video). The installed forward makes
  one variable-length call over all windows instead: flash-attn's varlen kernel when it imports, else torch's own
  ``varlen_attn``, else ``flex_attention`` (compiled) with a block-diagonal ``BlockMask``; on CPU the per-window SDPA
  loop stays (exact and the fastest there).

* ``tower_grid_kwargs(visual, grid_thw, device)``: the tower's per-grid metadata (rotary positions, segment and window
  boundaries, window order, Qwen3-VL's position-embedding interpolation), computed once per grid on the host from
  transformers' own functions and kept on the device (``GRID_METADATA``). transformers (>= 5.17) takes these as
  keyword arguments instead of recomputing them from ``grid_thw`` with device->host reads on every call: a streamed
  video's chunks share one grid, so every chunk after the first queues its kernels without waiting for the GPU.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
import weakref
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..comm import gather_rows, group_rank_size

_log = logging.getLogger("spava_ds.vision")

__all__ = [
    "frame_parallel_vision", "frame_parallel_forward", "frame_parallel_stream", "video_features", "rank_pixels",
    "rank_stream",
    "vision_fields", "temporal_shares", "temporal_range", "encode_video",
    "tower_grid_kwargs", "GridMetadataCache", "GRID_METADATA",
    "enable_fused_vision_attention", "disable_fused_vision_attention", "FusedVisionAttention",
    "varlen_attention", "available_backends", "BACKENDS",
]


# --------------------------------------------------------------------------------------------------------------
# Frame parallelism
# --------------------------------------------------------------------------------------------------------------

def temporal_shares(num_steps: int, world_size: int) -> List[int]:
    """Temporal steps per rank: ``floor(F/W) + (r < F mod W)``, the earlier ranks taking the remainder."""
    base, extra = divmod(num_steps, world_size)
    return [base + (r < extra) for r in range(world_size)]


def temporal_range(num_steps: int, rank: int, world_size: int) -> Tuple[int, int]:
    """The temporal steps ``[first, stop)`` that ``rank`` encodes: its contiguous run of ``temporal_shares``."""
    shares = temporal_shares(num_steps, world_size)
    first = sum(shares[:rank])
    return first, first + shares[rank]


@dataclass
class _Slice:
    """One rank's part of the packed videos: pixel rows, merged-token rows and its own grid_thw."""
    rows: Tuple[int, int]
    tokens: Tuple[int, int]
    grid_thw: List[List[int]]


def _plan(grid_thw: Sequence[Sequence[int]], world_size: int, merge_unit: int,
          temporal_patch_size: int) -> List[_Slice]:
    num_steps = sum(t for t, _, _ in grid_thw)
    if num_steps < world_size:
        raise ValueError(
            f"frame-parallel vision over {world_size} ranks needs at least {temporal_patch_size * world_size} frames "
            f"(one temporal step of {temporal_patch_size} frames per rank), but the video(s) have "
            f"{temporal_patch_size * num_steps} frames ({num_steps} step(s)); sample more frames or use fewer ranks")
    # Pixel rows of every step, in the packed order: video after video, step after step.
    step_rows = [h * w for t, h, w in grid_thw for _ in range(t)]
    slices = []
    for rank in range(world_size):
        s0, s1 = temporal_range(num_steps, rank, world_size)
        r0, r1 = sum(step_rows[:s0]), sum(step_rows[:s1])
        # The local grid keeps each video's (h, w) and counts only the steps inside [s0, s1): a slice that crosses a
        # video boundary becomes two entries, so the windows and the full-attention segments stay per video.
        local, v0 = [], 0
        for t, h, w in grid_thw:
            n = min(s1, v0 + t) - max(s0, v0)
            if n > 0:
                local.append([n, h, w])
            v0 += t
        slices.append(_Slice((r0, r1), (r0 // merge_unit, r1 // merge_unit), local))
    return slices


def vision_fields(out) -> List[torch.Tensor]:
    """The per-token outputs of a Qwen vision tower's forward: the merged features, then Qwen3-VL's DeepStack features
    (one per tapped layer), each ``[tokens, out_hidden]``.

    transformers 4.x returned the merged features as a tensor; 5.x returns an output whose ``pooler_output`` holds them
    (``last_hidden_state`` is the unmerged ViT output in window order) and, for Qwen3-VL, ``deepstack_features``.
    """
    if isinstance(out, torch.Tensor):
        return [out]
    merged = getattr(out, "pooler_output", None)
    if merged is None:
        raise TypeError(f"cannot find the merged vision features in a {type(out).__name__} "
                        "(expected a tensor or an output with `pooler_output`)")
    return [merged, *(getattr(out, "deepstack_features", None) or [])]


def encode_video(visual, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """The merged features ``[tokens, out_hidden]`` of ``visual(pixel_values, grid_thw)`` on one device."""
    return vision_fields(visual(pixel_values, grid_thw=grid_thw))[0]


def _with_fields(out, fields: Sequence[torch.Tensor]):
    """``out`` (the tower's own output) carrying ``fields`` (as ``vision_fields`` lists them) instead of its own."""
    if isinstance(out, torch.Tensor):
        return fields[0]
    out.pooler_output = fields[0]
    if len(fields) > 1:
        out.deepstack_features = list(fields[1:])
    return out


def frame_parallel_forward(forward, pixel_values: torch.Tensor, grid_thw: torch.Tensor, group, config, **kwargs):
    """``forward(pixel_values, grid_thw=grid_thw)`` of a Qwen vision tower (Qwen2.5-VL, Qwen3-VL) split over the ranks
    of ``group`` by temporal steps; returns the tower's own output whose per-token fields (``vision_fields``: merged
    and DeepStack features) hold the whole video on every rank, in one all-gather. ``forward`` is the tower or its
    (bound) forward; the grid's metadata comes from ``tower_grid_kwargs`` (a CPU ``grid_thw`` is read without
    waiting for the device).

    ``pixel_values`` is either every patch row or only this rank's (those of its ``temporal_range``); the row count
    tells which (with W > 1 a rank's share is always smaller than the whole). ``config`` is the tower's config
    (``spatial_merge_size``, ``temporal_patch_size``). Raises ``ValueError`` (on every rank, before any collective)
    when there are fewer temporal steps than ranks or the rows do not fit the grid.
    """
    rank, world = group_rank_size(group)
    grid = [[int(v) for v in row] for row in grid_thw.tolist()]
    if grid_thw.dim() != 2 or any(len(row) != 3 for row in grid):
        raise ValueError(f"video_grid_thw must be [videos, 3], got shape {tuple(grid_thw.shape)}")
    total_rows = sum(t * h * w for t, h, w in grid)
    merge_unit = config.spatial_merge_size ** 2
    slices = _plan(grid, world, merge_unit, config.temporal_patch_size)
    mine = slices[rank]
    own_rows = mine.rows[1] - mine.rows[0]
    if pixel_values.shape[0] not in (total_rows, own_rows):
        raise ValueError(f"pixel_values_videos has {pixel_values.shape[0]} rows but video_grid_thw "
                         f"{grid} describes {total_rows} patches, of which rank {rank} of {world} encodes {own_rows}")
    tower = forward if isinstance(forward, torch.nn.Module) else getattr(forward, "__self__", None)
    if world == 1:
        return forward(pixel_values, **tower_grid_kwargs(tower, grid, pixel_values.device), **kwargs)

    own = pixel_values if pixel_values.shape[0] == own_rows else pixel_values[mine.rows[0]:mine.rows[1]]
    out = forward(own, **tower_grid_kwargs(tower, mine.grid_thw, own.device), **kwargs)
    return _with_fields(out, _gather_fields(vision_fields(out), [s.tokens[1] - s.tokens[0] for s in slices], group))


def _gather_fields(fields: Sequence[torch.Tensor], counts: List[int], group) -> List[torch.Tensor]:
    """Every rank's per-token ``fields`` (``counts[r]`` rows on rank r), in rank order, in one all-gather: the
    fields travel side by side in the hidden dimension."""
    rank = group_rank_size(group)[0]
    if fields[0].shape[0] != counts[rank]:
        raise RuntimeError(f"the vision tower returned {fields[0].shape[0]} rows for {counts[rank]} merged tokens")
    gathered = gather_rows(torch.cat(fields, dim=-1) if len(fields) > 1 else fields[0], counts, group)
    return list(torch.split(gathered, [f.shape[-1] for f in fields], dim=-1))


def frame_parallel_stream(encode_steps, chunks, num_steps: int, tokens_per_step: int,
                          group: Optional[dist.ProcessGroup] = None) -> List[torch.Tensor]:
    """The per-token fields (``vision_fields`` order) of a whole video on every rank of ``group``, each rank running
    its vision tower on its ``temporal_range`` chunk by chunk as the frames decode, then one all-gather (as
    ``frame_parallel_forward``): the tower's attention never crosses a temporal step, so the chunks' features are
    the steps' features, and the tower's work on one chunk hides the decoding of the next.

    ``chunks`` yields ``(first, stop, rows)`` of this rank's steps in order (a ``video.VideoStream``);
    ``encode_steps(rows, first, stop)`` returns the fields of steps ``[first, stop)`` on this device (no
    collective); a step gives ``tokens_per_step`` rows of each field. A chunk that fails to decode (``VideoError``)
    makes every rank raise it together (``raise_if_any_rank_failed``) before the all-gather, so none waits in it.
    """
    from ..comm import raise_if_any_rank_failed
    from ..video import VideoError

    rank, world = group_rank_size(group)
    if num_steps < world:
        raise ValueError(f"frame-parallel vision over {world} ranks needs at least {world} temporal steps, "
                         f"got {num_steps}")
    first, stop = temporal_range(num_steps, rank, world)
    parts, error, expected = [], None, first
    try:
        for begin, end, rows in chunks:
            if begin != expected or not begin < end <= stop:
                raise ValueError(f"rank {rank} of {world} encodes steps [{first}, {stop}) in order; a chunk gave "
                                 f"steps [{begin}, {end}) after step {expected}")
            parts.append(encode_steps(rows, begin, end))
            expected = end
    except VideoError as err:
        error = str(err)
    raise_if_any_rank_failed(error, group, VideoError)
    if expected != stop:
        raise ValueError(f"rank {rank} of {world} encodes steps [{first}, {stop}); the chunks stopped at {expected}")
    fields = [torch.cat(field) for field in zip(*parts)]
    if world == 1:
        return fields
    return _gather_fields(fields, [n * tokens_per_step for n in temporal_shares(num_steps, world)], group)


def frame_parallel_vision(visual, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor,
                          group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Encode the videos with the vision tower split over the ranks of ``group`` by temporal steps.

    ``visual`` is the vision tower (``model.model.visual`` of a Qwen2.5-VL or Qwen3-VL model) and ``video_grid_thw``
    ``[videos, 3]`` the grid of all videos, the same on every rank; ``pixel_values_videos`` holds every patch row or
    this rank's (see ``frame_parallel_forward``). Returns the merged features of all videos
    ``[patches / merge**2, out_hidden]`` on every rank, equal to ``visual(pixel_values_videos, video_grid_thw)`` on
    one device. Differentiable: the gradient of this rank's features is summed over the ranks
    (``comm.gather_rows``).
    """
    return vision_fields(frame_parallel_forward(visual, pixel_values_videos, video_grid_thw, group,
                                                visual.config))[0]


def rank_pixels(inputs: dict, group: Optional[dist.ProcessGroup] = None, device: Optional[torch.device] = None,
                dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The pixel rows of ``inputs`` (``SpavaEngine.video_inputs``) this rank encodes: its ``temporal_range`` of
    ``inputs["video_grid_thw"]``'s steps, or every row when the inputs hold the whole video.

    ``inputs["pixel_values_videos"]`` holds the rows of temporal steps ``inputs["video_steps"]`` (all of them when
    that key is absent). When those are not this rank's steps (inputs made for another world size, e.g. the dense
    check of a W-rank job), this rank's frames are decoded from ``inputs["video_plan"]``. A rank whose frames did
    not decode (``inputs["video_error"]``, or a failure here) makes every rank raise ``VideoError`` (a collective),
    so no rank waits for one that failed in the all-gather that follows.
    """
    from ..comm import raise_if_any_rank_failed
    from ..video import VideoError, VideoStream, video_pixels

    rank, world = group_rank_size(group)
    steps = int(inputs["video_grid_thw"][:, 0].sum())
    first, stop = temporal_range(steps, rank, world)
    held = tuple(inputs.get("video_steps") or (0, steps))
    pixels, error = inputs["pixel_values_videos"], inputs.get("video_error")
    streamed = isinstance(pixels, VideoStream)
    if error is None and (streamed or held not in ((first, stop), (0, steps))):
        try:
            pixels = rank_stream(inputs, group).pixels() if streamed else \
                video_pixels(inputs["video_plan"], first, stop, device)
        except VideoError as err:
            error = str(err)
    raise_if_any_rank_failed(error, group, VideoError)
    return pixels.to(device, dtype) if device is not None or dtype is not None else pixels


def rank_stream(inputs: dict, group: Optional[dist.ProcessGroup] = None):
    """The ``video.VideoStream`` of this rank's ``temporal_range`` from the stream in ``inputs["pixel_values_videos"]``
    (``SpavaEngine.video_inputs`` with streaming on): that one when it holds these steps, else a new one (inputs made
    for another world size, e.g. the dense check of a W-rank job)."""
    stream = inputs["pixel_values_videos"]
    rank, world = group_rank_size(group)
    first, stop = temporal_range(int(inputs["video_grid_thw"][:, 0].sum()), rank, world)
    same = (stream.first_step, stream.stop_step) == (first, stop)
    return stream if same else stream.for_steps(first, stop)


def video_features(visual, inputs: dict, group: Optional[dist.ProcessGroup] = None,
                   device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The merged features of the video of ``inputs`` on every rank of ``group``: this rank encodes its
    ``rank_pixels`` and the features are all-gathered (``frame_parallel_vision``). The model families
    (``spava_ds.models``) do the same for every field, DeepStack's included."""
    pixels = rank_pixels(inputs, group, device, dtype)
    return frame_parallel_vision(visual, pixels, inputs["video_grid_thw"], group)


# --------------------------------------------------------------------------------------------------------------
# Per-grid metadata of the vision tower
# --------------------------------------------------------------------------------------------------------------

# The metadata functions each tower's forward calls (transformers >= 5.17, ``transformers/vision_utils.py``); each
# pops its precomputed result from the forward's keyword arguments when given it. A tower whose module lacks them
# (transformers 4.x) recomputes its metadata from ``grid_thw`` on every call.
_GRID_FUNCTIONS = {
    "Qwen2_5_VisionTransformerPretrainedModel": ("get_vision_attention_seqlens", "get_vision_position_ids",
                                                 "get_vision_window_index"),
    "Qwen3VLVisionModel": ("get_vision_attention_seqlens", "get_vision_interpolation_indices_and_weights",
                           "get_vision_position_ids"),
}
_WARNED_TOWERS: set = set()


def _takes_grid_metadata(tower) -> bool:
    name, module = type(tower).__name__, vars(sys.modules[type(tower).__module__])
    if name in _GRID_FUNCTIONS and all(f in module for f in _GRID_FUNCTIONS[name]):
        return True
    if name in _GRID_FUNCTIONS and name not in _WARNED_TOWERS:
        _WARNED_TOWERS.add(name)
        _log.info("this transformers' %s takes no precomputed grid metadata (transformers >= 5.17 does): it "
                  "recomputes it, with device->host reads, on every call", name)
    return False


def _max_length(cu_seqlens: torch.Tensor) -> int:
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def _grid_metadata(tower, grid_thw: torch.Tensor) -> dict:
    """The keyword arguments with which ``tower``'s forward skips its own per-grid computation, from a CPU
    ``grid_thw``: transformers' functions with the arguments the forward gives them, plus the maximum lengths
    (which transformers reads from the device only for flash-attn; our fused attention uses them too)."""
    from transformers import vision_utils

    merge = tower.spatial_merge_size
    cu_seqlens = vision_utils.get_vision_cu_seqlens(grid_thw)
    meta = dict(position_ids=vision_utils.get_vision_position_ids(grid_thw, merge), cu_seqlens=cu_seqlens,
                max_seqlen=_max_length(cu_seqlens))
    if type(tower).__name__ == "Qwen3VLVisionModel":
        meta["interp_indices"], meta["interp_weights"] = vision_utils.get_vision_interpolation_indices_and_weights(
            grid_thw, num_grid_per_side=tower.num_grid_per_side, mode=tower.interpolation_mode,
            align_corners=tower.interpolation_align_corners, spatial_merge_size=tower.config.spatial_merge_size)
    else:
        window_index, cu_window_seqlens = vision_utils.get_vision_window_index(
            grid_thw, spatial_merge_size=merge, window_size=tower.window_size, patch_size=tower.patch_size)
        meta.update(window_index=window_index, cu_window_seqlens=cu_window_seqlens,
                    max_window_seqlen=_max_length(cu_window_seqlens))
    return meta


class GridMetadataCache:
    """``tower_grid_kwargs``' cache: per tower (held weakly), the keyword arguments of the last ``size`` (grid,
    device) pairs. ``computed`` counts the computations per grid (a tuple of ``(t, h, w)`` rows). An entry is about
    18 bytes a patch for Qwen2.5-VL and 64 for Qwen3-VL (a chunk of 8K patches: 0.1-0.5 MB; one rank's whole
    128K-token video, unstreamed: 9-33 MB)."""

    def __init__(self, size: int = 8):
        self.size, self.computed = size, Counter()
        self._towers: "weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()

    def get(self, tower, grid: Tuple[Tuple[int, int, int], ...], device: torch.device) -> dict:
        entries = self._towers.setdefault(tower, OrderedDict())
        key = (grid, device)
        if key in entries:
            entries.move_to_end(key)
            return entries[key]
        self.computed[grid] += 1
        grid_thw = torch.tensor(grid, dtype=torch.int64)
        meta = _grid_metadata(tower, grid_thw) if _takes_grid_metadata(tower) else {}
        # A copy from pageable host memory that does not block is staged at once and waits for nothing queued.
        entries[key] = {name: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
                        for name, value in dict(grid_thw=grid_thw, **meta).items()}
        if len(entries) > self.size:
            entries.popitem(last=False)   # the least recently used
        return entries[key]

    def clear(self) -> None:
        self._towers.clear()
        self.computed.clear()


GRID_METADATA = GridMetadataCache()


def tower_grid_kwargs(tower, grid_thw, device: torch.device) -> dict:
    """The keyword arguments of a Qwen vision tower's forward (Qwen2.5-VL, Qwen3-VL) for a grid: ``grid_thw`` and
    its metadata, on ``device``, computed once per (tower, grid, device) and cached (``GRID_METADATA``), so that the
    tower reads nothing back from the device. ``grid_thw`` is a ``[videos, 3]`` tensor (on the CPU, or it is read
    back once) or list. Other towers, and transformers without the metadata path (< 5.17, said once in the log),
    get ``grid_thw`` alone, also cached on ``device``."""
    rows = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else grid_thw
    grid = tuple((int(t), int(h), int(w)) for t, h, w in rows)
    if tower is None:
        return dict(grid_thw=torch.tensor(grid, dtype=torch.int64, device=device))
    return dict(GRID_METADATA.get(tower, grid, torch.device(device)))


# --------------------------------------------------------------------------------------------------------------
# Fused variable-length attention for the vision tower
# --------------------------------------------------------------------------------------------------------------

# "flash_attn": flash-attn's varlen kernel (fp16/bf16). "varlen": torch.nn.attention.varlen.varlen_attn (torch >=
# 2.10, fp16/bf16; cuDNN or torch's FA2 inside). "flex" / "flex_eager": one flex_attention call with a
# block-diagonal BlockMask, compiled or not (eager is for CPU tests: it ignores the block structure and applies the
# mask_mod densely). "sdpa": one SDPA call per segment, as transformers does (exact; the CPU default). Which CUDA
# backend is fastest is for launch/bench_vision.py to say; "auto" tries them in the order listed.
BACKENDS = ("auto", "flash_attn", "varlen", "flex", "flex_eager", "sdpa")


@functools.lru_cache(maxsize=None)
def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # noqa: BLE001 - not installed, or a build that does not load here
        return None
    return flash_attn_varlen_func


@functools.lru_cache(maxsize=None)
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:  # noqa: BLE001 - torch < 2.10
        return None
    return varlen_attn


def available_backends(device: torch.device | str = "cuda") -> List[str]:
    """The concrete backends usable on ``device``, in the order "auto" tries them on CUDA."""
    if torch.device(device).type != "cuda":
        return ["sdpa", "flex_eager"]
    names = ["flash_attn"] if _flash_attn_varlen() is not None else []
    names += ["varlen"] if _torch_varlen() is not None else []
    return names + ["flex", "sdpa"]


def _resolve(backend: str, q: torch.Tensor, scale: float) -> str:
    if backend != "auto":
        return backend
    if not q.is_cuda:
        return "sdpa"
    half = q.dtype in (torch.float16, torch.bfloat16)   # the flash kernels take half precision only
    if half and _flash_attn_varlen() is not None:
        return "flash_attn"
    # torch's varlen_attn takes `scale` only in recent versions; the default is the vision tower's 1/sqrt(d).
    if half and _torch_varlen() is not None and math.isclose(scale, q.shape[-1] ** -0.5):
        return "varlen"
    return "flex"


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention)


def _segment_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The segment index of every token: ``[0]*len_0 + [1]*len_1 + ...``."""
    cu = cu_seqlens.to(torch.int64)
    return torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu[1:] - cu[:-1])


def doc_block_masks(cu_seqlens: torch.Tensor, seq_len: int, block_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block-level structure of the block-diagonal mask of ``cu_seqlens``: ``(partial, full)``, both ``[n, n]``.

    ``n = ceil(seq_len / block_size)``. Block (i, j) is *full* when every query of block i and every key of block j
    lie in one segment (the kernel then skips the mask), *partial* when some but not all pairs do. Built from the
    segment ranges of each block, O(n^2) booleans, never the ``seq_len^2`` token mask.
    """
    segment = _segment_ids(cu_seqlens)
    first = torch.arange(0, seq_len, block_size, device=segment.device)
    last = torch.clamp(first + block_size, max=seq_len) - 1
    lo, hi = segment[first], segment[last]      # segments are contiguous: block i holds segments lo[i]..hi[i]
    touch = (lo[:, None] <= hi[None, :]) & (lo[None, :] <= hi[:, None])
    single = lo == hi
    full = single[:, None] & single[None, :] & (lo[:, None] == lo[None, :])
    return touch & ~full, full


def _block_mask(cu_seqlens: torch.Tensor, seq_len: int, block_size: int = 128):
    from torch.nn.attention.flex_attention import BlockMask

    partial, full = doc_block_masks(cu_seqlens, seq_len, block_size)

    def ordered(blocks):  # [n, n] bool -> per row the count and the listed block indices first, ascending
        order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True)
        return blocks.sum(-1).to(torch.int32)[None, None], order.to(torch.int32)[None, None]

    n = partial.shape[0]
    # Tokens past seq_len (the last block's padding) get their own segment id: they never match a real token.
    segment = F.pad(_segment_ids(cu_seqlens), (0, n * block_size - seq_len), value=-1)

    def same_segment(b, h, q_idx, kv_idx):
        return segment[q_idx] == segment[kv_idx]

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=block_size,
                                    mask_mod=same_segment, seq_lengths=(seq_len, seq_len))


class _SegmentCache:
    """Per-``cu_seqlens`` derived data (lengths, max length, BlockMask), kept for the tensors of the last forward.

    The vision tower passes the same two ``cu_seqlens`` tensors (windows; whole frames) to every layer, so keying on
    the tensor object finds them without comparing contents (which would synchronise with the GPU per layer). The
    entries hold the tensors, so an id cannot be reused while cached.
    """

    def __init__(self, size: int = 8):
        self.size, self.entries = size, {}

    def get(self, cu_seqlens: torch.Tensor, what: str, make):
        key = (id(cu_seqlens), what)
        hit = self.entries.get(key)
        if hit is not None and hit[0] is cu_seqlens:
            return hit[1]
        value = make()
        if len(self.entries) >= self.size:
            self.entries.pop(next(iter(self.entries)))   # oldest first
        self.entries[key] = (cu_seqlens, value)
        return value


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float,
                     backend: str = "auto", cache: Optional[_SegmentCache] = None,
                     block_size: int = 128, max_seqlen: Optional[int] = None) -> torch.Tensor:
    """Non-causal attention within each segment of ``cu_seqlens``: q, k, v ``[S, H, D]`` -> ``[S, H, D]``.
    ``max_seqlen``, the longest segment, is read from ``cu_seqlens`` (a device->host read) when not given."""
    cache = cache if cache is not None else _SegmentCache()
    seq_len = q.shape[0]
    backend = _resolve(backend, q, scale)
    if backend in ("flash_attn", "varlen"):
        cu = cache.get(cu_seqlens, "int32", lambda: cu_seqlens.to(device=q.device, dtype=torch.int32))
        max_len = max_seqlen if max_seqlen is not None else \
            cache.get(cu_seqlens, "max", lambda: _max_length(cu_seqlens))
        if backend == "flash_attn":
            return _flash_attn_varlen()(q, k, v, cu, cu, max_len, max_len, softmax_scale=scale, causal=False)
        if not math.isclose(scale, q.shape[-1] ** -0.5):
            raise ValueError("the 'varlen' backend uses the default scale 1/sqrt(head_dim); this module's differs")
        return _torch_varlen()(q, k, v.contiguous(), cu, cu, max_len, max_len)  # v is a strided view of qkv
    if backend in ("flex", "flex_eager"):
        from torch.nn.attention.flex_attention import flex_attention
        mask = cache.get(cu_seqlens, f"mask{block_size}",
                         lambda: _block_mask(cu_seqlens.to(q.device), seq_len, block_size))
        attend = _compiled_flex() if backend == "flex" else flex_attention
        out = attend(*(x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)), block_mask=mask, scale=scale)
        return out.squeeze(0).transpose(0, 1)
    if backend == "sdpa":
        lengths = cache.get(cu_seqlens, "lengths", lambda: (cu_seqlens[1:] - cu_seqlens[:-1]).tolist())
        # [1, H, L, D] per segment, as transformers calls it (a 3-D input takes a slower path on the CPU).
        pieces = [F.scaled_dot_product_attention(*(x.transpose(0, 1).unsqueeze(0) for x in qkv), scale=scale)
                  for qkv in zip(*(torch.split(x, lengths) for x in (q, k, v)))]
        return torch.cat(pieces, dim=2).squeeze(0).transpose(0, 1)
    raise ValueError(f"unknown vision attention backend {backend!r}; choose one of {BACKENDS}")


def _fused_forward(module, state, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
    """``Qwen2_5_VLVisionAttention.forward`` (and Qwen3-VL's, the same math) with one attention call over all
    segments."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    seq_len = hidden_states.shape[0]
    q, k, v = module.qkv(hidden_states).reshape(seq_len, 3, module.num_heads, -1).unbind(1)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    out = varlen_attention(q, k, v, cu_seqlens, module.scaling, state.backend, state.cache, state.block_size,
                           max_seqlen)
    return module.proj(out.reshape(seq_len, -1))


_ATTENTION_CLASSES = ("Qwen2_5_VLVisionAttention", "Qwen3VLVisionAttention")


class FusedVisionAttention:
    """Handle of an installed fused vision attention; ``remove()`` (or ``disable_fused_vision_attention``) undoes it."""

    def __init__(self, modules, backend: str, block_size: int):
        if backend not in BACKENDS:
            raise ValueError(f"unknown vision attention backend {backend!r}; choose one of {BACKENDS}")
        self.modules, self.backend, self.block_size = list(modules), backend, block_size
        self.cache = _SegmentCache()
        for m in self.modules:
            # An instance attribute shadows the class's forward; nn.Module.__call__ then runs it (hooks included).
            m.forward = functools.partial(_fused_forward, m, self)
            m._spava_fused_attention = self

    def remove(self) -> None:
        for m in self.modules:
            if getattr(m, "_spava_fused_attention", None) is self:
                del m.forward, m._spava_fused_attention
        self.modules = []


def _vision_attention_modules(model_or_visual) -> list:
    found = [m for m in model_or_visual.modules() if type(m).__name__ in _ATTENTION_CLASSES]
    if not found:
        raise ValueError(f"no Qwen vision attention ({', '.join(_ATTENTION_CLASSES)}) found in "
                         f"{type(model_or_visual).__name__}")
    return found


def enable_fused_vision_attention(model_or_visual, backend: str = "auto",
                                  block_size: int = 128) -> FusedVisionAttention:
    """Make every Qwen2.5-VL / Qwen3-VL vision attention module of ``model_or_visual`` run one varlen call per layer.

    ``backend``: "auto" (CUDA: flash-attn varlen if it imports, else torch's varlen_attn in half precision, else
    compiled flex_attention; CPU: the per-segment SDPA loop), or one of ``BACKENDS``. ``block_size`` is the flex
    BlockMask block. Installing again replaces the previous installation. Returns a handle whose ``remove()`` undoes.
    """
    disable_fused_vision_attention(model_or_visual)
    return FusedVisionAttention(_vision_attention_modules(model_or_visual), backend, block_size)


def disable_fused_vision_attention(model_or_visual) -> int:
    """Restore transformers' vision attention forward; returns how many modules were restored."""
    handles = {id(h): h for m in model_or_visual.modules()
               if (h := getattr(m, "_spava_fused_attention", None)) is not None}
    restored = sum(len(h.modules) for h in handles.values())
    for h in handles.values():
        h.remove()
    return restored
