"""Random-initialised Stable Diffusion pipelines, built offline.

Tests and CPU demos need a real diffusers pipeline (the same loader, the same UNet/VAE/CLIP code paths as
Stable Diffusion) without downloading weights. ``build_random_pipeline`` creates one from component
configs with random weights, a byte-level CLIP tokenizer vocabulary written by us (no merges: every
character is a token), and SD's noise schedule, then ``save_pretrained``s it so that
``StableDiffusionPipeline.from_pretrained(out_dir)`` loads it like any downloaded model.

Architectures live in ``ARCHITECTURES``: one dict of component configs per name. Only ``"tiny"`` exists
now; a full-size ``"sd21-base"`` can be added by reading the components' JSON configs from assets/ into
the same dict shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdsbridge.errors import UserError

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

ARCHITECTURES: dict[str, dict] = {"tiny": TINY}
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


def write_byte_tokenizer(folder: Path, model_max_length: int) -> CLIPTokenizer:
    """Write a CLIP tokenizer whose vocabulary is the 256 byte symbols, each also with the end-of-word
    marker "</w>", plus the start/end tokens (514 entries), and no merges; load it back and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + [BOS_TOKEN, EOS_TOKEN]
    (folder / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(vocab)}, ensure_ascii=False),
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=model_max_length)


def architecture(arch: str) -> dict:
    """The component configs of ``arch``; UserError for an unknown name."""
    if arch not in ARCHITECTURES:
        raise UserError(f"random pipeline arch '{arch}' is not one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def build_random_pipeline(out_dir: str | Path, arch: str = "tiny", seed: int = 0) -> Path:
    """Build a Stable Diffusion pipeline with random weights (seeded) and save it to ``out_dir``.

    Returns ``out_dir`` as a Path; ``StableDiffusionPipeline.from_pretrained(out_dir)`` loads it. The
    weights are deterministic for a given ``arch`` and ``seed`` (fp32, safetensors). Needs no network.
    """
    out_dir = Path(out_dir)
    configs = architecture(arch)
    tokenizer = write_byte_tokenizer(out_dir / "tokenizer", configs["tokenizer"]["model_max_length"])

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.convert_tokens_to_ids(BOS_TOKEN),
            eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
            pad_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
            **configs["text_encoder"],
        )
        text_encoder = CLIPTextModel(text_config)
    finally:
        torch.random.set_rng_state(generator_state)  # leave the caller's RNG stream untouched

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**configs["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out_dir))
    return out_dir
