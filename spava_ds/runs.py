"""The folder of a fine-tuning run (``launch/finetune.py --output``): never replaced without being asked, checkpoints
that are complete or passed over, and a metrics file without repeated steps.

    OUTPUT/
      metrics.jsonl           one JSON line per optimizer step and per evaluation, each written at once
      checkpoints/stepN/      DeepSpeed's files of step N, then COMPLETE, written last
      checkpoints/latest      DeepSpeed's pointer (not trusted: rank 0 writes it before the other ranks have finished)
      eval_stepN.jsonl        the predictions of an evaluation
      model/                  the export

A checkpoint is complete when its ``COMPLETE`` file exists: rank 0 writes it after every rank has returned from
``engine.save_checkpoint`` (which ends with a barrier) and the files are on disk (fsync). It lists every file with its
size, so a file lost or cut short afterwards is found without unpickling anything. Nothing here is a collective: the
caller agrees on the outcome across ranks (``spava_ds.entry``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import List, Optional

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
COMPLETE = "COMPLETE"
_TAG = re.compile(r"step(\d+)")


def tag_of(step: int) -> str:
    return f"step{step}"


# ---- the folder ---------------------------------------------------------------------------------------------------
def check_output(folder: str, resume: bool, overwrite: bool) -> None:
    """Refuse a run folder that would lose work: an existing run without ``resume`` or ``overwrite``, ``resume``
    without a complete checkpoint, ``overwrite`` of a folder that holds no run. Read-only (``replace`` deletes)."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in --output and --overwrite replaces it: pass one of them")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"--output {folder!r} exists and is not a folder")
    holds = os.path.isdir(folder) and os.listdir(folder)
    if resume:
        if not complete_tags(os.path.join(folder, CHECKPOINTS)):
            raise ValueError(f"--resume: no complete checkpoint in {os.path.join(folder, CHECKPOINTS)!r} "
                             f"({describe(folder) if holds else 'nothing there'})")
    elif holds and not overwrite:
        raise ValueError(f"--output {folder!r} already holds a run ({describe(folder)}): pass --resume to continue "
                         "it or --overwrite to replace it")
    elif holds and not is_run(folder):
        raise ValueError(f"--overwrite: {folder!r} holds files but no run of launch/finetune.py (no {METRICS}, no "
                         f"{CHECKPOINTS}/): not deleting it; choose another --output")


def is_run(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, METRICS)) or os.path.isdir(os.path.join(folder, CHECKPOINTS))


def describe(folder: str) -> str:
    """What a folder holds, in a few words: its checkpoints, metrics lines, export and other entries."""
    names = sorted(os.listdir(folder))
    parts = []
    ckpt_dir = os.path.join(folder, CHECKPOINTS)
    if os.path.isdir(ckpt_dir):
        tags, complete = checkpoint_tags(ckpt_dir), complete_tags(ckpt_dir)
        parts.append(f"{len(tags)} checkpoint(s), {len(complete)} complete"
                     + (f", the newest complete {complete[0]}" if complete else ""))
    if METRICS in names:
        with open(os.path.join(folder, METRICS), "rb") as f:
            parts.append(f"{METRICS} of {sum(1 for _ in f)} line(s)")
    others = [n for n in names if n not in (CHECKPOINTS, METRICS)]
    if others:
        parts.append(", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else ""))
    return "; ".join(parts)


def replace(folder: str) -> None:
    """Delete the run in ``folder`` (``--overwrite``, once ``check_output`` allowed it)."""
    if os.path.isdir(folder):
        shutil.rmtree(folder)


# ---- checkpoints --------------------------------------------------------------------------------------------------
def checkpoint_tags(ckpt_dir: str) -> List[str]:
    """The ``stepN`` folders of ``ckpt_dir``, newest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [n for n in os.listdir(ckpt_dir) if _TAG.fullmatch(n) and os.path.isdir(os.path.join(ckpt_dir, n))]
    return sorted(tags, key=lambda n: int(_TAG.fullmatch(n).group(1)), reverse=True)


def complete_tags(ckpt_dir: str) -> List[str]:
    """The checkpoints marked complete, newest first (``checkpoint_problem`` also checks their files)."""
    return [t for t in checkpoint_tags(ckpt_dir) if os.path.isfile(os.path.join(ckpt_dir, t, COMPLETE))]


def mark_complete(ckpt_dir: str, tag: str, **state) -> None:
    """Write ``tag``'s COMPLETE (rank 0, after every rank's save returned): its files flushed to disk, then the list
    of their sizes and ``state``, atomically."""
    folder = os.path.join(ckpt_dir, tag)
    sizes = {}
    for path in _files(folder):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
            sizes[os.path.relpath(path, folder)] = os.fstat(f.fileno()).st_size
    write_atomically(os.path.join(folder, COMPLETE), json.dumps(dict(state, files=sizes), indent=1) + "\n")


def checkpoint_problem(ckpt_dir: str, tag: str) -> Optional[str]:
    """Why ``tag`` cannot be resumed from (no COMPLETE: a save cut short; a file missing or of another size than
    saved), or None."""
    folder = os.path.join(ckpt_dir, tag)
    try:
        with open(os.path.join(folder, COMPLETE), encoding="utf-8") as f:
            saved = json.load(f)["files"]
    except FileNotFoundError:
        return f"no {COMPLETE} file: a save that did not finish"
    except (ValueError, KeyError, TypeError) as err:
        return f"its {COMPLETE} file is unreadable ({err})"
    for name, size in sorted(saved.items()):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != size:
            return f"{name} has {os.path.getsize(path)} bytes, {size} when saved"
    return None


def set_aside(ckpt_dir: str, tag: str) -> str:
    """Rename a checkpoint that cannot be resumed from out of the way (``stepN.damaged-<time>``; never deleted: a
    file system error may have been passing); returns the new name."""
    name = f"{tag}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    os.rename(os.path.join(ckpt_dir, tag), os.path.join(ckpt_dir, name))
    return name


def prune(ckpt_dir: str, keep: int) -> List[str]:
    """Delete the complete checkpoints older than the newest ``keep`` (0: keep all); returns their tags."""
    old = complete_tags(ckpt_dir)[keep:] if keep > 0 else []
    for tag in old:
        shutil.rmtree(os.path.join(ckpt_dir, tag))
    return old


def _files(folder: str) -> List[str]:
    return sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                  if name != COMPLETE)


def write_atomically(path: str, text: str) -> None:
    """``text`` into ``path`` through a temporary file and a rename: a reader sees the old file or the new one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---- metrics ------------------------------------------------------------------------------------------------------
class MetricsFile:
    """``metrics.jsonl``, appended one line per ``write`` with a single ``os.write`` (a kill leaves whole lines, and
    each line is in the file when ``write`` returns). The file is made by the first line: a run stopped before its
    first step leaves an empty folder, which a new run may use."""

    def __init__(self, folder: str):
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, METRICS)
        self._fd: Optional[int] = None

    def write(self, entry: dict) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        data = (json.dumps(entry) + "\n").encode("utf-8")
        while data:
            data = data[os.write(self._fd, data):]

    def sync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def cut_metrics(folder: str, step: int) -> int:
    """Drop the lines of ``metrics.jsonl`` after ``step`` (a resumed run writes them again) and any incomplete
    line; returns how many lines went."""
    path = os.path.join(folder, METRICS)
    if not os.path.isfile(path):
        return 0
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    kept = [line for line, n in zip(lines, map(_step_of, lines)) if n is not None and n <= step]
    dropped = sum(1 for line in lines if line.strip()) - len(kept)
    if dropped:
        write_atomically(path, "".join(line.decode("utf-8") + "\n" for line in kept))
    return dropped


def _step_of(line: bytes) -> Optional[int]:
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry.get("step") if isinstance(entry, dict) and isinstance(entry.get("step"), int) else None
