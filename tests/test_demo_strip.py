"""scripts/demo_strip.py: the README picture puts evenly spaced turntable frames side by side, rgb above the second panel (the demo's normals)."""

from __future__ import annotations

import numpy as np

from scripts_loader import load_script


def test_strip_takes_evenly_spaced_frames_rgb_above_the_second_panel():
    size = 4
    frames = []
    for i in range(12):  # turntable frames: [H, 2H (+1 padding column), 3], rgb | normal
        frame = np.zeros((size, 2 * size + 1, 3), np.uint8)
        frame[:, :size] = i
        frame[:, size:] = 100 + i
        frames.append(frame)
    image = load_script("demo_strip").strip(frames, 3)
    assert image.shape == (2 * size, 3 * size, 3)
    assert [int(image[0, k * size, 0]) for k in range(3)] == [0, 4, 8]
    assert [int(image[size, k * size, 0]) for k in range(3)] == [100, 104, 108]
