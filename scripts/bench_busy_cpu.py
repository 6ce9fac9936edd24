"""The CPU demo's training speed on an idle machine and with one competing CPU-bound process, side by side.

    python scripts/bench_busy_cpu.py                 # 400 steps of configs/demo.yaml per case
    python scripts/bench_busy_cpu.py --steps 200 --fixed-threads 2

Cases, one after the other, each ``sdsbridge train configs/demo.yaml`` (no mesh, no video) in a temporary
runs folder:

- ``idle``: nothing else running (the thread count sdsbridge picks: devices.CpuThreads);
- ``busy``: the same while one other process spins on one core (a pure-Python loop);
- ``busy, N threads fixed`` (``--fixed-threads N``): the same load with OMP_NUM_THREADS=N, i.e. torch's old
  default of one thread per core, for comparison.

Steps/s come from each run's metrics.jsonl (the training loop, first logged step to last). Printed: steps/s
per case and the slowdown busy / idle (target: at most 2.5x). Meaningful only on an otherwise quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
SPIN = "while True: pass"


def train_rate(runs: Path, name: str, steps: int, env: dict) -> float:
    """Train the demo for ``steps`` steps as run ``name``; its steps/s."""
    args = [sys.executable, "-m", "sdsbridge", "train", str(DEMO), f"train.steps={steps}", f"log.runs_dir={runs}",
            f"log.name={name}", "log.val_every=0", "export.mesh=false", "export.video=false", "--no-progress"]
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr}")
    rows = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first, last = rows[0], rows[-1]
    return (last["step"] - first["step"]) / (last["elapsed_s"] - first["elapsed_s"])


def with_spinner(run):
    """``run()`` while one other process keeps a core busy."""
    spinner = subprocess.Popen([sys.executable, "-c", SPIN])
    try:
        return run()
    finally:
        spinner.kill()
        spinner.wait()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--fixed-threads", type=int, default=0, help="also run the busy case with this many "
                        "threads fixed (OMP_NUM_THREADS), e.g. the core count")
    args = parser.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SDSBRIDGE_THREADS")}
    runs = Path(tempfile.mkdtemp(prefix="bench-busy-"))
    rates = {}
    try:
        rates["idle"] = train_rate(runs, "idle", args.steps, env)
        rates["busy"] = with_spinner(lambda: train_rate(runs, "busy", args.steps, env))
        if args.fixed_threads:
            fixed_env = {**env, "OMP_NUM_THREADS": str(args.fixed_threads)}
            rates[f"busy, {args.fixed_threads} threads fixed"] = with_spinner(
                lambda: train_rate(runs, "busy-fixed", args.steps, fixed_env))
    finally:
        shutil.rmtree(runs, ignore_errors=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{DEMO.name}, {args.steps} steps per case, {cores} cores")
    for name, rate in rates.items():
        print(f"  {name:<24} {rate:6.1f} steps/s   slowdown vs idle {rates['idle'] / rate:4.2f}x")
    print(f"one competing process: {rates['idle'] / rates['busy']:.2f}x slower (target <= 2.5x)")
    return rates


if __name__ == "__main__":
    main()
