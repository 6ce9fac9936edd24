"""Where a sweep's runs execute: here (``local``, one after another or ``--jobs N`` at a time), as Ray tasks
(``ray``) or as Slurm jobs through submitit (``slurm``; slurm_job.py). Ray and submitit are optional extras,
imported only when their launcher is asked for.

Every launcher calls the same worker (sweep_worker.py: ``execute_run`` takes a run one attempt further in a
child process; ``execute_with_retries`` again from its checkpoint after a retryable failure).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from sdsbridge.common.atomic import make_dirs
from sdsbridge.common.errors import EXIT_INTERRUPTED, UserError
from sdsbridge.sweep.worker import AttemptFailed, RetryableAttemptFailed, RunTask, execute_run, execute_with_retries

EXTRAS = {"ray": "ray", "submitit": "slurm"}
"""Optional module -> the sdsbridge extra that installs it."""


def import_extra(module: str):
    """Import an optional dependency; UserError naming the extra to install when it is missing."""
    try:
        return __import__(module)
    except ImportError:
        extra = EXTRAS[module]
        raise UserError(f"--launcher {extra}: needs the '{module}' package; "
                        f"install it with: pip install 'sdsbridge[{extra}]'") from None



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
    from sdsbridge.sweep.slurm_job import SweepJob

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

    from sdsbridge.sweep.sweep_file import run_status, write_reports, write_run_config, write_tables

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
