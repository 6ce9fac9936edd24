"""Random-initialised Stable Diffusion pipelines, built offline: a fixture for tests and benchmarks.

Tests, CPU demos and GPU benchmarks need a real diffusers pipeline (the same loader, the same UNet/VAE/CLIP
code paths as Stable Diffusion) without downloading weights. This module is not a prior (the pipelines it
writes load through ``priors.stable_diffusion`` like any downloaded model) and nothing in training imports
it; it is part of the installed package, beside ``priors/`` rather than in ``tests/``, because the
scripts (``make_random_sd.py``, ``bench_train_step.py``) and users' own offline tests import it from an
installed copy, and its ``sd21-base`` architecture reads the JSON configs shipped in ``sdsbridge/assets``.

``build_random_pipeline`` creates one from component configs with random weights, a byte-level CLIP
tokenizer vocabulary written by us (no merges: every character is a token) and SD's noise schedule, then
``save_pretrained``s it so that ``StableDiffusionPipeline.from_pretrained(out_dir)`` loads it like any
downloaded model.

Architectures (``ARCHITECTURES``, one dict of component configs per name):

- ``"tiny"``: a few-MB pipeline, 64x64 images, latents [4, 32, 32], 514-token vocabulary.
- ``"sd21-base"``: exactly Stable Diffusion 2.1-base (UNet 865.9 M, VAE 83.7 M, OpenCLIP-H text encoder
  340.4 M parameters; 512x512 images, latents [4, 64, 64], text embeddings [77, 1024]), read from the JSON
  configs in ``assets/sd21-base/`` (see ``assets/README.txt``). ~5.2 GB in fp32, 2.6 GB in fp16.
- ``"small"``: sd21-base with every width shrunk (same block types, depths, attention layout, 49408-token
  vocabulary and 77-token context; 64x64 images, latents [4, 8, 8]): the sd21-base code path in a few MB.

The real CLIP BPE vocabulary cannot be downloaded, so the 49408-id tokenizers hold the 512 byte-level
symbols at ids 0-511 (as CLIP does), unused filler tokens up to id 49405 and <|startoftext|> /
<|endoftext|> at 49406 / 49407 (CLIP's ids). Token ids are in range, but the text means nothing to the
(random) text encoder, and a prompt is cut after 75 non-space characters.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional

import torch
from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdsbridge.common.errors import UserError
from sdsbridge.common.package_files import package_folder

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

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
SCHEDULERS = {"DDIMScheduler": DDIMScheduler, "PNDMScheduler": PNDMScheduler}
"""Scheduler classes a config's "_class_name" may name (DDIM when it names none); both hold the same
training schedule, the only part the prior uses."""


def assets_dir() -> Path:
    """The package's assets (sdsbridge/assets when installed, assets/ in a checkout)."""
    return package_folder("assets")


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


SD21_BASE = read_architecture(assets_dir() / "sd21-base")
"""Stable Diffusion 2.1-base (stabilityai/stable-diffusion-2-1-base), from assets/sd21-base/*.json."""

ARCHITECTURES: dict[str, dict] = {"tiny": TINY, "sd21-base": SD21_BASE, "small": scaled_down(SD21_BASE)}
"""Component configs by architecture name: keys 'unet', 'vae', 'text_encoder', 'tokenizer', 'scheduler'."""


def byte_symbols() -> list[str]:
    """The 256 byte-level BPE symbols (GPT-2 / CLIP convention), in byte order.

    Printable Latin-1 bytes stand for themselves; the other bytes are mapped to code points 256, 257, ...
    so that every byte has a visible, non-whitespace symbol.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1))
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    symbols, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def byte_vocabulary(vocab_size: Optional[int] = None) -> list[str]:
    """Token strings by id: the 256 byte symbols, the same with the end-of-word marker "</w>", then (when
    ``vocab_size`` is given) filler tokens "<|unused_<id>|>" that no text maps to, then <|startoftext|> and
    <|endoftext|> as the last two ids. ``vocab_size`` None gives the 514 entries without fillers."""
    symbols = byte_symbols()
    words = symbols + [s + "</w>" for s in symbols]
    n = len(words) + 2 if vocab_size is None else vocab_size
    if n < len(words) + 2:
        raise ValueError(f"vocab_size {vocab_size} is below the {len(words) + 2} byte-level tokens")
    fillers = [f"<|unused_{i}|>" for i in range(len(words), n - 2)]
    return words + fillers + [BOS_TOKEN, EOS_TOKEN]


def write_byte_tokenizer(folder: Path, model_max_length: int, vocab_size: Optional[int] = None) -> CLIPTokenizer:
    """Write a CLIP tokenizer with the vocabulary ``byte_vocabulary(vocab_size)`` and no merges (every
    character is one token; a word's last character carries "</w>"); load it back and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = byte_vocabulary(vocab_size)
    (folder / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(vocab)}, ensure_ascii=False),
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=model_max_length)


def architecture(arch: str) -> dict:
    """The component configs of ``arch``; UserError for an unknown name."""
    if arch not in ARCHITECTURES:
        raise UserError(f"random pipeline arch '{arch}' is not one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def _arguments(config: dict) -> dict:
    """A component config without its metadata keys (those starting with "_")."""
    return {key: value for key, value in config.items() if not key.startswith("_")}


def text_encoder_config(configs: dict) -> CLIPTextConfig:
    """The CLIP text config of an architecture. Its vocabulary size is the architecture's (514 byte-level
    tokens when unset) and its special token ids are our tokenizer's: bos = vocab - 2, eos = pad = vocab - 1
    (the ids CLIP's tokenizer uses; SD 2.1's stored config carries stale ids 0/2/1)."""
    args = _arguments(configs["text_encoder"])
    vocab_size = args.pop("vocab_size", len(byte_vocabulary()))
    return CLIPTextConfig(vocab_size=vocab_size, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                          pad_token_id=vocab_size - 1, **args)


def build_models(configs: dict) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """(UNet, VAE, text encoder) of an architecture, freshly initialised from torch's global RNG (or
    weightless when built under ``with torch.device("meta")``)."""
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


def random_pipeline(arch: str, seed: int, tokenizer_dir: Path) -> StableDiffusionPipeline:
    """The pipeline of ``arch`` in memory (fp32, CPU) with weights drawn from ``seed``; its tokenizer files
    are written to ``tokenizer_dir``. The caller's torch RNG state is left as it was."""
    configs = architecture(arch)
    text_config = text_encoder_config(configs)
    tokenizer = write_byte_tokenizer(tokenizer_dir, configs["tokenizer"]["model_max_length"],
                                     vocab_size=configs["text_encoder"].get("vocab_size"))
    assert len(tokenizer) == text_config.vocab_size, (len(tokenizer), text_config.vocab_size)
    assert tokenizer.convert_tokens_to_ids(EOS_TOKEN) == text_config.eos_token_id

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        unet, vae, text_encoder = build_models(configs)
    finally:
        torch.random.set_rng_state(generator_state)  # leave the caller's RNG stream untouched

    scheduler_config = configs["scheduler"]
    scheduler_class = SCHEDULERS[scheduler_config.get("_class_name", "DDIMScheduler")]
    scheduler = scheduler_class.from_config(scheduler_config)  # keeps keys the class does not take, as loading does
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_random_pipeline(out_dir: str | Path, arch: str = "tiny", seed: int = 0,
                          dtype: torch.dtype = torch.float32) -> Path:
    """Build a Stable Diffusion pipeline with random weights (seeded) and save it to ``out_dir``.

    Returns ``out_dir`` as a Path; ``StableDiffusionPipeline.from_pretrained(out_dir)`` loads it. The
    weights are deterministic for a given ``arch`` and ``seed`` (drawn in fp32, stored as ``dtype``,
    safetensors). Needs no network.
    """
    out_dir = Path(out_dir)
    pipe = random_pipeline(arch, seed, out_dir / "tokenizer")
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.save_pretrained(str(out_dir))
    return out_dir
