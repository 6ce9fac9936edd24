"""sdsbridge report: a self-contained page per run or for several side by side; `train` writes it and prints its
path; bad runs are one-line errors. The page in a real browser: tests/test_report_browser.py."""

import re

from cli_helpers import TINY, prompt_file, run_cli, temp_files, train_tiny_run
from sdsbridge.outputs.report import VIEWER_VERSION, viewer_script


def finished_run(tmp_path, capsys, *overrides):
    """A TINY run with mesh, video and report written by `train`; (run dir, train's stdout)."""
    runs = tmp_path / "runs"
    code, out, err = run_cli(["train", prompt_file(tmp_path), f"log.runs_dir={runs}", "train.steps=4",
                              *overrides, *TINY, "log.val_every=2"], capsys)
    assert code == 0, err
    return runs / "bridge-a-red-torus", out


def test_train_writes_the_report_and_prints_its_path(tmp_path, capsys):
    run, out = finished_run(tmp_path, capsys)
    page = run / "report.html"
    assert f"report: {page}" in out and page.is_file()
    text = page.read_text()
    assert text.count('<model-viewer id="model-0"') == 1 and 'src="data:model/gltf-binary;base64,' in text
    assert text.count('<video class="turntable" src="data:video/mp4;base64,') == 1
    assert text.count('<img class="val"') == 2 and text.count('<img class="plot"') == 4
    assert "a red torus" in text and "guidance_scale" in text  # prompt and resolved config
    assert f"@google/model-viewer {VIEWER_VERSION}" in text and viewer_script()[:2000] in text  # viewer inline
    # nothing fetched: every src / href outside the inline viewer is a data: URI
    outside = text.replace(viewer_script(), "")
    assert not re.search(r'(src|href)="(?!data:)', outside)
    assert not temp_files(run)


def test_several_runs_side_by_side_and_escaped_prompts(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = train_tiny_run(tmp_path / "a", "train.steps=2", "export.report=false")
    train_tiny_run(tmp_path / "b", "train.steps=2", "export.report=false", "method=sds",
                   "prompt=a red torus <b>bold</b>")
    (second,) = (tmp_path / "b" / "runs").iterdir()
    capsys.readouterr()
    assert not (first / "report.html").exists()
    code, out, err = run_cli(["report", first, second], capsys)
    assert code == 0, err
    page = first.parent / f"compare-{first.name}-vs-{second.name}.html"
    assert out.strip() == f"report: {page}"
    text = page.read_text()
    assert "--columns:2" in text and text.count('<section class="run">') == 2
    assert "&lt;b&gt;bold&lt;/b&gt;" in text and "<b>bold</b>" not in text
    assert text.count("no mesh/*.glb") == 2  # trained without export: the page says how to make one
    code, out, err = run_cli(["report", first, "--out", tmp_path / "mine.html"], capsys)
    assert code == 0 and (tmp_path / "mine.html").is_file()


def test_not_a_run_is_one_line_error(tmp_path, capsys):
    code, _, err = run_cli(["report", tmp_path / "missing"], capsys)
    assert code == 2 and err.strip() == f"error: report: {tmp_path / 'missing'}: no such run directory"
    code, _, err = run_cli(["report", tmp_path], capsys)
    assert code == 2 and "not a run directory (no config.yaml)" in err and "Traceback" not in err
    (tmp_path / "config.yaml").write_text("a: [1\n")
    code, _, err = run_cli(["report", tmp_path], capsys)
    assert code == 2 and "config.yaml: line 2: malformed YAML" in err and len(err.strip().splitlines()) == 1


def test_a_run_shorter_than_the_validation_interval_validates_its_last_step(tmp_path, capsys):
    runs = tmp_path / "runs"
    code, _, err = run_cli(["train", prompt_file(tmp_path), f"log.runs_dir={runs}", "train.steps=3", "export.mesh=false",
                            "export.video=false", *TINY, "log.val_every=1000"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (runs / "bridge-a-red-torus" / "validation").iterdir()) == ["step-0000003.png"]


def test_a_reference_run_shows_the_true_shape_beside_its_validation_grid(tmp_path, capsys):
    import base64

    import imageio.v3 as iio

    run, _ = finished_run(tmp_path, capsys)
    page = (run / "report.html").read_text()
    assert "ground truth: the true torus, same views" in page
    uri = re.search(r'<img class="truth" src="data:image/png;base64,([^"]+)"', page).group(1)
    truth = iio.imread(base64.b64decode(uri))
    grid = iio.imread(sorted((run / "validation").glob("step-*.png"))[-1])
    assert truth.shape[0] == grid.shape[0] and truth.shape[1] * 3 == grid.shape[1]  # rows align with the grid's views
    red = truth[..., 0].astype(int) - truth[..., 2].astype(int)
    assert (red > 100).mean() > 0.02  # a red torus is in the picture

    other = tmp_path / "sd-run"
    other.mkdir()
    (other / "config.yaml").write_text("prompt: a cat\nmethod: sds\n")
    from sdsbridge.outputs.report import write_report

    assert "ground truth" not in write_report([other]).read_text()
