"""The range measures of lesson 06: out_of_range (before the clamp) and saturation (after it)."""

import pytest
import torch

from kandlab.diffusion import dynamic_threshold, out_of_range, overshoot, saturation, static_threshold


def hand_made() -> torch.Tensor:
    # two "images" of 8 values each (B=2, C=1, H=2, W=4)
    a = [0.0, 0.5, -0.99, 1.0, -1.0, 1.5, -3.0, 0.97]  # beyond: 1.5, -3.0; exact edge: ±1.0; near edge: -0.99
    b = [0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, 2.0]  # beyond: 2.0
    return torch.tensor([a, b]).reshape(2, 1, 2, 4)


def test_out_of_range_exact_values():
    x = hand_made()
    assert torch.equal(out_of_range(x), torch.tensor([2 / 8, 1 / 8]))  # ±1 itself is inside
    assert torch.equal(out_of_range(x, limit=0.45), torch.tensor([7 / 8, 4 / 8]))
    assert torch.equal(out_of_range(x.clamp(-1, 1)), torch.zeros(2))  # nothing survives the clamp


def test_overshoot_is_the_mean_excess():
    x = hand_made()
    # a: excess 0.5 (1.5) + 2.0 (-3.0) over 8 values; b: 1.0 (2.0) over 8 values
    assert torch.allclose(overshoot(x), torch.tensor([2.5 / 8, 1.0 / 8]))
    assert torch.allclose(overshoot(x, limit=2.0), torch.tensor([1.0 / 8, 0.0]))
    assert torch.equal(overshoot(x.clamp(-1, 1)), torch.zeros(2))
    # a hair over the ±1 background counts in out_of_range but hardly in overshoot
    hair = torch.full((1, 3, 4, 4), -1.01)
    assert out_of_range(hair).item() == 1.0 and overshoot(hair).item() < 0.011
    assert overshoot(x.double()).dtype == torch.float32


def test_saturation_exact_values():
    x = hand_made().clamp(-1, 1)  # after the final clamp, the way the pipeline returns images
    assert torch.equal(saturation(x, tol=0.0), torch.tensor([4 / 8, 1 / 8]))  # ±1 and clamped values
    assert torch.equal(saturation(x, tol=0.02), torch.tensor([5 / 8, 1 / 8]))  # + -0.99
    assert torch.equal(saturation(x, tol=0.05), torch.tensor([6 / 8, 1 / 8]))  # + 0.97
    assert torch.equal(saturation(torch.full((3, 3, 4, 4), -1.0)), torch.ones(3))  # black is saturated too


def test_thresholding_removes_overshoot():
    x0 = 3 * torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert (out_of_range(x0) > 0.5).all()
    assert torch.equal(out_of_range(static_threshold(x0)), torch.zeros(4))
    assert torch.equal(out_of_range(dynamic_threshold(x0, 0.9)), torch.zeros(4))
    # static clipping pins everything that overshot; dynamic pulls most of it inside
    assert (saturation(dynamic_threshold(x0, 0.9)) < saturation(static_threshold(x0))).all()


def test_dtype_and_shape():
    x = hand_made().double()
    assert out_of_range(x).dtype == torch.float32 and out_of_range(x).shape == (2,)
    assert saturation(x.half().clamp(-1, 1)).shape == (2,)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: out_of_range(torch.zeros(5)), "batch of images"),
        (lambda: saturation(torch.tensor(0.5)), "batch"),
        (lambda: out_of_range(torch.zeros(0, 3)), "empty"),
        (lambda: saturation(torch.tensor([[0.0, float("nan")]])), "NaN"),
        (lambda: out_of_range(torch.zeros(2, 3), limit=0), "positive"),
        (lambda: overshoot(torch.zeros(2, 3), limit=float("inf")), "positive"),
        (lambda: overshoot(torch.zeros(5)), "batch of images"),
        (lambda: saturation(torch.zeros(2, 3), tol=1.0), r"\[0, 1\)"),
        (lambda: saturation(torch.zeros(2, 3), tol=-0.1), r"\[0, 1\)"),
    ],
)
def test_bad_input_says_what_to_do(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_integer_images_are_refused():
    with pytest.raises(TypeError, match="float"):
        saturation(torch.zeros(2, 3, dtype=torch.uint8))
