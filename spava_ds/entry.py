"""What every entry point shares (spava-infer, launch/*.py): one line per rank for an error, errors agreed on by all
ranks, a stop flag that SIGTERM/SIGINT set, and the collective timeout.

    def main(argv=None) -> int:
        p = argparse.ArgumentParser(...)
        entry.add_arguments(p)                       # --debug, --timeout
        return entry.run_main(run, p.parse_args(argv))

    def run(args) -> int:
        rank, world = entry.init_distributed(args)
        with entry.agreed("loading the model"):      # fails on every rank when it fails on one
            engine = ...

An error ends the job with ``[rank N] error: <one line>`` from each rank that sees it (the traceback too with
``--debug``). A rank whose collective failed names the peer that died or failed, from what the ranks posted in the
rendezvous store (``comm.RankHealth``). A failed distributed process ends with ``os._exit``: nothing waits on a broken
process group. Exit codes: 0 done, 1 error, 2 bad command line (argparse), 128 + the signal's number when a signal
stopped the job (130 SIGINT, 143 SIGTERM); an entry point may return others (spava-infer: 3, some records failed).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import signal
import sys
import traceback
import types
from typing import Callable, Dict, Optional

import torch.distributed as dist

from . import comm

# How long a rank whose collective failed waits for the others' word before it names the silent ones as dead. Well
# under torchrun's 30 s between its SIGTERM and SIGKILL to the survivors of a dead rank.
HEALTH_WAIT_S = 5.0

_state = types.SimpleNamespace(rank=int(os.environ.get("RANK", "0")), health=None, signal=None, graceful=False,
                               deferring=False, in_flight="the record in flight")


class PeerFailure(RuntimeError):
    """Another rank failed a step that every rank agreed on (``agreed``)."""


class Stopped(KeyboardInterrupt):
    """A stop signal (SIGTERM, SIGINT) ended the job at once."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``--debug`` and ``--timeout``, the options every entry point takes."""
    p.add_argument("--debug", action="store_true",
                   help="on an error, print the full traceback (default: one line per rank)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds a rank waits for the others (start-up, each collective) before it gives up on a "
                        "stuck or lost rank; default: $SPAVA_DIST_TIMEOUT, else 300 "
                        f"(now {comm.DEFAULT_TIMEOUT.total_seconds():g})")


def collective_timeout(args: argparse.Namespace) -> datetime.timedelta:
    """How long a collective waits for a stuck or lost rank: ``--timeout``, else ``comm.DEFAULT_TIMEOUT`` (give it to
    the process groups an entry point makes itself, whose default would be torch's own 10-30 minutes)."""
    timeout = getattr(args, "timeout", None)
    if timeout is not None and not 0 < timeout < math.inf:
        raise ValueError(f"--timeout must be a number of seconds > 0, got {timeout}")
    return datetime.timedelta(seconds=timeout) if timeout else comm.DEFAULT_TIMEOUT


def init_distributed(args: argparse.Namespace, backend: Optional[str] = None):
    """Join the job that torchrun or the deepspeed launcher started (a plain process is rank 0 of 1), with
    ``args.timeout``; returns (rank, world size)."""
    rank, world = comm.init_distributed(backend, collective_timeout(args))
    _state.rank = rank
    if world > 1:
        _state.health = comm.RankHealth.connect(rank, world)
    return rank, world


# ---- agreeing across ranks --------------------------------------------------------------------------------------------
def agree(error: Optional[str]) -> Dict[int, str]:
    """Every rank's error (None where all went well) -> ``{rank: error}`` of the ranks that failed, the same on every
    rank. A collective: every rank calls it at the same point."""
    return {r: e for r, e in enumerate(comm.all_gather_objects(error)) if e is not None}


def describe_failures(failures: Dict[int, str], world: Optional[int] = None) -> str:
    """``failures`` of ``agree`` in one line; the message alone when all ``world`` ranks gave the same one."""
    by_message: Dict[str, list] = {}
    for rank, message in sorted(failures.items()):
        by_message.setdefault(message, []).append(rank)
    if len(by_message) == 1 and len(failures) == world:
        return next(iter(by_message))
    return "; ".join(f"{_ranks(ranks)}: {message}" for message, ranks in by_message.items())


def _ranks(ranks) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


@contextlib.contextmanager
def agreed(step: str):
    """Run the block on every rank, then agree: if it raised on any rank, it raises on every rank (its own error where
    it failed, ``PeerFailure`` naming the failed ranks elsewhere), so that no rank goes on into a collective alone.
    Put it around work whose failure one rank may see alone: its files, its memory, its checkpoint copy."""
    error = None
    try:
        yield
    except Exception as err:  # noqa: BLE001 - every error is agreed on, then raised again
        error = err
    failures = agree(None if error is None else one_line(error))
    if error is not None:
        raise error
    if failures:
        raise PeerFailure(f"{step} failed on {describe_failures(failures)}")


# ---- stop signals -------------------------------------------------------------------------------------------------------
def stop_agreed() -> Optional[int]:
    """The stop signal that any rank received (the same answer on every rank), or None. A collective: call it between
    records, so that every rank stops after the same one."""
    signals = [s for s in comm.all_gather_objects(_state.signal) if s is not None]
    return signals[0] if signals else None


def received_signal() -> Optional[int]:
    """The stop signal this rank received, or None; no collective (for a loop that folds it into a reduction of its
    own, as ``stop_agreed`` does with a gather)."""
    return _state.signal


def _on_signal(signum, frame) -> None:
    first = _state.signal is None
    _state.signal = signum
    if first and (_state.graceful or _state.deferring):
        if _state.graceful:  # os.write: print may be in the middle of a write to the same stream
            os.write(2, f"[rank {_state.rank}] {signal.Signals(signum).name}: stopping after {_state.in_flight} "
                        "(send it again to stop at once)\n".encode())
        return
    raise Stopped(signum)


# ---- the end of an entry point ----------------------------------------------------------------------------------------
def run_main(fn: Callable[[argparse.Namespace], Optional[int]], args: argparse.Namespace,
             graceful_stop: bool = False, in_flight: str = "the record in flight") -> int:
    """Call ``fn(args)`` and end as every entry point should; returns the exit code.

    ``graceful_stop``: the first SIGTERM/SIGINT only sets the flag that ``stop_agreed`` (or ``received_signal``) reads
    (``fn`` polls it between records; ``in_flight`` names what it finishes first in the message), the second stops at
    once. Otherwise the first stops at once.
    """
    _state.graceful, _state.in_flight = graceful_stop, in_flight
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = fn(args)
        code = 0 if code is None else int(code)
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        return code
    except KeyboardInterrupt as stop:
        signum = stop.signum if isinstance(stop, Stopped) else int(signal.SIGINT)
        return _fail(128 + signum, f"stopped by {signal.Signals(signum).name}", None, args)
    except Exception as err:  # noqa: BLE001 - the one place that reports every error
        if _is_collective_failure(err) and _state.health is not None:
            culprits = _failed_peers()
            return _fail(1, f"{culprits + '; ' if culprits else ''}a collective failed: {one_line(err)}", err, args,
                         cause=False)
        return _fail(1, one_line(err), err, args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def one_line(err: BaseException) -> str:
    """An error in one line: its message (with its type unless it is a bad-input error), first line only."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else ""
    if not isinstance(err, (ValueError, OSError, PeerFailure)) or not text:
        text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text + (" (first line; --debug prints all)" if len(lines) > 1 else "")


def _is_collective_failure(err: Exception) -> bool:
    return isinstance(err, dist.DistError) or "gloo/" in str(err)  # gloo raises plain RuntimeErrors


def _failed_peers() -> str:
    """Which peers failed or went silent ("" if none), from the store (this rank waits HEALTH_WAIT_S at most)."""
    health = _state.health
    health.post("peer-failure")  # a victim, not a cause: the others do not name this rank
    _state.deferring = True  # torchrun's SIGTERM follows a dead rank at once: finish this first
    try:
        statuses = health.peers(HEALTH_WAIT_S)
    except Exception:  # noqa: BLE001 - the store is unreachable
        return f"{health.store_host} is gone (the rendezvous store it hosts is unreachable)"
    finally:
        _state.deferring = False
    failed = {r: s[len("error: "):] for r, s in statuses.items() if s and s.startswith("error: ")}
    silent = sorted(r for r, s in statuses.items() if s is None)
    parts = [f"{_ranks([r])} failed ({message})" for r, message in sorted(failed.items())]
    if silent:
        parts.append(f"{_ranks(silent)} did not answer within {HEALTH_WAIT_S:g} s (killed, crashed or stuck)")
    return "; ".join(parts)


def _fail(code: int, message: str, err: Optional[BaseException], args, cause: bool = True) -> int:
    """Report, tell the other ranks (``cause``: this rank's own failure, not a peer's), end the process."""
    if err is not None and getattr(args, "debug", False):
        traceback.print_exception(err)
    # one write with its newline: print() writes the newline apart, and the ranks' lines then interleave in one pipe
    sys.stderr.write(f"[rank {_state.rank}] error: {message}\n")
    sys.stderr.flush()
    if not dist.is_initialized():
        return code
    if _state.health is not None and cause:
        _state.health.post(f"error: {message}")
    sys.stdout.flush()
    os._exit(code)
