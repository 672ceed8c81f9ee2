"""ShapesBench of a text-to-image training run while it trains: score the EMA weights
of ``runs/<name>/state.pt`` (or the shipped checkpoint) on the first N fixed prompts,
with both starts (N(0, I) and around the data mean), and append one JSON line.

    python scripts/score_progress.py runs/pixel_text/state.pt   # the run's latest saved state
    python scripts/score_progress.py shipped                     # data/pixel_text.safetensors

Run it on the core the training does not use (one thread, ~2.5 min per start for
128 prompts). The README's learning curve of pixel_text comes from this script.

It also measures whether the model reads the relation word at all
(``relation_shift``): each two-group prompt is drawn twice with the same noise,
once as written and once with its relation swapped ("above" <-> "below",
"left" <-> "right"); the first group's mean centre should move by several pixels
along the relation's axis, in the caption's direction. A model that treats the
caption as a bag of words moves it by ~0 px; pictures of the shapes world itself,
rendered with the same layout seed, by ~16 px (the ``data`` entry).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kandlab import shapes, train, weights
from kandlab.diffusion import GaussianDiffusion
from kandlab.pipeline import Pipeline
from kandlab.tokenizer import ShapesTokenizer


def load(source: str, recipe: train.Recipe) -> tuple[torch.nn.Module, int]:
    """The EMA model of a state file (copied first: the run rewrites it) or the shipped one."""
    model = train.build_model(recipe)
    if source == "shipped":
        model.load_state_dict(weights.load_tiny_state_dict(f"{recipe.name}.safetensors"))
        return model.eval(), weights.load_card(f"{recipe.name}.safetensors")["steps"]
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "state.pt"
        shutil.copy(source, copy)
        state = torch.load(copy, weights_only=False)
    model.load_state_dict(state["ema"])
    return model.eval(), state["log"]["step"]


_SWAP = {"above": "below", "below": "above", "left": "right", "right": "left"}


def _shift(prompts: list[str], as_written: list, swapped: list) -> dict:
    """Mean move (px) of each prompt's first group, towards its caption's side, from the swapped picture."""
    shifts = []
    for p, x, y in zip(prompts, as_written, swapped):
        scene = shapes.parse_caption(p)
        axis = 0 if scene.relation in ("left of", "right of") else 1  # 0: x, 1: y
        sign = -1.0 if scene.relation in ("left of", "above") else 1.0  # towards smaller / larger coordinates
        centres = [[b.centre[axis] for b in shapes.detect(im) if b.colour == scene.groups[0].colour] for im in (x, y)]
        if all(centres):
            shifts.append(sign * (np.mean(centres[0]) - np.mean(centres[1])))
    return {"px": round(float(np.mean(shifts)), 2) if shifts else None, "pairs": len(shifts)}


def relation_shift(pipe: Pipeline, prompts: list[str], steps: int = 25, guidance: float = 4.0) -> dict:
    """How far the first group moves when the relation is swapped, for the model (same noise for
    both prompts) and for the shapes world itself (same layout seed): ``{"model": ..., "data": ...}``."""
    two = [p for p in prompts if shapes.parse_caption(p).relation]
    swapped = [" ".join(_SWAP.get(w, w) for w in p.split()) for p in two]
    drawn = [pipe(batch, steps=steps, guidance=guidance, seed=7, progress=False) for batch in (two, swapped)]
    rendered = [[shapes.render(shapes.parse_caption(p), pipe.image_size, i) for i, p in enumerate(batch)]
                for batch in (two, swapped)]
    return {"model": _shift(two, *drawn), "data": _shift(two, *rendered)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a state.pt of a run, or 'shipped'")
    parser.add_argument("--recipe", default="pixel-text", choices=[n for n, r in train.RECIPES.items() if r().text])
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--out", default="runs/score_progress.jsonl")
    parser.add_argument("--relation-only", action="store_true", help="skip ShapesBench, measure relation_shift only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = train.RECIPES[args.recipe]()
    model, step = load(args.source, recipe)
    diffusion = GaussianDiffusion(recipe.betas())
    row = {"step": step, "prompts": args.prompts}
    for start in () if args.relation_only else ("noise", "data_mean"):
        began = time.perf_counter()
        score, _ = train.score_model(recipe, model, diffusion, args.prompts, start=start)
        row[start] = {k.removeprefix("shapesbench_"): v for k, v in score.items() if k.startswith("shapesbench_")}
        row[start]["seconds"] = round(time.perf_counter() - began)
    pipe = Pipeline(model, ShapesTokenizer.from_shapes(max_length=recipe.max_length), diffusion, recipe.image_size)
    row["relation_shift"] = relation_shift(pipe, train.score_prompts(args.prompts))
    print(json.dumps(row))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
