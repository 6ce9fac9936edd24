"""Background: learned view-direction MLP, or a fixed colour."""

import torch

from sdsbridge.config import SceneConfig
from sdsbridge.nerf.background import Background


def test_fixed_background_colour_is_returned_everywhere_and_not_stored():
    background = Background(SceneConfig(background_color=[1.0, 0.5, 0.0]))
    dirs = torch.randn(4, 5, 3)
    colours = background(dirs)
    assert colours.shape == (4, 5, 3)
    assert torch.equal(colours, torch.tensor([1.0, 0.5, 0.0]).expand(4, 5, 3))
    assert "fixed_color" not in background.state_dict()  # checkpoints stay interchangeable


def test_learned_background_depends_on_direction_and_gets_gradients():
    torch.manual_seed(0)
    background = Background(SceneConfig())
    dirs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    colours = background(dirs)
    assert not torch.allclose(colours[0], colours[1])
    assert ((colours >= 0) & (colours <= 1)).all()
    colours.sum().backward()
    assert all(p.grad is not None for p in background.parameters())
