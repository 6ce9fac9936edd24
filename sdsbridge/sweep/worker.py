"""The sweep's worker: one run taken one attempt further, in a child process, with retries. Every launcher
(launchers.py: local, Ray, Slurm through slurm_job.py) calls ``execute_run`` / ``execute_with_retries``.

An attempt runs ``python -m sdsbridge train configs/<name>.yaml --run-dir runs/<name>`` for a missing run,
``train --resume runs/<name>`` for a partial one (the exact resume from its newest verifying checkpoint), then
``eval --json`` for a reference-prior run, and writes ``state/<name>.done.json`` last. Each attempt is a child
process, not a function call, because a run that dies (SIGKILL, out of memory, a CUDA error) must not take the
sweep, the Ray worker or the submitit job with it, and because every run then starts from a clean interpreter
(seeds, signal handlers, CUDA context) exactly as a hand-typed ``sdsbridge train`` does. The child gets SIGTERM
when its worker dies (Linux), so it checkpoints and exits instead of running on unseen; the worker holds
``state/<name>.lock`` (flock, shared with the child) for as long as either lives, so two sweeps never run the
same run at once.
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

from sdsbridge.common.atomic import append_bytes, atomic_write_bytes, make_dirs
from sdsbridge.common.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED
from sdsbridge.sweep.sweep_file import run_dir, run_status, state_path

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
