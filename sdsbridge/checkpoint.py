"""Checkpoints: atomic save, safe load (``weights_only=True``), RNG state capture, rotation, resume lookup.

A checkpoint is a plain dict of tensors and builtins:
``{"format": FORMAT, "step": int, "field", "background", "renderer" (scene.py), "method"
(``Method.state_dict``, empty for SDS, the bridge and NFSD; absent in older files), "optimizer": state
dicts, "rng": {...}, "config": dict, "bad_steps": int}``.
"""

from __future__ import annotations

import logging
import pickle
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdsbridge.atomic import atomic_file
from sdsbridge.errors import UserError

FORMAT = "sdsbridge-checkpoint-v1"
LAST = "last.ckpt"
_NUMBERED = re.compile(r"^step-(\d+)\.ckpt$")


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


def save_checkpoint(checkpoint: dict[str, Any], directory: Path, keep: int) -> Path:
    """Write ``step-XXXXXXX.ckpt`` and ``last.ckpt`` atomically in ``directory``; keep the newest
    ``keep`` numbered files. Returns the numbered path."""
    numbered = directory / f"step-{checkpoint['step']:07d}.ckpt"
    atomic_torch_save(checkpoint, numbered)
    with atomic_file(directory / LAST) as handle, open(numbered, "rb") as source:
        shutil.copyfileobj(source, handle)
    numbered_files = sorted(p for p in directory.iterdir() if _NUMBERED.match(p.name))
    for old in numbered_files[: max(0, len(numbered_files) - keep)]:
        if old != numbered:
            old.unlink()
    if keep == 0:
        numbered.unlink()
        return directory / LAST
    return numbered


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no code execution). UserError if the file is
    missing, corrupt, or not an sdsbridge checkpoint."""
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        reason = " ".join(str(exc).split())[:160]
        raise UserError(f"{path}: not a readable sdsbridge checkpoint (corrupt or foreign file: {reason})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise UserError(f"{path}: not an sdsbridge checkpoint (expected format {FORMAT})")
    return checkpoint


def find_checkpoint(path: Path) -> Path:
    """A run directory or a checkpoint file -> the checkpoint file to resume from."""
    if path.is_dir():
        for candidate in (path / "checkpoints" / LAST, path / LAST):
            if candidate.is_file():
                return candidate
        raise UserError(f"{path}: no checkpoints/{LAST} in this run directory")
    if not path.exists():
        raise UserError(f"{path}: no such run directory or checkpoint")
    return path


def run_dir_of(checkpoint_path: Path) -> Path:
    """The run directory a checkpoint belongs to (``<run>/checkpoints/x.ckpt`` -> ``<run>``)."""
    parent = checkpoint_path.resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent
