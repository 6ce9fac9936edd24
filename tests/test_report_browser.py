"""The report page in headless Chromium (Debian's package; CI installs it): the 3D view draws the mesh, the
videos have a duration, and the page logs no errors. Skipped where no chromium binary is found."""

import re

import numpy as np
import pytest
from PIL import Image

from cli_helpers import TINY, prompt_file, run_cli
from sdsbridge.testing.browser import dump_dom, screenshot

pytestmark = pytest.mark.browser

BACKGROUND = np.array([238, 240, 243])
"""The 3D view's background colour (#eef0f3 in report.py's style)."""


def test_report_page_draws_the_mesh_plays_videos_and_logs_no_errors(browser, tmp_path, capsys):
    runs = tmp_path / "runs"
    code, _, err = run_cli(["train", prompt_file(tmp_path), f"log.runs_dir={runs}", "train.steps=4",
                            *TINY, "log.val_every=2"], capsys)
    assert code == 0, err
    page = runs / "bridge-a-red-torus" / "report.html"
    dom = dump_dom(browser, page)
    errors = re.search(r'<pre id="page-errors">(.*?)</pre>', dom, re.S)
    assert errors is not None and errors.group(1).strip() == "", dom[:2000]
    assert 'data-models-loaded="1"' in dom
    durations = [float(d) for d in re.findall(r'data-duration="([^"]+)"', dom)]
    assert len(durations) == 1 and durations[0] > 0  # 3 frames at 30 fps
    left, top, width, height = map(int, re.search(r'data-rect="([^"]+)"', dom).group(1).split(","))
    assert top + height <= 1400  # the whole view is in the screenshot
    shot = np.asarray(Image.open(screenshot(browser, page, tmp_path / "page.png")).convert("RGB")).astype(int)
    view = shot[top + 4:top + height - 4, left + 4:left + width - 4]  # inside the border
    drawn = (np.abs(view - BACKGROUND).sum(-1) > 40).mean()
    assert drawn > 0.01, f"only {drawn:.2%} of the 3D view differs from its background"


def test_a_broken_mesh_shows_as_a_page_error(browser, tmp_path):
    """The checks above can fail: a .glb that does not parse leaves the model unloaded and an error on the page."""
    from sdsbridge.outputs.report import write_report

    run = tmp_path / "run"
    (run / "mesh").mkdir(parents=True)
    (run / "config.yaml").write_text("prompt: a red torus\nmethod: sds\n")
    (run / "mesh" / "mesh-step0000010.glb").write_bytes(b"glTF" + bytes(range(256)) * 8)
    dom = dump_dom(browser, write_report([run]))
    assert 'data-models-loaded="0"' in dom
    errors = re.search(r'<pre id="page-errors">(.*?)</pre>', dom, re.S).group(1)
    assert "model-viewer error" in errors or "console.error" in errors


PROBE = """<script type="module">
const frames = [...document.querySelectorAll('.val')];
const visible = () => frames.filter((f) => getComputedStyle(f).display !== 'none' && f.getBoundingClientRect().height > 0)
  .map((f) => f.dataset.step).join(',');
document.body.dataset.visibleAtLoad = visible();
const slider = document.querySelector('.timeline');
slider.value = '0';
slider.dispatchEvent(new Event('input'));
document.body.dataset.visibleAfterDrag = visible();
document.body.dataset.label = document.querySelector('.val-step').textContent;
</script></body>"""
"""Appended to a report: which validation grids a person sees at load and after dragging the slider to the start."""


def test_the_timeline_shows_one_grid_and_the_slider_moves_it(browser, tmp_path):
    import trimesh

    from sdsbridge.common.media import write_png, write_video
    from sdsbridge.outputs.report import write_report

    run = tmp_path / "run"
    (run / "validation").mkdir(parents=True)
    (run / "config.yaml").write_text("prompt: a red torus\nmethod: sds\nexport: {video_modes: [rgb, depth]}\n")
    for step, value in ((10, 40), (20, 120), (30, 200)):
        write_png(run / "validation" / f"step-{step:07d}.png", np.full((24, 72, 3), value, np.uint8))
    (run / "mesh").mkdir()
    trimesh.creation.box().export(run / "mesh" / "mesh-step0000030.glb")
    write_video(run / "video" / "turntable-step0000030.mp4", (np.full((16, 32, 3), v, np.uint8) for v in (0, 255)), 2)
    page = write_report([run], tmp_path / "report.html")
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("</body>", PROBE))
    dom = dump_dom(browser, probed)
    assert re.search(r'data-visible-at-load="30"', dom), re.findall(r'data-visible[^ >]*', dom)
    assert re.search(r'data-visible-after-drag="10"', dom)
    assert "step 10" in re.search(r'data-label="([^"]*)"', dom).group(1)
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", dom)
    assert any(c.startswith("mesh-step0000030.glb") for c in captions)
    assert any(c.startswith("turntable-step0000030.mp4: rgb | depth") for c in captions)
    assert any(c.startswith("rgb | opacity | depth") for c in captions)
