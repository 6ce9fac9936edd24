"""Faults of the machine, not of the user: full disks, read-only folders, refused permissions and killed
writes, injected at chosen writes (atomic.py is the one write path) without special privileges.

Each case checks the one-line message, the exit code (3: the machine could not write), that no partial
file sits under a final name, and, for training, that the previous checkpoint is intact and resumes.
"""

import errno
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import sdsbridge.common.atomic as atomic
from cli_helpers import (TINY, HandleWrapper, child_env, one_error_line, prompt_file, run_cli, temp_files,
                         train_tiny_run)
from sdsbridge.training.checkpoint import load_checkpoint
from sdsbridge.common.errors import EXIT_WRITE_FAILED


class Faults:
    """Makes chosen writes fail: ``fail(pattern, code, times)`` fails the next ``times`` writes whose file
    name matches ``pattern`` (ENOSPC after half the bytes, like a disk filling up; other codes at open)."""

    def __init__(self, monkeypatch):
        self.rules = []
        real_open, real_commit = atomic._open_for_writing, atomic._commit

        def opened(path, mode):
            code = self._take(path)
            if code is None:
                return real_open(path, mode)
            if code != errno.ENOSPC:
                raise OSError(code, os.strerror(code), str(path))
            return _FillingUp(real_open(path, mode))

        def commit(tmp, path):
            code = self._take(path, at_commit=True)
            if code is not None:
                raise OSError(code, os.strerror(code), str(tmp))
            real_commit(tmp, path)

        monkeypatch.setattr(atomic, "_open_for_writing", opened)
        monkeypatch.setattr(atomic, "_commit", commit)

    def fail(self, pattern, code=errno.ENOSPC, times=1, at_commit=False):
        self.rules.append({"pattern": re.compile(pattern), "code": code, "left": times, "at_commit": at_commit})

    def _take(self, path, at_commit=False):
        name = Path(path).name
        for rule in self.rules:
            # temporary names keep the final name's stem and suffix: '.last.<pid>-<hex>.tmp.ckpt' ~ 'last.ckpt'
            final = re.sub(r"^\.(.+)\.\d+-[0-9a-f]{8}\.tmp(\.[^.]*)?$", r"\1\2", name)
            if rule["left"] and rule["at_commit"] == at_commit and rule["pattern"].search(final):
                rule["left"] -= 1
                return rule["code"]
        return None


class _FillingUp(HandleWrapper):
    """A file handle that takes some bytes, then fails with ENOSPC (as a disk that fills up mid-write)."""

    room = 64

    def write(self, data):
        if len(data) > self.room:
            self.handle.write(bytes(data[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.handle.write(data)


@pytest.fixture
def faults(monkeypatch):
    return Faults(monkeypatch)


def test_full_disk_at_a_checkpoint_stops_with_code_3_and_resumes(tmp_path, capsys, faults):
    runs = tmp_path / "runs"
    faults.fail(r"^step-0000004\.ckpt$")  # the second checkpoint does not fit
    code, _, err = run_cli(["train", prompt_file(tmp_path), f"log.runs_dir={runs}", "train.steps=6",
                            "log.checkpoint_every=2", "log.max_checkpoint_failures=1", "export.mesh=false",
                            "export.video=false", *TINY], capsys)
    assert code == EXIT_WRITE_FAILED
    line = one_error_line(err)
    assert "no space left on device writing" in line and "step-0000004.ckpt" in line
    assert "the previous checkpoint (step 2) is intact" in line
    run = runs / "bridge-a-red-torus"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step-0000002.ckpt"]
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["step"] == 2
    assert not temp_files(run)

    code, out, err = run_cli(["train", "--resume", run, "--no-progress"], capsys)  # space freed
    assert code == 0, err
    assert "resuming from" in out and "done: 6 steps" in out
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["step"] == 6


def test_a_failed_checkpoint_is_retried_at_the_next_interval(tmp_path, capsys, faults, caplog):
    runs = tmp_path / "runs"
    faults.fail(r"^last\.ckpt$", times=2)  # two bad intervals in a row, then the disk has room again
    code, out, err = run_cli(["train", prompt_file(tmp_path), f"log.runs_dir={runs}", "train.steps=8",
                              "log.checkpoint_every=2", "log.max_checkpoint_failures=3", "export.mesh=false",
                              "export.video=false", *TINY], capsys)
    assert code == 0, err
    assert "done: 8 steps" in out
    assert sum("checkpoint not written" in r.getMessage() for r in caplog.records) == 2
    run = runs / "bridge-a-red-torus"
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["step"] == 8
    assert not temp_files(run)


def test_too_many_failed_checkpoints_in_a_row_stop_the_run(tmp_path, capsys, faults):
    runs = tmp_path / "runs"
    faults.fail(r"\.ckpt$", code=errno.EIO, times=100)
    code, _, err = run_cli(["train", prompt_file(tmp_path), f"log.runs_dir={runs}", "train.steps=20",
                            "log.checkpoint_every=2", "log.max_checkpoint_failures=2", *TINY], capsys)
    assert code == EXIT_WRITE_FAILED
    line = one_error_line(err)
    assert "input/output error writing" in line and "no checkpoint of this run was written" in line
    assert not runs.exists() or not any(runs.iterdir())  # nothing resumable: the run directory is gone


def test_validation_images_and_metrics_that_cannot_be_written_do_not_stop_training(tmp_path, capsys, faults):
    runs = tmp_path / "runs"
    faults.fail(r"^step-\d+\.png$", times=100)
    faults.fail(r"^metrics\.jsonl$", times=2)  # two appends fail; their rows go out with the next one
    code, out, err = run_cli(["train", prompt_file(tmp_path), f"log.runs_dir={runs}", "train.steps=4",
                              "log.val_every=1", "log.val_views=1", "log.val_resolution=8", "log.checkpoint_every=4", "export.mesh=false", "export.video=false",
                              *TINY[:7], *TINY[8:]], capsys)
    assert code == 0, err
    run = runs / "bridge-a-red-torus"
    assert not (run / "validation").exists() or not any((run / "validation").iterdir())
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_read_only_runs_folder_is_one_line_and_code_3(tmp_path, capsys, monkeypatch):
    real_mkdir = Path.mkdir
    runs = tmp_path / "readonly" / "runs"

    def mkdir(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "readonly")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    code, _, err = run_cli(["train", prompt_file(tmp_path), f"log.runs_dir={runs}", *TINY], capsys)
    assert code == EXIT_WRITE_FAILED
    assert one_error_line(err) == f"error: read-only file system creating {runs}"


def test_config_yaml_refused_leaves_no_run_directory(tmp_path, capsys, faults):
    runs = tmp_path / "runs"
    faults.fail(r"^config\.yaml$", code=errno.EACCES)
    code, _, err = run_cli(["train", prompt_file(tmp_path), f"log.runs_dir={runs}", *TINY], capsys)
    assert code == EXIT_WRITE_FAILED
    assert "permission denied writing" in one_error_line(err)
    assert not runs.exists()  # neither the run directory nor the runs folder this command made


def test_no_room_for_two_checkpoints_is_said_before_any_work(tmp_path, capsys, monkeypatch):
    import shutil

    from sdsbridge import priors

    runs = tmp_path / "runs"
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    monkeypatch.setattr(priors, "load_prior", lambda *a, **k: pytest.fail("the prior was loaded"))
    code, _, err = run_cli(["train", prompt_file(tmp_path), f"log.runs_dir={runs}", *TINY], capsys)
    assert code == EXIT_WRITE_FAILED
    line = one_error_line(err)
    assert "MiB free, but two checkpoints of this scene need about" in line
    assert not runs.exists()  # neither the run directory nor the runs folder this command made


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished 2-step run (checkpoints only) for the export / video faults."""
    return train_tiny_run(tmp_path_factory.mktemp("trained"), "train.steps=2")


def test_export_on_a_full_disk(trained_run, capsys, faults):
    faults.fail(r"^mesh-step0000002\.glb$")
    code, _, err = run_cli(["export", trained_run, "--resolution", "16", "--device", "cpu"], capsys)
    assert code == EXIT_WRITE_FAILED
    assert re.fullmatch(r"error: no space left on device writing .*mesh/mesh-step0000002\.glb", one_error_line(err))
    assert not list((trained_run / "mesh").glob("*.glb")) and not temp_files(trained_run)


def test_video_on_a_read_only_folder(trained_run, capsys, faults):
    faults.fail(r"^turntable-step0000002-2f\.mp4$", code=errno.EROFS, at_commit=True)  # ffmpeg wrote it; the rename fails
    code, _, err = run_cli(["video", trained_run, "--frames", "2", "--resolution", "16", "--device", "cpu",
                            "--no-progress"], capsys)
    assert code == EXIT_WRITE_FAILED
    assert re.fullmatch(r"error: read-only file system writing .*video/turntable-step0000002-2f\.mp4",
                        one_error_line(err))
    assert not list((trained_run / "video").glob("*.mp4")) and not temp_files(trained_run)


def test_image_on_a_full_disk(tmp_path, capsys, faults):
    faults.fail(r"^seed-0\.png$")
    out = tmp_path / "out"
    code, _, err = run_cli(["image", prompt_file(tmp_path), "prior.kind=reference", "prior.resolution=16",
                            "prior.views_per_label=8", "image.resolution=16", "image.steps=2", "image.video_every=0",
                            "--out", out, "--device", "cpu", "--no-progress"], capsys)
    assert code == EXIT_WRITE_FAILED
    assert re.fullmatch(r"error: no space left on device writing .*seed-0\.png", one_error_line(err))
    assert not (out / "seed-0.png").exists() and not temp_files(out)


KILLER = textwrap.dedent("""
    import os, signal, sys
    import sdsbridge.common.atomic as atomic
    from cli_helpers import HandleWrapper
    from sdsbridge.cli import main

    class Dying(HandleWrapper):
        def write(self, data):
            self.handle.write(bytes(data)[:100])
            self.handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # killed in the middle of writing the temporary file

    real = atomic._open_for_writing
    atomic._open_for_writing = lambda path, mode: (Dying if path.name.startswith(".{target}.") else
                                                   HandleWrapper)(real(path, mode))
    main(sys.argv[1:])
""")


@pytest.mark.parametrize("target", ["step-0000004", "last"])
def test_sigkill_while_writing_a_checkpoint_then_resume_cleans_up(tmp_path, capsys, target):
    runs = tmp_path / "runs"
    args = ["train", prompt_file(tmp_path), f"log.runs_dir={runs}", "train.steps=6", "log.checkpoint_every=2",
            "export.mesh=false", "export.video=false", *TINY]
    killed = subprocess.run([sys.executable, "-c", KILLER.replace("{target}", target), *map(str, args)],
                            env=child_env(), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run = runs / "bridge-a-red-torus"
    left = temp_files(run / "checkpoints")
    assert len(left) == 1  # the torn temporary file, never taken for a checkpoint
    code, out, err = run_cli(["train", "--resume", run, "--no-progress"], capsys)
    assert code == 0, err
    assert "resuming from" in out and "(step 2)" in out and "done: 6 steps" in out
    assert not temp_files(run)
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["step"] == 6


@pytest.mark.slow
def test_a_real_small_file_system_fills_up(tmp_path):
    """The CLI in a user+mount namespace with small tmpfs runs folders (no privileges needed where user
    namespaces are enabled): 3 MiB is refused before any work; 8 MiB fills up at a later checkpoint, which
    stops the run with code 3, and the run resumes once space is freed."""
    mount = tmp_path / "small"
    mount.mkdir()
    namespace = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c"]
    probe = subprocess.run([*namespace, f"mount -t tmpfs -o size=1m tmpfs {mount}"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a small file system without privileges here: {probe.stderr.strip()[:120]}")
    cli = f"{sys.executable} -m sdsbridge.cli"
    train = (f"{cli} train {prompt_file(tmp_path)} log.runs_dir={mount}/runs train.steps=40 log.checkpoint_every=2 "
             "log.keep_checkpoints=100 log.max_checkpoint_failures=1 export.mesh=false export.video=false "
             "scene.log2_hashmap_size=14 " + " ".join(TINY[1:]))
    run = f"{mount}/runs/bridge-a-red-torus"
    script = (f"mount -t tmpfs -o size=3m tmpfs {mount} && {train}; echo CODE=$?; umount {mount}; "
              f"mount -t tmpfs -o size=8m tmpfs {mount} && {train}; echo CODE=$?; rm {run}/checkpoints/step-*.ckpt; "
              f"{cli} train --resume {run} --no-progress log.keep_checkpoints=1; echo CODE=$?; "
              f"echo LEFT; ls -A {run}/checkpoints")
    done = subprocess.run([*namespace, script], env=child_env(), capture_output=True, text=True, timeout=600)
    said = done.stdout + done.stderr
    assert re.findall(r"CODE=(\d+)", done.stdout) == [str(EXIT_WRITE_FAILED)] * 2 + ["0"], said
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and "Traceback" not in done.stderr, said
    assert "MiB free, but two checkpoints of this scene need about" in errors[0]
    assert "no space left on device writing" in errors[1] and "is intact" in errors[1]
    assert "done: 40 steps" in done.stdout
    assert done.stdout.split("LEFT")[-1].split() == ["last.ckpt", "step-0000040.ckpt"]
