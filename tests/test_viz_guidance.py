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
    ax, bar = fig.axes  # the panel and its colour bar (colour means a share)
    assert "right: 50% of groups" in ax.get_title() and bar.get_ylabel() == "share of the row"
    texts = [t.get_text() for t in ax.texts]
    assert "75%\n(3)" in texts and "25%\n(1)" in texts  # row 1: three of four drawn right
    plt.close("all")
    with pytest.raises(ValueError, match="at least one"):
        viz.plot_count_confusion({})


def test_plot_guidance_sweep_error_bars():
    score = {"colour": 1.0, "shape": 0.9, "count": 0.8, "position": 1.0, "overall": 0.75}
    fig = viz.plot_guidance_sweep([0, 1, 4], [score] * 3, [0.2, 0.15, 0.1], n_images=96, diversity_se=[0.01] * 3)
    left, right = fig.axes
    assert "n = 96" in " ".join(t.get_text() for t in left.get_legend().get_texts())
    assert len(left.containers) == 1 and len(right.containers) == 1  # one errorbar each
    plt.close("all")
    with pytest.raises(ValueError, match="standard errors"):
        viz.plot_guidance_sweep([0, 1], [score] * 2, [0.1, 0.2], diversity_se=[0.01])


def test_lesson_05_figures_are_readable():
    """The sizes lesson 05 draws: 8 prompt-titled columns, four confusion panels, a grid of 4 or 8 seeds."""
    prompts = ["two large magenta triangles below a small cyan triangle", "three small yellow circles right of "
               "two small blue squares", "a small red circle", "two small cyan squares"] * 2
    score = {"colour": 1.0, "shape": 0.9, "count": 0.8, "position": math.nan, "overall": 0.75}
    matrix = [[0, 270, 5, 0, 0], [0, 5, 260, 36, 0], [0, 0, 5, 136, 39]]
    figures = [
        viz.plot_rows({"s = 0\n(uncond.)": torch.zeros(8, 3, 32, 32), "s = 1": torch.zeros(8, 3, 32, 32)},
                      col_titles=prompts, suptitle="the first prompts' seeds at every scale of the sweep"),
        viz.plot_count_confusion({f"s = {s}": matrix for s in (1, 4, 15)} | {"card: 512 prompts, s = 4": matrix}),
        viz.plot_guidance_sweep([0, 1, 4, 15], [score] * 4, [0.28, 0.12, 0.12, 0.13], n_images=192,
                                diversity_se=[0.003] * 4, title="48 prompts × 4 seeds"),
        viz.plot_guidance_grid(torch.zeros(4, 3, 32, 32), prompts[0], 4.0, score),
        viz.plot_guidance_grid(torch.zeros(8, 3, 32, 32), prompts[1], 4.0, score),
    ]
    for fig in figures:
        fig.set_dpi(72)  # the lessons' dpi
        assert viz.readability_problems(fig) == []
    plt.close("all")
