"""Random pipelines with the SD 2.1-base architecture: the shipped configs, parameter counts (meta device,
no weights), the 49408-id byte-level tokenizer and scripts/make_random_sd.py on the small variant."""

import json

import pytest
import torch
from diffusers import PNDMScheduler

from sdsbridge.priors.stable_diffusion import StableDiffusionSettings
from sdsbridge.priors import load_prior
from sdsbridge.priors.denoiser import sd_alphas_cumprod
from sdsbridge.common.package_files import package_folder
from sdsbridge.priors.architectures import (ARCHITECTURES, BYTE_VOCABULARY_SIZE, COMPONENTS,
                                            architecture_parameter_counts, read_architecture)
from sdsbridge.testing.random_sd import BOS_TOKEN, EOS_TOKEN, byte_vocabulary

from scripts_loader import load_script


# Published sizes of SD 2.1-base's models (millions of parameters).
SD21_BASE_MILLIONS = {"unet": 865.9, "vae": 83.7, "text_encoder": 340.4}


def make_random_sd():
    return load_script("make_random_sd")


def test_sd21_base_assets_hold_the_exact_architecture():
    folder = package_folder("assets") / "sd21-base"
    assert sorted(p.stem for p in folder.glob("*.json")) == sorted(COMPONENTS)
    configs = read_architecture(folder)
    assert configs == ARCHITECTURES["sd21-base"]
    unet, vae, text, scheduler = configs["unet"], configs["vae"], configs["text_encoder"], configs["scheduler"]
    assert unet["block_out_channels"] == [320, 640, 1280, 1280]
    assert unet["attention_head_dim"] == [5, 10, 20, 20]
    assert unet["cross_attention_dim"] == 1024 and unet["use_linear_projection"] is True
    assert unet["upcast_attention"] is False and unet["layers_per_block"] == 2
    assert unet["sample_size"] == 64 and unet["in_channels"] == unet["out_channels"] == 4
    assert unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert unet["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert vae["block_out_channels"] == [128, 256, 512, 512] and vae["latent_channels"] == 4
    assert vae["layers_per_block"] == 2 and vae["scaling_factor"] == 0.18215
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (1024, 23, 16)
    assert (text["intermediate_size"], text["hidden_act"], text["max_position_embeddings"]) == (4096, "gelu", 77)
    assert (text["vocab_size"], text["projection_dim"]) == (49408, 512)
    assert configs["tokenizer"]["model_max_length"] == 77
    assert scheduler["_class_name"] == "PNDMScheduler" and scheduler["prediction_type"] == "epsilon"
    assert (scheduler["beta_schedule"], scheduler["beta_start"], scheduler["beta_end"]) == ("scaled_linear", 0.00085, 0.012)
    assert scheduler["num_train_timesteps"] == 1000


def test_sd21_base_parameter_counts_on_the_meta_device():
    counts = architecture_parameter_counts("sd21-base")
    for name, millions in SD21_BASE_MILLIONS.items():
        assert abs(counts[name] / 1e6 - millions) / millions < 0.005, (name, counts[name])
    # exact numbers measured here (diffusers 0.42, transformers 5.24), also those of the published weights
    assert counts == {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}


def test_small_is_sd21_base_with_narrow_layers():
    big, small = ARCHITECTURES["sd21-base"], ARCHITECTURES["small"]
    for key in ("down_block_types", "up_block_types", "layers_per_block", "use_linear_projection", "upcast_attention"):
        assert small["unet"][key] == big["unet"][key]
    assert len(small["unet"]["attention_head_dim"]) == 4 and len(small["vae"]["block_out_channels"]) == 4
    assert small["text_encoder"]["vocab_size"] == 49408 and small["tokenizer"] == big["tokenizer"]
    assert small["scheduler"] == big["scheduler"]
    assert sum(architecture_parameter_counts("small").values()) < 10_000_000


def test_byte_vocabulary_puts_clip_special_tokens_last():
    vocab = byte_vocabulary(49408)
    assert len(vocab) == len(set(vocab)) == 49408
    assert vocab.index(BOS_TOKEN) == 49406 and vocab.index(EOS_TOKEN) == 49407
    assert vocab[:512] == byte_vocabulary()[:512] and len(byte_vocabulary()) == BYTE_VOCABULARY_SIZE
    with pytest.raises(ValueError):
        byte_vocabulary(100)


def test_make_random_sd_small_loads_through_load_prior_and_predicts(tmp_path, capsys):
    out = tmp_path / "small-sd"
    assert make_random_sd().main(["--arch", "small", str(out), "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "unet" in printed and "text_encoder" in printed and "parameters" in printed

    prior = load_prior(StableDiffusionSettings(model=str(out)), "cpu")
    assert prior.image_resolution == 64 and prior.latent_scaling == 0.18215
    assert len(prior.tokenizer) == 49408 and prior.text_encoder.config.vocab_size == 49408
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "PNDMScheduler"
    scheduler = PNDMScheduler.from_pretrained(out / "scheduler")  # SD's training schedule, as the prior reads it
    assert torch.allclose(scheduler.alphas_cumprod, sd_alphas_cumprod()) and torch.equal(
        prior.alphas_cumprod, scheduler.alphas_cumprod.float())

    ids = prior.tokenizer(["ünïcødé ☃ text, front view", ""]).input_ids
    assert all(0 <= i < 49408 for row in ids for i in row) and ids[1] == [49406, 49407]
    embeddings = prior.embed_prompts(["a red torus, front view", ""])
    assert embeddings.shape == (2, 77, 32) and torch.isfinite(embeddings).all()
    latents = prior.encode_images(torch.rand(1, 3, 64, 64))
    assert latents.shape == (1, 4, 8, 8)
    eps = prior.predict_noise(latents.repeat(2, 1, 1, 1), torch.tensor([20, 900]), embeddings)
    assert eps.shape == (2, 4, 8, 8) and torch.isfinite(eps).all()


def test_make_random_sd_refuses_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "weights.bin").write_bytes(b"real weights")
    assert make_random_sd().main(["--arch", "tiny", str(tmp_path)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]

