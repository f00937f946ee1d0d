"""The end-to-end benchmark's sweep (``launch/bench_e2e.py``): every model x resolution x context x method of the
arguments, resumed from the results file, within a time budget; an out-of-memory dense run is skipped, one in a
multi-GPU method ends the job (the next run retries it once); ``--share-of`` adds one rank's share of each W."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from ..step_timer import Clock
from .e2e import (ALL_METHODS, DEFAULT_CONTEXTS, MESH_METHODS, SHARE_METHODS, Route, Runner, case_key,
                  install_cpu_cp_shim, make_case, measure, measure_with_fallback, parse_context, plan_size,
                  prepare_model)
from .e2e_report import tables
from .records import Results
from .shapes import shape_tokenizer
from .timing import agree, free_memory, gather_floats, log, peak_gib


@dataclasses.dataclass
class Job:
    """Where the sweep runs: this rank of the job, its device and dtype."""
    rank: int
    world: int
    distributed: bool
    device: torch.device
    dtype: torch.dtype

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def bench(args) -> int:
    """Every model x resolution x context x method of ``args``; rank 0 writes the JSON and prints the tables."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    job = start_job(args)
    if job is None:
        return 2
    methods, share_methods = choose_methods(args, job)
    results = open_results(args, job)
    if args.tiny and "torch_cp" in methods:
        err = install_cpu_cp_shim(job.world)
        if err:
            log(f"torch_cp cannot run on the CPU here ({err}); skipped")
            methods.remove("torch_cp")
    sweep = Sweep(args, job, results, methods, share_methods)
    for shape in args.models or (["tiny"] if args.tiny else ["7b", "3b"]):
        if sweep.stopped:
            break
        sweep.run_shape(shape)
    finish(args, job, results, sweep.stopped)
    return 0


def start_job(args) -> Optional[Job]:
    """The process group (under torchrun), the device (CUDA, or the CPU for ``--tiny``) and the dtype."""
    from spava_ds import entry

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast on the lent machines (GPU.md)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if args.tiny:
        torch.set_num_threads(1)
    rank, world = entry.init_distributed(args, backend="gloo" if args.tiny else None) if distributed else (0, 1)
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if args.tiny and args.passing_len is None:
        args.passing_len = 16
    if not cuda and not args.tiny:
        log("no CUDA device: use --tiny for the CPU smoke run")
        return None
    return Job(rank, world, distributed, device, torch.bfloat16 if cuda else torch.float32)


def choose_methods(args, job: Job) -> Tuple[List[str], List[str]]:
    """The methods to run in this job (dense first: its logits check the others) and those of ``--share-of``."""
    from spava_ds.kernels import flash_attn_available

    methods = list(args.methods or ALL_METHODS)
    if args.methods is None and job.cuda and flash_attn_available():
        methods.insert(1, "dense_flash_attn")
    known = ALL_METHODS + MESH_METHODS + ["dense_flash_attn"]
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {known}")
    if any(m in MESH_METHODS for m in methods) and (args.ulysses_degree < 1 or job.world % args.ulysses_degree):
        raise SystemExit(f"--ulysses-degree {args.ulysses_degree} does not divide the {job.world} process(es)")
    if "dense_flash_attn" in methods and not (job.cuda and flash_attn_available()):
        log("dense_flash_attn needs CUDA and the flash-attn package: skipped")
        methods.remove("dense_flash_attn")
    share_methods = [m for m in methods if m in SHARE_METHODS] if args.share_of else []
    if args.share_of and job.world > 1:
        raise SystemExit("--share-of runs in one process (it stands for one rank of each W): start without torchrun")
    if job.world == 1:
        multi = [m for m in methods if not m.startswith("dense") and m not in share_methods]
        if multi:
            log(f"one process: only the dense methods run (skipping {multi}); start with torchrun --nproc_per_node N")
        methods = [m for m in methods if m.startswith("dense")]
    return sorted(methods, key=lambda m: 0 if m.startswith("dense") else 1), share_methods


def open_results(args, job: Job) -> Results:
    """``--out``, resumed unless ``--fresh``, with this run's description appended to its runs."""
    import transformers

    card = torch.cuda.get_device_name(job.device) if job.cuda else "CPU"
    meta = dict(card=card, gpus=job.world, torch=torch.__version__, transformers=transformers.__version__,
                date=time.strftime("%Y-%m-%d %H:%M"), command=" ".join(["launch/bench_e2e.py"] + sys.argv[1:]),
                dtype=str(job.dtype), iters=args.iters, warmup=args.warmup, cuda_graphs=args.cuda_graphs,
                inputs="synthetic: random pixel values of the Qwen grid, no video decoding (no PyAV on the GPU "
                       "image); preprocessing outside the timed region",
                torch_cp="whole language model: every attention layer through context_parallel's ring (SDPA "
                         f"backend {args.cp_backend}, KV heads {args.cp_gqa}); vision frame-parallel as ours")
    results = Results(args.out, args.fresh, meta, job.rank)
    if job.distributed:
        dist.barrier()  # every rank has read --out before rank 0 writes it
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    results.save()
    log(f"bench_e2e: {job.world} x {card}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{job.dtype}")
    log("inputs are synthetic (random pixel values of the right grid): no video decoding")
    return results


def finish(args, job: Job, results: Results, stopped: bool) -> None:
    """Rank 0 prints the tables; every rank leaves the process group."""
    if job.rank == 0:
        missing = [(r["case"], r["method"]) for r in results.data["results"] if r.get("status") == "running"]
        print(tables(results.data), flush=True)
        print(f"\nresults: {args.out}" + ("" if stopped or missing else "; all measurements done"), flush=True)
    if job.distributed:
        dist.barrier()
        dist.destroy_process_group()


def case_fields(case, key: str, gpus_job: int) -> dict:
    """The fields every result row of one case starts with (``key``: its ``case_key``)."""
    return dict(case=key, model=case.model, resolution=case.resolution, target=case.target, size=list(case.size),
                frames=case.frames, context_tokens=case.context_len, query_tokens=case.query_len, gpus_job=gpus_job)


def share_name(method: str, world: int) -> str:
    return f"{method}@share{world}"


class Sweep:
    """The loop over one model's cases and methods, with the time budget (``stopped``) and the slowest run seen."""

    def __init__(self, args, job: Job, results: Results, methods: List[str], share_methods: List[str]):
        self.args, self.job, self.results, self.methods = args, job, results, methods
        self.share_methods = share_methods
        self.share_names = [share_name(m, w) for w in args.share_of or [] for m in share_methods]
        self.clock = Clock(job.device)
        self.start = time.perf_counter()
        self.slowest_run = 0.0
        self.stopped = False

    def run_shape(self, shape: str) -> None:
        args, job = self.args, self.job
        contexts = [parse_context(c) for c in args.contexts] if args.contexts else ([320] if args.tiny
                                                                                    else DEFAULT_CONTEXTS)
        plan = [(res, t) for res in args.resolutions or (["112x112"] if args.tiny else ["360p", "720p"])
                for t in contexts]
        todo = [(res, t) for res, t in plan if not all(self.results.done(case_key(shape, res, t, job.world), m)
                                                       for m in self.methods + self.share_names)]
        if not todo:
            log(f"[{shape}] everything already in {args.out}")
            return
        free_memory(job.device)
        tokenizer = shape_tokenizer(shape)
        model = prepare_model(shape, tokenizer, job.device)
        for res, target in todo:
            if self.stopped:
                break
            self.run_case(model, tokenizer, shape, res, target)
        del model
        free_memory(job.device)

    def run_case(self, model, tokenizer, shape: str, res: str, target: int) -> None:
        """Every method at one model, resolution and target context (then the one-rank shares)."""
        from spava_ds.models import family_of

        args, job, results = self.args, self.job, self.results
        key = case_key(shape, res, target, job.world)
        if args.max_context and target > args.max_context:
            for mth in self.methods:
                if not results.done(key, mth):
                    results.put(dict(case=key, model=shape, resolution=res, target=target, method=mth,
                                     gpus_job=job.world, status="skipped", message=f"above --max-context "
                                     f"{args.max_context}", size=plan_size(family_of(model), res, args)))
            log(f"[{key}] skipped: above --max-context {args.max_context}")
            return
        free_memory(job.device)
        case = make_case(model, tokenizer, shape, res, target, job.world, args, job.device, job.dtype)
        log(f"\n[{key}] {case.frames} frames at {case.size[0]}x{case.size[1]} (grid {case.grid.tolist()[0]}), "
            f"{case.context_len} context + {case.query_len} query tokens")
        base = case_fields(case, key, job.world)
        for mth in self.methods:
            if results.done(key, mth):
                continue
            if self.over_budget():
                self.stopped = True
                break
            if mth == "torch_cp" and family_of(model).decoder_inputs:
                results.put(dict(base, method=mth, gpus=job.world, status="skipped", message="context_parallel "
                                 "does not shard DeepStack's inputs (Qwen3-VL)"))
                continue
            self.run_method(model, case, mth, base)
        del case
        free_memory(job.device)
        if self.share_names and not self.stopped:
            self.measure_shares(model, tokenizer, shape, res, target)

    def run_method(self, model, case, mth: str, base: dict) -> None:
        """One method at one case: the ranks that run it measure, every rank records the outcome."""
        job, results = self.job, self.results
        single = mth.startswith("dense")
        gpus = 1 if single else job.world
        previous = results.find(base["case"], mth)
        entry = dict(base, method=mth, gpus=gpus, status="running", attempts=(previous or {}).get("attempts", 0) + 1)
        t_method = time.perf_counter()
        results.put(entry)
        free_memory(job.device)
        status, message, m = "ok", "", {}
        if not single or job.rank == 0:
            status, message, m = self.measure_method(model, case, mth, single)
        peak = peak_gib(job.device)
        free_memory(job.device)
        code = agree({"ok": 0, "oom": 1}[status] if job.rank == 0 else 0, job.device)  # rank 0's single-GPU status
        if single:
            status = "ok" if code == 0 else "oom"
        peaks = gather_floats([peak], job.device) if not single else [[peak]]
        if status != "ok":
            entry.update(status=status, message=message or "out of memory on 1 GPU")
            results.put(entry)
            log(f"  {mth:>18}: skipped ({entry['message']})")
            return
        if job.rank == 0:
            logits = m.pop("_logits")
            if mth == "dense" or (mth.startswith("dense") and results.logits.get(base["case"]) is None):
                results.logits[base["case"]] = logits
            entry.update(m, status="ok", peak_mem_gib=[p[0] for p in peaks[:gpus]],
                         measured_in_s=round(time.perf_counter() - t_method, 1))
            self.slowest_run = max(self.slowest_run, entry["ttft"])
            log(f"  {mth:>18}: TTFT {entry['ttft']:.3f} s (vision {entry['vision']:.3f}, LM "
                f"{entry['lm']:.3f}, head {entry['head']:.4f}); peak {max(entry['peak_mem_gib']):.1f} GiB; "
                f"{entry['measured_in_s']} s"
                + (f"; logits vs dense rel. {entry['logit_rel_diff']:.1e}" if 'logit_rel_diff' in entry else ""))
        else:
            entry.update(status="ok")
        results.put(entry)

    def measure_method(self, model, case, mth: str, single: bool):
        """(status, message, measurement) of one method on this rank; an out-of-memory error in a multi-GPU
        method ends the process (the other ranks wait in a collective)."""
        args, job = self.args, self.job
        key = case_key(case.model, case.resolution, case.target, job.world)
        try:
            if args.inject_oom == f"{mth}@{case.target}":
                raise torch.OutOfMemoryError("injected by --inject-oom (test)")
            runner = Runner(model, case, mth, job.device, self.clock, job.rank, job.world, args)
            trace = None
            if args.trace and mth in args.breakdown_methods:
                os.makedirs(args.trace, exist_ok=True)
                trace = os.path.join(args.trace, f"{case.model}_{case.resolution}_{case.target}_{mth}_rank{job.rank}"
                                                 ".json")
            m = measure_with_fallback(runner, args, self.clock, job.device, self.results.logits.get(key), trace,
                                      mth in args.breakdown_methods)
            return "ok", "", m
        except torch.OutOfMemoryError as e:
            if not single:
                print(f"[rank {job.rank}] {key} {mth}: out of memory ({str(e).splitlines()[0][:200]}); "
                      "a multi-GPU method cannot skip it (the other ranks wait in a collective): "
                      "exiting; rerun the same command to go on", file=sys.stderr, flush=True)
                os._exit(3)
            return "oom", f"out of memory on 1 GPU: {str(e).splitlines()[0][:160]}", {}
        finally:
            Route.name = "spava"

    def over_budget(self) -> bool:
        """Whether the next measurement would overrun --time-budget (rank 0 decides for every rank)."""
        args = self.args
        elapsed = time.perf_counter() - self.start
        over = (args.time_budget is not None
                and elapsed + self.slowest_run * (args.iters + args.warmup + 1) > args.time_budget)
        if agree(1.0 if over and (not dist.is_initialized() or dist.get_rank() == 0) else 0.0, self.job.device) > 0:
            log(f"time budget reached ({elapsed:.0f} s of {args.time_budget:.0f} s): stopping; rerun the same "
                "command to continue")
            return True
        return False

    def measure_shares(self, model, tokenizer, shape: str, res: str, target: int) -> None:
        """One process stands for rank ``--share-rank`` of each W of ``--share-of``: its vision share, its tokens
        of the prefill and the first token, every collective returning at once (PyTorch's fake process group and
        spava_ds's collective hook, ``spava_ds.benchmarks.host``), so the time is that rank's work with no
        communication: what W GPUs would take if the collectives were free."""
        from .host import alone, fake_group

        args, job, results = self.args, self.job, self.results
        for world in args.share_of:
            case = make_case(model, tokenizer, shape, res, target, world, args, job.device, job.dtype)
            key = case_key(shape, res, target, 1)
            for mth in self.share_methods:
                name = share_name(mth, world)
                if results.done(key, name):
                    continue
                if self.over_budget():
                    self.stopped = True
                    return
                entry = dict(case_fields(case, key, 1), gpus=world, method=name, share_of=world,
                             share_rank=args.share_rank, status="ok")
                free_memory(job.device)
                t_method = time.perf_counter()
                try:
                    fake_group(args.share_rank, world)
                    with alone():
                        m = measure(Runner(model, case, mth, job.device, self.clock, args.share_rank, world, args),
                                    args, self.clock, job.device, None, None, False)
                except torch.OutOfMemoryError as e:
                    entry.update(status="oom", message=f"out of memory: {str(e).splitlines()[0][:160]}")
                    results.put(entry)
                    log(f"  {name:>18}: skipped ({entry['message']})")
                    continue
                m.pop("_logits")  # the features and partials of the absent ranks are garbage: no first-token check
                entry.update(m, peak_mem_gib=[peak_gib(job.device)],
                             measured_in_s=round(time.perf_counter() - t_method, 1))
                self.slowest_run = max(self.slowest_run, entry["ttft"])
                results.put(entry)
                log(f"  {name:>18}: TTFT {entry['ttft']:.3f} s (vision {entry['vision']:.3f}, LM "
                    f"{entry['lm']:.3f}); peak {entry['peak_mem_gib'][0]:.1f} GiB; rank {args.share_rank} of "
                    f"{world} alone")
            del case
