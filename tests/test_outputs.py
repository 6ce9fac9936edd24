"""Output names (outputs.py) and what the commands do with them: nothing overwrites another output."""

from sdsbridge.outputs.naming import newest_output, output_name

from cli_helpers import run_cli, train_tiny_run


def test_output_names():
    assert output_name("mesh", 1500, [], ".glb") == "mesh-step0001500.glb"
    assert output_name("turntable", 12, ["12f", "", "64px", "rgb/depth"], ".mp4") == "turntable-step0000012-12f-64px-rgb_depth.mp4"


def test_newest_output_prefers_the_latest_step_then_the_default_settings(tmp_path):
    assert newest_output(tmp_path / "missing", "mesh", "glb") is None
    for name in ("mesh-step0000100.glb", "mesh-step0000200-res64.glb", "mesh-step0000200.glb", "mesh-step0000300.ply",
                 "notes.glb"):
        (tmp_path / name).write_text("x")
    assert newest_output(tmp_path, "mesh", "glb") == tmp_path / "mesh-step0000200.glb"
    (tmp_path / "mesh-step0000200.glb").unlink()
    assert newest_output(tmp_path, "mesh", "glb") == tmp_path / "mesh-step0000200-res64.glb"


def test_later_commands_never_replace_the_end_of_training_outputs(tmp_path, capsys):
    run = train_tiny_run(tmp_path, "train.steps=2", "export.mesh=true", "export.video=true")  # 3 frames, 16 px
    mesh, video = run / "mesh" / "mesh-step0000002.glb", run / "video" / "turntable-step0000002.mp4"
    before = {mesh: mesh.read_bytes(), video: video.read_bytes()}
    capsys.readouterr()

    code, out, err = run_cli(["video", run, "--frames", "4", "--resolution", "12", "--device", "cpu", "--no-progress"],
                             capsys)
    assert code == 0, err
    assert out.strip() == f"video: {run / 'video' / 'turntable-step0000002-4f-12px.mp4'}"
    code, out, err = run_cli(["export", run, "--resolution", "12", "--device", "cpu"], capsys)
    assert code == 0 and out.strip() == f"mesh: {run / 'mesh' / 'mesh-step0000002-res12.glb'}"
    assert all(path.read_bytes() == data for path, data in before.items())

    mine = tmp_path / "elsewhere" / "my.ply"
    mine.parent.mkdir()
    code, out, err = run_cli(["export", run, "--out", mine, "--resolution", "12", "--device", "cpu"], capsys)
    assert code == 0 and mine.is_file() and out.strip() == f"mesh: {mine}"
    code, out, err = run_cli(["video", run, "--out", tmp_path / "clip.gif", "--device", "cpu"], capsys)
    assert code == 2 and "--out" in err

    code, out, err = run_cli(["train", "--resume", run], capsys)  # finished: says so, touches nothing
    assert code == 0 and "is finished (step 2 of 2): nothing to do" in out
    assert all(path.read_bytes() == data for path, data in before.items())
    assert sorted(p.name for p in (run / "video").iterdir()) == ["turntable-step0000002-4f-12px.mp4",
                                                                  "turntable-step0000002.mp4"]
