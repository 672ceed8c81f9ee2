"""Readable model cards: ``data/<name>.md`` generated from the JSON card beside each checkpoint.

Every shipped checkpoint ``data/<name>.safetensors`` has a JSON card ``data/<name>.json``. Training
(`kandlab.train.export`) writes its measured fields: recipe, configs, steps, wall time, hardware, scores
with their sample size, sha256. The card's *prose* fields say what the numbers mean:

=====================  ===================================================================================
``summary``            what the model is, in a paragraph
``intended_use``       what it is for (and what not)
``training_data``      what it was trained on
``sample_grid``        ``{"file", "caption"}``: the sample grid beside the checkpoint
``stage_notes``        one ``{"name", "recipe", "note", "settings"?}`` per entry of ``stages``; ``settings``
                       holds stage settings recorded before they were stage fields, with ``settings_source``
``hardware_note``      what else ran on the machine while it trained
``score_reference``    the same scores measured on the training images themselves
``known_failure_modes``  a list of sentences
``history``            the training history and ablations: a list of ``{"experiment", "what", "setup"?,
                       "table"? {"columns", "rows"}, "confusion"? (a path to a score with a count
                       confusion), "source"}``
``rebuild_note``       what the rebuild command does, how long it takes
=====================  ===================================================================================

Numbers in prose fields are written as placeholders that name the field they come from, so that the
Markdown cannot drift from the measurement: ``{score.shapesbench_overall:.2f}`` (a dotted path into this
card, list items by index: ``{stages.0.steps:,}``), ``{pixel_text_joint_t5@source.steps:,}`` (another
card in ``data/``), with a Python format spec or ``min`` (seconds shown as minutes). Numbers that no field
holds (probe runs whose checkpoints were not kept) are written out, with their ``source``.

    python -m kandlab.cards            # write data/<name>.md for every data/<name>.json
    python -m kandlab.cards --check    # exit 1 if any .md is missing or stale
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from kandlab import weights
from kandlab.course import share_se

# What each score means (the scorer's definitions, `kandlab.shapes.score` / `unconditional_stats`).
METRICS: dict[str, tuple[str, str]] = {  # key → (name, meaning)
    "shapesbench_overall": ("overall", "share of images with every scored category right at once"),
    "shapesbench_colour": ("colour", "share of images whose set of drawn colours is exactly the caption's"),
    "shapesbench_shape": ("shape", "share of images where every group's blobs have the caption's shape"),
    "shapesbench_count": ("count", "share of images where every group has exactly the caption's number of objects"),
    "shapesbench_position": ("position", "share of two-group images with the first group on the caption's side "
                                         "of the second (> 1 px along the relation's axis)"),
    "shapesbench_plausible": ("plausible", "share of samples that some caption of the shapes world could describe "
                                           "(1–2 colours, 1–3 blobs of one recognised shape each, few specks)"),
    "shapesbench_recognised": ("recognised", "share of all blobs that are a circle, square or triangle"),
    "shapesbench_blobs": ("blobs", "mean number of blobs per image"),
    "shapesbench_colours": ("colours", "mean number of distinct colours per image"),
}
SHARES = {k for k in METRICS if k not in ("shapesbench_blobs", "shapesbench_colours")}  # proportions: have an SE
TEXT_METRICS = ["shapesbench_overall", "shapesbench_colour", "shapesbench_shape", "shapesbench_count",
                "shapesbench_position"]
UNCOND_METRICS = ["shapesbench_plausible", "shapesbench_recognised", "shapesbench_blobs", "shapesbench_colours"]
# Recipe fields a reader needs, in reading order (the rest of the recipe is in the JSON).
RECIPE_FIELDS = ["steps", "batch_size", "lr", "warmup", "lr_decay", "ema_decay", "schedule", "min_snr_gamma",
                 "t_sampling", "t_logit_mean", "p_relation", "cond_dropout", "text_pretrain_steps", "num_images",
                 "image_size", "max_length", "guidance", "seed", "threads", "text_from", "latent", "latent_scale",
                 "crop", "betas", "restart_every", "weight_decay", "regression", "embed_dropout", "sample_steps",
                 "clip", "init_from"]
PROSE_FIELDS = ("summary", "intended_use", "training_data", "sample_grid", "stage_notes", "hardware_note",
                "score_reference", "known_failure_modes", "history", "rebuild_note")

_PLACEHOLDER = re.compile(r"\{(?:([a-z0-9_]+)@)?([A-Za-z_][\w.]*)(?::([^{}]*))?\}")


# ---------------------------------------------------------------------------
# Reading fields


def lookup(card: dict, path: str) -> Any:
    """The value at a dotted ``path`` of a card (``"stages.0.score_at_end.shapesbench_count"``)."""
    value: Any = card
    for part in path.split("."):
        try:
            value = value[int(part)] if isinstance(value, list) else value[part]
        except (KeyError, IndexError, ValueError, TypeError):
            raise KeyError(f"card {card.get('name', '?')!r} has no field {path!r} (stuck at {part!r})") from None
    return value


def _format(value: Any, spec: str | None) -> str:
    if spec == "min":  # seconds → minutes
        return f"{value / 60:.1f} min"
    if spec:
        return format(value, spec)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def fill(text: str, card: dict, cards: dict[str, dict] | None = None) -> str:
    """Replace every ``{path:spec}`` / ``{name@path:spec}`` placeholder with the field's formatted value."""
    def one(match: re.Match) -> str:
        other, path, spec = match.groups()
        source = card
        if other:
            if not cards or other not in cards:
                raise KeyError(f"card {card.get('name')!r} cites card {other!r}, which was not given")
            source = cards[other]
        return _format(lookup(source, path), spec)

    return _PLACEHOLDER.sub(one, text)


def position_trials(score: dict) -> int | None:
    """How many two-group prompts the position share was measured on: every group of every prompt is one
    row of the count confusion, so groups − prompts = prompts with two groups. None without the confusion."""
    matrix = score.get("count_confusion")
    if not matrix or "prompts" not in score:
        return None
    return sum(map(sum, matrix)) - score["prompts"]


def score_cell(score: dict, key: str) -> str:
    """``0.82 ± 0.02`` for a share (its standard error over the prompts or samples it was measured on),
    ``3.92`` for a mean (no per-image spread is recorded)."""
    value = score[key]
    n = score.get("prompts") or score.get("samples")
    if key == "shapesbench_position":
        n = position_trials(score)
    if key == "shapesbench_recognised" and n and "shapesbench_blobs" in score:
        n = round(n * score["shapesbench_blobs"])  # a share of all blobs, not of the samples
    if key in SHARES and n:
        return f"{value:.2f} ± {share_se(value, n):.2f}"
    return f"{value:.2f}"


# ---------------------------------------------------------------------------
# Markdown pieces


def _table(columns: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _hardware(hw: dict) -> str:
    threads = hw.get("threads")
    return (f"{hw.get('machine', '?')} CPU, {hw.get('cpu_count', '?')} cores, "
            f"{threads} thread{'s' if threads != 1 else ''}, torch {hw.get('torch', '?')}")


def _config_line(config: dict) -> str:
    return ", ".join(f"`{k}` {json.dumps(v)}" for k, v in config.items())


def _time_steps(stage: dict) -> str:
    if stage.get("t_sampling", "uniform") == "uniform":
        return "uniform"
    return f"t/T = σ(u), u ~ N({stage['t_logit_mean']}, 1)"


def _lr(stage: dict) -> str:
    rate = f"{stage['lr']:.0e}"
    return rate + (" → 0 (cosine)" if stage.get("lr_decay", "constant") == "cosine" else "")


def _scores_section(card: dict, source: dict, cards: dict | None) -> list[str]:
    """Scores of ``source`` (the card itself, or the ``source`` entry of a kept encoder's card)."""
    out: list[str] = []
    runs = [("N(0, I) (the default)", source.get("score")),
            ("around the data mean", source.get("score_data_mean_start"))]
    runs = [(label, s) for label, s in runs if s]
    if not runs:
        return out
    text = "shapesbench_overall" in runs[0][1]
    keys = TEXT_METRICS if text else UNCOND_METRICS
    keys = [k for k in keys if k in runs[0][1]]
    columns = ["start"] + [METRICS[k][0] for k in keys] + ["n", "sampler"]
    rows = []
    for label, s in runs:
        n = f"{s['prompts']} prompts" if "prompts" in s else f"{s['samples']} samples"
        rows.append([label] + [score_cell(s, k) for k in keys] + [n, s.get("sampler", "")])
    reference = card.get("score_reference")
    if reference:
        rows.append([fill(reference["what"], card, cards)] + [f"{reference[k]:.2f}" if k in reference else "—"
                                                               for k in keys] + ["", ""])
    out += _table(columns, rows)
    out.append("")
    first = runs[0][1]
    if "prompt_set" in first:
        out += [f"Prompts: `{first['prompt_set']}`, the first n, one image each.", ""]
    if text:
        position = ("position is a share of the two-group prompts only: n = groups − prompts, read off the count "
                    "confusion" if position_trials(first) else
                    "position is a share of the two-group prompts only, whose number the card does not record "
                    "(so no ±)")
    else:
        position = ("recognised is a share of all blobs (n = samples × blobs); blobs and colours are means over "
                    "the samples")
    out.append(f"± is the standard error of a share, √(p(1−p)/n); {position}. What each column means:")
    out.append("")
    out += [f"- **{METRICS[k][0]}**: {METRICS[k][1]}." for k in keys]
    out.append("")
    for label, s in runs[:1]:
        if "count_confusion" in s:
            out += _confusion(s["count_confusion"], f"Count confusion (start {label}, {s['prompts']} prompts): every "
                                                    "group of every prompt is one row entry — objects asked for "
                                                    "against objects of that colour drawn.")
    shift = source.get("relation_shift")
    if shift:
        out.append(f"**Relation shift** (`kandlab.train.score_relations`): each two-group prompt drawn twice from the "
                   f"same noise, as written and with its relation swapped (\"above\" ↔ \"below\"); the first group "
                   f"moved **{shift['model']['px']:+.2f} px** towards the side its caption names, over "
                   f"{shift['model']['pairs']} pairs ({shift['prompts']}; {shift['sampler']}). The shapes world itself "
                   f"moves it by {shift['data']['px']:.2f} px ({shift['data']['pairs']} pairs); a model that ignores "
                   "the relation word moves it by about 0 px.")
        out.append("")
    return out


def _accuracy_table(results: dict, what: str) -> list[str]:
    rows = [[k, f"{r['accuracy']:.3f} ± {r['se']:.3f}", f"{r['chance']:.3f}" if "chance" in r else "—", r["n"]]
            for k, r in results.items()]
    return _table([what, "accuracy", "chance", "n"], rows) + [""]


def _unclip_sections(card: dict) -> list[str]:
    """Lesson 08's measurements: CLIP retrieval and binding, the prior's similarity, the decoder's variations."""
    out: list[str] = []
    if "retrieval" in card:
        out += ["## Retrieval and binding", "",
                "Zero-shot caption retrieval on held-out images (`kandlab.train_unclip.clip_retrieval`): the true "
                "caption against every caption that changes one thing of a category; top1_of_all against all n "
                "held-out captions. ± is the standard error of a share.", ""]
        out += _accuracy_table(card["retrieval"], "test")
        out += ["Binding (`clip_binding`): on two-group images, the true caption against the same words with the "
                "two groups' colours (or shapes) exchanged; 0.5 is a bag of words. cos(text, swapped) is how close "
                "the two captions' text embeddings are.", ""]
        rows = [[k, f"{r['accuracy']:.3f} ± {r['se']:.3f}", r["n"], f"{r['text_cosine_to_swapped']:.3f}"]
                for k, r in card["binding"].items()]
        out += _table(["swapped", "true caption preferred", "n", "cos(text, swapped)"], rows) + [""]
    if "similarity" in card:
        sim = card["similarity"]
        out += ["## Similarity to the true image embedding", "",
                f"Cosine similarity to the CLIP embedding of each held-out caption's image "
                f"(`kandlab.train_unclip.prior_similarity`; {sim['sampler']}), mean ± standard error:", ""]
        labels = {"prior": "this model's embedding", "text_embedding": "the caption's CLIP text embedding",
                  "same_caption_other_render": "the same caption rendered again", "random_other_image": "a random other image"}
        out += _table(["embedding", "cosine", "n"], [[labels[k], f"{sim[k]['mean']:.3f} ± {sim[k]['se']:.3f}", sim[k]["n"]]
                                                   for k in labels]) + [""]
        out += ["The caption test of `clip_retrieval` with this model's embedding in the place of the image's:", ""]
        out += _accuracy_table(sim["caption_test"], "test")
    for key, title in (("score", "Binding of the two-stage pipeline"), ("variations", "Variations")):
        entry = card.get(key) if card.get("kind") == "decoder" else None
        if not entry:
            continue
        if key == "variations":
            out += ["## Variations", "", f"Held-out images redrawn from their own CLIP embedding ({entry['sampler']}; "
                    f"`{entry['image_set']}`), scored against their captions: the ceiling of the two-stage pipeline.", ""]
            keys = [k for k in TEXT_METRICS if k in entry]
            out += _table([METRICS[k][0] for k in keys] + ["n"], [[score_cell(entry, k) for k in keys] + [entry["prompts"]]])
            out += [""]
        b = entry["binding"]
        out += [f"**{title if key == 'score' else 'Binding of the variations'}** (`kandlab.shapes.binding_rates`, "
                f"{b['n']} prompts with two groups of different shapes): bound {b['bound']:.3f}, swapped "
                f"{b['swapped']:.3f} ± {b['swapped_se']:.3f}, other {b['other']:.3f}.", ""]
    return out


def _pm(pair: list[float], digits: int = 1) -> str:
    return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def _movq_section(card: dict) -> list[str]:
    """An autoencoder's measurements (`kandlab.train_movq.evaluate`): reconstruction, codebook, latents."""
    arms = [("shipped", card["eval"])] + [(label, e) for label, e in card.get("comparison", {}).items()]
    ev = card["eval"]
    out = [f"Held-out images: {ev['images']}; photos: {ev['photos']}. PSNR in dB (mean ± standard error over the "
           "images), peak-to-peak 2 for images in [-1, 1]; ShapesBench overall of the reconstructions with the "
           "originals' own captions (the originals score "
           f"{ev['shapesbench_originals']['overall']:.2f}).", ""]
    rows = []
    for label, e in arms:
        book = e["codebook"]
        rows.append([label, _pm(e["psnr_shapes_quantized"]), _pm(e["psnr_shapes_not_quantized"]),
                     _pm(e["psnr_photos"]), f"{e['shapesbench_quantized']['overall']:.3f}",
                     f"{book['perplexity']:.1f} of {book['codes']}", f"{book['dead_share']:.1%}",
                     f"{e['latent_std']:.3f}"])
    out += _table(["model", "PSNR shapes (codebook)", "PSNR shapes (no codebook)", "PSNR photos", "ShapesBench",
                   "perplexity", "dead codes", "latent σ"], rows) + [""]
    out += ["- **codebook / no codebook**: decoded through the nearest codes, or from the encoder's latents "
            "directly (`decode(z, quantize=False)`, what the Kandinsky pipelines do).",
            "- **perplexity**: exp of the entropy of the code frequencies on the held-out shapes; equal to the "
            "codebook size when every code is used equally. **dead codes**: never chosen.",
            "- **latent σ**: standard deviation of the (unquantised) latents, which sets the latent model's scale.",
            ""]
    return out


def _confusion(matrix: list[list[int]], caption: str) -> list[str]:
    drawn = len(matrix[0])
    columns = ["asked \\ drawn"] + [str(j) if j < drawn - 1 else f"{j}+" for j in range(drawn)] + ["right"]
    rows = []
    over = under = total = 0
    for k, row in enumerate(matrix, 1):
        rows.append([k] + [f"**{v}**" if j == k else v for j, v in enumerate(row)]
                    + [f"{row[k] / max(sum(row), 1):.0%} of {sum(row)}"])
        over += sum(row[k + 1:])
        under += sum(row[:k])
        total += sum(row)
    out = [caption, ""] + _table(columns, rows)
    out += ["", f"Too many objects: {over} of {total} groups ({over / total:.1%}); too few: {under} "
                f"({under / total:.1%}).", ""]
    return out


def _stages_section(card: dict, cards: dict | None) -> list[str]:
    stages, notes = card.get("stages"), card.get("stage_notes", [])
    if not stages:
        return []
    text = "shapesbench_overall" in card["score"]
    shown = ("overall", "count", "position") if text else ("plausible", "recognised", "blobs")
    columns = ["stage", "UNet steps (total)", "time steps", "lr", "two-group captions", "wall time",
               f"ShapesBench at its end: {' · '.join(shown)}", "relation shift"]
    rows, done = [], 0
    for k, stage in enumerate(stages):
        note = notes[k] if k < len(notes) else {}
        full = {**note.get("settings", {}), **stage}  # settings recorded before they were stage fields
        done += stage["steps"]
        end = stage.get("score_at_end", card["score"] if k == len(stages) - 1 else None)
        shift = stage.get("relation_shift_at_end", card.get("relation_shift") if k == len(stages) - 1 else None)
        rows.append([note.get("name") or stage.get("stage") or f"stage {k + 1}", f"+{stage['steps']:,} ({done:,})", _time_steps(full),
                     _lr(full) if "lr" in full else "—",
                     f"{full['p_relation']:.0%}" if "p_relation" in full else "—",
                     f"{_minutes(stage['wall_time_seconds'])} ({stage['steps_per_second']:.2f} steps/s, "
                     f"{stage['hardware']['threads']} thread{'s' if stage['hardware']['threads'] != 1 else ''})",
                     " · ".join(score_cell(end, f"shapesbench_{c}") for c in shown)
                     if end else "—",
                     f"{shift['model']['px']:+.2f} px" if shift else "—"])
    unit = "prompts" if text else "samples"
    sizes = {s["score_at_end"][unit] for s in stages if "score_at_end" in s} | {card["score"][unit]}
    out = _table(columns, rows) + ["", f"Scores on {', '.join(map(str, sorted(sizes)))} {unit} with the card's "
                                       "default sampler (Scores below); ± as there.", ""]
    sources = {n["settings_source"] for n in notes if n.get("settings_source")}
    if sources:
        out += [f"Settings the stage records lack are taken from {'; '.join(sorted(sources))}.", ""]
    for k, note in enumerate(notes):
        line = f"- **{note['name']}**"
        if note.get("recipe"):
            line += f" (recipe `{note['recipe']}`)"
        if k < len(stages) and stages[k].get("continued_from"):
            line += f", continued from {stages[k]['continued_from']}"
        out.append(line + ": " + fill(note["note"], card, cards))
    out.append("")
    return out


def _history_section(card: dict, cards: dict | None) -> list[str]:
    out: list[str] = []
    for item in card.get("history", []):
        out += [f"### {fill(item['experiment'], card, cards)}", "", fill(item["what"], card, cards), ""]
        if item.get("setup"):
            out += [f"*Setup:* {fill(item['setup'], card, cards)}", ""]
        if item.get("table"):
            table = item["table"]
            out += _table([fill(c, card, cards) for c in table["columns"]],
                          [[fill(str(c), card, cards) for c in row] for row in table["rows"]]) + [""]
        if item.get("confusion"):
            score = lookup(card, item["confusion"])
            out += _confusion(score["count_confusion"], f"Its count confusion on {score['prompts']} prompts "
                                                        f"(`{item['confusion']}.count_confusion`):")
        if item.get("source"):
            out += [f"*Source:* {fill(item['source'], card, cards)}", ""]
    return out


def _rebuild(rebuild: str, aside: bool = True) -> list[str]:
    """A card's rebuild field as a code block: one command per line (``a, then b``), a trailing
    ``(note)`` as text below it (unless ``aside`` is False: the card's ``rebuild_note`` says more)."""
    note = re.fullmatch(r"(.*?) \((.*)\)", rebuild)
    commands = note.group(1) if note else rebuild
    out = ["```bash", *commands.split(", then "), "```", ""]
    if len(commands.split(", then ")) > 1:
        out += ["(one after the other)", ""]
    return out + ([note.group(2)[0].upper() + note.group(2)[1:] + ".", ""] if note and aside else [])


def model_card(card: dict, cards: dict[str, dict] | None = None) -> str:
    """The Markdown model card of one JSON card.

    ``cards`` (name → card) lets prose cite another shipped card's fields (``{name@path}``);
    `write_cards` passes every card in ``data/``.
    """
    name = card["name"]
    own = card.get("source", card)  # a kept encoder's card holds its model's numbers under "source"
    out = [f"# Model card: `{name}`", "", fill(card["description"], card, cards), ""]
    out += ["*Generated by `python -m kandlab.cards` from `data/" + name + ".json`; edit the JSON, not this file.*", ""]

    grid = card.get("sample_grid")
    if grid:
        out += [f"![{name} samples]({grid['file']})", "", f"*{fill(grid['caption'], card, cards)}*", ""]

    # At a glance
    glance = [["file", f"`data/{name}.safetensors`"], ["parameters", f"{card['parameters']:,}"]]
    if "steps" in own:
        stages = own.get("stages") or []
        hardware = card.get("hardware")
        where = (f" on a {hardware['cpu_count']}-core {hardware['machine']} CPU, torch {hardware['torch']}"
                 if hardware and len(stages) > 1 else f" on {_hardware(hardware)}" if hardware else "")
        glance.append(["training", f"{own['steps']:,} steps" + (f" in {len(stages)} stages" if len(stages) > 1 else "")
                       + f", {_minutes(own['wall_time_seconds'])}{where}"])
    score = own.get("score")
    of_model = "" if own is card else " (its model)"
    if score and "shapesbench_overall" in score:
        glance.append(["ShapesBench overall" + of_model,
                       f"{score_cell(score, 'shapesbench_overall')} on {score['prompts']} prompts ({score['sampler']})"])
    elif score:
        glance.append(["plausible samples", f"{score_cell(score, 'shapesbench_plausible')} of {score['samples']} "
                                            f"({score['sampler']})"])
    commands = re.sub(r" \(.*\)$", "", card["rebuild"]).split(", then ")  # drop a trailing "(note)"
    glance += [["rebuild", " then ".join(f"`{c}`" for c in commands)], ["sha256", f"`{card['sha256']}`"]]
    out += _table(["", ""], glance) + [""]

    for title, key in (("What it is", "summary"), ("Intended use", "intended_use")):
        if card.get(key):
            out += [f"## {title}", "", fill(card[key], card, cards), ""]

    # Architecture
    out += ["## Architecture", ""]
    if "unet_config" in card:
        out += [f"UNet (`kandlab.unet.UNetConfig`): {_config_line(card['unet_config'])}.", ""]
    if "t5_config" in card:
        out += [f"T5 encoder (`kandlab.t5.T5Config`): {_config_line(card['t5_config'])}.", ""]
    if "movq_config" in card:
        out += [f"MoVQ (`kandlab.movq.MoVQConfig`): {_config_line(card['movq_config'])}.", ""]
    for key, what in (("text_config", "CLIP text tower (`kandlab.clip.CLIPTextConfig`)"),
                      ("vision_config", "CLIP image tower (`kandlab.clip.CLIPVisionConfig`)"),
                      ("prior_config", "Prior (`kandlab.prior.PriorConfig`)")):
        if key in card:
            out += [f"{what}: {_config_line(card[key])}.", ""]
    if "decoder_config" in card:
        d = card["decoder_config"]
        out += [f"Decoder (`kandlab.decoder.DecoderConfig`): image_embed_dim {d['image_embed_dim']}, num_image_tokens "
                f"{d['num_image_tokens']}, on the UNet above.", ""]
    out += [f"Parameters in all: {card['parameters']:,}.", ""]

    # Data and recipe
    if card.get("training_data"):
        out += ["## Training data", "", fill(card["training_data"], card, cards), ""]
    out += ["## Recipe", ""]
    recipe = card.get("recipe")
    if recipe:
        module = {"movq": "kandlab.train_movq", "clip": "kandlab.train_unclip", "prior": "kandlab.train_unclip",
                  "decoder": "kandlab.train_unclip"}.get(card.get("kind"), "kandlab.train")
        out += [f"Recipe `{recipe['name']}` (`{module}`), "
                "as the card records it"
                + (" (the last stage's settings; the stages below)" if card.get("stages") else "") + ": "
                + ", ".join(f"{k} {json.dumps(recipe[k])}" for k in RECIPE_FIELDS if k in recipe) + ".", ""]
    pre = card.get("text_pretrain")
    if pre:
        accuracy = ", ".join(f"{k} {v:.0%}" for k, v in pre["held_out_accuracy"].items())
        out += [f"**T5 pretraining** (`kandlab.text_pretrain`): {pre['steps']:,} steps × {pre['batch_size']} "
                f"captions, lr {pre['lr']:g}, {pre['wall_time_seconds']:.0f} s; final loss {pre['final_loss_mean_last_100']:g} "
                f"(mean of the last 100 steps); right on {pre['held_out_captions']}: {accuracy}. Then frozen.", ""]
    out += _stages_section(card, cards)
    if "source" in card:  # a kept part of an earlier model
        src = card["source"]
        out += [f"Kept from `{src['file']}` (sha256 `{src['sha256']}`), which trained {src['steps']:,} steps in "
                f"{_minutes(src['wall_time_seconds'])}:", ""]
        rows = []
        for k, stage in enumerate(src.get("stages", []), 1):
            gamma = stage.get("min_snr_gamma")
            rows.append([k, f"{stage['steps']:,}", f"Min-SNR-{gamma:g}" if gamma else "plain ε-loss",
                         _minutes(stage["wall_time_seconds"]), f"{stage['steps_per_second']:.2f}",
                         _hardware(stage["hardware"])])
        out += _table(["stage", "steps", "loss", "wall time", "steps/s", "hardware"], rows) + [""]
    if "wall_time_seconds" in card:
        where = ("the hardware in the stage table" if len(card.get("stages") or []) > 1
                 else _hardware(card["hardware"]))
        line = (f"Wall time {_minutes(card['wall_time_seconds'])} for {card['steps']:,} steps "
                f"({card['steps_per_second']:.2f} steps/s overall) on {where}")
        if "final_loss_mean_last_100" in card:
            line += (f"; final loss {card['final_loss_mean_last_100']:g} (mean of the last 100 steps; the curve, one "
                     f"value per 25 steps, is `loss_curve_every_25_steps` in the JSON)")
        out += [line + ".", ""]
    if card.get("hardware_note"):
        out += [fill(card["hardware_note"], card, cards), ""]

    if "eval" in card:
        out += ["## Reconstruction and codebook", ""] + _movq_section(card)
    out += _unclip_sections(card)
    scores = _scores_section(card, own, cards)
    if scores:
        out += ["## Scores", ""]
        if own is not card:
            out += ["The model this encoder was part of (its UNet is not kept):", ""]
        out += scores

    if card.get("known_failure_modes"):
        out += ["## Known failure modes", ""]
        out += [f"- {fill(f, card, cards)}" for f in card["known_failure_modes"]] + [""]
    if card.get("history"):
        out += ["## Training history and ablations", ""] + _history_section(card, cards)

    out += ["## Rebuild", ""] + _rebuild(card["rebuild"], aside=not card.get("rebuild_note"))
    if card.get("rebuild_note"):
        out += [fill(card["rebuild_note"], card, cards), ""]
    out += [f"`data/{name}.safetensors` has sha256 `{card['sha256']}`, also listed in `data/MANIFEST.sha256`; "
            "loading checks it (`kandlab.weights.tiny_path`), and `kandlab doctor` reports it.", ""]
    return "\n".join(out).rstrip() + "\n"


def keep_prose(new: dict, old: dict | None) -> dict:
    """``new`` (a card that training just wrote) with the prose fields of the card it replaces.

    `kandlab.train.export` writes the measured fields only; call this on the old card's contents
    before overwriting it, so that a retrained model keeps its summary, history and failure modes
    (then check them against the new numbers: the placeholders already read the new fields).
    """
    return {**new, **{k: old[k] for k in PROSE_FIELDS if old and k in old and k not in new}}


# ---------------------------------------------------------------------------
# Files


def load_cards(root: Path | None = None) -> dict[str, dict]:
    """Every JSON card in ``data/``: name → card."""
    root = root or weights.data_dir()
    return {p.stem: json.loads(p.read_text()) for p in sorted(root.glob("*.json"))}


def rendered(root: Path | None = None) -> dict[Path, str]:
    """What each ``data/<name>.md`` should hold."""
    root = root or weights.data_dir()
    cards = load_cards(root)
    return {root / f"{name}.md": model_card(card, cards) for name, card in cards.items()}


def write_cards(root: Path | None = None) -> list[Path]:
    """Write ``data/<name>.md`` for every ``data/<name>.json``; returns the files that changed.
    Refresh ``data/MANIFEST.sha256`` afterwards (`kandlab.weights.write_manifest`)."""
    changed = []
    for path, text in rendered(root).items():
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            changed.append(path)
    return changed


def stale_cards(root: Path | None = None) -> list[Path]:
    """The ``.md`` cards that are missing or differ from what their JSON card renders."""
    return [p for p, text in rendered(root).items() if not p.exists() or p.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kandlab.cards", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if any data/<name>.md is missing or stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_cards()
        for p in stale:
            print(f"{p.name} is stale or missing: run `python -m kandlab.cards` (then "
                  "`python -c 'import kandlab.weights as w; w.write_manifest()'`)", file=sys.stderr)
        return 1 if stale else 0
    changed = write_cards()
    if changed:
        weights.write_manifest()
    print("\n".join(f"wrote {p}" for p in changed) or "every model card is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
