"""How the shipped pixel_text's anneal stage was exported (session 8): the ``noisier-slow`` arm of
``scripts/count_experiments.py`` (lr 2e-4, u ~ N(2.5, 1), continued from the shipped layout stage at 8,000
steps), stopped at `train.pixel_text_anneal`'s step count, its state copied first, written out over the
layout-stage checkpoint in data/ exactly as ``kandlab train pixel-text-anneal`` would.

    python scripts/export_anneal.py runs/noisier-slow-9750.pt

Export scores 512 prompts twice and the relation shift: about 25 minutes on 2 threads of this machine.
"""
from __future__ import annotations

import sys

import torch

from kandlab import train


def main() -> None:
    torch.set_num_threads(2)
    state = torch.load(sys.argv[1], weights_only=False)
    log = state["log"]
    recipe = train.pixel_text_anneal()
    if recipe.steps != log["step"]:
        raise SystemExit(f"the state is at step {log['step']}, the recipe says {recipe.steps}")
    fresh = train.continue_shipped(recipe, train.build_model(recipe), train.build_model(recipe))  # reads the card
    if fresh["earlier"] != log["earlier"]:
        raise SystemExit("data/pixel_text is not the checkpoint this run continued")
    ema = train.build_model(recipe)
    ema.load_state_dict(state["ema"])
    print(train.export(recipe, ema.eval(), log, command="kandlab train pixel-text-anneal"))


if __name__ == "__main__":
    main()
