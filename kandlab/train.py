"""A small, readable training loop and the recipes that rebuild ``data/``.

``train(recipe)`` trains a UNet on the shapes world with the ε-prediction loss
(DDPM eq. 14): AdamW, a short learning-rate warm-up, an exponential moving
average (EMA) of the weights, tqdm progress, a sample grid every few hundred
steps, and a resumable state file. ``export`` writes the EMA weights to
``data/<name>.safetensors`` with a JSON card and a sample grid beside them.

Every shipped checkpoint is rebuilt by one command::

    kandlab train pixel-uncond        # lesson 02's unconditional 32×32 model
    kandlab train pixel-text          # lessons 04-06's text-to-image model: its T5 pretraining and its
                                      # four stages (base, layout, anneal, decay; `STAGES`, `rebuild`)
    kandlab train movq-tiny           # lesson 07's tiny MoVQ (`kandlab.train_movq`)
    kandlab train latent-text         # lesson 07's latent text-to-image model (needs movq_tiny and pixel_text)

A staged rebuild keeps each stage's state in its own folder (``runs/pixel_text/`` for the first stage,
``runs/pixel-text-<stage>/pixel_text/`` for the later ones, each with the stage's scores in
``stage_card.json`` once it is done), so the same command resumes it wherever it stopped; each stage
starts from the previous stage's EMA weights with a fresh AdamW, and only the last writes ``data/``.
The later stages can also run on their own, each continuing the shipped ``data/pixel_text``
(``kandlab train pixel-text-layout``, ``-anneal``, ``-decay``; `CONTINUATIONS`).

A shipped run whose state file is gone is extended from its weights with
``kandlab train pixel-uncond --steps N --continue-shipped`` (`continue_shipped`); for a staged model
(``kandlab train pixel-text --steps N --continue-shipped``) with its last stage's recipe.

The recipe fixes every number (model config, steps, batch, learning rate,
seeds), so the same command on the same torch build rebuilds the same file up to
floating-point non-determinism across CPUs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from kandlab import schedules, shapes, text_pretrain, weights
from kandlab.diffusion import (GaussianDiffusion, TimestepSampling, check_timestep_sampling, sample_timesteps,
                               static_threshold)
from kandlab.pipeline import Pipeline, Start, TextToImage, config_card, start_mean
from kandlab.t5 import T5Config, T5Encoder
from kandlab.tokenizer import ShapesTokenizer
from kandlab.unet import UNet, UNetConfig


@dataclass
class Recipe:
    """Everything needed to rebuild one shipped checkpoint."""

    name: str  # file stem in data/
    unet: UNetConfig
    steps: int = 3000
    batch_size: int = 32
    lr: float = 8e-4  # high for a tiny model; warm-up keeps the first steps stable
    warmup: int = 100
    lr_decay: Literal["constant", "cosine"] = "constant"  # "cosine": after the warm-up, down to 0 at the last step
    # (SGDR, Loshchilov & Hutter 2017, without restarts); constant lets a run be extended step for step
    ema_decay: float = 0.999
    image_size: int = 32
    num_images: int = 20_000  # a fixed pre-rendered training set (rendering on the fly costs CPU)
    schedule: Literal["cosine", "linear"] = "cosine"  # Kandinsky 3 uses the cosine (squaredcos_cap_v2) schedule
    min_snr_gamma: float | None = None  # None: DDPM's plain ε-loss; 5: Min-SNR-γ weighting (Hang et al. 2023)
    t_sampling: TimestepSampling = "uniform"  # DDPM's; "logit_normal" trains more at high noise (SD3)
    t_logit_mean: float = 0.0  # m of the logit-normal t/T = σ(u), u ~ N(m, 1); unused when uniform
    p_relation: float = 0.5  # fraction of two-group captions ("A above B") in the training set
    seed: int = 0
    sample_every: int = 500
    grid_samples: int = 16  # images in each periodic sample grid
    grid_steps: int = 50  # DDIM steps for those grids and for the exported score
    save_every: int = 250
    threads: int = 1  # 2 OpenMP threads on a busy 2-core machine are far slower than 1
    description: str = ""
    # text-to-image only (``text=None`` trains an unconditional UNet)
    text: T5Config | None = None  # the tiny T5 encoder
    text_pretrain_steps: int = 0  # 0: T5 trained jointly with the UNet (GLIDE); > 0: first pretrained on the
    # captions alone for this many steps (`kandlab.text_pretrain`), then frozen (Imagen)
    cond_dropout: float = 0.1  # fraction of captions replaced by the empty context (for guidance)
    max_length: int = 16  # tokens per caption, padding included
    guidance: float = 4.0  # guidance scale s of the periodic grids and the exported score
    n_score: int = 512  # fixed prompts (or samples) behind the exported ShapesBench numbers
    text_from: str | None = None  # a shipped text model whose T5 this recipe reuses, frozen (no pretraining)
    # latent diffusion (lesson 07): the UNet denoises latents of this shipped MoVQ; image_size stays the pixel size
    latent: str | None = None  # e.g. "movq_tiny"
    latent_scale: float = 1.0  # z ↦ scale·z before diffusion: 1.0 as Kandinsky, 1/σ as Stable Diffusion

    def __post_init__(self) -> None:
        # fail when the recipe is made, not after rendering the training set
        check_timestep_sampling(self.t_sampling, self.t_logit_mean)
        if self.lr_decay not in ("constant", "cosine"):
            raise ValueError(f"lr_decay must be 'constant' or 'cosine', got {self.lr_decay!r}")
        if not 0.0 <= self.p_relation <= 1.0:
            raise ValueError(f"p_relation is the fraction of two-group captions, in [0, 1]; got {self.p_relation}")
        if self.text_from is not None and (self.text is None or self.text_pretrain_steps):
            raise ValueError(f"text_from={self.text_from!r} reuses a shipped T5: it needs text=T5Config(...) and "
                             "text_pretrain_steps=0")
        if self.text_pretrain_steps < 0 or (self.text_pretrain_steps and self.text is None):
            raise ValueError(f"text_pretrain_steps={self.text_pretrain_steps}: use 0 (joint T5, or no text) or a "
                             "positive number of steps for a text recipe (pretrained, then frozen T5)")

    @property
    def frozen_text(self) -> bool:
        """Whether the T5 is pretrained on captions and frozen (Imagen) rather than trained jointly (GLIDE)."""
        return self.text_pretrain_steps > 0 or self.text_from is not None

    def betas(self) -> torch.Tensor:
        return schedules.betas_by_name(self.schedule)


def pixel_uncond() -> Recipe:
    """Lesson 02: an unconditional Kandinsky 3 UNet over 32×32 RGB shapes.

    The same four-level ``tiny_pixel`` layout as the text model and Kandinsky 3
    (attention on all but the first level), without the text path. Sized to train
    in under 45 minutes on one core of a 2-core CPU (measured: see the card).
    """
    return Recipe(
        name="pixel_uncond",
        unet=UNetConfig.tiny_pixel(text_conditioned=False),
        steps=4000,
        min_snr_gamma=5.0,  # measured against the plain loss at 4,000 steps: fewer blobs and colours, more recognised shapes
        n_score=256,
        sample_every=1000,
        threads=1,  # 1.9 steps/s with OMP_WAIT_POLICY=PASSIVE; the other core stays free for the notebook
        description="Unconditional tiny Kandinsky-3 UNet on 32×32 shapes (lesson 02).",
    )


def pixel_text() -> Recipe:
    """Lesson 04-06, stage 1 (``base``): a text-conditioned Kandinsky 3 UNet + tiny T5 over 32×32 shapes.
    The shipped checkpoint adds a layout stage (`pixel_text_layout`), an anneal stage (`pixel_text_anneal`) and a
    decay stage (`pixel_text_decay`); ``kandlab train pixel-text`` runs all four (`STAGES`, `rebuild`).

    Four levels, attention on all but the first, so the UNet exports to diffusers'
    ``Kandinsky3UNet``. The T5 follows Imagen's recipe: pretrained on the training captions
    alone to parse them (`kandlab.text_pretrain`, 1,000 steps, about a minute), then frozen
    while the UNet trains with Min-SNR-5 from step 0 (see lesson 04).

    Measured against GLIDE's recipe (the T5 trained jointly with the UNet, shipped until
    session 6; its T5 is kept as ``data/pixel_text_joint_t5.safetensors``): at 3,000 steps
    this recipe scored 0.38 overall on 128 prompts with the default sampler (count 0.48),
    the joint model 0.27 at 6,000 steps (count 0.39). Neither stage 1 draws relations: swapping
    "above" for "below" moves the first group by under 1 px (the shapes world: 15.6 px); the
    layout stage fixes that.
    """
    return Recipe(
        name="pixel_text",
        unet=UNetConfig.tiny_pixel(),
        text=T5Config.tiny(vocab_size=ShapesTokenizer.from_shapes().vocab_size),
        text_pretrain_steps=1000,  # held-out parse accuracy is 100 % after ~300 steps
        steps=5000,  # the LR is constant: `kandlab train pixel-text --steps N --continue-shipped` extends the shipped run
        min_snr_gamma=5.0,
        num_images=50_000,
        threads=2,  # both cores: 0.86 steps/s measured (card) against ~0.75 on one
        sample_every=500,
        description="Text-conditioned tiny Kandinsky-3 UNet on 32×32 captioned shapes, 10% condition dropout, with a "
                    "tiny T5 pretrained on the captions alone and then frozen (lessons 04-06).",
    )


def pixel_text_layout() -> Recipe:
    """Stage 2 of the shipped pixel_text: stage 1's weights (`pixel_text`, 5,000 steps) trained 3,000 steps
    more with most time steps at high noise, where a picture's layout is decided (lesson 04).

    Stage 1 draws t uniformly and weights the ε-loss by Min-SNR-5, so the x̂₀ error at t = 0.9·T
    counts SNR ≈ 0.025 times, 200× less than near the end; after 5,000 steps swapping "above" for
    "below" moved a group by under 1 px. This stage keeps the loss, draws t/T = σ(u), u ~ N(1.5, 1)
    (SD3's logit-normal sampling, median shifted to 0.82·T) and shows 75 % two-group captions.
    Measured on the first 128 fixed prompts (DDIM 25): position 0.42 → 0.97 within 1,500 steps,
    relation shift 0.4 → 15 px (the shapes world: 15.6). ``kandlab train pixel-text-layout``
    continues ``data/pixel_text.safetensors``; its state goes to ``runs/pixel-text-layout/``.
    """
    return dataclasses.replace(pixel_text(), steps=8000, t_sampling="logit_normal", t_logit_mean=1.5,
                               p_relation=0.75, threads=1)  # 1 thread: the shipped stage ran beside another run


def pixel_text_anneal() -> Recipe:
    """Stage 3 of the shipped pixel_text: the layout stage's weights (8,000 steps) trained on at a quarter of
    the learning rate, 2e-4 instead of 8e-4, with time steps shifted further towards noise, u ~ N(2.5, 1)
    (median 0.92·T), where the number of objects is decided (lesson 04).

    After the layout stage the model drew one object too many in a quarter of its groups. Measured on the first
    128 fixed prompts (DDIM 25, `experiments/layout_probe.py`), 1,000 steps from the layout stage's weights: this
    stage 0.70 overall (count 0.73); the same steps at the old rate 8e-4 0.58 (count 0.63); the layout stage
    itself 0.57 (count 0.60). A constant rate keeps the weights bouncing around a minimum, and the EMA (0.999)
    averages only the last ~1,000 steps of that: lowering the rate at the end ("annealing") lets them settle.
    ``kandlab train pixel-text-anneal`` continues ``data/pixel_text.safetensors``; its state goes to
    ``runs/pixel-text-anneal/``.
    """
    return dataclasses.replace(pixel_text_layout(), steps=9750, lr=2e-4, t_logit_mean=2.5)


def pixel_text_decay() -> Recipe:
    """Stage 4 of the shipped pixel_text: the anneal stage's weights (9,750 steps) trained 1,750 steps more with
    a fresh AdamW whose rate falls from 2e-4 to 0 along a cosine (``lr_decay="cosine"``), time steps back at the
    layout stage's u ~ N(1.5, 1) (lesson 04).

    The anneal stage showed that the rate, not the time steps, was what the counts needed; a decay to zero is
    where that road ends, and how nearly every large run finishes. Measured on the first 128 fixed prompts
    (DDIM 25, `experiments/layout_probe.py`) after 1,750 steps on one core each (`experiments/count_experiments.py`):
    this stage 0.81 overall (count 0.83), the same decay at the anneal stage's u ~ N(2.5, 1) 0.80 (count 0.80),
    the anneal stage itself 0.73 (count 0.74). ``kandlab train pixel-text-decay`` continues
    ``data/pixel_text.safetensors``; its state goes to ``runs/pixel-text-decay/``.
    """
    return dataclasses.replace(pixel_text_anneal(), steps=11_500, lr_decay="cosine", t_logit_mean=1.5)


# Stable Diffusion's choice, 1/σ: σ = 0.431 is the standard deviation of the shipped movq_tiny's latents of 512
# held-out shapes images (its card: eval.latent_std; tests/test_latent.py checks they agree).
LATENT_SCALE = 2.32

def latent_text() -> Recipe:
    """Lesson 07: the same Kandinsky 3 UNet, with 4 input channels, on the latents of the shipped tiny MoVQ
    (64×64 shapes → 4×16×16), conditioned on the shipped pixel_text's frozen T5.

    One stage, with what the pixel model's four stages taught from the start: most time steps at high
    noise (logit-normal), Min-SNR-5, three in four captions with a relation, and a learning rate that
    decays to zero at the last step.
    """
    return Recipe(
        name="latent_text",
        unet=UNetConfig.tiny_latent(out_channels=4),
        text=T5Config.tiny(vocab_size=ShapesTokenizer.from_shapes().vocab_size),
        text_from="pixel_text",
        latent="movq_tiny",
        latent_scale=LATENT_SCALE,
        image_size=64,
        steps=8000,
        lr=6e-4,
        warmup=200,
        lr_decay="cosine",
        min_snr_gamma=5.0,
        t_sampling="logit_normal",
        t_logit_mean=1.0,
        p_relation=0.75,
        num_images=40_000,
        guidance=3.0,  # chosen after training on validation prompts (scripts/latent_guidance.py, the card's history)
        threads=1,
        sample_every=1000,
        save_every=250,
        description="Text-conditioned tiny Kandinsky-3 UNet on the 4×16×16 latents of the tiny MoVQ (64×64 shapes), "
                    "with pixel_text's frozen T5 (lesson 07).",
    )


def latent_text_polish() -> Recipe:
    """The second stage of latent_text: its 8,000-step weights trained 2,500 steps more with a fresh AdamW whose
    rate falls from 2e-4 to 0, and time steps drawn uniformly. After stage 1 the weakest category was shape (0.78
    against the pixel model's 0.97, the card's stages), a detail decided at low noise, where the logit-normal time
    steps of stage 1 trained least; this stage lifted it to 0.89. ``kandlab train latent-text`` runs both stages
    (`STAGES`); ``kandlab train latent-text-polish`` alone continues ``data/latent_text`` (state in
    ``runs/latent-text-polish/``).
    """
    return dataclasses.replace(latent_text(), steps=10_500, lr=2e-4, t_sampling="uniform", t_logit_mean=0.0)


RECIPES = {"pixel-uncond": pixel_uncond, "pixel-text": pixel_text, "pixel-text-layout": pixel_text_layout,
           "pixel-text-anneal": pixel_text_anneal, "pixel-text-decay": pixel_text_decay, "latent-text": latent_text,
           "latent-text-polish": latent_text_polish}
CONTINUATIONS = ("pixel-text-layout", "pixel-text-anneal", "pixel-text-decay", "latent-text-polish")  # recipes that continue the shipped checkpoint of their name
# The shipped models trained in stages, each stage (name, recipe) in order: ``kandlab train <model>`` runs them all
# (`rebuild`). Stage k > 0 continues stage k - 1's EMA weights; its state goes to runs/<model>-<stage name>/.
STAGES = {"pixel-text": (("base", pixel_text), ("layout", pixel_text_layout), ("anneal", pixel_text_anneal),
                         ("decay", pixel_text_decay)),
          "latent-text": (("base", latent_text), ("polish", latent_text_polish))}


# ---------------------------------------------------------------------------
# Pieces of the loop


def training_data(recipe: Recipe) -> shapes.ShapesDataset:
    """The fixed training world of a recipe: ``num_images`` items of ``ShapesDataset(seed)``."""
    return shapes.ShapesDataset(size=recipe.image_size, seed=recipe.seed, length=recipe.num_images,
                                p_relation=recipe.p_relation)


def render_training_set(recipe: Recipe) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Pre-render ``num_images`` shapes images (N, 3, S, S) in [-1, 1] and, for a text
    recipe, their tokenised captions ``{"input_ids", "attention_mask"}`` (N, L)."""
    data = training_data(recipe)
    items = [data[i] for i in tqdm(range(len(data)), desc="rendering shapes", leave=False)]
    images = torch.stack([image for image, _ in items])
    if recipe.latent is not None:
        images = encode_latents(recipe, images)  # (N, 4, S/f, S/f)
    tokens = None
    if recipe.text is not None:
        tokens = ShapesTokenizer.from_shapes(max_length=recipe.max_length)([c for _, c in items])
    return images, tokens


@torch.no_grad()
def encode_latents(recipe: Recipe, images: torch.Tensor, batch: int = 250) -> torch.Tensor:
    """Images (N, 3, S, S) → scaled MoVQ latents ``scale · encode(x)`` (N, 4, S/f, S/f), not quantised
    (the latents Kandinsky's UNet is trained on)."""
    from kandlab.train_movq import load_tiny_movq

    movq = load_tiny_movq(recipe.latent)
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # once per run, before training: every core
    try:
        return torch.cat([movq.encode(images[i:i + batch]) * recipe.latent_scale
                          for i in tqdm(range(0, len(images), batch), desc="encoding latents", leave=False)])
    finally:
        torch.set_num_threads(threads)


def latent_loss(diffusion: GaussianDiffusion, model, movq, images: torch.Tensor, scale: float, t: torch.Tensor,
                noise: torch.Tensor, **model_kwargs) -> torch.Tensor:
    r"""One latent-diffusion loss (Rombach et al. 2022, eq. 2): $\lVert\varepsilon - \varepsilon_\theta(z_t, t)\rVert^2$
    with $z_0 = \text{scale}\cdot E(x)$, the MoVQ latents of the images, not quantised.

    images (B, 3, H, W) in [-1, 1]; t (B,); noise (B, 4, H/f, W/f). `train` does the same with the latents encoded
    once, before training (`encode_latents`), which is cheaper and identical: the MoVQ is frozen.
    """
    with torch.no_grad():
        z0 = scale * movq.encode(images)  # (B, 4, H/f, W/f)
    return diffusion.loss(model, z0, t, noise, **model_kwargs)


def recipe_pipeline(recipe: Recipe, model: TextToImage, diffusion: GaussianDiffusion) -> Pipeline:
    """The sampling pipeline of a text recipe (with its MoVQ for a latent recipe)."""
    movq = None
    if recipe.latent is not None:
        from kandlab.train_movq import load_tiny_movq

        movq = load_tiny_movq(recipe.latent)
    return Pipeline(model, ShapesTokenizer.from_shapes(max_length=recipe.max_length), diffusion, recipe.image_size,
                    movq=movq, latent_scale=recipe.latent_scale)


def reuse_text_encoder(recipe: Recipe, model: TextToImage) -> dict:
    """Load the T5 of the shipped ``recipe.text_from`` into ``model.t5`` and freeze it. Returns the card's note."""
    state = weights.load_tiny_state_dict(f"{recipe.text_from}.safetensors")
    model.t5.load_state_dict({k.removeprefix("t5."): v for k, v in state.items() if k.startswith("t5.")})
    model.t5.requires_grad_(False)
    return {"from": recipe.text_from, "sha256": weights.read_manifest().get(f"{recipe.text_from}.safetensors")}


def build_model(recipe: Recipe) -> UNet | TextToImage:
    """The network a recipe trains: a bare UNet, or T5 + UNet for a text recipe
    (with a frozen T5 when the recipe pretrains it)."""
    if recipe.text is None:
        return UNet(recipe.unet)
    model = TextToImage(recipe.unet, recipe.text)
    model.t5.requires_grad_(not recipe.frozen_text)
    return model


def pretrain_text(recipe: Recipe, model: TextToImage, progress: bool = True) -> dict:
    """Imagen's recipe at tiny scale: pretrain ``model.t5`` on the training captions alone
    (`kandlab.text_pretrain`), then freeze it. Returns the stage's log for the card."""
    data = training_data(recipe)
    captions = [shapes.caption(data.scene(i)) for i in range(len(data))]  # text only: no image is rendered
    config = text_pretrain.PretrainConfig(steps=recipe.text_pretrain_steps)
    log = text_pretrain.pretrain(model.t5, captions, ShapesTokenizer.from_shapes(max_length=recipe.max_length),
                                 config, seed=recipe.seed, progress=progress)
    model.t5.requires_grad_(False)
    return log


def score_prompts(n: int = 512, seed: int = 2024) -> list[str]:
    """The fixed ShapesBench prompts: captions of ``ShapesDataset(seed=2024)`` (never trained on
    as a set; the training set uses seed 0)."""
    data = shapes.ShapesDataset(seed=seed, length=n)
    return [shapes.caption(data.scene(i)) for i in range(n)]


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """θ_ema ← decay·θ_ema + (1 − decay)·θ."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1 - decay)


def lr_at(step: int, recipe: Recipe, since: int = 0) -> float:
    r"""Linear warm-up, then constant (the EMA does the averaging) or, with ``lr_decay="cosine"``,
    $\eta_k = \eta \cdot \tfrac12 (1 + \cos(\pi k / K))$ for step k of the run's K, reaching 0 at
    ``recipe.steps``. A constant rate means a run stopped at step k equals the first k steps of a longer one.
    ``since``: the step a continued run started at (its fresh AdamW warms up again, and decays over its own steps)."""
    warm = min(1.0, (step - since + 1) / recipe.warmup)
    if recipe.lr_decay == "constant":
        return recipe.lr * warm
    done = (step - since) / max(1, recipe.steps - since)  # fraction of this run's steps behind it
    return recipe.lr * warm * 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))


class CannotContinue(ValueError):
    """The shipped checkpoint cannot be continued by this recipe (`continue_shipped`)."""


STAGE_FIELDS = ("lr", "lr_decay", "min_snr_gamma", "t_sampling", "t_logit_mean", "p_relation")  # may change between stages
MACHINE_FIELDS = ("steps", "threads")  # how long and on how many cores: free in a continuation
PROSE_FIELDS = ("description",)  # words about the model: a later stage may say what it added


def continue_shipped(recipe: Recipe, model: UNet | TextToImage, ema: UNet | TextToImage) -> dict:
    """Start from the shipped ``data/<name>.safetensors`` (EMA weights) instead of step 0.

    For extending a shipped run whose state file is gone: model and EMA both start
    at the shipped weights, AdamW starts fresh (with its own warm-up). Returns the
    training log, whose ``earlier`` entry keeps the shipped card's steps, wall time,
    loss curve, stages (the last one with the scores the checkpoint ended it with) and
    rebuild command for the new card. The shipped card must come from this recipe
    (`recipe_differences`: same model configs and every recipe number but the
    `MACHINE_FIELDS`, `STAGE_FIELDS` and `PROSE_FIELDS` -- a new stage may run longer on
    other cores, change its learning rate, weight its loss, draw its time steps or mix its
    captions differently, and reword the description; the card records each stage's numbers).
    """
    return continue_from(recipe, model, ema, weights.load_card(f"{recipe.name}.safetensors"),
                         lambda: weights.load_tiny_state_dict(f"{recipe.name}.safetensors"),
                         source=f"data/{recipe.name}.safetensors",
                         how="the shipped EMA weights at step {steps}, fresh AdamW (kandlab train --continue-shipped)")


def continue_from(recipe: Recipe, model: UNet | TextToImage, ema: UNet | TextToImage, card: dict, load_state,
                  source: str, how: str) -> dict:
    """`continue_shipped` for any checkpoint: ``card`` (as `export` or `stage_card` writes it) and
    ``load_state()``, its EMA state dict. ``source`` names it in errors; ``how`` is the new stage's
    ``continued_from`` on the card, with ``{steps}`` for the step it continues."""
    differ = recipe_differences(recipe, card)
    if differ:
        raise CannotContinue(f"{source} was not trained with this recipe (differs in: "
                             f"{', '.join(differ)}); train from scratch instead (drop --continue-shipped)")
    if card["steps"] >= recipe.steps:
        raise CannotContinue(f"{source} already has {card['steps']} steps; "
                             f"ask for more with --steps (got {recipe.steps})")
    state = load_state()
    model.load_state_dict(state)
    ema.load_state_dict(state)
    stages = card.get("stages") or [{k: card[k] for k in ("steps", "wall_time_seconds", "steps_per_second", "hardware")}
                                    | {"min_snr_gamma": card["recipe"].get("min_snr_gamma")}]
    # the card's recipe is its last stage's: fill the stage fields an older card did not record per stage
    # (e.g. lr before it could change), and what the checkpoint scored is what that stage ended at
    recipe_fields = {**{f.name: f.default for f in fields(Recipe) if f.name in STAGE_FIELDS}, **card["recipe"]}
    stages[-1] = {**{k: recipe_fields[k] for k in STAGE_FIELDS}, **stages[-1],
                  **{f"{k}_at_end": card[k] for k in ("score", "relation_shift") if k in card}}
    earlier = {k: card[k] for k in ("steps", "wall_time_seconds", "loss_curve_every_25_steps")} | {
        "stages": stages, "rebuild": card.get("rebuild"), "continued_from": how.format(steps=card["steps"])}
    log = {"step": card["steps"], "seconds": 0.0, "losses": [], "earlier": earlier}
    if "text_pretrain" in card:  # the frozen T5's stage stays on the new card
        log["text_pretrain"] = card["text_pretrain"]
    return log


def recipe_card(recipe: Recipe) -> dict:
    """The part of a card that says how a checkpoint was trained: ``recipe`` (every field but the model
    configs), ``unet_config`` and, for a text recipe, ``t5_config``."""
    return {"recipe": {k: v for k, v in asdict(recipe).items() if k not in ("unet", "text")},
            "unet_config": asdict(recipe.unet),
            **({"t5_config": asdict(recipe.text)} if recipe.text is not None else {})}


def recipe_differences(recipe: Recipe, card: dict) -> list[str]:
    """The recipe fields (and model configs) in which ``recipe`` differs from the one a shipped ``card``
    was trained with, leaving out those a continuation may change (`MACHINE_FIELDS`, `STAGE_FIELDS`,
    `PROSE_FIELDS`)."""
    mine = json.loads(json.dumps(recipe_card(recipe)))  # as the card stores it (tuples become lists)
    mine = {"unet_config": mine["unet_config"], "t5_config": mine.get("t5_config"), **mine["recipe"]}
    defaults = {f.name: f.default for f in fields(Recipe) if f.default is not MISSING}  # fields older cards lack
    theirs = {"unet_config": card["unet_config"], "t5_config": card.get("t5_config"), **defaults, **card["recipe"]}
    free = (*MACHINE_FIELDS, *STAGE_FIELDS, *PROSE_FIELDS)
    return sorted(k for k in mine.keys() | theirs.keys() if k not in free and mine.get(k) != theirs.get(k))


@torch.no_grad()
def sample_images(model: UNet, diffusion: GaussianDiffusion, n: int = 16, steps: int = 50, seed: int = 0,
                  size: int = 32, progress: bool = False, start: Start = "noise") -> torch.Tensor:
    """DDIM (η = 0) samples from an unconditional model with x̂₀ clipped to [-1, 1], as lesson 02
    samples: (n, C, size, size). ``start`` as in `Pipeline.__call__`."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    x = diffusion.sample(lambda x_t, t: model(x_t, t), (n, model.config.in_channels, size, size),
                         num_steps=steps, method="ddim", generator=g, progress=progress,
                         x0_fn=static_threshold, start_mean=start_mean(start, size))
    return x.clamp(-1, 1)


def periodic_grid(recipe: Recipe, model: UNet | TextToImage, diffusion: GaussianDiffusion) -> torch.Tensor:
    """The progress grid: unconditional samples, or the first score prompts with guidance."""
    if recipe.text is None:
        return sample_images(model, diffusion, n=recipe.grid_samples, steps=recipe.grid_steps, size=recipe.image_size)
    pipe = recipe_pipeline(recipe, model, diffusion)
    return pipe(score_prompts(recipe.grid_samples), steps=recipe.grid_steps, guidance=recipe.guidance, progress=False)


def save_grid(images: torch.Tensor, path: Path, title: str = "") -> None:
    from matplotlib.figure import Figure

    from kandlab.viz import to_image

    n = len(images)
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    fig = Figure(figsize=(cols * 1.0, rows * 1.0 + (0.3 if title else 0)), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, img in zip(axes.flat, images):
        ax.imshow(to_image(img), interpolation="nearest")
    for ax in axes.flat:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


# ---------------------------------------------------------------------------
# The loop


def train(recipe: Recipe, run_dir: Path | str = "runs", steps: int | None = None, resume: bool = True,
          progress: bool = True, from_shipped: bool = False, from_stage: Path | str | None = None,
          stage: str | None = None) -> tuple[UNet, dict]:
    """Train ``recipe`` (resuming from ``run_dir/<name>/state.pt``); return the EMA model and a log.

    ``from_shipped``: with no state file to resume, continue the shipped checkpoint
    (see `continue_shipped`) instead of starting at step 0. ``from_stage``: continue instead the
    finished stage in that folder (its ``state.pt`` and ``stage_card.json``, see `rebuild`).
    ``stage``: the stage's name, recorded in the log and on the card.
    """
    torch.set_num_threads(recipe.threads)
    steps = recipe.steps if steps is None else steps
    run = Path(run_dir) / recipe.name
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)

    model = build_model(recipe)
    ema = copy.deepcopy(model).requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]  # a frozen T5 is not the optimiser's
    opt = torch.optim.AdamW(trained, lr=recipe.lr, weight_decay=0.0)
    diffusion = GaussianDiffusion(recipe.betas())
    log = {"step": 0, "seconds": 0.0, "losses": []}
    state_path = run / "state.pt"
    if resume and state_path.exists():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        log = state["log"]
        torch.set_rng_state(state["rng"])
        print(f"resuming {recipe.name} at step {log['step']}")
    elif from_stage is not None:
        log = continue_stage(recipe, model, ema, Path(from_stage))
        print(f"continuing {recipe.name} from the EMA weights of stage {log['earlier']['stages'][-1].get('stage')} "
              f"at step {log['step']}")
    elif from_shipped:
        log = continue_shipped(recipe, model, ema)
        print(f"continuing the shipped {recipe.name} from step {log['step']}")
    if stage is not None and log["step"] == log.get("earlier", {}).get("steps", 0):  # a fresh stage: name it
        log["stage"] = stage
    since = log["earlier"]["steps"] if "earlier" in log else 0
    if recipe.frozen_text and log["step"] == 0:
        if recipe.text_from is not None:
            log["text_reused"] = reuse_text_encoder(recipe, model)
        else:
            log["text_pretrain"] = pretrain_text(recipe, model, progress)
        ema.t5.load_state_dict(model.t5.state_dict())  # the EMA of a frozen encoder is the encoder

    # Rendering 20k images takes ~10 s: skip it when a resumed run has nothing left to do.
    images, tokens = render_training_set(recipe) if log["step"] < steps else (None, None)  # (N, 3, S, S)
    g = torch.Generator().manual_seed(recipe.seed + log["step"])
    bar = tqdm(range(log["step"], steps), desc=recipe.name, disable=not progress, initial=log["step"], total=steps)
    start = time.perf_counter() - log["seconds"]
    running = None
    for step in bar:
        model.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe, since)
        idx = torch.randint(0, len(images), (recipe.batch_size,), generator=g)
        x0 = images[idx]  # (B, 3, S, S)
        t = sample_timesteps(recipe.batch_size, diffusion.num_timesteps, recipe.t_sampling, recipe.t_logit_mean)  # (B,)
        if tokens is None:
            loss = diffusion.loss(model, x0, t, min_snr_gamma=recipe.min_snr_gamma)
        else:
            drop = torch.rand(recipe.batch_size, generator=g) < recipe.cond_dropout  # (B,)
            loss = diffusion.loss(model, x0, t, min_snr_gamma=recipe.min_snr_gamma, input_ids=tokens["input_ids"][idx],
                                  attention_mask=tokens["attention_mask"][idx], drop=drop)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        ema_update(ema, model, min(recipe.ema_decay, (1 + step) / (10 + step)))

        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        log["losses"].append(round(loss.item(), 5))
        log["step"] = step + 1
        log["seconds"] = time.perf_counter() - start
        bar.set_postfix(loss=f"{running:.4f}", it_s=f"{(log['step'] - since) / max(log['seconds'], 1e-9):.2f}")
        if (step + 1) % recipe.sample_every == 0 or step + 1 == steps:
            grid = periodic_grid(recipe, ema, diffusion)
            save_grid(grid, run / f"samples_{step + 1:06d}.png",
                      f"{recipe.name} step {step + 1}")
        if (step + 1) % recipe.save_every == 0 or step + 1 == steps:
            torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                        "log": log, "rng": torch.get_rng_state()}, state_path)
    return ema.eval(), log


def score_model(recipe: Recipe, model: UNet | TextToImage, diffusion: GaussianDiffusion,
                n: int, start: Start = "noise") -> tuple[dict, torch.Tensor]:
    """ShapesBench numbers for a card and the samples behind them.

    Unconditional: `shapes.unconditional_stats` of ``n`` DDIM samples. Text: the
    per-category scores on ``n`` fixed prompts (`score_prompts`) with the default
    sampler (DDIM, ``recipe.guidance``, static threshold), in batches of 64.
    ``start`` is the sampler's start (N(0, I) or around the data mean).
    """
    sampler = (f"DDIM {recipe.grid_steps} steps, eta 0, {'no' if recipe.latent else 'static'} threshold, "
               f"start {start}, seed 1234")
    if recipe.text is None:
        samples = sample_images(model, diffusion, n=n, steps=recipe.grid_steps, seed=1234, size=recipe.image_size,
                                start=start)
        stats = shapes.unconditional_stats(samples)
        return {**{f"shapesbench_{k}": round(v, 4) for k, v in stats.items()}, "samples": n, "sampler": sampler}, samples
    pipe = recipe_pipeline(recipe, model, diffusion)
    prompts = score_prompts(n)
    chunks = [pipe(prompts[i:i + 64], steps=recipe.grid_steps, guidance=recipe.guidance, seed=1234 + i,
                   start=start, progress=False) for i in tqdm(range(0, n, 64), desc="ShapesBench", leave=False)]
    samples = torch.cat(chunks)
    stats = shapes.score(samples, prompts)
    return {**{f"shapesbench_{k}": round(v, 4) for k, v in stats.items()}, "prompts": n,
            "count_confusion": shapes.count_confusion(samples, prompts).tolist(),  # asked (rows 1-3) × drawn (0-4+)
            "binding": _binding_or_none(samples, prompts),  # two-shape prompts: bound / swapped (lesson 08)
            "sampler": f"{sampler}, guidance {recipe.guidance}",
            "prompt_set": "kandlab.train.score_prompts(n) = captions of ShapesDataset(seed=2024)"}, samples


def _binding_or_none(samples: torch.Tensor, prompts: list[str]) -> dict | None:
    """`shapes.binding_rates`, or None when no prompt has two groups of different shapes (a small n)."""
    if all(outcome is None for outcome in shapes.binding_outcomes(samples, prompts)):
        return None
    return shapes.binding_rates(samples, prompts)


def score_relations(recipe: Recipe, model: TextToImage, diffusion: GaussianDiffusion, n: int = 128,
                    steps: int = 25) -> dict:
    """`shapes.relation_shift` of a text model on the two-group prompts among the first ``n`` score
    prompts — each drawn as written and with its relation swapped, from the same noise — and of the
    shapes world itself (the same prompts rendered with the same layout seed), for reference."""
    pipe = recipe_pipeline(recipe, model, diffusion)
    two = [p for p in score_prompts(n) if shapes.parse_caption(p).relation]
    swapped = [shapes.swap_relation(p) for p in two]
    drawn = [pipe(batch, steps=steps, guidance=recipe.guidance, seed=7, progress=False) if two else []
             for batch in (two, swapped)]
    rendered = [[shapes.render(shapes.parse_caption(p), recipe.image_size, i) for i, p in enumerate(batch)]
                for batch in (two, swapped)]
    return {"model": shapes.relation_shift(two, *drawn), "data": shapes.relation_shift(two, *rendered),
            "sampler": f"DDIM {steps} steps, guidance {recipe.guidance}, {'no' if recipe.latent else 'static'} "
                       "threshold, start noise, seed 7",
            "prompts": f"the two-group prompts among score_prompts({n})"}


def _run_facts(recipe: Recipe, log: dict) -> dict:
    """Steps, wall time, speed, loss curve and hardware of a training log, for the card.

    A continued run (``log["earlier"]``, see `continue_shipped`) adds its new steps to
    the shipped run's: the totals cover both, ``stages`` lists each one.
    """
    earlier = log.get("earlier")
    new_steps = log["step"] - (earlier["steps"] if earlier else 0)
    curve = [round(sum(chunk) / len(chunk), 4) for chunk in (log["losses"][i:i + 25] for i in range(0, len(log["losses"]), 25))]
    stage = {**({"stage": log["stage"]} if "stage" in log else {}),
             "steps": new_steps, "wall_time_seconds": round(log["seconds"], 1),
             "steps_per_second": round(new_steps / log["seconds"], 3), **{k: getattr(recipe, k) for k in STAGE_FIELDS},
             "hardware": {"cpu_count": os.cpu_count(), "machine": platform.machine(),
                          "torch": torch.__version__, "threads": recipe.threads}}
    facts = {
        "steps": log["step"],
        "wall_time_seconds": stage["wall_time_seconds"],
        "steps_per_second": stage["steps_per_second"],
        "final_loss_mean_last_100": round(sum(log["losses"][-100:]) / len(log["losses"][-100:]), 5),
        "loss_curve_every_25_steps": curve,
        "hardware": stage["hardware"],
    }
    if "text_reused" in log:
        facts["text_reused"] = log["text_reused"]  # a shipped T5, frozen from step 0
    if "text_pretrain" in log:
        facts["text_pretrain"] = log["text_pretrain"]  # the T5's stage before the UNet's (frozen after it)
    if not earlier and "stage" in log:  # the first of named stages (`rebuild`): the card lists it as one
        facts["stages"] = [stage]
    if earlier:
        facts["wall_time_seconds"] = round(earlier["wall_time_seconds"] + stage["wall_time_seconds"], 1)
        facts["steps_per_second"] = round(log["step"] / facts["wall_time_seconds"], 3)
        facts["loss_curve_every_25_steps"] = earlier["loss_curve_every_25_steps"] + curve
        facts["stages"] = earlier["stages"] + [{**stage, "continued_from": earlier.get(
            "continued_from", f"the shipped EMA weights at step {earlier['steps']}, fresh AdamW "
                              "(kandlab train --continue-shipped)")}]
    return facts


def export(recipe: Recipe, ema: UNet | TextToImage, log: dict, out_dir: Path | None = None,
           command: str | None = None) -> Path:
    """Write ``<name>.safetensors``, its JSON card (keeping the prose fields of the card it replaces,
    `kandlab.cards.keep_prose`) and sample grid PNG; refresh the manifest. ``kandlab train`` then
    renders the model card ``<name>.md`` (`kandlab.cards.write_cards`).

    ``command`` is the `kandlab train` command line that ran this stage (default: the recipe's
    name); a continued run's card says ``<the shipped card's rebuild>, then <command>``.
    """
    from safetensors.torch import save_file

    out = out_dir or weights.data_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{recipe.name}.safetensors"
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(path))

    torch.set_num_threads(os.cpu_count() or 1)  # training is over: scoring (sampling) may have every core
    diffusion = GaussianDiffusion(recipe.betas())
    score, samples = score_model(recipe, ema, diffusion, recipe.n_score, start="noise")
    score_leak = None  # the data-mean start (lesson 02) is a pixel-space idea: not for a latent model
    if recipe.latent is None:
        score_leak, samples = score_model(recipe, ema, diffusion, recipe.n_score, start="data_mean")
    title = f"{recipe.name}: DDIM {recipe.grid_steps} steps, start around the data mean, seed 1234"
    if recipe.text is not None:
        title = (f"{recipe.name}: DDIM {recipe.grid_steps} steps, guidance {recipe.guidance}, "
                 f"{'start N(0, I)' if recipe.latent else 'start around the data mean'}, first prompts")
    save_grid(samples[:64], out / f"{recipe.name}.png", title)
    card = {
        "name": recipe.name,
        "description": recipe.description,
        **recipe_card(recipe),
        "parameters": sum(p.numel() for p in ema.parameters()),
        **_run_facts(recipe, log),
        "score": score,  # the diffusers / Kandinsky 3 start: x_T ~ N(0, I)
        **({"score_data_mean_start": score_leak} if score_leak is not None else {}),  # start around the data mean
        **({"relation_shift": score_relations(recipe, ema, diffusion, min(recipe.n_score, 128))}
           if recipe.text is not None else {}),
        "rebuild": _rebuild(recipe, log, command),
        "sha256": weights.sha256_file(path),
    }
    from kandlab import cards

    card_path = out / f"{recipe.name}.json"
    old = json.loads(card_path.read_text()) if card_path.exists() else None
    card = cards.keep_prose(card, old)  # the replaced card's prose (summary, history, ...) stays
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    weights.write_manifest(out)
    return path


def rescore_shipped(recipe: Recipe, why: str, out_dir: Path | None = None) -> dict:
    """Measure the shipped ``data/<name>`` again with ``recipe``'s sampler settings, without training: after a
    change of the default guidance, say. Rewrites the card's ``score``, ``relation_shift``, the sample grid and
    the recipe's ``guidance`` (the weights and their sha256 stay), and adds ``why`` to the card's history,
    with the scores it replaces. Returns the new card."""
    from kandlab import cards

    out = out_dir or weights.data_dir()
    card_path = out / f"{recipe.name}.json"
    card = json.loads(card_path.read_text())
    model = TextToImage(UNetConfig(**card["unet_config"]), T5Config(**card["t5_config"]))
    model.load_state_dict(weights.load_tiny_state_dict(f"{recipe.name}.safetensors"))
    model.eval()
    torch.set_num_threads(os.cpu_count() or 1)
    diffusion = GaussianDiffusion(recipe.betas())
    before = {k: card["score"][k] for k in card["score"] if k.startswith("shapesbench_")}
    score, samples = score_model(recipe, model, diffusion, recipe.n_score, start="noise")
    save_grid(samples[:64], out / f"{recipe.name}.png",
              f"{recipe.name}: DDIM {recipe.grid_steps} steps, guidance {recipe.guidance}, "
              f"{'start N(0, I)' if recipe.latent else 'start around the data mean'}, first prompts")
    card["score"] = score
    card["relation_shift"] = score_relations(recipe, model, diffusion, min(recipe.n_score, 128))
    card["recipe"]["guidance"] = recipe.guidance
    card.setdefault("history", []).append(
        {"experiment": f"Default guidance {recipe.guidance:g}", "what": why,
         "replaced_scores": before, "scores": {k: v for k, v in score.items() if k.startswith("shapesbench_")}})
    card_path.write_text(json.dumps(cards.keep_prose(card, None), indent=2) + "\n")
    weights.write_manifest(out)
    return card


def _rebuild(recipe: Recipe, log: dict, command: str | None) -> str:
    """The commands that rebuild a checkpoint from nothing, stage by stage."""
    earlier = log.get("earlier")
    command = command or f"kandlab train {recipe.name.replace('_', '-')}" + (" --continue-shipped" if earlier else "")
    return f"{earlier['rebuild']}, then {command}" if earlier and earlier.get("rebuild") else command


# ---------------------------------------------------------------------------
# Staged rebuilds: one command, several stages, each resumable


STAGE_CARD = "stage_card.json"  # beside a finished stage's state.pt: what the next stage continues


def stage_card(recipe: Recipe, ema: UNet | TextToImage, log: dict) -> dict:
    """What a finished stage hands to the next (`continue_from`): the card `export` would write, with the
    scores the stage ended at (ShapesBench from N(0, I) and, for a text model, the relation shift), but no
    file in ``data/``, no data-mean score and no sample grid."""
    torch.set_num_threads(os.cpu_count() or 1)  # the stage's training is over: scoring may have every core
    diffusion = GaussianDiffusion(recipe.betas())
    score, _ = score_model(recipe, ema, diffusion, recipe.n_score, start="noise")
    return {"name": recipe.name, **recipe_card(recipe), **_run_facts(recipe, log), "score": score,
            **({"relation_shift": score_relations(recipe, ema, diffusion, min(recipe.n_score, 128))}
               if recipe.text is not None else {}),
            "rebuild": None}  # the staged command rebuilds it, not a chain of commands


def continue_stage(recipe: Recipe, model: UNet | TextToImage, ema: UNet | TextToImage, folder: Path) -> dict:
    """Start ``recipe`` from the finished stage in ``folder`` (its ``state.pt``'s EMA weights and its
    `STAGE_CARD`), as `continue_shipped` starts from data/: a fresh AdamW, the earlier stages on the log."""
    card = json.loads((folder / STAGE_CARD).read_text())
    name = card["stages"][-1].get("stage", "?")
    return continue_from(recipe, model, ema, card, lambda: torch.load(folder / "state.pt", weights_only=False)["ema"],
                         source=f"stage {name} in {folder}",
                         how=f"the EMA weights of stage {name} at step {{steps}}, fresh AdamW")


def stage_dirs(model: str, stages, run_dir: Path | str = "runs") -> list[Path]:
    """Where each stage of a staged rebuild keeps its state: ``run_dir`` for the first stage (as a one-stage
    recipe), ``run_dir/<model>-<stage>`` for the later ones (as the named stages, `CONTINUATIONS`)."""
    return [Path(run_dir) if k == 0 else Path(run_dir) / f"{model}-{name}" for k, (name, _) in enumerate(stages)]


def rebuild(model: str, stages=None, run_dir: Path | str = "runs", resume: bool = True, progress: bool = True,
            export_to: Path | None | Literal[False] = None, command: str | None = None) -> tuple[Recipe, UNet, dict]:
    """Rebuild a staged model: train ``stages`` ((name, recipe or recipe function), ..., default
    ``STAGES[model]``) in order, each starting from the previous one's EMA weights (`continue_stage`), then
    `export` the last (to ``export_to``, default data/; ``False``: no export). Returns the last stage's
    recipe, EMA model and log.

    Resumable at any point: a stage whose `STAGE_CARD` exists is done and skipped; a stage with a state file
    resumes it (mid-stage, or at its last step when only its scoring was left); ``resume=False`` retrains
    every stage from the beginning. The card lists every stage (``stages``, each with its ``stage`` name and
    the scores it ended at) and says ``rebuild: kandlab train <model>``.
    """
    stages = [(name, make() if callable(make) else make) for name, make in (stages or STAGES[model])]
    dirs = stage_dirs(model, stages, run_dir)
    previous = None
    for k, ((name, recipe), folder) in enumerate(zip(stages, dirs)):
        done = folder / recipe.name / STAGE_CARD
        last = k == len(stages) - 1
        if resume and done.exists() and not last:
            print(f"stage {name} of {model}: done ({done})")
        else:
            done.unlink(missing_ok=True)  # a retrained stage's old scores are not its
            ema, log = train(recipe, run_dir=folder, resume=resume, progress=progress, from_stage=previous,
                             stage=name)
            if last:
                if export_to is not False:
                    export(recipe, ema, log, out_dir=export_to, command=command or f"kandlab train {model}")
                return recipe, ema, log
            done.write_text(json.dumps(stage_card(recipe, ema, log), indent=2) + "\n")
        previous = folder / recipe.name
    raise ValueError(f"{model} has no stages")


def load_tiny_unet(name: str) -> UNet:
    """Load a shipped tiny UNet (``data/<name>.safetensors`` + its card)."""
    card = weights.load_card(f"{name}.safetensors")
    config = UNetConfig(**card["unet_config"])
    model = UNet(config)
    model.load_state_dict(weights.load_tiny_state_dict(f"{name}.safetensors"))
    return model.eval().requires_grad_(False)


def load_tiny_t5(name: str) -> T5Encoder:
    """Load a shipped tiny T5 encoder on its own (``data/<name>.safetensors`` + its card), e.g. the jointly
    trained ``pixel_text_joint_t5`` that lesson 04 compares with the shipped one."""
    card = weights.load_card(f"{name}.safetensors")
    if "unet_config" in card:
        raise ValueError(f"data/{name} is a whole text-to-image model; use Pipeline.from_tiny({name!r}).model.t5")
    encoder = T5Encoder(T5Config(**card["t5_config"]))
    encoder.load_state_dict(weights.load_tiny_state_dict(f"{name}.safetensors"))
    return encoder.eval().requires_grad_(False)
