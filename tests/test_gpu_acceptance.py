"""scripts/gpu_acceptance.py: its CPU dry run executes every stage that needs no CUDA (all six, small), writes its
JSON and table, and a failing stage makes it exit 1 while the others still run."""

import json

import pytest

from scripts_loader import load_script

STAGE_NAMES = ["gpu tests", "hash grid parity", "occupancy parity", "method steps", "train", "torch.compile"]


@pytest.fixture()
def acceptance():
    return load_script("gpu_acceptance")


def test_the_stages_are_the_documented_ones(acceptance):
    assert [name for name, _ in acceptance.STAGES] == STAGE_NAMES


def test_dry_run_of_the_quick_stages(acceptance, tmp_path, capsys):
    out = tmp_path / "acceptance.json"
    assert acceptance.main(["--cpu-dry-run", "--out", str(out), "--only", "hash grid parity", "occupancy parity",
                            "train"]) == 0
    result = json.loads(out.read_text())
    assert result["dry_run"] and result["passed"]
    stages = {s["name"]: s for s in result["stages"]}
    assert list(stages) == ["hash grid parity", "occupancy parity", "train"]
    assert all(s["status"] == "pass" for s in stages.values())
    assert stages["occupancy parity"]["figures"]["min_psnr_db"] >= acceptance.DRY_OCCUPANCY_MIN_PSNR
    assert stages["train"]["figures"]["steps"] == 4 and stages["train"]["figures"]["mesh_bytes"] > 0
    printed = capsys.readouterr().out
    assert "(CPU dry run)" in printed and "occupancy parity    pass" in printed


def test_a_failing_stage_is_reported_and_the_rest_still_run(acceptance, tmp_path, monkeypatch, capsys):
    def broken(setup):
        raise AssertionError("renders differ")

    stages = [(name, broken if name == "hash grid parity" else body) for name, body in acceptance.STAGES]
    monkeypatch.setattr(acceptance, "STAGES", stages)
    out = tmp_path / "acceptance.json"
    assert acceptance.main(["--cpu-dry-run", "--out", str(out), "--only", "hash grid parity", "train"]) == 1
    result = json.loads(out.read_text())
    assert not result["passed"]
    assert [(s["name"], s["status"]) for s in result["stages"]] == [("hash grid parity", "fail"), ("train", "pass")]
    assert "renders differ" in result["stages"][0]["detail"]
    with pytest.raises(SystemExit):
        acceptance.main(["--cpu-dry-run", "--only", "no such stage"])


@pytest.mark.slow
def test_the_whole_dry_run(acceptance, tmp_path, capsys):
    out = tmp_path / "acceptance.json"
    assert acceptance.main(["--cpu-dry-run", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [s["name"] for s in result["stages"]] == STAGE_NAMES
    assert all(s["status"] == "pass" for s in result["stages"]), result["stages"]
    steps = next(s for s in result["stages"] if s["name"] == "method steps")["figures"]
    assert set(steps) == {f"{m} {r}px" for m in ("sds", "bridge", "nfsd", "vsd", "bridge-vsd") for r in (16, 32)}
    assert all(v["ms"] > 0 and v["peak_gb"] > 0 for v in steps.values())
    compiled = next(s for s in result["stages"] if s["name"] == "torch.compile")["figures"]
    assert compiled["eager_ms"] > 0 and compiled["compiled_ms"] > 0
