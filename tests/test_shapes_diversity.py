"""Tests for kandlab.shapes.diversity: mean pairwise pixel distance within prompts."""

import numpy as np
import pytest
import torch

from kandlab.shapes import diversity


def _flat(value: float, n: int = 1) -> torch.Tensor:
    return torch.full((n, 3, 32, 32), value)


def test_identical_images_give_zero():
    images = torch.rand(1, 3, 32, 32).mul(2).sub(1).repeat(4, 1, 1, 1)  # four copies of one image
    assert diversity(images, ["p"] * 4) == 0.0


def test_exact_value_on_hand_made_example():
    # group "a": black, white, grey -> [0, 1] values 0, 1, 0.5 -> pair distances 1, 0.5, 0.5 -> 2/3
    # group "b": two identical images -> 0; the mean over groups (each prompt weighs the same) is 1/3
    images = torch.cat([_flat(-1.0), _flat(1.0), _flat(0.0), _flat(0.3, 2)])
    assert diversity(images, ["a", "a", "a", "b", "b"]) == pytest.approx(1 / 3, abs=1e-12)
    assert diversity(images[:2].numpy(), [0, 0]) == pytest.approx(1.0)


def test_group_order_does_not_matter():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 32, 32, generator=g) * 2 - 1
    labels = ["x", "y", "x", "y", "x", "y"]
    perm = [1, 0, 3, 2, 5, 4]
    assert diversity(images, labels) == pytest.approx(diversity(images[perm], [labels[i] for i in perm]))


@pytest.mark.parametrize(
    "images, groups, match",
    [
        (_flat(0.0, 3), ["a", "a", "b"], "only one image"),
        (_flat(0.0, 3), ["a", "a"], "3 images but 2"),
        (torch.zeros(3, 32, 32), ["a"] * 3, "expected a batch"),
        (_flat(2.0, 2), ["a", "a"], r"\[-1, 1\]"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), ["a", "a"], "dtype"),
        (_flat(0.0, 0), [], "no images"),
    ],
)
def test_bad_input_raises_clear_error(images, groups, match):
    with pytest.raises(ValueError, match=match):
        diversity(images, groups)


def test_groups_must_be_a_list():
    with pytest.raises(TypeError, match="one label per image"):
        diversity(_flat(0.0, 2), "aa")
    with pytest.raises(TypeError, match="tensor or array"):
        diversity([[0.0]], ["a"])
    assert np.isfinite(diversity(_flat(0.5, 2), ("p", "p")))
