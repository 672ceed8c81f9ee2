"""The second stage of decoder_tiny: two arms trained side by side, chosen on validation images, not the benchmark.

The shipped decoder's first stage (6,000 steps) redrew held-out scenes from their own CLIP embedding right
only about a quarter of the time, with its loss still falling when the learning rate reached zero. Stage 2
continues its EMA weights with a fresh AdamW (`train_unclip.decoder_polish`); the two arms differ only in
which time steps they train on:

    uniform       DDPM's t ~ U{0, T-1}, as stage 1
    logit_normal  t/T = σ(u), u ~ N(1, 1): more steps at high noise, where counts and layout are decided
                  (what taught latent_text its counts; DESIGN.md "What training the tiny models taught")

    python scripts/decoder_polish.py data                 # once: latents and embeddings of the training world
    python scripts/decoder_polish.py train uniform        # one thread each, two side by side (~48 min)
    python scripts/decoder_polish.py train logit_normal
    python scripts/decoder_polish.py validate             # both arms on 256 validation images (~2 min each)

Validation: variations (image → CLIP → decoder) of 256 images of `ShapesDataset(size=64, seed=7)` — neither
the training seed 0 nor the benchmark seed 2024 — scored against their captions, decoder DDIM 50 steps,
guidance 4, seeds 1234 + batch start; "stage 1" is data/decoder_tiny as it was before stage 2 shipped. Results
go to scripts/results/decoder_polish.json. The arm that won (logit_normal: 0.309 against 0.258 uniform and 0.227
for stage 1, n = 256) became `train_unclip.decoder_polish`; its run was renamed runs/decoder_tiny_polish (where
this script now trains and reads it) and shipped with `kandlab train decoder-tiny-polish`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

from kandlab import train_unclip, weights

RESULTS = Path(__file__).resolve().parent / "results" / "decoder_polish.json"
VALIDATION_SEED, N_VALIDATION = 7, 256
ARMS = ("uniform", "logit_normal")


def arm_recipe(arm: str) -> train_unclip.DecoderRecipe:
    """The shipped stage 2 (`train_unclip.decoder_polish`, in runs/decoder_tiny_polish) is the logit-normal arm;
    the uniform arm is the same recipe with uniform time steps, in runs/decoder_tiny_polish_uniform."""
    shipped = train_unclip.decoder_polish()
    if arm == "logit_normal":
        return shipped
    return dataclasses.replace(shipped, name=f"{shipped.name}_{arm}", t_sampling="uniform", t_logit_mean=0.0)


def validate(run_dir: str = "runs") -> dict:
    """Score each arm's EMA weights (and stage 1, while data/decoder_tiny is still one stage) on the validation
    images with `unclip.variation_scores`."""
    from kandlab.unclip import UnCLIPPipeline, variation_scores

    torch.set_num_threads(os.cpu_count() or 1)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    pipe = UnCLIPPipeline.from_tiny()
    models = {arm: Path(run_dir) / arm_recipe(arm).name / "state.pt" for arm in ARMS}
    if "stages" not in weights.load_card("decoder_tiny.safetensors"):
        models = {"stage 1 alone": None, **models}
    else:
        print("data/decoder_tiny already ships stage 2: stage 1's row is kept as recorded", flush=True)
    for arm, state_path in models.items():
        steps, minutes = 0, 0.0
        if state_path is not None:
            state = torch.load(state_path, weights_only=False)
            pipe.decoder.load_state_dict(state["ema"])
            steps, minutes = state["log"]["step"], round(state["log"]["seconds"] / 60, 1)
        start = time.perf_counter()
        score = variation_scores(pipe, N_VALIDATION, progress=False, seed=VALIDATION_SEED)
        score = {k.removeprefix("shapesbench_"): v for k, v in score.items() if k.startswith("shapesbench_")}
        results[arm] = {"stage_2_steps": steps, "stage_2_minutes": minutes, "variations": score, "n": N_VALIDATION}
        print(f"{arm}: {score} ({time.perf_counter() - start:.0f} s)", flush=True)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    return results


def main(argv: list[str]) -> int:
    if argv[:1] == ["data"]:
        train_unclip.decoder_data(train_unclip.decoder_polish())
    elif argv[:1] == ["train"] and len(argv) == 2 and argv[1] in ARMS:
        train_unclip.train_decoder(arm_recipe(argv[1]))
    elif argv[:1] == ["validate"]:
        validate()
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
