"""Video input for Qwen2.5-VL-style models: plan from the container's metadata, decode only the frames a rank needs
(PyAV), resize to the model's pixel budget and turn frames into the vision tower's flat patches in torch, on any
device, without torchvision.

The pipeline of a sequence-parallel job (``SpavaEngine.video_inputs``):

* ``plan_video`` (every rank, no decoding): ``read_metadata`` scans the packets (size, frame rate, duration, frame
  count, keyframe index, a truncated file's missing end) and the ``VideoPlan`` holds the sampled frames, the resized
  size and the grid, hence the token count and the seconds per temporal step (the prompt and the M-RoPE positions);
* ``video_pixels(plan, first_step, stop_step, device)`` (each rank, its own temporal steps): ``iter_frames`` splits
  the rank's frames at keyframes and decodes the groups with a few concurrent decoders (threads; each seeks to its
  group's keyframe and stops after the group's last frame), then ``preprocess_frames`` resizes, normalises and
  patchifies in torch on the rank's GPU.

The whole-video functions (``read_video``, ``resize_frames``, ``preprocess_video``) are the previous path and the
reference of the tests. The rules follow transformers' ``Qwen2VLVideoProcessor`` (which Qwen2.5-VL uses), so that
these paths and the Hugging Face processor give the same tensors:

* sampling: `fps` frames per second (default 2), at least `min_frames` (4) and at most `max_frames` (768), rounded
  down to a multiple of the temporal patch (2), indices spread uniformly over the whole video;
* resizing: `smart_resize` (sides multiples of 28, pixels within [min_pixels, max_pixels]) with antialiased bicubic
  interpolation on uint8 frames, which is what torchvision does for the processor on the CPU (on a GPU the same
  bytes, from matrix products: ``resize_by_matmul``);
* patchify: rescale and normalise with the CLIP mean/std, then the (t, h/2, w/2, 2, 2) patch order the vision
  tower's 2x2 merger expects; an odd frame count is padded by repeating the last frame.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import json
import math
import os
import queue
import threading
import time
from fractions import Fraction
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

# CLIP normalisation constants (same values as transformers.image_utils.OPENAI_CLIP_MEAN/STD; a test checks that).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Qwen2.5-VL defaults (qwen-vl-utils and transformers' Qwen2VLVideoProcessor).
DEFAULT_FPS = 2.0
DEFAULT_MIN_FRAMES = 4
DEFAULT_MAX_FRAMES = 768
DEFAULT_MIN_PIXELS = 128 * 28 * 28
DEFAULT_MAX_PIXELS = 768 * 28 * 28

# Containers that cannot hold H.264: pick a codec they accept when the caller left the default.
_CODEC_FOR_EXTENSION = {".webm": "libvpx-vp9"}


class VideoError(ValueError):
    """A video that cannot be used: missing, unreadable, corrupt, without a video stream or without frames."""


# --------------------------------------------------------------------------------------------------- sampling

def sample_frame_indices(total_frames: int, source_fps: float, fps: float = DEFAULT_FPS,
                         max_frames: int | None = None, min_frames: int = DEFAULT_MIN_FRAMES,
                         temporal_patch_size: int = 2) -> list[int]:
    """Indices of the frames to keep out of `total_frames`, by Qwen2VLVideoProcessor.sample_frames' rule.

    The count is duration * fps, raised to `min_frames`, capped by `max_frames` and the video's length, then rounded
    down to a multiple of `temporal_patch_size`; the indices are floor(i * total / count), i.e. uniform over the
    whole video. Returns [] when not even one temporal patch fits (a video of a single frame): the caller decides.
    """
    if total_frames < 0:
        raise ValueError(f"total_frames must be >= 0, got {total_frames}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if not source_fps > 0:
        raise ValueError(f"source_fps must be > 0, got {source_fps}")
    max_frames = DEFAULT_MAX_FRAMES if max_frames is None else max_frames
    if max_frames < temporal_patch_size:
        raise ValueError(f"max_frames must be at least the temporal patch size {temporal_patch_size}, "
                         f"got {max_frames}")
    tp = temporal_patch_size
    cap = min(max_frames, total_frames) // tp * tp
    wanted = total_frames / source_fps * fps
    count = int(min(max(wanted, min_frames), cap, total_frames) // tp * tp)
    # Integer arithmetic: transformers' float arange can yield one index too many on unlucky ratios.
    return [i * total_frames // count for i in range(count)]


# --------------------------------------------------------------------------------------------------- decoding

def _import_av():
    try:
        import av
    except ImportError as err:
        raise ImportError("reading and writing videos needs PyAV: pip install av") from err
    return av


def _open_input(path: str):
    av = _import_av()
    try:
        return av.open(path, mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise VideoError(f"cannot read video {path!r}: not a readable media file ({err})") from err


def _video_stream(container, path: str):
    if not container.streams.video:
        kinds = ", ".join(s.type for s in container.streams) or "none"
        raise VideoError(f"{path!r} has no video stream (streams: {kinds})")
    return container.streams.video[0]


def _count_packets(path: str) -> int:
    """Frame count of containers that do not store one (Matroska/WebM): demux without decoding, one packet a frame."""
    av = _import_av()

    with _open_input(path) as container:
        stream = _video_stream(container, path)
        try:
            return sum(1 for packet in container.demux(stream) if packet.size > 0)
        except av.FFmpegError as err:
            raise VideoError(f"cannot read video {path!r}: corrupt data ({err})") from err


def _decode_selected(path: str, indices: list[int]):
    """Decode frames in order, keeping those at `indices` (sorted, may repeat). Returns the kept RGB frames, their
    timestamps (seconds) and the number of frames decoded: all of them when the video ended before the last index."""
    av = _import_av()

    wanted = set(indices)
    kept, times = {}, {}
    decoded = 0
    with _open_input(path) as container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                if decoded in wanted:
                    kept[decoded] = frame.to_ndarray(format="rgb24")
                    times[decoded] = float(frame.time) if frame.time is not None else None
                decoded += 1
                if len(kept) == len(wanted):
                    break  # the rest of the video is not needed
        except av.FFmpegError as err:
            raise VideoError(f"cannot read video {path!r}: corrupt data after {decoded} frames ({err})") from err
    return kept, times, decoded


def read_video(path: str | os.PathLike, fps: float | None = None, max_frames: int | None = None,
               min_frames: int = DEFAULT_MIN_FRAMES, temporal_patch_size: int = 2) -> tuple[np.ndarray, dict]:
    """Decode `path` with PyAV and sample frames uniformly at `fps` (default 2), at most `max_frames` (default 768).

    Returns `(frames, info)`: `frames` is uint8 `[T, H, W, 3]` (RGB) with T a multiple of `temporal_patch_size`
    (a one-frame video gives that frame repeated, as the HF processor pads); `info` holds `source_fps`,
    `duration` (s), `num_source_frames`, `indices`, `timestamps` (s, of the kept frames), `sampled_fps` and
    `second_per_grid_t` (seconds per temporal patch: Qwen2.5-VL's `second_per_grid_ts` for M-RoPE), `width`, `height`.
    Raises VideoError for a missing, unreadable or corrupt file, one without a video stream, or without frames, and
    when fewer frames decode than the container announces (a truncated file).
    """
    path = _check_path(path)
    fps = DEFAULT_FPS if fps is None else float(fps)

    with _open_input(path) as container:
        stream = _video_stream(container, path)
        rate = stream.average_rate or stream.guessed_rate
        total = stream.frames  # 0 when the container does not say (Matroska, WebM)
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1e6  # microseconds (AV_TIME_BASE)
        else:
            duration = None
    if total <= 0:
        total = _count_packets(path)
    if total <= 0:
        raise VideoError(f"{path!r} has a video stream but no frames")

    source_fps = float(rate) if rate else (total / duration if duration else None)
    if not source_fps:
        raise VideoError(f"cannot determine the frame rate of {path!r}")
    indices = sample_frame_indices(total, source_fps, fps, max_frames, min_frames, temporal_patch_size)
    if not indices:  # a single frame: repeat it to fill one temporal patch, as the HF processor pads
        indices = [0] * temporal_patch_size
    kept, times, decoded = _decode_selected(path, indices)
    if len(kept) != len(set(indices)):
        if decoded == 0:
            raise VideoError(f"{path!r} has a video stream but no decodable frames")
        raise VideoError(f"{path!r} is truncated or corrupt: its metadata promises {total} frames but only "
                         f"{decoded} decode")
    frames = np.stack([kept[i] for i in indices])
    if duration is None:
        duration = total / source_fps
    distinct = len(set(indices))
    sampled_fps = distinct / total * source_fps if distinct > 1 else fps
    info = {
        "path": path,
        "source_fps": source_fps,
        "duration": duration,
        "num_source_frames": total,
        "indices": indices,
        "timestamps": [times[i] if times[i] is not None else i / source_fps for i in indices],
        "sampled_fps": sampled_fps,
        "second_per_grid_t": temporal_patch_size / sampled_fps,
        "width": int(frames.shape[2]),
        "height": int(frames.shape[1]),
    }
    return frames, info


# --------------------------------------------------------------------------------------------------- metadata, plan

@dataclasses.dataclass(frozen=True)
class VideoMetadata:
    """What the container says about its video stream, read without decoding a pixel.

    `frame_pts` holds the presentation timestamp (stream time base) of every frame in presentation order, from the
    packets; None when the packets carry no usable timestamps (frames are then counted from the start).
    `keyframes` lists the indices of the frames a decoder can start from (packets flagged as keyframes).
    """
    path: str
    width: int
    height: int
    fps: float
    duration: float
    num_frames: int
    frame_pts: Optional[Tuple[int, ...]]
    keyframes: Tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class VideoPlan:
    """One video as the model will see it, from metadata alone (the same on every rank): the sampled frames, the
    resized frame size and the patch grid. The prompt's token count, `video_grid_thw`, `second_per_grid_t` (hence
    the M-RoPE positions) and each rank's frames all follow from it, before any frame is decoded."""
    metadata: VideoMetadata
    frame_indices: Tuple[int, ...]   # sampled frames, a multiple of temporal_patch_size (a 1-frame video repeats it)
    sampled_fps: float
    resized_height: int
    resized_width: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: Tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: Tuple[float, ...] = OPENAI_CLIP_STD

    @property
    def num_steps(self) -> int:
        """Temporal grid steps (temporal_patch_size frames each)."""
        return len(self.frame_indices) // self.temporal_patch_size

    @property
    def grid_thw(self) -> Tuple[int, int, int]:
        return (self.num_steps, self.resized_height // self.patch_size, self.resized_width // self.patch_size)

    @property
    def rows_per_step(self) -> int:
        """Patch rows (vision-tower inputs) of one temporal step."""
        _, gh, gw = self.grid_thw
        return gh * gw

    @property
    def num_tokens(self) -> int:
        """Language-model tokens of the video (after the merger)."""
        return self.num_steps * self.rows_per_step // self.merge_size ** 2

    @property
    def second_per_grid_t(self) -> float:
        """Seconds per temporal step: Qwen2.5-VL's `second_per_grid_ts` for the M-RoPE time axis."""
        return self.temporal_patch_size / self.sampled_fps

    def frames_of_steps(self, first: int, stop: int) -> Tuple[int, ...]:
        """The frame indices of temporal steps [first, stop)."""
        if not 0 <= first <= stop <= self.num_steps:
            raise ValueError(f"steps [{first}, {stop}) are outside the video's {self.num_steps} temporal steps")
        tp = self.temporal_patch_size
        return self.frame_indices[first * tp:stop * tp]


def _check_path(path) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VideoError(f"video file not found: {path!r}")
    if not os.path.isfile(path):
        raise VideoError(f"video path is not a file: {path!r}")
    return path


def _declared_seconds(container, stream) -> Optional[float]:
    """The video stream's duration as the header states it (mp4: the track; Matroska: the track's DURATION tag;
    else the container's when the video is its only stream), in seconds."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    tag = stream.metadata.get("DURATION") or stream.metadata.get("duration")
    if tag:
        try:
            h, m, sec = tag.split(":")
            return int(h) * 3600 + int(m) * 60 + float(sec)
        except ValueError:
            pass
    if container.duration is not None and len(container.streams) == 1:
        return container.duration / 1e6  # microseconds (AV_TIME_BASE)
    return None


def _scan_packets(container, stream, path: str):
    """Presentation timestamps and keyframe flags of the complete packets that are shown, how many packets an edit
    list hides (decoded, never shown), and where the last one ends (seconds)."""
    av = _import_av()
    pts, keyframe, end, hidden = [], [], 0, 0  # end in time-base ticks (Fractions per packet cost a third)
    try:
        for packet in container.demux(stream):
            if packet.size == 0 or packet.is_corrupt:  # flush packets; a packet cut by the end of the file
                continue
            if packet.is_discard:
                hidden += 1
                continue
            pts.append(packet.pts)
            keyframe.append(packet.is_keyframe)
            if packet.pts is not None:
                end = max(end, packet.pts + (packet.duration or 0))
    except av.FFmpegError as err:
        raise VideoError(f"cannot read video {path!r}: corrupt data after {len(pts)} packets ({err})") from err
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    return pts, keyframe, hidden, float(end * stream.time_base) - start


def read_metadata(path: str | os.PathLike) -> VideoMetadata:
    """The container's metadata of `path`'s first video stream: size, frame rate, duration, frame count and the
    keyframe index (one pass over the packets, no decoding). Frame count, rate and duration follow `read_video`.

    Raises VideoError for a missing, unreadable or truncated file (the packets end before the frames or the
    duration the header promises: a cut faststart mp4 or Matroska file), one without a video stream or frames.
    """
    path = _check_path(path)
    with _open_input(path) as container:
        stream = _video_stream(container, path)
        rate = stream.average_rate or stream.guessed_rate
        announced = stream.frames  # 0 when the container does not say (Matroska, WebM)
        declared = _declared_seconds(container, stream)
        width, height = stream.codec_context.width, stream.codec_context.height
        pts, keyframe, hidden, packets_end = _scan_packets(container, stream, path)
    total = announced - hidden if announced > 0 else len(pts)
    if total <= 0:
        raise VideoError(f"{path!r} has a video stream but no frames")
    source_fps = float(rate) if rate else (total / declared if declared else None)
    if not source_fps:
        raise VideoError(f"cannot determine the frame rate of {path!r}")
    missing_end = declared is not None and packets_end < declared - max(0.25, 2 / source_fps)
    if len(pts) + hidden < announced or (announced <= 0 and missing_end):
        raise VideoError(f"{path!r} is truncated or corrupt: its header promises "
                         + (f"{announced} frames" if announced > 0 else f"{declared:.2f} s of video")
                         + f" but its packets end after {len(pts)} frames ({packets_end:.2f} s)")
    frame_pts = None
    if None not in pts and len(set(pts)) == len(pts) == total:
        frame_pts = tuple(sorted(pts))
        keyframes = tuple(sorted(bisect.bisect_left(frame_pts, p) for p, key in zip(pts, keyframe) if key))
    else:
        keyframes = (0,)  # no usable timestamps: decode from the start
    return VideoMetadata(path, width, height, source_fps, declared if declared is not None else total / source_fps,
                         total, frame_pts, keyframes)


def plan_video(video: str | os.PathLike | VideoMetadata, fps: float | None = None, max_frames: int | None = None,
               min_frames: int = DEFAULT_MIN_FRAMES, min_pixels: int = DEFAULT_MIN_PIXELS,
               max_pixels: int = DEFAULT_MAX_PIXELS, patch_size: int = 14, temporal_patch_size: int = 2,
               merge_size: int = 2, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD) -> VideoPlan:
    """The plan of a video file (or of its `read_metadata`) from metadata alone: the frames `read_video` samples,
    the size `resize_frames` gives and the grid `preprocess_video` gives, without decoding."""
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if max_frames is not None and max_frames <= 0:
        raise ValueError(f"max_frames must be > 0, got {max_frames}")
    meta = video if isinstance(video, VideoMetadata) else read_metadata(video)
    fps = DEFAULT_FPS if fps is None else float(fps)
    indices = sample_frame_indices(meta.num_frames, meta.fps, fps, max_frames, min_frames, temporal_patch_size)
    if not indices:  # a single frame: repeat it to fill one temporal patch, as the HF processor pads
        indices = [0] * temporal_patch_size
    distinct = len(set(indices))
    sampled_fps = distinct / meta.num_frames * meta.fps if distinct > 1 else fps
    height, width = smart_resize(meta.height, meta.width, patch_size * merge_size, min_pixels, max_pixels)
    return VideoPlan(meta, tuple(indices), sampled_fps, height, width, patch_size, temporal_patch_size, merge_size,
                     tuple(image_mean), tuple(image_std))


# --------------------------------------------------------------------------------------------------- decoding a share

# Overrides of the decoder layout (documented in docs/inference.md); the arguments of iter_frames/video_pixels win.
DECODERS_ENV = "SPAVA_VIDEO_DECODERS"                 # concurrent decoders of one process
DECODER_THREADS_ENV = "SPAVA_VIDEO_DECODER_THREADS"   # FFmpeg threads of each decoder
# Decoded RGB frames all decoders of a process may hold ahead of the consumer (in bytes): enough for each to hold a
# whole group (the frames come out in order, so a decoder ahead of the consumer must keep its group's frames).
_AHEAD_BYTES = 512 << 20


def rank_cores() -> int:
    """CPU cores this process may decode with: its affinity, shared with the other ranks of the host
    (LOCAL_WORLD_SIZE) unless a launcher already pinned it to fewer cores than the host has."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    if cores >= (os.cpu_count() or cores):  # not pinned: torchrun's ranks all see every core
        cores //= ranks
    return max(1, cores)


def _setting(value, name: str, env: str) -> Optional[int]:
    """A positive count from the argument, else from the environment variable `env`, else None."""
    source = name
    if value is None:
        value, source = os.environ.get(env) or None, f"environment variable {env}"
    if value is None:
        return None
    text = str(value).strip()
    if isinstance(value, float) or not text.isdigit() or int(text) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r} ({source})")
    return int(text)


def decoder_layout(groups: int = 1 << 30, decoders: int | None = None,
                   threads: int | None = None) -> Tuple[int, int]:
    """How one process decodes `groups` independent keyframe groups: (decoders, FFmpeg threads per decoder).

    A value given (argument, else $SPAVA_VIDEO_DECODERS / $SPAVA_VIDEO_DECODER_THREADS) is kept; the rest divide
    `rank_cores()`: by default a decoder per 2 cores (FFmpeg's frame threads scale well in pairs, and fewer Python
    threads wait less for each other on a busy host), at most one per group, and the cores left to their threads.
    """
    decoders = _setting(decoders, "decoders", DECODERS_ENV)
    threads = _setting(threads, "decoder threads", DECODER_THREADS_ENV)
    cores = rank_cores()
    if decoders is None:
        decoders = max(1, cores // (threads or 2))
    decoders = min(decoders, groups)
    return decoders, threads or max(1, cores // decoders)


def _keyframe_groups(meta: VideoMetadata, wanted: List[int]) -> List[List[int]]:
    """The sorted `wanted` frames split at keyframes: a decoder that seeks to a group's keyframe needs nothing
    before it, and stops at the group's last frame (the frames after it, up to the next keyframe, are skipped)."""
    groups, last = [], None
    for index in wanted:
        key = meta.keyframes[bisect.bisect_right(meta.keyframes, index) - 1]
        if key != last:
            groups.append([])
            last = key
        groups[-1].append(index)
    return groups


class _SeekMissed(Exception):
    """A seek landed after the group's first frame (a keyframe flag the decoder cannot start from)."""


def _decode_group(container, stream, meta: VideoMetadata, wanted: List[int], seek: bool,
                  stats: dict) -> Iterator[Tuple[int, object]]:
    """Yield `(index, frame)` for the sorted distinct `wanted` indices from `container`, starting at the keyframe at
    or before the first (when `seek`; else where the container stands), stopping after the last. A frame is placed
    by its timestamp; raises _SeekMissed when the first decoded frame lies after the first wanted one."""
    av = _import_av()
    key = meta.keyframes[bisect.bisect_right(meta.keyframes, wanted[0]) - 1] if seek else 0
    index, position = key - 1, 0
    try:
        if key > 0:
            container.seek(meta.frame_pts[key], backward=True, any_frame=False, stream=stream)
        for frame in _decode_needed(container, stream, meta, set(wanted)):
            stats["decoded_frames"] += 1
            index = _frame_index(meta, frame.pts, index + 1)
            if index > wanted[0] and position == 0 and key > 0:
                raise _SeekMissed()
            if index == wanted[position]:
                yield index, frame
                position += 1
                if position == len(wanted):
                    return  # the rest of the video is not needed
            elif index > wanted[position]:
                return  # a wanted frame was skipped by the decoder: reported as missing
    except av.FFmpegError as err:
        raise VideoError(f"cannot read video {meta.path!r}: corrupt data near frame {index} ({err})") from err


def _decode_needed(container, stream, meta: VideoMetadata, wanted: set):
    """The decoded frames of `stream` from where the container stands, skipping the frames that are not wanted and
    that no other frame refers to (FFmpeg's AVDISCARD_NONREF, set packet by packet: the frame threads take it with
    each packet), and draining the decoder once every wanted frame's packet is in (no later packet is decoded).
    Skipped frames change no other frame: the kept ones are those of a full decode."""
    codec = stream.codec_context
    unsent = set(wanted) if meta.frame_pts is not None else None
    packets = container.demux(stream)
    try:
        for packet in packets:
            index = _pts_index(meta, packet.pts)
            codec.skip_frame = "NONREF" if index is not None and index not in wanted else "DEFAULT"
            yield from stream.decode(packet)
            if unsent and index in unsent:
                unsent.discard(index)
                if not unsent:
                    yield from stream.decode(None)
                    return
    finally:
        packets.close()


def _pts_index(meta: VideoMetadata, pts: Optional[int]) -> Optional[int]:
    """The index of the frame with timestamp `pts`, None when no frame has it (or timestamps are unknown)."""
    if meta.frame_pts is None or pts is None:
        return None
    i = bisect.bisect_left(meta.frame_pts, pts)
    return i if i < len(meta.frame_pts) and meta.frame_pts[i] == pts else None


def _frame_index(meta: VideoMetadata, pts: Optional[int], counted: int) -> int:
    """A decoded frame's index: its timestamp's place among the frames' when known, else the count so far."""
    index = _pts_index(meta, pts)
    return counted if index is None else index


def _decoder(meta: VideoMetadata, groups: List[List[int]], seek: bool, threads: int, out: queue.Queue,
             stop: threading.Event) -> None:
    """One decoder thread: its own demuxer and FFmpeg decoder (`threads` threads) decode `groups` in order,
    seeking to each group's keyframe. Puts ("frame", index, RGB array) for every wanted frame, then ("done" or
    "missed", None, frames decoded) after each group, or ("error", None, exception); returns when `stop` is set.
    FFmpeg runs without Python's lock (PyAV releases it around demuxing, decoding and the RGB conversion)."""
    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    try:
        with _open_input(meta.path) as container:
            stream = _video_stream(container, meta.path)
            stream.thread_type = "AUTO"  # frame and slice threads
            stream.codec_context.thread_count = threads
            for wanted in groups:
                stats = {"decoded_frames": 0}
                try:
                    for index, frame in _decode_group(container, stream, meta, wanted, seek, stats):
                        if not put(("frame", index, frame.to_ndarray(format="rgb24", threads=threads))):
                            return
                except _SeekMissed:
                    put(("missed", None, stats["decoded_frames"]))
                    return
                if not put(("done", None, stats["decoded_frames"])):
                    return
    except BaseException as err:  # noqa: BLE001 -- handed to the consumer, which raises it
        if isinstance(err, _import_av().FFmpegError):  # e.g. the RGB conversion
            err = VideoError(f"cannot read video {meta.path!r}: {err}")
        put(("error", None, err))


def _decode_groups(meta: VideoMetadata, groups: List[List[int]], decoders: int, threads: int, stats: dict,
                   seek: bool = True) -> Iterator[Tuple[int, np.ndarray]]:
    """`(index, RGB frame)` of every group in order; group g is decoded by decoder g % `decoders`, each in its own
    thread, which may hold one group's frames ahead of the consumer (within _AHEAD_BYTES for all). A seek that
    misses turns the rest into one decode from the start (as without seeking). Yields None first, once the
    decoders are started."""
    # the decoder of the group being consumed needs no room ahead; the others must keep a whole group each
    frame_bytes = meta.width * meta.height * 3
    ahead = max(2, min(max(map(len, groups)) + 1, _AHEAD_BYTES // (decoders * frame_bytes))) if decoders > 1 else 2
    stop = threading.Event()
    queues = [queue.Queue(ahead) for _ in range(decoders)]
    workers = [threading.Thread(target=_decoder, args=(meta, groups[w::decoders], seek, threads, queues[w], stop),
                                name=f"spava-decoder-{w}", daemon=True) for w in range(decoders)]
    for worker in workers:
        worker.start()
    missed = None
    try:
        yield None  # the decoders run: `iter_frames` primes this generator so that decoding starts at its call
        for g, wanted in enumerate(groups):
            if (yield from _group_frames(queues[g % decoders], meta, wanted, stats)) == "missed":
                missed = g
                break
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    if missed is not None:
        rest = [index for group in groups[missed:] for index in group]
        from_start = _decode_groups(meta, [rest], 1, decoders * threads, stats, seek=False)
        next(from_start)
        yield from from_start


def _group_frames(frames: queue.Queue, meta: VideoMetadata, wanted: List[int], stats: dict):
    """Yield one group's `(index, RGB frame)` from its decoder's queue; returns "done" or "missed" (its seek landed
    late), raises the decoder's error, or VideoError for a frame that did not decode (after the frames before it)."""
    got = 0
    while True:
        kind, index, item = frames.get()
        if kind == "error":
            raise item
        if kind != "frame":
            break
        got += 1
        yield index, item
    stats["decoded_frames"] = stats.get("decoded_frames", 0) + item
    if kind == "done" and got < len(wanted):
        raise VideoError(f"{meta.path!r} is truncated or corrupt: frame {wanted[got]} of the {meta.num_frames} its "
                         "metadata promises does not decode")
    return kind


def iter_frames(meta: VideoMetadata, indices, threads: int | None = None, stats: dict | None = None,
                decoders: int | None = None) -> Iterator[np.ndarray]:
    """RGB uint8 `[H, W, 3]` frames of `meta`'s video at the sorted `indices` (repeats yield a frame again), in
    order. The wanted frames are split at keyframes into groups; `decoders` concurrent decoders (each its own
    demuxer and FFmpeg decoder with `threads` frame and slice threads; default: `decoder_layout`) take the groups
    in turn, each seeking to its group's keyframe and stopping after its last frame. The decoders start at this
    call (they work while the caller does something else) and stop when the iterator is closed or dropped.
    Raises VideoError when a frame the metadata promises does not decode. `stats`, when given, gets
    "decoded_frames" (how many frames the decoders produced), "decoders" and "decoder_threads" (the layout)."""
    indices = list(indices)
    if not indices:
        return _repeated((pair for pair in ()), collections.Counter())
    if indices != sorted(indices) or indices[0] < 0 or indices[-1] >= meta.num_frames:
        raise ValueError(f"frame indices must be sorted within [0, {meta.num_frames}), got {indices[:8]}")
    groups = _keyframe_groups(meta, sorted(set(indices)))
    decoders, threads = decoder_layout(len(groups), decoders, threads)
    stats = stats if stats is not None else {}
    stats.setdefault("decoded_frames", 0)
    stats.update(decoders=decoders, decoder_threads=threads)
    decoded = _decode_groups(meta, groups, decoders, threads, stats)
    next(decoded)  # starts the decoders; waits for no frame
    return _repeated(decoded, collections.Counter(indices))


def _repeated(decoded: Iterator[Tuple[int, np.ndarray]], repeats: collections.Counter) -> Iterator[np.ndarray]:
    """Each decoded frame as often as it was asked for; closing this closes the decoders."""
    try:
        for index, rgb in decoded:
            for _ in range(repeats[index]):
                yield rgb
    finally:
        decoded.close()


# --------------------------------------------------------------------------------------------------- resizing

def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Qwen2-VL's target size: sides rounded to multiples of `factor`, keeping the aspect ratio, with the area
    scaled into [min_pixels, max_pixels] (shrunk with floor, grown with ceil, so the bound holds; a side is never
    below `factor`, and a thin frame's long side is cut further so that the area stays within max_pixels)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"frame size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be at most 200, got {height}x{width}")
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) exceeds max_pixels ({max_pixels})")
    if factor * factor > max_pixels:
        raise ValueError(f"max_pixels ({max_pixels}) is below one {factor}x{factor} block: no frame size fits")
    new_h = round(height / factor) * factor
    new_w = round(width / factor) * factor
    if new_h * new_w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        new_h = max(factor, math.floor(height / scale / factor) * factor)
        new_w = max(factor, math.floor(width / scale / factor) * factor)
    elif new_h * new_w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        new_h = math.ceil(height * scale / factor) * factor
        new_w = math.ceil(width * scale / factor) * factor
    # A thin frame's short side stops at `factor` (or is rounded up to reach min_pixels), which can leave the area
    # above max_pixels (transformers' smart_resize has this flaw): shrink the long side until it fits.
    if new_h * new_w > max_pixels:
        if new_h >= new_w:
            new_h = max(factor, max_pixels // new_w // factor * factor)
        else:
            new_w = max(factor, max_pixels // new_h // factor * factor)
    return new_h, new_w


def _check_frames(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got shape {tuple(frames.shape)}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    if frames.shape[0] == 0:
        raise ValueError("frames is empty (T = 0)")
    return frames


def resize_frames(frames, min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS,
                  factor: int = 28) -> np.ndarray:
    """Resize uint8 `[T, H, W, 3]` frames to `smart_resize`'s size with antialiased bicubic interpolation.

    torch's uint8 antialiased bicubic kernel is the one torchvision runs for the HF video processor on the CPU, and
    it is within one grey level of PIL's bicubic (the HF image processor's).
    """
    frames = _check_frames(frames)
    height, width = frames.shape[1:3]
    new_h, new_w = smart_resize(height, width, factor, min_pixels, max_pixels)
    if (new_h, new_w) == (height, width):
        return frames
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    return _resize(x, (new_h, new_w)).permute(0, 2, 3, 1).contiguous().numpy()


def _resize(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """uint8 `[T, 3, H, W]` -> `size` by antialiased bicubic: torch's uint8 kernel on the CPU (the one torchvision
    runs for the HF video processor there), the same bytes from `resize_by_matmul` on other devices."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.device.type == "cpu":
        return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
    return resize_by_matmul(x, size)


def resize_by_matmul(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """uint8 `[..., H, W]` -> `[..., *size]`: the bytes of torch's CPU uint8 antialiased bicubic kernel, computed
    with matrix products on `x`'s device (CUDA has no uint8 antialiased kernel; its float kernel, rounded, differs
    by a grey level here and there, as torchvision's resize does on a GPU).

    The CPU kernel resizes the width, then the height; each pass sums int16 weights times uint8 values in integers,
    adds half of 2**precision, shifts right by the precision bits and clamps to 0..255. Here each pass is one
    float64 matrix product with the same integer weights (its sums stay below 2**31: exact in float64), then the
    same rounding and clamp.
    """
    if x.dtype != torch.uint8:
        raise ValueError(f"resize_by_matmul takes uint8 pixels, got {x.dtype}")
    height, width = size
    y = x.to(torch.float64)
    if width != x.shape[-1]:
        weights, precision = _bicubic_int_weights(x.shape[-1], width, y.device)
        y = _round_shift(y @ weights.T, precision)
    if height != x.shape[-2]:
        weights, precision = _bicubic_int_weights(x.shape[-2], height, y.device)
        y = _round_shift(weights @ y, precision)
    return y.to(torch.uint8)


def _round_shift(sums: torch.Tensor, precision: int) -> torch.Tensor:
    """(sums + 2**(precision-1)) >> precision, clamped to 0..255, on integer-valued float64 (exact)."""
    return sums.add_(2.0 ** (precision - 1)).mul_(2.0 ** -precision).floor_().clamp_(0, 255)


@functools.lru_cache(maxsize=16)
def _bicubic_int_weights(in_size: int, out_size: int, device: torch.device) -> Tuple[torch.Tensor, int]:
    """The integer weights `[out_size, in_size]` (float64 on `device`) and precision bits of torch's CPU uint8
    antialiased bicubic kernel. Its float weights come from torch's own float64 kernel (resizing the identity gives
    them exactly); their conversion follows the uint8 kernel: the largest precision (< 22) at which the largest
    weight stays below 2**15 after doubling, then each weight times 2**precision rounded half away from zero."""
    identity = torch.eye(in_size, dtype=torch.float64).view(in_size, 1, 1, in_size)
    weights = F.interpolate(identity, size=(1, out_size), mode="bicubic", antialias=True,
                            align_corners=False)[:, 0, 0, :].T
    largest = max(float(weights.max()), 0.0)
    precision = next((p for p in range(22) if int(0.5 + largest * (1 << (p + 1))) >= 1 << 15), 22)
    scaled = weights * (1 << precision)
    rounded = torch.where(scaled < 0, scaled - 0.5, scaled + 0.5).trunc()
    return rounded.to(device).contiguous(), precision


# --------------------------------------------------------------------------------------------------- patchify

def preprocess_video(frames, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2,
                     image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 frames `[T, H, W, 3]` (H, W multiples of patch_size * merge_size) -> the vision tower's input.

    Returns `pixel_values_videos` float32 `[gt*gh*gw, 3*temporal_patch_size*patch_size**2]` and `video_grid_thw`
    LongTensor `[[gt, gh, gw]]`. Rows are ordered (t, h-block, w-block, h-in-block, w-in-block) so that each run of
    merge_size**2 rows is one 2x2 group the merger turns into one LLM token; each row is (channel, time, y, x).
    """
    frames = _check_frames(frames)
    height, width = frames.shape[1:3]
    side = patch_size * merge_size
    if height % side or width % side:
        raise ValueError(f"frame size {height}x{width} is not a multiple of {side} (patch_size * merge_size): "
                         "resize with resize_frames first")
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # T, C, H, W
    return _patchify(x, patch_size, temporal_patch_size, merge_size, image_mean, image_std)


@functools.lru_cache(maxsize=16)
def _scaled_mean_std(image_mean: tuple, image_std: tuple, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """255 * mean and 255 * std, ``[1, 3, 1, 1]`` float32 on ``device``, made once per device: a blocking copy from
    the host at every streamed chunk would wait for the GPU's queue (the previous chunk's vision tower)."""
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1).mul(255.0) for v in (image_mean, image_std))
    return mean.to(device), std.to(device)


def _patchify(x: torch.Tensor, patch_size: int, temporal_patch_size: int, merge_size: int, image_mean,
              image_std) -> tuple[torch.Tensor, torch.Tensor]:
    """`[T, 3, H, W]` pixel values 0..255 (uint8 or float, any device) -> (patch rows float32, grid_thw)."""
    num_frames, _, height, width = x.shape
    if pad := -num_frames % temporal_patch_size:  # the HF processor repeats the last frame
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
        num_frames += pad
    # Rescale and normalise fused as in transformers: (x - 255 * mean) / (255 * std) in float32.
    mean, std = _scaled_mean_std(tuple(image_mean), tuple(image_std), x.device)
    x = (x.to(torch.float32) - mean) / std
    gt, gh, gw = num_frames // temporal_patch_size, height // patch_size, width // patch_size
    x = x.reshape(gt, temporal_patch_size, 3, gh // merge_size, merge_size, patch_size,
                  gw // merge_size, merge_size, patch_size)
    # -> gt, h-block, w-block, h-in-block, w-in-block, C, t, y, x
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values = x.reshape(gt * gh * gw, 3 * temporal_patch_size * patch_size * patch_size).contiguous()
    return pixel_values, torch.tensor([[gt, gh, gw]], dtype=torch.long)


def preprocess_frames(frames: torch.Tensor, plan: VideoPlan) -> torch.Tensor:
    """uint8 frames `[T, H, W, 3]` of `plan`'s video (T a multiple of its temporal patch), on any device -> their
    patch rows float32 on that device: `resize_frames` then `preprocess_video`, in torch."""
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    x = _resize(frames.permute(0, 3, 1, 2), (plan.resized_height, plan.resized_width))
    rows, _ = _patchify(x, plan.patch_size, plan.temporal_patch_size, plan.merge_size, plan.image_mean,
                        plan.image_std)
    return rows


def iter_video_pixels(plan: VideoPlan, first_step: int = 0, stop_step: int | None = None, device=None,
                      chunk_steps: int = 8, threads: int | None = None, timings: dict | None = None,
                      decoders: int | None = None) -> Iterator[Tuple[int, int, torch.Tensor]]:
    """The patch rows of temporal steps [first_step, stop_step) of `plan`'s video (all by default), float32 on
    `device` (default CPU), `chunk_steps` steps at a time as they decode: yields `(first, stop, rows)` of steps
    [first, stop). Only these frames are decoded (`iter_frames`; the decoders start at this call and decode ahead
    while the caller works on a chunk), then resized, normalised and patchified in torch on `device`.

    `decoders` and `threads` set the decoding (`decoder_layout`). `timings`, when given, is reset here and then gets
    the seconds the consumer waited: for decoded frames ("decode", RGB conversion and the end-of-video checks
    included) and for launching the preprocessing ("preprocess": on a GPU its kernels run on asynchronously), and
    `iter_frames`' stats ("decoded_frames", the decoder layout).
    """
    stop_step = plan.num_steps if stop_step is None else stop_step
    if isinstance(chunk_steps, bool) or not isinstance(chunk_steps, int) or chunk_steps < 1:
        raise ValueError(f"chunk_steps must be a positive integer, got {chunk_steps!r}")
    seconds = timings if timings is not None else {}
    seconds.update(decode=0.0, preprocess=0.0, decoded_frames=0)
    frames = iter_frames(plan.metadata, plan.frames_of_steps(first_step, stop_step), threads, seconds, decoders)
    return _pixel_chunks(plan, frames, range(first_step, stop_step, chunk_steps), stop_step,
                         torch.device(device if device is not None else "cpu"), seconds)


def _pixel_chunks(plan: VideoPlan, frames: Iterator[np.ndarray], starts: range, stop_step: int,
                  device: torch.device, seconds: dict) -> Iterator[Tuple[int, int, torch.Tensor]]:
    """`iter_video_pixels`' chunks: the decoded frames of each chunk's steps copied into one (page-locked, for a
    GPU: the copy runs while the next chunk decodes) staging tensor, then `preprocess_frames` on `device`."""
    meta, tp = plan.metadata, plan.temporal_patch_size
    try:
        for first in starts:
            stop = min(first + starts.step, stop_step)
            tick = time.perf_counter()
            staging = torch.empty(((stop - first) * tp, meta.height, meta.width, 3), dtype=torch.uint8,
                                  pin_memory=device.type == "cuda")
            for k, rgb in zip(range(staging.shape[0]), frames):
                staging[k].numpy()[...] = rgb
            tock = time.perf_counter()
            rows = preprocess_frames(staging.to(device, non_blocking=True), plan)
            seconds["decode"] += tock - tick
            seconds["preprocess"] += time.perf_counter() - tock
            yield first, stop, rows
        tick = time.perf_counter()
        for _ in frames:  # runs the decoder's end-of-video checks (nothing is left to decode)
            pass
        seconds["decode"] += time.perf_counter() - tick
    finally:
        frames.close()


def cat_rows(chunks, plan: VideoPlan, device=None) -> torch.Tensor:
    """The rows of `iter_video_pixels`' chunks in one tensor (`[0, width]` on `device` for no chunk)."""
    rows = [rows for _, _, rows in chunks]
    if rows:
        return torch.cat(rows)
    width = 3 * plan.temporal_patch_size * plan.patch_size ** 2
    return torch.empty((0, width), device=torch.device(device if device is not None else "cpu"))


def video_pixels(plan: VideoPlan, first_step: int = 0, stop_step: int | None = None, device=None,
                 threads: int | None = None, chunk_steps: int = 8, timings: dict | None = None,
                 decoders: int | None = None) -> torch.Tensor:
    """The patch rows of temporal steps [first_step, stop_step) of `plan`'s video (all by default), float32 on
    `device` (default CPU): `iter_video_pixels`' chunks in one tensor (on a GPU the preprocessing of a chunk
    overlaps the decoding of the next).

    Equal to the same rows of `preprocess_video(resize_frames(read_video(...)))`, bit for bit, on the CPU and on a
    GPU. `decoders` and `threads` set the decoding (`iter_frames`, `decoder_layout`). `timings`, when given, gets the
    seconds spent waiting for decoded frames ("decode", RGB conversion included) and preprocessing ("preprocess",
    with the wait for the device at the end), and `iter_frames`' stats ("decoded_frames", the decoder layout).
    """
    seconds = {}
    out = cat_rows(iter_video_pixels(plan, first_step, stop_step, device, chunk_steps, threads, seconds, decoders),
                   plan, device)
    if timings is not None:
        tick = time.perf_counter()
        if out.device.type == "cuda":
            torch.cuda.synchronize(out.device)
        seconds["preprocess"] += time.perf_counter() - tick
        timings.update(seconds)
    return out


@dataclasses.dataclass(eq=False)
class VideoStream:
    """A rank's patch rows of temporal steps [first_step, stop_step) of `plan`'s video, chunk by chunk as they
    decode (`iter_video_pixels`): what `SpavaEngine.video_inputs` hands the vision tower with streaming on, so that
    the tower encodes a chunk while the next one decodes. `start()` starts the decoders at once; iterating yields
    `(first, stop, rows)`, and iterating again decodes again. `timings` gets the exposed waits of the last pass."""
    plan: VideoPlan
    first_step: int
    stop_step: int
    device: torch.device
    chunk_steps: int = 8
    timings: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self._started = None

    def _chunks(self):
        return iter_video_pixels(self.plan, self.first_step, self.stop_step, self.device, self.chunk_steps,
                                 timings=self.timings)

    def start(self) -> "VideoStream":
        """Start decoding now (the first pass takes these chunks)."""
        self._started = self._chunks()
        return self

    def __iter__(self) -> Iterator[Tuple[int, int, torch.Tensor]]:
        chunks, self._started = self._started, None
        return chunks if chunks is not None else self._chunks()

    def for_steps(self, first_step: int, stop_step: int) -> "VideoStream":
        """The same video's steps [first_step, stop_step), not started, sharing `timings`."""
        return VideoStream(self.plan, first_step, stop_step, self.device, self.chunk_steps, self.timings)

    def pixels(self) -> torch.Tensor:
        """Every row of the stream in one tensor (what the non-streamed path holds)."""
        return cat_rows(self, self.plan, self.device)


@functools.lru_cache(maxsize=1)
def hf_video_processor_available() -> bool:
    """True when transformers' Qwen2VLVideoProcessor can be built (it needs a working torchvision)."""
    try:
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        Qwen2VLVideoProcessor()
        return True
    except Exception:  # ImportError without torchvision; RuntimeError from a torchvision built for another torch
        return False


def preprocess_with_processor(frames, min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS,
                              do_resize: bool = True, patch_size: int = 14, temporal_patch_size: int = 2,
                              merge_size: int = 2, image_mean=OPENAI_CLIP_MEAN,
                              image_std=OPENAI_CLIP_STD, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same output as `preprocess_video(resize_frames(frames, ...))` (or without resizing when `do_resize` is
    False), computed by transformers' Qwen2VLVideoProcessor (on `device` when given: its torch path runs on a GPU).
    Needs torchvision; see hf_video_processor_available()."""
    frames = _check_frames(frames)
    if not hf_video_processor_available():
        raise RuntimeError("transformers' Qwen2VLVideoProcessor cannot be built here (it needs a torchvision that "
                           "matches torch); use preprocess_video(resize_frames(...)) instead")
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    options = {}
    if hasattr(Qwen2VLVideoProcessor, "cap_pixels_per_frame"):  # transformers >= 5.2x: keep the per-frame budget
        options["cap_pixels_per_frame"] = False
    processor = Qwen2VLVideoProcessor(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, patch_size=patch_size,
        temporal_patch_size=temporal_patch_size, merge_size=merge_size, image_mean=list(image_mean),
        image_std=list(image_std), do_resize=do_resize, do_sample_frames=False, **options)
    out = processor(videos=[frames], return_tensors="pt", **({"device": device} if device is not None else {}))
    return out["pixel_values_videos"], out["video_grid_thw"].to(torch.long)


# --------------------------------------------------------------------------------------------------- settings

def load_video_settings(model_dir: str | os.PathLike, defaults: dict | None = None) -> dict:
    """Video settings of a checkpoint directory: min_pixels, max_pixels, patch_size, temporal_patch_size,
    merge_size, fps, max_frames, image_mean, image_std.

    Read from `spava_ds.json` (the project's checkpoints), else `video_preprocessor_config.json`, else
    `preprocessor_config.json` (Hugging Face checkpoints), over `defaults` (a model family's, e.g.
    `spava_ds.models.Qwen3VLFamily.default_video_settings`) over the Qwen2.5-VL defaults.
    """
    settings = {"min_pixels": DEFAULT_MIN_PIXELS, "max_pixels": DEFAULT_MAX_PIXELS, "patch_size": 14,
                "temporal_patch_size": 2, "merge_size": 2, "fps": DEFAULT_FPS, "max_frames": DEFAULT_MAX_FRAMES,
                "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD), **(defaults or {})}
    for name in ("spava_ds.json", "video_preprocessor_config.json", "preprocessor_config.json"):
        file = os.path.join(os.fspath(model_dir), name)
        if not os.path.isfile(file):
            continue
        with open(file, encoding="utf-8") as f:
            cfg = json.load(f)
        size = cfg.get("size") or {}
        # HF stores the budget either as min_pixels/max_pixels or as size.shortest_edge/longest_edge.
        cfg.setdefault("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
        cfg.setdefault("max_pixels", size.get("longest_edge", size.get("max_pixels")))
        for key in settings:
            if cfg.get(key) is not None:
                settings[key] = cfg[key]
        break
    return settings


# --------------------------------------------------------------------------------------------------- synthetic

def synthetic_frames(num_frames: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """Deterministic uint8 `[num_frames, height, width, 3]` frames: a colour gradient drifting in hue, three moving
    shapes and the frame number, so every frame differs from the others and from other seeds."""
    from PIL import Image, ImageDraw, ImageFont

    if num_frames < 1 or width < 1 or height < 1:
        raise ValueError(f"need num_frames, width, height >= 1, got {num_frames}, {width}, {height}")
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 2 * np.pi, size=3)
    colours = [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(3)]
    starts = rng.uniform(0, 1, size=(3, 2))
    speeds = rng.uniform(-0.15, 0.15, size=(3, 2))
    sizes = rng.uniform(0.15, 0.35, size=3)
    try:
        font = ImageFont.load_default(size=max(8, height // 5))
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        font = ImageFont.load_default()
    xs = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    ys = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    out = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        phase = base + 0.7 * t  # the background hue turns every frame
        background = 127.5 + 100 * np.sin(3 * xs + 2 * ys + phase)
        image = Image.fromarray(background.astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for k in range(3):
            # positions bounce inside the frame (triangle wave of the unbounded path)
            pos = np.abs((starts[k] + speeds[k] * t) % 2 - 1)
            cx, cy = pos[0] * width, pos[1] * height
            r = sizes[k] * min(width, height) / 2
            box = (cx - r, cy - r, cx + r, cy + r)
            (draw.ellipse if k == 1 else draw.rectangle)(box, fill=colours[k])
        draw.text((2, 1), str(t), fill=(255, 255, 255), font=font, stroke_width=1, stroke_fill=(0, 0, 0))
        out[t] = np.asarray(image)
    return out


def _check_even_size(width: int, height: int) -> None:
    """ValueError unless both sides are even, as yuv420p video (4:2:0 chroma) needs."""
    if width % 2 or height % 2:
        raise ValueError(f"width and height must be even for yuv420p video, got {width}x{height}")


def natural_frames(num_frames: int, width: int, height: int, fps: float = 30, seed: int = 0):
    """Frames of natural-looking motion, fast enough for minutes of 720p: crops of one textured world (the camera
    pans along a smooth path) with textured discs moving on it, made directly as uint8 Y, U, V planes (4:2:0, video
    range), so that the encoder converts no colours. A generator of `num_frames` (Y, U, V) tuples for `write_video`."""
    _check_even_size(width, height)
    rng = np.random.default_rng(seed)
    world_h, world_w = (int(height * 1.5) // 2) * 2, (int(width * 1.5) // 2) * 2
    world = _yuv_image(world_h, world_w, rng)
    sizes = [int(s) // 2 * 2 for s in rng.integers(height // 10, height // 4, 5)]
    objects = [(_yuv_image(s, s, rng), np.hypot(*np.mgrid[:s, :s] - (s - 1) / 2) < s / 2) for s in sizes]
    phases, speeds = rng.uniform(0, 2 * np.pi, (5, 2)), rng.uniform(0.03, 0.2, (5, 2))
    for i in range(num_frames):
        t = i / fps
        x0 = int((world_w - width) / 2 * (1 + math.sin(0.05 * t))) // 2 * 2  # the camera's smooth pan
        y0 = int((world_h - height) / 2 * (1 + math.sin(0.037 * t + 1))) // 2 * 2
        planes = [world[0][y0:y0 + height, x0:x0 + width].copy()] + \
            [p[y0 // 2:(y0 + height) // 2, x0 // 2:(x0 + width) // 2].copy() for p in world[1:]]
        for (image, disc), size, phase, speed in zip(objects, sizes, phases, speeds):
            ox, oy = ((np.array([width, height]) - size) / 2 * (1 + np.sin(2 * np.pi * speed * t + phase)))
            ox, oy = int(ox) // 2 * 2, int(oy) // 2 * 2
            for k, (plane, sub) in enumerate(zip(planes, image)):
                step = 1 if k == 0 else 2
                mask = disc[::step, ::step]
                region = plane[oy // step:(oy + size) // step, ox // step:(ox + size) // step]
                region[mask] = sub[mask]
        yield tuple(planes)


def _texture(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth multi-scale noise (a landscape-like texture), zero mean and unit deviation, float32 [H, W]."""
    out = torch.zeros(1, 1, height, width)
    for cells, amplitude in ((6, 1.0), (24, 0.5), (96, 0.25), (384, 0.12)):
        grid = rng.standard_normal((1, 1, max(2, cells * height // width), cells)).astype(np.float32)
        out += amplitude * F.interpolate(torch.from_numpy(grid), size=(height, width), mode="bicubic")
    return ((out - out.mean()) / out.std())[0, 0].numpy()


def _yuv_image(height: int, width: int, rng: np.random.Generator) -> List[np.ndarray]:
    """A textured picture as uint8 Y, U, V planes (4:2:0), in video range."""
    y = np.clip(128 + 45 * _texture(height, width, rng), 16, 235)
    u, v = (np.clip(128 + 18 * _texture(height // 2, width // 2, rng), 16, 240) for _ in range(2))
    return [p.astype(np.uint8) for p in (y, u, v)]


def write_synthetic_video(path: str | os.PathLike, num_frames: int, width: int, height: int, fps: float = 2,
                          seed: int = 0, **options) -> str:
    """`synthetic_frames(num_frames, width, height, seed)` written by `write_video` at `fps` (its `options`: codec,
    gop, bframes, frame_times, faststart, ...)."""
    _check_even_size(width, height)
    return write_video(path, synthetic_frames(num_frames, width, height, seed), fps, **options)


def write_video(path: str | os.PathLike, frames, fps: float = 2, codec: str = "libx264", crf: int = 10,
                preset: str | None = None, gop: int | None = None, bframes: int | None = None, frame_times=None,
                faststart: bool = False, threads: int | None = None, reproducible: bool = False) -> str:
    """Encode `frames` as a video file with PyAV; the container follows the extension (.mp4, .mkv, .webm, ...), and
    WebM gets VP9 when `codec` is left at the default. The one writer of the package (synthetic test and task videos,
    the benchmarks' long ones); the file appears at `path` only when it is complete.

    `frames`: a uint8 RGB array `[T, H, W, 3]`, or an iterable of frames, each an RGB `[H, W, 3]` array or a tuple of
    uint8 Y, U, V planes of 4:2:0 (no colour conversion: the fast path of `natural_frames`). Even sizes only.

    `crf`: quality (the default 10 is near-lossless: decoded frames stay close to the written ones); `preset`:
    libx264's speed preset. libx264 only: `gop` puts a keyframe every `gop` frames (and nowhere else), `bframes`
    sets the B-frames between references. `frame_times` (seconds, increasing) gives each frame its own timestamp: a
    variable frame rate. `faststart` moves an mp4's index (moov) to the front of the file. `threads`: the encoder's
    threads (0: all cores; default: the codec's own). `reproducible` (libx264): the same frames give the same bytes in
    any process (state, worker count): one encoder thread and no macroblock-tree rate control (with mbtree on, libx264
    core 165 of PyAV 18 writes different bytes from call to call even on one thread: about 4 of 6 112x112 videos).
    """
    av = _import_av()

    path = os.fspath(path)
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if reproducible and threads not in (None, 1):
        raise ValueError(f"reproducible encoding runs one encoder thread, got threads={threads}")
    if frame_times is not None and hasattr(frames, "__len__") and len(frame_times) != len(frames):
        raise ValueError(f"frame_times has {len(frame_times)} entries for {len(frames)} frames")
    root, ext = os.path.splitext(path)
    if codec == "libx264" and ext.lower() in _CODEC_FOR_EXTENSION:
        codec = _CODEC_FOR_EXTENSION[ext.lower()]
    rate = Fraction(fps).limit_denominator(1001)
    time_base = Fraction(1, 1000) if frame_times is not None else 1 / rate
    tmp = f"{root}.{os.getpid()}.tmp{ext}"  # the same extension: it picks the container
    try:
        with av.open(tmp, mode="w", options={"movflags": "faststart"} if faststart else {}) as container:
            stream = None
            for t, array in enumerate(frames):
                if frame_times is not None and t >= len(frame_times):
                    raise ValueError(f"frame_times has {len(frame_times)} entries for more frames")
                frame = _video_frame(av, array)
                if stream is None:
                    stream = _add_stream(container, codec, rate, time_base, frame, crf, preset, gop, bframes,
                                         1 if reproducible else threads, reproducible)
                frame.pts = t if frame_times is None else round(frame_times[t] * 1000)
                frame.time_base = time_base
                container.mux(stream.encode(frame))
            if stream is None:
                raise ValueError("no frames to write")
            if frame_times is not None and t + 1 != len(frame_times):
                raise ValueError(f"frame_times has {len(frame_times)} entries for {t + 1} frames")
            container.mux(stream.encode(None))  # flush the encoder's delayed frames
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _video_frame(av, array):
    """One frame to encode: an RGB array, or (Y, U, V) planes of 4:2:0 stacked as PyAV's yuv420p array wants."""
    if isinstance(array, (tuple, list)):
        y, u, v = (np.asarray(p, np.uint8) for p in array)
        height, width = y.shape
        _check_even_size(width, height)
        planes = np.concatenate([y.ravel(), u.ravel(), v.ravel()]).reshape(height * 3 // 2, width)
        return av.VideoFrame.from_ndarray(planes, format="yuv420p")
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"a frame must be uint8 [H, W, 3] RGB or (Y, U, V) planes, got {array.dtype} "
                         f"{list(array.shape)}")
    _check_even_size(array.shape[1], array.shape[0])
    return av.VideoFrame.from_ndarray(array, format="rgb24")


def _add_stream(container, codec: str, rate: Fraction, time_base: Fraction, first, crf: int, preset, gop, bframes,
                threads, reproducible: bool = False):
    """The video stream of `container`, sized after the first frame, with the encoder's options."""
    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height, stream.pix_fmt = first.width, first.height, "yuv420p"
    stream.codec_context.time_base = time_base
    options = {}
    if codec in ("libx264", "libvpx-vp9"):
        options = {"crf": str(crf)} if codec == "libx264" else {"crf": str(crf), "b": "0"}
    if codec == "libx264" and preset is not None:
        options["preset"] = preset
    if codec == "libx264" and gop is not None:
        options.update(g=str(gop), keyint_min=str(gop), sc_threshold="0")
    if codec == "libx264" and bframes is not None:
        options.update(bf=str(bframes))
    if codec == "libx264" and reproducible:
        options["mbtree"] = "0"  # the one part of x264 whose output varies between calls (see write_video)
    stream.options = options
    if threads is not None:
        stream.codec_context.thread_count = threads
    return stream
