"""The submitit job of a Slurm sweep (imported only by ``launch_slurm`` and by submitit in the job): one run
per job, checkpointable, so a preempted or timed-out job stops its run cleanly and is requeued.

Requeue, step by step: Slurm (or submitit's LocalExecutor, in a dry run) sends SIGUSR2 to the job before its
time limit, or on preemption; the training child ignores it (sweep_worker.py) and submitit calls ``checkpoint``
in the job process, which sends SIGTERM to the child (the trainer finishes its step, checkpoints and exits
130), waits for it, and returns the same job for submitit to requeue. The requeued job finds the run partial
and resumes it from that checkpoint.
"""

from __future__ import annotations

import subprocess
from typing import Optional

import submitit

from sdsbridge.sweep.worker import RunTask, execute_with_retries

STOP_GRACE_S = 60
"""Seconds the child may take to checkpoint after SIGTERM before it is killed (Slurm's warning is 90 s;
a killed child resumes from its previous checkpoint)."""


class SweepJob(submitit.helpers.Checkpointable):
    """``SweepJob(retries)(task)``: ``execute_with_retries`` of one run in a submitit job."""

    def __init__(self, retries: int = 0):
        self.retries = retries
        self._child: Optional[subprocess.Popen] = None

    def __call__(self, task: RunTask) -> str:
        return execute_with_retries(task, self.retries, on_child=self._remember)

    def _remember(self, child: subprocess.Popen) -> None:
        self._child = child

    def checkpoint(self, task: RunTask) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on SIGUSR2 (time limit near, or preemption): stop the run, requeue this job."""
        child = self._child
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                child.kill()
        return submitit.helpers.DelayedSubmission(SweepJob(self.retries), task)

    def __getstate__(self) -> dict:
        return {"retries": self.retries, "_child": None}  # a process handle does not travel
