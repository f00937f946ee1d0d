"""Result files of the benchmarks and evaluations: JSON lines (one record a line, flushed as it is produced, so a
run stopped later keeps it; read back plain or gzip-compressed, ``.jsonl.gz``) and the end-to-end benchmark's
resumable JSON."""

from __future__ import annotations

import collections
import gzip
import json
import os
from typing import Dict, Iterable, List, Optional

import torch


def read_jsonl(path: str) -> List[dict]:
    """The records of a JSON-lines file; a name ending in ``.gz`` is read through gzip. Blank lines are skipped."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_jsonls(paths: Iterable[str], missing_ok: bool = False) -> List[dict]:
    """The records of every file in ``paths``, in order (``missing_ok``: a file not there counts as empty)."""
    rows: List[dict] = []
    for path in paths:
        if missing_ok and not os.path.exists(path):
            continue
        rows += read_jsonl(path)
    return rows


def append_jsonl(path: str, record: dict) -> None:
    """Append one record as one line, flushed."""
    with open(path, "a", encoding="utf-8") as f:
        write_record(f, record)


def write_record(out, record: dict) -> None:
    """One record as one line of the open text file ``out`` (none: nothing), flushed."""
    if out:
        out.write(json.dumps(record) + "\n")
        out.flush()


def complete_cases(path: str, per_case: int) -> List[dict]:
    """The records of ``path`` whose case has all ``per_case`` records (a run cut short may leave one partial)."""
    records = read_jsonl(path)
    counts = collections.Counter(r["case"] for r in records)
    return [r for r in records if counts[r["case"]] == per_case]


class Results:
    """The end-to-end benchmark's JSON (``{"meta", "runs", "results"}``; rank 0 writes it after every measurement)
    and the dense first-token logits beside it (``PATH.dense_logits.pt``). An existing file is resumed: a
    measurement the job ended in (still ``running``) is retried once, then marked ``crashed``."""

    def __init__(self, path: str, fresh: bool, meta: dict, rank: int):
        self.path, self.rank = path, rank
        self.data = {"meta": meta, "results": []}
        self.logits: Dict[str, torch.Tensor] = {}
        if os.path.exists(path) and not fresh:
            with open(path, encoding="utf-8") as f:
                self.data = json.load(f)
            self.data.setdefault("runs", []).append(meta)
            for r in self.data["results"]:
                if r.get("status") == "running":  # the job ended during it: a time limit, or out of memory
                    if r.get("attempts", 1) >= 2:
                        r["status"] = "crashed"
                        r["message"] = (f"the job ended during this measurement {r.get('attempts')} times "
                                        "(out of memory on a rank?); not retried")
                    else:
                        r["status"] = "interrupted"  # retried once
            if os.path.exists(self.logits_path):
                self.logits = torch.load(self.logits_path)
        else:
            self.data["runs"] = [meta]

    @property
    def logits_path(self) -> str:
        return self.path + ".dense_logits.pt"

    def find(self, key: str, method: str) -> Optional[dict]:
        for r in self.data["results"]:
            if r["case"] == key and r["method"] == method:
                return r
        return None

    def done(self, key: str, method: str) -> bool:
        r = self.find(key, method)
        return r is not None and r.get("status") != "interrupted"

    def put(self, entry: dict):
        old = self.find(entry["case"], entry["method"])
        if old is not None:
            self.data["results"].remove(old)
        self.data["results"].append(entry)
        self.save()

    def save(self):
        if self.rank != 0:
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)
        if self.logits:
            torch.save(self.logits, self.logits_path)
