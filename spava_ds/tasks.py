"""Synthetic long-video question answering in the style of VNBench (needle-in-a-video-haystack).

Every video is a haystack of moving coloured shapes on a drifting gradient; one or more *needles* are inserted: a
white card with a word or a digit drawn big in black, shown for ``hold`` consecutive frames (default 2, one temporal
patch of Qwen2.5-VL, so a needle fills exactly one temporal step when ``hold`` divides the frame count's grid).
Three tasks, with one-word answers so that exact match scores them:

* ``retrieval``: one needle; "What is written on the card?" -> the word or digit;
* ``ordering``: two needles with different texts; "Which card appears first, X or Y?" -> X or Y;
* ``counting``: 1 to ``max_count`` needles; "How many times does a white card appear?" -> a digit.

The haystack never contains near-white pixels (its colours stay below 210), so a needle is the only bright card in
the video: the tests find the needles again in the decoded mp4 with a brightness detector.

Videos are real mp4 files (H.264, PyAV), one per record; annotations are jsonl records ``{id, video, question,
answer, task, frames, fps, width, height, seed, needles: [{start, end, text}], split}`` with ``video`` relative to
the jsonl file's folder. The train and test splits draw from disjoint seed ranges.

    python -m spava_ds.tasks --out data --train 200 --test 50 --frames 32
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Sequence, Union

import numpy as np

from .video import _check_even_size, write_video

TASKS = ("retrieval", "ordering", "counting")
WORDS = ("cat", "dog", "sun", "car", "box", "tree", "fish", "bird", "moon", "star", "key", "cup")
DIGITS = tuple(str(d) for d in range(10))
HAYSTACK_MAX = 210  # every haystack colour channel stays below this; the card is 255 (see card_fraction)
CARD_THRESHOLD = 235  # a pixel brighter than this in all channels belongs to a card
_SPLIT_SEED_BASE = {"train": 0, "test": 5_000_000}  # disjoint seed ranges: seed * 10**7 + base + index
_SPLIT_SIZE_LIMIT = 5_000_000


# ---- frames -----------------------------------------------------------------------------------------------------
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def haystack_frames(num_frames: int, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``[T, H, W, 3]``: a gradient drifting in hue and four bouncing shapes, every channel < HAYSTACK_MAX."""
    from PIL import Image, ImageDraw

    phase0 = rng.uniform(0, 2 * np.pi, size=3)
    colours = [tuple(int(c) for c in rng.integers(20, HAYSTACK_MAX, 3)) for _ in range(4)]
    starts, speeds = rng.uniform(0, 1, size=(4, 2)), rng.uniform(-0.08, 0.08, size=(4, 2))
    radii = rng.uniform(0.08, 0.2, size=4) * min(width, height)
    xs = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    ys = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    out = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        # centre 105, amplitude 80: channels in [25, 185], below HAYSTACK_MAX even after H.264's small errors
        background = 105 + 80 * np.sin(3 * xs + 2 * ys + phase0 + 0.3 * t)
        image = Image.fromarray(background.astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for k in range(4):
            cx, cy = np.abs((starts[k] + speeds[k] * t) % 2 - 1) * (width, height)  # bounce inside the frame
            box = (cx - radii[k], cy - radii[k], cx + radii[k], cy + radii[k])
            (draw.ellipse if k % 2 else draw.rectangle)(box, fill=colours[k])
        out[t] = np.asarray(image)
    return out


def card_box(width: int, height: int) -> tuple:
    """(x0, y0, x1, y1) of the needle card: the middle of the frame, 70% of each side."""
    return (round(0.15 * width), round(0.15 * height), round(0.85 * width), round(0.85 * height))


def draw_card(frame: np.ndarray, text: str) -> np.ndarray:
    """``frame`` with the white needle card and ``text`` drawn big in black in its middle."""
    from PIL import Image, ImageDraw

    height, width = frame.shape[:2]
    image = Image.fromarray(frame)
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = card_box(width, height)
    draw.rectangle((x0, y0, x1, y1), fill=(255, 255, 255))
    # the largest font that fits the card with a margin: short words and digits stay legible at 112x112
    size = int((y1 - y0) * 0.6)
    while size > 6:
        font = _font(size)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        if right - left <= 0.85 * (x1 - x0) and bottom - top <= 0.8 * (y1 - y0):
            break
        size -= 2
    draw.text(((x0 + x1) / 2, (y0 + y1) / 2), text, fill=(0, 0, 0), font=font, anchor="mm")
    return np.asarray(image)


def card_fraction(frame: np.ndarray) -> float:
    """Fraction of near-white pixels inside the card box: about 0.8 with a card (the glyph is black), 0 without."""
    height, width = frame.shape[:2]
    x0, y0, x1, y1 = card_box(width, height)
    region = frame[y0:y1, x0:x1]
    return float((region.min(axis=-1) > CARD_THRESHOLD).mean())


# ---- tasks ------------------------------------------------------------------------------------------------------
def _slots(rng: np.random.Generator, num_slots: int, count: int) -> List[int]:
    """``count`` sorted slot indices, no two adjacent, so that needles never merge into one longer event."""
    if count > (num_slots + 1) // 2:
        raise ValueError(f"{count} separate needles need at least {2 * count - 1} slots, the video has {num_slots}")
    # choose among num_slots - count + 1 positions, then spread: the classic stars-and-bars shift
    picks = np.sort(rng.choice(num_slots - count + 1, size=count, replace=False))
    return [int(p) + i for i, p in enumerate(picks)]


def make_task(task: str, frames: int, rng: np.random.Generator, hold: int = 2, max_count: int = 5) -> Dict:
    """The question, the answer and the needles (``[{start, end, text}]``, frame ranges) of one video."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    num_slots = frames // hold
    vocabulary = WORDS if rng.random() < 0.5 else DIGITS
    if task == "retrieval":
        texts = [str(rng.choice(WORDS + DIGITS))]
        question, answer = "What is written on the card?", texts[0]
    elif task == "ordering":
        texts = [str(t) for t in rng.choice(vocabulary, size=2, replace=False)]
        shown = texts if rng.random() < 0.5 else texts[::-1]
        question, answer = f"Which card appears first, {shown[0]} or {shown[1]}?", texts[0]
    else:
        count = int(rng.integers(1, min(max_count, (num_slots + 1) // 2) + 1))
        texts = [str(t) for t in rng.choice(vocabulary, size=count)]
        question, answer = "How many times does a white card appear?", str(count)
    slots = _slots(rng, num_slots, len(texts))
    needles = [{"start": s * hold, "end": s * hold + hold, "text": t} for s, t in zip(slots, texts)]
    return {"question": question, "answer": answer, "task": task, "needles": needles}


def render_video(record: Dict, rng: np.random.Generator) -> np.ndarray:
    frames = haystack_frames(record["frames"], record["width"], record["height"], rng)
    for needle in record["needles"]:
        for t in range(needle["start"], needle["end"]):
            frames[t] = draw_card(frames[t], needle["text"])
    return frames


def split_seeds(split: str, count: int, seed: int = 0) -> List[int]:
    """The per-video seeds of a split: train and test ranges never overlap for the same base ``seed``."""
    if split not in _SPLIT_SEED_BASE:
        raise ValueError(f"unknown split {split!r}; choose from {tuple(_SPLIT_SEED_BASE)}")
    if not 0 <= count <= _SPLIT_SIZE_LIMIT:
        raise ValueError(f"a split holds 0 to {_SPLIT_SIZE_LIMIT} videos, got {count}")
    return [seed * 10 ** 7 + _SPLIT_SEED_BASE[split] + i for i in range(count)]


def _write_video(job: tuple) -> dict:
    """Render and write one video; returns its record (top level: run in worker processes by generate_split)."""
    out_dir, split, i, video_seed, frames, width, height, fps, hold, task, max_count = job
    rng = np.random.default_rng(video_seed)
    record = {"id": f"{split}-{i:05d}", "video": f"{split}/{i:05d}.mp4", "frames": frames, "fps": fps,
              "width": width, "height": height, "seed": video_seed, "split": split}
    record.update(make_task(task, frames, rng, hold, max_count))
    # near-lossless (crf 10): the decoded needles stay sharp and the haystack stays dark; reproducible: a video's
    # bytes depend on its seed only, whatever the process or the worker count
    write_video(os.path.join(out_dir, record["video"]), render_video(record, rng), fps, crf=10, reproducible=True)
    return record


def generate_split(out_dir: str, split: str, count: int, frames: Union[int, Sequence[int]] = 32, width: int = 112,
                   height: int = 112, fps: float = 2.0, hold: int = 2, seed: int = 0, tasks: Sequence[str] = TASKS,
                   max_count: int = 5, progress: bool = False, workers: int = 1) -> str:
    """Write ``count`` videos under ``out_dir/split/`` and ``out_dir/split.jsonl``; returns the jsonl path.

    Tasks alternate in ``tasks`` order so every split is balanced; with several ``frames`` (lengths), each task
    cycles through them. ``workers`` processes render the videos; the output does not depend on it.
    """
    lengths = [frames] if isinstance(frames, int) else [int(f) for f in frames]
    _check_even_size(width, height)
    if not lengths or hold < 1 or min(lengths) < 3 * hold:
        raise ValueError(f"need hold >= 1 and frames >= 3 * hold (room for separate needles), got frames={frames}, "
                         f"hold={hold}")
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    jsonl = os.path.join(out_dir, f"{split}.jsonl")
    jobs = [(out_dir, split, i, video_seed, lengths[(i // len(tasks)) % len(lengths)], width, height, fps, hold,
             tasks[i % len(tasks)], max_count) for i, video_seed in enumerate(split_seeds(split, count, seed))]
    pool = None
    if workers > 1 and count > 1:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(min(workers, count))
        records = pool.imap(_write_video, jobs, chunksize=8)
    else:
        records = map(_write_video, jobs)
    if progress:
        from tqdm.auto import tqdm

        records = tqdm(records, total=count, desc=f"{split} videos", unit="video")
    try:
        with open(jsonl, "w", encoding="utf-8") as f:
            for record in records:  # in index order whatever the worker count
                f.write(json.dumps(record) + "\n")
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return jsonl


def load_records(jsonl: str) -> List[Dict]:
    """Records of a jsonl file with ``video`` made absolute (relative paths are relative to the file's folder)."""
    base = os.path.dirname(os.path.abspath(jsonl))
    records = []
    with open(jsonl, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            missing = [k for k in ("video", "question", "answer") if not str(record.get(k, "")).strip()]
            if missing:
                raise ValueError(f"{jsonl}:{n}: record without {missing} (need video, question, answer)")
            record["video"] = os.path.join(base, record["video"])
            records.append(record)
    if not records:
        raise ValueError(f"{jsonl} holds no records")
    return records


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m spava_ds.tasks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (train.jsonl, test.jsonl, train/, test/)")
    parser.add_argument("--train", type=int, default=200, help="training videos")
    parser.add_argument("--test", type=int, default=50, help="held-out test videos")
    parser.add_argument("--frames", default="32",
                        help="frames per video (the length parameter); several, comma-separated, mix lengths")
    parser.add_argument("--width", type=int, default=112)
    parser.add_argument("--height", type=int, default=112)
    parser.add_argument("--fps", type=float, default=2.0, help="frame rate written in the mp4 (read it at this fps)")
    parser.add_argument("--hold", type=int, default=2, help="frames a needle stays on screen")
    parser.add_argument("--max-count", "--max_count", type=int, default=5,
                        help="largest answer of the counting task")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {TASKS}")
    parser.add_argument("--seed", type=int, default=0, help="base seed (splits use disjoint ranges of it)")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering videos (same output)")
    args = parser.parse_args(argv)
    frames = [int(f) for f in str(args.frames).split(",") if f.strip()]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for split, count in (("train", args.train), ("test", args.test)):
        path = generate_split(args.out, split, count, frames, args.width, args.height, args.fps, args.hold,
                              args.seed, tasks, args.max_count, progress=True, workers=args.workers)
        print(f"{split}: {count} videos of {args.frames} frames -> {path}")


if __name__ == "__main__":
    main()
