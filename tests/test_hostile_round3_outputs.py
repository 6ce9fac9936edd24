"""What the output commands withstand (hostile inputs, round three): signals while a set of files is written,
outputs that already exist or are in the way, run directories whose files point elsewhere, sizes that would
exhaust the machine and sweep names too long for the file system; each an attack with the one-line outcome it
must give and what it must leave on disk.

Read the test names as the list. The rules they hold: a command never replaces an existing file without
``--force`` (common/targets.py); the report embeds only the run's own regular files of the expected kind and
size (outputs/report_files.py); every size a user sets has a bound (common/limits.py), checked before anything
is created.
"""

import json
import os
import signal
from pathlib import Path

import pytest

from cli_helpers import (TINY, child_env, finished_run, one_error_line, prompt_file, run_cli,  # noqa: F401 (fixtures)
                         temp_files, trained_run)
from sdsbridge.common.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED

CPU = ["--device", "cpu"]
TEXTURED = [f"mesh-step0000004-textured-tex32.{ext}" for ext in ("glb", "mtl", "obj", "png")]


def listing(folder):
    """{relative path: bytes (files) or None (folders)} of everything under ``folder``."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def sigterm_at(monkeypatch, module, name, when):
    """Wrap ``module.name`` so that SIGTERM is sent to this process right after the call for which ``when(args)``
    is first true (the real call done)."""
    real, sent = getattr(module, name), []

    def wrapped(*args, **kwargs):
        result = real(*args, **kwargs)
        if not sent and when(args):
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(module, name, wrapped)
    return sent


# 6. signals while a set of files or a new folder is written ----------------------------------------------

def test_sigterm_after_the_textured_glb_is_written_leaves_none_of_its_four_files(trained_run, capsys, monkeypatch):
    import sdsbridge.common.atomic as atomic

    textured = []  # the files of the set opened so far: SIGTERM once the .glb is written and the next one opens
    sigterm_at(monkeypatch, atomic, "_open_for_writing",
               lambda args: "textured" in args[0].name and (textured.append(args[0]) or len(textured) == 2))
    code, out, err = run_cli(["export", trained_run, "--texture", "--texture-size", "32", *CPU], capsys)
    assert code == EXIT_INTERRUPTED and one_error_line(err).startswith("interrupted (SIGTERM)")
    assert "no partially written file was kept" in err and "mesh:" not in out
    assert not (trained_run / "mesh").exists() and not temp_files(trained_run)  # nor the folder export made


def test_sigterm_between_the_renames_of_a_textured_mesh_lets_all_four_land_then_stops(trained_run, capsys,
                                                                                         monkeypatch):
    import sdsbridge.common.atomic as atomic

    sent = sigterm_at(monkeypatch, atomic, "_commit", lambda args: "textured" in args[1].name)
    code, _, err = run_cli(["export", trained_run, "--texture", "--texture-size", "32", *CPU], capsys)
    assert sent and code == EXIT_INTERRUPTED and one_error_line(err).startswith("interrupted (SIGTERM)")
    assert sorted(p.name for p in (trained_run / "mesh").iterdir()) == TEXTURED  # the set, whole
    assert not temp_files(trained_run)


def test_an_interrupted_video_leaves_no_empty_folder_it_created(trained_run, tmp_path, capsys, monkeypatch):
    from sdsbridge.outputs.export import video

    for out in ([], ["--out", tmp_path / "new" / "deeper" / "clip.mp4"]):
        sigterm_at(monkeypatch, video, "turntable_frame", lambda args: True)
        code, _, err = run_cli(["video", trained_run, "--frames", "3", "--resolution", "16", "--no-progress", *CPU,
                                *out], capsys)
        assert code == EXIT_INTERRUPTED and one_error_line(err).startswith("interrupted (SIGTERM)")
    assert not (trained_run / "video").exists() and not (tmp_path / "new").exists()
    assert not temp_files(trained_run)


# 7. outputs that exist, and targets of the wrong kind ----------------------------------------------------

def test_export_over_an_existing_mesh_of_the_same_name_is_refused_without_force(trained_run, capsys):
    code, out, err = run_cli(["export", trained_run, *CPU], capsys)
    mesh = trained_run / "mesh" / "mesh-step0000004.glb"
    assert code == 0 and out.strip() == f"mesh: {mesh}", err
    mesh.write_bytes(b"an earlier export, kept")
    code, out, err = run_cli(["export", trained_run, *CPU], capsys)
    assert code == EXIT_BAD_INPUT and one_error_line(err) == f"error: export: {mesh} exists; --force replaces it"
    assert mesh.read_bytes() == b"an earlier export, kept" and out == ""
    code, out, err = run_cli(["export", trained_run, "--force", *CPU], capsys)
    assert code == 0 and mesh.read_bytes()[:4] == b"glTF" and not temp_files(trained_run)


def test_export_of_a_textured_mesh_is_refused_when_any_of_its_four_files_exists(trained_run, capsys):
    folder = trained_run / "mesh"
    folder.mkdir()
    (folder / TEXTURED[3]).write_bytes(b"someone's texture")  # only the .png is there
    code, _, err = run_cli(["export", trained_run, "--texture", "--texture-size", "32", *CPU], capsys)
    assert code == EXIT_BAD_INPUT and f"{folder / TEXTURED[3]} exists; --force replaces it" in one_error_line(err)
    assert listing(folder) == {TEXTURED[3]: b"someone's texture"}


def test_export_and_video_out_onto_an_existing_file_are_refused_without_force(trained_run, tmp_path, capsys):
    for command, name in ((["export", trained_run], "mine.glb"),
                          (["video", trained_run, "--frames", "2", "--resolution", "16", "--no-progress"], "mine.mp4")):
        target = tmp_path / name
        target.write_bytes(b"keep me")
        code, _, err = run_cli([*command, "--out", target, *CPU], capsys)
        assert code == EXIT_BAD_INPUT and one_error_line(err) == f"error: --out: {target} exists; --force replaces it"
        assert target.read_bytes() == b"keep me"
        code, _, err = run_cli([*command, "--out", target, "--force", *CPU], capsys)
        assert code == 0 and target.read_bytes() != b"keep me", err
    assert not temp_files(tmp_path)


def test_video_over_an_existing_turntable_of_the_same_name_is_refused_without_force(trained_run, capsys):
    command = ["video", trained_run, "--frames", "2", "--resolution", "16", "--no-progress", *CPU]
    code, out, err = run_cli(command, capsys)
    assert code == 0, err
    video = Path(out.strip().removeprefix("video: "))
    video.write_bytes(b"an earlier turntable")
    code, _, err = run_cli(command, capsys)
    assert code == EXIT_BAD_INPUT and one_error_line(err) == f"error: video: {video} exists; --force replaces it"
    assert video.read_bytes() == b"an earlier turntable"


def test_out_onto_a_directory_is_refused_before_any_work(trained_run, tmp_path, capsys, monkeypatch):
    from sdsbridge.outputs.export import mesh, video

    def no_loading(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before --out was checked")

    for module in (mesh, video):
        monkeypatch.setattr(module, "load_trained_scene", no_loading)
    glb, mp4, html = tmp_path / "a-folder.glb", tmp_path / "a-folder.mp4", tmp_path / "a-folder.html"
    before = listing(trained_run)
    for command, folder in ((["export", trained_run, *CPU], glb), (["video", trained_run, *CPU], mp4),
                            (["report", trained_run], html)):
        folder.mkdir()
        code, _, err = run_cli([*command, "--out", folder], capsys)
        assert code == EXIT_BAD_INPUT
        assert one_error_line(err) == f"error: --out: {folder} is a directory; give a file name"
        assert listing(folder) == {}
    assert listing(trained_run) == before


def test_report_out_onto_an_existing_file_is_refused_without_force(trained_run, tmp_path, capsys):
    page = tmp_path / "page.html"
    page.write_text("my notes")
    code, _, err = run_cli(["report", trained_run, "--out", page], capsys)
    assert code == EXIT_BAD_INPUT and one_error_line(err) == f"error: --out: {page} exists; --force replaces it"
    assert page.read_text() == "my notes"
    code, _, err = run_cli(["report", trained_run, "--out", page, "--force"], capsys)
    assert code == 0 and page.read_text().startswith("<!DOCTYPE html>")


def test_a_runs_folder_that_is_a_file_is_refused_with_code_2(tmp_path, capsys):
    runs, prompt = tmp_path / "runs", prompt_file(tmp_path)
    runs.write_text("not a folder")
    before = listing(tmp_path)
    for command, key in ((["train"], "log.runs_dir"), (["image"], "log.runs_dir"),
                         (["train", "--run-dir", runs / "one"], "--run-dir"), (["image", "--out", runs], "--out")):
        code, _, err = run_cli([*command, prompt, f"log.runs_dir={runs}", "prior.kind=reference", *CPU,
                                "--no-progress"], capsys)
        assert code == EXIT_BAD_INPUT
        line = one_error_line(err)
        assert line.startswith(f"error: {key}: ") and line.endswith(f"{runs} is a file, not a directory")
    assert listing(tmp_path) == before


def test_a_sweep_out_that_is_a_file_is_refused_with_code_2(tmp_path, capsys):
    out = tmp_path / "results"
    out.write_text("not a folder")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(json.dumps({"prompts": ["a red torus"], "set": {"prior.kind": "reference"}, "out": str(out)}))
    before = listing(tmp_path)
    for extra in (["--dry-run"], []):
        code, _, err = run_cli(["sweep", sweep, *extra, "--no-progress"], capsys)
        assert code == EXIT_BAD_INPUT
        assert one_error_line(err) == f"error: {sweep}: out: {out} is a file, not a directory"
    code, _, err = run_cli(["sweep", sweep, "--out", out, "--no-progress"], capsys)
    assert code == EXIT_BAD_INPUT and one_error_line(err) == f"error: --out: {out} is a file, not a directory"
    assert listing(tmp_path) == before


# 8. run directories whose files point elsewhere -----------------------------------------------------------

SECRET = b"prompt: the-secret-token-0123456789\n"


def secret_forms(data=SECRET):
    """The secret as it could appear in a page: plain, or base64-encoded at any of the three alignments."""
    import base64

    return [data.strip().decode()] + [base64.b64encode(data[i:])[4:24].decode() for i in range(3)]


def test_report_does_not_follow_a_symlink_in_the_run_to_a_secret(trained_run, tmp_path, capsys, caplog):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET)
    for link in (trained_run / "mesh" / "mesh-step0000009.glb", trained_run / "video" / "turntable.mp4",
                 trained_run / "plots" / "losses.png", trained_run / "validation" / "step-0000004.png"):
        link.parent.mkdir(exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(secret)
    code, _, err = run_cli(["report", trained_run], capsys)
    assert code == 0, err
    page = (trained_run / "report.html").read_text()
    assert not any(form in page for form in secret_forms())
    assert page.count("not embedded: a symbolic link") == 4 and "turntable.mp4: not embedded" in caplog.text


def test_report_does_not_follow_a_linked_folder_out_of_the_run(trained_run, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "turntable-step0000004.mp4").write_bytes(b"\0\0\0\x18ftypisom" + SECRET)  # looks like an mp4
    (trained_run / "video").symlink_to(elsewhere)
    code, _, err = run_cli(["report", trained_run], capsys)
    assert code == 0, err
    page = (trained_run / "report.html").read_text()
    assert not any(form in page for form in secret_forms())
    assert "turntable-step0000004.mp4: not embedded: outside the run directory" in page


def test_report_refuses_a_config_yaml_that_links_out_of_the_run(trained_run, tmp_path, capsys):
    secret = tmp_path / "secret.yaml"
    secret.write_bytes(SECRET)
    config, page = trained_run / "config.yaml", trained_run / "report.html"
    config.unlink()
    config.symlink_to(secret)
    before = page.read_bytes()  # train's page
    code, _, err = run_cli(["report", trained_run], capsys)
    assert code == EXIT_BAD_INPUT
    assert one_error_line(err).startswith(f"error: report: {config}: a symbolic link")
    assert page.read_bytes() == before


def test_report_leaves_out_a_video_over_the_size_cap_without_reading_it(trained_run, capsys):
    from sdsbridge.outputs.report_files import KINDS

    (trained_run / "video").mkdir()
    huge = trained_run / "video" / "turntable-step0000004.mp4"
    with open(huge, "wb") as handle:  # sparse: no disk space, but its size says 1 MiB over the cap
        handle.truncate(KINDS["video"].max_bytes + (1 << 20))
    code, _, err = run_cli(["report", trained_run], capsys)
    assert code == 0, err
    page = trained_run / "report.html"
    assert f"{huge.name}: not embedded: 201 MiB, over the 200 MiB a video file may have" in page.read_text()
    assert page.stat().st_size < 20 << 20


def test_report_leaves_out_a_folder_or_a_fake_named_like_its_files(trained_run, capsys):
    (trained_run / "video").mkdir()
    (trained_run / "video" / "turntable-step0000004.mp4").mkdir()  # a folder named like a video
    (trained_run / "mesh").mkdir()
    (trained_run / "mesh" / "mesh-step0000004.glb").write_bytes(SECRET)  # not a glb
    code, _, err = run_cli(["report", trained_run], capsys)
    assert code == 0, err
    page = (trained_run / "report.html").read_text()
    assert "turntable-step0000004.mp4: not embedded: not a regular file" in page
    assert "mesh-step0000004.glb: not embedded: its contents are not a .glb file&#x27;s" in page
    assert not any(form in page for form in secret_forms())


# 9. sizes that would exhaust the machine ----------------------------------------------------------------

@pytest.mark.parametrize("command, option, bound", [
    ("export", "--resolution", "[8, 1024] (the bound of export.resolution)"),
    ("video", "--resolution", "[2, 4096] (the bound of export.video_resolution)"),
    ("video", "--frames", "[1, 3600] (the bound of export.video_frames)"),
    ("eval", "--views", "[1, 1000] (the bound of cameras.eval_views)"),
    ("eval", "--mesh-resolution", "[8, 1024] (the bound of export.resolution)"),
])
def test_a_size_option_of_a_billion_is_refused_before_anything_is_allocated(trained_run, capsys, command, option,
                                                                            bound):
    before = listing(trained_run)
    code, _, err = run_cli([command, trained_run, option, "1000000000", *CPU], capsys)
    assert code == EXIT_BAD_INPUT
    assert one_error_line(err) == f"error: {option}: must lie in {bound}, got 1000000000"
    assert listing(trained_run) == before


IMAGE = ["prior.kind=reference", "prior.views_per_label=8", "image.steps=2", *CPU, "--no-progress"]


@pytest.mark.parametrize("command, overrides, expected", [
    ("train", ["train.batch_size=100000"], "train.batch_size: must lie in [1, 64], got 100000"),
    ("train", ["log.val_resolution=100000"], "log.val_resolution: must lie in [1, 4096], got 100000"),
    ("train", ["prior.resolution=100000"], "prior.resolution: must lie in [1, 1024], got 100000"),
    ("train", ["prior.views_per_label=100000000"], "prior.resolution, prior.views_per_label: the reference prior's "
     "image set (4 x 100000000 views at 16 px) would need about 3051.8 GiB; at most 8 GiB"),
    ("train", ["export.resolution=100000"], "export.resolution: must lie in [8, 1024], got 100000"),
    ("image", ["image.resolution=100000"], "image.resolution: must lie in [1, 2048], got 100000"),
    ("image", ["prior.views_per_label=200", "image.resolution=2048"], "image.resolution, prior.views_per_label: the "
     "reference prior's image set (4 x 200 views at 2048 px) would need about 100.0 GiB; at most 8 GiB"),
])
def test_a_config_size_that_would_exhaust_memory_is_refused_before_a_run_folder_exists(tmp_path, capsys, command,
                                                                                      overrides, expected):
    runs = tmp_path / "runs"
    args = [*TINY, "train.steps=1", "log.val_every=1"] if command == "train" else IMAGE  # (the sizes all used)
    code, _, err = run_cli([command, prompt_file(tmp_path), f"log.runs_dir={runs}", *args, *overrides], capsys)
    assert code == EXIT_BAD_INPUT
    assert one_error_line(err).startswith(f"error: {expected}")
    assert not runs.exists()


# 10. sweep names too long for the file system -------------------------------------------------------------

def test_a_sweep_whose_run_names_would_exceed_255_bytes_runs_under_shortened_unique_names(tmp_path, capsys,
                                                                                         monkeypatch):
    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])  # runs are child processes of this checkout
    long = ["x" * 60, "y" * 60]
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(json.dumps({
        "prompts": ["a red torus, seen from far away in the soft light of a long afternoon"],
        "grid": {"log.name": long, "log.runs_dir": ["r" * 60], "image.target_modifier": ["t" * 60],
                 "guidance.target_modifier": ["g" * 60]},
        "set": {"prior.kind": "reference", "prior.resolution": 16, "prior.views_per_label": 8, "render.resolution": 16,
                "render.num_samples": 16, "scene.n_levels": 4, "scene.log2_hashmap_size": 12, "train.steps": 1,
                "log.val_every": 0, "export.mesh": False, "export.video": False, "export.report": False,
                "device": "cpu"},
        "eval": False}))
    out = tmp_path / "out"
    code, listed, err = run_cli(["sweep", sweep, "--out", out, "--dry-run"], capsys)
    assert code == 0, err
    names = [line.split()[-1] for line in listed.splitlines() if line.strip().startswith("missing")]
    assert len(names) == 2 and len(set(names)) == 2 and not out.exists()
    assert all(len(name.encode()) <= 255 - 32 for name in names)  # state/.<name>.done.<pid>-<hex>.tmp.json fits
    code, _, err = run_cli(["sweep", sweep, "--out", out, "--no-progress"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(names)
    assert all((out / "state" / f"{name}.done.json").is_file() for name in names)
