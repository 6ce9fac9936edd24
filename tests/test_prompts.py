"""View-dependent prompts: texts per role and view, one embedding call, per-camera selection."""


import pytest
import torch

from sdsbridge.scene.cameras import cameras_from_angles
from sdsbridge.distill.methods.bridge import SOURCE_MODIFIER
from sdsbridge.priors.stable_diffusion import StableDiffusionSettings
from sdsbridge.distill.methods import make_method
from sdsbridge.priors import load_prior
from sdsbridge.distill.prompts import PromptEmbeddings, join_prompt, role_prompts


@pytest.fixture(scope="module")
def prior(tiny_sd_dir):
    return load_prior(StableDiffusionSettings(model=str(tiny_sd_dir)), "cpu")


def test_join_prompt():
    assert join_prompt("a pineapple", ", detailed, sharp") == "a pineapple, detailed, sharp"
    assert join_prompt("a pineapple", "blurry, noisy") == "a pineapple, blurry, noisy"
    assert join_prompt("a pineapple,", "") == "a pineapple"
    assert join_prompt("a pineapple", ".") == "a pineapple, ."  # the official 3D target text
    assert join_prompt("", "blurry") == "blurry"


def texts_of(name, cfg, prior=None):
    """role -> view label -> text of method ``name`` for 'a red torus'."""
    method = make_method(name, cfg, prior)
    return role_prompts(method.role_texts("a red torus"), method.settings.view_dependent)


def test_role_texts_for_the_bridge():
    cfg = dict(target_modifier=", sharp", cfg_on_target=False)
    texts = texts_of("bridge", cfg)
    assert set(texts) == {"cond", "uncond", "target", "source"}
    assert texts["cond"]["front"] == "a red torus, front view"
    assert texts_of("bridge", dict(target_modifier=", sharp"))["cond"]["front"] == (
        "a red torus, sharp, front view")
    assert texts["target"]["back"] == "a red torus, sharp, back view"
    assert texts["source"]["overhead"] == f"a red torus, {SOURCE_MODIFIER}, overhead view"
    assert texts["uncond"] == {"front": "", "side": "", "back": "", "overhead": ""}
    nfsd = texts_of("nfsd", cfg)
    assert set(nfsd) == {"cond", "uncond", "negative"} and nfsd["negative"]["side"].endswith("gloomy, side view")
    assert set(texts_of("sds", cfg)) == {"cond", "uncond"}
    flat = texts_of("bridge", dict(cfg, view_dependent=False))
    assert set(flat["source"].values()) == {f"a red torus, {SOURCE_MODIFIER}"}


def test_one_embedding_call_with_distinct_texts(prior, monkeypatch):
    calls = []
    real = prior.embed_prompts
    monkeypatch.setattr(prior, "embed_prompts", lambda prompts: calls.append(list(prompts)) or real(prompts))
    prompts = PromptEmbeddings(prior, make_method("bridge", dict(), prior).role_texts("a red torus"))
    assert len(calls) == 1
    # cond == target (CFG on the target text) -> 4 view texts + 4 source texts + the empty prompt
    assert len(calls[0]) == len(set(calls[0])) == 9
    assert prompts.embeddings.shape == (9, 128, 32)


def test_conditions_follow_the_cameras_view_labels(prior):
    cameras = cameras_from_angles(elevation=torch.tensor([0.0, 10.0, 20.0, 75.0, 5.0]),
                                  azimuth=torch.tensor([10.0, 90.0, 180.0, 0.0, -100.0]),
                                  distance=torch.full((5,), 1.2), fovy_deg=torch.full((5,), 50.0))
    assert cameras.labels == ["front", "side", "back", "overhead", "side"]
    prompts = PromptEmbeddings(prior, make_method("bridge", dict(), prior).role_texts("a red torus"))
    conditions = prompts.conditions(cameras.labels)
    assert set(conditions) == {"cond", "uncond", "target", "source"}
    texts = prompts.texts(cameras.labels)
    assert texts["cond"][3] == "a red torus, ., overhead view" and texts["source"][2].endswith("back view")
    for role in ("cond", "source"):
        expected = prior.embed_prompts(texts[role])
        assert conditions[role].shape == (5, 128, 32)
        assert torch.allclose(conditions[role], expected, atol=1e-6)
    assert torch.allclose(conditions["uncond"], prior.embed_prompts([""] * 5).expand(5, -1, -1), atol=1e-6)
    assert not torch.allclose(conditions["cond"][0], conditions["cond"][1])
    with pytest.raises(ValueError):
        prompts.conditions(["sideways"])
