"""The multi-face (Janus) options: Perp-Neg's combination and weights, and azimuth-interpolated view
embeddings, against hand computations (threestudio's formulas written out), and their use in the methods."""

import math

import numpy as np
import pytest
import torch

from sdsbridge.scene.cameras import VIEW_LABELS, Cameras
from sdsbridge.priors.stable_diffusion import StableDiffusionSettings
from sdsbridge.distill.formulas import perp_neg_direction, perpendicular_component
from sdsbridge.distill.methods import make_method
from sdsbridge.priors import load_prior
from sdsbridge.distill.prompts import PERP_NEG_ROLES, perp_neg_negatives, view_blend_weights

F_DEFAULT = ([1.0, 0.5, -0.606], [1.0, 0.5, 0.967], [4.0, 0.5, -2.426], [4.0, 0.5, -2.426])


def test_perp_neg_direction_equals_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    cond, uncond, neg0, neg1 = (torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64) for _ in range(4))
    weights = torch.tensor([[-1.5, -0.2], [0.0, 0.0], [-0.7, -3.0]], dtype=torch.float64)
    got = perp_neg_direction(cond, uncond, [neg0, neg1], weights)
    for n in range(3):  # per sample, flattened, with numpy
        e_pos = (cond[n] - uncond[n]).numpy().ravel()
        expected = e_pos.copy()
        for i, neg in enumerate((neg0, neg1)):
            e_i = (neg[n] - uncond[n]).numpy().ravel()
            perp = e_i - (e_i @ e_pos) / (e_pos @ e_pos) * e_pos
            assert abs(perp @ e_pos) < 1e-9 * np.linalg.norm(e_i) * np.linalg.norm(e_pos)  # really perpendicular
            expected += weights[n, i].item() * perp
        np.testing.assert_allclose(got[n].numpy().ravel(), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[1], cond[1] - uncond[1])  # zero weights: plain CFG direction


def test_perpendicular_component_of_a_parallel_vector_is_zero():
    y = torch.randn(2, 4, 3, 3)
    assert torch.allclose(perpendicular_component(2.5 * y, y), torch.zeros_like(y), atol=1e-5)
    assert torch.equal(perpendicular_component(y, torch.zeros_like(y)), y)  # <y, y> floored at 1e-6


def decay(a, b, c, r):
    return a * math.exp(-b * r) + c


@pytest.mark.parametrize("azimuth, label, negatives, weights", [
    (0.0, "front", ("front", "side"), (-decay(4, 0.5, -2.426, 1.0), -decay(4, 0.5, -2.426, 0.0))),
    (45.0, "side", ("front", "side"), (-decay(4, 0.5, -2.426, 0.5), -decay(4, 0.5, -2.426, 0.5))),
    (-60.0, "side", ("front", "side"), (-decay(4, 0.5, -2.426, 1 / 3), -decay(4, 0.5, -2.426, 2 / 3))),
    (90.0, "side", ("side", "front"), (-decay(1, 0.5, -0.606, 1.0), -decay(1, 0.5, 0.967, 1.0))),
    (135.0, "back", ("side", "front"), (-decay(1, 0.5, -0.606, 0.5), -decay(1, 0.5, 0.967, 0.5))),
    (-180.0, "back", ("side", "front"), (-decay(1, 0.5, -0.606, 0.0), -decay(1, 0.5, 0.967, 0.0))),
    (30.0, "overhead", (None, None), (0.0, 0.0)),
])
def test_perp_neg_negatives_and_weights_follow_threestudio(azimuth, label, negatives, weights):
    got_negatives, got_weights = perp_neg_negatives(torch.tensor([azimuth]), [label], F_DEFAULT)
    assert got_negatives == [negatives]
    assert torch.allclose(got_weights, torch.tensor([weights], dtype=torch.float32), atol=1e-6)


def test_perp_neg_weights_at_the_pure_views():
    """The defaults make the 'own view' negative vanish at the pure views: f_fs(1) ~ 0 at the front, f_sb(1) ~ 0
    at the side; the other view is pushed away."""
    _, w = perp_neg_negatives(torch.tensor([0.0, 90.0, 180.0]), ["front", "side", "back"], F_DEFAULT)
    assert abs(w[0, 0]) < 1e-3 and w[0, 1] < -1.5  # front: push away from the side view
    assert abs(w[1, 0]) < 1e-3 and w[1, 1] < -1.5  # side: push away from the front view
    assert w[2, 0] < -0.3 and w[2, 1] < -1.9  # back: away from side and (most) front


@pytest.mark.parametrize("azimuth, label, expected", [
    (0.0, "front", [1, 0, 0, 0]), (45.0, "side", [0.5, 0.5, 0, 0]), (-90.0, "side", [0, 1, 0, 0]),
    (135.0, "back", [0, 0.5, 0.5, 0]), (180.0, "back", [0, 0, 1, 0]), (-170.0, "back", [0, 1 / 9, 8 / 9, 0]),
    (10.0, "overhead", [0, 0, 0, 1]),
])
def test_view_blend_weights(azimuth, label, expected):
    got = view_blend_weights(torch.tensor([azimuth]), [label])
    assert torch.allclose(got, torch.tensor([expected], dtype=torch.float32), atol=1e-6)


@pytest.fixture(scope="module")
def prior(tiny_sd_dir):
    return load_prior(StableDiffusionSettings(model=str(tiny_sd_dir)), "cpu")


def row_of(embeddings, role, label):
    """The embedding of ``role``'s text with ``label``'s view suffix."""
    return embeddings.embeddings[embeddings.rows[role][VIEW_LABELS.index(label)]]


def cameras_at(azimuths, labels):
    n = len(azimuths)
    c2w = torch.eye(4).expand(n, 4, 4).clone()
    return Cameras(c2w, torch.full((n,), 1.0), torch.zeros(n), torch.tensor(azimuths), torch.full((n,), 1.5), labels)


def test_interpolated_conditions_blend_the_view_embeddings(prior):
    sds = make_method("sds", dict(view_interpolation=True), prior)
    embeddings = sds.prompt_embeddings("a red torus")
    cameras = cameras_at([30.0, 120.0, 0.0], ["side", "back", "overhead"])
    got = embeddings.conditions(cameras.labels, cameras.azimuth)
    by_label = {label: row_of(embeddings, "cond", label) for label in VIEW_LABELS}
    assert torch.allclose(got["cond"][0], (2 / 3) * by_label["front"] + (1 / 3) * by_label["side"], atol=1e-6)
    assert torch.allclose(got["cond"][1], (2 / 3) * by_label["side"] + (1 / 3) * by_label["back"], atol=1e-6)
    assert torch.equal(got["cond"][2], by_label["overhead"])
    assert all(torch.equal(row, row_of(embeddings, "uncond", "front")) for row in got["uncond"])  # "" has no views
    with pytest.raises(ValueError, match="azimuth"):
        embeddings.conditions(cameras.labels)


def test_perp_neg_conditions_hold_the_other_views_and_weights(prior):
    sds = make_method("sds", dict(perp_neg=True), prior)
    embeddings = sds.prompt_embeddings("a red torus")
    cameras = cameras_at([20.0, 150.0, 0.0], ["front", "back", "overhead"])
    got = embeddings.conditions(cameras.labels, cameras.azimuth)
    view = {label: row_of(embeddings, "cond", label) for label in ("front", "side")}
    assert torch.equal(got[PERP_NEG_ROLES[0]][0], view["front"]) and torch.equal(got[PERP_NEG_ROLES[1]][0], view["side"])
    assert torch.equal(got[PERP_NEG_ROLES[0]][1], view["side"]) and torch.equal(got[PERP_NEG_ROLES[1]][1], view["front"])
    assert torch.equal(got[PERP_NEG_ROLES[0]][2], got["uncond"][2])
    assert got["perp_neg_weights"].shape == (3, 2) and torch.equal(got["perp_neg_weights"][2], torch.zeros(2))
    assert not torch.equal(got["cond"][0], view["front"])  # Perp-Neg's positive is blended by azimuth


def test_sds_with_perp_neg_equals_the_hand_computation(prior):
    settings = dict(perp_neg=True, guidance_scale=7.5)
    sds = make_method("sds", settings, prior)
    cameras = cameras_at([20.0, 150.0], ["front", "back"])
    conditions = sds.prompt_embeddings("a red torus").conditions(cameras.labels, cameras.azimuth)
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 4, 32, 32, generator=g)
    t = torch.tensor([300, 800])
    abar = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    eps = {role: prior.predict_noise(x_t, t, conditions[role]) for role in ("cond", "uncond", *PERP_NEG_ROLES)}
    e_pos = eps["cond"] - eps["uncond"]
    accumulated = 0
    for i, role in enumerate(PERP_NEG_ROLES):
        e_i = eps[role] - eps["uncond"]
        coef = (e_i * e_pos).sum(dim=(1, 2, 3)) / (e_pos * e_pos).sum(dim=(1, 2, 3))
        accumulated = accumulated + conditions["perp_neg_weights"][:, i].view(-1, 1, 1, 1) * (e_i - coef.view(-1, 1, 1, 1) * e_pos)
    expected = (1 - abar) * (eps["uncond"] + 7.5 * (e_pos + accumulated) - noise)
    got = sds.gradient(latents, t, noise, conditions, 1)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    plain = sds.gradient(latents, t, noise, {k: v for k, v in conditions.items() if k in ("cond", "uncond")}, 1)
    assert not torch.allclose(got, plain, atol=1e-3)  # the negatives change the gradient


def test_bridge_stage_two_uses_blended_target_and_source_without_negatives(prior):
    """Stage two's target and source carry the same view blend, so their difference carries no view signal of
    its own: Perp-Neg's negatives are not evaluated there (README)."""
    bridge = make_method("bridge", dict(perp_neg=True, stage2_start_step=0), prior)
    calls = []
    original = prior.predict_noise

    def counting(latents_noisy, t, conditions, cameras=None):
        calls.append(latents_noisy.shape[0])
        return original(latents_noisy, t, conditions, cameras)

    prior.predict_noise = counting
    try:
        cameras = cameras_at([20.0], ["front"])
        conditions = bridge.prompt_embeddings("a red torus").conditions(cameras.labels, cameras.azimuth)
        bridge.distill(torch.randn(1, 4, 32, 32, requires_grad=True), conditions, 5, cameras, torch.Generator().manual_seed(0))
        assert calls == [2]  # target and source only
        calls.clear()
        bridge.settings = type(bridge).Settings(perp_neg=True, stage2_start_step=100)
        bridge.distill(torch.randn(1, 4, 32, 32, requires_grad=True), conditions, 5, cameras, torch.Generator().manual_seed(0))
        assert calls == [4]  # stage one: cond, uncond and the two negatives in one batch
    finally:
        prior.predict_noise = original
