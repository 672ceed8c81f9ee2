"""Figures and ipywidgets used by the lessons.

Every widget is a thin shell around a plain function that returns a matplotlib
figure (``plot_*``), so the same picture can be rendered to PNG, tested, and
looked at without a browser.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
from matplotlib.text import Text

from kandlab.course import share_se
from kandlab.diffusion import out_of_range, overshoot

# ---------------------------------------------------------------------------
# Readable figures: every lesson figure is checked when a lesson is executed

MIN_FONT_PT = 8.0  # the smallest type a committed figure may use
UNREADABLE = "⚠ figure not readable"  # the marker tests look for in committed outputs


def _drawn_texts(fig: plt.Figure) -> list[tuple[Text, "object"]]:
    """Draw ``fig`` and return every non-empty text it actually drew, with its box in pixels.

    Only drawn texts count: matplotlib keeps spare tick-label objects that it never draws.
    """
    drawn: list[tuple[Text, object]] = []
    draw = Text.draw

    def recording_draw(text: Text, renderer) -> None:
        draw(text, renderer)
        if text.get_visible() and text.get_text().strip():
            drawn.append((text, text.get_window_extent(renderer)))

    Text.draw = recording_draw  # only for this one draw; restored below
    try:
        fig.canvas.draw()
    finally:
        Text.draw = draw
    return drawn


def readability_problems(fig: plt.Figure, min_font_pt: float = MIN_FONT_PT) -> list[str]:
    """What makes ``fig`` hard to read: type smaller than ``min_font_pt`` and texts drawn over each other.

    Two texts overlap when their boxes share more than a fifth of the smaller box (rotated
    tick labels touch at their corners without clashing). Returns [] for a readable figure.
    """
    drawn = _drawn_texts(fig)
    problems = [f"{t.get_text()!r} is set in {t.get_fontsize():.1f} pt (at least {min_font_pt:g} pt)"
                for t, _ in drawn if t.get_fontsize() < min_font_pt - 1e-6]
    for i, (a, box_a) in enumerate(drawn):
        for b, box_b in drawn[i + 1:]:
            w = min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0)
            h = min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0)
            smaller = min(box_a.width * box_a.height, box_b.width * box_b.height)
            if w > 1 and h > 1 and w * h > 0.2 * smaller:
                problems.append(f"{a.get_text()!r} and {b.get_text()!r} are drawn over each other")
    return problems


def _checked_print_figure(print_figure):
    """Wrap ``FigureCanvasBase.print_figure`` so every figure a lesson shows is checked first."""

    def checked(canvas, *args, **kwargs):
        problems = readability_problems(canvas.figure)
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            print(f"{UNREADABLE}: {shown}", file=sys.stderr)
        return print_figure(canvas, *args, **kwargs)

    checked.kandlab_checked = True
    return checked


# `python -m kandlab.course execute` sets KANDLAB_CHECK_FIGURES=1 in the kernel: then every figure a
# lesson displays is checked, and a problem is printed into the committed outputs, where a test finds it.
if os.environ.get("KANDLAB_CHECK_FIGURES") == "1" and not getattr(FigureCanvasBase.print_figure, "kandlab_checked", False):
    FigureCanvasBase.print_figure = _checked_print_figure(FigureCanvasBase.print_figure)

# ---------------------------------------------------------------------------
# Images


def _show(fig: plt.Figure) -> None:
    """Display a figure inside a widget's Output and free it (works with any backend)."""
    from IPython.display import display

    display(fig)
    plt.close(fig)


def _live_panel(rows: list, controls: list, draw) -> "widgets.VBox":
    """Lay out ``rows`` (widgets, or lists of widgets shown side by side) above an output
    area; call ``draw()`` into it now and whenever a control's value changes; display
    and return the panel."""
    import ipywidgets as widgets
    from IPython.display import display

    out = widgets.Output()

    def redraw(*_):
        with out:
            out.clear_output(wait=True)
            draw()

    for control in controls:
        control.observe(redraw, names="value")
    redraw()
    box = widgets.VBox([widgets.HBox(r) if isinstance(r, list) else r for r in rows] + [out])
    display(box)
    return box


def to_display_range(x: torch.Tensor) -> torch.Tensor:
    """Model range [-1, 1] → display range [0, 1], clipping what overshoots.  Any shape → same shape."""
    return ((x + 1) / 2).clamp(0, 1)


def to_image(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """(C, H, W) tensor in [-1, 1] → (H, W, C) float array in [0, 1] for imshow."""
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    if x.ndim != 3:
        raise ValueError(f"expected one image (C, H, W), got shape {x.shape}")
    if x.shape[0] in (1, 3):
        x = np.moveaxis(x, 0, -1)
    return to_display_range(torch.from_numpy(np.ascontiguousarray(x))).numpy().squeeze()


def show_images(
    images: torch.Tensor | Sequence[torch.Tensor],
    titles: Sequence[str] | None = None,
    ncols: int = 8,
    size: float = 1.4,
    suptitle: str | None = None,
    fontsize: int = 8,
) -> plt.Figure:
    """A grid of (C, H, W) images in [-1, 1] with optional titles (``fontsize`` ≥ 8 pt stays readable)."""
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
        (7.0, "MoVQ decoder", "≈ 267 M parameters\nlatents → pixels (× 8)\nlesson 07", "#d9ead3"),
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
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=9, loc="lower center", ncol=len(kinds), frameon=False)  # below, clear of the bars
    fig.tight_layout(rect=(0, 0.07, 1, 1))
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
                         token_index: int, sample: int = 0, note: str | None = None) -> plt.Figure:
    """The image and, for one text token, its attention map at every cross-attention layer.

    One row for the down path and one for the up path (in execution order), each panel titled
    with its resolution; all maps share one colour scale (the share of a pixel's attention that
    goes to the token, 0–1 summed over tokens), shown by the colour bar. ``note`` is printed
    under the title (e.g. where the weights come from).
    """
    rows = {"down": [(n, m) for n, m in maps if n.startswith("down")],
            "up": [(n, m) for n, m in maps if not n.startswith("down")]}
    rows = {k: v for k, v in rows.items() if v}
    ncols = max((len(v) for v in rows.values()), default=1)
    nrows = max(len(rows), 1)
    vmax = max((float(m[sample, :, :, token_index].max()) for _, m in maps), default=1.0) or 1.0
    fig, axes = plt.subplots(nrows, ncols + 1, figsize=(1.45 * (ncols + 1) + 1.0, 1.75 * nrows + 0.8), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(to_image(image), interpolation="nearest")
    axes[0, 0].set_title("x_t" if image.abs().max() > 1.05 else "image", fontsize=9)
    shown = None
    for r, (path, row) in enumerate(rows.items()):
        axes[r, 1].text(-0.12, 0.5, path, transform=axes[r, 1].transAxes, rotation=90, ha="right", va="center",
                        fontsize=10, weight="bold")
        for c, (name, m) in enumerate(row):
            ax = axes[r, c + 1]
            shown = ax.imshow(m[sample, :, :, token_index].numpy(), cmap="magma", vmin=0, vmax=vmax,
                              interpolation="nearest")
            ax.set_title(f"{m.shape[1]}×{m.shape[2]}", fontsize=9)
    title = f"cross-attention to token {token_index}: {tokens[token_index]!r}"
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=10)
    if shown is not None:
        bar = fig.colorbar(shown, ax=axes[:, 1:].ravel().tolist(), fraction=0.03, pad=0.02)
        bar.set_label("attention share", fontsize=9)
        bar.ax.tick_params(labelsize=8)
    return fig


def cross_attention_widget(images: torch.Tensor, maps_per_t: dict[int, list[tuple[str, torch.Tensor]]],
                           tokens: Sequence[str]):
    """Pick a text token and a timestep; see that token's attention map at every level."""
    import ipywidgets as widgets

    token = widgets.Dropdown(options=[(f"{i}: {tok}", i) for i, tok in enumerate(tokens)], description="token")
    t_pick = widgets.SelectionSlider(options=sorted(maps_per_t), description="t", continuous_update=False)
    return _live_panel([[token, t_pick]], [token, t_pick], lambda: _show(
        plot_cross_attention(images[t_pick.value], maps_per_t[t_pick.value], tokens, token.value)))


# ---------------------------------------------------------------------------
# Lesson 05: classifier-free guidance

_CATEGORIES = ("colour", "shape", "count", "position", "overall")


def _score_line(score: dict[str, float]) -> str:
    """'colour 0.88 · shape 0.75 · …' with '—' for a category that does not apply (nan)."""
    return " · ".join(f"{k} {'—' if np.isnan(score[k]) else f'{score[k]:.2f}'}" for k in _CATEGORIES)


def plot_rows(rows: dict[str, torch.Tensor], col_titles: Sequence[str] | None = None, size: float = 1.4,
              suptitle: str | None = None) -> plt.Figure:
    """Rows of images side by side, each labelled on the left, e.g. the same seeds under
    different guidance. ``rows`` maps a label to images (N, C, H, W) in [-1, 1]; all rows
    have the same N. ``col_titles`` (N strings, e.g. the prompts) are wrapped above the first row."""
    import textwrap

    if not rows:
        raise ValueError("rows is empty; pass e.g. {'s = 0': images, 's = 1': images}")
    ncols = {len(images) for images in rows.values()}
    if len(ncols) != 1:
        raise ValueError(f"every row needs the same number of images, got {sorted(ncols)}")
    (ncols,) = ncols
    if col_titles is not None and len(col_titles) != ncols:
        raise ValueError(f"got {len(col_titles)} column titles for {ncols} columns")
    width = max(8, int(size * 12))  # characters of 8 pt type that fit above one image
    titles = ["\n".join(textwrap.wrap(t, width)) for t in col_titles] if col_titles is not None else None
    top = 0.16 * max(t.count("\n") + 1 for t in titles) + 0.1 if titles else 0.0  # inches of 8 pt lines
    fig, axes = plt.subplots(len(rows), ncols, figsize=(size * ncols + 0.9, size * len(rows) + top + 0.3),
                             squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for c in range(ncols):
            ax = axes[r, c]
            ax.imshow(to_image(images[c]), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if r == 0 and titles is not None:
                ax.set_title(titles[c], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def plot_guidance_sweep(scales: Sequence[float], scores: Sequence[dict[str, float]],
                        diversities: Sequence[float], title: str = "", n_images: int | None = None,
                        diversity_se: Sequence[float] | None = None) -> plt.Figure:
    """ShapesBench per category (left) and sample diversity (right) against the guidance scale s.

    ``n_images`` (images scored per scale) adds ±1 standard-error bars √(p(1−p)/n) to the overall
    score; ``diversity_se`` (one standard error per scale) adds them to the diversity.
    """
    if not (len(scales) == len(scores) == len(diversities)) or len(scales) == 0:
        raise ValueError("scales, scores and diversities must be non-empty and of the same length")
    if diversity_se is not None and len(diversity_se) != len(scales):
        raise ValueError(f"got {len(diversity_se)} diversity standard errors for {len(scales)} scales")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for k in _CATEGORIES:
        values = [s[k] for s in scores]
        if k == "overall" and n_images:
            se = [share_se(v, n_images) for v in values]
            left.errorbar(scales, values, yerr=se, fmt="o-", lw=2.5, color="black", ms=4, capsize=3,
                          label=f"overall (±1 SE, n = {n_images})")
        else:
            left.plot(scales, values, "o-", lw=2.5 if k == "overall" else 1.2,
                      color="black" if k == "overall" else None, label=k, ms=4)
    left.set(xlabel="guidance scale s", ylabel="ShapesBench accuracy", ylim=(-0.03, 1.03),
             title="fidelity: ShapesBench per category")
    left.axvline(1.0, color="grey", ls=":", lw=1)
    left.legend(fontsize=8, ncol=2, loc="lower right")
    if diversity_se is not None:
        right.errorbar(scales, diversities, yerr=list(diversity_se), fmt="o-", color="tab:purple", capsize=3,
                       label="±1 SE over prompts")
        right.legend(fontsize=8, loc="upper right")
    else:
        right.plot(scales, diversities, "o-", color="tab:purple")
    right.set(xlabel="guidance scale s", ylabel="mean pairwise |Δpixel| (0–1)", ylim=(0, None),
              title="diversity: same prompt, different seeds")
    right.axvline(1.0, color="grey", ls=":", lw=1)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_count_confusion(matrices: dict[str, np.ndarray | Sequence[Sequence[int]]], title: str = "") -> plt.Figure:
    """One panel per model: `shapes.count_confusion` as row shares (what fraction of the groups asked
    for k objects were drawn with j), the raw counts written in each cell. The diagonal is right;
    right of it is over-counting."""
    from kandlab import shapes

    if not matrices:
        raise ValueError("give at least one confusion matrix, e.g. {'shipped': shapes.count_confusion(images, prompts)}")
    fig, axes = plt.subplots(1, len(matrices), figsize=(3.9 * len(matrices) + 0.8, 3.3), squeeze=False,
                             layout="constrained")
    for ax, (label, matrix) in zip(axes[0], matrices.items()):
        m = np.asarray(matrix, dtype=float)  # (3, MAX_DRAWN + 1)
        share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
        shown = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (k, j), n in np.ndenumerate(m):
            ax.text(j, k, f"{share[k, j]:.0%}\n({int(n)})", ha="center", va="center", fontsize=8,
                    color="white" if share[k, j] > 0.6 else "black")
        for k in range(len(m)):  # outline the right answer
            ax.add_patch(plt.Rectangle((k + 0.5, k - 0.5), 1, 1, fill=False, ec="tab:green", lw=2))
        ax.set_xticks(range(m.shape[1]), [*map(str, range(m.shape[1] - 1)), f"{m.shape[1] - 1}+"])
        ax.set_yticks(range(len(m)), [str(k + 1) for k in range(len(m))])
        right = shapes.count_error_shares(m)["right"]
        ax.set(xlabel="objects drawn", ylabel="objects asked for", title=f"{label}\nright: {right:.0%} of groups")
    bar = fig.colorbar(shown, ax=axes[0].tolist(), fraction=0.04, pad=0.02)
    bar.set_label("share of the row", fontsize=8)
    bar.ax.tick_params(labelsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_guidance_grid(images: torch.Tensor, prompt: str, scale: float, score: dict[str, float],
                       ncols: int = 8) -> plt.Figure:
    """One prompt's samples (different seeds) at one guidance scale, with their ShapesBench score."""
    n = len(images)
    ncols = min(ncols, n)
    nrows = (n + ncols - 1) // ncols
    width = max(1.3 * ncols, 6.0)  # room for the score line at 9 pt
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, width / ncols * nrows + 0.7), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(to_image(images[i]), interpolation="nearest")
    fig.suptitle(f"{prompt!r} · s = {scale:g}\n{_score_line(score)}", fontsize=9)
    fig.tight_layout()
    return fig


def guidance_widget(pipe, prompts: Sequence[str], scales: Sequence[float] = (0, 1, 2, 3, 4, 6, 8, 10, 15),
                    n: int = 8, steps: int = 10, seed: int = 0):
    """Pick a prompt and a guidance scale; see ``n`` seeds sampled with it and their ShapesBench score.

    Samples use DDIM with ``steps`` steps and the same seed at every scale, so moving the
    slider changes only the guidance. Each (prompt, scale) is sampled once and cached.
    """
    import ipywidgets as widgets

    from kandlab import shapes

    if not prompts or not scales:
        raise ValueError("give at least one prompt and one guidance scale")
    cache: dict[tuple[str, float], tuple[torch.Tensor, dict[str, float]]] = {}
    prompt = widgets.Dropdown(options=list(prompts), description="prompt", layout=widgets.Layout(width="520px"))
    scale = widgets.SelectionSlider(options=list(scales), value=min(scales, key=lambda s: abs(s - 4)),
                                    description="guidance s", continuous_update=False)

    def draw():
        key = (prompt.value, scale.value)
        if key not in cache:
            images = pipe([prompt.value], steps=steps, guidance=float(scale.value), seed=seed,
                          images_per_prompt=n, progress=False)
            cache[key] = images, shapes.score(images, [prompt.value] * n)
        _show(plot_guidance_grid(cache[key][0], prompt.value, scale.value, cache[key][1]))

    return _live_panel([[prompt, scale]], [prompt, scale], draw)


# ---------------------------------------------------------------------------
# Lesson 04: T5 text conditioning


def plot_position_buckets(num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True,
                          bias: torch.Tensor | None = None, bias_max_distance: int = 128,
                          seen: int | None = None, distance: int = 150, bias_distance: int = 40) -> plt.Figure:
    """T5's relative-position buckets for distances −distance..distance, and a learned bias table.

    Left: bucket index vs ``key − query`` for the given ``num_buckets`` / ``max_distance``.
    Right (when ``bias`` (buckets, heads) is given): the bias each head adds to the attention
    score of a key at that distance, using the table's own bucketing (``bias.shape[0]`` buckets,
    ``bias_max_distance``, bidirectional), for −bias_distance..bias_distance. ``seen`` shades the
    distances training ever used.
    """
    from kandlab.t5 import relative_position_bucket

    if isinstance(num_buckets, bool) or not isinstance(num_buckets, int) or num_buckets < 4 or num_buckets % 2:
        raise ValueError(f"num_buckets must be an even int ≥ 4, got {num_buckets!r}")
    exact = num_buckets // 4 if bidirectional else num_buckets // 2
    if not isinstance(max_distance, int) or max_distance <= exact:
        raise ValueError(f"max_distance={max_distance!r} must be an int larger than the exact range ({exact} "
                         f"= num_buckets/{4 if bidirectional else 2}), or the log-spaced buckets have no room")
    if bias is not None and (bias.ndim != 2 or bias.shape[0] % 2):
        raise ValueError(f"bias must be a (buckets, heads) table with an even number of buckets, got {tuple(bias.shape)}")
    rel = torch.arange(-distance, distance + 1)
    buckets = relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    ncols = 1 if bias is None else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols + 1.2 * (ncols - 1), 3.0), squeeze=False)
    ax = axes[0, 0]
    ax.step(rel.numpy(), buckets.numpy(), where="mid", lw=1.2)
    for x in (-max_distance, max_distance):
        if abs(x) <= distance:
            ax.axvline(x, color="gray", ls=":", lw=0.8)
    exact_span = (-exact + 0.5, exact - 0.5) if bidirectional else (-exact + 0.5, 0.5)  # causal: only d ≤ 0
    ax.axvspan(*exact_span, color="tab:green", alpha=0.12, label=f"exact: |d| < {exact}")
    ax.set(xlabel="relative position d = key − query", ylabel="bucket index",
           title=f"{num_buckets} buckets, max_distance {max_distance}, "
                 f"{'bidirectional' if bidirectional else 'causal'}")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8, loc="upper left")
    if bias is not None:
        ax = axes[0, 1]
        near = torch.arange(-bias_distance, bias_distance + 1)
        table_buckets = relative_position_bucket(near, True, bias.shape[0], bias_max_distance)  # (2·bias_distance+1,)
        values = bias.detach().float()[table_buckets]  # (2·bias_distance+1, heads)
        for h in range(values.shape[1]):
            ax.step(near.numpy(), values[:, h].numpy(), where="mid", lw=1.1, label=f"head {h}")
        if seen is not None:
            ax.axvspan(-seen, seen, color="tab:orange", alpha=0.12, label=f"seen in training: |d| ≤ {seen}")
        ax.axhline(0, color="gray", lw=0.6)
        ax.set(xlabel="relative position d = key − query", ylabel="bias added to the score",
               title=f"learned bias table ({bias.shape[0]} buckets, max_distance {bias_max_distance})")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def position_bucket_widget(bias: torch.Tensor | None = None, bias_max_distance: int = 128, seen: int | None = None):
    """Sliders for ``num_buckets`` and ``max_distance`` and a bidirectional checkbox (see `plot_position_buckets`)."""
    import ipywidgets as widgets
    from IPython.display import display

    wide = {"description_width": "initial"}  # the default label width cuts "num_buckets" to "num_buck…"
    num_buckets = widgets.IntSlider(value=32, min=4, max=64, step=2, description="num_buckets", continuous_update=False,
                                    style=wide)
    max_distance = widgets.IntSlider(value=128, min=2, max=256, description="max_distance", continuous_update=False,
                                     style=wide)
    bidirectional = widgets.Checkbox(value=True, description="bidirectional")
    out = widgets.Output()

    def redraw(*_):
        with out:
            out.clear_output(wait=True)
            try:
                fig = plot_position_buckets(num_buckets.value, max_distance.value, bidirectional.value,
                                            bias, bias_max_distance, seen)
            except ValueError as error:
                print(f"⚠ {error}")
                return
            _show(fig)

    for w in (num_buckets, max_distance, bidirectional):
        w.observe(redraw, names="value")
    redraw()
    box = widgets.VBox([widgets.HBox([num_buckets, max_distance, bidirectional]), out])
    display(box)
    return box


def cosine_similarity_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of ``a`` (La, D) with every row of ``b`` (Lb, D) → (La, Lb)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two (L, D) matrices of the same width D, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = torch.nn.functional.normalize(a.float(), dim=-1), torch.nn.functional.normalize(b.float(), dim=-1)
    return a @ b.T


def plot_token_similarity(panels: dict[str, torch.Tensor], tokens_a: Sequence[str], tokens_b: Sequence[str]) -> plt.Figure:
    """Heat maps of token-by-token cosine similarity, one per encoder: ``{title: (La, Lb)}``."""
    if not panels:
        raise ValueError("give at least one panel: {'encoder name': similarity (La, Lb)}")
    for title, sim in panels.items():
        if tuple(sim.shape) != (len(tokens_a), len(tokens_b)):
            raise ValueError(f"panel {title!r} has shape {tuple(sim.shape)}, but there are "
                             f"{len(tokens_a)} × {len(tokens_b)} tokens")
    n = len(panels)
    side = 0.42  # inches per cell: room for its value at 8 pt
    fig, axes = plt.subplots(1, n, figsize=(n * (len(tokens_b) * side + 1.6), len(tokens_a) * side + 1.4), squeeze=False)
    for ax, (title, sim) in zip(axes[0], panels.items()):
        im = ax.imshow(sim.detach().numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_xticks(range(len(tokens_b)), tokens_b, rotation=90, fontsize=8)
        ax.set_yticks(range(len(tokens_a)), tokens_a, fontsize=8)
        for i in range(len(tokens_a)):
            for j in range(len(tokens_b)):
                ax.text(j, i, f"{float(sim[i, j]):.1f}", ha="center", va="center", fontsize=8,
                        color="white" if abs(float(sim[i, j])) > 0.6 else "black")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    fig.tight_layout()
    return fig


def token_similarity_widget(encoders: dict, prompt_a: str, prompt_b: str):
    """Two prompts → token-by-token cosine similarity of their encodings, for each encoder.

    ``encoders`` maps a name to ``encode(prompt) -> (tokens list[str], encodings (L, D))``;
    an ``encode`` that raises ``ValueError`` (e.g. an unknown word) shows its message.
    """
    import ipywidgets as widgets
    from IPython.display import display

    text_a = widgets.Text(value=prompt_a, description="prompt A", continuous_update=False,
                          layout=widgets.Layout(width="420px"))
    text_b = widgets.Text(value=prompt_b, description="prompt B", continuous_update=False,
                          layout=widgets.Layout(width="420px"))
    out = widgets.Output()

    def redraw(*_):
        with out:
            out.clear_output(wait=True)
            try:
                panels, tokens = {}, None
                for name, encode in encoders.items():
                    tokens_a, enc_a = encode(text_a.value)
                    tokens_b, enc_b = encode(text_b.value)
                    panels[name] = cosine_similarity_matrix(enc_a, enc_b)
                    tokens = (tokens_a, tokens_b)
            except ValueError as error:
                print(f"⚠ {error}")
                return
            _show(plot_token_similarity(panels, *tokens))

    text_a.observe(redraw, names="value")
    text_b.observe(redraw, names="value")
    redraw()
    box = widgets.VBox([text_a, text_b, out])
    display(box)
    return box


def prompt_grid_widget(generate, prompt: str, button_text: str = "generate"):
    """A prompt box and a button; ``generate(prompt) -> (images (N, 3, H, W), titles)`` fills a grid.

    Nothing is generated until the button is pressed; a ``ValueError`` (e.g. a word the model
    never saw) shows its message instead of a traceback.
    """
    import ipywidgets as widgets
    from IPython.display import display

    text = widgets.Text(value=prompt, description="prompt", layout=widgets.Layout(width="420px"))
    button = widgets.Button(description=button_text)
    out = widgets.Output()

    def run(*_):
        with out:
            out.clear_output(wait=True)
            try:
                images, titles = generate(text.value)
            except ValueError as error:
                print(f"⚠ {error}")
                return
            _show(show_images(images, titles, ncols=len(images), size=1.6, suptitle=text.value))

    button.on_click(run)
    box = widgets.VBox([widgets.HBox([text, button]), out])
    display(box)
    return box


# ---------------------------------------------------------------------------
# Lesson 06: thresholding


def threshold_label(method: str, percentile: float | None = None) -> str:
    """'none', 'static' or 'dynamic 0.995' — the name of a thresholding setting."""
    return f"dynamic {percentile:g}" if method == "dynamic" else method


def plot_value_histogram(ax: plt.Axes, values: torch.Tensor, label: str, span: float = 4.0,
                         color: str = "C0") -> float:
    """Histogram of all values of a tensor on ``ax``, with the ±1 image range marked.

    Values beyond ±``span`` are piled into the two edge bins so a fixed axis still shows them.
    The y axis is logarithmic. The title gives the share beyond ±1.1 (a ±1 background that
    overshoots by a hair is not counted) and the mean excess beyond ±1 (`diffusion.overshoot`).
    Returns the in-range fraction (|x| ≤ 1).
    """
    from matplotlib.ticker import LogLocator, NullLocator

    flat = values.detach().float().flatten().cpu()[None]  # (1, N): one "sample" for the diffusion measures
    v = flat[0].numpy()
    inside = float(np.mean(np.abs(v) <= 1.0))  # exact (the float32 mean of out_of_range rounds 3/5)
    beyond = float(out_of_range(flat, 1.1)[0])
    excess = float(overshoot(flat)[0])
    ax.hist(np.clip(v, -span, span), bins=np.linspace(-span, span, 81), color=color, alpha=0.8, log=True,
            histtype="stepfilled")
    for edge in (-1.0, 1.0):
        ax.axvline(edge, color="k", ls="--", lw=1)
    ax.set_xlim(-span, span)
    ax.set_ylim(0.7, max(10.0, 2.0 * len(v)))  # the same decades on every panel
    ax.yaxis.set_major_locator(LogLocator(numticks=4))
    ax.yaxis.set_minor_locator(NullLocator())  # minor log ticks make drawing slow
    ax.set_title(f"{label}\n{beyond:.1%} beyond ±1.1, mean excess {excess:.2f}", fontsize=8)
    ax.tick_params(labelsize=8)
    return inside


def plot_threshold_run(run: dict, title: str = "", n: int = 8) -> plt.Figure:
    """One sampling run: ``n`` final images above two histograms (x̂₀ before thresholding, all
    steps; final sample before the clamp).

    ``run`` holds ``images`` (B, 3, H, W) clamped, ``x0_raw`` (steps, B, 3, H, W) the model's x̂₀
    before any threshold, ``final`` (B, 3, H, W) unclamped, and ``overall`` (ShapesBench).
    """
    images = run["images"]
    n = min(n, images.shape[0])
    fig = plt.figure(figsize=(1.2 * max(n, 6), 4.0))
    grid = fig.add_gridspec(2, n, height_ratios=[1, 1.5])
    for j in range(n):
        ax = fig.add_subplot(grid[0, j])
        ax.imshow(to_image(images[j]), interpolation="nearest")
        ax.axis("off")
    half = n // 2
    plot_value_histogram(fig.add_subplot(grid[1, :half]), run["x0_raw"], "x̂₀ before thresholding (all steps)")
    plot_value_histogram(fig.add_subplot(grid[1, half:]), run["final"], "final sample before the clamp", color="C1")
    fig.suptitle(f"{title}   ShapesBench overall {_score_se(run)} (n = {images.shape[0]})", fontsize=10)
    fig.tight_layout()
    return fig


def _score_se(run: dict) -> str:
    """'0.92 ± 0.06': a run's ShapesBench overall with its standard error over the run's images."""
    p, n = run["overall"], run["images"].shape[0]
    return f"{p:.2f} ± {share_se(p, n):.2f}"


def _mosaic(images: torch.Tensor, n: int) -> np.ndarray:
    """The first n images (n a square number) tiled into one (H·k, W·k, 3) array, k = √n."""
    k = int(round(n**0.5))
    tiles = [to_image(images[i]) for i in range(min(n, images.shape[0]))]
    tiles += [np.ones_like(tiles[0])] * (k * k - len(tiles))
    return np.concatenate([np.concatenate(tiles[r * k:(r + 1) * k], axis=1) for r in range(k)], axis=0)


def plot_threshold_grid(runs: dict[tuple[str, float | None, float], dict], n: int = 4) -> plt.Figure:
    """Rows: thresholding settings; columns: guidance scales; each cell the first ``n`` images,
    titled with the run's ShapesBench overall ± its standard error (over all the run's images).

    ``runs`` maps ``(method, percentile or None, guidance)`` to a run dict as in `plot_threshold_run`.
    """
    rows = sorted({(m, p) for m, p, _ in runs}, key=lambda mp: (["none", "static", "dynamic"].index(mp[0]), mp[1] or 0))
    cols = sorted({s for _, _, s in runs})
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.7 * len(cols) + 0.8, 1.75 * len(rows)), squeeze=False)
    for i, (m, p) in enumerate(rows):
        for j, s in enumerate(cols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            run = runs.get((m, p, s))
            if run is None:  # hide the frame but keep the axis, so a row label still shows
                for spine in ax.spines.values():
                    spine.set_visible(False)
                continue
            ax.imshow(_mosaic(run["images"], n), interpolation="nearest")
            ax.set_title(f"s={s:g}: {_score_se(run)}", fontsize=8)
        axes[i, 0].set_ylabel(threshold_label(m, p), fontsize=8)
    fig.tight_layout()
    return fig


def thresholding_widget(runs: dict[tuple[str, float | None, float], dict], n: int = 8):
    """Method toggle × percentile slider × guidance slider over pre-computed runs (see `plot_threshold_grid`).

    Every setting is sampled beforehand, so a redraw only draws. The percentile slider applies to
    dynamic thresholding only.
    """
    import ipywidgets as widgets
    from IPython.display import display

    methods = [m for m in ("none", "static", "dynamic") if any(k[0] == m for k in runs)]
    percentiles = sorted({p for m, p, _ in runs if m == "dynamic"}) or [None]
    guidances = sorted({s for _, _, s in runs})
    method = widgets.ToggleButtons(options=methods, value=methods[-1], description="threshold")
    percentile = widgets.SelectionSlider(options=percentiles, value=percentiles[-1], description="percentile",
                                         continuous_update=False)
    guidance = widgets.SelectionSlider(options=guidances, value=guidances[-1], description="guidance s",
                                       continuous_update=False)
    out = widgets.Output()

    def redraw(*_):
        percentile.disabled = method.value != "dynamic"
        p = percentile.value if method.value == "dynamic" else None
        key = (method.value, p, guidance.value)
        with out:
            out.clear_output(wait=True)
            if key not in runs:
                print(f"no run for {threshold_label(method.value, p)} at s={guidance.value:g}")
                return
            _show(plot_threshold_run(runs[key], f"{threshold_label(method.value, p)}, s={guidance.value:g}", n))

    for w in (method, percentile, guidance):
        w.observe(redraw, names="value")
    redraw()
    box = widgets.VBox([method, widgets.HBox([percentile, guidance]), out])
    display(box)
    return box
