"""The reference prior: exact denoiser maths, prompt parsing, image sets, nearest-view conditioning, cache."""

import pytest
import torch

from sdsbridge.scene.cameras import VIEW_LABELS, view_label
from sdsbridge.scene.cameras import CameraConfig, Cameras
from sdsbridge.distill.methods.nfsd import NFSD_NEGATIVE
from sdsbridge.distill.methods.bridge import SOURCE_MODIFIER
from sdsbridge.priors.reference import ReferenceSettings
from sdsbridge.common.errors import UserError
from sdsbridge.priors import load_prior
from sdsbridge.priors import reference as reference_module
from sdsbridge.priors.denoiser import add_noise, noise_from_denoised, optimal_denoiser, sd_alphas_cumprod
from sdsbridge.priors.reference import ReferencePrior, blur_within_silhouette, reference_cameras
from sdsbridge.priors.reference_prompts import parse_prompt
from sdsbridge.priors.shapes import SHAPES

AC = sd_alphas_cumprod()
TIMESTEPS = [0, 1, 10, 100, 500, 900, 999]


def _brute_force(x_t, t, images, ac):
    """E[x0 | x_t] by an explicit float64 loop over samples and images."""
    out = []
    for m in range(x_t.shape[0]):
        a = float(ac.double()[t[m]])
        logits = torch.tensor([-float(((x_t[m].double() - a ** 0.5 * img.double()) ** 2).sum()) / (2 * (1 - a))
                               for img in images], dtype=torch.float64)
        w = torch.exp(logits - logits.max())
        w = w / w.sum()
        out.append(sum(w[i] * images[i].double() for i in range(len(images))))
    return torch.stack(out)


# --- schedule and denoiser ---------------------------------------------------------------------------
def test_schedule_matches_stable_diffusion():
    assert AC.dtype == torch.float32 and AC.shape == (1000,)
    assert abs(float(AC[0]) - (1 - 0.00085)) < 1e-7
    assert abs(float(AC[-1]) - 0.0047) < 1e-4
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    assert torch.allclose(AC, sched.alphas_cumprod.float(), atol=1e-6)


def test_single_image_set_gives_that_image_at_every_t():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
    x_t = torch.randn(len(TIMESTEPS), 3, 8, 8, generator=g) * 3
    out = optimal_denoiser(x_t, torch.tensor(TIMESTEPS), x0, AC)
    assert torch.equal(out, x0.expand_as(out))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_denoiser_matches_brute_force(dtype, tol):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(7, 3, 6, 6, generator=g, dtype=torch.float64) * 2 - 1
    x0 = images[torch.tensor([0, 3, 5, 6, 2, 1, 4])] + 0.05 * torch.randn(7, 3, 6, 6, generator=g, dtype=torch.float64)
    t = torch.tensor(TIMESTEPS)
    x_t = add_noise(x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), t, AC.double())
    expected = _brute_force(x_t, t, images, AC)
    got = optimal_denoiser(x_t.to(dtype), t, images.to(dtype), AC)
    assert got.dtype == dtype
    assert torch.allclose(got.double(), expected, atol=tol, rtol=0)
    # Blocks are the same set as their concatenation.
    blocks = optimal_denoiser(x_t.to(dtype), t, [images[:2].to(dtype), images[2:].to(dtype)], AC)
    assert torch.allclose(blocks.double(), expected, atol=tol, rtol=0)


def test_denoiser_mask_selects_subsets():
    g = torch.Generator().manual_seed(2)
    images = torch.rand(6, 12, generator=g) * 2 - 1
    x_t = torch.randn(2, 12, generator=g)
    t = torch.tensor([300, 700])
    mask = torch.tensor([[True, False, True, False, False, False], [False, True, True, True, True, False]])
    got = optimal_denoiser(x_t, t, images, AC, mask=mask)
    assert torch.allclose(got[0], optimal_denoiser(x_t[:1], t[:1], images[mask[0]], AC)[0], atol=1e-6)
    assert torch.allclose(got[1], optimal_denoiser(x_t[1:], t[1:], images[mask[1]], AC)[0], atol=1e-6)


def test_noise_round_trips_with_single_image_set():
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(len(TIMESTEPS), 3, 8, 8, generator=g)
    t = torch.tensor(TIMESTEPS)
    x_t = add_noise(x0.expand_as(eps), eps, t, AC)
    eps_hat = noise_from_denoised(x_t, optimal_denoiser(x_t, t, x0, AC), t, AC)
    assert torch.allclose(eps_hat, eps, atol=1e-4)


# --- prompt parsing ----------------------------------------------------------------------------------
def test_parse_shape_view_and_modifiers():
    c = parse_prompt("a red torus, detailed high resolution, high quality, sharp, front view")
    assert c.shapes == ("torus",) and c.labels == ("front",) and c.degradations == ()
    assert parse_prompt("a DSLR photo of a torus") == parse_prompt("red torus")
    assert parse_prompt("something red").shapes == ("torus",)  # a colour names a shape too
    assert parse_prompt("a blue box").labels == VIEW_LABELS
    assert parse_prompt("a blue box, overhead view").labels == ("overhead",)
    assert parse_prompt("a red torus and a yellow capsule").shapes == ("torus", "capsule")
    src = parse_prompt(f"a blue box, {SOURCE_MODIFIER}, side view")
    assert src.shapes == ("box",) and src.labels == ("side",) and src.degradations == ("blur", "saturate")
    assert parse_prompt("a blue box, blurry").degradations == ("blur",)
    assert parse_prompt("a blue box, oversaturated").degradations == ("saturate",)


def test_parse_empty_and_modifier_only_prompts_mean_all_shapes():
    assert parse_prompt("").shapes == tuple(SHAPES)
    assert parse_prompt(", back view").labels == ("back",)
    neg = parse_prompt(NFSD_NEGATIVE)
    assert neg.shapes == tuple(SHAPES) and neg.degradations == ("blur", "saturate")


@pytest.mark.parametrize("prompt", ["a pineapple", "a DSLR photo of an astronaut, front view"])
def test_unknown_prompt_is_a_user_error_listing_shapes(prompt):
    with pytest.raises(UserError) as info:
        parse_prompt(prompt)
    message = str(info.value)
    assert "\n" not in message and all(name in message for name in SHAPES)


def test_wrong_colour_for_named_shape_is_a_user_error():
    with pytest.raises(UserError, match="torus"):
        parse_prompt("a blue torus")


# --- reference cameras and image sets ----------------------------------------------------------------
def test_reference_cameras_binned_by_label_and_deterministic():
    cfg = CameraConfig()
    cams = reference_cameras(cfg, 5)
    assert cams.labels == [label for label in VIEW_LABELS for _ in range(5)]
    for e, a, label in zip(cams.elevation.tolist(), cams.azimuth.tolist(), cams.labels):
        assert view_label(e, a, cfg.front_half_angle, cfg.overhead_elevation) == label
    non_overhead = cams.elevation[:15]
    assert non_overhead.min() >= cfg.elevation_range[0] and non_overhead.max() <= cfg.elevation_range[1]
    assert (cams.elevation[15:] > cfg.overhead_elevation).all()  # filled though training never samples it
    assert torch.equal(cams.c2w, reference_cameras(cfg, 5).c2w)


@pytest.fixture(scope="module")
def prior():
    return ReferencePrior(resolution=16, views_per_label=4)


def test_prior_protocol_attributes(prior):
    assert prior.image_resolution == 16 and prior.num_train_timesteps == 1000
    assert prior.alphas_cumprod.dtype == torch.float32 and torch.equal(prior.alphas_cumprod, AC)
    built = load_prior(ReferenceSettings(resolution=16, views_per_label=4), "cpu")
    assert isinstance(built, ReferencePrior) and built.device == torch.device("cpu")


def test_embed_prompts_ids_and_sets(prior):
    ids = prior.embed_prompts(["a red torus, front view", "a red torus, front view", "a red torus, blurry, front view",
                               "", "a blue box, side view"])
    assert ids.dtype == torch.long and ids.shape == (5,)
    assert ids[0] == ids[1] and len(set(ids.tolist())) == 4
    clean, cams = prior.reference_set(int(ids[0]))
    assert clean.shape == (4, 3, 16, 16) and cams.tolist() == [0, 1, 2, 3]
    blurry, _ = prior.reference_set(int(ids[2]))
    assert blurry.shape == (8, 3, 16, 16)
    assert torch.allclose(blurry[:4], clean)  # the union: clean images stay in the 'blurry' set
    masks = prior.clean_masks("torus")[cams]
    assert torch.allclose(blurry[4:], blur_within_silhouette(clean, masks, 16 / 32), atol=1e-6)
    everything, _ = prior.reference_set(int(ids[3]))
    assert everything.shape == (len(SHAPES) * 4 * 4, 3, 16, 16)
    with pytest.raises(UserError):
        prior.embed_prompts(["a teapot"])


def test_degraded_copies_differ_as_named(prior):
    ids = prior.embed_prompts(["a yellow capsule, side view", "a yellow capsule, side view, oversaturated"])
    clean, _ = prior.reference_set(int(ids[0]))
    saturated, _ = prior.reference_set(int(ids[1]))
    def spread(images):  # max - min channel: grows with saturation
        return (images.max(dim=1).values - images.min(dim=1).values).sum()

    assert torch.equal(saturated[:4], clean)
    assert spread(saturated[4:]) > 1.2 * spread(clean)


def test_degraded_copies_keep_brightness_and_silhouette(prior):
    """Stage two pushes renders away from the degraded copies; copies that were also brighter, darker or
    larger than the clean image would push colours and shapes off the truth (the demo's dark torus)."""
    ids = prior.embed_prompts(["a red torus, front view", "a red torus, front view, oversaturated, blurry"])
    clean, cams = prior.reference_set(int(ids[0]))
    copies, _ = prior.reference_set(int(ids[1]))
    masks = prior.clean_masks("torus")[cams]
    blurred, saturated = copies[4:8], copies[8:12]
    # saturation at constant HSV value: each pixel's brightest channel is unchanged, some others drop
    assert torch.allclose(saturated.max(dim=1).values, clean.max(dim=1).values, atol=1e-6)
    assert (saturated < clean - 0.01).any()
    # blur inside the silhouette: uncovered pixels stay white, the covered colour keeps its mean
    assert torch.equal(blurred[masks.expand_as(blurred) == 0], clean[masks.expand_as(clean) == 0])
    premultiplied = lambda images: (images - (1 - masks)).sum(dim=(2, 3))  # noqa: E731
    assert torch.allclose(premultiplied(blurred), premultiplied(clean), rtol=0.05)
    assert not torch.allclose(blurred, clean, atol=0.02)


def test_encode_images_resizes_to_minus_one_one_with_gradient(prior):
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    latents = prior.encode_images(images)
    assert latents.shape == (2, 3, 16, 16) and latents.min() >= -1 and latents.max() <= 1
    latents.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    same = torch.rand(1, 3, 16, 16)
    assert torch.allclose(prior.encode_images(same), same * 2 - 1)


def test_decode_latents_inverts_encode_and_clamps(prior):
    images = torch.rand(2, 3, 16, 16)
    assert torch.allclose(prior.decode_latents(prior.encode_images(images)), images, atol=1e-6)
    assert prior.decode_latents(torch.full((1, 3, 16, 16), 3.0)).max() == 1.0


def test_predict_noise_recovers_reference_image_at_small_t(prior):
    ids = prior.embed_prompts(["a blue box, front view", ""])
    images, _ = prior.reference_set(int(ids[0]))
    x0 = prior.encode_images(images[2:3]).expand(2, -1, -1, -1)
    t = torch.tensor([5, 5])
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    x_t = add_noise(x0, eps, t, AC)
    eps_hat = prior.predict_noise(x_t, t, ids)
    assert eps_hat.shape == x_t.shape and eps_hat.dtype == torch.float32
    assert torch.allclose(eps_hat, eps, atol=1e-3)  # both sets contain the image; it dominates at t=5


def test_nearest_view_conditioning_uses_the_matching_camera():
    prior = ReferencePrior(resolution=16, views_per_label=4, nearest_views=1)
    cid = prior.embed_prompts(["a red torus, front view"])  # the label is irrelevant with nearest views
    images = prior.clean_renders("torus")
    j, other = 9, 1  # j is a side view; x_t is built from a front image
    x0 = prior.encode_images(images[other:other + 1])
    t = torch.tensor([3])
    x_t = add_noise(x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)), t, AC)
    eps_hat = prior.predict_noise(x_t, t, cid, cameras=prior.cameras[j:j + 1])
    a = float(AC[3])
    x0_hat = (x_t - (1 - a) ** 0.5 * eps_hat) / a ** 0.5
    assert torch.allclose(x0_hat, prior.encode_images(images[j:j + 1]), atol=1e-4)
    # Without positions it falls back to the view-label set, which holds the front image.
    eps_label = prior.predict_noise(x_t, t, cid)
    assert torch.allclose((x_t - (1 - a) ** 0.5 * eps_label) / a ** 0.5, x0, atol=1e-2)


def test_nearest_views_denoise_over_exactly_the_nearest_cameras_images():
    # The prior gathers each sample's nearest cameras' images from every block (clean and degraded copies,
    # several shapes); the result must be the optimal denoiser over that set, as a mask over the whole set gives.
    prior = ReferencePrior(resolution=8, views_per_label=6, nearest_views=5)
    ids = prior.embed_prompts(["a red torus and a box, blurry", "a capsule"])
    g = torch.Generator().manual_seed(3)
    positions = torch.randn(3, 3, generator=g) * 1.5
    x_t = torch.randn(3, 3, 8, 8, generator=g)
    t, conditions = torch.tensor([400, 700, 150]), ids[torch.tensor([0, 1, 0])]
    c2w = torch.eye(4).repeat(3, 1, 1)
    c2w[:, :3, 3] = positions
    cameras = Cameras(c2w, torch.ones(3), torch.zeros(3), torch.zeros(3), positions.norm(dim=-1), ["front"] * 3)
    got = prior.predict_noise(x_t, t, conditions, cameras=cameras)
    for r in range(3):
        images, _, cams = prior._blocks(prior.condition(int(conditions[r])), all_views=True)
        directions = torch.nn.functional.normalize(positions[r], dim=-1)
        nearest = torch.topk(prior.directions @ directions, 5).indices
        mask = torch.isin(torch.cat(cams), nearest)
        assert mask.sum() == 5 * len(images)  # every block holds every camera
        x0 = optimal_denoiser(x_t[r:r + 1], t[r:r + 1], torch.cat(images), AC, mask=mask[None])
        want = noise_from_denoised(x_t[r:r + 1], x0, t[r:r + 1], AC)
        assert torch.allclose(got[r:r + 1], want, atol=1e-5), r


def test_disk_cache_round_trip(tmp_path, monkeypatch):
    first = ReferencePrior(resolution=8, views_per_label=2, cache_dir=str(tmp_path))
    rendered = first.clean_renders("capsule")
    files = list(tmp_path.glob("reference-capsule-*.pt"))
    assert len(files) == 1

    def no_render(*args, **kwargs):
        raise AssertionError("should load from the cache")

    monkeypatch.setattr(reference_module, "render_shape", no_render)
    second = ReferencePrior(resolution=8, views_per_label=2, cache_dir=str(tmp_path))
    assert torch.equal(second.clean_renders("capsule"), rendered)
    other = ReferencePrior(resolution=8, views_per_label=3, cache_dir=str(tmp_path))  # another key
    with pytest.raises(AssertionError, match="cache"):
        other.clean_renders("capsule")
    monkeypatch.undo()
    files[0].write_bytes(b"not a checkpoint")  # corrupt: rendered again and rewritten
    third = ReferencePrior(resolution=8, views_per_label=2, cache_dir=str(tmp_path))
    assert torch.equal(third.clean_renders("capsule"), rendered)
