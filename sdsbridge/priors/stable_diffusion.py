"""Stable Diffusion (through diffusers) as a frozen prior for score distillation.

Only three pieces of the pipeline are used, never its ``__call__``: the CLIP text encoder (prompts ->
embeddings, once per run), the VAE encoder (renders -> latents, differentiable) and the UNet (one
batched noise prediction per step). Hub ids and local folders load through the same
``StableDiffusionPipeline.from_pretrained(id_or_dir, ...)`` call; loading problems a user can cause
(unknown id, no network, a folder that is not a pipeline) become one-line ``UserError``s.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from sdsbridge.priors.hub import (DEFAULT_SD_MODEL, cached_model_status, check_download, download_error, hub_failure,
                                  hub_offline, local_pipeline_folder)
from sdsbridge.common.errors import UserError
from sdsbridge.common.checks import check, check_choice
from sdsbridge.scene.cameras import Cameras
from sdsbridge.priors.base import PriorSettings, register_prior, to_prior_images
from sdsbridge.common.quiet import no_loading_bars
if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

DTYPES = ("auto", "fp16", "bf16", "fp32")
"""What ``prior.dtype`` accepts."""


@dataclass
class StableDiffusionSettings(PriorSettings):
    """A diffusers Stable Diffusion pipeline (``prior.kind: stable-diffusion``)."""

    kind: str = "stable-diffusion"
    model: str = DEFAULT_SD_MODEL
    """Hub id or local directory of a diffusers Stable Diffusion pipeline."""
    dtype: str = "auto"
    """UNet and VAE weights: 'auto' (fp16 on CUDA, fp32 on CPU), 'fp16', 'bf16' or 'fp32'. The CLIP text encoder,
    VSD's LoRA and camera embedding, renders and gradients stay fp32 whatever this says."""
    attention_slicing: bool = False
    """Slice attention to save memory (slower)."""
    channels_last: bool = False
    """Use channels-last memory format for the UNet/VAE."""
    cpu_offload: bool = False
    """Keep idle prior modules on the CPU (saves GPU memory, slower)."""

    def validate(self) -> None:
        check_choice(self.dtype, "prior.dtype", DTYPES)
        check(bool(self.model.strip()), "prior.model", "must not be empty")
        super().validate()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> fp16 on CUDA, fp32 elsewhere; 'fp16' / 'bf16' / 'fp32' as named."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def load_pipeline(model: str, dtype: torch.dtype) -> StableDiffusionPipeline:
    """Load a Stable Diffusion pipeline (hub id or local folder) on the CPU without its safety checker; UNet
    and VAE in ``dtype``, the text encoder in fp32.

    Honours HF_HUB_OFFLINE=1 (no network; only the local cache). Raises UserError when the model cannot
    be found or loaded.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import is_accelerate_available
    from huggingface_hub.errors import GatedRepoError

    folder = local_pipeline_folder(model)
    offline = hub_offline()
    try:
        with no_loading_bars():
            pipe = StableDiffusionPipeline.from_pretrained(
                str(folder) if folder is not None else model,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
                local_files_only=offline,
                low_cpu_mem_usage=is_accelerate_available(),  # (without accelerate it only warns)
            )
    except GatedRepoError:
        raise download_error(model, "gated") from None
    except (OSError, ValueError) as exc:
        if folder is not None:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"prior.model: could not load the pipeline in '{model}': {reason}") from None
        raise download_error(model, "offline" if offline else hub_failure(exc), type(exc).__name__) from None
    # Cast after loading, always: the keyword for the load dtype changed across diffusers versions, and
    # transformers 5 keeps a text encoder in its stored dtype (an fp16 folder would stay fp16 under fp32).
    # The CLIP text encoder stays fp32 whatever ``dtype`` is: the official code embeds prompts in fp32 and
    # casts the embeddings for the fp16 UNet (embeddings are computed once, so this costs nothing per step).
    pipe.unet.to(dtype=dtype)
    pipe.vae.to(dtype=dtype)
    pipe.text_encoder.to(dtype=torch.float32)
    return pipe


@register_prior
class StableDiffusionPrior:
    """A frozen Stable Diffusion model implementing the ``Prior`` protocol (see priors/base.py).

    Latents are [N, 4, R/8, R/8] for SD (R = ``image_resolution``, 512 for SD 2.1-base); conditions are CLIP
    text embeddings [P, L, D] (L = tokenizer max length, D = cross-attention width). Noise predictions are
    always epsilon (v-prediction models are converted) and float32.
    """

    kind = "stable-diffusion"
    Settings = StableDiffusionSettings
    capabilities = frozenset({"text", "adapters"})

    def __init__(self, pipe: StableDiffusionPipeline, device: torch.device, dtype: torch.dtype):
        self.device = torch.device(device)
        self.dtype = dtype
        self.tokenizer = pipe.tokenizer
        self.text_encoder = pipe.text_encoder
        self.vae = pipe.vae
        self.unet = pipe.unet
        for module in (self.text_encoder, self.vae, self.unet):
            module.requires_grad_(False)
            module.eval()

        scheduler = pipe.scheduler
        self.num_train_timesteps: int = scheduler.config.num_train_timesteps
        self.alphas_cumprod: torch.Tensor = scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.prediction_type: str = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise UserError(f"prior.model: prediction type '{self.prediction_type}' is not supported "
                            "(expected epsilon or v_prediction)")
        self.vae_scale_factor: int = pipe.vae_scale_factor
        self.image_resolution: int = self.unet.config.sample_size * self.vae_scale_factor
        self.latent_scaling: float = self.vae.config.scaling_factor

    @classmethod
    def check_prompt(cls, prompt: str) -> None:
        """Any text will do."""

    @classmethod
    def check_machine(cls, cfg: StableDiffusionSettings) -> None:
        """UserError when ``cfg.model`` cannot load, as the load would fail: a local folder that is missing or not a
        complete pipeline, one removed from the hub and not cached (``hub.cached_model_status``), and a hub id that is
        not fully cached and cannot be downloaded now (``hub.check_download``: offline, hub unreachable, no such
        repository, gated). ``config check`` and ``train`` both run it."""
        status, detail = cached_model_status(cfg.model)
        if status == "fail":
            raise UserError(f"prior.model: {detail}")
        if status == "warn":
            check_download(cfg.model)

    @classmethod
    def load(cls, cfg: StableDiffusionSettings, device: torch.device, camera_cfg=None) -> "StableDiffusionPrior":
        """``from_config`` (the registry's loader; Stable Diffusion needs no cameras)."""
        return cls.from_config(cfg, device)

    @classmethod
    def from_config(cls, cfg: StableDiffusionSettings, device: torch.device | str) -> "StableDiffusionPrior":
        """Load ``cfg.model`` in ``cfg.dtype`` on ``device`` and apply the memory options.

        ``cpu_offload`` (CUDA only; ignored on the CPU) uses diffusers' sequential CPU offload, as
        threestudio does: weights stay on the CPU and each layer is moved to the GPU while it runs. Its hooks
        sit on the layers themselves, so they serve our direct ``vae.encode`` / ``unet(...)`` calls.
        ``enable_model_cpu_offload`` does not fit: it offloads a model only when the *next* model of the
        pipeline's own order runs, so the UNet and VAE would both stay on the GPU and the UNet would be
        moved out and back every step. Needs the ``accelerate`` package.
        """
        from diffusers.utils import is_accelerate_available

        device = torch.device(device)
        dtype = resolve_dtype(cfg.dtype, device)
        offload = cfg.cpu_offload and device.type != "cpu"
        if offload and not is_accelerate_available():
            raise UserError("prior.cpu_offload: needs the 'accelerate' package (pip install accelerate), "
                            "or set prior.cpu_offload=false")
        pipe = load_pipeline(cfg.model, dtype)
        if cfg.attention_slicing:
            pipe.enable_attention_slicing()
        if cfg.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        if offload:
            pipe.enable_sequential_cpu_offload(device=device)
        else:
            pipe.to(device)
        return cls(pipe, device, dtype)

    @torch.no_grad()
    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        """P prompts -> [P, L, D] float32 text embeddings (CLIP last hidden state, padded to max length)."""
        max_length = self.tokenizer.model_max_length
        too_long = [p for p, ids in zip(prompts, self.tokenizer(prompts).input_ids) if len(ids) > max_length]
        if too_long:
            warnings.warn(f"prompt longer than {max_length} tokens is truncated: {too_long[0]!r}")
        tokens = self.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                                return_tensors="pt")
        hidden = self.text_encoder(tokens.input_ids.to(self.device))[0]
        return hidden.to(torch.float32)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] images in [0, 1] (any device) -> [N, 4, R/f, R/f] float32 latents on ``device``
        (f = VAE scale factor).

        Moved to ``device`` and resized bilinearly to R = ``image_resolution`` if needed
        (``to_prior_images``), mapped to [-1, 1], encoded by the VAE (a sample of the latent distribution,
        as the official code and threestudio do) and multiplied by the VAE scaling factor. Differentiable
        with respect to ``images``.
        """
        x = to_prior_images(images, self.image_resolution, self.device) * 2.0 - 1.0
        posterior = self.vae.encode(x.to(self.dtype)).latent_dist
        return (posterior.sample() * self.latent_scaling).to(torch.float32)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """[N, 4, h, w] latents -> [N, 3, R, R] float32 images in [0, 1] on ``device``: the VAE decoder on
        latents / scaling factor, mapped from [-1, 1]."""
        x = latents.to(self.device, self.dtype) / self.latent_scaling
        return (self.vae.decode(x).sample.float() / 2.0 + 0.5).clamp(0.0, 1.0)

    @torch.no_grad()
    def predict_noise(self, latents_noisy: torch.Tensor, t: torch.Tensor, conditions: torch.Tensor,
                      cameras: Optional[Cameras] = None) -> torch.Tensor:
        """One batched UNet call: [M, 4, h, w] noisy latents, [M] integer timesteps, [M, L, D] text
        embeddings -> [M, 4, h, w] float32 epsilon. ``cameras`` are ignored."""
        t = t.to(self.device)
        return self.to_epsilon(self.unet_output(latents_noisy, t, conditions), latents_noisy, t)

    def unet_output(self, latents_noisy: torch.Tensor, t: torch.Tensor, conditions: torch.Tensor,
                    class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The UNet's raw prediction (epsilon or v, ``prediction_type``) as float32 [M, 4, h, w], with autograd
        as the caller has it (VSD's LoRA trains through this). ``class_labels`` [M, K] feed the UNet's class
        embedding when one is attached (VSD's camera embedding)."""
        if class_labels is not None:  # fp32 like the camera embedding that reads them (half labels would not run)
            class_labels = class_labels.to(self.device, torch.float32)
        return self.unet(latents_noisy.to(self.device, self.dtype), t.to(self.device),
                         encoder_hidden_states=conditions.to(self.dtype), class_labels=class_labels).sample.float()

    def to_epsilon(self, output: torch.Tensor, latents_noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """A raw UNet output -> epsilon (float32): as it is for epsilon models; for v-prediction
        eps = sqrt(abar) v + sqrt(1 - abar) x_t."""
        if self.prediction_type != "v_prediction":
            return output
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return abar.sqrt() * output + (1 - abar).sqrt() * latents_noisy.to(torch.float32)

    def diffusion_target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained to predict for x_t = sqrt(abar) latents + sqrt(1 - abar) noise: the noise
        (epsilon models) or v = sqrt(abar) noise - sqrt(1 - abar) latents (v-prediction)."""
        if self.prediction_type != "v_prediction":
            return noise
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return abar.sqrt() * noise - (1 - abar).sqrt() * latents
