"""Atomic writers: PNG, mp4 and metrics.jsonl rewrites leave the old file or the whole new one."""

import json

import imageio.v3 as iio
import numpy as np
import pytest

from sdsbridge.common.atomic import atomic_path
from sdsbridge.common.jsonl import append_rows, keep_rows
from sdsbridge.common.media import pad_to_even, video_frame, write_png, write_video


def test_png_round_trip(tmp_path):
    image = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    write_png(tmp_path / "sub" / "a.png", image)
    assert np.array_equal(iio.imread(tmp_path / "sub" / "a.png"), image)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.png"]


def test_video_streams_a_generator_and_a_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "v.mp4"
    frames = [np.full((8, 10, 3), 40 * i, np.uint8) for i in range(3)]
    write_video(path, (f for f in frames), fps=5)
    assert iio.imread(path, index=None).shape == (3, 8, 10, 3)
    before = path.read_bytes()

    def failing():
        yield frames[0]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_video(path, failing(), fps=5)
    with pytest.raises(ValueError, match="at least one frame"):
        write_video(path, [], fps=5)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["v.mp4"]


def test_atomic_path_keeps_the_suffix_for_format_sniffing_writers(tmp_path):
    with atomic_path(tmp_path / "x.mp4") as tmp:
        assert tmp.suffix == ".mp4" and tmp.parent == tmp_path and tmp.name.startswith(".x.")
        tmp.write_bytes(b"data")
    assert (tmp_path / "x.mp4").read_bytes() == b"data"


def test_frames_are_padded_to_even_and_small_images_enlarged():
    assert pad_to_even(np.zeros((5, 6, 3), np.uint8)).shape == (6, 6, 3)
    assert video_frame(np.zeros((9, 9, 3), np.uint8)).shape == (9 * 29 + 1, 9 * 29 + 1, 3)  # 29 x 9 = 261 >= 256


def test_keep_rows_drops_torn_lines_and_rows_to_redo(tmp_path):
    path = tmp_path / "metrics.jsonl"
    keep_rows(path, lambda row: True)
    assert path.read_text() == ""
    append_rows(path, [{"step": 1}, {"step": 2}, {"step": 3}])
    with open(path, "a") as handle:
        handle.write('{"step": 4, "lo')  # torn by a crash
    keep_rows(path, lambda row: row["step"] <= 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"step": 1}, {"step": 2}]
