"""How the shipped pixel_text's layout stage was exported (session 7): the ``late`` arm of
``scripts/relation_experiments.py``, stopped at 8,000 steps (its state copied first), written out as
`train.pixel_text_layout` over the stage-1 checkpoint in data/.

    python scripts/export_layout_stage.py /tmp/late8000.pt

That run started before `train.continue_shipped` carried stage 1's end scores, rebuild command and T5
pretraining log into a continuation's log; they are taken from the stage-1 card here, by calling the
current `continue_shipped` on it. A run started with `kandlab train pixel-text-layout` needs none of this.
Export scores 512 prompts twice and the relation shift: about 17 minutes on 2 threads.
"""
from __future__ import annotations

import sys

import torch

from kandlab import train


def main() -> None:
    torch.set_num_threads(2)
    state = torch.load(sys.argv[1], weights_only=False)
    log = state["log"]
    recipe = train.pixel_text_layout()
    if recipe.steps != log["step"]:
        raise SystemExit(f"the state is at step {log['step']}, the recipe says {recipe.steps}")
    ema = train.build_model(recipe)
    ema.load_state_dict(state["ema"])
    fresh = train.continue_shipped(recipe, train.build_model(recipe), train.build_model(recipe))  # reads the card
    assert fresh["earlier"]["steps"] == log["earlier"]["steps"], "data/pixel_text is not the run's stage 1"
    log["earlier"], log["text_pretrain"] = fresh["earlier"], fresh["text_pretrain"]
    print(train.export(recipe, ema.eval(), log, command="kandlab train pixel-text-layout"))


if __name__ == "__main__":
    main()
