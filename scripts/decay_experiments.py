"""Session 9's experiments: continue the shipped pixel_text (three stages, 9,750 steps) with a fresh AdamW whose
rate falls from 2e-4 to 0 along a cosine (`train.lr_at`, ``lr_decay="cosine"``), on one core each.

    python scripts/decay_experiments.py decay 11500        # anneal stage's data: u ~ N(2.5, 1), 75 % two-group
    python scripts/decay_experiments.py decay-wide 11500   # the same with u ~ N(1.5, 1), the layout stage's shift

Each saves ``runs/<arm>/pixel_text/state.pt`` every 250 steps; score with
``scripts/layout_probe.py runs/<arm>/pixel_text/state.pt <tag>``. Session 8 found the rate the lever (constant
8e-4 → 2e-4 took the probe from 0.57 to 0.73, and 5e-5 for the last 500 steps 0.75); a decay to 0 is the end of
that road. ``decay-wide`` asks whether the last steps should go back to mid noise, where shapes get their edges.

Session 9 ran both to 11,500 steps side by side (75.7 min each, 0.39 steps/s). On the probe's first 128 prompts
(DDIM 25; the anneal stage: 0.73 overall, count 0.74, 17 % of groups over-counted): ``decay`` 0.80 (count 0.80,
12 % over), ``decay-wide`` **0.81** (count 0.83, 10 % over) -- 2 images of 128 apart, within the probe's noise;
``decay-wide`` counted best and is the shipped decay stage, `train.pixel_text_decay`, exported by copying its
state to ``runs/pixel-text-decay/pixel_text/state.pt`` and running ``kandlab train pixel-text-decay``.
"""
from __future__ import annotations

import dataclasses
import sys

import torch

from kandlab import train

ARMS = {"decay": dict(lr_decay="cosine"),
        "decay-wide": dict(lr_decay="cosine", t_logit_mean=1.5)}


def main() -> None:
    arm, steps = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    recipe = dataclasses.replace(train.pixel_text_anneal(), steps=steps, threads=1, **ARMS[arm])
    train.train(recipe, run_dir=f"runs/{arm}", from_shipped=True)


if __name__ == "__main__":
    main()
