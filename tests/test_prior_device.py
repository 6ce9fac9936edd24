"""`prior.device`: the diffusion prior on another device than the scene. Renders go to the prior's device,
the gradient comes back to the scene's parameters. On the CPU the plumbing and the checks; the two-device
steps need CUDA (gpu-marked)."""

import pytest
import torch

from cli_helpers import TINY, one_error_line, prompt_file, run_cli
from sdsbridge.config.loader import load_config
from sdsbridge.common.errors import UserError
from sdsbridge.distill.methods import make_method
from sdsbridge.priors import load_prior
from sdsbridge.distill.prompts import PromptEmbeddings
from sdsbridge.training.step import build_scene
from sdsbridge.training.loop import prior_device
from sdsbridge.training.step import build_optimizer, scene_step

SMALL = ["scene.n_levels=4", "scene.log2_hashmap_size=12", "scene.base_resolution=8", "scene.mlp_width=16",
         "scene.background_width=8", "render.resolution=16", "render.num_samples=16", "prior.kind=reference",
         "prior.resolution=16", "prior.views_per_label=8", "prompt=a red torus", "method=sds"]


def one_step(scene_device: str, prior_device_name, *extra):
    """One 3D step with the scene on ``scene_device`` and the prior on ``prior.device``: (views, result, scene,
    parameters before the step)."""
    config = load_config(None, [*SMALL, f"device={scene_device}", f"prior.device={prior_device_name or 'null'}",
                                *extra])
    torch.manual_seed(0)
    device = torch.device(scene_device)
    scene = build_scene(config, device)
    prior = load_prior(config.prior, prior_device(config, device), config.cameras)
    method = make_method(config.method, config.guidance, prior)
    prompts = PromptEmbeddings(prior, method.role_texts(config.prompt), config.guidance.view_dependent)
    optimizer = build_optimizer(scene, method, config.train)
    before = [p.detach().clone() for p in scene.field.parameters()]
    views, result = scene_step(scene, method, prompts, optimizer, config, 0)
    return views, result, scene, before


def test_prior_device_defaults_to_the_scene_device_and_is_validated():
    assert load_config(None, ["prompt=x"]).prior.device is None
    assert load_config(None, ["prompt=x", "prior.device=cuda:1"]).prior.device == "cuda:1"
    with pytest.raises(UserError, match=r"prior.device: 'gpu1' is not one of null \(the scene's device\)"):
        load_config(None, ["prompt=x", "prior.device=gpu1"])


def test_an_explicit_cpu_prior_trains_exactly_like_the_default():
    views_a, result_a, scene_a, _ = one_step("cpu", None)
    views_b, result_b, scene_b, before = one_step("cpu", "cpu")
    assert views_b.latents.device.type == "cpu" and torch.equal(views_a.latents, views_b.latents)
    assert result_a.loss.item() == result_b.loss.item()
    after = list(scene_b.field.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(before, after))  # the gradient reached the scene
    assert all(torch.equal(p, q) for p, q in zip(scene_a.field.parameters(), after))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_a_cuda_prior_without_cuda_is_a_one_line_error_before_the_run_directory(tmp_path, capsys):
    runs = tmp_path / "runs"
    code, _, err = run_cli(["train", prompt_file(tmp_path), f"log.runs_dir={runs}", "prior.device=cuda:1", *TINY],
                           capsys)
    assert code == 2 and "torch sees no CUDA device" in one_error_line(err)
    assert not runs.exists()


def check_two_devices(scene_device: str, prior_device_name: str, *extra):
    views, result, scene, before = one_step(scene_device, prior_device_name, *extra)
    assert views.latents.device == torch.device(prior_device_name)  # renders went to the prior
    assert result.finite and result.loss.device == torch.device(scene_device)  # the loss is summed at the scene
    for q in scene.field.parameters():
        assert q.device == torch.device(scene_device)
        assert q.grad is None or q.grad.device == q.device
    assert any(not torch.equal(p, q) for p, q in zip(before, scene.field.parameters()))  # gradients came back


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_scene_on_the_cpu_prior_on_a_gpu():
    check_two_devices("cpu", "cuda:0")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_scene_on_one_gpu_prior_on_another():
    check_two_devices("cuda:0", "cuda:1")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_stable_diffusion_prior_on_a_second_gpu(tiny_sd_dir):
    check_two_devices("cuda:0", "cuda:1", "prior.kind=stable-diffusion", f"prior.model={tiny_sd_dir}",
                      "prior.dtype=fp32", "prompt=a pineapple")
