"""The ``{"video", "question", "answer"}`` records of a jsonl file (fine-tuning and held-out data), checked whole
before a run uses any: every bad line is named by file and line, all of them at once.

    data = read_records("data/train.jsonl")                 # the text of every line (no video opened)
    bad = video_problems(data, engine.check_video)          # each video exists and plans (container metadata)
    raise_problems(data.problems + bad)                     # one error naming them all

Relative ``video`` paths are relative to the jsonl file's folder (as ``spava_ds.tasks`` writes them); other fields
are kept as they are (``task``, ``id``, ``frames``...).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Callable, List, Optional, Tuple

log = logging.getLogger("spava_ds.dataset")

FIELDS = ("video", "question", "answer")
Problem = Tuple[str, int, str]  # (file, line, reason)


@dataclasses.dataclass
class RecordFile:
    path: str
    records: List[dict]  # the well-formed records, "video" made absolute
    lines: List[int]  # the line of each record
    problems: List[Problem]  # the lines that are not well-formed records

    @property
    def count(self) -> int:
        """Records the file holds, bad ones included."""
        return len(self.records) + len(self.problems)


def read_records(path: str, limit: Optional[int] = None) -> RecordFile:
    """The records of the first ``limit`` (default: all) non-blank lines of ``path``; a line that is not a JSON object
    with non-empty string ``video``, ``question`` and ``answer`` is a problem, not an error."""
    if not os.path.isfile(path):
        raise ValueError(f"{path!r}: no such file (a jsonl of {{\"video\", \"question\", \"answer\"}} records)")
    base = os.path.dirname(os.path.abspath(path))
    data = RecordFile(path, [], [], [])
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if limit is not None and data.count >= limit:
                break
            if not raw.strip():
                continue
            record, problem = _parse(raw)
            if problem is not None:
                data.problems.append((path, n, problem))
                continue
            data.records.append(dict(record, video=os.path.join(base, record["video"])))
            data.lines.append(n)
    if not data.count:
        raise ValueError(f"{path!r} holds no records")
    return data


def _parse(raw: bytes):
    """(the record, None) or (None, why the line is not a record)."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except json.JSONDecodeError as err:
        return None, f"malformed JSON ({err.msg}, column {err.colno})"
    if not isinstance(record, dict):
        return None, f"a record must be a JSON object {{\"video\", \"question\", \"answer\"}}, got {raw.strip()[:60]!r}"
    for key in FIELDS:
        if key not in record:
            return None, f"no \"{key}\""
        if not isinstance(record[key], str):
            return None, f"\"{key}\" must be a string, got {json.dumps(record[key])[:60]}"
        if not record[key].strip():
            return None, f"\"{key}\" is empty"
    return record, None


def video_problems(data: RecordFile, check: Callable[[str], object], rank: int = 0, world: int = 1) -> List[Problem]:
    """The records whose video cannot be used: missing on this rank's file system (every rank looks at every
    record: an SP group reads each of its records' videos), or refused by ``check(path)`` (e.g.
    ``SpavaEngine.check_video``: it plans from the container's metadata; this rank checks records ``rank::world``)."""
    from .entry import one_line

    problems = []
    for i, (line, record) in enumerate(zip(data.lines, data.records)):
        video = record["video"]
        if not os.path.isfile(video):
            problems.append((data.path, line, f"video file not found: {video!r}"))
        elif i % world == rank:
            try:
                check(video)
            except Exception as err:  # noqa: BLE001 - any reason a video cannot be read is this record's problem
                problems.append((data.path, line, one_line(err)))
    return problems


def raise_problems(problems: List[Problem], what: str = "nothing was trained", listed: int = 3,
                   report: bool = True) -> None:
    """Log every problem (``file:line: reason``; ``report``: on this rank) and raise one ValueError that names the
    first ``listed``."""
    if not problems:
        return
    problems = sorted(set(problems))
    for path, line, reason in problems if report else ():
        log.error("%s:%d: %s", path, line, reason)
    first = "; ".join(f"{path}:{line}: {reason}" for path, line, reason in problems[:listed])
    more = f" and {len(problems) - listed} more (rank 0 logs every one)" if len(problems) > listed else ""
    raise ValueError(f"{len(problems)} bad record(s), {what}: {first}{more}")
