"""Experiments on why the jointly trained pixel_text ignored relations ("A above B"); each is scored with
``scripts/score_progress.py``. Results: the model card data/pixel_text.md (training history).

    python experiments/relation_experiments.py lognorm 20000   # continue the shipped weights, t/T = σ(u), u ~ N(1, 1)
    python experiments/relation_experiments.py rel 20000       # continue the shipped weights, 80 % two-group captions
    python experiments/relation_experiments.py frozen 8000     # from step 0: T5 pretrained on the captions, then frozen
    python experiments/relation_experiments.py late 20000      # continue the shipped frozen-T5 model, mostly high noise

Each saves ``runs/<arm>/pixel_text/state.pt`` every 250 steps; stop it when you like. The two continuations
ran on one core each (session 5) from the jointly trained model shipped then (it is this file at commit 7b3c046
that continues it: ``data/pixel_text.safetensors`` is now the frozen-T5 model). ``frozen`` is the recipe option
`train.Recipe.text_pretrain_steps` on both cores (session 6); stopped at 5,000 steps it is the shipped pixel_text.

Session 7 continued the frozen-T5 model (stage 1, 5,000 steps) on one core each: ``late`` (t/T = σ(u),
u ~ N(1.5, 1), 75 % two-group captions) stopped at 8,000 steps is the shipped pixel_text's layout stage, the
recipe `train.pixel_text_layout`; ``late-rel`` (100 % two-group captions) was stopped at 6,000 steps (better
two-group pictures, worse one-group ones); ``late25`` (u ~ N(2.5, 1)) resumed ``late``'s state at 6,250 steps
(copy ``runs/late/pixel_text/state.pt`` to ``runs/late25/pixel_text/`` first).

Session 5 also had an arm ``layout-t5`` (the shipped T5 taught each word's side of the picture, then frozen,
the shipped UNet continued); it is this file at commit 7b3c046. ``frozen`` replaces it: the same idea as a
recipe option, with every group attribute in the objective and the UNet trained from step 0.
"""
from __future__ import annotations

import dataclasses
import sys

import torch

from kandlab import train

CONTINUED = {"lognorm": dict(t_sampling="logit_normal", t_logit_mean=1.0), "rel": dict(p_relation=0.8),
             # session 7, from the frozen-T5 model: a layout stage, most steps at high noise
             "late": dict(t_sampling="logit_normal", t_logit_mean=1.5, p_relation=0.75, threads=1),
             "late-rel": dict(t_sampling="logit_normal", t_logit_mean=1.5, p_relation=1.0, threads=1),
             "late25": dict(t_sampling="logit_normal", t_logit_mean=2.5, p_relation=0.75, threads=1)}
FROM_SCRATCH = {"frozen": dict(text_pretrain_steps=1000, threads=2)}


def main() -> None:
    arm, steps = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    changes = {**CONTINUED, **FROM_SCRATCH}[arm]
    recipe = dataclasses.replace(train.pixel_text(), steps=steps, **changes)
    train.train(recipe, run_dir=f"runs/{arm}", from_shipped=arm in CONTINUED)


if __name__ == "__main__":
    main()
