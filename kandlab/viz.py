"""Figures and ipywidgets used by the lessons.

Every widget is a thin shell around a plain function that returns a matplotlib
figure (``plot_*``), so the same picture can be rendered to PNG, tested, and
looked at without a browser.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

# ---------------------------------------------------------------------------
# Images


def to_image(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """(C, H, W) tensor in [-1, 1] → (H, W, C) float array in [0, 1] for imshow."""
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    if x.ndim != 3:
        raise ValueError(f"expected one image (C, H, W), got shape {x.shape}")
    if x.shape[0] in (1, 3):
        x = np.moveaxis(x, 0, -1)
    return np.clip((x + 1) / 2, 0, 1).squeeze()


def show_images(
    images: torch.Tensor | Sequence[torch.Tensor],
    titles: Sequence[str] | None = None,
    ncols: int = 8,
    size: float = 1.4,
    suptitle: str | None = None,
    fontsize: int = 7,
) -> plt.Figure:
    """A grid of (C, H, W) images in [-1, 1] with optional titles."""
    images = list(images)
    n = len(images)
    ncols = min(ncols, n)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + (0.3 if titles else 0)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(to_image(images[i]), interpolation="nearest", cmap="gray")
            if titles is not None:
                ax.set_title(titles[i], fontsize=fontsize)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------
# Lesson 00: the pipeline at a glance


def pipeline_diagram() -> plt.Figure:
    """The Kandinsky 3 text-to-image pipeline as boxes and arrows."""
    fig, ax = plt.subplots(figsize=(11, 3.2))
    ax.set_xlim(0, 11)
    ax.set_ylim(0, 3.2)
    ax.axis("off")
    boxes = [
        (0.1, "prompt", '"two red circles\nabove a blue square"', "#eeeeee"),
        (2.2, "text encoder", "Flan-UL2 encoder (T5)\n8.6 B · 128 tokens × 4096\nlesson 04", "#cfe2f3"),
        (4.6, "UNet over latents", "3.0 B · 4 × 128 × 128\n25 denoising steps + CFG\nlessons 01–06, 09", "#f4cccc"),
        (7.0, "MoVQ decoder", "≈ 267 M · latents → pixels\n× 8 upsampling\nlesson 07", "#d9ead3"),
        (9.2, "image", "1024 × 1024 RGB", "#eeeeee"),
    ]
    width = {0.1: 1.7, 2.2: 2.0, 4.6: 2.0, 7.0: 1.8, 9.2: 1.6}
    for x, title, body, colour in boxes:
        ax.add_patch(FancyBboxPatch((x, 0.9), width[x], 1.6, boxstyle="round,pad=0.05", fc=colour, ec="#444444"))
        ax.text(x + width[x] / 2, 2.2, title, ha="center", va="center", fontsize=10, weight="bold")
        ax.text(x + width[x] / 2, 1.45, body, ha="center", va="center", fontsize=8)
    for (x0, *_), (x1, *_) in zip(boxes[:-1], boxes[1:]):
        ax.add_patch(FancyArrowPatch((x0 + width[x0] + 0.08, 1.7), (x1 - 0.08, 1.7), arrowstyle="-|>", mutation_scale=14, color="#444444"))
    ax.annotate("", xy=(5.6, 0.85), xytext=(5.6, 0.35), arrowprops=dict(arrowstyle="-|>", color="#444444"))
    ax.text(5.6, 0.2, "start: pure Gaussian noise", ha="center", fontsize=8)
    ax.text(5.5, 3.0, "Kandinsky 3: text → latent diffusion → image  (11.9 B parameters in all)", ha="center", fontsize=11)
    return fig


# ---------------------------------------------------------------------------
# Lesson 01: forward diffusion


def plot_forward_step(
    x0: torch.Tensor,
    t: int,
    alpha_bar: torch.Tensor,
    noise: torch.Tensor,
    schedule_name: str = "",
) -> plt.Figure:
    r"""The image at step t, its pixel histogram, and where t sits on the SNR curve.

    x_t = \sqrt{\bar\alpha_t} x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon  (DDPM eq. 4).
    """
    a = float(alpha_bar[t])
    x_t = a**0.5 * x0 + (1 - a) ** 0.5 * noise  # (C, H, W)
    snr_db = 10 * torch.log10(alpha_bar / (1 - alpha_bar))  # (T,)

    fig, (ax_img, ax_hist, ax_snr) = plt.subplots(1, 3, figsize=(11, 3.3), gridspec_kw={"width_ratios": [1, 1.3, 1.3]})
    ax_img.imshow(to_image(x_t.clamp(-1, 1)), interpolation="nearest", cmap="gray")
    ax_img.set_title(f"x_t at t = {t}", fontsize=10)
    ax_img.axis("off")

    bins = np.linspace(-4, 4, 81)
    ax_hist.hist(x0.flatten().numpy(), bins=bins, alpha=0.5, label="x₀", color="#1f77b4", density=True)
    ax_hist.hist(x_t.flatten().numpy(), bins=bins, alpha=0.5, label=f"x_{t}", color="#d62728", density=True)
    grid = np.linspace(-4, 4, 200)
    ax_hist.plot(grid, np.exp(-grid**2 / 2) / np.sqrt(2 * np.pi), "k--", lw=1, label="N(0, 1)")
    ax_hist.set_title("pixel histogram", fontsize=10)
    ax_hist.legend(fontsize=8)
    ax_hist.set_ylim(0, 2.5)

    ax_snr.plot(snr_db.numpy(), color="#555555")
    ax_snr.axvline(t, color="#d62728")
    ax_snr.axhline(0, color="#aaaaaa", lw=0.8)
    ax_snr.set_title(f"SNR = {snr_db[t]:.1f} dB   (ᾱ_t = {a:.3f})", fontsize=10)
    ax_snr.set_xlabel("t")
    ax_snr.set_ylabel("10·log10(ᾱ/(1−ᾱ))  [dB]")
    fig.suptitle(schedule_name, fontsize=10)
    fig.tight_layout()
    return fig


def forward_diffusion_widget(images: dict[str, torch.Tensor], schedules: dict[str, torch.Tensor], seed: int = 0):
    """Slider over t (and pickers for image and schedule) driving :func:`plot_forward_step`."""
    import ipywidgets as widgets
    from IPython.display import display

    first = next(iter(schedules.values()))
    T = len(first)
    noises = {name: torch.randn(img.shape, generator=torch.Generator().manual_seed(seed)) for name, img in images.items()}
    t_slider = widgets.IntSlider(value=T // 4, min=0, max=T - 1, step=1, description="t", continuous_update=False,
                                 layout=widgets.Layout(width="60%"))
    image_pick = widgets.Dropdown(options=list(images), description="image")
    schedule_pick = widgets.Dropdown(options=list(schedules), description="schedule")
    out = widgets.Output()

    def redraw(*_):
        with out:
            out.clear_output(wait=True)
            fig = plot_forward_step(images[image_pick.value], t_slider.value, schedules[schedule_pick.value],
                                    noises[image_pick.value], schedule_pick.value)
            plt.show(fig)

    for w in (t_slider, image_pick, schedule_pick):
        w.observe(redraw, names="value")
    redraw()
    box = widgets.VBox([widgets.HBox([image_pick, schedule_pick]), t_slider, out])
    display(box)
    return box


# ---------------------------------------------------------------------------
# Lesson 00: the shapes world


def plot_shapes_item(image: torch.Tensor, caption: str) -> plt.Figure:
    """One shapes image, enlarged, with what ShapesBench detects in it."""
    from kandlab import shapes

    verdict = shapes.score_per_image(image[None], [caption])[0]
    blobs = shapes.detect(image)
    fig, (ax_img, ax_txt) = plt.subplots(1, 2, figsize=(7, 3.2), gridspec_kw={"width_ratios": [1, 1.2]})
    ax_img.imshow(to_image(image), interpolation="nearest")
    ax_img.set_title(caption, fontsize=9)
    ax_img.axis("off")
    ax_txt.axis("off")
    lines = ["ShapesBench sees:"] + [f"  {b.colour} {b.shape} ({b.area} px)" for b in blobs]
    lines += ["", "verdict:"] + [f"  {k:9s} {'✓' if v else '✗'}" for k, v in verdict.items()]
    ax_txt.text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=9)
    fig.tight_layout()
    return fig


def shapes_browser(dataset, start: int = 0):
    """Slider over dataset indices showing :func:`plot_shapes_item`."""
    import ipywidgets as widgets
    from IPython.display import display

    index = widgets.IntSlider(value=start, min=0, max=len(dataset) - 1, description="index", continuous_update=False)
    out = widgets.Output()

    def redraw(*_):
        with out:
            out.clear_output(wait=True)
            plt.show(plot_shapes_item(*dataset[index.value]))

    index.observe(redraw, names="value")
    redraw()
    box = widgets.VBox([index, out])
    display(box)
    return box
