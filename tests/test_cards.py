"""Model cards: data/<name>.md is generated from data/<name>.json, shows scores with their sample size, and is
committed up to date (`python -m kandlab.cards`)."""
import json
import shutil

import pytest

from kandlab import course, cards, weights


def _shipped() -> dict[str, dict]:
    return cards.load_cards(weights.data_dir())


def test_committed_model_cards_are_up_to_date():
    stale = cards.stale_cards()
    assert not stale, f"stale model cards {[p.name for p in stale]}: run `python -m kandlab.cards`"


def test_every_checkpoint_has_a_json_and_a_markdown_card():
    root = weights.data_dir()
    for checkpoint in sorted(root.glob("*.safetensors")):
        for suffix in (".json", ".md"):
            assert checkpoint.with_suffix(suffix).exists(), f"{checkpoint.name} has no {checkpoint.stem}{suffix}"
        assert checkpoint.with_suffix(".md").name in weights.read_manifest(root), "run kandlab.weights.write_manifest()"


def test_cards_render_scores_with_their_sample_size_and_standard_error():
    shipped = _shipped()
    for name, card in shipped.items():
        text = cards.model_card(card, shipped)
        if "eval" in card or card.get("kind") in ("clip", "prior"):  # no ShapesBench samples of their own
            continue
        score = card.get("source", card)["score"]
        n = f"{score['prompts']} prompts" if "prompts" in score else f"{score['samples']} samples"
        assert n in text and score["sampler"] in text, name
        key = "shapesbench_overall" if "shapesbench_overall" in score else "shapesbench_plausible"
        assert cards.score_cell(score, key) in text and "±" in cards.score_cell(score, key), name


def test_unclip_cards_render_their_measurements_with_n_and_standard_errors():
    shipped = _shipped()
    for name, heading, table in (("clip_tiny", "## Retrieval and binding", "retrieval"),
                                 ("prior_tiny", "## Similarity to the true image embedding", "similarity")):
        if name not in shipped:
            pytest.skip(f"{name} is not shipped")
        text = cards.model_card(shipped[name], shipped)
        assert heading in text and "{" not in text.replace("{}", ""), name
        if table == "retrieval":
            r = shipped[name]["retrieval"]["position"]
            assert f"| position | {r['accuracy']:.3f} ± {r['se']:.3f} | {r['chance']:.3f} | {r['n']} |" in text
        else:
            r = shipped[name]["similarity"]["prior"]
            assert f"{r['mean']:.3f} ± {r['se']:.3f} | {r['n']} |" in text


def test_the_text_model_card_keeps_its_history_stages_and_failure_modes():
    shipped = _shipped()
    text = cards.model_card(shipped["pixel_text"], shipped)
    for heading in ("## Recipe", "## Scores", "## Known failure modes", "## Training history and ablations",
                    "## Rebuild"):
        assert heading in text
    for note in shipped["pixel_text"]["stage_notes"]:
        assert f"**{note['name']}**" in text
    assert "Count confusion" in text and "Relation shift" in text
    assert shipped["pixel_text"]["sha256"] in text
    assert "{" not in text.replace("{}", ""), "an unresolved placeholder is left in the card"


def test_position_share_uses_the_two_group_prompts_as_n():
    score = {"prompts": 4, "shapesbench_position": 0.5, "count_confusion": [[0, 3, 0, 0, 0], [0, 0, 2, 0, 0],
                                                                           [0, 0, 0, 1, 0]]}
    assert cards.position_trials(score) == 2  # 6 groups over 4 prompts: 2 prompts have two groups
    assert cards.score_cell(score, "shapesbench_position") == f"0.50 ± {course.share_se(0.5, 2):.2f}"


def test_placeholders_read_fields_of_this_or_another_card():
    card = {"name": "a", "steps": 1500, "stages": [{"wall_time_seconds": 90.0}]}
    other = {"b": {"name": "b", "score": {"shapesbench_overall": 0.8164}}}
    assert cards.fill("{steps:,} steps, {stages.0.wall_time_seconds:min}", card) == "1,500 steps, 1.5 min"
    assert cards.fill("{b@score.shapesbench_overall:.2f}", card, other) == "0.82"
    with pytest.raises(KeyError, match="no field 'score.missing'"):
        cards.fill("{score.missing}", other["b"])
    with pytest.raises(KeyError, match="cites card 'c'"):
        cards.fill("{c@steps}", card, other)


def test_a_card_without_prose_fields_still_renders():
    """A freshly exported card (no prose yet) renders its measured fields."""
    card = {"name": "micro", "description": "a micro model", "recipe": {"name": "micro", "steps": 2, "lr": 8e-4},
            "unet_config": {"in_channels": 3}, "parameters": 1234, "steps": 2, "wall_time_seconds": 3.0,
            "steps_per_second": 0.67, "final_loss_mean_last_100": 0.5,
            "hardware": {"cpu_count": 2, "machine": "x86_64", "torch": "2.13.0+cpu", "threads": 1},
            "score": {"shapesbench_plausible": 0.25, "shapesbench_recognised": 0.5, "shapesbench_blobs": 2.0,
                      "shapesbench_colours": 1.0, "samples": 4, "sampler": "DDIM 50 steps"},
            "rebuild": "kandlab train micro", "sha256": "0" * 64}
    text = cards.model_card(card)
    assert "4 samples" in text and "0.25 ± 0.22" in text and "kandlab train micro" in text


def test_check_flags_a_stale_card_and_write_cards_fixes_it(tmp_path, monkeypatch, capsys):
    for path in weights.data_dir().glob("*.json"):
        shutil.copy(path, tmp_path / path.name)
    monkeypatch.setenv("KANDLAB_DATA", str(tmp_path))
    assert cards.main(["--check"]) == 1 and "stale or missing" in capsys.readouterr().err
    assert len(cards.write_cards(tmp_path)) == len(list(tmp_path.glob("*.json")))
    assert cards.main(["--check"]) == 0
    card = json.loads((tmp_path / "pixel_uncond.json").read_text())
    card["summary"] = "changed"
    (tmp_path / "pixel_uncond.json").write_text(json.dumps(card))
    assert [p.name for p in cards.stale_cards(tmp_path)] == ["pixel_uncond.md"]


def test_keep_prose_carries_the_prose_of_the_card_a_retrained_model_replaces():
    old = {"name": "m", "steps": 10, "summary": "what it is", "history": [{"experiment": "e", "what": "w"}]}
    new = {"name": "m", "steps": 20}
    kept = cards.keep_prose(new, old)
    assert kept["steps"] == 20 and kept["summary"] == "what it is" and kept["history"] == old["history"]
    assert cards.keep_prose(new, None) == new


def test_a_staged_card_without_notes_names_its_stages_from_their_records():
    hw = {"cpu_count": 2, "machine": "x86_64", "torch": "2.13.0+cpu", "threads": 1}
    score = {"shapesbench_overall": 0.5, "shapesbench_count": 0.5, "shapesbench_position": 0.5, "prompts": 8,
             "sampler": "DDIM 50 steps"}
    stage = {"steps": 2, "wall_time_seconds": 6.0, "steps_per_second": 0.33, "hardware": hw, "lr": 8e-4}
    card = {"name": "micro", "description": "d", "recipe": {"name": "micro"}, "parameters": 1, "steps": 4,
            "wall_time_seconds": 12.0, "steps_per_second": 0.33, "hardware": hw, "score": score,
            "stages": [{**stage, "stage": "base", "score_at_end": score},
                       {**stage, "stage": "more", "lr_decay": "cosine", "continued_from": "base's EMA weights"}],
            "rebuild": "kandlab train micro", "sha256": "0" * 64}
    text = cards.model_card(card)
    assert "| base | +2 (2) |" in text and "| more | +2 (4) |" in text and "8e-04 → 0 (cosine)" in text
    assert "4 steps in 2 stages" in text


def test_a_staged_unconditional_card_shows_its_own_scores_per_stage():
    hw = {"cpu_count": 2, "machine": "x86_64", "torch": "2.13.0+cpu", "threads": 1}
    score = {"shapesbench_plausible": 0.25, "shapesbench_recognised": 0.8, "shapesbench_blobs": 3.0,
             "shapesbench_colours": 2.0, "samples": 16, "sampler": "DDIM 50 steps"}
    stage = {"steps": 2, "wall_time_seconds": 6.0, "steps_per_second": 0.33, "hardware": hw, "lr": 8e-4}
    card = {"name": "micro_uncond", "description": "d", "recipe": {"name": "micro_uncond"}, "parameters": 1,
            "steps": 4, "wall_time_seconds": 12.0, "steps_per_second": 0.33, "hardware": hw, "score": score,
            "stages": [{**stage, "stage": "base", "score_at_end": score}, {**stage, "stage": "more"}],
            "rebuild": "kandlab train micro-uncond", "sha256": "0" * 64}
    text = cards.model_card(card)
    assert "ShapesBench at its end: plausible · recognised · blobs" in text
    assert f"0.25 ± {course.share_se(0.25, 16):.2f}" in text


def test_the_movq_card_shows_reconstruction_and_codebook_with_their_errors():
    shipped = _shipped()
    card = shipped["movq_tiny"]
    text = cards.model_card(card, shipped)
    assert "## Reconstruction and codebook" in text and "kandlab.train_movq" in text
    psnr = card["eval"]["psnr_shapes_quantized"]
    assert f"{psnr[0]:.1f} ± {psnr[1]:.1f}" in text
    for label in card.get("comparison", {}):
        assert f"| {label} |" in text
    assert "{" not in text.replace("{}", ""), "an unresolved placeholder is left in the card"
