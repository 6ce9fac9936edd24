"""Sweeps that are killed and re-run, on each launcher: every run ends complete exactly once.

Evidence of "exactly once": each run's attempts (state/<name>.jsonl: fresh | resume, exit code), the run
directories (no second directory for a run), metrics.jsonl (each step logged once), a third invocation
that starts nothing, and the trained numbers: on this sweep the bridge equals SDS step for step (its stage
two starts at step 1200 of the demo config, after these 40 steps), so a killed-and-resumed bridge run must
log the very losses of the uninterrupted SDS run of the same prompt (resume is bit-identical on the CPU).
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import child_env

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"train.steps": 40, "log.checkpoint_every": 10, "log.val_every": 0, "log.log_every": 1,
            "prior.views_per_label": 8, "prior.nearest_views": 4, "export.mesh": False, "export.video": False,
            "device": "cpu"}
TORUS_BRIDGE, TORUS_SDS = "a-red-torus__method=bridge", "a-red-torus__method=sds"
BOX_BRIDGE, BOX_SDS = "a-blue-box__method=bridge", "a-blue-box__method=sds"


def write_sweep(folder, prompts):
    path = Path(folder) / "sweep.yaml"
    path.write_text(json.dumps({"base": str(ROOT / "configs" / "demo.yaml"), "prompts": prompts,
                                "grid": {"method": ["bridge", "sds"]}, "set": SETTINGS,
                                "eval": {"views": 1, "mesh_resolution": 16}}))
    return path


def start_sweep(path, out, *args):
    env = {**child_env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "sdsbridge", "sweep", str(path), "--out", str(out),
                             "--no-progress", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def attempts(out, name):
    path = out / "state" / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def wait_for(condition, what, timeout=180.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def has_checkpoint(out, name, step=10):
    return (out / "runs" / name / "checkpoints" / f"step-{step:07d}.ckpt").is_file()


def started_child(out, name):
    """pid of the training child of the run's newest attempt."""
    starts = [a for a in attempts(out, name) if a["event"] == "start"]
    return starts[-1]["pid"] if starts else None


def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] == "Z"  # a zombie has exited
    except FileNotFoundError:
        return True


def metrics(out, name):
    return [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]


def check_complete_exactly_once(out, names):
    rows = {row["name"]: row for row in csv.DictReader((out / "sweep.csv").open())}
    assert sorted(rows) == sorted(names)
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(names)  # one directory per run
    for name in names:
        row = rows[name]
        assert (row["status"], row["steps"], row["of_steps"]) == ("done", "40", "40"), row
        assert float(row["eval_psnr_db"]) > 5 and float(row["eval_chamfer"]) >= 0
        steps = [m["step"] for m in metrics(out, name)]
        assert steps == list(range(1, 41)), name  # every step logged once, none after the end
        assert int(row["attempts"]) == sum(a["event"] == "start" for a in attempts(out, name))
        assert attempts(out, name)[-1] == {**attempts(out, name)[-1], "event": "end", "exit_code": 0}
    return rows


def losses(out, name):
    return [(m["step"], m["loss"], m["grad_norm"]) for m in metrics(out, name)]


def rerun_starts_nothing(path, out):
    before = {p.name: p.read_text() for p in (out / "state").glob("*.jsonl")}
    again = start_sweep(path, out)
    text, _ = again.communicate(timeout=120)
    assert again.returncode == 0 and "done (skipped), 0 to resume, 0 to start" in text, text
    assert {p.name: p.read_text() for p in (out / "state").glob("*.jsonl")} == before


def signal_at_first_checkpoint(sweep, out, pid, signum):
    """Once the torus bridge run has checkpointed, send ``signum`` to the process ``pid()`` names, then let the
    sweep finish (killed if the test fails first); it must exit 0."""
    try:
        wait_for(lambda: has_checkpoint(out, TORUS_BRIDGE), "the first checkpoint", timeout=300)
        os.kill(pid(), signum)
        text, _ = sweep.communicate(timeout=600)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 0, text


@pytest.mark.slow
def test_local_sweep_killed_twice_and_rerun_completes_every_run_exactly_once(tmp_path):
    path, out = write_sweep(tmp_path, ["a red torus", "a blue box"]), tmp_path / "sweep"
    sweep = start_sweep(path, out, "--retries", "0")
    try:
        # 1. SIGKILL the second run's training process after its first checkpoint: that run fails, the sweep goes on
        wait_for(lambda: has_checkpoint(out, TORUS_SDS), "the second run's first checkpoint")
        os.kill(started_child(out, TORUS_SDS), signal.SIGKILL)
        # 2. SIGKILL the sweep itself during the third run: its child is told (SIGTERM), checkpoints and stops
        wait_for(lambda: has_checkpoint(out, BOX_BRIDGE), "the third run's first checkpoint")
        child = started_child(out, BOX_BRIDGE)
        sweep.kill()
        sweep.wait(timeout=30)
        wait_for(lambda: gone(child), "the orphaned run to checkpoint and exit", timeout=60)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert [a.get("exit_code") for a in attempts(out, TORUS_SDS) if a["event"] == "end"] == [-signal.SIGKILL]
    assert not (out / "state" / f"{BOX_SDS}.jsonl").exists()  # the fourth run never started
    assert "interrupted" in (out / "logs" / f"{BOX_BRIDGE}.log").read_text()  # stopped by SIGTERM, checkpointed

    again = start_sweep(path, out)
    text, _ = again.communicate(timeout=600)
    assert again.returncode == 0, text
    assert "1 done (skipped), 2 to resume, 1 to start" in text, text

    rows = check_complete_exactly_once(out, [TORUS_BRIDGE, TORUS_SDS, BOX_BRIDGE, BOX_SDS])
    modes = {name: [a["mode"] for a in attempts(out, name) if a["event"] == "start"] for name in rows}
    assert modes == {TORUS_BRIDGE: ["fresh"], TORUS_SDS: ["fresh", "resume"], BOX_BRIDGE: ["fresh", "resume"],
                     BOX_SDS: ["fresh"]}
    assert rows[TORUS_SDS]["attempts"] == "2" and rows[BOX_SDS]["attempts"] == "1"
    # resumed exactly: the killed runs log what the uninterrupted runs of the same prompt logged
    assert losses(out, TORUS_SDS) == losses(out, TORUS_BRIDGE)
    assert losses(out, BOX_BRIDGE) == losses(out, BOX_SDS)
    rerun_starts_nothing(path, out)


@pytest.mark.slow
def test_ray_sweep_retries_a_killed_run_from_its_checkpoint(tmp_path):
    pytest.importorskip("ray")
    path, out = write_sweep(tmp_path, ["a red torus"]), tmp_path / "sweep"
    sweep = start_sweep(path, out, "--launcher", "ray", "--retries", "2")
    # the Ray task fails; Ray runs it again
    signal_at_first_checkpoint(sweep, out, lambda: started_child(out, TORUS_BRIDGE), signal.SIGKILL)
    check_complete_exactly_once(out, [TORUS_BRIDGE, TORUS_SDS])
    assert [(a["mode"], a.get("exit_code")) for a in attempts(out, TORUS_BRIDGE) if a["event"] == "start"] == \
        [("fresh", None), ("resume", None)]
    assert [a["exit_code"] for a in attempts(out, TORUS_BRIDGE) if a["event"] == "end"] == [-signal.SIGKILL, 0]
    assert losses(out, TORUS_BRIDGE) == losses(out, TORUS_SDS)
    rerun_starts_nothing(path, out)


@pytest.mark.slow
def test_slurm_path_requeues_a_timed_out_job_which_resumes_its_run(tmp_path):
    pytest.importorskip("submitit")
    path, out = write_sweep(tmp_path, ["a red torus"]), tmp_path / "sweep"
    sweep = start_sweep(path, out, "--launcher", "slurm", "--slurm-local", "--time-min", "10")
    job = lambda: [a for a in attempts(out, TORUS_BRIDGE) if a["event"] == "start"][-1]["worker_pid"]  # noqa: E731
    signal_at_first_checkpoint(sweep, out, job, signal.SIGUSR2)  # what Slurm sends before a time limit or on preemption
    check_complete_exactly_once(out, [TORUS_BRIDGE, TORUS_SDS])
    runs = attempts(out, TORUS_BRIDGE)
    assert [(a["event"], a.get("mode"), a.get("exit_code")) for a in runs] == [
        ("start", "fresh", None), ("end", None, 130), ("start", "resume", None), ("end", None, 0)]
    assert runs[0]["worker_pid"] != runs[2]["worker_pid"]  # a new job process: submitit requeued it
    assert losses(out, TORUS_BRIDGE) == losses(out, TORUS_SDS)
    rerun_starts_nothing(path, out)


@pytest.mark.slow
def test_local_jobs_run_side_by_side(tmp_path):
    path, out = write_sweep(tmp_path, ["a red torus"]), tmp_path / "sweep"
    sweep = start_sweep(path, out, "--jobs", "2")
    text, _ = sweep.communicate(timeout=600)
    assert sweep.returncode == 0, text
    check_complete_exactly_once(out, [TORUS_BRIDGE, TORUS_SDS])
    (start_a, end_a), (start_b, end_b) = (
        (a[0]["time"], a[0]["time"] + a[1]["seconds"]) for a in (attempts(out, TORUS_BRIDGE), attempts(out, TORUS_SDS)))
    assert start_a < end_b and start_b < end_a  # the two attempts overlapped
    assert losses(out, TORUS_BRIDGE) == losses(out, TORUS_SDS)
