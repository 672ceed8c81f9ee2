"""Sessions 8 and 9's experiments on counting: continuations of the shipped pixel_text. Each arm continues the
checkpoint shipped when it ran (``from_shipped``): to rerun one now, first put that stage's ``data/pixel_text.*``
back (``git log data/pixel_text.json`` finds it). Session 8 continued the layout stage (8,000 steps) with even
more of its training at high noise, where the number of objects is decided. Scored while they train
with ``experiments/layout_probe.py runs/<arm>/pixel_text/state.pt <tag>``.

    python experiments/count_experiments.py noisier 20000     # t/T = σ(u), u ~ N(2.5, 1), lr 8e-4
    python experiments/count_experiments.py noisier-slow 20000  # the same with lr 2e-4

Both continue ``data/pixel_text.safetensors`` with a fresh AdamW on one core each, keep 75 % two-group captions,
and save ``runs/<arm>/pixel_text/state.pt`` every 250 steps; stop them when you like. ``cooldown`` (lr 5e-5)
resumed ``noisier-slow``'s state at 9,250 steps.

Session 8 ran them from the layout stage's checkpoint (8,000 steps; 0.57 overall, count 0.60 on the probe's 128
prompts). At 9,000 steps: ``noisier`` 0.58 (count 0.63), ``noisier-slow`` **0.70** (count 0.73); stopped at 9,750:
``noisier-slow`` 0.73 (count 0.74), ``cooldown`` 0.75 (count 0.76; 3 images of 128 more than ``noisier-slow``,
within the probe's noise). The time-step shift alone changed little; the lower rate is what helped.
``noisier-slow`` at 9,750 steps is the shipped anneal stage, `train.pixel_text_anneal`. It was exported with a
one-off script that loaded the saved state and called `train.export`; ``kandlab train pixel-text-anneal`` does the
same without it: copy the state to ``runs/pixel-text-anneal/pixel_text/state.pt`` and the command resumes it at
its last step (nothing left to train) and exports (35 minutes of scoring on 2 threads of session 8's machine).

Session 9 continued the shipped anneal stage (9,750 steps) with a fresh AdamW whose rate falls from 2e-4 to 0
along a cosine (`train.lr_at`, ``lr_decay="cosine"``):

    python experiments/count_experiments.py decay 11500        # the anneal stage's u ~ N(2.5, 1), 75 % two-group
    python experiments/count_experiments.py decay-wide 11500   # the same with u ~ N(1.5, 1), the layout stage's shift

Both ran to 11,500 steps side by side (75.7 min each, 0.39 steps/s). On the probe's first 128 prompts (DDIM 25;
the anneal stage: 0.73 overall, count 0.74, 17 % of groups over-counted): ``decay`` 0.80 (count 0.80, 12 % over),
``decay-wide`` **0.81** (count 0.83, 10 % over) -- 2 images of 128 apart, within the probe's noise. ``decay-wide``
counted best and is the shipped decay stage, `train.pixel_text_decay`, exported by copying its state to
``runs/pixel-text-decay/pixel_text/state.pt`` and running ``kandlab train pixel-text-decay``.
"""
from __future__ import annotations

import dataclasses
import sys

import torch

from kandlab import train

ARMS = {  # arm: (the stage it continues, what it changes)
    "noisier": (train.pixel_text_layout, dict(t_logit_mean=2.5)),
    "noisier-slow": (train.pixel_text_layout, dict(t_logit_mean=2.5, lr=2e-4)),
    # resumes noisier-slow's state (copy runs/noisier-slow/pixel_text/state.pt to runs/cooldown/pixel_text/)
    "cooldown": (train.pixel_text_layout, dict(t_logit_mean=2.5, lr=5e-5)),
    "decay": (train.pixel_text_anneal, dict(lr_decay="cosine")),
    "decay-wide": (train.pixel_text_anneal, dict(lr_decay="cosine", t_logit_mean=1.5)),
}


def main() -> None:
    arm, steps = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    stage, changes = ARMS[arm]
    recipe = dataclasses.replace(stage(), steps=steps, threads=1, **changes)
    train.train(recipe, run_dir=f"runs/{arm}", from_shipped=True)


if __name__ == "__main__":
    main()
