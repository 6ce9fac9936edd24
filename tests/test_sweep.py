"""`sdsbridge sweep`: the sweep file (expansion, names, one-line errors before anything is written), missing
extras, and one tiny run through the local launcher, skipped when the sweep is run again."""

import csv
import json
import math
import sys
from pathlib import Path

import pytest

from cli_helpers import child_env, one_error_line, run_cli
from sdsbridge.common.errors import UserError
from sdsbridge.sweep.sweep_file import load_sweep, run_name, run_status

ROOT = Path(__file__).resolve().parent.parent
TINY_SET = {"train.steps": 4, "log.checkpoint_every": 2, "log.val_every": 0, "log.log_every": 1,
            "prior.views_per_label": 8, "prior.nearest_views": 4, "export.mesh": False, "export.video": False,
            "device": "cpu"}


@pytest.fixture(autouse=True)
def children_import_this_checkout(monkeypatch):
    """Runs are child processes (`python -m sdsbridge train`): they import this checkout's package."""
    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])


def write_sweep(folder, **keys):
    """A sweep file in ``folder`` on the demo config with TINY_SET (keys given replace the defaults)."""
    data = {"base": str(ROOT / "configs" / "demo.yaml"), "prompts": ["a red torus", "a blue box"],
            "grid": {"method": ["bridge", "sds"], "train.seed": [0, 1]}, "set": TINY_SET,
            "eval": {"views": 1, "mesh_resolution": 16}, **keys}
    path = Path(folder) / "sweep.yaml"
    path.write_text(json.dumps({k: v for k, v in data.items() if v is not None}))  # JSON is YAML
    return path


def test_every_combination_is_one_resolved_run(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path), ["train.lr_grid=0.02"], tmp_path / "out")
    assert [r.name for r in sweep.runs] == [
        f"{slug}__method={m}__train.seed={s}" for slug in ("a-red-torus", "a-blue-box") for m in ("bridge", "sds")
        for s in (0, 1)]
    run = sweep.runs[5]  # a blue box, bridge, seed 1
    assert (run.prompt, run.config.prompt, run.config.method, run.config.train.seed) == (
        "a blue box", "a blue box", "bridge", 1)
    assert run.config.train.steps == 4 and run.config.prior.kind == "reference"  # set: and the base file
    assert run.config.train.lr_grid == 0.02  # the command line's override
    assert run.config.guidance.stage2_start_step == 1200  # the bridge preset under demo.yaml's own value
    assert sweep.out == (tmp_path / "out").absolute() and not sweep.out.exists()  # nothing written
    assert {run_status(sweep.out, r.name) for r in sweep.runs} == {"missing"}


def test_prompts_file_and_default_sweep_directory(tmp_path, monkeypatch):
    (tmp_path / "prompts.txt").write_text("# shapes\na red torus\n\n  a blue box  \n")
    sweep = load_sweep(write_sweep(tmp_path, prompts=None, prompts_file="prompts.txt", grid={}))
    assert [r.prompt for r in sweep.runs] == ["a red torus", "a blue box"]
    assert [r.name for r in sweep.runs] == ["a-red-torus", "a-blue-box"]
    assert sweep.out == Path("sweeps/sweep").absolute()


def test_names_keep_values_readable_and_safe():
    assert run_name("A DSLR photo of a pineapple!", {"guidance.guidance_scale": 7.5, "prior.model": "/a/b c"}) == \
        "a-dslr-photo-of-a-pineapple__guidance.guidance_scale=7.5__prior.model=-a-b-c"


@pytest.mark.parametrize("keys, expected", [
    ({"grdi": {"method": ["sds"]}}, "unknown key 'grdi' (did you mean 'grid'?)"),
    ({"grid": {"metod": ["sds"]}}, "grid: unknown key 'metod' (did you mean 'method'?)"),
    ({"grid": {"train.steps": [4, -1]}}, "run a-red-torus__train.steps=-1: train.steps: must be >= 0"),
    ({"grid": {"method": ["sds", "dreamfusion"]}}, "method: 'dreamfusion' is not one of bridge, bridge-vsd, "),
    ({"grid": {"prompt": ["x"]}}, "grid: 'prompt' is set by 'prompts'"),
    ({"grid": {"method": []}}, "grid: key 'method' lists no values"),
    ({"prompts_file": "p.txt"}, "give either 'prompts' (a list) or 'prompts_file'"),
    ({"prompts": None, "prompts_file": "missing.txt"}, "prompts_file:"),
    ({"prompts": ["a red torus", "a red torus!"]}, "two runs would share the directory"),
    ({"base": "missing.yaml"}, "base:"),
    ({"eval": {"views": 0}}, "eval: views: must lie in [1, 1000] (the bound of cameras.eval_views), got 0"),
    ({"set": {"train": 3}}, "key 'train' is a section"),
    ({"prompts": ["a purple giraffe"], "grid": {}}, None),  # the reference prior knows no giraffe: at train time
])
def test_bad_sweep_files_are_one_line_errors_and_write_nothing(tmp_path, capsys, keys, expected):
    path = write_sweep(tmp_path, **keys)
    if expected is None:
        load_sweep(path)  # valid as a config; the run itself reports the unknown shape
        return
    code, out, err = run_cli(["sweep", path, "--out", tmp_path / "out"], capsys)
    assert code == 2 and expected in one_error_line(err) and str(path) in err
    assert not (tmp_path / "out").exists()


def test_a_grid_key_cannot_be_overridden_on_the_command_line(tmp_path, capsys):
    code, _, err = run_cli(["sweep", write_sweep(tmp_path), "method=sds", "--out", tmp_path / "out"], capsys)
    assert code == 2 and "override 'method': the sweep's grid varies this key" in one_error_line(err)


@pytest.mark.parametrize("launcher, module, extra", [("ray", "ray", "ray"), ("slurm", "submitit", "slurm")])
def test_a_missing_extra_names_the_pip_command(tmp_path, capsys, monkeypatch, launcher, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # `import <module>` now raises ImportError
    code, _, err = run_cli(["sweep", write_sweep(tmp_path), "--launcher", launcher, "--out", tmp_path / "out"],
                           capsys)
    assert code == 2 and f"pip install 'sdsbridge[{extra}]'" in one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_options_are_checked(tmp_path, capsys, monkeypatch):
    path = write_sweep(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    for args, expected in ((["--launcher", "k8s"], "--launcher: 'k8s'"), (["--jobs", "0"], "--jobs: must be >= 1"),
                           (["--address", "auto"], "--address: only for --launcher ray"),
                           (["--launcher", "slurm"], "sbatch not found")):
        code, _, err = run_cli(["sweep", path, "--out", tmp_path / "out", *args], capsys)
        assert code == 2 and expected in one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_a_one_run_sweep_runs_scores_and_is_skipped_when_run_again(tmp_path, capsys):
    path = write_sweep(tmp_path, prompts=["a red torus"], grid={"method": ["sds"]})
    out = tmp_path / "out"
    code, stdout, err = run_cli(["sweep", path, "--out", out, "--no-progress"], capsys)
    assert code == 0, err
    name = "a-red-torus__method=sds"
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert len(rows) == 1 and rows[0]["name"] == name and rows[0]["status"] == "done"
    assert rows[0]["steps"] == "4" and rows[0]["of_steps"] == "4" and rows[0]["attempts"] == "1"
    assert math.isfinite(float(rows[0]["eval_psnr_db"])) and float(rows[0]["eval_chamfer"]) >= 0
    assert json.loads((out / "sweep.json").read_text())["runs"][0]["status"] == "done"
    assert f"done  {name}  4/4 steps" in stdout
    page = (out / "reports" / "a-red-torus.html").read_text()  # the prompt's report page
    assert page.count('<section class="run">') == 1 and "a red torus" in page
    run = out / "runs" / name
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
    assert "prompt: a red torus" in (out / "configs" / f"{name}.yaml").read_text()
    state = (out / "state" / f"{name}.jsonl").read_text()

    code, stdout, err = run_cli(["sweep", path, "--out", out, "--no-progress"], capsys)
    assert code == 0, err
    assert "1 done (skipped), 0 to resume, 0 to start" in stdout
    assert (out / "state" / f"{name}.jsonl").read_text() == state  # no attempt started
    assert list((out / "runs").iterdir()) == [run]


def test_an_unknown_shape_is_refused_before_the_sweep_starts(tmp_path, capsys):
    path = write_sweep(tmp_path, prompts=["a purple giraffe"], grid={})
    code, _, err = run_cli(["sweep", path, "--out", tmp_path / "out", "--no-progress"], capsys)
    line = one_error_line(err)
    # every combination gets train's own checks before anything starts (the reference prompt names no shape)
    assert code == 2 and "a purple giraffe" in line and "torus" in line
    assert not (tmp_path / "out").exists()
    code, _, err = run_cli(["sweep", path, "--out", tmp_path / "out", "--launcher", "slurm", "--slurm-local"], capsys)
    assert code == 2 and "a purple giraffe" in one_error_line(err)  # on every launcher, not only local ones
    assert not (tmp_path / "out").exists()


def test_a_run_that_fails_is_retried_then_reported(tmp_path, capsys):
    """A run that fails while training (here: every step non-finite, so it stops as diverged) is retried
    (--retries, default 1), then marked failed in sweep.csv, and the sweep exits 1 naming it."""
    path = write_sweep(tmp_path, prompts=["a red torus"], grid={},
                       set={**TINY_SET, "guidance.guidance_scale": 1e38, "train.max_bad_steps": 1})
    code, _, err = run_cli(["sweep", path, "--out", tmp_path / "out", "--no-progress"], capsys)
    line = one_error_line(err)
    assert code == 1 and "1 of 1 runs not done (a-red-torus: failed" in line
    rows = list(csv.DictReader((tmp_path / "out" / "sweep.csv").open()))
    assert rows[0]["status"] == "failed" and rows[0]["attempts"] == "2"


def test_load_sweep_raises_user_errors_only(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("- a list\n")
    with pytest.raises(UserError, match="expected a mapping"):
        load_sweep(path)


def test_a_run_another_process_holds_is_left_alone(tmp_path):
    import fcntl

    from sdsbridge.sweep.worker import RunTask, execute_run

    (tmp_path / "state").mkdir()
    with open(tmp_path / "state" / "r.lock", "a+b") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # as a worker of another sweep would
        assert execute_run(RunTask(str(tmp_path), "r", "cpu", None)) == "busy"
    assert not (tmp_path / "state" / "r.jsonl").exists() and not (tmp_path / "runs").exists()


def test_train_run_dir_is_fresh_only(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("")
    prompt = tmp_path / "p.yaml"
    prompt.write_text("prompt: a red torus\n")
    code, _, err = run_cli(["train", prompt, "--run-dir", taken], capsys)
    assert code == 2 and "--run-dir" in one_error_line(err) and "never reused" in err
    code, _, err = run_cli(["train", "--resume", taken, "--run-dir", tmp_path / "new"], capsys)
    assert code == 2 and "--run-dir starts a fresh run" in one_error_line(err)
    assert not (tmp_path / "new").exists()
