r"""Training lesson 08's three tiny unCLIP models on the 64×64 shapes world, and the numbers on their cards.

Kandinsky 2.1/2.2 (and DALL-E 2) generate in two stages; each stage is a model trained on its own:

    kandlab train clip-tiny       # CLIP: the symmetric InfoNCE loss on (image, caption) pairs
    kandlab train prior-tiny      # prior: caption → CLIP image embedding (diffusion over vectors, x₀ prediction)
                                  #        and, in the same command, its deterministic regression baseline
    kandlab train decoder-tiny    # decoder: CLIP image embedding → MoVQ latents, trained on images alone

All three read the same training world as ``latent_text`` (``ShapesDataset(size=64, seed=0,
p_relation=0.75)``, 40,000 items), rendered once and cached in ``runs/unclip_world.pt``. The prior and
the decoder need the shipped CLIP (its embeddings are what they model); the decoder also needs
``movq_tiny`` and starts from ``latent_text``'s UNet (the card says what that changes). Each run keeps
``runs/<name>/state.pt`` and resumes from it.

The measurements (`clip_retrieval`, `clip_binding`, `prior_similarity`) live here too, because the
cards and lesson 08 both report them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from kandlab import schedules, shapes, weights
from kandlab.clip import CLIP, CLIPTextConfig, CLIPVisionConfig
from kandlab.decoder import DecoderConfig, ImageConditionedUNet, drop_image_embeds
from kandlab.diffusion import GaussianDiffusion, TimestepSampling, sample_timesteps
from kandlab.prior import PriorConfig, PriorTransformer, UnCLIPSampler
from kandlab.tokenizer import ShapesTokenizer
from kandlab.unclip import embed_images, embed_texts, empty_caption

IMAGE_SIZE = 64
MAX_LENGTH = 16  # tokens per caption, as every text model of the course


# ---------------------------------------------------------------------------
# 1. Recipes


@dataclass
class ClipRecipe:
    """A tiny CLIP on the shapes world: both towers 64 wide, the ViT on 8×8 patches of 8 px."""

    name: str = "clip_tiny"
    text: CLIPTextConfig = field(default_factory=lambda: CLIPTextConfig.tiny(
        ShapesTokenizer.from_shapes().vocab_size, MAX_LENGTH))
    vision: CLIPVisionConfig = field(default_factory=lambda: CLIPVisionConfig(
        hidden_size=64, intermediate_size=256, projection_dim=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=8, hidden_act="gelu"))
    steps: int = 3500
    batch_size: int = 128  # InfoNCE's negatives are the rest of the batch (256 costs 2.4× per step, measured)
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.1
    num_images: int = 40_000
    p_relation: float = 0.75
    seed: int = 0
    save_every: int = 250
    threads: int = 1
    n_eval: int = 512
    description: str = ("Tiny CLIP (text tower + ViT, 64-wide joint space) trained contrastively on 64×64 shapes "
                        "and their captions (lesson 08).")


@dataclass
class PriorRecipe:
    """A tiny unCLIP prior on (caption → CLIP image embedding of its image); ``regression=True`` trains the same
    transformer as a deterministic regression (x_t = 0 at one fixed t), DALL-E 2's baseline."""

    name: str = "prior_tiny"
    config: PriorConfig = field(default_factory=lambda: PriorConfig.tiny(64, MAX_LENGTH))
    clip: str = "clip_tiny"
    regression: bool = False
    steps: int = 6000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    cond_dropout: float = 0.1  # captions replaced by the empty one (""), for guidance
    guidance: float = 4.0  # Kandinsky 2.2's prior_guidance_scale
    sample_steps: int = 25  # Kandinsky 2.2's prior_num_inference_steps
    num_images: int = 40_000
    p_relation: float = 0.75
    seed: int = 0
    save_every: int = 500
    threads: int = 1
    n_eval: int = 512
    description: str = ("Tiny unCLIP prior (PriorTransformer, 4 layers × 64): caption → clip_tiny image embedding, "
                        "x₀ prediction over 1000 cosine steps (lesson 08).")


def prior_regression() -> PriorRecipe:
    return PriorRecipe(name="prior_tiny_regression", regression=True,
                       description="The deterministic regression baseline of prior_tiny: the same transformer, "
                                   "fed x_t = 0 at t = 999, trained to output the image embedding (lesson 08).")


@dataclass
class DecoderRecipe:
    """The image-embedding decoder: ``ImageConditionedUNet`` on movq_tiny latents, from latent_text's UNet."""

    name: str = "decoder_tiny"  # the run (runs/<name>/) and, for the last stage, the model it ships as
    config: DecoderConfig = field(default_factory=DecoderConfig.tiny)
    clip: str = "clip_tiny"
    init_from: str | None = "latent_text"  # where it starts (`init_decoder`; None: from scratch)
    stage: str = "base"
    ships_as: str = "decoder_tiny"  # data/<ships_as>.safetensors
    latent: str = "movq_tiny"
    latent_scale: float = 2.32  # kandlab.train.LATENT_SCALE, the scale latent_text was trained with
    steps: int = 6000
    batch_size: int = 32
    lr: float = 3e-4
    warmup: int = 200
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    t_sampling: TimestepSampling = "uniform"  # `diffusion.sample_timesteps`
    t_logit_mean: float = 0.0
    embed_dropout: float = 0.1  # embeddings replaced by zeros, for guidance (drop_image_embeds)
    guidance: float = 4.0  # Kandinsky 2.2's decoder guidance_scale
    sample_steps: int = 50
    num_images: int = 40_000
    p_relation: float = 0.75
    seed: int = 0
    save_every: int = 250
    threads: int = 1
    n_eval: int = 512
    description: str = ("Tiny unCLIP decoder: the latent_text UNet conditioned on a clip_tiny image embedding "
                        "(Kandinsky 2.2's ImageProjection + ImageTimeEmbedding), trained on uncaptioned 64×64 "
                        "shapes in movq_tiny's latent space (lesson 08).")


def decoder_polish() -> DecoderRecipe:
    """Stage 2 of ``decoder_tiny``: the base stage's EMA weights, a fresh AdamW at a lower peak rate, decayed to
    zero again, with time steps drawn logit-normal towards high noise (t/T = σ(u), u ~ N(1, 1)), where counts and
    layout are decided. The base stage's loss was still falling when its rate reached zero; on validation images
    this stage beat the same stage with uniform time steps (the card's history, `scripts/decoder_polish.py`)."""
    return dataclasses.replace(DecoderRecipe(), name="decoder_tiny_polish", stage="polish", init_from="decoder_tiny",
                               steps=3000, lr=2e-4, warmup=100, t_sampling="logit_normal", t_logit_mean=1.0)


RECIPES = {"clip-tiny": ClipRecipe, "prior-tiny": PriorRecipe, "prior-tiny-regression": prior_regression,
           "decoder-tiny": DecoderRecipe, "decoder-tiny-polish": decoder_polish}
# The models trained in stages: ``kandlab train <model>`` runs them in order, each stage starting from the one before.
STAGES = {"decoder-tiny": ("decoder-tiny", "decoder-tiny-polish")}


# ---------------------------------------------------------------------------
# 2. The shared training world


def world(num_images: int = 40_000, p_relation: float = 0.75, seed: int = 0, run_dir: Path | str = "runs",
          progress: bool = True) -> tuple[Tensor, list[str]]:
    """The training items: images (N, 3, 64, 64) in [-1, 1] and their captions, cached as uint8 in ``run_dir``.

    The shapes world is drawn from pure colours on black, so uint8 storage is exact.
    """
    path = Path(run_dir) / f"unclip_world_{seed}_{num_images}_{p_relation}.pt"
    if path.exists():
        cached = torch.load(path, weights_only=False)
        return cached["images"].float() / 127.5 - 1, cached["captions"]
    data = shapes.ShapesDataset(size=IMAGE_SIZE, seed=seed, length=num_images, p_relation=p_relation)
    items = [data[i] for i in tqdm(range(num_images), desc="rendering shapes", disable=not progress, leave=False)]
    images = torch.stack([im for im, _ in items])  # (N, 3, S, S)
    captions = [c for _, c in items]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"images": ((images + 1) * 127.5).round().to(torch.uint8), "captions": captions}, path)
    return images, captions


def held_out(n: int = 512, seed: int = 2024) -> tuple[Tensor, list[str]]:
    """Held-out items of the same world (the ShapesBench prompt seed): images (n, 3, 64, 64), captions."""
    data = shapes.ShapesDataset(size=IMAGE_SIZE, seed=seed, length=n)
    items = [data[i] for i in range(n)]
    return torch.stack([im for im, _ in items]), [c for _, c in items]


def tokenize(captions: list[str]) -> dict[str, Tensor]:
    return ShapesTokenizer.from_shapes(max_length=MAX_LENGTH)(captions)


def lr_at(step: int, lr: float, warmup: int, steps: int) -> float:
    """Linear warm-up, then a cosine decay to zero at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _hardware(threads: int) -> dict:
    return {"cpu_count": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
            "threads": threads}


def _resume(state_path: Path, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer, resume: bool) -> dict:
    log = {"step": 0, "seconds": 0.0, "losses": []}
    if resume and state_path.exists():
        state = torch.load(state_path, weights_only=False)
        for key, module in modules.items():
            module.load_state_dict(state[key])
        opt.load_state_dict(state["opt"])
        log = state["log"]
        torch.set_rng_state(state["rng"])
        print(f"resuming {state_path.parent.name} at step {log['step']}")
    return log


def _save(state_path: Path, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer, log: dict) -> None:
    torch.save({**{k: m.state_dict() for k, m in modules.items()}, "opt": opt.state_dict(), "log": log,
                "rng": torch.get_rng_state()}, state_path)


def _optimise(recipe, step_loss: Callable[[], Tensor], modules: dict[str, torch.nn.Module],
              opt: torch.optim.Optimizer, log: dict, state_path: Path, progress: bool,
              after_step: Callable[[], None] | None = None) -> dict:
    """The loop all three recipes share, from ``log["step"]`` to ``recipe.steps``: the step's rate (`lr_at`), one
    AdamW step on ``step_loss()`` (which draws its own batch), ``after_step()`` (CLIP's temperature cap, the
    decoder's EMA), the log, and ``state.pt`` every ``recipe.save_every`` steps and at the last."""
    start = time.perf_counter() - log["seconds"]
    bar = tqdm(range(log["step"], recipe.steps), desc=recipe.name, disable=not progress, initial=log["step"],
               total=recipe.steps)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe.lr, recipe.warmup, recipe.steps)
        loss = step_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step()
        log["losses"].append(round(loss.item(), 5))
        log["step"] = step + 1
        log["seconds"] = time.perf_counter() - start
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % recipe.save_every == 0 or step + 1 == recipe.steps:
            _save(state_path, modules, opt, log)
    return log


# ---------------------------------------------------------------------------
# 3. CLIP


def train_clip(recipe: ClipRecipe, run_dir: Path | str = "runs", resume: bool = True,
               progress: bool = True) -> tuple[CLIP, dict]:
    """Contrastive training (Radford et al. 2021, Fig. 3): each batch's B images and B captions, B² logits."""
    torch.set_num_threads(recipe.threads)
    run = Path(run_dir) / recipe.name
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    model = CLIP(recipe.text, recipe.vision)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    state_path = run / "state.pt"
    log = _resume(state_path, {"model": model}, opt, resume)
    if log["step"] >= recipe.steps:
        return model.eval(), log
    images, captions = world(recipe.num_images, recipe.p_relation, recipe.seed, run_dir, progress)
    tokens = tokenize(captions)

    def step_loss() -> Tensor:
        idx = torch.randint(len(images), (recipe.batch_size,))
        return model.loss(tokens["input_ids"][idx], images[idx], tokens["attention_mask"][idx])

    def cap_temperature() -> None:
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on 1/τ

    log = _optimise(recipe, step_loss, {"model": model}, opt, log, state_path, progress, cap_temperature)
    return model.eval(), log


def _variants(scene: shapes.Scene) -> dict[str, list[str]]:
    """Captions that differ from the scene's in one category: each group's colour, shape or count changed
    to every other value, or (two groups) the relation changed to every other one."""
    out: dict[str, list[str]] = {"colour": [], "shape": [], "count": [], "position": []}
    taken = {g.colour for g in scene.groups}
    for k, group in enumerate(scene.groups):
        def with_group(**change) -> str:
            groups = list(scene.groups)
            groups[k] = dataclasses.replace(group, **change)
            return shapes.caption(shapes.Scene(tuple(groups), scene.relation))

        out["colour"] += [with_group(colour=c) for c in shapes.COLOURS if c not in taken]
        out["shape"] += [with_group(shape=s) for s in shapes.SHAPES if s != group.shape]
        out["count"] += [with_group(count=n) for n in shapes.COUNTS if n != group.count]
    if scene.relation is not None:
        out["position"] = [shapes.caption(shapes.Scene(scene.groups, r)) for r in shapes.RELATIONS
                           if r != scene.relation]
    return out


def swap_attributes(scene: shapes.Scene, attribute: str = "colour") -> shapes.Scene | None:
    """The two-group scene with ``attribute`` ("colour" or "shape") exchanged between its groups, or None when
    there is nothing to swap (one group, or both groups share the shape). The words stay the same: only which
    group each word belongs to changes — a bag of words cannot tell the two captions apart."""
    if scene.relation is None:
        return None
    a, b = scene.groups
    if getattr(a, attribute) == getattr(b, attribute):
        return None
    swapped = (dataclasses.replace(a, **{attribute: getattr(b, attribute)}),
               dataclasses.replace(b, **{attribute: getattr(a, attribute)}))
    return shapes.Scene(swapped, scene.relation)


def _standard_error(hits: list[bool]) -> float:
    """Standard error of the share of hits (`course.share_se`)."""
    from kandlab.course import share_se

    return share_se(float(np.mean(hits)), len(hits))


@torch.no_grad()
def clip_retrieval(clip: CLIP, n: int = 512, seed: int = 2024) -> dict:
    """Zero-shot caption retrieval on held-out images, per category.

    For each image and category, the true caption competes with every caption that changes one thing of
    that category (`_variants`); a hit when the true caption has the highest cosine similarity. Also the
    top-1 image → caption retrieval among all n held-out captions. Returns accuracy, chance and n per test.
    """
    images, captions = held_out(n, seed)
    img = F.normalize(embed_images(clip, images), dim=-1)  # (n, P)
    out = {}
    for category in ("colour", "shape", "count", "position"):
        hits, chance = [], []
        for i, text in enumerate(captions):
            rivals = _variants(shapes.parse_caption(text))[category]
            if not rivals:
                continue
            txt = F.normalize(embed_texts(clip, [text, *rivals])[1], dim=-1)  # (1 + R, P)
            sims = txt @ img[i]  # (1 + R,)
            hits.append(bool(sims[0] > sims[1:].max()))
            chance.append(1 / (1 + len(rivals)))
        out[category] = {"accuracy": round(float(np.mean(hits)), 4), "se": round(_standard_error(hits), 4),
                         "chance": round(float(np.mean(chance)), 4), "n": len(hits)}
    txt = F.normalize(embed_texts(clip, captions)[1], dim=-1)  # (n, P)
    same = torch.tensor([[a == b for b in captions] for a in captions])  # duplicate captions count as right
    best = (img @ txt.T).argmax(1)  # (n,)
    hits = same[torch.arange(n), best].tolist()
    out["top1_of_all"] = {"accuracy": round(float(np.mean(hits)), 4), "se": round(_standard_error(hits), 4),
                          "chance": round(1 / n, 4), "n": n}
    return out


@torch.no_grad()
def clip_binding(clip: CLIP, n: int = 512, seed: int = 2024) -> dict:
    """The binding probe: on two-group held-out images, does CLIP prefer the true caption over the same words
    with the two groups' colours (or shapes) exchanged? 0.5 is a bag of words; 1.0 binds every time.
    ``relation``: the same question for the caption with its relation reversed ("above" ↔ "below").

    Also the same question asked of the *text* embeddings alone: cos(text, swapped text), how close CLIP puts
    the two captions (1.0 = it cannot tell them apart at all).
    """
    images, captions = held_out(n, seed)
    img = F.normalize(embed_images(clip, images), dim=-1)
    out = {}
    for attribute in ("colour", "shape", "relation"):
        hits, text_cos = [], []
        for i, text in enumerate(captions):
            scene = shapes.parse_caption(text)
            if attribute == "relation":
                swapped = shapes.parse_caption(shapes.swap_relation(text)) if scene.relation else None
            else:
                swapped = swap_attributes(scene, attribute)
            if swapped is None:
                continue
            txt = F.normalize(embed_texts(clip, [text, shapes.caption(swapped)])[1], dim=-1)  # (2, P)
            hits.append(bool(txt[0] @ img[i] > txt[1] @ img[i]))
            text_cos.append(float(txt[0] @ txt[1]))
        out[attribute] = {"accuracy": round(float(np.mean(hits)), 4), "se": round(_standard_error(hits), 4),
                          "chance": 0.5, "n": len(hits), "text_cosine_to_swapped": round(float(np.mean(text_cos)), 4)}
    return out


# ---------------------------------------------------------------------------
# 4. The prior


def encode_world_for_prior(clip: CLIP, images: Tensor, captions: list[str], progress: bool = True) -> dict[str, Tensor]:
    """CLIP's view of the training world, computed once (CLIP is frozen): image embeddings (N, P) and the text
    tower's hidden states (N, L, D), pooled embeddings (N, P) and mask (N, L); plus the empty caption's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        emb = torch.cat([embed_images(clip, images[i:i + 2000])
                         for i in tqdm(range(0, len(images), 2000), desc="CLIP image embeddings", disable=not progress,
                                       leave=False)])
        hidden, pooled, mask = embed_texts(clip, captions)
        empty = empty_caption(1, MAX_LENGTH)
        null = (*clip.text_tower(empty["input_ids"], empty["attention_mask"]), empty["attention_mask"].bool())
    finally:
        torch.set_num_threads(threads)
    return {"image_embeds": emb, "hidden": hidden, "pooled": pooled, "mask": mask,
            "null_hidden": null[0], "null_pooled": null[1], "null_mask": null[2]}


def prior_inputs(batch: dict[str, Tensor], idx: Tensor, drop: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The conditioning of rows ``idx``, with the rows where ``drop`` is true replaced by the empty caption."""
    keep = ~drop
    hidden = torch.where(keep[:, None, None], batch["hidden"][idx], batch["null_hidden"])  # (B, L, D)
    pooled = torch.where(keep[:, None], batch["pooled"][idx], batch["null_pooled"])  # (B, P)
    mask = torch.where(keep[:, None], batch["mask"][idx], batch["null_mask"])  # (B, L)
    return hidden, pooled, mask


def prior_loss(prior: PriorTransformer, sampler: UnCLIPSampler, x0: Tensor, hidden: Tensor, pooled: Tensor,
               mask: Tensor, t: Tensor, noise: Tensor, regression: bool = False) -> Tensor:
    r"""unCLIP's prior loss (Ramesh et al. 2022, §2.2): :math:`\lVert x_0 - f_\theta(x_t, t, y)\rVert^2` with
    :math:`x_t = \sqrt{\bar\alpha_t}x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon` — the model predicts x₀ itself.

    x0 (B, P) normalised image embeddings; t (B,) long; noise (B, P). ``regression``: x_t = 0 at t = T − 1
    for every row, which turns the same network into a deterministic text → embedding regression.
    """
    if regression:
        x_t = torch.zeros_like(x0)
        t = torch.full_like(t, sampler.num_train_timesteps - 1)
    else:
        a = sampler.alphas_cumprod[t][:, None]  # (B, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return F.mse_loss(prior(x_t, t, pooled, hidden, mask), x0)


def train_prior(recipe: PriorRecipe, run_dir: Path | str = "runs", resume: bool = True,
                progress: bool = True) -> tuple[PriorTransformer, dict]:
    torch.set_num_threads(recipe.threads)
    run = Path(run_dir) / recipe.name
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    prior = PriorTransformer(recipe.config)
    opt = torch.optim.AdamW(prior.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    state_path = run / "state.pt"
    log = _resume(state_path, {"model": prior}, opt, resume)
    if log["step"] >= recipe.steps:
        return prior.eval(), log
    clip = load_tiny_clip(recipe.clip)
    images, captions = world(recipe.num_images, recipe.p_relation, recipe.seed, run_dir, progress)
    data = encode_world_for_prior(clip, images, captions, progress)
    if log["step"] == 0:
        prior.set_clip_stats(data["image_embeds"])
    x0_all = prior.pre_process_latents(data["image_embeds"])  # (N, P)
    sampler = UnCLIPSampler()

    def step_loss() -> Tensor:
        prior.train()
        idx = torch.randint(len(x0_all), (recipe.batch_size,))
        drop = torch.rand(recipe.batch_size) < (0.0 if recipe.regression else recipe.cond_dropout)
        hidden, pooled, mask = prior_inputs(data, idx, drop)
        t = torch.randint(sampler.num_train_timesteps, (recipe.batch_size,))
        return prior_loss(prior, sampler, x0_all[idx], hidden, pooled, mask, t, torch.randn_like(x0_all[idx]),
                          recipe.regression)

    log = _optimise(recipe, step_loss, {"model": prior}, opt, log, state_path, progress)
    return prior.eval(), log


def _mean_se(values: Tensor) -> dict:
    """`course.mean_se` of a (n,) tensor, as a card entry."""
    from kandlab.course import mean_se

    mean, se = mean_se(values)
    return {"mean": round(mean, 4), "se": round(se, 4), "n": len(values)}


@torch.no_grad()
def prior_similarity(prior: PriorTransformer, clip: CLIP, recipe: PriorRecipe, n: int = 512, seed: int = 2024) -> dict:
    """How close are the prior's embeddings to the CLIP embedding of the caption's held-out image?

    Cosine similarity (mean ± SE over n held-out captions) of: the prior's embedding (sampled, or the regression's
    output); for reference, the caption's own CLIP *text* embedding (what unCLIP would use without a prior), a
    second rendering of the same caption (another layout: the ceiling, since a caption does not fix its image)
    and a random other image. Then the caption test of `clip_retrieval` with the prior's embedding in the place
    of the image's: does it still prefer its caption over the one-word variants?
    """
    from kandlab.unclip import regress_prior, sample_prior

    images, captions = held_out(n, seed)
    tokenizer = ShapesTokenizer.from_shapes(max_length=MAX_LENGTH)
    true = F.normalize(embed_images(clip, images), dim=-1)  # (n, P)
    if recipe.regression:
        pred = regress_prior(prior, clip, tokenizer, captions)
    else:
        pred = torch.cat([sample_prior(prior, clip, tokenizer, captions[i:i + 128], recipe.sample_steps,
                                       recipe.guidance, seed=i) for i in range(0, n, 128)])
    pred = F.normalize(pred, dim=-1)
    text = F.normalize(embed_texts(clip, captions)[1], dim=-1)
    rng = np.random.default_rng(seed + 1)
    again = torch.stack([shapes.render(shapes.parse_caption(c), IMAGE_SIZE, rng) for c in captions])
    again = F.normalize(embed_images(clip, again), dim=-1)
    other = true[torch.roll(torch.arange(n), 1)]
    out = {"prior": _mean_se((pred * true).sum(-1)), "text_embedding": _mean_se((text * true).sum(-1)),
           "same_caption_other_render": _mean_se((again * true).sum(-1)),
           "random_other_image": _mean_se((other * true).sum(-1)),
           "sampler": "regression: one pass" if recipe.regression else
                      f"UnCLIPSampler {recipe.sample_steps} steps, guidance {recipe.guidance}, seed = batch start"}
    caption_test = {}
    for category in ("colour", "shape", "count", "position"):
        hits = []
        for i, caption_ in enumerate(captions):
            rivals = _variants(shapes.parse_caption(caption_))[category]
            if rivals:
                txt = F.normalize(embed_texts(clip, [caption_, *rivals])[1], dim=-1)
                sims = txt @ pred[i]
                hits.append(bool(sims[0] > sims[1:].max()))
        caption_test[category] = {"accuracy": round(float(np.mean(hits)), 4), "se": round(_standard_error(hits), 4),
                                  "n": len(hits)}
    out["caption_test"] = caption_test
    return out


# ---------------------------------------------------------------------------
# 5. The decoder


def init_from_text_model(decoder: ImageConditionedUNet, name: str) -> dict:
    """Start the decoder's UNet from the shipped text-to-image model ``name`` (its blocks and time MLP; its text
    projection and pooling have no place here), and zero the image-to-time LayerNorm's scale and shift, so the
    first step adds nothing to the learnt time embedding. Returns the card's note."""
    state = weights.load_tiny_state_dict(f"{name}.safetensors")
    unet_state = {k.removeprefix("unet."): v for k, v in state.items()
                  if k.startswith("unet.") and not k.startswith(("unet.text_projection", "unet.attention_pooling"))}
    missing, unexpected = decoder.unet.load_state_dict(unet_state, strict=False)
    if missing or unexpected:
        raise ValueError(f"data/{name}'s UNet does not fit the decoder: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        decoder.image_time_embedding.norm.weight.zero_()
        decoder.image_time_embedding.norm.bias.zero_()
    return {"from": name, "sha256": weights.read_manifest().get(f"{name}.safetensors"), "tensors": len(unet_state)}


def init_decoder(decoder: ImageConditionedUNet, name: str, run_dir: Path | str = "runs") -> dict:
    """Where a decoder run starts, by the name in ``recipe.init_from``:

    - an earlier stage of the same rebuild, ``runs/<name>/state.pt``, when it exists: its EMA weights;
    - else a shipped decoder ``data/<name>`` (a later stage continuing the shipped model): its weights;
    - else a shipped text-to-image model (`init_from_text_model`).

    Returns the card's note; for a decoder, ``earlier`` holds its stages' facts for the card's stage table and
    ``earlier_curve`` its loss curve (one value per 25 steps) so far."""
    state_path = Path(run_dir) / name / "state.pt"
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        decoder.load_state_dict(state["ema"])
        log = state["log"]
        facts = _run_facts(log, log.get("threads", 1))
        curve = facts.pop("loss_curve_every_25_steps")
        earlier = [{**facts, **log.get("stage_fields", {}), "init": log.get("init")}]
        return {"from": f"{state_path} (EMA weights at step {log['step']})", "earlier": earlier,
                "earlier_curve": curve}
    card = weights.load_card(f"{name}.safetensors")
    if card.get("kind") != "decoder":
        return init_from_text_model(decoder, name)
    decoder.load_state_dict(weights.load_tiny_state_dict(f"{name}.safetensors"))
    return {"from": f"data/{name} (shipped EMA weights at step {card['steps']})", "sha256": card["sha256"],
            "earlier": card.get("stages") or [_stage_of_card(card)], "earlier_curve": card["loss_curve_every_25_steps"]}


def _stage_of_card(card: dict) -> dict:
    """A one-stage decoder card as the first entry of a stage table (with the scores it shipped with)."""
    keys = ("steps", "wall_time_seconds", "steps_per_second", "hardware")
    recipe = card["recipe"]
    return {**{k: card[k] for k in keys}, **{k: recipe.get(k, v) for k, v in _STAGE_DEFAULTS.items()},
            "stage": recipe.get("stage", "base"), "init": card.get("init"), "score_at_end": card["score"],
            "variations_at_end": card.get("variations")}


# Stage settings a card's stage table shows, with the value a card written before they were fields implies.
_STAGE_DEFAULTS = {"lr": 3e-4, "lr_decay": "cosine", "min_snr_gamma": 5.0, "t_sampling": "uniform",
                   "t_logit_mean": 0.0, "p_relation": 0.75}


def _stage_fields(recipe: DecoderRecipe) -> dict:
    fields = {k: getattr(recipe, k, v) for k, v in _STAGE_DEFAULTS.items()}
    return {**fields, "stage": recipe.stage}


def train_decoder(recipe: DecoderRecipe, run_dir: Path | str = "runs", resume: bool = True,
                  progress: bool = True) -> tuple[ImageConditionedUNet, dict]:
    """ε-prediction on scaled MoVQ latents, conditioned on the CLIP image embedding of the same image (no text)."""
    from kandlab.train import ema_update

    torch.set_num_threads(recipe.threads)
    run = Path(run_dir) / recipe.name
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    model = ImageConditionedUNet(recipe.config)
    state_path = run / "state.pt"
    resuming = resume and state_path.exists()  # then the run's own weights replace any starting point
    init = init_decoder(model, recipe.init_from, run_dir) if recipe.init_from and not resuming else None
    ema = ImageConditionedUNet(recipe.config)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    log = _resume(state_path, {"model": model, "ema": ema}, opt, resume)
    log.setdefault("init", init)
    log.update(threads=recipe.threads, stage_fields=_stage_fields(recipe))
    if log["step"] >= recipe.steps:
        return ema.eval(), log
    latents, embeds = decoder_data(recipe, run_dir, progress)
    diffusion = GaussianDiffusion(schedules.betas_by_name("cosine"))

    def step_loss() -> Tensor:
        model.train()
        idx = torch.randint(len(latents), (recipe.batch_size,))
        e = drop_image_embeds(embeds[idx], recipe.embed_dropout)  # (B, P)
        t = sample_timesteps(recipe.batch_size, diffusion.num_timesteps, recipe.t_sampling, recipe.t_logit_mean)
        return diffusion.loss(model, latents[idx], t, min_snr_gamma=recipe.min_snr_gamma, image_embeds=e)

    log = _optimise(recipe, step_loss, {"model": model, "ema": ema}, opt, log, state_path, progress,
                    lambda: ema_update(ema, model, recipe.ema_decay))
    return ema.eval(), log


def decoder_data(recipe: DecoderRecipe, run_dir: Path | str = "runs", progress: bool = True) -> tuple[Tensor, Tensor]:
    """Scaled MoVQ latents (N, 4, 16, 16) and CLIP image embeddings (N, P) of the training images, computed once
    and cached in ``run_dir`` for every stage (the captions are not used: the decoder learns from images alone)."""
    path = (Path(run_dir) / f"decoder_data_{recipe.latent}_{recipe.latent_scale}_{recipe.clip}_{recipe.seed}_"
                            f"{recipe.num_images}_{recipe.p_relation}.pt")
    if path.exists():
        cached = torch.load(path, weights_only=False)
        return cached["latents"], cached["embeds"]
    from kandlab.train_movq import load_tiny_movq

    images, _ = world(recipe.num_images, recipe.p_relation, recipe.seed, run_dir, progress)
    movq, clip = load_tiny_movq(recipe.latent), load_tiny_clip(recipe.clip)
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        with torch.no_grad():
            latents = torch.cat([movq.encode(images[i:i + 250]) * recipe.latent_scale
                                 for i in tqdm(range(0, len(images), 250), desc="encoding latents",
                                               disable=not progress, leave=False)])
            embeds = embed_images(clip, images)
    finally:
        torch.set_num_threads(threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"latents": latents, "embeds": embeds}, path)
    return latents, embeds


# ---------------------------------------------------------------------------
# 6. Loading the shipped models


def load_tiny_clip(name: str = "clip_tiny") -> CLIP:
    """The shipped tiny CLIP from ``data/`` (configs from its card), frozen."""
    weights.tiny_path(f"{name}.safetensors")
    card = weights.load_card(f"{name}.safetensors")
    model = CLIP(CLIPTextConfig(**card["text_config"]), CLIPVisionConfig(**card["vision_config"]))
    model.load_state_dict(weights.load_tiny_state_dict(f"{name}.safetensors"))
    return model.eval().requires_grad_(False)


def load_tiny_prior(name: str = "prior_tiny") -> PriorTransformer:
    weights.tiny_path(f"{name}.safetensors")
    card = weights.load_card(f"{name}.safetensors")
    prior = PriorTransformer(PriorConfig(**card["prior_config"]))
    prior.load_state_dict(weights.load_tiny_state_dict(f"{name}.safetensors"))
    return prior.eval().requires_grad_(False)


def load_tiny_decoder(name: str = "decoder_tiny") -> ImageConditionedUNet:
    from kandlab.unet import UNetConfig

    weights.tiny_path(f"{name}.safetensors")
    card = weights.load_card(f"{name}.safetensors")
    config = card["decoder_config"]
    unet = config["unet"]
    unet = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in unet.items()})
    model = ImageConditionedUNet(DecoderConfig(unet=unet, image_embed_dim=config["image_embed_dim"],
                                               num_image_tokens=config["num_image_tokens"]))
    model.load_state_dict(weights.load_tiny_state_dict(f"{name}.safetensors"))
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------
# 7. Export: weights, JSON card, manifest


def _write(name: str, state: dict[str, Tensor], card: dict, out_dir: Path | None) -> Path:
    """Save ``state`` as ``<name>.safetensors`` and ``card`` (keeping the prose of the card it replaces)."""
    from safetensors.torch import save_file

    from kandlab import cards

    out = out_dir or weights.data_dir()
    path = out / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    card = {**card, "sha256": weights.sha256_file(path)}
    card_path = out / f"{name}.json"
    old = json.loads(card_path.read_text()) if card_path.exists() else None
    card_path.write_text(json.dumps(cards.keep_prose(card, old), indent=2) + "\n")
    weights.write_manifest(out)
    return path


def _run_facts(log: dict, threads: int) -> dict:
    losses = log["losses"]
    return {"steps": log["step"], "wall_time_seconds": round(log["seconds"], 1),
            "steps_per_second": round(log["step"] / max(log["seconds"], 1e-9), 3),
            "final_loss_mean_last_100": round(float(np.mean(losses[-100:])), 5),
            "loss_curve_every_25_steps": [round(float(np.mean(losses[i:i + 25])), 4) for i in range(0, len(losses), 25)],
            "hardware": _hardware(threads)}


def _recipe_fields(recipe) -> dict:
    skip = {"text", "vision", "config"}
    return {k: v for k, v in asdict(recipe).items() if k not in skip}


def export_clip(recipe: ClipRecipe, model: CLIP, log: dict, out_dir: Path | None = None) -> Path:
    card = {"name": recipe.name, "description": recipe.description, "kind": "clip",
            "recipe": _recipe_fields(recipe), "text_config": asdict(recipe.text), "vision_config": asdict(recipe.vision),
            "parameters": sum(p.numel() for p in model.parameters()), **_run_facts(log, recipe.threads),
            "inverse_temperature": round(model.logit_scale.exp().item(), 2),
            "retrieval": clip_retrieval(model, recipe.n_eval), "binding": clip_binding(model, recipe.n_eval),
            "rebuild": "kandlab train clip-tiny"}
    return _write(recipe.name, model.state_dict(), card, out_dir)


def export_prior(recipe: PriorRecipe, prior: PriorTransformer, log: dict, out_dir: Path | None = None) -> Path:
    card = {"name": recipe.name, "description": recipe.description, "kind": "prior",
            "recipe": _recipe_fields(recipe), "prior_config": asdict(recipe.config),
            "parameters": sum(p.numel() for p in prior.parameters()), **_run_facts(log, recipe.threads),
            "similarity": prior_similarity(prior, load_tiny_clip(recipe.clip), recipe, recipe.n_eval),
            "rebuild": "kandlab train prior-tiny" + (" (its second model)" if recipe.regression else "")}
    return _write(recipe.name, prior.state_dict(), card, out_dir)


def export_decoder(recipe: DecoderRecipe, ema: ImageConditionedUNet, log: dict, out_dir: Path | None = None) -> Path:
    """Write ``data/<recipe.ships_as>``: the EMA weights and a card with the scores of the two-stage pipeline and
    of variations; a stage that continued an earlier one adds it to the card's stage table and totals."""
    from kandlab.train_movq import load_tiny_movq
    from kandlab.unclip import UnCLIPPipeline, unclip_scores, variation_scores

    config = asdict(recipe.config)
    init = dict(log.get("init") or {})
    earlier, earlier_curve = init.pop("earlier", None), init.pop("earlier_curve", [])
    card = {"name": recipe.ships_as, "description": recipe.description, "kind": "decoder",
            "recipe": _recipe_fields(recipe), "decoder_config": config, "unet_config": config["unet"],
            "init": init or None, "parameters": sum(p.numel() for p in ema.parameters()),
            **_run_facts(log, recipe.threads), "rebuild": "kandlab train decoder-tiny"}
    if earlier:
        card.update(_stage_totals(earlier, earlier_curve, card, recipe, init["from"]))
    pipe = UnCLIPPipeline(load_tiny_clip(recipe.clip), load_tiny_prior(), ema, load_tiny_movq(recipe.latent),
                          recipe.latent_scale, ShapesTokenizer.from_shapes(max_length=MAX_LENGTH))
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # scoring is inference: every core (training used recipe.threads)
    try:
        card["score"] = unclip_scores(pipe, recipe.n_eval)
        card["variations"] = variation_scores(pipe, recipe.n_eval)
    finally:
        torch.set_num_threads(threads)
    return _write(recipe.ships_as, ema.state_dict(), card, out_dir)


def _stage_totals(earlier: list[dict], earlier_curve: list[float], card: dict, recipe: DecoderRecipe,
                  continued_from: str) -> dict:
    """The card fields of a staged decoder: one entry per stage, and steps, wall time and loss curve in total."""
    keys = ("steps", "wall_time_seconds", "steps_per_second", "hardware")
    stages = [*earlier, {**{k: card[k] for k in keys}, **_stage_fields(recipe), "continued_from": continued_from}]
    steps, seconds = sum(s["steps"] for s in stages), sum(s["wall_time_seconds"] for s in stages)
    return {"stages": stages, "steps": steps, "wall_time_seconds": round(seconds, 1),
            "steps_per_second": round(steps / seconds, 3),
            "loss_curve_every_25_steps": earlier_curve + card["loss_curve_every_25_steps"]}


def rebuild(recipe_name: str, steps: int | None = None, run_dir: Path | str = "runs", resume: bool = True,
            export: bool = True, progress: bool = True) -> list[Path]:
    """Train one recipe (``prior-tiny``: the prior and then its regression baseline; ``decoder-tiny``: its two
    stages, base and polish, in ``runs/decoder_tiny`` and ``runs/decoder_tiny_polish``) and export it."""
    if recipe_name not in RECIPES:
        raise ValueError(f"unknown unCLIP recipe {recipe_name!r}; choose one of {', '.join(RECIPES)}")
    stages = STAGES.get(recipe_name, ())
    names = ["prior-tiny", "prior-tiny-regression"] if recipe_name == "prior-tiny" else list(stages) or [recipe_name]
    written = []
    for name in names:
        recipe = RECIPES[name]()
        if steps is not None:  # every stage (a short smoke run)
            recipe.steps = steps
        train_fn, export_fn = {ClipRecipe: (train_clip, export_clip), PriorRecipe: (train_prior, export_prior),
                               DecoderRecipe: (train_decoder, export_decoder)}[type(recipe)]
        model, log = train_fn(recipe, run_dir, resume, progress)
        if export and (not stages or name == stages[-1]):  # a staged model ships once, after its last stage
            written.append(export_fn(recipe, model, log))
    return written
