"""Fingerprint what a training run computes, to prove a refactoring changed nothing.

    python scripts/run_fingerprint.py [--config configs/demo.yaml] [--methods bridge,sds,nfsd]
                                      [--steps 300] [--out /tmp/fp] [key=value ...]

For each method, runs ``sdsbridge train`` in a subprocess on one CPU thread (so reductions run in one
fixed order), with the given overrides plus ``train.steps``, ``log.log_every=1`` and no export, then
prints one JSON object per method: SHA-256 digests of the per-step metrics (step, loss, stage, t,
grad norm, resolution, every loss term, as exact float reprs) and of the final checkpoint's tensors
(field, background and optimizer state: values and shapes), plus the last step's loss for a human.
Run it on two commits and compare: equal digests mean bit-identical training.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

METRIC_KEYS_SKIPPED = ("elapsed_s",)
"""Wall-clock fields differ from run to run by nature."""


def _hash_tensors(tree: Any, digest: "hashlib._Hash", prefix: str = "") -> None:
    """Feed every tensor (and number) under ``tree`` into ``digest`` in a fixed order (sorted keys)."""
    if isinstance(tree, dict):
        for key in sorted(tree, key=str):
            _hash_tensors(tree[key], digest, f"{prefix}/{key}")
    elif isinstance(tree, (list, tuple)):
        for i, item in enumerate(tree):
            _hash_tensors(item, digest, f"{prefix}/{i}")
    elif isinstance(tree, torch.Tensor):
        t = tree.detach().cpu().contiguous()
        digest.update(f"{prefix}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        digest.update(f"{prefix}={tree!r}".encode())


def fingerprint(run_dir: Path) -> dict:
    """Digests of ``run_dir``'s metrics.jsonl and checkpoints/last.ckpt (see the module docstring)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    metrics = hashlib.sha256()
    for row in rows:
        kept = {k: v for k, v in sorted(row.items()) if k not in METRIC_KEYS_SKIPPED}
        metrics.update(repr(kept).encode())
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = hashlib.sha256()
    optimizer = checkpoint["optimizer"]
    _hash_tensors({"field": checkpoint["field"], "background": checkpoint["background"],
                   "optimizer_state": optimizer["state"],
                   "optimizer_lrs": [g["lr"] for g in optimizer["param_groups"]]}, state)
    return {"steps": len(rows), "last_loss": rows[-1]["loss"] if rows else None,
            "metrics_sha256": metrics.hexdigest(), "state_sha256": state.hexdigest()}


def train_and_fingerprint(config: Path, method: str, steps: int, out: Path, overrides: list[str]) -> dict:
    """Train ``method`` for ``steps`` steps in a fresh run directory under ``out`` and fingerprint it."""
    name = f"fp-{method}"
    args = [sys.executable, "-m", "sdsbridge.cli", "train", str(config), *overrides, f"method={method}",
            f"train.steps={steps}", "log.log_every=1", f"log.runs_dir={out}", f"log.name={name}",
            "export.mesh=false", "export.video=false", "log.val_every=0", "--no-progress", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"training {method} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    run_dir = out / name
    if not (run_dir / "metrics.jsonl").is_file():  # an older layout may have added a suffix
        run_dir = sorted(out.glob(f"{name}*"))[-1]
    return fingerprint(run_dir)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument("--methods", default="bridge,sds,nfsd")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, required=True, help="Folder for the runs (must not exist).")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=False)
    result = {m: train_and_fingerprint(args.config, m, args.steps, args.out, args.overrides)
              for m in args.methods.split(",")}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
