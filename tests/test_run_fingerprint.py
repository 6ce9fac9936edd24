"""Training is bit-identical to what was recorded before the package was restructured (issue 13).

tests/data/run_fingerprints.json holds, per method, digests of a short run's per-step metrics and final
checkpoint tensors (scripts/run_fingerprint.py), recorded on the commit before the restructuring. A
refactoring that changes any number a run computes fails here. Floating-point results depend on the torch
build and the CPU (MKL and oneDNN pick kernels by processor model, not only by vector extension: the same
code gave other last bits on an AVX512 Xeon of another model), so the file holds one recording per machine
(torch version, CPU capability, CPU family/model) and the check runs where one was made and is skipped,
saying why, elsewhere. ``--record`` adds or replaces this machine's recording: for a machine not yet
recorded, or, on every recorded machine, for a change that is meant to change results.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scripts_loader import load_script

HERE = Path(__file__).resolve().parent
RECORDED = HERE / "data" / "run_fingerprints.json"
CONFIG = """\
prompt: a red torus
prior:
  kind: reference
  resolution: 16
  views_per_label: 12
  nearest_views: 8
guidance:
  guidance_scale: 100.0
  max_step_percent: [10, 0.98, 0.5, 11]
  stage2_start_step: 16
  stage2_max_step_percent: 0.2
scene:
  radius: 0.75
  n_levels: 4
  log2_hashmap_size: 12
  per_level_scale: 1.3
  mlp_width: 16
  random_background_prob: 0.5
render:
  resolution: 16
  num_samples: 16
train:
  steps: 24
loss:
  sparsity: 10.0
  opacity: [12, 0.0, 10.0, 13]
"""
METHODS = ("bridge", "sds", "nfsd")
STEPS = 24


def cpu_model() -> str:
    """'vendor family/model' of this machine's processor from /proc/cpuinfo ('unknown' elsewhere)."""
    try:
        info = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return "unknown"
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    return f"{fields.get('vendor_id', '?')} {fields.get('cpu family', '?')}/{fields.get('model', '?')}"


def machine() -> dict:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_model": cpu_model()}


def recording_for(recordings: list[dict], here: dict) -> dict | None:
    return next((r for r in recordings if r["machine"] == here), None)


def current_fingerprints(tmp_path: Path) -> dict:
    script = load_script("run_fingerprint")
    config = tmp_path / "fingerprint.yaml"
    config.write_text(CONFIG)
    return {m: script.train_and_fingerprint(config, m, STEPS, tmp_path / "runs", []) for m in METHODS}


def test_training_matches_the_recorded_fingerprints(tmp_path):
    recorded = recording_for(json.loads(RECORDED.read_text())["recordings"], machine())
    if recorded is None:
        pytest.skip(f"no fingerprints recorded on this machine ({machine()}); "
                    f"python tests/test_run_fingerprint.py --record adds them")
    current = current_fingerprints(tmp_path)
    for method in METHODS:
        assert current[method]["steps"] == STEPS
        assert current[method] == recorded["runs"][method], method


if __name__ == "__main__":  # python tests/test_run_fingerprint.py --record   (on purpose only)
    import sys
    import tempfile

    if "--record" in sys.argv:
        with tempfile.TemporaryDirectory() as tmp:
            runs = current_fingerprints(Path(tmp))
        others = [r for r in json.loads(RECORDED.read_text())["recordings"] if r["machine"] != machine()]
        recordings = others + [{"machine": machine(), "runs": runs}]
        RECORDED.write_text(json.dumps({"recordings": recordings}, indent=2) + "\n")
        print(RECORDED.read_text())
