"""Device placement on the hot path, proven on the CPU.

1. A trap: training steps run with ``torch.set_default_device("meta")``, so any tensor our code (or a library on
   our behalf) creates without an explicit ``device=`` is a meta tensor, and the step fails as soon as it meets
   a real one. Covers render, encode, every method's distillation (Perp-Neg, view blending, the bridge's stage
   two, VSD's LoRA branch), the regularisers, backward, the finiteness check, AdamW, the occupancy refresh, and
   a checkpoint written and restored. On a GPU such a tensor would sit on the CPU and either raise or cost a
   copy every step.
2. Host syncs: the tensor calls that make the host wait for the device (``.item()``, ``bool(tensor)``,
   ``.tolist()``, value-dependent output shapes, ...) are recorded by the function of ours that made them, and
   must be the listed ones; the training loop itself reads tensors only on log steps.
"""

import io

import pytest
import torch

from host_syncs import HostSyncs
from sdsbridge.training.checkpoint import find_checkpoint, load_checkpoint
from sdsbridge.config.loader import load_config
from sdsbridge.distill.methods import make_method
from sdsbridge.priors import load_prior
from sdsbridge.training.step import build_scene
from sdsbridge.training.loop import make_checkpoint, restore_checkpoint, train
from sdsbridge.training.step import build_optimizer, scene_step

SMALL = ["scene.n_levels=4", "scene.log2_hashmap_size=12", "scene.base_resolution=8", "scene.mlp_width=16",
         "scene.background_width=8", "render.resolution=16", "render.num_samples=16", "device=cpu"]
REFERENCE = ["prior.kind=reference", "prior.resolution=16", "prior.views_per_label=8", "prompt=a red torus"]
CASES = {
    "reference-sds": [*REFERENCE, "method=sds"],
    "vsd-perp-neg": ["method=vsd", "guidance.perp_neg=true"],
    "bridge-stage2-view-blend": ["method=bridge", "guidance.stage2_start_step=1", "guidance.view_interpolation=true"],
    "nfsd": ["method=nfsd"],
    "bridge-vsd-stage2": ["method=bridge-vsd", "guidance.stage2_start_step=1"],
}
STEPS = {"reference-sds": 17}  # 17 steps: two occupancy refreshes (steps 0 and 16); the others 2 (stage two from 1)

EXPECTED_SYNCS = {
    "training.step.loss_and_grads_finite": "the step's one intended sync: skip a step whose loss or gradients are not finite",
    "scene.cameras.sample_elevation": "the batch's elevation coin, drawn on the CPU (no device waits)",
    "scene.cameras.cameras_from_angles": "view labels from the angles drawn on the CPU (no device waits)",
    "distill.prompts.azimuth_segments": "view-blend and Perp-Neg weights from the CPU-drawn azimuths (no device waits)",
    "scene.nerf.renderer.render_rays": "which rays hit the scene sphere: packed rays, the count sets the shapes",
    "scene.nerf.marching.march": "the PyTorch occupancy-grid sampler: samples per ray follow the grid (nerfacc's sampling "
                           "syncs the same way)",
    "scene.nerf.occupancy._update": "the occupancy refresh (every 16 steps): which cells to evaluate",
    "priors.reference.predict_noise": "the reference prior (a CPU prior: no device waits)",
}
"""Where a training step may wait for the device, and why. A new entry needs a reason here."""


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def build(case, tiny_sd_dir):
    overrides = CASES[case]
    sd = [] if "prior.kind=reference" in overrides else [f"prior.model={tiny_sd_dir}",
                                                         "prompt=a DSLR photo of a pineapple"]
    config = load_config(None, [*SMALL, *sd, *overrides])
    torch.manual_seed(0)
    device = torch.device("cpu")
    scene = build_scene(config, device)
    prior = load_prior(config.prior, device, config.cameras)
    method = make_method(config.method, config.guidance, prior)
    prompts = method.prompt_embeddings(config.prompt)
    optimizer = build_optimizer(scene, method, config.train)
    scene.train()
    return config, scene, method, prompts, optimizer


class DefaultDeviceTrap:
    """Within: tensors created without a device are meta tensors (no data), which fail when they meet real ones."""

    def __enter__(self):
        torch.set_default_device("meta")

    def __exit__(self, *exc):
        torch.set_default_device(None)


@pytest.mark.parametrize("case", CASES)
def test_training_steps_create_nothing_on_the_default_device(case, tiny_sd_dir):
    config, scene, method, prompts, optimizer = build(case, tiny_sd_dir)
    steps = STEPS.get(case, 2)
    for step in range(steps):
        with DefaultDeviceTrap():
            views, result = scene_step(scene, method, prompts, optimizer, config, step)
        assert result.finite and result.loss.device.type == "cpu"
        assert views.latents.device.type == "cpu" and all(v.device.type == "cpu" for v in views.conditions.values())
    with DefaultDeviceTrap():
        checkpoint = make_checkpoint(scene, method, optimizer, steps, config, 0)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    with DefaultDeviceTrap():
        assert restore_checkpoint(loaded, scene, method, optimizer) == (steps, 0)
        _, result = scene_step(scene, method, prompts, optimizer, config, steps)
    assert result.finite
    assert all(p.device.type == "cpu" for group in optimizer.param_groups for p in group["params"])
    assert all(t.device.type == "cpu" for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor))


def test_the_trap_catches_a_tensor_made_without_a_device():
    """The trap itself: a factory call without ``device=`` mixed with real tensors fails."""
    real = torch.ones(3, device="cpu")
    with DefaultDeviceTrap(), pytest.raises((RuntimeError, NotImplementedError)):
        (real + torch.ones(3)).sum().item()


@pytest.mark.parametrize("case", CASES)
def test_host_syncs_in_a_training_step_are_the_listed_ones(case, tiny_sd_dir):
    config, scene, method, prompts, optimizer = build(case, tiny_sd_dir)
    seen = set()
    for step in range(STEPS.get(case, 2)):
        with HostSyncs() as syncs:
            scene_step(scene, method, prompts, optimizer, config, step)
        seen |= set(syncs.counts)
    assert "training.step.loss_and_grads_finite" in seen  # the recorder sees syncs at all
    unlisted = sorted(seen - set(EXPECTED_SYNCS))
    assert not unlisted, f"new host syncs in the training step (remove them, or list them with a reason): {unlisted}"


def test_the_recorder_sees_each_kind_of_sync():
    x = torch.arange(4.0)
    with HostSyncs() as syncs:
        x.sum().item()
        bool(x.any())
        x.tolist()
        x[x > 1]
        x.nonzero()
    assert sum(syncs.counts.values()) == 5


def test_the_training_loop_reads_tensors_only_on_log_steps(tmp_path):
    """``train`` itself (not the step) waits for the device only in ``metrics_row``, on log steps: with one
    log step in 12, it is read once."""
    config = load_config(None, [*SMALL, *REFERENCE, "method=sds", "train.steps=12", "log.log_every=12",
                                "log.val_every=0", "log.checkpoint_every=12", "export.mesh=false",
                                "export.video=false", f"log.runs_dir={tmp_path}"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with HostSyncs() as syncs:
        train(config, run_dir, torch.device("cpu"), show_progress=False)
    in_loop = {site: n for site, n in syncs.counts.items() if site.startswith("training.loop.")}
    assert set(in_loop) == {"training.loop.metrics_row"}, in_loop
    assert in_loop["training.loop.metrics_row"] == 5  # one row: loss, t, grad_norm and the two loss terms
    assert load_checkpoint(find_checkpoint(run_dir))["step"] == 12
