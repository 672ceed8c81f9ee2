"""The layout stage's progress table (model card data/pixel_text.md, training history): score a text
model's EMA weights on the first 128 fixed prompts (DDIM 25, guidance 4, N(0, I) start, seed 1234 + batch offset), split into one- and two-group
prompts, with the count confusion (asked × drawn objects, `shapes.count_confusion`), plus the relation shift
over the first 48 two-group prompts among score_prompts(256) (seed 7).

    python experiments/layout_probe.py runs/late/pixel_text/state.pt late-6500   # a run's saved state (copied first)
    python experiments/layout_probe.py shipped shipped                           # data/pixel_text.safetensors
    python experiments/layout_probe.py shipped shipped-256 256                   # the first 256 prompts instead

One thread, about 4 minutes beside a training run (per 128 prompts). Appends one JSON line to runs/layout_probe.jsonl.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kandlab import shapes, train
from kandlab.pipeline import Pipeline
from kandlab.tokenizer import ShapesTokenizer
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from score_progress import load  # noqa: E402  scripts/score_progress.py: a run's EMA (state copied first) or the shipped one


def main() -> None:
    source, tag = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 128  # a multiple of 64; the first 128 are always the same
    torch.set_num_threads(1)
    start = time.time()
    recipe = train.pixel_text()
    model, step = load(source if source.endswith(".pt") else "shipped", recipe)  # the EMA weights
    pipe = Pipeline(model, ShapesTokenizer.from_shapes(max_length=recipe.max_length), train.GaussianDiffusion(recipe.betas()))
    prompts = train.score_prompts(n)
    images = torch.cat([pipe(prompts[i:i + 64], steps=25, seed=1234 + i, progress=False) for i in range(0, n, 64)])
    verdicts = shapes.score_per_image(images, prompts)
    two_group = [shapes.parse_caption(p).relation is not None for p in prompts]
    out = {"tag": tag, "step": step, "prompts": n, "all": {k: round(v, 3) for k, v in shapes.score(images, prompts).items()},
           "count_confusion": shapes.count_confusion(images, prompts).tolist()}  # asked 1-3 × drawn 0-4+
    for name, keep in (("one", [not r for r in two_group]), ("two", two_group)):
        group = [v for v, k in zip(verdicts, keep) if k]
        out[name] = {k: round(float(np.mean([v[k] for v in group])), 3)
                     for k in ("colour", "shape", "count", "position", "overall")}
    pairs = [p for p in train.score_prompts(256) if shapes.parse_caption(p).relation][:48]
    drawn = [pipe(batch, steps=25, seed=7, progress=False) for batch in (pairs, [shapes.swap_relation(p) for p in pairs])]
    out["shift"] = shapes.relation_shift(pairs, *drawn)
    out["seconds"] = round(time.time() - start)
    print(json.dumps(out))
    Path("runs").mkdir(exist_ok=True)
    with open("runs/layout_probe.jsonl", "a") as f:
        f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
