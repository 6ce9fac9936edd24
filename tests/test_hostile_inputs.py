"""What the tool withstands: damaged checkpoints, hostile configs and signals outside training, each an
attack a user or a careless script could make, with the one-line outcome it must give.

Read the test names as the list. The config bombs run in a child process under a memory limit, so a
regression fails fast instead of hanging CI.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from cli_helpers import (TINY, child_env, finished_run, one_error_line, prompt_file, resave, run_cli,  # noqa: F401
                         temp_files, trained_run)
from sdsbridge.common.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_WRITE_FAILED


def flip_bytes_inside_a_tensor(path, count=400):
    """Invert ``count`` bytes in the middle of the largest field tensor's data inside the zip file."""
    checkpoint = torch.load(path, weights_only=True)
    tensor = max(checkpoint["field"].values(), key=lambda t: t.numel())
    raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    data = bytearray(path.read_bytes())
    start = data.find(raw[:256])
    assert start >= 0 and len(raw) > count + 200
    for i in range(start + 100, start + 100 + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# 1. damaged checkpoints ---------------------------------------------------------------------------------

def test_a_checkpoint_with_flipped_bytes_is_refused_by_name_and_the_newest_good_one_offered(trained_run, capsys,
                                                                                           caplog):
    last = trained_run / "checkpoints" / "last.ckpt"
    flip_bytes_inside_a_tensor(last)
    code, _, err = run_cli(["train", "--resume", last, "train.steps=5", "--no-progress"], capsys)
    assert code == EXIT_BAD_INPUT
    line = one_error_line(err)
    assert f"{last}: damaged checkpoint: its contents do not match their checksum" in line
    assert "step-0000004.ckpt verifies: use that one" in line
    for command in (["export", trained_run, "--resolution", "16"],  # eval loads the same way (see below)
                    ["video", trained_run, "--frames", "2", "--resolution", "16", "--no-progress"]):
        caplog.clear()
        code, _, err = run_cli([*command, "--device", "cpu"], capsys)
        assert code == 0, err
        assert f"{last}: damaged checkpoint" in caplog.text and "using " in caplog.text
        assert "step-0000004.ckpt (step 4)" in caplog.text


def test_resume_of_a_run_directory_skips_a_damaged_last_ckpt_and_says_which_it_used(trained_run, capsys):
    flip_bytes_inside_a_tensor(trained_run / "checkpoints" / "last.ckpt")
    code, out, err = run_cli(["train", "--resume", trained_run, "train.steps=5", "--no-progress"], capsys)
    assert code == 0, err
    assert f"resuming from {trained_run / 'checkpoints' / 'step-0000004.ckpt'} (step 4)" in out


def test_resume_without_last_ckpt_uses_the_newest_numbered_checkpoint(trained_run, capsys):
    (trained_run / "checkpoints" / "last.ckpt").unlink()
    code, out, err = run_cli(["train", "--resume", trained_run, "train.steps=5", "--no-progress"], capsys)
    assert code == 0, err
    assert "step-0000004.ckpt (step 4)" in out and "done: 5 steps" in out


def test_resume_prefers_a_numbered_checkpoint_newer_than_last_ckpt(trained_run, capsys):
    checkpoints = trained_run / "checkpoints"
    (checkpoints / "last.ckpt").write_bytes((checkpoints / "step-0000002.ckpt").read_bytes())  # its write failed
    code, out, err = run_cli(["train", "--resume", trained_run, "train.steps=5", "--no-progress"], capsys)
    assert code == 0, err
    assert f"resuming from {checkpoints / 'step-0000004.ckpt'} (step 4)" in out


def test_no_checkpoint_that_verifies_is_one_line(trained_run, capsys):
    for path in (trained_run / "checkpoints").iterdir():
        flip_bytes_inside_a_tensor(path)
    for command in ("eval", "export", "video"):
        code, _, err = run_cli([command, trained_run, "--device", "cpu"], capsys)
        assert code == EXIT_BAD_INPUT
        line = one_error_line(err)
        assert "no checkpoint that loads and verifies" in line and line.count("damaged checkpoint") == 3


# 3. structurally wrong checkpoints ----------------------------------------------------------------------

@pytest.mark.parametrize("edit, expected", [
    (lambda c: [c.pop(k) for k in list(c) if k != "format"], "'step' is missing"),
    (lambda c: c.pop("rng"), "'rng' is missing"),
    (lambda c: c.update(step="12"), "'step' is a str, expected a int"),
    (lambda c: c.update(config=[1, 2]), "'config' is a list, expected a dict"),
    (lambda c: c["rng"].pop("numpy"), "'rng' lacks the torch, numpy or python generator state"),
    (lambda c: c.update(optimizer={"state": {}}), "'optimizer' lacks its state or param_groups"),
])
def test_structurally_wrong_checkpoints_are_one_line(trained_run, capsys, edit, expected):
    last = trained_run / "checkpoints" / "last.ckpt"
    resave(last, edit)
    code, _, err = run_cli(["train", "--resume", last, "--no-progress"], capsys)
    assert code == EXIT_BAD_INPUT
    assert expected in one_error_line(err)


def test_a_three_byte_text_file_given_to_resume_is_one_line(tmp_path, capsys):
    junk = tmp_path / "junk.ckpt"
    junk.write_text("hi\n")
    code, _, err = run_cli(["train", "--resume", junk], capsys)
    assert code == EXIT_BAD_INPUT
    assert f"{junk}: not a readable sdsbridge checkpoint" in one_error_line(err)


def test_a_scene_mismatch_names_the_first_key_and_both_shapes(trained_run, capsys):
    last = trained_run / "checkpoints" / "last.ckpt"
    resave(last, lambda c: c["field"].update({k: v[:-8] for k, v in c["field"].items() if v.dim() == 1}))
    code, _, err = run_cli(["export", last, "--device", "cpu"], capsys)
    assert code == EXIT_BAD_INPUT
    line = one_error_line(err)
    assert "checkpoint does not match this config's scene: field." in line
    assert "in the checkpoint," in line and "for this config" in line


# 4. configs that exhaust the machine --------------------------------------------------------------------

LIMITED = textwrap.dedent("""
    import resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # 1 GiB: a bomb dies here, not on the machine
    from sdsbridge.config.loader import load_config
    from sdsbridge.common.errors import UserError
    start = time.perf_counter()
    try:
        load_config(sys.argv[1] if sys.argv[1] != "-" else None, sys.argv[2:])
        print("LOADED")
    except UserError as exc:
        print("USERERROR", exc)
    print("SECONDS", time.perf_counter() - start)
""")


def load_limited(path, *overrides):
    """load_config in a child process with 1 GiB of address space; (outcome line, seconds)."""
    done = subprocess.run([sys.executable, "-c", LIMITED, str(path), *overrides], env=child_env(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    return lines[0], float(lines[-1].split()[1])


ALIAS_BOMB = ("prompt: a red torus\nguidance:\n  max_step_percent:\n    - &l0 [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]\n"
              + "".join(f"    - &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 10)))
"""Ten lines that expand to 10^10 values."""


def test_an_alias_bomb_in_a_config_fails_fast_in_one_line(tmp_path):
    outcome, seconds = load_limited(prompt_file(tmp_path, ALIAS_BOMB))
    assert outcome.startswith("USERERROR") and "more than 100000 values once aliases are expanded" in outcome
    assert seconds < 1.0


def test_an_alias_bomb_on_the_command_line_fails_fast_in_one_line(tmp_path):
    value = "[" + ALIAS_BOMB.split("max_step_percent:\n")[1].replace("\n    - ", ", ").replace("    - ", "") + "]"
    outcome, seconds = load_limited(prompt_file(tmp_path), f"guidance.max_step_percent={value}")
    assert outcome.startswith("USERERROR override 'guidance.max_step_percent'") and "aliases" in outcome
    assert seconds < 1.0


def test_a_five_million_element_list_fails_fast_in_one_line(tmp_path):
    big = prompt_file(tmp_path, "prompt: x\nguidance:\n  max_step_percent: [" + ",".join(["0"] * 5_000_000) + "]\n")
    outcome, seconds = load_limited(big)
    assert outcome.startswith("USERERROR") and "larger than 256 KiB" in outcome
    assert seconds < 1.0


def test_a_long_list_that_fits_the_file_bound_is_refused_by_the_schema(tmp_path):
    path = prompt_file(tmp_path, "prompt: x\ncameras:\n  fovy_range: [" + ",".join(["50"] * 1000) + "]\n")
    outcome, seconds = load_limited(path)
    assert "key 'cameras.fovy_range': a list of 1000 values; it takes at most 16" in outcome
    assert seconds < 1.0


def test_ten_thousand_nested_brackets_fail_fast_in_one_line(tmp_path):
    outcome, seconds = load_limited(prompt_file(tmp_path, "prompt: x\nseed: " + "[" * 10_000 + "]" * 10_000 + "\n"))
    assert outcome.startswith("USERERROR") and "nest" in outcome
    outcome, seconds = load_limited(prompt_file(tmp_path, "prompt: x\nseed: " + "[" * 40 + "]" * 40 + "\n"))
    assert "nested deeper than 32 levels" in outcome and seconds < 1.0


# 5. duplicate keys --------------------------------------------------------------------------------------

def test_a_key_given_twice_is_refused_with_both_line_numbers(tmp_path, capsys):
    path = prompt_file(tmp_path, "prompt: a cat\ntrain:\n  steps: 3\nprompt: a dog\n")
    code, _, err = run_cli(["config", "check", path], capsys)
    assert code == EXIT_BAD_INPUT
    assert one_error_line(err) == f"error: {path}: duplicate key 'prompt' (lines 1 and 4)"
    path = prompt_file(tmp_path, "prompt: a cat\ntrain:\n  steps: 3\nlog:\n  name: x\ntrain:\n  seed: 1\n")
    code, _, err = run_cli(["config", "check", path], capsys)
    assert "duplicate key 'train' (lines 2 and 6)" in one_error_line(err)


# 6. non-finite and unbounded numbers --------------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("guidance.guidance_scale=inf", "guidance.guidance_scale"), ("scene.radius=inf", "scene.radius"),
    ("scene.blob_density=nan", "scene.blob_density"), ("cameras.eval_distance=inf", "cameras.eval_distance"),
    ("train.steps=99999999999999999999", "train.steps"), ("loss.sparsity=[0, 1.0, .inf, 10]", "loss.sparsity"),
])
def test_non_finite_and_huge_numbers_are_refused(tmp_path, capsys, override, key):
    code, _, err = run_cli(["config", "check", prompt_file(tmp_path), override], capsys)
    assert code == EXIT_BAD_INPUT
    line = one_error_line(err)
    assert line.startswith(f"error: {key}: must") and ("finite" in line or "within" in line)


@pytest.mark.parametrize("max_bad_steps, expected", [
    (10, "training failed: all 3 steps were non-finite and skipped"),  # never 'done' with exit 0
    (2, "training diverged: 2 non-finite steps in a row"),  # a failure (issue 18), not bad input
])
def test_a_run_of_non_finite_steps_fails_with_code_1(tmp_path, capsys, monkeypatch, max_bad_steps, expected):
    from sdsbridge.distill.methods import DistillResult, Method

    real = Method.distill

    def always_nan(*args, **kwargs):
        result = real(*args, **kwargs)
        return DistillResult(result.loss * float("nan"), result.grad_norm, result.t, result.stage)

    monkeypatch.setattr(Method, "distill", always_nan)
    code, out, err = run_cli(["train", prompt_file(tmp_path), f"log.runs_dir={tmp_path / 'runs'}", "train.steps=3",
                              f"train.max_bad_steps={max_bad_steps}", *TINY], capsys)
    assert code == EXIT_FAILED
    assert expected in one_error_line(err) and "done:" not in out


# 7. signals outside the training loop -------------------------------------------------------------------

def test_sigterm_while_the_turntable_is_written_leaves_no_temp_file(trained_run, capsys, monkeypatch):
    from sdsbridge.outputs.export import video

    real, frames = video.turntable_frame, []

    def frame_then_sigterm(*args, **kwargs):
        frames.append(1)
        if len(frames) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(video, "turntable_frame", frame_then_sigterm)
    code, _, err = run_cli(["video", trained_run, "--frames", "4", "--resolution", "16", "--device", "cpu",
                            "--no-progress"], capsys)
    assert code == EXIT_INTERRUPTED
    assert one_error_line(err).startswith("interrupted (SIGTERM)")
    assert not temp_files(trained_run) and not list((trained_run / "video").glob("*.mp4"))


def test_sigint_during_export_prints_one_line_and_exits_130(trained_run, capsys, monkeypatch):
    from sdsbridge.outputs.export import mesh

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)

    monkeypatch.setattr(mesh, "extract_mesh", interrupted)
    code, _, err = run_cli(["export", trained_run, "--device", "cpu"], capsys)
    assert code == EXIT_INTERRUPTED
    assert one_error_line(err).startswith("interrupted (SIGINT)")


def test_sigterm_before_training_starts_leaves_no_run_directory(tmp_path, capsys, monkeypatch):
    from sdsbridge.training import loop as train

    def slow_prior(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)

    monkeypatch.setattr(train, "load_prior", slow_prior)
    runs = tmp_path / "runs"
    code, _, err = run_cli(["train", prompt_file(tmp_path), f"log.runs_dir={runs}", *TINY], capsys)
    assert code == EXIT_INTERRUPTED and one_error_line(err).startswith("interrupted (SIGTERM)")
    assert not runs.exists()  # neither the run directory nor the runs folder this command made


# 8. a full disk at start --------------------------------------------------------------------------------

def test_a_full_disk_at_start_leaves_no_empty_config_or_run_directory(tmp_path, capsys, monkeypatch):
    import errno

    import sdsbridge.common.atomic as atomic

    def full(path, mode):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(atomic, "_open_for_writing", full)
    runs = tmp_path / "runs"
    code, _, err = run_cli(["train", prompt_file(tmp_path), f"log.runs_dir={runs}", *TINY], capsys)
    assert code == EXIT_WRITE_FAILED
    assert "no space left on device writing" in one_error_line(err) and "config.yaml" in err
    assert not runs.exists()  # neither the run directory nor the runs folder this command made


# 9. hints for unknown keys ------------------------------------------------------------------------------

@pytest.mark.parametrize("key, hint", [("train.name", "log.name"), ("train.stpes", "train.steps"),
                                       ("trian", "train"), ("scene.log_every", "log.log_every")])
def test_an_unknown_key_is_matched_across_sections_by_its_last_part_first(tmp_path, capsys, key, hint):
    code, _, err = run_cli(["config", "check", prompt_file(tmp_path), f"{key}=1"], capsys)
    assert code == EXIT_BAD_INPUT
    assert one_error_line(err) == f"error: command line: unknown key '{key}' (did you mean '{hint}'?)"
