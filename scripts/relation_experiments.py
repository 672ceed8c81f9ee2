"""Experiments on why the jointly trained pixel_text ignored relations ("A above B"); each is scored with
``scripts/score_progress.py``. Results: README, "Shipped tiny models".

    python scripts/relation_experiments.py lognorm 20000   # continue the shipped weights, t/T = σ(u), u ~ N(1, 1)
    python scripts/relation_experiments.py rel 20000       # continue the shipped weights, 80 % two-group captions
    python scripts/relation_experiments.py frozen 8000     # from step 0: T5 pretrained on the captions, then frozen

Each saves ``runs/<arm>/pixel_text/state.pt`` every 250 steps; stop it when you like. The two continuations
ran on one core each (session 5) from the jointly trained model shipped then (it is this file at commit 7b3c046
that continues it: ``data/pixel_text.safetensors`` is now the frozen-T5 model). ``frozen`` is the recipe option
`train.Recipe.text_pretrain_steps` on both cores (session 6); stopped at 5,000 steps it is the shipped pixel_text.

Session 5 also had an arm ``layout-t5`` (the shipped T5 taught each word's side of the picture, then frozen,
the shipped UNet continued); it is this file at commit 7b3c046. ``frozen`` replaces it: the same idea as a
recipe option, with every group attribute in the objective and the UNet trained from step 0.
"""
from __future__ import annotations

import dataclasses
import sys

import torch

from kandlab import train

CONTINUED = {"lognorm": dict(t_sampling="logit_normal", t_logit_mean=1.0), "rel": dict(p_relation=0.8)}
FROM_SCRATCH = {"frozen": dict(text_pretrain_steps=1000, threads=2)}


def main() -> None:
    arm, steps = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    changes = {**CONTINUED, **FROM_SCRATCH}[arm]
    recipe = dataclasses.replace(train.pixel_text(), steps=steps, **changes)
    train.train(recipe, run_dir=f"runs/{arm}", from_shipped=arm in CONTINUED)


if __name__ == "__main__":
    main()
