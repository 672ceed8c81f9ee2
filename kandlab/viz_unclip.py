"""Figures and widgets of lesson 08 (unCLIP): CLIP similarities, retrieval, binding outcomes, mixing.

Every function draws what it is given; the lesson computes the numbers beside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import textwrap

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from kandlab.viz import _live_panel, _show, to_image


def plot_similarity(sim: torch.Tensor, images: torch.Tensor, captions: Sequence[str], title: str) -> plt.Figure:
    """CLIP's cosine similarities (n images × n captions) as a heatmap, the images above their columns.
    sim (n, n) with sim[i, j] = cos(image i, caption j); the diagonal holds the true pairs."""
    n = len(images)
    fig = plt.figure(figsize=(0.9 * n + 2.6, 0.9 * n + 1.4))
    grid = fig.add_gridspec(2, 2, width_ratios=[2.6, 0.9 * n], height_ratios=[0.9, 0.9 * n], wspace=0.02, hspace=0.04,
                            left=0.02, right=0.98, top=0.9, bottom=0.06)
    strip = grid[0, 1].subgridspec(1, n, wspace=0.05)
    for j in range(n):
        ax = fig.add_subplot(strip[0, j])
        ax.imshow(to_image(images[j]), interpolation="nearest")
        ax.set_axis_off()
    ax = fig.add_subplot(grid[1, 1])
    ax.imshow(sim.T.numpy(), cmap="viridis", vmin=float(sim.min()), vmax=float(sim.max()), aspect="auto")
    for i in range(n):
        for j in range(n):
            ax.text(i, j, f"{float(sim[i, j]):.2f}", ha="center", va="center", fontsize=8,
                    color="black" if float(sim[i, j]) > float(sim.mean()) else "white")
    ax.set_yticks(range(n), [c if len(c) < 40 else c[:38] + "…" for c in captions], fontsize=8)
    ax.yaxis.tick_left()
    ax.set_xticks(range(n), [f"image {i}" for i in range(n)], fontsize=8)
    fig.suptitle(title + " (the number in each cell; brighter = more similar)", fontsize=10)
    return fig


def _wrap(text: str, width: int, lines: int) -> str:
    """``text`` in at most ``lines`` lines of ``width`` characters (the rest cut with an ellipsis)."""
    return "\n".join(textwrap.wrap(text, width, max_lines=lines, placeholder="…"))


def _top_k(clip, tokenizer, caption: str, image_embeds: torch.Tensor, k: int):
    batch = tokenizer([caption])
    with torch.no_grad():
        text = F.normalize(clip.text_tower(batch["input_ids"], batch["attention_mask"])[1], dim=-1)[0]
    sims = F.normalize(image_embeds, dim=-1) @ text  # (N,)
    order = sims.argsort(descending=True)[:k]
    return order, sims


def plot_retrieval(caption: str, images: torch.Tensor, order: torch.Tensor, sims: torch.Tensor,
                   captions: Sequence[str] | None = None) -> plt.Figure:
    """The k images nearest to a caption, best first, each with its cosine similarity (and true caption)."""
    k = len(order)
    fig, axes = plt.subplots(1, k, figsize=(1.5 * k, 2.4), squeeze=False)
    for ax, i in zip(axes[0], order.tolist()):
        ax.imshow(to_image(images[i]), interpolation="nearest")
        title = f"cos {float(sims[i]):.3f}"
        if captions is not None:
            title += "\n" + _wrap(captions[i], 18, 2)
        ax.set_title(title, fontsize=8)
        ax.set_axis_off()
    fig.suptitle(f"nearest images to “{caption}”", fontsize=10)
    fig.tight_layout()
    return fig


def retrieval_widget(clip, tokenizer, images: torch.Tensor, captions: Sequence[str], prompts: Sequence[str], k: int = 8):
    """Type a caption (or pick an example); see the k held-out images whose CLIP embeddings are nearest to its text
    embedding. images (N, 3, 64, 64); their embeddings are computed once."""
    import ipywidgets as widgets

    with torch.no_grad():
        embeds = torch.cat([clip.image_tower(images[i:i + 256])[1] for i in range(0, len(images), 256)])
    examples = widgets.Dropdown(options=list(prompts), value=prompts[0], description="example",
                                layout=widgets.Layout(width="520px"))
    text = widgets.Text(value=prompts[0], description="caption", continuous_update=False,
                        layout=widgets.Layout(width="520px"))
    examples.observe(lambda change: setattr(text, "value", change["new"]), names="value")

    def draw() -> None:
        try:
            order, sims = _top_k(clip, tokenizer, text.value, embeds, k)
        except ValueError as err:  # an empty caption or words the tokenizer does not know
            print(f"{err}")
            return
        _show(plot_retrieval(text.value, images, order, sims, captions))

    return _live_panel([examples, text], [text], draw)


def plot_binding(rates: Mapping[str, Mapping[str, float]], title: str) -> plt.Figure:
    """Bars of the binding outcomes (bound / swapped / other) per pipeline, with ±1 standard error of each share.
    rates: pipeline name → `shapes.binding_rates` output."""
    outcomes = ("bound", "swapped", "other")
    names = list(rates)
    x = np.arange(len(outcomes))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(6.4, 2.8))
    for k, name in enumerate(names):
        r = rates[name]
        shares = [r[o] for o in outcomes]
        se = [np.sqrt(s * (1 - s) / r["n"]) for s in shares]
        ax.bar(x + (k - (len(names) - 1) / 2) * width, shares, width, yerr=se, capsize=3, label=f"{name} (n = {r['n']})")
    ax.set_xticks(x, outcomes)
    ax.set_ylabel("share of two-shape prompts", fontsize=9)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_strip(images: torch.Tensor, labels: Sequence[str], title: str, rows: Sequence[str] | None = None) -> plt.Figure:
    """One or more rows of images with a label under each: images (R, K, 3, H, W) or (K, 3, H, W)."""
    if images.ndim == 4:
        images = images[None]
    R, K = images.shape[:2]
    fig, axes = plt.subplots(R, K, figsize=(1.3 * K + (1.2 if rows else 0), 1.45 * R + 0.4), squeeze=False)
    for r in range(R):
        for k in range(K):
            axes[r, k].imshow(to_image(images[r, k]), interpolation="nearest")
            axes[r, k].set_xticks([])
            axes[r, k].set_yticks([])
            if r == R - 1:
                axes[r, k].set_xlabel(labels[k], fontsize=8)
        if rows:
            axes[r, 0].set_ylabel(_wrap(rows[r], 16, 3), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def mixing_widget(pipe, items: Mapping[str, torch.Tensor | str], steps: int = 25, seed: int = 0,
                  weights: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)):
    """Pick two items (held-out images or prompts) and a weight w; see (1 − w)·e_A + w·e_B decoded, next to A and B.

    Images are embedded by CLIP's image tower, prompts by the prior (`UnCLIPPipeline.mix_embeddings`), and the
    mixture goes through the decoder alone — Kandinsky 2.1's ``interpolate``. "slerp" follows the arc between
    the two embeddings instead of the chord. Each decode is cached.
    """
    import ipywidgets as widgets

    from kandlab.unclip import slerp

    names = list(items)
    first = widgets.Dropdown(options=names, value=names[0], description="A")
    second = widgets.Dropdown(options=names, value=names[min(1, len(names) - 1)], description="B")
    w = widgets.SelectionSlider(options=list(weights), value=weights[len(weights) // 2], description="w (towards B)",
                                continuous_update=False, style={"description_width": "initial"})
    path = widgets.ToggleButtons(options=["lerp", "slerp"], value="lerp", description="path")
    embeds: dict[str, torch.Tensor] = {}
    decoded: dict[tuple, torch.Tensor] = {}

    def embedding(name: str) -> torch.Tensor:
        if name not in embeds:
            embeds[name] = pipe.mix_embeddings([items[name]], [1.0], seed=seed)[0]  # (P,)
        return embeds[name]

    def decode(key: tuple, e: torch.Tensor) -> torch.Tensor:
        if key not in decoded:
            decoded[key] = pipe.decode_embeddings(e[None], steps=steps, seed=seed)[0]
        return decoded[key]

    def draw() -> None:
        a, b = embedding(first.value), embedding(second.value)
        mixed = slerp(a, b, w.value) if path.value == "slerp" else (1 - w.value) * a + w.value * b
        shown = [decode((first.value, "lerp", 0.0), a), decode((first.value, second.value, path.value, w.value), mixed),
                 decode((second.value, "lerp", 0.0), b)]
        fig, axes = plt.subplots(1, 3, figsize=(6.0, 2.4))
        for ax, image, label in zip(axes, shown, ["A decoded", f"{path.value}, w = {w.value:g}", "B decoded"]):
            ax.imshow(to_image(image), interpolation="nearest")
            ax.set_title(label, fontsize=8)
            ax.set_axis_off()
        fig.suptitle(f"A = {first.value[:34]}  ·  B = {second.value[:34]}", fontsize=8)
        fig.tight_layout()
        _show(fig)

    return _live_panel([[first, second], [w, path]], [first, second, w, path], draw)
