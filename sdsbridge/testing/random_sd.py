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

Architectures: ``priors/architectures.py`` (``tiny``, ``sd21-base``, ``small``).

The real CLIP BPE vocabulary cannot be downloaded, so the 49408-id tokenizers hold the 512 byte-level
symbols at ids 0-511 (as CLIP does), unused filler tokens up to id 49405 and <|startoftext|> /
<|endoftext|> at 49406 / 49407 (CLIP's ids). Token ids are in range, but the text means nothing to the
(random) text encoder, and a prompt is cut after 75 non-space characters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline
from transformers import CLIPTokenizer

from sdsbridge.priors.architectures import architecture, build_models, text_encoder_config

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

SCHEDULERS = {"DDIMScheduler": DDIMScheduler, "PNDMScheduler": PNDMScheduler}
"""Scheduler classes a config's "_class_name" may name (DDIM when it names none); both hold the same
training schedule, the only part the prior uses."""




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
