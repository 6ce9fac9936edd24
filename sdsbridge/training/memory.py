"""Peak GPU memory of one training step, forecast without a GPU.

The prior's part is *traced*: the real step code (``prior.encode_images``, the method's ``distill`` with every
UNet call, VSD's LoRA loss, the backward) runs on the meta device with the model built from its configs, and
``LiveBytes`` follows every tensor storage it creates and frees (rounded up to 512 bytes, the CUDA caching
allocator's smallest block), so the peak is that of the real computation's live tensors. Attention is traced as
CUDA's fused kernels (flash attention in half precision, memory-efficient in fp32: O(tokens) memory, never the
tokens x tokens matrix). The scene's part is counted: parameters, gradients and AdamW's two moments, plus the
render's activations as bytes per sample (the field's forward and backward traced on the CPU) times the rays
times ``samples_per_ray`` (an assumption: the occupancy grid decides the real count as training goes).

To the live bytes each used GPU adds the CUDA context (``CUDA_CONTEXT_BYTES``) and the allocator's slack
(``ALLOCATOR_SLACK``); both are estimates of what ``nvidia-smi`` shows beyond ``max_memory_allocated``.
"""

from __future__ import annotations

import math
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from sdsbridge.scene.cameras import sample_cameras
from sdsbridge.config.schema import Config
from sdsbridge.scene.nerf.encoding import CHUNK_POINTS
from sdsbridge.distill.prompts import PERP_NEG_ROLES

GIB = 2 ** 30
BLOCK_BYTES = 512
"""CUDA's caching allocator rounds every block up to a multiple of this."""
CUDA_CONTEXT_BYTES = 600 * 2 ** 20
"""The CUDA context, cuBLAS and cuDNN handles on each GPU a run uses (not in ``max_memory_allocated``)."""
ALLOCATOR_SLACK = 1.15
"""Reserved over allocated bytes in the caching allocator (fragmentation; an estimate)."""
DEFAULT_SAMPLES_PER_RAY = 32
"""Field samples per ray, averaged over all rays of a render, assumed for its activations: the occupancy grid
decides the real count (rays that miss the object take none; the grid starts full and prunes as it learns)."""
CUDA_ENCODING_CHUNK = CHUNK_POINTS["cuda"]
"""Points per hash-grid kernel call on CUDA: the backward's temporaries are per chunk."""


class LiveBytes(TorchDispatchMode):
    """Within: ``current`` and ``peak`` bytes of the tensor storages created inside (outputs of every op,
    autograd's included), each rounded up to ``BLOCK_BYTES``; a storage counts until it is freed."""

    def __init__(self):
        super().__init__()
        self.live = WeakIdKeyDictionary()
        self.current = 0
        self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self.live:
            return
        nbytes = -(-storage.nbytes() // BLOCK_BYTES) * BLOCK_BYTES
        self.live[storage] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._track(value)
        return out


class FusedAttention(TorchFunctionMode):
    """Within: ``F.scaled_dot_product_attention`` (what diffusers' attention processors call) runs as the fused
    kernel CUDA picks: flash attention for fp16/bf16, memory-efficient attention for fp32."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and kwargs.get("attn_mask") is None and len(args) == 3:
            q, k, v = args
            scale = kwargs.get("scale")
            if q.dtype in (torch.float16, torch.bfloat16):
                return torch.ops.aten._scaled_dot_product_flash_attention(
                    q, k, v, 0.0, kwargs.get("is_causal", False), False, scale=scale)[0]
            return torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, None, q.requires_grad, 0.0, kwargs.get("is_causal", False), scale=scale)[0]
        return func(*args, **kwargs)


@dataclass
class Architecture:
    """The component configs of a Stable Diffusion pipeline (``priors.architectures.ARCHITECTURES`` shape)."""

    unet: dict
    vae: dict
    text_encoder: dict
    tokens: int = 77
    """The tokenizer's max length: text embeddings are [tokens, cross-attention width]."""


@dataclass
class MemoryForecast:
    """Bytes of one training step, by part and by device ('scene': the scene's GPU, 'prior': the prior's)."""

    parts: dict[str, int]
    """Live bytes by part: prior weights, LoRA state, prior activations (traced peak), scene state, render."""
    devices: dict[str, list[str]] = field(default_factory=dict)
    """'scene' / 'prior' -> the parts on that GPU ('prior' only when it is another device)."""

    offloaded_weights: int = 0
    """GPU bytes of the prior's weights under sequential CPU offload (its largest layer at a time)."""

    def with_options(self, cpu_offload: bool = False, prior_on_other_gpu: bool = False) -> "MemoryForecast":
        """The same step with ``prior.cpu_offload`` (weights on the CPU, one layer at a time on the GPU) and / or
        ``prior.device`` on a second GPU (the prior's parts there, the scene's on the first)."""
        parts = dict(self.parts)
        if cpu_offload:
            parts["prior weights"] = self.offloaded_weights
        prior_parts = ["prior weights", "method state", "prior activations"]
        scene_parts = [p for p in parts if p not in prior_parts]
        devices = {"scene": scene_parts, "prior": prior_parts} if prior_on_other_gpu else {"scene": list(parts)}
        return MemoryForecast(parts, devices, self.offloaded_weights)

    def gpu_bytes(self, which: str = "scene") -> int:
        """What ``which``'s GPU holds at the step's peak: its parts' live bytes with the allocator's slack, plus
        the CUDA context."""
        live = sum(self.parts[p] for p in self.devices.get(which, []))
        return int(live * ALLOCATOR_SLACK) + CUDA_CONTEXT_BYTES if live else 0

    def peak_gpu_bytes(self) -> int:
        """The largest of the GPUs' forecasts: what must fit on one card."""
        return max(self.gpu_bytes(w) for w in self.devices)


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def largest_leaf_bytes(module: torch.nn.Module) -> int:
    """Weights of the largest leaf module: what sequential CPU offload holds on the GPU at a time."""
    return max((parameter_bytes(m) for m in module.modules() if not list(m.children())), default=0)


def cast_floats(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module.to(dtype)`` for its floating-point parameters and buffers, without diffusers' warning about
    modules to keep in fp32 (it names none for SD, and ``load_pipeline`` casts the same way)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(dtype)
    return module


def meta_prior(arch: Architecture, dtype: torch.dtype):
    """A ``StableDiffusionPrior`` whose UNet, VAE and text encoder are built on the meta device (no weights)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdsbridge.priors.stable_diffusion import StableDiffusionPrior
    from sdsbridge.priors.architectures import SD_SCHEDULER

    args = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    with torch.device("meta"):
        unet = cast_floats(UNet2DConditionModel(**args(arch.unet)), dtype)
        vae = cast_floats(AutoencoderKL(**args(arch.vae)), dtype)
        text = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in args(arch.text_encoder).items()
                                               if k not in ("architectures", "torch_dtype", "transformers_version")}))
    pipe = SimpleNamespace(tokenizer=SimpleNamespace(model_max_length=arch.tokens), text_encoder=text, vae=vae,
                           unet=unet, scheduler=DDIMScheduler(**SD_SCHEDULER),
                           vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1))
    return StableDiffusionPrior(pipe, torch.device("meta"), dtype)


def trace_prior_step(prior, config: Config, resolution: int, steps: list[int],
                     fused_attention: bool = True) -> tuple[int, int]:
    """(peak live bytes of the prior's part of a step, bytes of the method's own trainable state: parameters,
    gradients and AdamW's moments), the peak over ``steps`` (one per stage). Renders of ``resolution`` pixels
    go through ``encode_images``, the method's ``distill`` and the backward, on the prior's device (meta for a
    forecast; a real prior gives the same figure for its real tensors). ``fused_attention``: trace attention as
    CUDA's fused kernels (``FusedAttention``)."""
    from sdsbridge.distill.methods import make_method

    method = make_method(config.method, config.guidance, prior)
    own = sum(p.numel() * 4 for group in method.param_groups() for p in group["params"]) * 4  # fp32: p, grad, 2 moments
    n = config.train.batch_size
    length = prior.unet.config.cross_attention_dim
    tokens = prior.tokenizer.model_max_length
    device = prior.device
    perp_neg = config.guidance.perp_neg and config.guidance.view_dependent
    roles = list(method.role_texts("x")) + (list(PERP_NEG_ROLES) if perp_neg else [])
    cameras = sample_cameras(config.cameras, n).to(device)
    peak = 0
    for step in steps:
        with LiveBytes() as live, (FusedAttention() if fused_attention else nullcontext()):
            conditions = {role: torch.zeros(n, tokens, length, device=device) for role in roles}
            if perp_neg:
                conditions["perp_neg_weights"] = torch.zeros(n, 2, device=device)
            images = torch.zeros(n, 3, resolution, resolution, device=device, requires_grad=True)
            latents = prior.encode_images(images)
            result = method.distill(latents, conditions, step, cameras)
            loss = result.loss + sum(result.extra_losses.values())
            loss.backward()
            del loss, result, latents, images, conditions
        peak = max(peak, live.peak)
    return peak, own


def render_bytes(config: Config, backend: str = "torch") -> tuple[float, float]:
    """(bytes the render keeps per field sample until the backward, transient bytes per point of one
    encoding chunk's backward), from the field's forward and backward traced on the CPU over 8192 points with
    the PyTorch hash grid (eager kernels, as on CUDA), plus the compositing's per-sample tensors (~16 floats).
    ``backend`` 'tcnn': the encoding's share is replaced by what tinycudann's autograd function keeps (its fp32
    input and output; its backward's scratch is its own, outside torch's allocator)."""
    from sdsbridge.scene.nerf.field import NeRFField

    with torch.random.fork_rng(devices=[]):  # the field's random init leaves the caller's RNG as it was
        field_ = NeRFField(replace(config.scene, backend="torch"), device=torch.device("cpu"))
    field_.encoding.compile_after_points = math.inf  # eager kernels: what the trace can see
    points = torch.rand(8192, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    n, grads = points.shape[0], sum(p.numel() * 4 for p in field_.parameters())
    with LiveBytes() as live:
        density, rgb = field_(points)
        total = density.sum() + rgb.sum()
        saved = live.current
        total.backward()
    transient = max(0.0, live.peak - saved - grads) / n
    if backend == "tcnn":
        with LiveBytes() as encoding:
            features = field_.encoding(points * 0.5 + 0.5)
            kept = encoding.current - features.numel() * 4  # the output itself stays in the field's count
        del features
        width = field_.encoding.n_output_dims
        saved = saved - kept + n * (3 * 4 + width * 4)
        transient = width * 4
    return saved / n + 16 * 4, transient


def scene_state_bytes(config: Config) -> int:
    """Scene parameters, gradients and AdamW's two moments (fp32)."""
    from sdsbridge.scene.nerf.background import Background
    from sdsbridge.scene.nerf.field import NeRFField

    with torch.device("meta"):
        field_ = NeRFField(replace(config.scene, backend="torch"), device=torch.device("meta"))
        background = Background(config.scene)
    return 4 * (parameter_bytes(field_) + parameter_bytes(background))


def forecast_step(config: Config, arch: Architecture, dtype: torch.dtype, resolution: int,
                  samples_per_ray: int = DEFAULT_SAMPLES_PER_RAY, render_costs: Optional[tuple[float, float]] = None,
                  prior=None, backend: str = "torch") -> MemoryForecast:
    """The memory of one 3D training step of ``config`` (its method, guidance, batch size) with renders of
    ``resolution`` pixels and a prior of architecture ``arch`` in ``dtype``, on one GPU; ``MemoryForecast.with_options``
    gives the split for ``prior.device`` and ``prior.cpu_offload``. ``prior``: a ``meta_prior`` to reuse;
    ``render_costs``: ``render_bytes(config, backend)`` to reuse; ``backend``: the hash grid's ('torch' | 'tcnn')."""
    prior = prior or meta_prior(arch, dtype)
    from sdsbridge.distill.methods import method_class

    steps = [0] + [step for step in method_class(config.method).stage_starts(config.guidance) if step]
    activations, own = trace_prior_step(prior, config, resolution, steps)
    models = (prior.unet, prior.vae, prior.text_encoder)
    saved, transient = render_costs or render_bytes(config, backend)
    samples = config.train.batch_size * resolution * resolution * samples_per_ray
    render = int(saved * samples + transient * min(samples, CUDA_ENCODING_CHUNK))
    parts = {"prior weights": sum(parameter_bytes(m) for m in models), "method state": own,
             "prior activations": activations, "scene state": scene_state_bytes(config), "render": render}
    return MemoryForecast(parts, {"scene": list(parts)}, max(largest_leaf_bytes(m) for m in models))


def random_architecture(name: str = "sd21-base") -> Architecture:
    """The architecture of one of ``priors.architectures.ARCHITECTURES`` (by default Stable Diffusion 2.1-base's)."""
    from sdsbridge.priors.architectures import ARCHITECTURES

    configs = ARCHITECTURES[name]
    return Architecture(configs["unet"], configs["vae"], configs["text_encoder"],
                        configs["tokenizer"]["model_max_length"])


def forecast_dtype(name: str) -> torch.dtype:
    """The UNet and VAE dtype ``prior.dtype`` = ``name`` gives on a GPU (what a forecast is for)."""
    from sdsbridge.priors.stable_diffusion import resolve_dtype

    return resolve_dtype(name, torch.device("cuda"))


def architecture_of(model: str) -> Optional[Architecture]:
    """The UNet, VAE and text-encoder configs of a diffusers pipeline (local folder, or a hub id in the local
    cache) without loading weights; None when they cannot be read."""
    import json
    from pathlib import Path

    from huggingface_hub import hf_hub_download

    def read(subfolder: str, name: str) -> dict:
        local = Path(model).expanduser() / subfolder / name
        if local.is_file():
            return json.loads(local.read_text(encoding="utf-8"))
        return json.loads(Path(hf_hub_download(model, name, subfolder=subfolder, local_files_only=True)).read_text())

    try:
        tokens = read("tokenizer", "tokenizer_config.json").get("model_max_length", 77)
        return Architecture(read("unet", "config.json"), read("vae", "config.json"),
                            read("text_encoder", "config.json"), int(tokens) if int(tokens) < 10 ** 6 else 77)
    except Exception:  # any reason (not cached, not a pipeline): the forecast is advice, the loader reports errors
        return None


def largest_render(config: Config) -> int:
    """The largest training render resolution of the run (its schedule at the first and the last step)."""
    from sdsbridge.common.schedules import schedule_value

    return int(round(max(schedule_value(config.render.resolution, s) for s in (0, max(0, config.train.steps - 1)))))


def check_fit(config: Config, arch: Architecture, gpu_bytes: int, gpus: int = 1,
              backend: str = "torch") -> tuple[MemoryForecast, Optional[str]]:
    """The forecast of ``config``'s largest step with its own ``prior.cpu_offload`` / ``prior.device``, and None
    when its peak fits ``gpu_bytes`` (the GPU's memory), else a one-line warning with the forecast and the
    settings that would fit (``prior.cpu_offload``, ``prior.device`` on a second GPU when ``gpus`` > 1, a smaller
    last render resolution). ``backend``: the hash grid's."""
    dtype = forecast_dtype(config.prior.dtype)
    resolution = largest_render(config)
    costs = render_bytes(config, backend)
    prior = meta_prior(arch, dtype)
    options_of_run = dict(cpu_offload=config.prior.cpu_offload, prior_on_other_gpu=config.prior.device is not None)
    base = forecast_step(config, arch, dtype, resolution, render_costs=costs, prior=prior)
    current = base.with_options(**options_of_run)
    if current.peak_gpu_bytes() <= gpu_bytes:
        return current, None
    options = []
    if not config.prior.cpu_offload:
        options.append(("prior.cpu_offload=true (slower)", base.with_options(cpu_offload=True)))
    if gpus > 1 and config.prior.device is None:
        options.append(("prior.device=cuda:1", base.with_options(prior_on_other_gpu=True)))
    for smaller in (384, 256, 128):
        if smaller < resolution:
            forecast = forecast_step(config, arch, dtype, smaller, render_costs=costs, prior=prior)
            options.append((f"a last render.resolution stage of {smaller}", forecast.with_options(**options_of_run)))
    fitting = [f"{name} (~{f.peak_gpu_bytes() / GIB:.0f} GiB)" for name, f in options if f.peak_gpu_bytes() <= gpu_bytes]
    advice = "; would fit: " + ", ".join(fitting) if fitting else "; no single setting brings it under (try several)"
    return current, (f"this run's {resolution}px steps are forecast to need ~{current.peak_gpu_bytes() / GIB:.0f} GiB "
                     f"of GPU memory, the GPU has {gpu_bytes / GIB:.0f} GiB{advice} (forecast: {backend} hash grid, "
                     f"{DEFAULT_SAMPLES_PER_RAY} samples/ray assumed; `python scripts/bench_train_step.py --estimate` "
                     "prints the table)")
