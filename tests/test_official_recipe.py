"""Our default 3D setup against the official SDS-Bridge run, value by value.

OFFICIAL holds the official values, each with the file it comes from (repository davidmcall/SDS-Bridge,
folder threestudio-sds-bridge/, and the threestudio modules its config names). Each row is checked
against the config a one-line prompt.yaml resolves to, or against what that config builds (scene,
optimizer, sampler, prompts), so a later change cannot drift from the paper's run silently.
OFFICIAL_VSD_OPTIMIZER does the same for the optimizer groups of VSD's LoRA: in 3D threestudio's ProlificDreamer
run, in 2D the official SDS-Bridge 2D code (2D_experiments/generate.py), whose image latent's group is there too.
Deliberate differences are listed in README ("What still differs from the official run").
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sdsbridge.scene.cameras import sample_cameras
from sdsbridge.distill.methods.bridge import SOURCE_MODIFIER
from sdsbridge.config.loader import load_config
from sdsbridge.scene.nerf.renderer import Renderer, occupancy_grid
from sdsbridge.distill.methods import make_method
from sdsbridge.distill.prompts import role_prompts
from sdsbridge.training.step import build_scene
from sdsbridge.common.schedules import schedule_value
from sdsbridge.training.step import build_optimizer
from sdsbridge.training.image2d import image_guidance_config, image_optimizer
from sdsbridge.priors import load_prior

SDS_BRIDGE_YAML = "configs/sds-bridge.yaml"
GUIDANCE = "guidance/sds_bridge_guidance.py"
PROMPTS = "prompt_processors/stable_diffusion_sds_bridge_prompt_processor.py"
IMPLICIT_VOLUME = "threestudio/models/geometry/implicit_volume.py"
NETWORKS = "threestudio/models/networks.py"
BACKGROUND = "threestudio/models/background/neural_environment_map_background.py"
UNCOND = "threestudio/data/uncond.py"
RENDERER = "threestudio/models/renderers/nerf_volume_renderer.py"
SYSTEM_UTILS = "threestudio/systems/utils.py (AdamW built from the config's args: no weight_decay -> 0.01)"
PROLIFICDREAMER_YAML = "threestudio configs/prolificdreamer.yaml (optimizer: args betas, eps; params guidance lr)"
GENERATE_2D = "2D_experiments/generate.py"
LORA_OPTIMIZER_2D = (f"{GENERATE_2D} (lora_optimizer = AdamW(unet_lora's parameters, lr 3e-4, weight_decay=0): "
                     "torch's default betas and eps)")

# (name, official value, where it comes from, how to read ours from the resolved config `c`)
OFFICIAL = [
    ("steps", 25000, SDS_BRIDGE_YAML, lambda c: c.train.steps),
    ("stage two from step", 20000, SDS_BRIDGE_YAML, lambda c: c.guidance.stage2_start_step),
    ("CFG (stage one)", 100.0, SDS_BRIDGE_YAML, lambda c: c.guidance.guidance_scale),
    ("stage-one w(t) = 1 - abar_t", "sds", GUIDANCE, lambda c: c.guidance.weighting),
    ("stage-two weight", 1.0, SDS_BRIDGE_YAML, lambda c: c.guidance.stage2_scale),
    ("stage-two w(t) (weighting_strategy)", "uniform", SDS_BRIDGE_YAML, lambda c: c.guidance.stage2_weighting),
    ("min_step_percent", 0.02, SDS_BRIDGE_YAML, lambda c: c.guidance.min_step_percent),
    ("max_step_percent", [5000, 0.98, 0.5, 5001], SDS_BRIDGE_YAML, lambda c: c.guidance.max_step_percent),
    ("src_modifier", SOURCE_MODIFIER, SDS_BRIDGE_YAML, lambda c: c.guidance.source_modifier),
    ("tgt_modifier", ".", SDS_BRIDGE_YAML, lambda c: c.guidance.target_modifier),
    ("front/back threshold (deg)", 30.0, SDS_BRIDGE_YAML, lambda c: c.cameras.front_half_angle),
    ("overhead threshold (deg)", 60.0, PROMPTS, lambda c: c.cameras.overhead_elevation),
    ("render resolution", [5000, 64, 512, 5001], SDS_BRIDGE_YAML, lambda c: c.render.resolution),
    ("batch size", 1, SDS_BRIDGE_YAML, lambda c: c.train.batch_size),
    ("camera distance", [1.0, 1.5], SDS_BRIDGE_YAML, lambda c: c.cameras.distance_range),
    ("fovy (deg)", [40.0, 70.0], SDS_BRIDGE_YAML, lambda c: c.cameras.fovy_range),
    ("elevation (deg)", [-10.0, 45.0], SDS_BRIDGE_YAML, lambda c: c.cameras.elevation_range),
    ("azimuth (deg)", [-180.0, 180.0], UNCOND, lambda c: c.cameras.azimuth_range),
    ("eval distance", 1.5, SDS_BRIDGE_YAML, lambda c: c.cameras.eval_distance),
    ("eval fovy (deg)", 70.0, SDS_BRIDGE_YAML, lambda c: c.cameras.eval_fovy),
    ("eval views", 120, UNCOND, lambda c: c.cameras.eval_views),
    ("radius", 1.0, SDS_BRIDGE_YAML, lambda c: c.scene.radius),
    ("hash grid levels", 16, SDS_BRIDGE_YAML, lambda c: c.scene.n_levels),
    ("features per level", 2, SDS_BRIDGE_YAML, lambda c: c.scene.n_features_per_level),
    ("log2 hashmap size", 19, SDS_BRIDGE_YAML, lambda c: c.scene.log2_hashmap_size),
    ("base resolution", 16, SDS_BRIDGE_YAML, lambda c: c.scene.base_resolution),
    ("per-level scale", 1.447269237440378, SDS_BRIDGE_YAML, lambda c: c.scene.per_level_scale),
    ("MLP width (density and feature networks)", 64, IMPLICIT_VOLUME, lambda c: c.scene.mlp_width),
    ("MLP hidden layers", 1, IMPLICIT_VOLUME, lambda c: c.scene.mlp_hidden_layers),
    ("density blob scale", 10.0, SDS_BRIDGE_YAML, lambda c: c.scene.blob_density),
    ("density blob std", 0.5, SDS_BRIDGE_YAML, lambda c: c.scene.blob_radius),
    ("background MLP width", 16, BACKGROUND, lambda c: c.scene.background_width),
    ("background SH degree (tcnn bands)", 3, BACKGROUND, lambda c: c.scene.background_sh_degree),
    ("background random_aug_prob", 0.5, BACKGROUND, lambda c: c.scene.random_background_prob),
    ("samples per ray (cube diagonal)", 512, SDS_BRIDGE_YAML, lambda c: c.render.num_samples_occupancy),
    ("occupancy grid resolution", 32, RENDERER, lambda c: c.render.occupancy_resolution),
    ("occupancy alpha_thre", 0.01, RENDERER, lambda c: c.render.occupancy_alpha_threshold),
    ("occupancy update every n steps (nerfacc default)", 16, RENDERER, lambda c: c.render.occupancy_update_every),
    ("occupancy occ_thre (nerfacc default)", 0.01, RENDERER, lambda c: c.render.occupancy_threshold),
    ("lambda_sparsity", 10.0, SDS_BRIDGE_YAML, lambda c: c.loss.sparsity),
    ("lambda_opaque", [10000, 0.0, 1000.0, 10001], SDS_BRIDGE_YAML, lambda c: c.loss.opacity),
    ("lr geometry.encoding", 0.01, SDS_BRIDGE_YAML, lambda c: c.train.lr_grid),
    ("lr geometry.density_network", 0.001, SDS_BRIDGE_YAML, lambda c: c.train.lr_density),
    ("lr geometry.feature_network", 0.001, SDS_BRIDGE_YAML, lambda c: c.train.lr_color),
    ("lr background", 0.001, SDS_BRIDGE_YAML, lambda c: c.train.lr_background),
    ("AdamW betas", [0.9, 0.99], SDS_BRIDGE_YAML, lambda c: c.train.betas),
    ("AdamW eps", 1e-15, SDS_BRIDGE_YAML, lambda c: c.train.eps),
    ("AdamW weight decay", 0.01, SYSTEM_UTILS, lambda c: c.train.weight_decay),
    ("seed", 0, SDS_BRIDGE_YAML, lambda c: c.train.seed),
]


# (run, optimizer group, AdamW setting, official value, where it comes from). The 'lora' group holds the LoRA and
# the camera embedding, as threestudio's 'guidance' group and the official 2D code's unet_lora parameters do.
OFFICIAL_VSD_OPTIMIZER = [
    ("3D", "lora", "lr", 1e-4, PROLIFICDREAMER_YAML),
    ("3D", "lora", "betas", (0.9, 0.99), PROLIFICDREAMER_YAML),
    ("3D", "lora", "eps", 1e-15, PROLIFICDREAMER_YAML),
    ("3D", "lora", "weight_decay", 0.01, SYSTEM_UTILS),
    ("2D", "lora", "lr", 3e-4, LORA_OPTIMIZER_2D),
    ("2D", "lora", "betas", (0.9, 0.999), LORA_OPTIMIZER_2D),
    ("2D", "lora", "eps", 1e-8, LORA_OPTIMIZER_2D),
    ("2D", "lora", "weight_decay", 0.0, LORA_OPTIMIZER_2D),
    ("2D", "image", "lr", 0.01, f"{GENERATE_2D} (--lr)"),
    ("2D", "image", "betas", (0.9, 0.99), f"{GENERATE_2D} (im_optimizer)"),
    ("2D", "image", "eps", 1e-15, f"{GENERATE_2D} (im_optimizer)"),
    ("2D", "image", "weight_decay", 0.01, f"{GENERATE_2D} (im_optimizer passes none: torch's default)"),
]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("official") / "prompt.yaml"
    path.write_text("prompt: a pineapple\n")
    return load_config(path)


@pytest.fixture(scope="module")
def scene(config):
    """The default scene, built with the pure-PyTorch hash grid (the tcnn layout is the same)."""
    return build_scene(dataclasses.replace(config, scene=dataclasses.replace(config.scene, backend="torch")),
                       torch.device("cpu"))


@pytest.mark.parametrize("name, official, source, ours", OFFICIAL, ids=[row[0] for row in OFFICIAL])
def test_default_config_matches_the_official_value(config, name, official, source, ours):
    assert ours(config) == official, f"{name}: ours {ours(config)!r}, official {official!r} ({source})"


def test_both_field_heads_are_parallel_bias_free_mlps_on_the_grid_features(scene):
    field = scene.field
    features = field.encoding.n_output_dims
    assert features == 16 * 2
    shapes = {name: tuple(p.shape) for name, p in field.named_parameters() if not name.startswith("encoding")}
    assert shapes == {"density_mlp.0.weight": (64, features), "density_mlp.2.weight": (1, 64),
                      "color_mlp.0.weight": (64, features), "color_mlp.2.weight": (3, 64)}


def test_hash_table_has_tcnn_size(scene):
    # tcnn HashGrid: per level min(next_multiple_of_8(res^3), 2^19) entries of 2 features
    entries = 0
    for level in range(16):
        scale = 16 * 2 ** (level * math.log2(1.447269237440378)) - 1.0
        res = math.ceil(scale) + 1
        entries += min((res ** 3 + 7) // 8 * 8, 2 ** 19)
    assert sum(p.numel() for p in scene.field.encoding.parameters()) == entries * 2


def test_background_is_sh_encoded_bias_free_mlp(scene):
    shapes = [tuple(p.shape) for p in scene.background.parameters()]
    assert shapes == [(16, 9), (16, 16), (3, 16)]  # tcnn SphericalHarmonics degree 3: 9 coefficients


def test_optimizer_groups_match_the_official_params_block(config, scene):
    optimizer = build_optimizer(scene, make_method(config.method, config.guidance, None), config.train)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert list(groups) == ["grid", "density", "color", "background"]
    assert {k: g["lr"] for k, g in groups.items()} == {"grid": 0.01, "density": 0.001, "color": 0.001,
                                                      "background": 0.001}
    parts = {"grid": scene.field.encoding, "density": scene.field.density_mlp, "color": scene.field.color_mlp,
             "background": scene.background}
    for name, module in parts.items():
        assert {id(p) for p in groups[name]["params"]} == {id(p) for p in module.parameters()}
        assert groups[name]["betas"] == (0.9, 0.99) and groups[name]["eps"] == 1e-15
        assert groups[name]["weight_decay"] == 0.01


def test_occupancy_grid_and_step_size_match_threestudio(config):
    grid = occupancy_grid(config.scene.radius, config.render)
    assert grid.levels == 1 and grid.resolution.tolist() == [32, 32, 32]
    assert grid.aabbs.tolist() == [[-1.0, -1.0, -1.0, 1.0, 1.0, 1.0]]
    small = build_scene(load_config(None, ["prompt=x", "scene.n_levels=2", "scene.backend=torch"]),
                        torch.device("cpu"))
    renderer = Renderer(small.field, small.background, config.render, radius=1.0)
    assert renderer.step_size == pytest.approx(1.732 * 2 * 1.0 / 512, rel=1e-12)


def test_official_prompt_strings(config):
    texts = role_prompts(make_method("bridge", config.guidance, None).role_texts("a pineapple"))
    assert texts["target"] == {v: f"a pineapple, ., {v} view" for v in ("front", "side", "back", "overhead")}
    assert texts["source"]["front"] == f"a pineapple, {SOURCE_MODIFIER}, front view"
    assert texts["source"]["overhead"] == f"a pineapple, {SOURCE_MODIFIER}, overhead view"
    assert texts["cond"] == texts["target"]  # stage one: CFG between the target text and ""
    assert set(texts["uncond"].values()) == {""}


def test_elevation_is_half_uniform_in_angle_half_uniform_in_sine(config):
    """One coin per batch: uniform in [-10, 45] degrees, or sin(el) uniform in [-10/90, 45/90]."""
    generator = torch.Generator().manual_seed(0)
    batches = [sample_cameras(config.cameras, 64, generator).elevation for _ in range(400)]
    above_30 = [bool((b > 30.001).any()) for b in batches]  # only the uniform-in-angle branch goes above 30
    assert 0.4 < sum(above_30) / len(batches) < 0.6
    sine_batches = [b for b, high in zip(batches, above_30) if not high]
    sines = torch.sin(torch.deg2rad(torch.cat(sine_batches)))
    assert sines.min() >= -10 / 90 - 1e-6 and sines.max() <= 0.5 + 1e-6
    assert abs(float(sines.mean()) - (-10 / 90 + 0.5) / 2) < 0.01
    angles = torch.cat([b for b, high in zip(batches, above_30) if high])
    assert abs(float(angles.mean()) - 17.5) < 1.0


def test_schedules_switch_where_the_official_run_does(config):
    assert schedule_value(config.render.resolution, 5000) == 64
    assert schedule_value(config.render.resolution, 5001) == 512
    assert schedule_value(config.guidance.max_step_percent, 5001) == 0.5


@pytest.fixture(scope="module")
def vsd_optimizers(tmp_path_factory, tiny_sd_dir, scene):
    """{'3D': group name -> group, '2D': ...}: the optimizers a `method: vsd` prompt.yaml gets from ``train``
    (on the default scene) and from ``image`` (on a latent), on the tiny random pipeline (VSD needs a UNet)."""
    path = tmp_path_factory.mktemp("official-vsd") / "prompt.yaml"
    path.write_text("prompt: a pineapple\nmethod: vsd\n")
    vsd_config = load_config(path, [f"prior.model={tiny_sd_dir}"])
    prior = load_prior(vsd_config.prior, "cpu")
    in_3d = build_optimizer(scene, make_method("vsd", vsd_config.guidance, prior), vsd_config.train)
    latents = torch.zeros(1, 4, 32, 32, requires_grad=True)
    method_2d = make_method("vsd", image_guidance_config(vsd_config), prior)
    in_2d = image_optimizer(latents, method_2d, vsd_config.image)
    assert [g["name"] for g in in_2d.param_groups] == ["image", "lora"]
    assert [p is latents for p in in_2d.param_groups[0]["params"]] == [True]
    assert {id(p) for p in in_2d.param_groups[1]["params"]} == {id(p) for p in method_2d.source.parameters()}
    assert [g["name"] for g in in_3d.param_groups] == ["grid", "density", "color", "background", "lora"]
    return {run: {g["name"]: g for g in optimizer.param_groups} for run, optimizer in (("3D", in_3d), ("2D", in_2d))}


@pytest.mark.parametrize("run, group, setting, official, source", OFFICIAL_VSD_OPTIMIZER,
                         ids=[f"{row[0]} {row[1]} {row[2]}" for row in OFFICIAL_VSD_OPTIMIZER])
def test_vsd_optimizer_groups_match_the_official_values(vsd_optimizers, run, group, setting, official, source):
    ours = vsd_optimizers[run][group][setting]
    assert ours == official, f"{run} {group} {setting}: ours {ours!r}, official {official!r} ({source})"
