"""Figures and the widget of lesson 09: memory plans and a step-by-step latent preview."""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import torch

from kandlab.viz import _live_panel, _show, to_image


def plot_plans(plans: dict[float, "object"],
               title: str = "Kandinsky 3 in bf16 at 1024²: peak GPU memory") -> plt.Figure:
    """One bar per strategy (peak GiB), one dashed line per GPU at its usable memory; ``plans``: GB → `Plan`."""
    first = next(iter(plans.values()))
    names = [s.name for s in first.strategies]
    peaks = [s.peak_gib for s in first.strategies]  # the peaks do not depend on the GPU
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.barh(range(len(names)), peaks, color="C0", alpha=0.8)
    for i, p in enumerate(peaks):
        ax.text(p + 0.3, i, f"{p:.1f} GiB", va="center", fontsize=8)
    for k, (gb, plan) in enumerate(plans.items()):
        ax.axvline(plan.usable_gib, color=f"C{k + 1}", ls="--", lw=1)
        ax.text(plan.usable_gib + 0.4, -0.85 + 0.3 * (k % 2), f"{gb:g} GB GPU", color=f"C{k + 1}", fontsize=8)
    ax.set_xlim(0, max(max(peaks), *(plan.usable_gib for plan in plans.values())) * 1.15)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_ylim(len(names) - 0.5, -1.0)  # first strategy on top, room above it for the GPUs' labels
    ax.set_xlabel("GiB on the GPU at the busiest moment (weights + activation estimate)\n"
                  "dashed: the memory each GPU leaves usable", fontsize=9)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def preview_widget(trajectories: dict[str, Sequence], preview, decode, scale: float = 1.0, names: Sequence[str] = ()):
    """Step through sampling trajectories (``sampler name → [TrajectoryStep, ...]`` of latents): at each step the
    cheap linear preview of x_t, the full MoVQ decode of x_t and the decode of the predicted x̂₀.

    ``preview``: a `kandinsky3.LatentPreview` (latents → RGB in [0, 1]); ``decode``: latents → images in [-1, 1];
    ``scale``: the factor the model's latents carry (divided out before the MoVQ sees them).
    """
    import ipywidgets as widgets

    samplers = list(trajectories)
    steps = len(next(iter(trajectories.values())))
    pick = widgets.ToggleButtons(options=samplers, value=samplers[0], description="sampler")
    step = widgets.IntSlider(value=0, min=0, max=steps - 1, description="step", continuous_update=False)
    image = widgets.IntSlider(value=0, min=0, max=len(next(iter(trajectories.values()))[0].x_t) - 1,
                              description="image", continuous_update=False)

    def draw() -> None:
        frame = trajectories[pick.value][step.value]
        z = frame.x_t[image.value: image.value + 1] / scale
        z0 = frame.x0_hat[image.value: image.value + 1] / scale
        with torch.no_grad():
            rgb = preview(z)[0]
            full, clean = decode(z)[0].clamp(-1, 1), decode(z0)[0].clamp(-1, 1)
        fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.8))
        for ax, img, title in ((axes[0], rgb.permute(1, 2, 0).numpy(), "linear preview of $x_t$"),
                               (axes[1], to_image(full), "MoVQ decode of $x_t$"),
                               (axes[2], to_image(clean), r"decode of $\hat x_0$")):
            ax.imshow(img, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        label = names[image.value] if names else ""
        t = frame.t if frame.t >= 0 else "final"
        fig.suptitle(f"{pick.value}, step {step.value + 1} of {steps} (t = {t}) {label}", fontsize=9)
        fig.tight_layout()
        _show(fig)

    return _live_panel([[pick], [step, image]], [pick, step, image], draw)
