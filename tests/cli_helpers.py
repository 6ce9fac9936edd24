"""Helpers shared by the fault and attack tests: the CLI run in-process, a tiny 3D config, and file
handles that misbehave on purpose."""

import os
import shutil
from pathlib import Path

import pytest

from sdsbridge.common.atomic import TEMP_NAME
from sdsbridge.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY = ["scene.n_levels=4", "scene.log2_hashmap_size=12", "scene.base_resolution=8", "scene.mlp_width=16",
        "scene.background_width=8", "render.resolution=16", "render.num_samples=16", "log.val_every=0",
        "log.log_every=1", "prior.kind=reference", "prior.resolution=16", "prior.views_per_label=8",
        "export.resolution=16", "export.video_frames=3", "export.video_resolution=16", "--device", "cpu",
        "--no-progress"]
"""`train` arguments for a reference-prior run of a few milliseconds per step."""


def run_cli(args, capsys):
    """(exit code, stdout, stderr) of ``sdsbridge ARGS`` run in this process."""
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def one_error_line(err):
    """The one 'error: ...' or 'interrupted ...' line of ``err``; fails if there are more, or a traceback."""
    lines = [line for line in err.splitlines() if line.startswith(("error: ", "interrupted"))]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def prompt_file(folder, text="prompt: a red torus\n"):
    path = Path(folder) / "prompt.yaml"
    path.write_text(text)
    return path


def temp_files(folder):
    """Temporary files (atomic.py's names) anywhere under ``folder``."""
    return [p for p in Path(folder).rglob("*") if TEMP_NAME.match(p.name)]


def child_env():
    """The environment for a child `python` that imports this checkout's sdsbridge and these helpers."""
    path = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


class HandleWrapper:
    """A binary file handle passed through, for subclasses that override ``write``."""

    def __init__(self, handle):
        self.handle = handle

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def resave(path, edit, checksum=True):
    """Rewrite a checkpoint after ``edit(dict)``: with a valid checksum (``checksum=True``: only the structure
    is wrong), none (``None``) or the given string."""
    import torch

    from sdsbridge.training import checkpoint as ckpt

    checkpoint = torch.load(path, weights_only=True)
    edit(checkpoint)
    checkpoint.pop(ckpt.CHECKSUM, None)
    if checksum is not None:
        checkpoint[ckpt.CHECKSUM] = ckpt.payload_checksum(checkpoint) if checksum is True else checksum
    torch.save(checkpoint, path)


def train_tiny_run(folder, *overrides):
    """Train a TINY run (no mesh, no video) under ``folder/runs`` through the CLI; its run directory."""
    runs = Path(folder) / "runs"
    with pytest.raises(SystemExit) as info:
        main(["train", str(prompt_file(folder)), f"log.runs_dir={runs}", "export.mesh=false", "export.video=false",
              *overrides, *TINY])
    assert info.value.code == 0
    return runs / "bridge-a-red-torus"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 4-step TINY run with checkpoints at steps 2 and 4 (and last.ckpt), no mesh or video, trained
    once per test module."""
    return train_tiny_run(tmp_path_factory.mktemp("finished"), "train.steps=4", "log.checkpoint_every=2")


@pytest.fixture
def trained_run(finished_run, tmp_path):
    """A copy of ``finished_run`` of this test's own, to damage or write into."""
    return Path(shutil.copytree(finished_run, tmp_path / "runs" / "bridge-a-red-torus"))
