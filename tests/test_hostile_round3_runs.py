"""What the tool withstands, round three (issue 30, items 1-5 and 11): refused resumes that must write nothing,
checkpoints whose payload is malformed, configs whose strings amplify or whose lists nest, a guidance scale that
overflows every gradient (in `train` and in `image`, one seed, a stage-two scale, a captions batch), and the
smaller slips (exponent floats, a full disk under ffmpeg, the intact checkpoint named, the divergence step, the
sweep's shape error, a malicious pickle, a changed prompt on resume).

Read the test names as the list. Every test is one attack and the one-line outcome it must give; "nothing
written" compares every file of the run (bytes and modification time) before and after.
"""

import errno
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import TINY, child_env, one_error_line, prompt_file, resave, run_cli, temp_files, train_tiny_run
from sdsbridge.common.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_WRITE_FAILED


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (and last.ckpt), trained once."""
    return train_tiny_run(tmp_path_factory.mktemp("finished"), "train.steps=4", "log.checkpoint_every=2")


@pytest.fixture
def trained_run(finished_run, tmp_path):
    """A copy of ``finished_run`` of this test's own, to damage."""
    return Path(shutil.copytree(finished_run, tmp_path / "runs" / "bridge-a-red-torus"))


def snapshot(folder):
    """Every file under ``folder``: relative path -> (bytes, modification time in ns)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def resume(run, capsys, *overrides):
    return run_cli(["train", "--resume", run, "train.steps=6", *overrides, "--no-progress"], capsys)


# 1. a refused resume writes nothing ---------------------------------------------------------------------

@pytest.mark.parametrize("edit, overrides, expected", [
    (lambda c: c["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)), [], "RNG state does not fit"),
    (lambda c: None, ["scene.n_levels=5"], "checkpoint does not match this config's scene: field.encoding.params"),
    (lambda c: c.update(method={"lora": torch.zeros(3)}), [], "unexpected method state ['lora']"),
], ids=["bad-rng-state", "scene-shape-mismatch", "another-methods-state"])
def test_a_refused_resume_rewrites_no_config_and_writes_nothing(trained_run, capsys, edit, overrides, expected):
    resave(trained_run / "checkpoints" / "last.ckpt", edit)
    before = snapshot(trained_run)
    time.sleep(0.01)  # a rewrite would show in the modification times
    code, _, err = resume(trained_run, capsys, "guidance.guidance_scale=7", *overrides)
    assert code == EXIT_BAD_INPUT
    assert expected in one_error_line(err)
    assert snapshot(trained_run) == before


# 2. malformed checkpoint payloads -----------------------------------------------------------------------

def deep_list(depth):
    nested = []
    for _ in range(depth):
        nested = [nested]
    return nested


def first_field_key(checkpoint):
    return next(iter(checkpoint["field"]))


@pytest.mark.parametrize("checksum", ["0" * 64, None], ids=["with-a-checksum", "without"])
@pytest.mark.parametrize("edit, expected", [
    (lambda c: c["field"].update({first_field_key(c): c["field"][first_field_key(c)].to_sparse()}),
     "'field.encoding.params' is a sparse tensor"),
    (lambda c: c["field"].update({first_field_key(c): torch.empty(c["field"][first_field_key(c)].shape,
                                                                  device="meta")}),
     "'field.encoding.params' is a tensor without data (meta)"),
    (lambda c: c.update(method={"junk": deep_list(5000)}), "'method.junk' nests deeper than"),
], ids=["sparse-tensor", "meta-tensor", "5000-deep-list"])
def test_a_malformed_checkpoint_payload_is_one_line_naming_its_entry(trained_run, capsys, edit, expected, checksum):
    last = trained_run / "checkpoints" / "last.ckpt"
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # pickling the deep list recurses
    try:
        resave(last, edit, checksum=checksum)
    finally:
        sys.setrecursionlimit(limit)
    for command in (["train", "--resume", last, "--no-progress"], ["export", last, "--device", "cpu"]):
        code, _, err = run_cli(command, capsys)
        assert code == EXIT_BAD_INPUT
        line = one_error_line(err)
        assert f"{last}: damaged checkpoint: {expected}" in line, line


def test_a_load_state_dict_error_names_the_key(trained_run, capsys):
    last = trained_run / "checkpoints" / "last.ckpt"
    resave(last, lambda c: c["background"].pop("mlp.2.weight"))
    code, _, err = run_cli(["export", last, "--device", "cpu"], capsys)
    assert code == EXIT_BAD_INPUT
    assert "background.mlp.2.weight is missing in the checkpoint" in one_error_line(err)


def test_negative_bad_steps_in_a_checkpoint_are_refused(trained_run, capsys):
    last = trained_run / "checkpoints" / "last.ckpt"
    resave(last, lambda c: c.update(bad_steps=-100))
    code, _, err = resume(last, capsys)
    assert code == EXIT_BAD_INPUT
    assert f"{last}: damaged checkpoint: 'bad_steps' is -100, expected 0 to 'step' + 1 (5)" in one_error_line(err)


def test_a_checkpoint_whose_checksum_was_deleted_loads_with_a_visible_warning(trained_run, capsys, caplog):
    last = trained_run / "checkpoints" / "last.ckpt"
    resave(last, lambda c: None, checksum=None)
    code, _, err = run_cli(["export", last, "--device", "cpu"], capsys)
    assert code == 0, err
    warning = f"{last}: no checksum (written before checkpoints had one, or edited): its contents are not verified"
    assert any(r.levelname == "WARNING" and r.getMessage() == warning for r in caplog.records)


# 3. string amplification --------------------------------------------------------------------------------

def cli_limited(args, cwd):
    """``sdsbridge ARGS`` in a child process with 1 GiB of address space: (exit code, stderr, seconds)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sdsbridge", *map(str, args)], env=child_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=60, preexec_fn=limit)
    return done.returncode, done.stderr, time.perf_counter() - start


def test_a_string_alias_nest_within_the_count_bounds_fails_fast_in_one_line(tmp_path):
    text = ("prompt: a red torus\nscene:\n  backend: &s " + "x" * 190_000 + "\nexport:\n"
            + "  format: &a [" + ", ".join(["*s"] * 16) + "]\n"
            + "  video_modes: &b [" + ", ".join(["*a"] * 16) + "]\n"
            + "  threshold: [" + ", ".join(["*b"] * 16) + "]\n")  # 190 KB that expand to 780 MB of text
    path = prompt_file(tmp_path, text)
    code, err, seconds = cli_limited(["config", "check", path], tmp_path)
    assert code == EXIT_BAD_INPUT
    line = one_error_line(err)
    assert f"{path}: more than 1024 KiB of text once aliases are expanded" in line and len(err) < 500
    assert seconds < 10


def test_an_error_message_cuts_a_long_value(tmp_path, capsys):
    code, _, err = run_cli(["config", "check", prompt_file(tmp_path), "export.threshold=" + "y" * 200_000], capsys)
    assert code == EXIT_BAD_INPUT
    line = one_error_line(err)
    assert line.startswith("error: export.threshold: expected 'auto' or a number, got 'yyy") and len(line) < 300


# 4. nested lists where values belong --------------------------------------------------------------------

@pytest.mark.parametrize("override, key", [("export.video_modes=[[rgb]]", "export.video_modes"),
                                           ("cameras.distance_range=[[1.5],[1.5]]", "cameras.distance_range"),
                                           ("train.betas=[0.9, {a: 1}]", "train.betas")])
def test_a_nested_list_where_values_belong_is_one_line(tmp_path, capsys, override, key):
    code, _, err = run_cli(["config", "check", prompt_file(tmp_path), override], capsys)
    assert code == EXIT_BAD_INPUT
    assert one_error_line(err) == (f"error: command line: key '{key}': a list inside a list (or a section in "
                                   "one); it takes a value or a list of values")


# 5. a guidance scale that overflows every gradient ------------------------------------------------------

def test_a_guidance_scale_that_overflows_every_gradient_fails_naming_it(tmp_path, capsys):
    code, out, err = run_cli(["train", prompt_file(tmp_path), f"log.runs_dir={tmp_path / 'runs'}", "train.steps=3",
                              "guidance.guidance_scale=1e300", *TINY], capsys)
    assert code == EXIT_FAILED and "done:" not in out
    line = one_error_line(err)
    assert "training failed: all 3 steps were non-finite and skipped" in line
    assert "(the guidance gradient was NaN or inf everywhere); lower guidance.guidance_scale (now 1e+300);" in line


def test_a_run_that_diverges_on_non_finite_guidance_names_the_setting(tmp_path, capsys):
    code, out, err = run_cli(["train", prompt_file(tmp_path), f"log.runs_dir={tmp_path / 'runs'}", "train.steps=6",
                              "train.max_bad_steps=2", "guidance.guidance_scale=1e300", *TINY], capsys)
    assert code == EXIT_FAILED and "done:" not in out
    line = one_error_line(err)
    assert "training diverged: 2 non-finite steps in a row at step 2" in line
    assert "lower guidance.guidance_scale (now 1e+300)" in line



IMAGE = ["prior.kind=reference", "prior.resolution=16", "prior.views_per_label=8", "image.resolution=8",
         "image.video_every=0", "log.log_every=1", "--device", "cpu", "--no-progress"]
"""`image` arguments for a reference-prior run of a few milliseconds per step."""


def test_an_image_whose_guidance_overflows_every_gradient_fails_naming_it(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("seed-0.png", "grid.png"):  # an earlier run's outputs in the same folder
        (out / name).write_bytes(b"an earlier image")
    code, stdout, err = run_cli(["image", prompt_file(tmp_path), "image.steps=3", "image.guidance_scale=1e300",
                                 "--out", out, *IMAGE], capsys)
    assert code == EXIT_FAILED and "images:" not in stdout and "grid:" not in stdout
    line = one_error_line(err)
    assert "seed 0: all 3 steps were non-finite and skipped" in line
    assert "(the guidance gradient was NaN or inf everywhere); lower image.guidance_scale (now 1e+300)" in line
    assert not (out / "seed-0.png").exists() and not (out / "grid.png").exists()  # nothing claims a finished image
    assert (out / "metrics.jsonl").read_text().count('"seed": 0') == 3


def test_an_image_that_diverges_in_stage_two_names_the_stage_two_scale(tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_cli(["image", prompt_file(tmp_path), "method=bridge", "image.steps=6",
                                 "image.stage2_start_step=2", "image.stage2_scale=1e300", "image.max_bad_steps=2",
                                 "--seeds", "0,1", "--out", out, *IMAGE], capsys)
    assert code == EXIT_FAILED and "images:" not in stdout
    line = one_error_line(err)  # stage two starts at step 3 (counted from 1): steps 3 and 4 fail
    assert "2 of 2 seeds failed" in line and "seed 0: 2 non-finite steps in a row at step 4 of 6" in line
    assert "lower image.stage2_scale (now 1e+300)" in line
    assert not list(out.glob("seed-*.png")) and not (out / "grid.png").exists()


def test_an_image_batch_caption_whose_guidance_overflows_is_not_marked_done(tmp_path, capsys):
    captions, out = tmp_path / "captions.txt", tmp_path / "out"
    captions.write_text("a red torus\na blue box\n")
    for _ in range(2):  # the rerun tries both captions again: neither was marked done
        code, stdout, err = run_cli(["image", "--batch", captions, "image.steps=3", "image.guidance_scale=1e300",
                                     "--out", out, *IMAGE], capsys)
        assert code == EXIT_FAILED
        assert "0 made, 0 skipped (already done), 2 failed" in stdout and "lower image.guidance_scale" in stdout
        assert "batch: 2 of 2 prompts failed on non-finite steps" in one_error_line(err)
        assert not list(out.rglob("*.png"))


def test_an_image_with_a_few_non_finite_steps_finishes_saying_how_many(tmp_path, capsys, monkeypatch, caplog):
    from sdsbridge.distill.methods import DistillResult, Method

    real = Method.distill

    def nan_at_the_second_step(self, latents, conditions, step, *args, **kwargs):
        result = real(self, latents, conditions, step, *args, **kwargs)
        scale = float("nan") if step == 1 else 1.0
        return DistillResult(result.loss * scale, result.grad_norm, result.t, result.stage)

    monkeypatch.setattr(Method, "distill", nan_at_the_second_step)
    out = tmp_path / "out"
    code, stdout, err = run_cli(["image", prompt_file(tmp_path), "image.steps=4", "--out", out, *IMAGE], capsys)
    assert code == 0, err
    assert (out / "seed-0.png").is_file() and (out / "grid.png").is_file()
    assert "seed 0 step 2: a non-finite loss or gradient, step skipped (1 in a row)" in caplog.text
    assert "seed 0: 1 non-finite step(s) of 4 were skipped" in caplog.text

# 11. smaller ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override", ["loss.sparsity=1e-3", "loss.opacity=[0, 1e-3, 1E2, 10]",
                                      "guidance.max_step_percent=5e-1", "export.threshold=2.5e+1"])
def test_an_exponent_float_without_a_dot_is_a_number(tmp_path, capsys, override):
    path = prompt_file(tmp_path, "prompt: a red torus\nprior:\n  kind: reference\nloss:\n  sparsity: 1e-3\n")
    code, out, err = run_cli(["config", "check", path, override], capsys)
    assert code == 0, err
    code, out, _ = run_cli(["config", "show", path, override], capsys)
    assert "sparsity: 0.001" in out


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("frames, resolution, mid_stream", [(3, 16, False), (12, 32, True)],
                         ids=["fails-at-the-end", "fails-mid-stream"])
def test_a_video_on_a_full_disk_says_no_space_not_broken_pipe(trained_run, capsys, monkeypatch, frames, resolution,
                                                              mid_stream):
    import sdsbridge.common.atomic as atomic
    from sdsbridge.outputs.export import video

    real_temp, real_frame, rendered = atomic.temp_path_for, video.turntable_frame, []

    def full_for_mp4(path):  # ffmpeg's own writes fail with ENOSPC, as on a full disk
        tmp = real_temp(path)
        if path.suffix == ".mp4":
            os.symlink("/dev/full", tmp)
        return tmp

    def counted(*args, **kwargs):
        rendered.append(1)
        return real_frame(*args, **kwargs)

    monkeypatch.setattr(atomic, "temp_path_for", full_for_mp4)
    monkeypatch.setattr(video, "turntable_frame", counted)
    code, _, err = run_cli(["video", trained_run, "--frames", frames, "--resolution", resolution, "--device", "cpu",
                            "--no-progress"], capsys)
    assert code == EXIT_WRITE_FAILED
    line = one_error_line(err)
    assert line.startswith("error: no space left on device writing ") and line.endswith(".mp4"), err
    assert len(err.strip().splitlines()) == 1  # ffmpeg's own lines do not reach the terminal
    assert (len(rendered) < frames) == mid_stream  # the pipe broke mid-stream, or ffmpeg failed at its end
    assert not (trained_run / "video").exists() or not any((trained_run / "video").iterdir())


def test_a_failed_last_ckpt_write_names_the_checkpoint_that_was_written(tmp_path, capsys, monkeypatch):
    import sdsbridge.common.atomic as atomic

    real, lasts = atomic._open_for_writing, []

    def second_last_fails(path, mode):
        if path.name.startswith(".last."):
            lasts.append(path)
            if len(lasts) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, mode)

    monkeypatch.setattr(atomic, "_open_for_writing", second_last_fails)
    runs = tmp_path / "runs"
    code, _, err = run_cli(["train", prompt_file(tmp_path), f"log.runs_dir={runs}", "train.steps=4",
                            "log.checkpoint_every=2", "export.mesh=false", "export.video=false", *TINY], capsys)
    assert code == EXIT_WRITE_FAILED
    checkpoints = runs / "bridge-a-red-torus" / "checkpoints"
    line = one_error_line(err)
    assert f"no space left on device writing {checkpoints / 'last.ckpt'}" in line
    assert f"{checkpoints / 'step-0000004.ckpt'} (step 4) was written and is intact" in line
    monkeypatch.setattr(atomic, "_open_for_writing", real)
    code, out, err = resume(checkpoints.parent, capsys)
    assert code == 0 and f"resuming from {checkpoints / 'step-0000004.ckpt'} (step 4)" in out


def test_the_divergence_message_counts_steps_from_one(tmp_path, capsys, monkeypatch, caplog):
    from sdsbridge.distill.methods import DistillResult, Method

    real = Method.distill

    def nan_from_the_second_step(self, latents, conditions, step, *args, **kwargs):
        result = real(self, latents, conditions, step, *args, **kwargs)
        scale = float("nan") if step >= 1 else 1.0
        return DistillResult(result.loss * scale, result.grad_norm, result.t, result.stage)

    monkeypatch.setattr(Method, "distill", nan_from_the_second_step)
    code, _, err = run_cli(["train", prompt_file(tmp_path), f"log.runs_dir={tmp_path / 'runs'}", "train.steps=5",
                            "train.max_bad_steps=2", *TINY], capsys)
    assert code == EXIT_FAILED
    line = one_error_line(err)  # steps 2 and 3 failed; the checkpoint holds the 2 steps before step 3 (one skipped)
    assert "training diverged: 2 non-finite steps in a row at step 3" in line and "step-0000002.ckpt" in line
    assert "step 2: a non-finite loss or gradient, step skipped (1 in a row)" in caplog.text


def test_a_sweep_prompt_without_a_shape_names_the_file_and_run(tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("prompts: [a red torus, a purple banana]\nset: {prior.kind: reference, train.steps: 2}\n")
    code, _, err = run_cli(["sweep", sweep, "--dry-run"], capsys)
    assert code == EXIT_BAD_INPUT
    assert one_error_line(err).startswith(f"error: {sweep}: run a-purple-banana: prompt 'a purple banana' names no")


class RunsCode:
    """Unpickled by plain pickle, this would create a folder (a stand-in for any code)."""

    def __init__(self, folder):
        self.folder = str(folder)

    def __reduce__(self):
        return os.makedirs, (self.folder,)


def test_a_malicious_pickle_is_refused_in_one_line_without_torchs_advice(tmp_path, capsys):
    evil, marker = tmp_path / "evil.ckpt", tmp_path / "code-ran"
    torch.save({"format": "sdsbridge-checkpoint-v1", "payload": RunsCode(marker)}, evil)
    for command in (["train", "--resume", evil], ["export", evil, "--device", "cpu"]):
        code, _, err = run_cli(command, capsys)
        assert code == EXIT_BAD_INPUT
        assert err.strip() == one_error_line(err)  # the one line, nothing before it
        assert err.strip() == (f"error: {evil}: refused: loading it would call os.makedirs, and checkpoints "
                               "hold only tensors and plain values (nothing in it was run)")
    assert not marker.exists()


def test_resuming_with_another_prompt_warns_naming_both(trained_run, capsys, caplog):
    code, out, err = resume(trained_run, capsys, "prompt=a blue box")
    assert code == 0, err
    assert "resuming with settings that differ from the run's: prompt 'a red torus' -> 'a blue box'" in caplog.text
    code, out, err = resume(trained_run, capsys, "train.steps=7")  # a longer run is what resume is for: no warning
    assert code == 0 and "differ from the run's" not in caplog.text.split("a blue box")[-1]
