"""Checkpoints: atomic save, safe load (``weights_only=True``) with a checksum and a structure check, RNG
state capture, rotation, and the lookup of the newest checkpoint that verifies.

A checkpoint is a plain dict of tensors and builtins:
``{"format": FORMAT, "step": int, "field", "background", "renderer" (scene.py), "method"
(``Method.state_dict``, empty for SDS, the bridge and NFSD; absent in older files), "optimizer": state
dicts, "rng": {...}, "config": dict, "bad_steps": int, "checksum": str}``. ``checksum`` (absent in files
written before it existed) is the SHA-256 of everything else (``payload_checksum``): torch's zip reader
does not verify what it reads, so a damaged tensor would otherwise load silently. What a loaded file may hold
is checked in checkpoint_contents.py.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch

from sdsbridge.common.atomic import atomic_file, write_failed
from sdsbridge.common.errors import UserError, WriteFailed
from sdsbridge.common.quiet import quiet_backend
from sdsbridge.config.loader import config_from_dict
from sdsbridge.config.schema import Config
from sdsbridge.scene.base import Scene
from sdsbridge.training.checkpoint_contents import (CHECKSUM, FORMAT, check_payload, check_structure,
                                                   payload_checksum, unpickling_refused)
from sdsbridge.training.step import build_scene

LAST = "last.ckpt"
_NUMBERED = re.compile(r"^step-(\d+)\.ckpt$")

log = logging.getLogger("sdsbridge")


def capture_rng_state() -> dict[str, Any]:
    """Every RNG the training loop draws from, as tensors/builtins that load with weights_only=True."""
    kind, keys, pos, has_gauss, cached_gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gauss": float(cached_gauss)},
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of capture_rng_state."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        restore_cuda_rng_states(list(state["cuda"]))


def restore_cuda_rng_states(states: list[torch.Tensor]) -> None:
    """Restore per-GPU RNG states saved on a machine with possibly more or fewer GPUs: devices present in
    both get their state back; extra saved states are dropped with a warning (a run resumed on fewer GPUs
    draws the same numbers on the devices it still has)."""
    count = torch.cuda.device_count()
    if len(states) > count:
        logging.getLogger("sdsbridge").warning(
            "checkpoint holds CUDA RNG states of %d GPUs, this machine has %d: restoring the first %d",
            len(states), count, count)
    for index, rng in enumerate(states[:count]):
        torch.cuda.set_rng_state(rng, index)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to ``path`` atomically: a crash or Ctrl-C at any point leaves either the old file or the
    new one, never a torn file."""
    with atomic_file(path) as handle:
        torch.save(obj, handle)


class LastNotWritten(WriteFailed):
    """``last.ckpt`` could not be written, but the numbered checkpoint ``written`` (of ``step``) before it was: that
    one is intact and the newest (a run directory's resume takes it over the older last.ckpt)."""

    def __init__(self, message: str, written: Path, step: int):
        super().__init__(message)
        self.written, self.step = written, step


def save_checkpoint(checkpoint: dict[str, Any], directory: Path, keep: int) -> Path:
    """Write ``step-XXXXXXX.ckpt`` and ``last.ckpt`` atomically in ``directory``; keep the newest
    ``keep`` numbered files (rotation happens only once both were written). Returns the numbered path.
    WriteFailed if the OS refuses a write (LastNotWritten when only last.ckpt's was); the files written before
    are untouched then."""
    numbered = directory / f"step-{checkpoint['step']:07d}.ckpt"
    atomic_torch_save({**checkpoint, CHECKSUM: payload_checksum(checkpoint)}, numbered)
    try:
        with atomic_file(directory / LAST) as handle, open(numbered, "rb") as source:
            shutil.copyfileobj(source, handle)
    except WriteFailed as exc:
        raise LastNotWritten(str(exc), numbered, checkpoint["step"]) from None
    numbered_files = sorted(p for p in directory.iterdir() if _NUMBERED.match(p.name))
    for old in numbered_files[: max(0, len(numbered_files) - keep)]:
        if old != numbered:
            old.unlink()
    if keep == 0:
        numbered.unlink()
        return directory / LAST
    return numbered


def estimate_checkpoint_bytes(parameters: Iterable[torch.Tensor]) -> int:
    """Bytes of one checkpoint of these trainable tensors: weights plus AdamW's two moments, and 1 MiB for
    config, RNG states and buffers."""
    return 3 * sum(p.numel() * p.element_size() for p in parameters) + 2**20


def check_room(directory: Path, checkpoint_bytes: int) -> None:
    """WriteFailed, before any work, if ``directory`` (which exists) is not writable or has no room for two
    checkpoints of ``checkpoint_bytes`` (the one being written and the previous one, kept intact)."""
    directory = Path(directory)
    try:
        free = shutil.disk_usage(directory).free
    except OSError as exc:
        raise write_failed(exc, directory, "checking free space in") from None
    if not os.access(directory, os.W_OK):
        raise WriteFailed(f"{directory}: not writable (permission denied or read-only); set log.runs_dir to a "
                          "writable folder")
    if free < 2 * checkpoint_bytes:
        raise WriteFailed(f"{directory}: {free / 2**20:.1f} MiB free, but two checkpoints of this scene need about "
                          f"{2 * checkpoint_bytes / 2**20:.1f} MiB; free some space or set log.runs_dir elsewhere")


class CheckpointSaver:
    """Saves checkpoints into a run's ``checkpoints/`` and rides out write failures: a failed interval save
    is logged and training goes on (the next interval tries again) until ``max_failures`` in a row; a
    save that must not be skipped (``final``: the end, a stop, a divergence) fails at once. The error
    then says which checkpoint is intact, so the run resumes from there."""

    def __init__(self, directory: Path, keep: int, max_failures: int, last_step: Optional[int] = None):
        self.directory, self.keep, self.max_failures = Path(directory), keep, max_failures
        self.last_step = last_step
        """Step of the newest checkpoint on disk (None before the first)."""
        self.failures = 0

    def save(self, checkpoint: dict[str, Any], final: bool = False) -> Optional[Path]:
        """``save_checkpoint``; None when the write failed and training may go on, WriteFailed otherwise."""
        try:
            path = save_checkpoint(checkpoint, self.directory, self.keep)
        except WriteFailed as exc:
            self.failures += 1
            if isinstance(exc, LastNotWritten):  # this step's numbered file was written: the newest intact one
                self.last_step = exc.step
                intact = f"{exc.written} (step {exc.step}) was written and is intact"
            elif self.last_step is not None:
                intact = f"the previous checkpoint (step {self.last_step}) is intact"
            else:
                intact = "no checkpoint of this run was written"
            if final or self.failures >= self.max_failures:
                raise WriteFailed(f"{exc}; {intact}") from None
            log.warning("step %d: checkpoint not written (%s; %s); training goes on and tries again at the next "
                        "interval (%d of %d failures in a row allowed)", checkpoint["step"], exc, intact,
                        self.failures, self.max_failures)
            return None
        self.failures, self.last_step = 0, checkpoint["step"]
        return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", for_resume: bool = False) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no code execution), verify its checksum and its
    structure (``check_structure``). UserError if the file is missing, corrupt, damaged, incomplete or
    not an sdsbridge checkpoint."""
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(unpickling_refused(path, str(exc))) from None
    except Exception as exc:  # noqa: BLE001 - any failure to parse an untrusted file is the file's fault
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise UserError(f"{path}: not a readable sdsbridge checkpoint (corrupt or foreign file: {reason})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise UserError(f"{path}: not an sdsbridge checkpoint (expected format {FORMAT})")
    try:
        check_payload(checkpoint)
    except UserError as exc:
        raise UserError(f"{path}: damaged checkpoint: {exc}") from None
    stored = checkpoint.get(CHECKSUM)
    if stored is None:
        log.warning("%s: no checksum (written before checkpoints had one, or edited): its contents are not verified",
                    path)
    elif stored != payload_checksum(checkpoint):
        raise UserError(f"{path}: damaged checkpoint: its contents do not match their checksum")
    check_structure(checkpoint, path, for_resume)
    return checkpoint


def _run_checkpoints(run: Path) -> tuple[list[Path], list[tuple[int, Path]]]:
    """A run directory's ``last.ckpt`` files and its numbered checkpoints as (step, path), newest first.
    Temporary files of interrupted writes never match."""
    folder = run / "checkpoints"
    lasts = [p for p in (folder / LAST, run / LAST) if p.is_file()]
    numbered = [(int(m.group(1)), p) for p in (folder.iterdir() if folder.is_dir() else [])
                if (m := _NUMBERED.match(p.name))]
    return lasts, sorted(numbered, reverse=True)


def find_checkpoint(path: Path) -> Path:
    """A run directory or a checkpoint file -> the checkpoint to try first (``last.ckpt``, else the newest
    numbered one). UserError if there is none."""
    path = Path(path)
    if not path.is_dir():
        if not path.exists():
            raise UserError(f"{path}: no such run directory or checkpoint")
        return path
    lasts, numbered = _run_checkpoints(path)
    if not lasts and not numbered:
        raise UserError(f"{path}: no checkpoints/{LAST} or checkpoints/step-*.ckpt in this run directory")
    return (lasts + [p for _, p in numbered])[0]


def _newest_in_run(run: Path, map_location, for_resume: bool) -> tuple[Optional[Path], Optional[dict], list[str]]:
    """(path, checkpoint, problems met) of the newest checkpoint of ``run`` that loads and verifies: the
    one with the highest step among ``last.ckpt`` and the numbered files (a numbered file is newer than
    last.ckpt when last.ckpt's own write failed). (None, None, problems) if none does."""
    lasts, numbered = _run_checkpoints(run)
    problems, fallback = [], (None, None)
    order = [p for _, p in numbered]
    for last in lasts:
        try:
            checkpoint = load_checkpoint(last, map_location, for_resume)
        except UserError as exc:
            problems.append(str(exc))
            continue
        fallback = (last, checkpoint)
        order = [p for step, p in numbered if step > checkpoint["step"]]
        break
    for candidate in order:
        try:
            return candidate, load_checkpoint(candidate, map_location, for_resume), problems
        except UserError as exc:
            problems.append(str(exc))
    return *fallback, problems


def load_newest(path: Path, map_location: str | torch.device = "cpu",
                for_resume: bool = False) -> tuple[Path, dict[str, Any]]:
    """(file, checkpoint) of the newest checkpoint of a run directory that loads and verifies (saying which
    when another was skipped), or of the checkpoint file given. UserError naming each file and why when
    none does; for a file given by name that fails, the error names the newest one of its run that
    verifies, to use instead."""
    path = Path(path)
    if path.is_dir():
        find_checkpoint(path)  # the error for a run without any checkpoint
        found, checkpoint, problems = _newest_in_run(path, map_location, for_resume)
        if found is None:
            raise UserError(f"{path}: no checkpoint that loads and verifies ({'; '.join(problems)})")
        if problems:
            log.warning("using %s (step %d): %s", found, checkpoint["step"], "; ".join(problems))
        return found, checkpoint
    try:
        return path, load_checkpoint(path, map_location, for_resume)
    except UserError as exc:
        found, _, _ = _newest_in_run(run_dir_of(path), map_location, for_resume)
        if found is None or found.resolve() == path.resolve():
            raise
        raise UserError(f"{exc}; {found} verifies: use that one") from None


def run_dir_of(checkpoint_path: Path) -> Path:
    """The run directory a checkpoint belongs to (``<run>/checkpoints/x.ckpt`` -> ``<run>``)."""
    parent = checkpoint_path.resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def load_trained_scene(run_or_checkpoint: Path, device: torch.device) -> tuple[Scene, Config, int]:
    """The scene of a run directory's last checkpoint (or of a checkpoint file) on ``device``, for export
    and evaluation: (scene in eval mode, the run's config, its step)."""
    _, checkpoint = load_newest(Path(run_or_checkpoint), map_location=device)
    config = config_from_dict(checkpoint["config"])
    with quiet_backend():
        scene = build_scene(config, device)
    scene.load_state_dict(checkpoint)
    return scene.eval(), config, int(checkpoint["step"])
