"""scripts/demo_strip.py: the README picture puts evenly spaced turntable frames side by side, rgb above depth."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "demo_strip.py"


def load_script():
    spec = importlib.util.spec_from_file_location("demo_strip", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_strip_takes_evenly_spaced_frames_rgb_above_depth():
    size = 4
    frames = []
    for i in range(12):  # turntable frames: [H, 2H (+1 padding column), 3], rgb | depth
        frame = np.zeros((size, 2 * size + 1, 3), np.uint8)
        frame[:, :size] = i
        frame[:, size:] = 100 + i
        frames.append(frame)
    image = load_script().strip(frames, 3)
    assert image.shape == (2 * size, 3 * size, 3)
    assert [int(image[0, k * size, 0]) for k in range(3)] == [0, 4, 8]
    assert [int(image[size, k * size, 0]) for k in range(3)] == [100, 104, 108]
