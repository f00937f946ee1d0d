"""Run a function on W spawned processes joined by torch.distributed (gloo on CPU, NCCL on GPUs), with a deadline.

A worker that raises reports its traceback; a worker that hangs is killed when the deadline passes. Either way the
test fails with a message instead of blocking the suite.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(**extra: str) -> dict:
    """The environment for a script run as a child process: this checkout first on PYTHONPATH, ahead of what is
    there already (the GPU machines put carried packages such as deepspeed on PYTHONPATH)."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, backend, fn, args, results):
    try:
        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        else:  # DeepSpeed picks its accelerator from the environment; children of this process inherit it
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=60))
        try:
            # Plain pickle copies tensors; the queue's own reducer would share them through memory that
            # disappears when this process exits.
            results.put((rank, "ok", pickle.dumps(fn(rank, world_size, *args))))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results.put((rank, "error", traceback.format_exc()))


def run_distributed(fn, world_size: int, *args, backend: str = "gloo", timeout: float = 240.0):
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` processes; return the results by rank.

    ``fn`` must be a module-level function (it is pickled by reference).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    # Not daemonic: a rank may start DataLoader workers of its own. The ``finally`` below reaps them all.
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, fn, args, results), daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    out, errors = {}, {}
    first_error = None
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    try:
        while len(out) + len(errors) < world_size:
            left = (deadline - datetime.datetime.now()).total_seconds()
            if left <= 0:
                raise TimeoutError(f"distributed test did not finish in {timeout:.0f} s; ranks done: {sorted(out)}, "
                                   f"failed: {errors}")
            try:
                rank, status, payload = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in out
                        and r not in errors]
                if dead:
                    # A rank died (e.g. a collective timed out after a peer failed): report the peers' errors too.
                    msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
                    raise RuntimeError(f"rank(s) {dead} died without a report (exit codes "
                                       f"{[procs[r].exitcode for r in dead]}); errors of other ranks:\n{msg}")
                if errors and datetime.datetime.now() > first_error + datetime.timedelta(seconds=5):
                    break  # the other ranks are probably stuck in a collective with the failed one
                continue
            (out if status == "ok" else errors)[rank] = pickle.loads(payload) if status == "ok" else payload
            if status != "ok" and len(errors) == 1:
                first_error = datetime.datetime.now()
        if errors:
            msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise AssertionError(f"distributed test failed on rank(s) {sorted(errors)}:\n{msg}")
        return [out[r] for r in range(world_size)]
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()


def run_threaded(fn, world_size: int, *args, timeout: float = 120.0):
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` threads of this process joined by PyTorch's
    multi-threaded process group (``torch.testing._internal.distributed.multi_threaded_pg``): more ranks than CI's
    cores allow as processes. It implements all_to_all_single, the all-gathers, all_reduce and reduce_scatter;
    every collective is synchronous. Returns the results by rank; a rank's exception fails the call.
    """
    import threading

    from torch.testing._internal.distributed.multi_threaded_pg import (ProcessLocalGroup, _install_threaded_pg,
                                                                      _uninstall_threaded_pg)

    results, errors = {}, {}
    store = dist.HashStore()

    def worker(rank):
        try:
            dist.init_process_group("threaded", rank=rank, world_size=world_size, store=store)
            try:
                results[rank] = fn(rank, world_size, *args)
            finally:
                dist.destroy_process_group()
        except BaseException as e:  # noqa: BLE001 - reported below; wake the ranks waiting in a collective
            errors[rank] = traceback.format_exc()
            ProcessLocalGroup.exception_handle(e)

    _install_threaded_pg()
    torch._C._distributed_c10d._set_thread_isolation_mode(True)
    try:
        threads = [threading.Thread(target=worker, args=(r,), daemon=True) for r in range(world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout)
        if any(t.is_alive() for t in threads):
            raise TimeoutError(f"threaded ranks did not finish in {timeout:.0f} s; done: {sorted(results)}")
    finally:
        torch._C._distributed_c10d._set_thread_isolation_mode(False)
        _uninstall_threaded_pg()
        ProcessLocalGroup.reset()
    if errors:
        raise AssertionError("threaded ranks failed:\n" + "\n".join(f"--- rank {r} ---\n{tb}"
                                                                     for r, tb in sorted(errors.items())))
    return [results[r] for r in range(world_size)]
