"""Worker processes on submitit: the comparison table's cells and a search's trials, spread over N workers.

submitit is the engine (optional: `pip install submitit`; nothing else imports this module). Its LocalExecutor
starts the workers as processes on this machine, one per GPU (CUDA_VISIBLE_DEVICES set per worker) or each with a
share of the CPU cores; its SlurmExecutor submits them as one SLURM job array. Every worker loads the model and
data once, then takes cells (or trials) from the shared store (`lib.compare.store`) until none is left: it claims
one atomically, computes it, writes its record whole, releases it. A worker that dies mid-cell leaves no record
and a claim whose owner is gone, which the next worker takes over. Workers are submitit Checkpointables: on a
SLURM time-out or preemption they release their claims and are requeued, and carry on from the store.

What a worker computes does not depend on which worker it is: cells and trials are seeded from their keys, and
the table is assembled from the store in its own order (lib.compare.table).
"""
from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import submitit
import submitit.core.utils
from submitit.helpers import Checkpointable

from ..errors import UserError
from .store import CellStore, work_through

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXECUTORS = ("local", "slurm")
POLL_S = 0.5


@dataclass
class Launch:
    """How to start the workers."""

    workers: int
    folder: str  # submitit's job folder: pickles and each worker's stdout/stderr
    executor: str = "local"
    gpus_per_worker: int | None = None  # None: local, one GPU each when there are enough (else none); slurm, 1
    time_limit_min: int = 24 * 60
    partition: str | None = None
    cpus_per_worker: int | None = None  # slurm: --cpus-per-task
    slurm_options: dict[str, str] = field(default_factory=dict)  # any other sbatch option, e.g. account
    threads: int | None = None  # torch threads per worker (None: the CPU share, or SLURM_CPUS_PER_TASK)


def _python_path_setup() -> list[str]:
    """Shell lines run before each worker: the repository importable wherever the job starts."""
    return [f"export PYTHONPATH={shlex.quote(REPO_ROOT)}${{PYTHONPATH:+:$PYTHONPATH}}"]


def local_devices(launch: Launch) -> list[list[int]]:
    """The GPUs of each local worker (empty lists: CPU workers)."""
    import torch
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    per = launch.gpus_per_worker
    if per is None:
        per = 1 if available >= launch.workers else 0
    if per and per * launch.workers > available:
        raise UserError(f"{launch.workers} workers with {per} GPU(s) each need {per * launch.workers} GPUs; this "
                        f"machine has {available} (use fewer --workers, or --gpus_per_worker 0 for CPU workers)",
                        "workers")
    return [list(range(i * per, (i + 1) * per)) for i in range(launch.workers)]


def make_executor(launch: Launch):
    """A submitit executor with the launch's settings (no job submitted yet)."""
    if launch.executor == "local":
        executor = submitit.LocalExecutor(folder=launch.folder)
        executor.update_parameters(timeout_min=launch.time_limit_min, setup=_python_path_setup(),
                                   signal_delay_s=60)
        return executor
    executor = submitit.SlurmExecutor(folder=launch.folder)
    params: dict[str, Any] = {"job_name": "atp-workers", "time": launch.time_limit_min,
                              "gpus_per_node": 1 if launch.gpus_per_worker is None else launch.gpus_per_worker,
                              "setup": _python_path_setup(), "array_parallelism": launch.workers,
                              "signal_delay_s": 120, "stderr_to_stdout": True}
    if launch.partition:
        params["partition"] = launch.partition
    if launch.cpus_per_worker:
        params["cpus_per_task"] = launch.cpus_per_worker
    if launch.slurm_options:
        params["additional_parameters"] = dict(launch.slurm_options)
    executor.update_parameters(**params)
    return executor


def start(launch: Launch, worker: "Worker") -> list:
    """Submit `launch.workers` copies of `worker` (worker(i) for i = 0..N-1); their submitit jobs."""
    executor = make_executor(launch)
    if launch.executor == "slurm":
        return executor.map_array(worker, list(range(launch.workers)))  # one job array
    devices = local_devices(launch)
    share = max(1, (os.cpu_count() or 1) // launch.workers)
    jobs = []
    for index, gpus in enumerate(devices):
        executor.update_parameters(gpus_per_node=len(gpus), visible_gpus=gpus)
        worker.threads = launch.threads or share
        jobs.append(executor.submit(worker, index))
    return jobs


def wait(jobs: list, progress: Callable[[], str | None] | None = None, poll_s: float = POLL_S) -> list[str]:
    """Block until every job has ended (printing `progress()` whenever it changes); one line per job that did
    not end cleanly."""
    shown = None
    while True:
        ended = all(job.done() for job in jobs)
        line = progress() if progress is not None else None
        if line and line != shown:
            print(line, flush=True)
            shown = line
        if ended:
            break
        time.sleep(poll_s)
    problems = []
    for index, job in enumerate(jobs):
        try:
            # a local job's files are on this disk: no result now means none ever (submitit would wait 15 s for a
            # network file system to show it)
            failure = submitit.core.utils.UncompletedJobError() \
                if isinstance(job, submitit.LocalJob) and not job.paths.result_pickle.exists() else job.exception()
        except Exception as exc:  # noqa: BLE001 - a job whose state cannot be read is reported, not fatal
            failure = exc
        if isinstance(failure, submitit.core.utils.UncompletedJobError):
            problems.append(f"worker {index} (job {job.job_id}) ended without finishing (killed, or out of time); "
                            f"its log: {job.paths.stdout}")
        elif failure is not None:
            last = [line for line in str(failure).strip().splitlines() if line.strip()]
            problems.append(f"worker {index} (job {job.job_id}) failed: "
                            f"{last[-1] if last else type(failure).__name__}; its log: {job.paths.stdout}")
    return problems


def cancel(jobs: list, executor: str) -> str:
    """Stop local workers; SLURM jobs are left to finish (their cells land in the store). What was done."""
    if executor == "local":
        for job in jobs:
            with contextlib.suppress(Exception):
                job.cancel(check=False)
        return "the local workers were stopped"
    ids = sorted({str(job.job_id).split("_")[0] for job in jobs})
    return f"the SLURM job array keeps running (scancel {' '.join(ids)} stops it)"


class Worker(Checkpointable):
    """A worker: set up once (load the model), then step through the work until it is all done.

    `setup(payload, store)` loads what the work needs and returns its steps (each returns DONE, PROGRESS or
    BLOCKED). It is a module-level function of the code that owns the work (the table, the search), passed in
    rather than imported here, so this module knows nothing of what the workers compute."""

    def __init__(self, store_root: str, setup: Callable[[Any, CellStore], list[Callable[[], str]]], payload: Any,
                 threads: int | None = None):
        self.store_root = store_root
        self.setup_work, self.payload = setup, payload
        self.threads = threads
        self._store: CellStore | None = None

    def __getstate__(self) -> dict:  # what a (re)submission pickles: settings only, never the loaded model
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._store = None

    def __call__(self, index: int) -> dict:
        threads = self.threads or int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0) or None
        if threads:
            import torch
            torch.set_num_threads(threads)
        self._store = store = CellStore(self.store_root)
        started = time.perf_counter()
        print(f"worker {index}: pid {os.getpid()}, {threads or 'default'} threads, CUDA_VISIBLE_DEVICES="
              f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}", flush=True)
        with store.heartbeating():
            steps = self.setup_work(self.payload, store)
            work_through(steps, store)
        return {"index": index, "seconds": time.perf_counter() - started}

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Time-out or preemption: give the claims back now (others need not wait for them to go stale), then
        let submitit requeue this worker, which resumes from the store."""
        if self._store is not None:
            self._store.release_all()
        return super().checkpoint(*args, **kwargs)


@contextlib.contextmanager
def search_with_workers(config, setup: Callable[[Any, CellStore], list[Callable[[], str]]], load: Callable):
    """Run config's search on --search_workers local workers; yields the store holding every trial they scored.

    The store lies next to --search_log (`<log>.trials/`, kept: a rerun resumes from it) or in a temporary
    directory (removed afterwards)."""
    from dataclasses import replace
    search = config.search
    keep = bool(search.log)
    root = search.log + ".trials" if keep else tempfile.mkdtemp(prefix="atp-search-")
    store = CellStore(root)
    worker_config = replace(config, search=replace(search, workers=1),
                            outputs=replace(config.outputs, results=None, save_model=None, quiet=True))
    launch = Launch(workers=search.workers, folder=os.path.join(root, "workers"))
    per_round = f", {search.points or search.workers} values per round" if search.strategy == "parallel" else ""
    print(f"search: {search.workers} workers ({search.strategy}{per_round}); their logs: {launch.folder}", flush=True)
    jobs = start(launch, Worker(store.root, setup, (worker_config, load)))
    try:
        problems = wait(jobs)
    except KeyboardInterrupt:
        cancel(jobs, launch.executor)
        raise
    for line in problems:
        print(f"warning: {line} (its trials are scored here)", file=sys.stderr, flush=True)
    try:
        yield store
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
