"""Every widget builds and redraws without a browser (the plot functions run for real)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from kandlab import schedules, shapes, viz  # noqa: E402
from kandlab.diffusion import TrajectoryStep  # noqa: E402


def _slider(box):
    from ipywidgets import IntSlider, SelectionSlider

    stack = [box]
    while stack:
        w = stack.pop()
        if isinstance(w, (IntSlider, SelectionSlider)):
            return w
        stack.extend(getattr(w, "children", ()))
    raise AssertionError("no slider in widget")


def _move(box):
    s = _slider(box)
    s.value = s.options[-1] if hasattr(s, "options") and s.options else s.max


def test_forward_diffusion_widget_redraws():
    img = torch.rand(3, 16, 16) * 2 - 1
    box = viz.forward_diffusion_widget({"a": img}, {"cosine": schedules.alpha_bar(schedules.cosine_betas(50))})
    _move(box)
    plt.close("all")


def test_shapes_browser_redraws():
    box = viz.shapes_browser(shapes.ShapesDataset(length=4))
    _move(box)
    plt.close("all")


def test_trajectory_widget_redraws():
    traj = [TrajectoryStep(t, torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)) for t in (9, 5, 0, -1)]
    box = viz.trajectory_widget(traj, n=2)
    _move(box)
    plt.close("all")


def test_cross_attention_widget_redraws():
    maps = {t: [("down.1.cross_attentions.0", torch.rand(1, 4, 4, 3))] for t in (10, 500)}
    box = viz.cross_attention_widget({t: torch.randn(3, 8, 8) for t in maps}, maps, ["a", "b", "</s>"])
    _move(box)
    plt.close("all")


def test_to_image_rejects_batches():
    import pytest

    with pytest.raises(ValueError, match="one image"):
        viz.to_image(torch.zeros(2, 3, 4, 4))


def test_readability_problems_finds_small_type_and_overlapping_labels():
    import matplotlib.pyplot as plt

    from kandlab import viz

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot(range(100))
    ax.set_xticks(range(0, 100, 4))  # 25 labels on a 2-inch axis
    ax.set_title("tiny", fontsize=6)
    problems = viz.readability_problems(fig)
    assert any("'tiny' is set in 6.0 pt" in p for p in problems)
    assert any("drawn over each other" in p for p in problems)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 1], [0, 1])
    ax.set_title("readable")
    assert viz.readability_problems(fig) == []
    plt.close(fig)


def test_to_display_range_maps_and_clips():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 1.5])
    assert viz.to_display_range(x).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    img = torch.rand(3, 4, 4) * 2 - 1
    assert torch.allclose(torch.from_numpy(viz.to_image(img)), viz.to_display_range(img).permute(1, 2, 0))


def test_cross_attention_figure_has_a_colour_bar_and_readable_type():
    maps = [(f"{p}.1.cross_attentions.{i}", torch.rand(1, s, s, 3)) for p in ("down", "up") for i, s in enumerate((8, 4))]
    fig = viz.plot_cross_attention(torch.rand(3, 8, 8) * 2 - 1, maps, ["a", "b", "</s>"], 1, note="random weights")
    assert any(ax.get_label() == "<colorbar>" for ax in fig.axes)
    assert viz.readability_problems(fig) == []
    plt.close(fig)


def test_parameter_breakdown_figure_keeps_its_legend_clear_of_the_bars():
    from kandlab.unet import UNet, UNetConfig

    model = UNet(UNetConfig.tiny_pixel())
    table = viz.parameter_breakdown(model)
    assert sum(sum(row.values()) for row in table.values()) == sum(p.numel() for p in model.parameters())
    fig = viz.plot_parameter_breakdown({"tiny": table, "again": table})
    assert fig.legends and not any(ax.get_legend() for ax in fig.axes)  # one legend below the panels, none on a bar
    assert viz.readability_problems(fig) == []
    plt.close(fig)
