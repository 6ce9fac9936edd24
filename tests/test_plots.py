"""plots/: one PNG per quantity from metrics.jsonl, the stage-two switch marked, written by `train`."""

import json

import numpy as np
from PIL import Image

from cli_helpers import train_tiny_run
from sdsbridge.training.plots import PLOTS, read_metrics, write_plots


def write_metrics(folder, steps=100):
    rows = [{"step": s, "loss": 10.0 / s, "stage": 1 if s < 60 else 2, "t": 900 - 5 * s, "grad_norm": 1.0 + s,
             "resolution": 32 if s < 50 else 64, "loss_guidance": 9.0 / s, "loss_sparsity": 0.5} for s in range(1, steps)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 10')  # torn line
    return rows


def red_pixels(path):
    """Pixels of matplotlib's tab:red (the stage-two line and label)."""
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((np.abs(image - [214, 39, 40]).sum(-1) < 60).sum())


def test_one_png_per_quantity_with_the_stage_two_switch(tmp_path):
    rows = write_metrics(tmp_path)
    assert read_metrics(tmp_path / "metrics.jsonl") == rows  # the torn last line is skipped
    paths = write_plots(tmp_path, stage2=60)
    assert [p.name for p in paths] == [f"{name}.png" for name in PLOTS]
    for path in paths:
        assert Image.open(path).size == (640, 320)
        assert red_pixels(path) > 100
    unmarked = tmp_path / "unmarked"
    unmarked.mkdir()
    write_metrics(unmarked)
    for path in write_plots(unmarked, stage2=None)[1:]:  # single-series plots hold no red without the switch
        assert red_pixels(path) == 0
    assert write_plots(tmp_path / "nothing") == []


def test_train_writes_plots(tmp_path):
    run = train_tiny_run(tmp_path, "train.steps=3")
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(f"{name}.png" for name in PLOTS)
