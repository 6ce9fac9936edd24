"""Where a sweep's runs execute: here (``local``, one after another or ``--jobs N`` at a time), as Ray tasks
(``ray``) or as Slurm jobs through submitit (``slurm``; slurm_job.py). Ray and submitit are optional extras,
imported only when their launcher is asked for.

Every launcher calls the same worker, ``execute_run``, which takes a run one attempt further: ``python -m
sdsbridge train configs/<name>.yaml --run-dir runs/<name>`` for a missing run, ``train --resume runs/<name>``
for a partial one (the exact resume from its newest verifying checkpoint), then ``eval --json`` for a
reference-prior run, and writes ``state/<name>.done.json`` last. Each attempt is a child process, not a
function call, because a run that dies (SIGKILL, out of memory, a CUDA error) must not take the sweep, the
Ray worker or the submitit job with it, and because every run then starts from a clean interpreter (seeds,
signal handlers, CUDA context) exactly as a hand-typed ``sdsbridge train`` does. The child gets SIGTERM when
its worker dies (Linux), so it checkpoints and exits instead of running on unseen; the worker holds
``state/<name>.lock`` (flock, shared with the child) for as long as either lives, so two sweeps never run
the same run at once.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from sdsbridge.atomic import append_bytes, atomic_write_bytes, make_dirs
from sdsbridge.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, UserError
from sdsbridge.sweep import run_dir, run_status, state_path

EXTRAS = {"ray": "ray", "submitit": "slurm"}
"""Optional module -> the sdsbridge extra that installs it."""
_PR_SET_PDEATHSIG = 1


@dataclass
class RunTask:
    """What a worker needs to take one run further (plain data: Ray and submitit pickle it)."""

    sweep_dir: str
    name: str
    device: str
    """The run's ``device:`` (eval runs there; 'auto' unless the config pins the CPU)."""
    eval_views: Optional[int]
    """Score the finished run with ``eval`` on this many views (None: not scored; only reference-prior runs are)."""
    eval_mesh_resolution: int = 128


class AttemptFailed(Exception):
    """An attempt of a run ended without finishing it; ``exit_code`` is the child's (negative: killed by a
    signal). Not retried: bad input (2) and interruptions (130) would only fail again."""

    def __init__(self, name: str, exit_code: int, error: str):
        super().__init__(f"{name}: attempt ended with exit code {exit_code}: {error}")
        self.exit_code, self.error = exit_code, error


class RetryableAttemptFailed(AttemptFailed):
    """An attempt that may succeed when resumed from its checkpoint (a crash, a kill, a failed export)."""


def import_extra(module: str):
    """Import an optional dependency; UserError naming the extra to install when it is missing."""
    try:
        return __import__(module)
    except ImportError:
        extra = EXTRAS[module]
        raise UserError(f"--launcher {extra}: needs the '{module}' package; "
                        f"install it with: pip install 'sdsbridge[{extra}]'") from None


def _child_setup(libc) -> Callable[[], None]:
    """preexec_fn of an attempt: SIGTERM when the worker thread that started it dies (Linux), and ignore
    SIGUSR2, which Slurm sends to every process of a job before its time limit: it is the worker's cue to
    stop the child (with SIGTERM) and requeue."""
    parent = os.getpid()

    def setup() -> None:
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
            if os.getppid() != parent:  # the worker died before prctl: nothing would tell this child
                os.kill(os.getpid(), signal.SIGTERM)
    return setup


def _libc():
    return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _error_line(log_path: Path, offset: int) -> str:
    """The attempt's one-line error (its 'error: ...' / 'interrupted ...' line), else its last line."""
    try:
        with open(log_path, "rb") as handle:
            handle.seek(offset)
            lines = [line.strip() for line in handle.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except OSError:
        return ""
    picked = [line for line in lines if line.startswith(("error: ", "interrupted"))]
    return (picked or lines or [""])[-1][:500]


def _record(sweep_dir: Path, name: str, row: dict) -> None:
    append_bytes(state_path(sweep_dir, name, ".jsonl"), (json.dumps(row) + "\n").encode("utf-8"))


def _run_child(task: RunTask, args: list[str], mode: str, lock_fd: int, env: dict,
               on_child: Optional[Callable[[subprocess.Popen], None]]) -> tuple[int, str]:
    """Run ``python -m sdsbridge ARGS`` with its output appended to logs/<name>.log, recording the attempt's
    start and end in state/<name>.jsonl. Returns (exit code, error line)."""
    sweep_dir = Path(task.sweep_dir)
    log_path = make_dirs(sweep_dir / "logs") / f"{task.name}.log"
    with open(log_path, "ab") as log:
        offset = log.tell()
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {socket.gethostname()}: sdsbridge {' '.join(args)}\n"
                  .encode())
        log.flush()
        started = time.time()
        child = subprocess.Popen([sys.executable, "-m", "sdsbridge", *args], stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env, pass_fds=(lock_fd,),
                                 preexec_fn=_child_setup(_libc()))
        _record(sweep_dir, task.name, {"event": "start", "mode": mode, "time": started, "pid": child.pid,
                                       "host": socket.gethostname(), "worker_pid": os.getpid()})
        if on_child is not None:
            on_child(child)
        code, error = None, ""
        try:
            while code is None:  # short waits: submitit's signal handler (slurm_job.py) may wait for the child too
                try:
                    code = child.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            if code is None and child.poll() is not None:
                code = child.returncode
            if code is not None:
                error = "" if code == 0 else _error_line(log_path, offset) or f"killed by signal {-code}"
                _record(sweep_dir, task.name, {"event": "end", "exit_code": code, "seconds":
                                               round(time.time() - started, 2), "error": error})
    return code, error


def _evaluate(task: RunTask, lock_fd: int, env: dict) -> dict:
    """``eval --json`` of the finished run: its scores, or {"error": ...} (the run stays done either way)."""
    folder = run_dir(Path(task.sweep_dir), task.name)
    device = "cpu" if task.device == "cpu" else "auto"
    done = subprocess.run([sys.executable, "-m", "sdsbridge", "eval", str(folder), "--json", "--device", device,
                           "--views", str(task.eval_views), "--mesh-resolution", str(task.eval_mesh_resolution)],
                          capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, pass_fds=(lock_fd,),
                          preexec_fn=_child_setup(_libc()))
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return {"error": (lines or [f"exit code {done.returncode}"])[-1][:500]}
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        return {"error": f"eval printed no JSON: {done.stdout.strip()[:200]}"}


def execute_run(task: RunTask, env_update: Optional[dict] = None,
                on_child: Optional[Callable[[subprocess.Popen], None]] = None) -> str:
    """Take run ``task.name`` one attempt further (module docstring). Returns 'done' (finished now or before)
    or 'busy' (another worker holds its lock). Raises AttemptFailed / RetryableAttemptFailed when the attempt
    did not finish it; ``on_child`` gets the child process as soon as it starts (slurm_job.py stops it)."""
    sweep_dir = Path(task.sweep_dir)
    make_dirs(sweep_dir / "state")
    lock = open(state_path(sweep_dir, task.name, ".lock"), "a+b")
    try:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return "busy"
        status = run_status(sweep_dir, task.name)
        if status == "done":
            return "done"
        folder = run_dir(sweep_dir, task.name)
        env = {**os.environ, **(env_update or {})}
        if status == "missing":
            if folder.exists():  # a fresh attempt killed before its first checkpoint: nothing to resume
                shutil.rmtree(folder)
            config_file = sweep_dir / "configs" / f"{task.name}.yaml"
            args, mode = ["train", str(config_file), "--run-dir", str(folder), "--no-progress"], "fresh"
        else:
            args, mode = ["train", "--resume", str(folder), "--no-progress"], "resume"
        code, error = _run_child(task, args, mode, lock.fileno(), env, on_child)
        if code != 0:
            kind = AttemptFailed if code in (EXIT_BAD_INPUT, EXIT_INTERRUPTED) else RetryableAttemptFailed
            raise kind(task.name, code, error)
        result: dict = {"name": task.name, "finished": time.time()}
        if task.eval_views:
            scores = _evaluate(task, lock.fileno(), env)
            result.update({"eval_error": scores["error"]} if "error" in scores else {"eval": scores})
        atomic_write_bytes(state_path(sweep_dir, task.name, ".done.json"), (json.dumps(result) + "\n").encode())
        return "done"
    finally:
        lock.close()


def execute_with_retries(task: RunTask, retries: int, env_update: Optional[dict] = None,
                         on_child: Optional[Callable[[subprocess.Popen], None]] = None) -> str:
    """``execute_run``, again from the checkpoint after a retryable failure, at most ``retries`` more times."""
    for attempt in range(retries + 1):
        try:
            return execute_run(task, env_update, on_child)
        except RetryableAttemptFailed:
            if attempt == retries:
                raise
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------------ launchers

Report = Callable[[RunTask, str, str], None]
"""Called once per run a launcher is done with: (task, 'done' | 'busy' | 'failed' | 'interrupted', error)."""


def _outcome(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, AttemptFailed):
        return ("interrupted" if exc.exit_code == EXIT_INTERRUPTED else "failed"), exc.error
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]  # submitit: a traceback; keep its end
    return "failed", f"{type(exc).__name__}: {(lines or [''])[-1][:300]}"


def _visible_gpus() -> list[str]:
    """The GPUs a child may be given (CUDA_VISIBLE_DEVICES entries, else 0..count-1); [] without CUDA."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return (listed or [str(i) for i in range(count)])[:count]


def launch_local(tasks: list[RunTask], jobs: int, retries: int, report: Report) -> None:
    """Run the tasks here, ``jobs`` at a time; with several GPUs each child sees one (CUDA_VISIBLE_DEVICES).
    Ctrl-C stops: running children checkpoint (they get the signal too), queued runs do not start."""
    import queue
    from concurrent.futures import ThreadPoolExecutor, as_completed

    gpus = _visible_gpus() if jobs > 1 else []
    slots: queue.Queue = queue.Queue()
    for slot in range(jobs):
        slots.put(slot)

    def work(task: RunTask) -> str:
        slot = slots.get()
        try:
            env = {"CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)]} if gpus else None
            return execute_with_retries(task, retries, env, on_child=children.append)
        finally:
            slots.put(slot)

    children: list[subprocess.Popen] = []
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = {pool.submit(work, task): task for task in tasks}
        for future in as_completed(futures):
            try:
                report(futures[future], future.result(), "")
            except Exception as exc:  # noqa: BLE001 - one run's failure is reported; the others go on
                report(futures[future], *_outcome(exc))
    except BaseException:  # Ctrl-C / SIGTERM of the sweep: running children checkpoint and stop
        for child in children:
            if child.poll() is None:
                child.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def launch_ray(tasks: list[RunTask], address: Optional[str], retries: int, cpus_per_run: int,
               report: Report) -> None:
    """Each run a Ray task on the cluster at ``address`` (None: a local one): one GPU per task, or
    ``cpus_per_run`` CPUs on a cluster without GPUs; a retryable failure (a crash, a lost worker) is retried
    from the run's checkpoint up to ``retries`` times by Ray. The sweep directory must be on storage every
    node sees, and sdsbridge installed on every node."""
    ray = import_extra("ray")
    ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        resources = {"num_gpus": 1} if gpus else {"num_cpus": cpus_per_run}
        remote = ray.remote(max_retries=retries, retry_exceptions=[RetryableAttemptFailed], **resources)(execute_run)
        pending = {remote.remote(task): task for task in tasks}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            task = pending.pop(ready[0])
            try:
                report(task, ray.get(ready[0]), "")
            except ray.exceptions.RayTaskError as exc:
                report(task, *_outcome(exc.cause if exc.cause is not None else exc))
            except ray.exceptions.RayError as exc:  # a worker or node lost more often than retries allow
                report(task, *_outcome(exc))
    finally:
        ray.shutdown()


@dataclass
class SlurmOptions:
    """Settings of the Slurm job array (``sweep --launcher slurm``)."""

    partition: Optional[str] = None
    time_min: int = 240
    """Time limit per job, minutes; a job that reaches it checkpoints and is requeued."""
    gpus_per_run: int = 1
    cpus_per_run: int = 8
    max_parallel: int = 0
    """Jobs of the array running at once (0: Slurm decides)."""
    local: bool = False
    """Run the jobs as local processes through submitit's LocalExecutor (no Slurm needed: a dry run)."""


def launch_slurm(tasks: list[RunTask], sweep_dir: Path, options: SlurmOptions, retries: int, report: Report) -> None:
    """Submit the runs as one job array through submitit and wait for it. A job that is preempted or reaches
    its time limit stops its run (which checkpoints) and is requeued by submitit; the requeued job resumes it.
    Ctrl-C stops the waiting only: the jobs go on, and re-running the sweep later collects them."""
    submitit = import_extra("submitit")
    from sdsbridge.slurm_job import SweepJob

    folder = Path(sweep_dir) / "slurm"
    if options.local:
        executor = submitit.LocalExecutor(folder=folder)
        gpus = tuple(int(g) for g in _visible_gpus())
        executor.update_parameters(timeout_min=options.time_min, gpus_per_node=options.gpus_per_run if gpus else 0,
                                   visible_gpus=gpus)
    else:  # cli.py checked that sbatch is there
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        executor.update_parameters(timeout_min=options.time_min, gpus_per_node=options.gpus_per_run,
                                   cpus_per_task=options.cpus_per_run, name="sdsbridge-sweep",
                                   **({"slurm_partition": options.partition} if options.partition else {}),
                                   **({"slurm_array_parallelism": options.max_parallel} if options.max_parallel else {}))
    jobs = executor.map_array(SweepJob(retries), tasks)
    by_job = dict(zip((job.job_id for job in jobs), tasks))
    for job in submitit.helpers.as_completed(jobs, poll_frequency=2):
        task = by_job[job.job_id]
        try:
            report(task, job.result(), "")
        except Exception as exc:  # noqa: BLE001 - submitit re-raises the job's exception (or a FailedJobError)
            report(task, *_outcome(exc))


def run_sweep(sweep, launcher: str, jobs: int = 1, retries: int = 1, address: Optional[str] = None,
              cpus_per_run: int = 1, slurm: Optional[SlurmOptions] = None, progress: bool = True) -> list[dict]:
    """Bring every run of ``sweep`` (sweep.Sweep) to done: skip done runs, resume partial ones, start missing
    ones, with ``launcher`` ('local' | 'ray' | 'slurm'). Prints a line per finished run and an overall bar;
    rewrites sweep.csv / sweep.json after each run and at the end, then the side-by-side report page of each
    prompt's finished runs (sweep.write_reports). Returns the rows (sweep.sweep_rows)."""
    from tqdm import tqdm

    from sdsbridge.sweep import run_status, write_reports, write_run_config, write_tables

    out = make_dirs(Path(sweep.out))
    statuses = {run.name: run_status(out, run.name) for run in sweep.runs}
    counts = {key: sum(v == key for v in statuses.values()) for key in ("done", "partial", "missing")}
    print(f"sweep {sweep.path}: {len(sweep.runs)} runs in {out}: {counts['done']} done (skipped), "
          f"{counts['partial']} to resume, {counts['missing']} to start; launcher {launcher}", flush=True)
    todo = [run for run in sweep.runs if statuses[run.name] != "done"]
    tasks = []
    for run in todo:
        write_run_config(sweep, run)
        reference = run.config.prior.kind == "reference"
        tasks.append(RunTask(str(out), run.name, run.config.device, sweep.eval_views if reference else None,
                             sweep.eval_mesh_resolution))
    write_tables(sweep)
    bar = tqdm(total=len(sweep.runs), initial=counts["done"], unit="run", disable=not progress, dynamic_ncols=True)

    def report(task: RunTask, outcome: str, error: str) -> None:
        if outcome == "done":
            bar.update(1)
        row = next(r for r in write_tables(sweep)[2] if r["name"] == task.name)
        scores = "".join(f", {k[5:]} {row[k]:.4g}" for k in ("eval_psnr_db", "eval_chamfer") if k in row)
        detail = (f"{row['steps']}/{row['of_steps']} steps, {row['wall_s']}s{scores}" if outcome == "done" else
                  "another process is running it (its lock is held)" if outcome == "busy" else error)
        bar.write(f"{outcome:>11}  {task.name}  {detail}")

    try:
        if not tasks:
            pass
        elif launcher == "local":
            launch_local(tasks, jobs, retries, report)
        elif launcher == "ray":
            launch_ray(tasks, address, retries, cpus_per_run, report)
        else:
            launch_slurm(tasks, out, slurm or SlurmOptions(), retries, report)
    finally:
        bar.close()
        csv_path, _, rows = write_tables(sweep)
    reports = write_reports(sweep)
    where = f"; side-by-side reports: {Path(sweep.out) / 'reports'}" if reports else ""
    print(f"sweep: {sum(r['status'] == 'done' for r in rows)} of {len(rows)} runs done; table: {csv_path}{where}",
          flush=True)
    return rows
