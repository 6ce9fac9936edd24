"""Checkpoint files: atomic writes, rotation, safe loading, RNG round trip."""

import random

import numpy as np
import pytest
import torch

from sdsbridge.training import checkpoint as ckpt
from sdsbridge.common.errors import UserError


def make(step):
    """A checkpoint with every entry ``--resume`` needs (scene parts tiny)."""
    return {"format": ckpt.FORMAT, "step": step, "field": {"w": torch.full((3,), float(step))}, "background": {},
            "renderer": {}, "optimizer": {"state": {}, "param_groups": []}, "rng": ckpt.capture_rng_state(),
            "config": {"prompt": "x"}, "bad_steps": 0}


def test_save_rotates_and_last_points_to_newest(tmp_path):
    for step in (10, 20, 30, 40):
        ckpt.save_checkpoint(make(step), tmp_path, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["last.ckpt", "step-0000030.ckpt", "step-0000040.ckpt"]
    assert ckpt.load_checkpoint(tmp_path / "last.ckpt")["step"] == 40


def test_interrupted_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    ckpt.save_checkpoint(make(10), tmp_path, keep=3)

    def crash(obj, handle):
        handle.write(b"partial garbage")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(make(20), tmp_path, keep=3)
    monkeypatch.undo()
    assert ckpt.load_checkpoint(tmp_path / "last.ckpt")["step"] == 10
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]


def test_corrupt_and_foreign_files_give_user_errors(tmp_path):
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"\x00not a zip at all")
    with pytest.raises(UserError, match="corrupt.ckpt: not a readable sdsbridge checkpoint"):
        ckpt.load_checkpoint(corrupt)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(UserError, match="not an sdsbridge checkpoint"):
        ckpt.load_checkpoint(foreign)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"format": ckpt.FORMAT, "x": Evil()}, evil)
    with pytest.raises(UserError):
        ckpt.load_checkpoint(evil)
    with pytest.raises(UserError, match="checkpoint not found"):
        ckpt.load_checkpoint(tmp_path / "missing.ckpt")


def test_rng_state_round_trip_through_a_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    ckpt.save_checkpoint(make(1), tmp_path, keep=1)
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    ckpt.restore_rng_state(ckpt.load_checkpoint(tmp_path / "last.ckpt")["rng"])
    assert torch.equal(torch.rand(4), expected[0])
    assert np.array_equal(np.random.rand(4), expected[1])
    assert [random.random() for _ in range(4)] == expected[2]


def test_find_checkpoint_and_run_dir(tmp_path):
    run = tmp_path / "run"
    ckpt.save_checkpoint(make(5), run / "checkpoints", keep=1)
    found = ckpt.find_checkpoint(run)
    assert found == run / "checkpoints" / "last.ckpt"
    assert ckpt.run_dir_of(found) == run.resolve()
    with pytest.raises(UserError, match="no checkpoints/last.ckpt"):
        ckpt.find_checkpoint(tmp_path)


def test_cuda_rng_states_of_more_gpus_restore_on_fewer(monkeypatch, caplog):
    """A run saved on 4 GPUs resumes on a 1-GPU machine: device 0 gets its state back, the rest is dropped
    with a warning (torch.cuda.set_rng_state_all would fail on the missing devices)."""
    from sdsbridge.training.checkpoint import restore_cuda_rng_states

    restored = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((device, state)))
    states = [torch.full((4,), i, dtype=torch.uint8) for i in range(4)]
    with caplog.at_level("WARNING", logger="sdsbridge"):
        restore_cuda_rng_states(states)
    assert [d for d, _ in restored] == [0] and torch.equal(restored[0][1], states[0])
    assert "4 GPUs" in caplog.text
    restored.clear()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    restore_cuda_rng_states(states)
    assert [d for d, _ in restored] == [0, 1, 2, 3]
