"""Lesson 05's guidance figures and widget build and redraw without a browser or a trained model."""
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from kandlab import viz  # noqa: E402


class FakePipe:
    """Stands in for kandlab.pipeline.Pipeline: counts calls, returns images in [-1, 1]."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, steps, guidance, seed, images_per_prompt, progress):
        self.calls.append((tuple(prompts), guidance))
        g = torch.Generator().manual_seed(seed)
        return torch.rand(len(prompts) * images_per_prompt, 3, 32, 32, generator=g) * 2 - 1


def test_guidance_widget_redraws_and_caches():
    from ipywidgets import Dropdown, SelectionSlider

    pipe = FakePipe()
    box = viz.guidance_widget(pipe, ["a red circle", "two blue squares"], scales=(0, 1, 4), n=2, steps=2)
    controls = box.children[0].children
    prompt = next(w for w in controls if isinstance(w, Dropdown))
    scale = next(w for w in controls if isinstance(w, SelectionSlider))
    assert pipe.calls == [(("a red circle",), 4.0)]  # starts at the scale closest to 4
    scale.value = 1
    prompt.value = "two blue squares"
    scale.value = 4
    prompt.value = "a red circle"  # cached: no new call
    assert len(pipe.calls) == 4
    plt.close("all")


def test_plot_guidance_sweep_and_grid():
    score = {"colour": 0.5, "shape": 1.0, "count": 0.25, "position": math.nan, "overall": 0.25}
    fig = viz.plot_guidance_sweep([0, 1, 4], [score] * 3, [0.2, 0.15, 0.1])
    assert len(fig.axes) == 2
    fig = viz.plot_guidance_grid(torch.zeros(2, 3, 32, 32), "a red circle", 4.0, score)
    assert "position —" in fig._suptitle.get_text()
    plt.close("all")
    with pytest.raises(ValueError, match="same length"):
        viz.plot_guidance_sweep([0, 1], [score], [0.1, 0.2])


def test_plot_rows():
    rows = {"s = 0": torch.zeros(3, 3, 32, 32), "s = 1": torch.ones(3, 3, 32, 32)}
    fig = viz.plot_rows(rows, col_titles=["a red circle", "b", "c"])
    assert len(fig.axes) == 6
    plt.close("all")
    with pytest.raises(ValueError, match="same number"):
        viz.plot_rows({"a": torch.zeros(2, 3, 8, 8), "b": torch.zeros(3, 3, 8, 8)})
    with pytest.raises(ValueError, match="column titles"):
        viz.plot_rows(rows, col_titles=["x"])


def test_plot_count_confusion_shows_row_shares_and_the_right_share():
    matrix = [[0, 3, 1, 0, 0], [0, 0, 2, 2, 0], [0, 0, 0, 1, 3]]  # 6 of 12 groups right
    fig = viz.plot_count_confusion({"model": matrix})
    (ax,) = fig.axes
    assert "right: 50% of groups" in ax.get_title()
    texts = [t.get_text() for t in ax.texts]
    assert "75%\n(3)" in texts and "25%\n(1)" in texts  # row 1: three of four drawn right
    plt.close("all")
    with pytest.raises(ValueError, match="at least one"):
        viz.plot_count_confusion({})
