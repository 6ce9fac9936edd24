"""The training loop: short CPU runs on both priors, exact resume, stage switch, NaN handling."""

import json

import pytest
import torch

from sdsbridge.scene.cameras import orbit_cameras
from sdsbridge.training.checkpoint import find_checkpoint, load_checkpoint
from sdsbridge.config.loader import load_config
from sdsbridge.distill.methods import DistillResult, Method
from sdsbridge.distill.methods.sds import SDS
from sdsbridge.training.checkpoint import load_trained_scene
from sdsbridge.training.loop import TrainingDiverged, train

SMALL = [
    "scene.n_levels=4", "scene.log2_hashmap_size=12", "scene.base_resolution=8", "scene.mlp_width=16",
    "scene.background_width=8", "render.resolution=16", "render.num_samples=16", "log.val_every=0",
    "log.log_every=1", "log.checkpoint_every=1000", "export.mesh=false", "export.video=false",
    "device=cpu",
]
REFERENCE = ["prior.kind=reference", "prior.resolution=16", "prior.views_per_label=8", "prompt=a red torus"]


def small_config(tmp_path, *extra):
    path = tmp_path / "prompt.yaml"
    path.write_text("prompt: a red torus\n")
    return load_config(path, [*SMALL, *REFERENCE, f"log.runs_dir={tmp_path / 'runs'}", *extra])


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_short_run_on_reference_prior_writes_outputs(tmp_path):
    config = small_config(tmp_path, "train.steps=4", "log.val_every=2", "train.batch_size=2")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    result = train(config, run_dir, torch.device("cpu"), show_progress=False)
    assert result.step == 4 and not result.interrupted
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert (run_dir / "config.yaml").is_file()
    assert sorted(p.name for p in (run_dir / "validation").iterdir()) == ["step-0000002.png", "step-0000004.png"]
    assert load_checkpoint(find_checkpoint(run_dir))["step"] == 4
    scene, loaded, step = load_trained_scene(run_dir, torch.device("cpu"))
    assert step == 4 and loaded.prompt == "a red torus"


def test_short_run_on_tiny_stable_diffusion(tmp_path, tiny_sd_dir):
    config = small_config(tmp_path, "train.steps=2", "prior.kind=stable-diffusion", f"prior.model={tiny_sd_dir}",
                          "prompt=a DSLR photo of a pineapple")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    train(config, run_dir, torch.device("cpu"), show_progress=False)
    metrics = read_metrics(run_dir)
    assert len(metrics) == 2 and all(m["loss"] == m["loss"] for m in metrics)


def parameters_of(run_dir):
    checkpoint = load_checkpoint(find_checkpoint(run_dir))
    return {**{f"field.{k}": v for k, v in checkpoint["field"].items()},
            **{f"background.{k}": v for k, v in checkpoint["background"].items()}}, checkpoint


@pytest.mark.parametrize("regulariser", [(), ("loss.normal_smoothness=1.0",)], ids=["recipe", "normal-smoothness"])
def test_resume_is_bit_identical_and_switches_stage(tmp_path, regulariser):
    # stage two starts at step 3: the resumed half must switch even though it starts past the boundary
    extra = ("guidance.stage2_start_step=3", "train.batch_size=2", *regulariser)
    straight = tmp_path / "straight"
    straight.mkdir()
    train(small_config(tmp_path, "train.steps=6", *extra), straight, torch.device("cpu"), show_progress=False)

    halves = tmp_path / "halves"
    halves.mkdir()
    train(small_config(tmp_path, "train.steps=4", *extra), halves, torch.device("cpu"), show_progress=False)
    config = small_config(tmp_path, "train.steps=6", *extra)
    train(config, halves, torch.device("cpu"), checkpoint=load_checkpoint(find_checkpoint(halves)), show_progress=False)

    expected, expected_ckpt = parameters_of(straight)
    got, got_ckpt = parameters_of(halves)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert got_ckpt["step"] == 6
    stages = {m["step"]: m["stage"] for m in read_metrics(halves)}
    assert stages == {1: 1, 2: 1, 3: 1, 4: 2, 5: 2, 6: 2}
    assert [m["loss"] for m in read_metrics(halves)] == [m["loss"] for m in read_metrics(straight)]
    assert all(("loss_normal_smoothness" in m) == bool(regulariser) for m in read_metrics(halves))


def test_non_finite_steps_are_skipped_then_abort(tmp_path, monkeypatch):
    real = Method.distill
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        result = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] in (2, 3):  # two bad steps, then fine
            return DistillResult(result.loss * float("nan"), result.grad_norm, result.t, result.stage)
        return result

    monkeypatch.setattr(Method, "distill", flaky)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    result = train(small_config(tmp_path, "train.steps=5"), run_dir, torch.device("cpu"), show_progress=False)
    assert result.bad_steps == 2 and result.step == 5
    assert read_metrics(run_dir)[-1]["bad_steps"] == 2

    def always_nan(*args, **kwargs):
        result = real(*args, **kwargs)
        return DistillResult(result.loss * float("inf"), result.grad_norm, result.t, result.stage)

    monkeypatch.setattr(Method, "distill", always_nan)
    run_dir = tmp_path / "diverged"
    run_dir.mkdir()
    with pytest.raises(TrainingDiverged, match="3 non-finite steps in a row"):
        train(small_config(tmp_path, "train.steps=10", "train.max_bad_steps=3"), run_dir, torch.device("cpu"),
              show_progress=False)
    checkpoint = load_checkpoint(find_checkpoint(run_dir))
    assert checkpoint["step"] == 2
    assert all(torch.isfinite(v).all() for v in checkpoint["field"].values() if v.is_floating_point())


def test_sigterm_checkpoints_and_stops_cleanly(tmp_path, monkeypatch):
    import os
    import signal

    real = Method.distill
    calls = {"n": 0}

    def signalling(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # as if `kill` arrived during step 3
        return real(*args, **kwargs)

    monkeypatch.setattr(Method, "distill", signalling)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    result = train(small_config(tmp_path, "train.steps=10"), run_dir, torch.device("cpu"), show_progress=False)
    assert result.interrupted and result.step == 3
    assert load_checkpoint(find_checkpoint(run_dir))["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is not None  # handlers restored, process still alive


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fifty_steps_on_cuda_with_stable_diffusion(tmp_path, tiny_sd_dir):
    config = small_config(tmp_path, "train.steps=50", "prior.kind=stable-diffusion", f"prior.model={tiny_sd_dir}",
                          "prompt=a DSLR photo of a pineapple", "device=cuda", "render.resolution=32",
                          "guidance.stage2_start_step=25", "train.batch_size=2")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    result = train(config, run_dir, torch.device("cuda"), show_progress=False)
    metrics = read_metrics(run_dir)
    assert result.step == 50 and result.bad_steps == 0
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert {m["stage"] for m in metrics} == {1, 2}
    loaded, _, _ = load_trained_scene(run_dir, torch.device("cuda"))
    cameras = orbit_cameras(config.cameras, 2).to("cuda")
    with torch.no_grad():  # the checkpoint holds the scene as trained (field, background, occupancy grid)
        expected = result.scene.renderer.render(cameras, 16, 16).rgb
        assert torch.allclose(loaded.renderer.render(cameras, 16, 16).rgb, expected, atol=1e-5)


def test_resume_from_an_older_checkpoint_keeps_each_step_once_in_metrics(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = small_config(tmp_path, "train.steps=4", "log.checkpoint_every=2", "log.keep_checkpoints=5")
    train(config, run_dir, torch.device("cpu"), show_progress=False)
    train(config, run_dir, torch.device("cpu"), checkpoint=load_checkpoint(run_dir / "checkpoints" / "step-0000002.ckpt"),
          show_progress=False)
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4]


class MethodWithItsOwnParameter(SDS):
    """A stand-in for a method that trains something of its own (as VSD trains a LoRA): one parameter in its
    own optimizer group, a loss of its own, and a step counter that goes into checkpoints."""

    name = "sds"

    def __init__(self, settings, prior):
        super().__init__(settings, prior)
        self.offset = torch.nn.Parameter(torch.ones(3))
        self.calls = 0

    def distill(self, latents, conditions, step, cameras=None, generator=None):
        self.calls += 1
        result = super().distill(latents, conditions, step, cameras, generator)
        result.extra_losses["offset"] = self.offset.square().sum()
        return result

    def param_groups(self):
        return [{"params": [self.offset], "lr": 0.1, "name": "offset"}]

    def state_dict(self):
        return {"calls": self.calls, "offset": self.offset.detach().clone()}

    def load_state_dict(self, state):
        self.calls = state["calls"]
        with torch.no_grad():
            self.offset.copy_(state["offset"])


def test_a_method_with_parameters_and_state_trains_and_resumes_without_trainer_changes(tmp_path, monkeypatch):
    import sdsbridge.training.loop as train_module

    made = []
    monkeypatch.setattr(train_module, "make_method",
                        lambda name, settings, prior: made.append(MethodWithItsOwnParameter(settings, prior)) or made[-1])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    train(small_config(tmp_path, "train.steps=3", "method=sds"), run_dir, torch.device("cpu"), show_progress=False)
    checkpoint = load_checkpoint(find_checkpoint(run_dir))
    assert checkpoint["method"]["calls"] == 3
    assert [g["name"] for g in checkpoint["optimizer"]["param_groups"]][-1] == "offset"
    assert torch.all(checkpoint["method"]["offset"] < 1.0)  # AdamW pulled it towards 0 at lr 0.1
    assert all("loss_offset" in row for row in read_metrics(run_dir))

    train(small_config(tmp_path, "train.steps=5", "method=sds"), run_dir, torch.device("cpu"), checkpoint=checkpoint,
          show_progress=False)
    assert made[-1].calls == 5  # restored at 3, then two more steps
    assert load_checkpoint(find_checkpoint(run_dir))["method"]["calls"] == 5


def test_checkpoints_of_methods_without_state(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    train(small_config(tmp_path, "train.steps=2"), run_dir, torch.device("cpu"), show_progress=False)
    checkpoint = load_checkpoint(find_checkpoint(run_dir))
    assert checkpoint["method"] == {}
    del checkpoint["method"]  # as written before methods had state: still resumes
    train(small_config(tmp_path, "train.steps=3"), run_dir, torch.device("cpu"), checkpoint=checkpoint,
          show_progress=False)
    assert load_checkpoint(find_checkpoint(run_dir))["step"] == 3


def test_a_kernel_compile_during_a_step_is_kept_out_of_the_eta(tmp_path, monkeypatch):
    import sdsbridge.training.loop as train_module
    from sdsbridge.scene.nerf import encoding as encoding_module

    unpaused = []

    class RecordingBar(train_module.tqdm):
        def unpause(self):
            unpaused.append(self.n)
            super().unpause()

    real_step = train_module.scene_step

    def step_that_compiles_at_step_two(scene, method, prompts, optimizer, config, step, *args, **kwargs):
        if step == 2:
            monkeypatch.setattr(encoding_module, "compile_seconds", encoding_module.compile_seconds + 15.0)
        return real_step(scene, method, prompts, optimizer, config, step, *args, **kwargs)

    monkeypatch.setattr(train_module, "tqdm", RecordingBar)
    monkeypatch.setattr(train_module, "scene_step", step_that_compiles_at_step_two)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    train(small_config(tmp_path, "train.steps=4"), run_dir, torch.device("cpu"), show_progress=True)
    assert unpaused == [2]  # once, right after the compiling step, before it is counted


def test_finite_check_finds_any_bad_gradient_and_no_false_alarm_from_overflow():
    from sdsbridge.training.step import loss_and_grads_finite

    def params(*grads):
        out = []
        for g in grads:
            p = torch.nn.Parameter(torch.zeros_like(g))
            p.grad = g
            out.append(p)
        return out

    loss, big = torch.tensor(1.0), torch.full((4,), 3e38)  # big.sum() overflows to inf in float32
    assert loss_and_grads_finite(loss, params(torch.randn(1000), torch.randn(7)))
    assert loss_and_grads_finite(loss, params(big, torch.randn(7)))
    for bad in (float("nan"), float("inf"), -float("inf")):
        grad = torch.randn(1000)
        grad[417] = bad
        assert not loss_and_grads_finite(loss, params(torch.randn(7), grad))
        assert not loss_and_grads_finite(torch.tensor(bad), params(torch.randn(7)))
    assert not loss_and_grads_finite(loss, params(torch.tensor([float("inf"), -float("inf")])))  # sum: nan


def test_long_cpu_runs_compile_the_hash_grid_from_the_first_step(tmp_path, monkeypatch):
    from sdsbridge.training import loop as train_module
    from sdsbridge.scene.nerf.encoding import COMPILE_AFTER_POINTS

    monkeypatch.setenv("SDSBRIDGE_COMPILE", "0")  # the setting is what is checked here, not a compile
    monkeypatch.setattr(train_module, "LONG_RUN_STEPS", 3)
    thresholds = {}
    for steps in (2, 3):
        run_dir = tmp_path / f"run{steps}"
        run_dir.mkdir()
        result = train(small_config(tmp_path, f"train.steps={steps}"), run_dir, torch.device("cpu"), show_progress=False)
        thresholds[steps] = result.scene.field.encoding.compile_after_points
    assert thresholds == {2: COMPILE_AFTER_POINTS, 3: 0}
