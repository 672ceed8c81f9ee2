"""Lesson 04's plots and widgets: build, redraw, and refuse bad input with a message."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from kandlab import viz  # noqa: E402


def _find(box, kind):
    stack = [box]
    while stack:
        w = stack.pop()
        if isinstance(w, kind):
            return w
        stack.extend(getattr(w, "children", ()))
    raise AssertionError(f"no {kind.__name__} in widget")


def test_position_bucket_plot_panels_and_errors():
    fig = viz.plot_position_buckets(32, 128, True, bias=torch.randn(32, 4), seen=15)
    assert len(fig.axes) == 2
    fig = viz.plot_position_buckets(16, 40, False)
    assert len(fig.axes) == 1
    plt.close("all")
    with pytest.raises(ValueError, match="even int"):
        viz.plot_position_buckets(31, 128)
    with pytest.raises(ValueError, match="larger than the exact range"):
        viz.plot_position_buckets(32, 8, True)
    with pytest.raises(ValueError, match="buckets, heads"):
        viz.plot_position_buckets(32, 128, bias=torch.randn(31, 4))


# Outside a kernel an ipywidgets Output captures nothing: what the widget prints reaches stdout (capsys).


def test_position_bucket_widget_shows_errors_instead_of_raising(capsys):
    from ipywidgets import IntSlider

    box = viz.position_bucket_widget(torch.randn(32, 2), seen=15)
    slider = _find(box, IntSlider)  # num_buckets or max_distance: both may make the range invalid
    slider.value = slider.min
    assert "⚠" in capsys.readouterr().out
    plt.close("all")


def test_cosine_similarity_matrix_and_heat_map():
    a, b = torch.randn(3, 8), torch.randn(5, 8)
    sim = viz.cosine_similarity_matrix(a, b)
    assert sim.shape == (3, 5)
    assert torch.allclose(viz.cosine_similarity_matrix(a, a).diagonal(), torch.ones(3), atol=1e-6)
    assert torch.allclose(viz.cosine_similarity_matrix(a, -a).diagonal(), -torch.ones(3), atol=1e-6)
    with pytest.raises(ValueError, match="same width"):
        viz.cosine_similarity_matrix(a, torch.randn(5, 7))
    fig = viz.plot_token_similarity({"x": sim, "y": -sim}, list("abc"), list("vwxyz"))
    assert len(fig.axes) == 4  # two heat maps + two colour bars
    with pytest.raises(ValueError, match="tokens"):
        viz.plot_token_similarity({"x": sim}, list("ab"), list("vwxyz"))
    plt.close("all")


def test_token_similarity_widget_shows_encoder_errors(capsys):
    from ipywidgets import Text

    def encode(prompt):
        words = prompt.split()
        if "purple" in words:
            raise ValueError("unknown word 'purple'")
        return words, torch.randn(len(words), 4, generator=torch.Generator().manual_seed(len(words)))

    box = viz.token_similarity_widget({"enc": encode}, "a red circle", "two blue squares")
    _find(box, Text).value = "a purple circle"
    assert "⚠ unknown word 'purple'" in capsys.readouterr().out
    plt.close("all")


def test_prompt_grid_widget_generates_on_click_and_reports_errors(capsys):
    from ipywidgets import Button, Text

    calls = []

    def generate(prompt):
        calls.append(prompt)
        if prompt == "bad":
            raise ValueError("prompt 'bad' uses words the tiny model never saw")
        return torch.zeros(2, 3, 8, 8), ["x", "y"]

    box = viz.prompt_grid_widget(generate, "a red circle")
    assert calls == []  # nothing runs until the button is pressed
    _find(box, Button).click()
    assert calls == ["a red circle"]
    _find(box, Text).value = "bad"
    _find(box, Button).click()
    assert "⚠ prompt 'bad' uses words the tiny model never saw" in capsys.readouterr().out
    plt.close("all")


def test_lesson_04_plots_are_readable():
    """No type under 8 pt and nothing drawn over each other (issue 17), at lesson 04's sizes."""
    fig = viz.plot_position_buckets(32, 128, True, bias=torch.randn(32, 4), seen=15)
    assert viz.readability_problems(fig) == []
    tokens = "two red circles above a blue square </s>".split()
    sim = viz.cosine_similarity_matrix(torch.randn(8, 16), torch.randn(8, 16))
    fig = viz.plot_token_similarity({"random": sim, "joint": sim, "pretrained": -sim}, tokens, tokens)
    assert viz.readability_problems(fig) == []
    plt.close("all")
