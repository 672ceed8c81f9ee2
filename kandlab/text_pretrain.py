r"""Pretraining the tiny T5 on captions alone, so it can be frozen (Imagen's recipe).

Imagen (Saharia et al. 2022, §2.1) conditions on a T5 that was pretrained on text
only and then **frozen**: the language model already knows which word belongs to
which, and the diffusion model learns to read it. GLIDE instead trains its text
transformer **jointly** with the diffusion model, from the image loss alone.

The shapes world has no text corpus to pretrain on, and masked-word prediction on
its captions would not teach syntax: hiding "above" in "a red circle above a blue
square" leaves nothing to predict it from. So the tiny T5 learns to **parse**: a
linear head on every word of a group must say that group's

    side   — anywhere (one group) / top / bottom / left / right (two groups)
    count  — 1, 2, 3
    colour — one of the six
    shape  — circle, square, triangle
    size   — unsaid, small, large

read off the caption text by the grammar (`shapes.parse_caption`), no image.
After it, the encoding of "red" in "… red circle above …" says *red, top*, and in
"… red circle below …" *red, bottom*: the roles of the words, which a jointly
trained encoder never learned here (the README's diagnosis: a bag of words).

``pretrain(t5, captions, tokenizer, steps)`` trains the encoder in place and
returns a log with the held-out accuracy of each field.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from kandlab import shapes
from kandlab.t5 import T5Encoder
from kandlab.tokenizer import ShapesTokenizer

IGNORE = -100  # label of relation words, </s> and padding (F.cross_entropy's ignore_index)

# The classes of every field; a label is an index into its tuple.
FIELDS: dict[str, tuple] = {
    "side": ("anywhere", "top", "bottom", "left", "right"),
    "count": tuple(shapes.COUNTS),  # 1, 2, 3
    "colour": tuple(shapes.COLOURS),
    "shape": shapes.SHAPES,
    "size": ("unsaid", *shapes.SIZES),  # the size word is optional
}

# Where "groups[0] <relation> groups[1]" puts each group.
_SIDES = {"above": ("top", "bottom"), "below": ("bottom", "top"),
          "left of": ("left", "right"), "right of": ("right", "left")}


@dataclass(frozen=True)
class PretrainConfig:
    """The text-pretraining stage: AdamW on T5 + heads, constant rate after no warm-up."""

    steps: int = 1500
    batch_size: int = 256
    lr: float = 1e-3
    held_out: int = 2048  # captions of ShapesDataset(seed=2024), never trained on as a set


def _n_words(group: shapes.Group) -> int:
    """How many words a caption spends on one group ("two small red circles": 4)."""
    return len(shapes.caption(shapes.Scene((group,))).split())


def word_labels(text: str, length: int) -> dict[str, list[int]]:
    """Per token of a caption (``length`` tokens, as the tokenizer pads them): each field's
    label for the words of a group, `IGNORE` for relation words, ``</s>`` and padding.

    >>> word_labels("a red circle above two blue squares", 10)["side"]
    [1, 1, 1, -100, 2, 2, 2, -100, -100, -100]
    """
    scene = shapes.parse_caption(text)
    labels = {field: [IGNORE] * length for field in FIELDS}
    sides = _SIDES[scene.relation] if scene.relation else ("anywhere",)
    start = 0
    for group, side in zip(scene.groups, sides):
        n = _n_words(group)
        values = {"side": side, "count": group.count, "colour": group.colour, "shape": group.shape,
                  "size": group.size or "unsaid"}
        for field, value in values.items():
            stop = min(start + n, length)  # a caption cut by the tokenizer keeps its first words
            labels[field][start:stop] = [FIELDS[field].index(value)] * max(stop - start, 0)
        start += n + len(scene.relation.split()) if scene.relation else n
    return labels


def label_tensors(captions: Sequence[str], length: int) -> dict[str, torch.Tensor]:
    """`word_labels` of many captions, stacked: {field: (N, length) long}."""
    rows = [word_labels(c, length) for c in captions]
    return {field: torch.tensor([r[field] for r in rows]) for field in FIELDS}


class ParseHeads(nn.Module):
    """One linear classifier per field on every token: (B, L, D) → {field: (B, L, classes)}."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({field: nn.Linear(d_model, len(classes)) for field, classes in FIELDS.items()})

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {field: head(tokens) for field, head in self.heads.items()}


def parse_loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over the fields of the mean cross-entropy over the labelled tokens."""
    return sum(F.cross_entropy(logits[f].flatten(0, 1), labels[f].flatten(), ignore_index=IGNORE) for f in FIELDS)


@torch.no_grad()
def parse_accuracy(t5: T5Encoder, heads: ParseHeads, ids: torch.Tensor, mask: torch.Tensor,
                   labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per field: the share of labelled tokens whose class the heads get right."""
    logits = heads(t5(ids, mask))  # {field: (N, L, classes)}
    accuracy = {}
    for field, y in labels.items():
        known = y != IGNORE
        accuracy[field] = round((logits[field].argmax(-1) == y)[known].float().mean().item(), 4)
    return accuracy


def pretrain(t5: T5Encoder, captions: Sequence[str], tokenizer: ShapesTokenizer,
             config: PretrainConfig = PretrainConfig(), seed: int = 0, progress: bool = True) -> dict:
    """Train ``t5`` in place to parse ``captions`` (text only); return a log for the model card:
    the config, wall time, the final loss and the held-out accuracy of each field."""
    if config.steps < 1:
        raise ValueError(f"text pretraining needs at least 1 step, got {config.steps}")
    tokens = tokenizer(list(captions))
    ids, mask = tokens["input_ids"], tokens["attention_mask"]  # (N, L)
    labels = label_tensors(captions, ids.shape[1])
    held_captions = [shapes.caption(shapes.ShapesDataset(seed=2024, length=config.held_out).scene(i))
                     for i in range(config.held_out)]
    held = tokenizer(held_captions)
    held_labels = label_tensors(held_captions, held["input_ids"].shape[1])

    heads = ParseHeads(t5.config.d_model)
    t5.train().requires_grad_(True)
    opt = torch.optim.AdamW([*t5.parameters(), *heads.parameters()], lr=config.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    began = time.perf_counter()
    losses = []
    for _ in tqdm(range(config.steps), desc="T5 text pretraining", disable=not progress, leave=False):
        idx = torch.randint(0, len(ids), (config.batch_size,), generator=g)  # (B,)
        loss = parse_loss(heads(t5(ids[idx], mask[idx])), {f: y[idx] for f, y in labels.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    t5.eval()
    return {
        **{k: getattr(config, k) for k in ("steps", "batch_size", "lr")},
        "wall_time_seconds": round(time.perf_counter() - began, 1),
        "final_loss_mean_last_100": round(sum(losses[-100:]) / len(losses[-100:]), 5),
        "held_out_accuracy": parse_accuracy(t5, heads, held["input_ids"], held["attention_mask"], held_labels),
        "held_out_captions": f"{config.held_out} captions of ShapesDataset(seed=2024)",
    }
