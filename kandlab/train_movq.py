r"""Training the course's tiny MoVQ on 64×64 shapes, and the measurements on its card.

The objective is the part of MoVQ-GAN's (ai-forever/MoVQGAN) that runs offline:

$$\mathcal{L} = \lVert \hat x - x \rVert^2 + \mathcal{L}_{VQ}, \qquad \hat x = D(z_q),\ z_q = \mathrm{sg\text{-}st}[Q(E(x))]$$

(mean squared reconstruction error plus `kandlab.movq.vq_loss`). MoVQ-GAN adds 0.1·LPIPS, which
needs downloaded VGG weights, and a PatchGAN discriminator; neither is used here (the card says so).

Dead codes: a codebook initialised U(±1/K) next to an encoder whose outputs are much larger lets a
few codes win every argmin, and the rest never move again. ``restart_every`` re-seeds every code
that nobody chose since the last restart with a random encoder output of the current batch (the
"random restart" of Jukebox, Dhariwal et al. 2020). The recipe ``movq-tiny-no-restart`` trains
the same model without it, for the card's comparison.

``kandlab train movq-tiny`` rebuilds ``data/movq_tiny.safetensors`` and its card; the run keeps
``runs/movq_tiny/state.pt`` and resumes from it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kandlab import shapes, weights
from kandlab.movq import MoVQ, MoVQConfig, codebook_usage


@dataclass
class MoVQRecipe:
    """Everything needed to rebuild one tiny MoVQ."""

    name: str = "movq_tiny"
    config: MoVQConfig = field(default_factory=MoVQConfig.tiny)
    image_size: int = 64
    num_images: int = 20_000  # pre-rendered shapes images, ShapesDataset(seed)
    p_relation: float = 0.75  # the latent model's training world
    steps: int = 3000
    batch_size: int = 16
    crop: int = 32  # train on random crops (the model is convolutional; 4× cheaper than whole 64² images)
    bf16: bool = True  # bfloat16 autocast: 1.6× faster on this CPU's AMX units, measured
    lr: float = 1e-3
    warmup: int = 100
    betas: tuple[float, float] = (0.5, 0.9)  # MoVQ-GAN's Adam betas
    restart_every: int | None = 100  # None: no dead-code restarts
    seed: int = 0
    save_every: int = 250
    threads: int = 1
    n_eval: int = 512  # held-out images behind the card's numbers
    description: str = ""
    compare_to: str | None = None  # an ablation arm: its numbers go into this shipped card's "comparison"
    ship: bool = True  # write data/<name>.safetensors and its card (an arm may add its numbers only)


def movq_tiny() -> MoVQRecipe:
    return MoVQRecipe(description="Tiny MoVQ for 64×64 shapes (factor 4: 3×64² → 4×16²), 256 codes, dead-code "
                                  "restarts (lesson 07).")


def movq_tiny_no_restart() -> MoVQRecipe:
    return MoVQRecipe(name="movq_tiny_no_restart", restart_every=None, compare_to="movq_tiny", ship=False,
                      description="without dead-code restarts")


def movq_tiny_groupnorm() -> MoVQRecipe:
    return MoVQRecipe(name="movq_tiny_groupnorm", config=MoVQConfig.tiny(spatial_norm=False), compare_to="movq_tiny",
                      description="plain GroupNorm decoder (a VQGAN, not a MoVQ)")  # shipped: lesson 07 shows it


RECIPES = {"movq-tiny": movq_tiny, "movq-tiny-no-restart": movq_tiny_no_restart,
           "movq-tiny-groupnorm": movq_tiny_groupnorm}  # the last two: the card's comparison arms


def render(size: int, seed: int, n: int, p_relation: float = 0.75, progress: bool = False) -> torch.Tensor:
    """``n`` shapes images (n, 3, size, size) in [-1, 1]."""
    data = shapes.ShapesDataset(size=size, seed=seed, length=n, p_relation=p_relation)
    return torch.stack([data[i][0] for i in tqdm(range(n), desc="rendering shapes", leave=False, disable=not progress)])


def random_crops(images: torch.Tensor, n: int, crop: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random ``crop``² windows of random images (N, 3, S, S) → (n, 3, crop, crop)."""
    idx = torch.randint(0, len(images), (n,), generator=generator)
    top, left = (torch.randint(0, images.shape[-1] - crop + 1, (2, n), generator=generator)).tolist()
    return torch.stack([images[i, :, y:y + crop, x:x + crop] for i, y, x in zip(idx.tolist(), top, left)])


def lr_at(step: int, recipe: MoVQRecipe) -> float:
    """Linear warm-up, then cosine decay to 0 at the last step."""
    warm = min(1.0, (step + 1) / recipe.warmup)
    return recipe.lr * warm * 0.5 * (1.0 + math.cos(math.pi * step / recipe.steps))


@torch.no_grad()
def restart_dead_codes(model: MoVQ, counts: torch.Tensor, z: torch.Tensor, generator: torch.Generator) -> int:
    """Replace every code with ``counts == 0`` by a random latent vector of ``z`` (B, D, h, w). Returns how many."""
    dead = (counts == 0).nonzero().flatten()
    if len(dead) == 0:
        return 0
    pool = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B·h·w, D)
    pick = torch.randint(0, len(pool), (len(dead),), generator=generator)
    model.quantizer.codebook.weight[dead] = pool[pick].float()
    return len(dead)


def train(recipe: MoVQRecipe, run_dir: Path | str = "runs", resume: bool = True,
          progress: bool = True) -> tuple[MoVQ, dict]:
    """Train ``recipe`` (resuming from ``run_dir/<name>/state.pt``); return the model and a log."""
    torch.set_num_threads(recipe.threads)
    run = Path(run_dir) / recipe.name
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    model = MoVQ(recipe.config)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, betas=recipe.betas)
    log = {"step": 0, "seconds": 0.0, "losses": [], "restarted": 0}
    state_path = run / "state.pt"
    if resume and state_path.exists():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        log = state["log"]
        print(f"resuming {recipe.name} at step {log['step']}")
    if log["step"] >= recipe.steps:
        return model.eval(), log
    images = render(recipe.image_size, recipe.seed, recipe.num_images, recipe.p_relation, progress)  # (N, 3, S, S)
    g = torch.Generator().manual_seed(recipe.seed + log["step"])
    counts = torch.zeros(recipe.config.num_vq_embeddings, dtype=torch.long)  # codes chosen since the last restart
    start = time.perf_counter() - log["seconds"]
    bar = tqdm(range(log["step"], recipe.steps), desc=recipe.name, disable=not progress, initial=log["step"],
               total=recipe.steps)
    for step in bar:
        model.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe)
        x = random_crops(images, recipe.batch_size, recipe.crop, g)  # (B, 3, crop, crop)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
            z = model.encode(x)  # (B, D, h, w)
            z_q, vq, indices = model.quantizer(z.float())
            x_hat = model.decoder(model.post_quant_conv(z_q), z_q)
        rec = F.mse_loss(x_hat.float(), x)
        loss = rec + vq
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        counts += torch.bincount(indices.flatten(), minlength=len(counts))
        if recipe.restart_every and (step + 1) % recipe.restart_every == 0 and step + 1 < 0.9 * recipe.steps:
            log["restarted"] += restart_dead_codes(model, counts, z.detach(), g)  # not in the last 10 %: let them settle
            counts.zero_()
        log["losses"].append([round(rec.item(), 6), round(vq.item(), 6)])
        log["step"] = step + 1
        log["seconds"] = time.perf_counter() - start
        bar.set_postfix(rec=f"{rec.item():.4f}", vq=f"{vq.item():.4f}")
        if (step + 1) % recipe.save_every == 0 or step + 1 == recipe.steps:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "log": log}, state_path)
    return model.eval(), log


# ---------------------------------------------------------------------------
# Measurements for the card and the lesson


def psnr(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    r"""Peak signal-to-noise ratio per image in dB for images in [-1, 1] (peak-to-peak 2):
    $10\log_{10}(2^2 / \mathrm{MSE})$. x, x_hat: (B, 3, H, W) → (B,)."""
    mse = ((x_hat.clamp(-1, 1) - x) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
          "retina", "colorwheel", "coins", "moon", "grass")  # bundled with scikit-image (grey ones as RGB)


def photos(size: int = 64) -> tuple[torch.Tensor, list[str]]:
    """scikit-image's bundled photos, centre-cropped square and resized to ``size``: (N, 3, size, size) in [-1, 1]."""
    import skimage.data
    from PIL import Image

    out, names = [], []
    for name in PHOTOS:
        a = np.asarray(getattr(skimage.data, name)())
        if a.ndim == 2:
            a = np.stack([a] * 3, -1)
        a = a[..., :3]
        s = min(a.shape[:2])
        top, left = (a.shape[0] - s) // 2, (a.shape[1] - s) // 2
        img = Image.fromarray(a[top:top + s, left:left + s].astype(np.uint8)).resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
        names.append(name)
    return torch.stack(out), names


@torch.no_grad()
def reconstruct(model: MoVQ, x: torch.Tensor, quantize: bool = True, batch: int = 64) -> torch.Tensor:
    """x (N, 3, H, W) → decode(encode(x)), through the codebook or not, in batches."""
    return torch.cat([model.decode(model.encode(x[i:i + batch]), quantize=quantize) for i in range(0, len(x), batch)])


@torch.no_grad()
def evaluate(model: MoVQ, n: int = 512, size: int = 64, seed: int = 2024) -> dict:
    """Held-out numbers: PSNR (mean ± SE) on shapes and photos, ShapesBench of reconstructions with
    their own captions, codebook usage, and the latents' standard deviation."""
    from kandlab.course import mean_se

    data = shapes.ShapesDataset(size=size, seed=seed, length=n, p_relation=0.75)
    x = torch.stack([data[i][0] for i in range(n)])
    captions = [data[i][1] for i in range(n)]
    z = torch.cat([model.encode(x[i:i + 64]) for i in range(0, n, 64)])  # (n, D, h, w)
    indices = torch.cat([model.quantize(z[i:i + 64])[2] for i in range(0, n, 64)])
    out = {"images": f"{n} of ShapesDataset(size={size}, seed={seed})"}
    for quantize in (True, False):
        x_hat = torch.cat([model.decode(z[i:i + 64], quantize=quantize) for i in range(0, n, 64)])
        key = "quantized" if quantize else "not_quantized"
        out[f"psnr_shapes_{key}"] = list(mean_se(psnr(x, x_hat).tolist()))
        out[f"shapesbench_{key}"] = shapes.score(x_hat.clamp(-1, 1), captions)
    out["shapesbench_originals"] = shapes.score(x, captions)
    p, names = photos(size)
    out["psnr_photos"] = list(mean_se(psnr(p, reconstruct(model, p)).tolist()))
    out["photos"] = f"{len(names)} scikit-image photos, centre crop resized to {size}²: " + ", ".join(names)
    out["codebook"] = codebook_usage(indices, model.config.num_vq_embeddings)
    out["latent_std"] = float(z.std())
    out["latent_mean"] = float(z.mean())
    return out


def export(recipe: MoVQRecipe, model: MoVQ, log: dict, out_dir: Path | None = None) -> Path:
    """Write ``<name>.safetensors`` and its JSON card (keeping the prose and the comparison arms of the card it
    replaces); refresh the manifest. An arm (``recipe.compare_to``) also adds its numbers to that card's
    ``comparison``; with ``ship=False`` it writes nothing else."""
    from safetensors.torch import save_file

    from kandlab import cards

    out = out_dir or weights.data_dir()
    measured = evaluate(model, recipe.n_eval, recipe.image_size)
    if recipe.compare_to is not None:
        card_path = out / f"{recipe.compare_to}.json"
        card = json.loads(card_path.read_text())
        card.setdefault("comparison", {})[recipe.description] = {
            **measured, "recipe": recipe.name, "steps": log["step"], "wall_time_seconds": round(log["seconds"], 1),
            "codes_restarted": log["restarted"], "rebuild": f"kandlab train {recipe.name.replace('_', '-')}",
            **({"file": f"{recipe.name}.safetensors"} if recipe.ship else {})}
        card_path.write_text(json.dumps(card, indent=2) + "\n")
        weights.write_manifest(out)
        if not recipe.ship:
            return card_path
    path = out / f"{recipe.name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    recipe_dict = asdict(recipe)
    card = {
        "name": recipe.name,
        "description": recipe.description,
        "kind": "movq",
        "recipe": {k: v for k, v in recipe_dict.items() if k != "config"},
        "movq_config": recipe_dict["config"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": log["step"],
        "wall_time_seconds": round(log["seconds"], 1),
        "steps_per_second": round(log["step"] / max(log["seconds"], 1e-9), 3),
        "codes_restarted": log["restarted"],
        "final_reconstruction_mse_last_100": round(float(np.mean([r for r, _ in log["losses"][-100:]])), 6),
        "hardware": {"cpu_count": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
                     "threads": recipe.threads},
        "eval": measured,
        "rebuild": f"kandlab train {recipe.name.replace('_', '-')}",
        "sha256": weights.sha256_file(path),
    }
    card_path = out / f"{recipe.name}.json"
    old = json.loads(card_path.read_text()) if card_path.exists() else None
    if old and "comparison" in old:
        card["comparison"] = old["comparison"]  # the arms' numbers (`compare_to`) stay
    card_path.write_text(json.dumps(cards.keep_prose(card, old), indent=2) + "\n")
    weights.write_manifest(out)
    return path


def tiny_movq_config(name: str = "movq_tiny") -> MoVQConfig:
    """The config of a shipped tiny MoVQ, from its card (no weights loaded)."""
    config = weights.load_card(f"{name}.safetensors")["movq_config"]
    return MoVQConfig(**{**config, "block_out_channels": tuple(config["block_out_channels"]),
                         "attention": tuple(config["attention"])})


def load_tiny_movq(name: str = "movq_tiny") -> MoVQ:
    """The shipped tiny MoVQ from ``data/`` (its config from the card)."""
    weights.tiny_path(f"{name}.safetensors")  # missing or corrupted: says how to restore it
    model = MoVQ(tiny_movq_config(name))
    model.load_state_dict(weights.load_tiny_state_dict(f"{name}.safetensors"))
    return model.eval().requires_grad_(False)
