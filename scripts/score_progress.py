"""ShapesBench of a text-to-image training run while it trains: score the EMA weights
of ``runs/<name>/state.pt`` (or the shipped checkpoint) on the first N fixed prompts,
with both starts (N(0, I) and around the data mean), and append one JSON line.

    python scripts/score_progress.py runs/pixel_text/state.pt   # the run's latest saved state
    python scripts/score_progress.py shipped                     # data/pixel_text.safetensors

Run it on the core the training does not use (one thread, ~2.5 min per start for
128 prompts). The learning curve of pixel_text in its model card (data/pixel_text.md) comes from this script.

It also measures whether the model reads the relation word at all
(``relation_shift``, `kandlab.train.score_relations`): each two-group prompt is drawn
twice with the same noise, once as written and once with its relation swapped
("above" <-> "below", "left" <-> "right"); the first group's mean centre should move
by several pixels along the relation's axis, in the caption's direction. A model that
treats the caption as a bag of words moves it by ~0 px; pictures of the shapes world
itself, rendered with the same layout seed, by ~16 px (the ``data`` entry).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from kandlab import train, weights
from kandlab.diffusion import GaussianDiffusion


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
    shift = train.score_relations(recipe, model, diffusion, args.prompts)
    row["relation_shift"] = {k: shift[k] for k in ("model", "data")}
    print(json.dumps(row))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
