"""Keep the T5 encoder of the jointly trained pixel_text (GLIDE's recipe, shipped in sessions 1-5) as
``data/pixel_text_joint_t5.safetensors``, so that lesson 04 can compare it with the shipped encoder that was
pretrained on captions and frozen (Imagen's recipe). The UNet half (23 MB) is not kept; the card keeps that
model's ShapesBench and relation-shift numbers, measured by `kandlab.train`'s scorers.

    python scripts/keep_joint_t5.py            # reads the jointly trained model from git: commit 7b3c046
    python scripts/keep_joint_t5.py /tmp/joint.safetensors /tmp/joint.json   # or from files (and its card)

It is a copy, not a training run: the jointly trained model was shipped in sessions 1-5 and trained by the
code of its day (3,000 steps with the plain loss, then 3,000 with Min-SNR-5, its card's ``stages``), so
this file's rebuild is taking its T5 out of that checkpoint, not retraining one (a retrained encoder
would have other numbers than the ``source`` lesson 04 cites). The relation shift is measured anew
(about 2 minutes on one thread).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kandlab import train, weights
from kandlab.diffusion import GaussianDiffusion
from kandlab.pipeline import TextToImage
from kandlab.t5 import T5Config
from kandlab.unet import UNetConfig

NAME = "pixel_text_joint_t5"
COMMIT = "7b3c046"  # the last commit that shipped the jointly trained pixel_text


def from_git(folder: Path) -> tuple[Path, Path]:
    """The jointly trained checkpoint and its card, written out of the repository's history into ``folder``."""
    paths = []
    for suffix in ("safetensors", "json"):
        path = folder / f"joint.{suffix}"
        path.write_bytes(subprocess.run(["git", "show", f"{COMMIT}:data/pixel_text.{suffix}"], capture_output=True,
                                        check=True, cwd=Path(__file__).resolve().parent.parent).stdout)
        paths.append(path)
    return paths[0], paths[1]


def main() -> None:
    if len(sys.argv) == 1:
        with tempfile.TemporaryDirectory() as tmp:
            keep(*from_git(Path(tmp)))
    else:
        keep(Path(sys.argv[1]), Path(sys.argv[2]))


def keep(source: Path, card_path: Path) -> None:
    source_card = json.loads(card_path.read_text())
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
        "source": {"file": f"pixel_text.safetensors at commit {COMMIT}", "sha256": weights.sha256_file(source),
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
