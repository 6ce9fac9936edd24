"""The full-size Stable Diffusion 2.1-base architecture (random weights, built offline) through one training step of
every method at 64 px renders and one 2D step, on the CPU: every size-dependent part meets the real shapes (LoRA
target modules on the real UNet, the camera embedding's width, attention head sizes, the VAE at 512 px).

Slow (about a minute a step on 2 cores): the pipeline is built once (25 s, 2.5 GB in fp16) and loaded once,
in bfloat16 (the CPU's half type with fast kernels; ``test_half_precision`` covers fp16 on the tiny pipeline)."""

import pytest
import torch

from sdsbridge.config.loader import load_config
from sdsbridge.training.image2d import image_guidance_config, image_optimizer, latent_shape
from sdsbridge.distill.methods import make_method
from sdsbridge.priors import load_prior
from sdsbridge.testing.random_sd import build_random_pipeline
from sdsbridge.training.step import build_scene
from sdsbridge.training.step import build_optimizer, scene_step, train_step

pytestmark = pytest.mark.slow

SCENE = ["scene.n_levels=8", "scene.log2_hashmap_size=14", "render.resolution=64", "render.sampler=stratified",
         "render.num_samples=32", "device=cpu", "prompt=a DSLR photo of a pineapple", "prior.dtype=bf16"]
SD21_TRANSFORMER_BLOCKS = 16
"""BasicTransformerBlocks in SD 2.1's UNet: 2 in each of 3 down blocks, 1 in the middle, 3 in each of 3 up blocks."""


@pytest.fixture(scope="module")
def sd21_dir(tmp_path_factory):
    return build_random_pipeline(tmp_path_factory.mktemp("sd21-base"), arch="sd21-base", seed=0, dtype=torch.float16)


@pytest.fixture(scope="module")
def prior(sd21_dir):
    config = load_config(None, [*SCENE, f"prior.model={sd21_dir}"])
    return load_prior(config.prior, torch.device("cpu"))


def test_the_prior_has_sd21_base_shapes(prior):
    assert prior.image_resolution == 512 and prior.dtype == torch.bfloat16
    assert prior.unet.config.cross_attention_dim == 1024 and prior.unet.config.attention_head_dim == [5, 10, 20, 20]
    embeddings = prior.embed_prompts(["a DSLR photo of a pineapple", ""])
    assert embeddings.shape == (2, 77, 1024) and embeddings.dtype == torch.float32
    images = torch.rand(1, 3, 64, 64, requires_grad=True)  # a 64 px render, resized to 512 for the VAE
    latents = prior.encode_images(images)
    assert latents.shape == (1, 4, 64, 64) and latents.dtype == torch.float32
    latents.sum().backward()
    assert images.grad.shape == images.shape and torch.isfinite(images.grad).all()


@pytest.mark.parametrize("options", [["method=sds"], ["method=bridge", "guidance.stage2_start_step=0"],
                                     ["method=nfsd"], ["method=vsd", "guidance.perp_neg=true"],
                                     ["method=bridge-vsd", "guidance.stage2_start_step=0"]],
                         ids=["sds", "bridge-stage2", "nfsd", "vsd-perp-neg", "bridge-vsd-stage2"])
def test_one_3d_step_of_every_method(prior, sd21_dir, options):
    config = load_config(None, [*SCENE, f"prior.model={sd21_dir}", *options])
    torch.manual_seed(0)
    scene = build_scene(config, torch.device("cpu"))
    method = make_method(config.method, config.guidance, prior)
    prompts = method.prompt_embeddings(config.prompt)
    optimizer = build_optimizer(scene, method, config.train)
    before = [p.detach().clone() for p in scene.field.parameters()]
    scene.train()
    views, result = scene_step(scene, method, prompts, optimizer, config, 0)
    assert views.latents.shape == (1, 4, 64, 64)
    assert result.finite and torch.isfinite(result.loss)
    assert result.distill.stage == (2 if "stage2_start_step=0" in " ".join(options) else 1)
    assert any(not torch.equal(p, q) for p, q in zip(before, scene.field.parameters()))  # the gradient arrived
    if config.method.endswith("vsd"):
        lora = method.source.lora
        adapted = {name.rsplit(".lora_", 1)[0] for name in lora}
        assert len(adapted) == SD21_TRANSFORMER_BLOCKS * 2 * 4  # to_q, to_k, to_v, to_out.0 of attn1 and attn2
        assert {p.dtype for p in lora.values()} == {torch.float32}
        assert method.source.camera_embedding.linear_2.out_features == 1280  # the UNet's time-embedding width
        assert "lora" in result.losses and torch.isfinite(result.losses["lora"])
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in method.source.parameters())
        assert any(torch.count_nonzero(p) for n, p in lora.items() if ".lora_B." in n)  # one AdamW step moved B


def test_one_2d_step_with_the_lora(prior, sd21_dir):
    config = load_config(None, [*SCENE, f"prior.model={sd21_dir}", "method=vsd"])
    method = make_method(config.method, image_guidance_config(config), prior)
    conditions = method.prompt_embeddings(config.prompt).conditions(["front"])
    shape = latent_shape(prior, prior.image_resolution)
    assert shape == (1, 4, 64, 64)
    latents = torch.randn(shape).requires_grad_(True)
    optimizer = image_optimizer(latents, method, config.image)
    before = latents.detach().clone()
    result = train_step(method, optimizer, latents, conditions, 0)
    assert result.finite and not torch.equal(before, latents.detach())
