"""``spava-infer``: answer questions about a video with Spava over several processes.

    torchrun --standalone --nproc_per_node 2 launch/infer.py --check      # embedded model, generated task video
    torchrun --nproc_per_node 4 launch/infer.py --model DIR --video clip.mp4 --question "What happens?"
    deepspeed --num_gpus 4 launch/infer.py --deepspeed-config configs/spava_sp2.json --model DIR --video v.mkv ...
    torchrun --nproc_per_node 2 launch/infer.py --model DIR --batch questions.jsonl --output answers.jsonl

Bad input (a missing or corrupt video, too few frames, an empty question, an unsupported checkpoint, a bad option)
ends the job with one line per rank, found on every rank before any collective, so nothing hangs.

--batch answers a .jsonl of {"video": ..., "question": ...} records (other fields are copied to the answer).
Each answer is one line of --output, written and fsync'd as soon as it exists. A bad record (malformed JSON, a
missing video, "video": 5, no question...) gets an error line ({"batch", "batch_line", "error"}) and the others are
answered; the exit code is then 3. SIGTERM/SIGINT end the batch after the record in flight (exit code 143/130). An
existing --output is refused unless --resume (answer only the records it does not answer yet; failed ones are tried
again) or --overwrite (replace it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import os
import signal
import sys
import tempfile
from typing import List, Optional, Set

import torch

from . import comm, entry

from .config import MODES

log = logging.getLogger("spava_ds.infer")

DEFAULT_QUESTION = "What is in this video?"
EXIT_RECORDS_FAILED = 3  # a batch ran to its end but some records could not be answered


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spava-infer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local Hugging Face checkpoint directory of a supported family, found from its "
                                   "config: Qwen2.5-VL, Qwen3-VL, InternVL3 (-hf) (default: the embedded model "
                                   "trained on spava_ds.tasks)")
    p.add_argument("--video", help="video file (mp4, mkv, webm, ...); default: a held-out synthetic task video "
                                   "(spava_ds.tasks) made on the fly, with its question and expected answer")
    p.add_argument("--question", help=f"default: the synthetic task's question, or {DEFAULT_QUESTION!r} with --video")
    p.add_argument("--task", choices=["retrieval", "ordering", "counting"], default="retrieval",
                   help="without --video: the synthetic task to make a video for")
    p.add_argument("--task-frames", type=int, default=64, help="without --video: frames of the synthetic video")
    p.add_argument("--task-seed", type=int, default=0, help="without --video: which held-out video (0, 1, ...)")
    p.add_argument("--batch", help="a .jsonl file of {\"video\": ..., \"question\": ...} records to answer")
    p.add_argument("--output", help="with --batch: where to write the answers (.jsonl; default: next to --batch, "
                                    "NAME.answers.jsonl)")
    p.add_argument("--resume", action="store_true",
                   help="with --batch: keep the existing --output and answer only the records it does not answer")
    p.add_argument("--overwrite", action="store_true", help="with --batch: replace an existing --output")
    p.add_argument("--mode", choices=MODES,
                   help="attention mode (default: the config's, else spava)")
    p.add_argument("--anchor-len", type=int, help="override the anchor length rule")
    p.add_argument("--passing-len", type=int, help="override the passing budget rule")
    p.add_argument("--cuda-graphs", choices=["auto", "on", "off"],
                   help="CUDA graphs of each layer's attention in the prefill (default: the config's, auto)")
    p.add_argument("--stream-video", "--stream_video", dest="stream_video", action=argparse.BooleanOptionalAction,
                   default=False, help="encode each rank's frames with the vision tower chunk by chunk as they "
                                       "decode, hiding the decoding (off by default until measured faster on a GPU; "
                                       "docs/inference.md)")
    p.add_argument("--stream-chunk-steps", "--stream_chunk_steps", dest="stream_chunk_steps", type=int,
                   help="with --stream-video: temporal steps a chunk (default: >= 8192 vision patches)")
    p.add_argument("--fps", type=float, help="frames sampled per second of video (default: the model's)")
    p.add_argument("--max-frames", type=int, help="at most this many frames (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the same on every rank)")
    p.add_argument("--check", action="store_true",
                   help="also run dense attention on rank 0 and print the largest first-token logit difference")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--deepspeed-config", "--deepspeed_config", dest="deepspeed_config",
                   help="a DeepSpeed JSON whose \"spava\" block configures the attention")
    # set by the deepspeed launcher (--local_rank) or torch.distributed.launch (--local-rank)
    p.add_argument("--local-rank", "--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    entry.add_arguments(p)
    return p


def check_args(args):
    """Refuse a bad command line the same way on every rank, before any collective; returns the sampling settings."""
    from .engine import GenerationConfig

    if args.fps is not None and not 0 < args.fps < math.inf:
        raise ValueError(f"--fps must be > 0 frames per second, got {args.fps}")
    if args.max_frames is not None and args.max_frames < 1:
        raise ValueError(f"--max-frames must be >= 1, got {args.max_frames}")
    if args.stream_chunk_steps is not None and args.stream_chunk_steps < 1:
        raise ValueError(f"--stream-chunk-steps must be >= 1, got {args.stream_chunk_steps}")
    if args.task_frames < 6:
        raise ValueError(f"--task-frames must be at least 6, got {args.task_frames}")
    if args.task_seed < 0:
        raise ValueError(f"--task-seed must be >= 0, got {args.task_seed}")
    if args.question is not None and not args.question.strip():
        raise ValueError("the question is empty: pass --question \"...\"")
    if args.batch:
        if args.video or args.question is not None:
            raise ValueError("--batch takes each record's video and question from its file: drop --video/--question")
        if args.resume and args.overwrite:
            raise ValueError("--resume keeps the existing --output and --overwrite replaces it: pass one of them")
    elif args.output or args.resume or args.overwrite:
        raise ValueError("--output, --resume and --overwrite go with --batch")
    return GenerationConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)


def _spava_config(args, world: int):
    from .config import SpavaConfig
    from .integrations.deepspeed import spava_config_from_deepspeed

    config, sp_size = spava_config_from_deepspeed(args.deepspeed_config) if args.deepspeed_config else \
        (SpavaConfig(), world)
    if sp_size != world:
        raise ValueError(f"{args.deepspeed_config}: sequence_parallel_size is {sp_size} but {world} process(es) "
                         "were launched; inference runs one question over all of them")
    graphs = {"auto": "auto", "on": True, "off": False}.get(args.cuda_graphs)
    overrides = {k: v for k, v in (("mode", args.mode), ("anchor_len", args.anchor_len),
                                   ("passing_len", args.passing_len), ("cuda_graphs", graphs)) if v is not None}
    return SpavaConfig.from_dict({**config.to_dict(), **overrides})


# ---- the batch file and the answers file --------------------------------------------------------------------------
@dataclasses.dataclass
class BatchItem:
    line: int  # 1-based line of the batch file
    record: Optional[dict]  # the parsed record (None: not a JSON object)
    problem: Optional[str]  # why it cannot be answered (None: it can be tried)


def read_batch(path: str) -> List[BatchItem]:
    """Every non-blank line of the batch file: a record to answer, or the reason it cannot be answered."""
    if not os.path.isfile(path):
        raise ValueError(f"--batch {path!r}: no such file")
    items = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.strip())
            except UnicodeDecodeError:
                items.append(BatchItem(n, None, "not UTF-8 text"))
                continue
            except json.JSONDecodeError as err:
                items.append(BatchItem(n, None, f"malformed JSON: {err.msg} at column {err.colno}"))
                continue
            problem = record_problem(record)
            items.append(BatchItem(n, record if isinstance(record, dict) else None, problem))
    if not items:
        raise ValueError(f"--batch {path!r} has no records")
    return items


def record_problem(record) -> Optional[str]:
    """Why a parsed batch record cannot be answered, or None."""
    if not isinstance(record, dict):
        return f"a record must be a JSON object like {{\"video\": ..., \"question\": ...}}, got {json.dumps(record)}"
    for key, what in (("video", "a file path"), ("question", "text")):
        if key not in record:
            return f"no \"{key}\""
        if not isinstance(record[key], str):
            return f"\"{key}\" must be a string ({what}), got {json.dumps(record[key])[:80]}"
        if not record[key].strip():
            return f"\"{key}\" is empty"
    return None


@dataclasses.dataclass
class OutputPlan:
    path: str
    existing: str  # what to do with the file: "new" (it must not exist), "resume" or "overwrite"
    done: Set[int]  # batch lines answered by an earlier run (--resume)
    complete_bytes: Optional[int] = None  # --resume: the size without a torn last line


def plan_output(args, items: List[BatchItem]) -> OutputPlan:
    """Rank 0's checks of --output: never the batch file, never an existing file without --resume/--overwrite."""
    path = args.output or os.path.splitext(args.batch)[0] + ".answers.jsonl"
    if not os.path.exists(path):
        return OutputPlan(path, "new", set())
    if os.path.samefile(path, args.batch):
        raise ValueError(f"--output {path!r} is the --batch file itself: the answers would overwrite the questions; "
                         "choose another --output")
    if not os.path.isfile(path):
        raise ValueError(f"--output {path!r} exists and is not a file")
    if args.overwrite:
        return OutputPlan(path, "overwrite", set())
    if not args.resume:
        raise ValueError(f"--output {path!r} exists: pass --resume to answer only the records it does not answer "
                         "yet, or --overwrite to replace it")
    done, complete_bytes = answered_lines(path, args.batch, items)
    return OutputPlan(path, "resume", done, complete_bytes)


def answered_lines(path: str, batch: str, items: List[BatchItem]):
    """(batch lines that ``path`` answers, the size of ``path`` without a torn last line); refuses a file that is not
    this batch's answers."""
    asked = {it.line: it.record for it in items if it.record is not None}
    with open(path, "rb") as f:
        data = f.read()
    complete_bytes = data.rfind(b"\n") + 1  # a line without its newline is a write cut short
    done = set()
    for n, raw in enumerate(data[:complete_bytes].splitlines(), 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("batch_line"), int):
            raise ValueError(f"--resume: {path}:{n} is not a record of spava-infer's answers; choose another "
                             "--output, or --overwrite")
        if "error" in rec:
            continue  # a failed record is tried again
        line, record = rec["batch_line"], asked.get(rec["batch_line"])
        if record is None or (record["video"], record["question"]) != (rec.get("video"), rec.get("question")):
            raise ValueError(f"--resume: {path}:{n} answers line {line} of the batch, but {batch}:{line} no longer "
                             "asks that question about that video (the batch changed); choose another --output, or "
                             "--overwrite")
        done.add(line)
    return done, complete_bytes


class AnswerFile:
    """Rank 0's answers: one JSON line per record, written by one ``os.write`` to an O_APPEND file and fsync'd, so
    that a kill at any moment leaves complete lines only. The file is locked: a second job cannot write into it."""

    def __init__(self, plan: OutputPlan):
        os.makedirs(os.path.dirname(os.path.abspath(plan.path)), exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | {"new": os.O_EXCL, "resume": 0,
                                                           "overwrite": os.O_TRUNC}[plan.existing]
        self.path, self._fd = plan.path, os.open(plan.path, flags, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise ValueError(f"--output {plan.path!r} is being written by another job") from None
        if plan.complete_bytes is not None and os.fstat(self._fd).st_size > plan.complete_bytes:
            log.warning("%s: cutting off an incomplete last line (a write cut short)", plan.path)
            os.ftruncate(self._fd, plan.complete_bytes)

    def write(self, record: dict) -> None:
        data = (json.dumps(record) + "\n").encode("utf-8")
        while data:
            data = data[os.write(self._fd, data):]
        os.fsync(self._fd)

    def close(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)


# ---- answering ----------------------------------------------------------------------------------------------------
def run(args) -> int:
    from .assets import default_model_dir
    from .engine import SpavaEngine

    gen = check_args(args)
    rank, world = entry.init_distributed(args)
    plan = None
    with entry.agreed("reading the inputs"):
        config = _spava_config(args, world)
        if args.video and not os.path.isfile(args.video):
            raise ValueError(f"video file not found: {args.video!r}")
        items = read_batch(args.batch) if args.batch else None
        if items is not None and rank == 0:
            plan = plan_output(args, items)
    model_dir = args.model or default_model_dir()
    if rank == 0:
        log.info("loading %s on %d process(es), mode %s", model_dir, world, config.mode)
    with entry.agreed("loading the model"):
        engine = SpavaEngine.from_pretrained(model_dir, config, dtype=getattr(torch, args.dtype) if args.dtype
                                             else None, stream_video=args.stream_video,
                                             stream_chunk_steps=args.stream_chunk_steps)
    if items is None:
        return answer_one(args, engine, gen, rank, world)
    done = comm.broadcast_object(plan.done if plan else None)
    return answer_batch(args, engine, gen, [it for it in items if it.line not in done], plan, rank, world)


def answer_one(args, engine, gen, rank: int, world: int) -> int:
    """--video (or a synthetic task video) and --question: print the answer."""
    with contextlib.ExitStack() as cleanup:
        with entry.agreed("reading the video"):
            record = dict(video=args.video, question=args.question)
            if not args.video:
                folder = cleanup.enter_context(tempfile.TemporaryDirectory(prefix=f"spava_task_r{rank}_"))
                record = _task_record(folder, args)
            if record["question"] is None:
                record["question"] = DEFAULT_QUESTION
            inputs = engine.video_inputs(record["video"], record["question"], args.fps, args.max_frames)
        result = _answer(engine, inputs, gen, record, args, rank, world)
        if rank == 0:
            _print_answer(result, inputs)
    return 0


def _task_record(folder: str, args) -> dict:
    """A held-out synthetic task video (spava_ds.tasks, test split: seeds the training split never uses) and its
    question and answer, written by every rank into its own folder (no shared file system needed)."""
    from .tasks import generate_split, load_records

    # generate_split numbers videos from 0; the one asked for is the last of task_seed + 1 records
    split = generate_split(folder, "test", args.task_seed + 1, frames=args.task_frames, tasks=(args.task,))
    task = load_records(split)[args.task_seed]
    record = dict(video=task["video"], question=args.question, task=task["task"])
    if args.question is None:
        record.update(question=task["question"], expected=task["answer"])
    return record


def _answer(engine, inputs: dict, gen, record: dict, args, rank: int, world: int) -> dict:
    """Generate; the record with the answer and its numbers (rank 0 also runs dense with --check)."""
    from .engine import GenerationConfig, dense_engine_like

    answer = engine.generate(inputs, gen)
    result = dict(_user_fields(record), answer=answer.text, context_tokens=answer.context_tokens,
                  prefill_seconds=round(answer.prefill_seconds, 4), mode=engine.config.mode, world_size=world)
    if args.check and rank == 0:
        dense = dense_engine_like(engine).generate(inputs, GenerationConfig(1))
        result["max_logit_diff_vs_dense"] = (answer.first_logits - dense.first_logits).abs().max().item()
        result["dense_prefill_seconds"] = round(dense.prefill_seconds, 4)
    return result


def _user_fields(record: dict) -> dict:
    """A record's own fields for its answer line; its own "answer" (e.g. a test set's) is kept as "expected"."""
    if "answer" not in record or "expected" in record:
        return dict(record)
    return {("expected" if k == "answer" else k): v for k, v in record.items()}


def answer_batch(args, engine, gen, todo: List[BatchItem], plan: Optional[OutputPlan], rank: int,
                 world: int) -> int:
    """Answer ``todo`` in order; rank 0 writes each answer or error record at once. Between records every rank
    agrees whether to stop (a signal on any rank) and whether the next record failed on any rank."""
    with entry.agreed("opening the output"):
        out = AnswerFile(plan) if rank == 0 else None
    counts = dict(answers=0, errors=0)
    progress = None
    if rank == 0:
        from tqdm.auto import tqdm

        if plan.done:
            print(f"resuming {plan.path}: {len(plan.done)} record(s) answered before, {len(todo)} to go", flush=True)
        progress = tqdm(total=len(todo), desc="answering", unit="q")
    stop = None
    try:
        for item in todo:
            stop = entry.stop_agreed()
            if stop:
                break
            inputs, problem = _prepare(engine, item, args)
            failures = entry.agree(problem)
            if not failures:
                result, failures = _answer_agreed(engine, inputs, gen, item.record, args, rank, world)
            if failures:
                reason = entry.describe_failures(failures, world)
                if rank == 0:
                    out.write(dict(_user_fields(item.record or {}), batch=args.batch, batch_line=item.line,
                                   error=reason))
                    log.warning("%s:%d: %s (an error record in %s)", args.batch, item.line, reason, plan.path)
                counts["errors"] += 1
            else:
                if rank == 0:
                    out.write(dict(result, batch_line=item.line))
                counts["answers"] += 1
            if progress is not None:
                progress.update(1)
    finally:
        if rank == 0:
            progress.close()
            out.close()
            print(_summary(plan.path, counts, len(todo), stop), flush=True)
    if stop:
        return 128 + stop
    return EXIT_RECORDS_FAILED if counts["errors"] else 0


def _answer_agreed(engine, inputs: dict, gen, record: dict, args, rank: int, world: int):
    """(``_answer``'s result, no failures), or (None, the failures) when the video's frames did not decode while
    streamed into the vision tower (``--stream-video``): every rank raises that VideoError together."""
    from .video import VideoError

    try:
        return _answer(engine, inputs, gen, record, args, rank, world), None
    except VideoError as err:
        return None, {r: entry.one_line(err) for r in range(world)}  # the same message on every rank


def _prepare(engine, item: BatchItem, args):
    """(the engine's inputs, None) or (None, why this record cannot be answered on this rank); no collective."""
    if item.problem:
        return None, item.problem
    try:
        return engine.video_inputs(item.record["video"], item.record["question"], args.fps, args.max_frames), None
    except Exception as err:  # noqa: BLE001 - this record's error, agreed on and recorded; nothing else ran yet
        return None, entry.one_line(err)


def _summary(path: str, counts: dict, total: int, stop: Optional[int]) -> str:
    left = total - counts["answers"] - counts["errors"]
    text = f"{path}: {counts['answers']} answer(s) written"
    if stop:
        text = f"stopped by {signal.Signals(stop).name}; {text}"
    if counts["errors"]:
        text += f"; {counts['errors']} of {total} record(s) failed (error records; --resume tries them again)"
    if left:
        text += f"; {left} record(s) not answered: run again with --resume"
    return text


def _print_answer(result: dict, inputs: dict) -> None:
    print(f"question: {result['question']}")
    print(f"answer: {result['answer']}")
    if "expected" in result:
        verdict = "correct" if result["answer"].strip().rstrip(".").lower() == result["expected"].lower() else "wrong"
        print(f"expected answer: {result['expected']} ({verdict}; {result['task']} task, held-out synthetic video)")
    print(f"context tokens: {result['context_tokens']} ({inputs['frames']} frames), query tokens: "
          f"{inputs['query_len']}, mode {result['mode']} on {result['world_size']} process(es)")
    print(f"prefill (vision + language model + first token): {result['prefill_seconds']:.3f} s")
    if "max_logit_diff_vs_dense" in result:
        print(f"dense attention on one process: prefill {result['dense_prefill_seconds']:.3f} s; largest "
              f"first-token logit difference {result['max_logit_diff_vs_dense']:.3e}")


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return entry.run_main(run, args, graceful_stop=bool(args.batch))


if __name__ == "__main__":
    sys.exit(main())
