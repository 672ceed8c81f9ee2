"""Add the ShapesBench score with the data-mean start to a shipped checkpoint's card.

    python scripts/rescore_start.py pixel_text

`kandlab.train.export` writes both scores (start from N(0, I) and start around
`shapes.dataset_mean`) for every new checkpoint; this script adds the second one
to a card exported before the option existed, without retraining. It rewrites
the card's ``score_data_mean_start`` and the sha256 manifest.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from kandlab import train, weights
from kandlab.diffusion import GaussianDiffusion
from kandlab.pipeline import Pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=["pixel_text", "pixel_uncond"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = train.RECIPES[args.name.replace("_", "-")]()
    if recipe.text is None:
        model = train.load_tiny_unet(args.name)
    else:
        model = Pipeline.from_tiny(args.name).model
    start = time.perf_counter()
    score, _ = train.score_model(recipe, model, GaussianDiffusion(recipe.betas()), recipe.n_score, start="data_mean")
    score["seconds"] = round(time.perf_counter() - start, 1)
    card_path = weights.data_dir() / f"{args.name}.json"
    card = json.loads(card_path.read_text())
    card["score_data_mean_start"] = score
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    weights.write_manifest(weights.data_dir())
    print(json.dumps(score, indent=2))


if __name__ == "__main__":
    main()
