"""Figures and the explorer widget of lesson 07 (MoVQ latents): reconstructions, latent channels, code usage.

Every function draws what it is given; the lesson computes the numbers beside it.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from kandlab.viz import _live_panel, _show, to_image


def plot_reconstructions(originals: torch.Tensor, reconstructions: torch.Tensor, psnr: Sequence[float],
                         suptitle: str, names: Sequence[str] | None = None) -> plt.Figure:
    """Originals (N, 3, H, W) above their reconstructions, each titled with its PSNR in dB."""
    n = len(originals)
    fig, axes = plt.subplots(2, n, figsize=(1.45 * n, 3.5), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(to_image(originals[i]), interpolation="nearest")
        axes[0, i].set_title(names[i] if names else "original", fontsize=8)
        axes[1, i].imshow(to_image(reconstructions[i]), interpolation="nearest")
        axes[1, i].set_title(f"{psnr[i]:.1f} dB", fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def _latent_panels(axes, image: torch.Tensor, z: torch.Tensor, indices: torch.Tensor, decoded: torch.Tensor,
                   limit: float, decoded_title: str) -> None:
    """One row: image | 4 latent channels | code indices | decoded image."""
    axes[0].imshow(to_image(image), interpolation="nearest")
    axes[0].set_title("image 3×64²", fontsize=8)
    for c in range(z.shape[0]):
        axes[1 + c].imshow(z[c].numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        axes[1 + c].set_title(f"latent ch {c}", fontsize=8)
    axes[1 + z.shape[0]].imshow(indices.numpy(), cmap="tab20", interpolation="nearest")
    axes[1 + z.shape[0]].set_title(f"codes ({len(indices.unique())} kinds)", fontsize=8)
    axes[2 + z.shape[0]].imshow(to_image(decoded), interpolation="nearest")
    axes[2 + z.shape[0]].set_title(decoded_title, fontsize=8)
    for ax in axes:
        ax.set_axis_off()


def plot_latent_channels(images: torch.Tensor, z: torch.Tensor, indices: torch.Tensor, decoded: torch.Tensor,
                         suptitle: str) -> plt.Figure:
    """Rows of image | the 4 latent channels (one shared colour scale) | code map | decoded.
    images (N, 3, H, W), z (N, 4, h, w), indices (N, h, w), decoded (N, 3, H, W)."""
    n, c = len(images), z.shape[1]
    limit = float(z.abs().max())
    fig, axes = plt.subplots(n, c + 3, figsize=(1.5 * (c + 3), 1.65 * n + 0.5), squeeze=False)
    for i in range(n):
        _latent_panels(axes[i], images[i], z[i], indices[i], decoded[i], limit, "decoded")
    fig.suptitle(f"{suptitle}  (colour scale ±{limit:.2f}, red > 0 > blue)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_code_usage(counts: dict[str, torch.Tensor], suptitle: str) -> plt.Figure:
    """Code frequencies, sorted from the most used code down, one line per model (log scale)."""
    fig, ax = plt.subplots(figsize=(7, 3))
    for label, c in counts.items():
        share = (c.double() / c.sum()).sort(descending=True).values.numpy()
        ax.plot(np.arange(1, len(share) + 1), np.where(share > 0, share, np.nan), label=label)
    ax.set_yscale("log")
    ax.set_xlabel("code rank (most used first)", fontsize=9)
    ax.set_ylabel("share of latent pixels", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=8)
    ax.set_title(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def movq_widget(movq, images: dict[str, torch.Tensor], noise_levels: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8),
                seed: int = 0):
    """Pick an image; see encode → 4 latent channels → nearest codes → decode, with a codebook toggle and a
    slider that adds Gaussian noise of standard deviation σ·std(z) to the latents before decoding.

    images: name → (3, H, W) in [-1, 1]. Every decode is one small forward (about 0.1 s on a CPU).
    """
    import ipywidgets as widgets

    from kandlab.train_movq import psnr

    names = list(images)
    pick = widgets.Dropdown(options=names, value=names[0], description="image")
    codebook = widgets.Checkbox(value=False, description="decode through the codebook")
    noise = widgets.SelectionSlider(options=list(noise_levels), value=noise_levels[0], description="noise σ/std(z)",
                                    continuous_update=False, style={"description_width": "initial"})
    with torch.no_grad():
        latents = {name: movq.encode(x[None])[0] for name, x in images.items()}  # (4, h, w) each
    limit = float(max(z.abs().max() for z in latents.values()))

    def draw() -> None:
        x, z = images[pick.value], latents[pick.value]
        g = torch.Generator().manual_seed(seed)
        noisy = z + noise.value * float(z.std()) * torch.randn(z.shape, generator=g)  # (4, h, w)
        with torch.no_grad():
            _, _, idx = movq.quantize(noisy[None])
            decoded = movq.decode(noisy[None], quantize=codebook.value)[0].clamp(-1, 1)
        fig, axes = plt.subplots(1, 7, figsize=(11.5, 2.3))
        mode = "codebook" if codebook.value else "no codebook"
        _latent_panels(axes, x, noisy, idx[0], decoded, limit,
                       f"{mode}: {float(psnr(x[None], decoded[None])):.1f} dB")
        fig.suptitle(f"{pick.value}: latent noise σ = {noise.value:g}·std(z)", fontsize=10)
        fig.tight_layout()
        _show(fig)

    return _live_panel([pick, [codebook, noise]], [pick, codebook, noise], draw)
