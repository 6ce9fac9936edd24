"""VSD's learned source: a LoRA adapter on the Stable Diffusion prior's own UNet, conditioned on the camera.

One UNet stays in memory. The adapter is added with diffusers' PEFT integration (``unet.add_adapter`` with a
``peft.LoraConfig``) and is *off* except inside ``LoraSource.active()``, so the prior's ``predict_noise`` (the
pretrained branch) is the pretrained UNet exactly. Inside ``active()`` the adapter is on and a camera embedding
(diffusers' ``TimestepEmbedding``: the flattened 4 x 4 camera-to-world matrix -> the time-embedding width) is the
UNet's class embedding, which the UNet adds to its time embedding: threestudio's and the official 2D code's
construction (there on a second UNet), with the LoRA on the attention projections to_q, to_k, to_v, to_out.0.

The LoRA weights and the camera embedding are float32 whatever the UNet's dtype (peft casts the activations
into the adapter's dtype and the result back), so an fp16 UNet trains an fp32 adapter; with fp16 the LoRA's
loss is scaled in the backward (``FP16_LOSS_SCALE``) so that its small gradients survive the UNet.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from sdsbridge.common.errors import UserError
from sdsbridge.priors.base import noisy_latents

ADAPTER_NAME = "sdsbridge_vsd"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CAMERA_FEATURES = 16
"""Camera condition: the camera-to-world matrix [4, 4], flattened (threestudio's 'extrinsics')."""


def camera_condition(c2w: Optional[torch.Tensor], n: int, device: torch.device) -> torch.Tensor:
    """[N, 16] float32 camera condition from [N, 4, 4] camera-to-world matrices; zeros when ``c2w`` is None
    (the 2D mode, as the official 2D code)."""
    if c2w is None:
        return torch.zeros(n, CAMERA_FEATURES, device=device)
    return c2w.reshape(n, CAMERA_FEATURES).to(device, torch.float32)


FP16_LOSS_SCALE = 2.0 ** 12
"""With an fp16 UNet the LoRA's loss is scaled by this in the backward and its gradients unscaled (a power of two:
exact): the mean-squared loss gives each output element a gradient of ~1e-4, part of which underflows in fp16 on
its way back through the UNet (measured on the tiny UNet at 32x32 latents: LoRA gradients 1.4% off fp32's in the
median, 8% at worst; 0.36% and 1.0% with the scale). fp32 and bf16 (fp32's exponent range) need none and are left bit for bit as they were."""


def place_adapter(unet, device: torch.device) -> None:
    """Our adapter's LoRA weights as float32 on ``device``. peft creates them in the base layer's dtype and on its
    device, which under ``prior.cpu_offload`` (accelerate's hooks) is the meta device: they would hold no values
    and fail in the backward. Values are drawn later (``LoraSource.reset``)."""
    from peft.tuners.lora import LoraLayer

    for module in unet.modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
            for layers in (module.lora_A, module.lora_B):
                layer = layers[ADAPTER_NAME]
                if layer.weight.is_meta:
                    layer.to_empty(device=device)
                layer.to(device=device, dtype=torch.float32)


class _ScaledBackward(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class LoraSource:
    """A rank-``rank`` LoRA on ``prior.unet`` plus a camera embedding; see the module docstring.

    Adding it to a UNet that already carries it (a second method on the same loaded prior, e.g. a batch of
    prompts) re-initialises that adapter instead of adding another.
    """

    def __init__(self, prior, rank: int):
        try:
            from peft import LoraConfig
        except ImportError:
            raise UserError("method: vsd needs the 'peft' package (pip install peft)") from None
        from diffusers.models.embeddings import TimestepEmbedding

        if "adapters" not in prior.capabilities:
            raise UserError("method: vsd needs a prior with a UNet to adapt (prior.kind: stable-diffusion)")
        self.prior = prior
        self.unet = prior.unet
        self.rank = rank
        if ADAPTER_NAME not in (getattr(self.unet, "peft_config", None) or {}):
            config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
            self.unet.add_adapter(config, adapter_name=ADAPTER_NAME)
        place_adapter(self.unet, prior.device)
        self.lora = {name: p for name, p in self.unet.named_parameters() if ".lora_" in name}
        """Parameter name -> LoRA weight (lora_A / lora_B of each adapted projection), float32, trainable."""
        if not self.lora:
            raise UserError("method: vsd: the UNet has no attention projections to adapt (to_q, to_k, to_v, to_out.0)")
        self._switch_off()
        width = self.unet.time_embedding.linear_2.out_features
        self.camera_embedding = TimestepEmbedding(CAMERA_FEATURES, width).to(prior.device)
        self.loss_scale = FP16_LOSS_SCALE if getattr(prior, "dtype", None) == torch.float16 else 1.0
        if self.loss_scale != 1.0:
            for p in self.parameters():  # only the LoRA loss reaches these: unscale what it scaled
                p.register_hook(lambda grad, scale=self.loss_scale: grad / scale)
        self.reset(None)

    # --- parameters ------------------------------------------------------------------------------------
    def parameters(self) -> list[torch.Tensor]:
        """The trainable tensors: LoRA weights (in name order), then the camera embedding's."""
        return [self.lora[name] for name in sorted(self.lora)] + list(self.camera_embedding.parameters())

    @torch.no_grad()
    def reset(self, generator: Optional[torch.Generator]) -> None:
        """Fresh weights: lora_A ~ N(0, 1/rank^2) (peft's 'gaussian'), lora_B = 0 (so the adapter starts as a
        no-op), the camera embedding's linear layers as torch.nn.Linear initialises them; drawn from
        ``generator`` (CPU) or, when None, the global RNG."""
        for name in sorted(self.lora):
            p = self.lora[name]
            if ".lora_A." in name:
                p.copy_(torch.randn(p.shape, generator=generator) / self.rank)
            else:
                p.zero_()
        for layer in (self.camera_embedding.linear_1, self.camera_embedding.linear_2):
            bound = 1.0 / math.sqrt(layer.in_features)  # kaiming_uniform(a=sqrt(5)) and the bias: both U(-b, b)
            layer.weight.copy_((torch.rand(layer.weight.shape, generator=generator) * 2 - 1) * bound)
            layer.bias.copy_((torch.rand(layer.bias.shape, generator=generator) * 2 - 1) * bound)

    def state_dict(self) -> dict:
        """{'lora': name -> tensor, 'camera_embedding': its state dict}, CPU copies."""
        return {"lora": {name: p.detach().cpu().clone() for name, p in self.lora.items()},
                "camera_embedding": {k: v.detach().cpu().clone() for k, v in self.camera_embedding.state_dict().items()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if set(state.get("lora", {})) != set(self.lora):
            raise KeyError("vsd: the checkpoint's LoRA does not match this UNet's (another model or lora_rank?)")
        for name, value in state["lora"].items():
            self.lora[name].copy_(value)
        self.camera_embedding.load_state_dict(state["camera_embedding"])

    # --- the adapted UNet --------------------------------------------------------------------------------
    @contextmanager
    def active(self) -> Iterator[None]:
        """Within: the UNet is the LoRA source (adapter on, camera embedding attached)."""
        self.unet.enable_adapters()
        self.unet.class_embedding = self.camera_embedding
        try:
            yield
        finally:
            self._switch_off()

    def _switch_off(self) -> None:
        """Adapter off, no class embedding. peft's switch also freezes the adapter's weights
        (requires_grad False), which would keep the loss computed inside ``active()`` from reaching them at
        backward time: they stay trainable (the pretrained branch runs without autograd anyway)."""
        self.unet.class_embedding = None
        self.unet.disable_adapters()
        for p in self.lora.values():
            p.requires_grad_(True)

    def predict_noise(self, latents_noisy: torch.Tensor, t: torch.Tensor, conditions: torch.Tensor,
                      camera: torch.Tensor) -> torch.Tensor:
        """eps_lora(x_t; y, c): [M, 4, h, w] noisy latents, [M] timesteps, [M, L, D] text embeddings, [M, 16]
        camera conditions -> [M, 4, h, w] float32 epsilon (autograd as the caller has it)."""
        with self.active():
            output = self.prior.unet_output(latents_noisy, t, conditions, class_labels=camera)
        return self.prior.to_epsilon(output, latents_noisy, t.to(self.prior.device))

    def diffusion_loss(self, latents: torch.Tensor, conditions: torch.Tensor, camera: torch.Tensor,
                       condition_dropout: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The LoRA's training loss on detached latents [N, 4, h, w]: t ~ U{0, ..., T-1}, noise ~ N(0, I), the
        camera condition replaced by zeros with probability ``condition_dropout`` (one draw for the batch), and
        the mean squared error of the adapted UNet's output against its training target (noise, or v for
        v-prediction models). Draws t, noise, then the dropout from ``generator`` (None: the global RNG)."""
        prior = self.prior
        latents = latents.detach()
        n = latents.shape[0]
        device = generator.device if generator is not None else latents.device
        t = torch.randint(0, prior.num_train_timesteps, (n,), generator=generator, device=device).to(prior.device)
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype).to(latents.device)
        keep = torch.rand((), generator=generator, device=device) >= condition_dropout  # no host sync
        camera = camera * keep.to(camera.device, camera.dtype)
        noisy = noisy_latents(latents, t, noise, prior.alphas_cumprod)
        with self.active():
            output = prior.unet_output(noisy, t, conditions, class_labels=camera)
        loss = F.mse_loss(output, prior.diffusion_target(latents, noise, t).float())
        return _ScaledBackward.apply(loss, self.loss_scale) if self.loss_scale != 1.0 else loss
