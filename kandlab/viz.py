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


def _show(fig: plt.Figure) -> None:
    """Display a figure inside a widget's Output and free it (works with any backend)."""
    from IPython.display import display

    display(fig)
    plt.close(fig)


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
            _show(fig)

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
            _show(plot_shapes_item(*dataset[index.value]))

    index.observe(redraw, names="value")
    redraw()
    box = widgets.VBox([index, out])
    display(box)
    return box


# ---------------------------------------------------------------------------
# Lesson 02: denoising trajectories


def plot_trajectory_step(trajectory, i: int, n: int = 8) -> plt.Figure:
    """Row 1: x_t at step i of a sampling trajectory; row 2: the model's x̂₀ at that step.

    ``trajectory`` is the list of ``TrajectoryStep(t, x_t, x0_hat)`` returned by
    ``GaussianDiffusion.sample(..., return_trajectory=True)``.
    """
    step = trajectory[i]
    n = min(n, step.x_t.shape[0])
    fig, axes = plt.subplots(2, n, figsize=(1.3 * n, 3.0), squeeze=False)
    for j in range(n):
        axes[0, j].imshow(to_image(step.x_t[j].clamp(-1, 1)), interpolation="nearest")
        axes[1, j].imshow(to_image(step.x0_hat[j].clamp(-1, 1)), interpolation="nearest")
        axes[0, j].axis("off")
        axes[1, j].axis("off")
    label = "final sample" if step.t < 0 else f"t = {step.t}"
    axes[0, 0].set_title(f"x_t   ({label}, step {i + 1}/{len(trajectory)})", fontsize=9, loc="left")
    axes[1, 0].set_title("predicted x̂₀", fontsize=9, loc="left")
    fig.tight_layout()
    return fig


def trajectory_widget(trajectory, n: int = 8):
    """A slider that scrubs through a denoising trajectory (x_t above, x̂₀ below)."""
    import ipywidgets as widgets
    from IPython.display import display

    step = widgets.IntSlider(value=0, min=0, max=len(trajectory) - 1, description="step",
                             continuous_update=False, layout=widgets.Layout(width="60%"))
    play = widgets.Play(value=0, min=0, max=len(trajectory) - 1, interval=300)
    widgets.jslink((play, "value"), (step, "value"))
    out = widgets.Output()

    def redraw(*_):
        with out:
            out.clear_output(wait=True)
            _show(plot_trajectory_step(trajectory, step.value, n))

    step.observe(redraw, names="value")
    redraw()
    box = widgets.VBox([widgets.HBox([play, step]), out])
    display(box)
    return box


# ---------------------------------------------------------------------------
# Lesson 03: inside the UNet


def parameter_breakdown(model: torch.nn.Module) -> dict[str, dict[str, int]]:
    """Parameters of a kandlab UNet per place (stem, each down/up level, head) and block type.

    Block types: ``resnet``, ``self-attention``, ``cross-attention``, ``other`` (convs,
    norms, embeddings). Works on the ``meta`` device, so the 3B model costs no memory.
    """
    from kandlab.unet import AttentionBlock, DownLevel, ResNetBlock, UpLevel

    table: dict[str, dict[str, int]] = {}
    levels = {id(m): f"down {i}" for i, m in enumerate(getattr(model, "down", []))}
    n_up = len(getattr(model, "up", []))
    levels.update({id(m): f"up {n_up - 1 - i}" for i, m in enumerate(getattr(model, "up", []))})

    def kind(module: torch.nn.Module, name: str) -> str:
        if isinstance(module, ResNetBlock):
            return "resnet"
        if isinstance(module, AttentionBlock):
            return "cross-attention" if "cross" in name else "self-attention"
        return "other"

    for top_name, top in model.named_children():
        if isinstance(top, torch.nn.ModuleList):
            for sub in top:
                place = levels.get(id(sub), top_name)
                row = table.setdefault(place, {})
                assert isinstance(sub, (DownLevel, UpLevel))
                for name, child in sub.named_children():
                    modules = child if isinstance(child, torch.nn.ModuleList) else [child]
                    for m in modules:
                        k = kind(m, name)
                        row[k] = row.get(k, 0) + sum(p.numel() for p in m.parameters())
        else:
            place = {"time_embedding": "time embedding", "text_projection": "text projection",
                     "attention_pooling": "attention pooling"}.get(top_name, "stem / head convs")
            row = table.setdefault(place, {})
            row["other"] = row.get("other", 0) + sum(p.numel() for p in top.parameters())
    return table


def plot_parameter_breakdown(tables: dict[str, dict[str, dict[str, int]]]) -> plt.Figure:
    """Side-by-side stacked bars of :func:`parameter_breakdown` for several models (share of total)."""
    kinds = ["resnet", "self-attention", "cross-attention", "other"]
    colours = {"resnet": "#4c72b0", "self-attention": "#dd8452", "cross-attention": "#55a868", "other": "#999999"}
    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 3.8), squeeze=False)
    for ax, (title, table) in zip(axes[0], tables.items()):
        total = sum(sum(r.values()) for r in table.values())
        places = list(table)
        left = np.zeros(len(places))
        for k in kinds:
            vals = np.array([table[p].get(k, 0) / total * 100 for p in places])
            ax.barh(places, vals, left=left, color=colours[k], label=k)
            left += vals
        ax.invert_yaxis()
        ax.set_xlim(0, left.max() * 1.08)
        ax.set_xlabel("% of all parameters")
        ax.set_title(f"{title}: {total:,} parameters", fontsize=10)
    axes[0, 0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


@torch.no_grad()
def cross_attention_maps(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                         text_mask: torch.Tensor | None = None) -> list[tuple[str, torch.Tensor]]:
    r"""Run the UNet once and return every cross-attention's weights, averaged over heads.

    softmax(QKᵀ/√d + M) is recomputed from the inputs each cross-attention receives
    (the model itself uses the fused ``scaled_dot_product_attention``, which does
    not expose the weights). Returns ``[(name, (B, H, W, L))]`` in execution order.
    """
    from kandlab.unet import Attention, AttentionBlock

    captured: list[tuple[str, torch.Tensor]] = []
    hooks = []
    for name, block in model.named_modules():
        if isinstance(block, AttentionBlock) and "cross" in name:
            attn: Attention = block.attention

            def hook(module, args, _out, name=name):
                q_in, context = args[0], args[1]
                mask_bias = args[2] if len(args) > 2 else None
                B, N, _ = q_in.shape
                L = context.shape[1]
                h, d = module.heads, module.head_dim
                q = module.to_q(q_in).view(B, N, h, d).transpose(1, 2)  # (B, h, N, d)
                k = module.to_k(context).view(B, L, h, d).transpose(1, 2)  # (B, h, L, d)
                scores = q @ k.transpose(-1, -2) / d**0.5  # (B, h, N, L)
                if mask_bias is not None:
                    scores = scores + mask_bias
                captured.append((name, scores.softmax(-1).mean(1)))  # (B, N, L)

            hooks.append(attn.register_forward_hook(hook))
    try:
        model(x, t, text, text_mask)
    finally:
        for hk in hooks:
            hk.remove()
    out = []
    for name, probs in captured:  # (B, N, L) → (B, H, W, L)
        side = int(round(probs.shape[1] ** 0.5))
        out.append((name, probs.reshape(probs.shape[0], side, side, probs.shape[-1])))
    return out


def plot_cross_attention(image: torch.Tensor, maps: list[tuple[str, torch.Tensor]], tokens: Sequence[str],
                         token_index: int, sample: int = 0) -> plt.Figure:
    """The image and, for one text token, its attention map at every cross-attention layer."""
    n = len(maps)
    fig, axes = plt.subplots(1, n + 1, figsize=(1.6 * (n + 1), 2.1))
    axes[0].imshow(to_image(image), interpolation="nearest")
    axes[0].set_title("x_t" if image.abs().max() > 1.05 else "image", fontsize=8)
    for ax, (name, m) in zip(axes[1:], maps):
        ax.imshow(m[sample, :, :, token_index].numpy(), cmap="magma", vmin=0, interpolation="nearest")
        path = "down" if name.startswith("down") else "up"
        ax.set_title(f"{path} {m.shape[1]}×{m.shape[2]}", fontsize=7)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"cross-attention to token {token_index}: {tokens[token_index]!r}", fontsize=9)
    fig.tight_layout()
    return fig


def cross_attention_widget(images: torch.Tensor, maps_per_t: dict[int, list[tuple[str, torch.Tensor]]],
                           tokens: Sequence[str]):
    """Pick a text token and a timestep; see that token's attention map at every level."""
    import ipywidgets as widgets
    from IPython.display import display

    token = widgets.Dropdown(options=[(f"{i}: {tok}", i) for i, tok in enumerate(tokens)], description="token")
    t_pick = widgets.SelectionSlider(options=sorted(maps_per_t), description="t", continuous_update=False)
    out = widgets.Output()

    def redraw(*_):
        with out:
            out.clear_output(wait=True)
            _show(plot_cross_attention(images[t_pick.value], maps_per_t[t_pick.value], tokens, token.value))

    token.observe(redraw, names="value")
    t_pick.observe(redraw, names="value")
    redraw()
    box = widgets.VBox([widgets.HBox([token, t_pick]), out])
    display(box)
    return box
