"""Lesson 06 figures and widget build and redraw without a browser."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from kandlab import viz  # noqa: E402


def _runs():
    g = torch.Generator().manual_seed(0)
    runs = {}
    for s in (1.0, 8.0):
        for m, p in (("none", None), ("static", None), ("dynamic", 0.9), ("dynamic", 0.99)):
            final = 2 * torch.randn(4, 3, 8, 8, generator=g)
            runs[(m, p, s)] = {"images": final.clamp(-1, 1), "final": final, "overall": 0.5,
                               "x0_raw": 5 * torch.randn(3, 4, 3, 8, 8, generator=g)}
    return runs


def test_histogram_reports_in_range_fraction():
    fig, ax = plt.subplots()
    inside = viz.plot_value_histogram(ax, torch.tensor([[0.0, 1.0, -1.0, 2.0, -9.0]]), "x")
    assert inside == 3 / 5
    plt.close("all")


def test_threshold_grid_and_run_figures():
    runs = _runs()
    fig = viz.plot_threshold_grid(runs)
    assert len(fig.axes) == 4 * 2
    viz.plot_threshold_run(runs[("dynamic", 0.9, 8.0)], "dynamic 0.9", n=4)
    assert viz.threshold_label("dynamic", 0.995) == "dynamic 0.995" and viz.threshold_label("static") == "static"
    plt.close("all")


def test_thresholding_widget_redraws():
    from ipywidgets import SelectionSlider, ToggleButtons

    box = viz.thresholding_widget(_runs(), n=4)
    stack, found = [box], []
    while stack:
        w = stack.pop()
        if isinstance(w, (SelectionSlider, ToggleButtons)):
            found.append(w)
        stack.extend(getattr(w, "children", ()))
    assert len(found) == 3
    for w in found:
        w.value = w.options[0]
    plt.close("all")


def test_lesson_sized_figures_are_readable():
    """The lesson's grid (5 settings × 4 guidance scales) and run figure: no type under 8 pt, no overlaps."""
    g = torch.Generator().manual_seed(1)
    runs = {}
    for s in (1.0, 4.0, 8.0, 15.0):
        for m, p in (("none", None), ("static", None), ("dynamic", 0.9), ("dynamic", 0.99), ("dynamic", 0.995)):
            final = 2 * torch.randn(24, 3, 8, 8, generator=g)
            runs[(m, p, s)] = {"images": final.clamp(-1, 1), "final": final, "overall": 0.875,
                               "x0_raw": 5 * torch.randn(3, 24, 3, 8, 8, generator=g)}
    grid = viz.plot_threshold_grid(runs)
    assert viz.readability_problems(grid) == []
    assert grid.axes[0].get_title() == "s=1: 0.88 ± 0.07"  # overall ± √(p(1−p)/n), n = 24 images
    run = viz.plot_threshold_run(runs[("dynamic", 0.99, 15.0)], "dynamic 0.99, s=15")
    assert viz.readability_problems(run) == []
    assert "(n = 24)" in run._suptitle.get_text()
    plt.close("all")


def test_histogram_title_counts_real_overshoot_only():
    fig, ax = plt.subplots()
    viz.plot_value_histogram(ax, torch.tensor([[1.05, -1.05, 0.0, 2.9]]), "x")
    # 1.05 overshoots by a hair: not beyond ±1.1; the mean excess is (0.05 + 0.05 + 1.9) / 4
    assert ax.get_title().splitlines()[1] == "25.0% beyond ±1.1, mean excess 0.50"
    plt.close("all")
