"""Stable Diffusion architectures as component configs (no weights): Stable Diffusion 2.1-base read from
``assets/sd21-base/*.json``, a scaled-down copy (``small``) and a few-MB one (``tiny``), and the models built
from them. The memory forecast traces them on the meta device; ``testing/random_sd.py`` builds random-weight
pipelines of them for tests and benchmarks.

Architectures (``ARCHITECTURES``, one dict of component configs per name):

- ``"tiny"``: a few-MB pipeline, 64x64 images, latents [4, 32, 32], 514-token vocabulary.
- ``"sd21-base"``: exactly Stable Diffusion 2.1-base (UNet 865.9 M, VAE 83.7 M, OpenCLIP-H text encoder
  340.4 M parameters; 512x512 images, latents [4, 64, 64], text embeddings [77, 1024]), read from the JSON
  configs in ``assets/sd21-base/`` (see ``assets/README.txt``). ~5.2 GB in fp32, 2.6 GB in fp16.
- ``"small"``: sd21-base with every width shrunk (same block types, depths, attention layout, 49408-token
  vocabulary and 77-token context; 64x64 images, latents [4, 8, 8]): the sd21-base code path in a few MB.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from typing import TYPE_CHECKING

import torch

from sdsbridge.common.errors import UserError
from sdsbridge.common.package_files import package_folder

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

BYTE_VOCABULARY_SIZE = 514
"""Tokens of a byte-level vocabulary without fillers: 256 byte symbols, the same with "</w>", BOS and EOS
(``testing/random_sd.py`` writes such tokenizers)."""

# Stable Diffusion's training noise schedule (v1.x and 2.x): scaled-linear betas, 1000 steps.
SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

# A few-MB pipeline: latents [4, 32, 32] for 64x64 images (VAE scale factor 2), text embeddings [128, 32].
TINY = {
    "unet": {
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": [32, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": [32, 64],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "layers_per_block": 1,
        "norm_num_groups": 32,
        "sample_size": 64,
    },
    "text_encoder": {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 128,
        "layer_norm_eps": 1e-5,
    },
    # Characters are tokens here, so allow longer prompts than CLIP's 77 (the bridge's source prompt is
    # ~100 characters); otherwise view suffixes would be truncated away.
    "tokenizer": {"model_max_length": 128},
    "scheduler": SD_SCHEDULER,
}

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
"""The keys of an architecture dict; sd21-base reads each from ``assets/sd21-base/<key>.json``."""


def read_architecture(folder: Path) -> dict:
    """Component configs from ``folder/<component>.json`` for each of ``COMPONENTS``.

    Keys starting with "_" are metadata ("_class_name"), not constructor arguments.
    """
    configs = {}
    for name in COMPONENTS:
        path = folder / f"{name}.json"
        if not path.is_file():
            raise UserError(f"architecture config {path} is missing (broken install?)")
        configs[name] = json.loads(path.read_text(encoding="utf-8"))
    return configs


def scaled_down(configs: dict) -> dict:
    """A copy of an SD 2.x architecture with every width shrunk to a few MB of weights: the same block
    types, layers per block, per-block attention heads layout, linear projections, text depth pattern,
    vocabulary and context length; UNet latents 8x8 (64x64 images with the 4-block VAE)."""
    small = copy.deepcopy(configs)
    small["unet"].update(block_out_channels=[32, 64, 64, 64], attention_head_dim=[1, 2, 2, 2],
                         cross_attention_dim=32, sample_size=8)
    small["vae"].update(block_out_channels=[32, 32, 64, 64], sample_size=64)
    small["text_encoder"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, projection_dim=32)
    return small


SD21_BASE = read_architecture(package_folder("assets") / "sd21-base")
"""Stable Diffusion 2.1-base (stabilityai/stable-diffusion-2-1-base), from assets/sd21-base/*.json."""

ARCHITECTURES: dict[str, dict] = {"tiny": TINY, "sd21-base": SD21_BASE, "small": scaled_down(SD21_BASE)}
"""Component configs by architecture name: keys 'unet', 'vae', 'text_encoder', 'tokenizer', 'scheduler'."""


def architecture(arch: str) -> dict:
    """The component configs of ``arch``; UserError for an unknown name."""
    if arch not in ARCHITECTURES:
        raise UserError(f"random pipeline arch '{arch}' is not one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def _arguments(config: dict) -> dict:
    """A component config without its metadata keys (those starting with "_")."""
    return {key: value for key, value in config.items() if not key.startswith("_")}


def text_encoder_config(configs: dict) -> CLIPTextConfig:
    """The CLIP text config of an architecture. Its vocabulary size is the architecture's (``BYTE_VOCABULARY_SIZE``
    byte-level tokens when unset) and its special token ids are our tokenizer's: bos = vocab - 2, eos = pad = vocab - 1
    (the ids CLIP's tokenizer uses; SD 2.1's stored config carries stale ids 0/2/1)."""
    from transformers import CLIPTextConfig

    args = _arguments(configs["text_encoder"])
    vocab_size = args.pop("vocab_size", BYTE_VOCABULARY_SIZE)
    return CLIPTextConfig(vocab_size=vocab_size, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                          pad_token_id=vocab_size - 1, **args)


def build_models(configs: dict) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """(UNet, VAE, text encoder) of an architecture, freshly initialised from torch's global RNG (or
    weightless when built under ``with torch.device("meta")``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel(**_arguments(configs["unet"]))
    vae = AutoencoderKL(**_arguments(configs["vae"]))
    text_encoder = CLIPTextModel(text_encoder_config(configs))
    return unet, vae, text_encoder


def parameter_counts(models) -> dict[str, int]:
    """{'unet', 'vae', 'text_encoder'} -> number of parameters, for the three models of ``build_models``
    (or a pipeline's ``unet``, ``vae``, ``text_encoder``)."""
    return {name: sum(p.numel() for p in model.parameters())
            for name, model in zip(("unet", "vae", "text_encoder"), models)}


def architecture_parameter_counts(arch: str) -> dict[str, int]:
    """Parameter counts of ``arch`` without allocating weights (models built on the meta device)."""
    with torch.device("meta"):
        return parameter_counts(build_models(architecture(arch)))
