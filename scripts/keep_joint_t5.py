"""Keep the T5 encoder of the jointly trained pixel_text (GLIDE's recipe, shipped in sessions 1-5) as
``data/pixel_text_joint_t5.safetensors``, so that lesson 04 can compare it with the shipped encoder that was
pretrained on captions and frozen (Imagen's recipe). The UNet half (23 MB) is not kept; the card keeps that
model's ShapesBench and relation-shift numbers, measured by `kandlab.train`'s scorers.

    git show 7b3c046:data/pixel_text.safetensors > /tmp/joint.safetensors   # (its card: 7b3c046:data/pixel_text.json)
    python scripts/keep_joint_t5.py /tmp/joint.safetensors /tmp/joint.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kandlab import train, weights
from kandlab.diffusion import GaussianDiffusion
from kandlab.pipeline import TextToImage
from kandlab.t5 import T5Config
from kandlab.unet import UNetConfig

NAME = "pixel_text_joint_t5"


def main() -> None:
    source, source_card = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    torch.set_num_threads(1)
    state = load_file(str(source))
    recipe = train.pixel_text()
    model = TextToImage(UNetConfig(**source_card["unet_config"]), T5Config(**source_card["t5_config"]))
    model.load_state_dict(state)
    shift = train.score_relations(recipe, model.eval(), GaussianDiffusion(recipe.betas()))

    out = weights.data_dir()
    path = out / f"{NAME}.safetensors"
    save_file({k.removeprefix("t5."): v.contiguous() for k, v in state.items() if k.startswith("t5.")}, str(path))
    card = {
        "name": NAME,
        "description": "The tiny T5 encoder of the jointly trained pixel_text (T5 and UNet trained together from the "
                       "diffusion loss alone, GLIDE's recipe; shipped until session 6), kept for lesson 04's "
                       "frozen-vs-joint comparison. Its UNet is not kept; `source` holds that model's numbers.",
        "t5_config": source_card["t5_config"],
        "parameters": sum(v.numel() for k, v in state.items() if k.startswith("t5.")),
        "source": {"file": "pixel_text.safetensors at commit 7b3c046", "sha256": weights.sha256_file(source),
                   **{k: source_card[k] for k in ("steps", "wall_time_seconds", "stages", "score",
                                                   "score_data_mean_start")},
                   "relation_shift": shift},
        "rebuild": "python scripts/keep_joint_t5.py (see its docstring)",
        "sha256": weights.sha256_file(path),
    }
    (out / f"{NAME}.json").write_text(json.dumps(card, indent=2) + "\n")
    weights.write_manifest(out)
    print(json.dumps(card["source"]["relation_shift"]))


if __name__ == "__main__":
    main()
