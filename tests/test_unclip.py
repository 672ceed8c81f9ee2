"""kandlab.unclip and kandlab.train_unclip: the two-stage pipeline, the training losses, the measurements.

Random tiny models make the pipeline's contracts testable without the shipped files (shapes, ranges,
determinism, errors); the binding scorer is checked on rendered images whose answer is known; the
shipped models' cards are re-measured where the measurement is deterministic.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kandlab import shapes
from kandlab.clip import CLIP, CLIPTextConfig, CLIPVisionConfig
from kandlab.decoder import DecoderConfig, ImageConditionedUNet
from kandlab.prior import PriorConfig, PriorTransformer, UnCLIPSampler
from kandlab.tokenizer import ShapesTokenizer
from kandlab.train_movq import load_tiny_movq
from kandlab.train_unclip import (MAX_LENGTH, ClipRecipe, _variants, lr_at, prior_loss, swap_attributes)
from kandlab.unclip import UnCLIPPipeline, empty_caption, regress_prior, sample_prior, slerp

DATA = Path(__file__).resolve().parents[1] / "data"
SHIPPED = all((DATA / f"{n}.safetensors").exists() for n in ("clip_tiny", "prior_tiny", "decoder_tiny"))


@pytest.fixture(scope="module")
def tokenizer() -> ShapesTokenizer:
    return ShapesTokenizer.from_shapes(max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def random_pipe(tokenizer) -> UnCLIPPipeline:
    torch.manual_seed(0)
    recipe = ClipRecipe()
    clip = CLIP(recipe.text, recipe.vision)
    prior = PriorTransformer(PriorConfig.tiny(64, MAX_LENGTH, num_layers=1))
    prior.set_clip_stats(torch.randn(100, 64) * 2 + 1)
    decoder = ImageConditionedUNet(DecoderConfig.tiny())
    return UnCLIPPipeline(clip, prior, decoder, load_tiny_movq(), 2.32, tokenizer)


# -- the captions behind the CLIP tests ----------------------------------------------------------


def test_variants_change_exactly_one_category():
    scene = shapes.parse_caption("two red circles left of a blue square")
    v = _variants(scene)
    assert len(v["colour"]) == 2 * 4  # each group: the 6 colours minus the two taken
    assert len(v["shape"]) == 2 * 2 and len(v["count"]) == 2 * 2 and len(v["position"]) == 3
    for category, captions in v.items():
        for text in captions:
            other = shapes.parse_caption(text)
            assert text != shapes.caption(scene)
            if category == "position":
                assert other.groups == scene.groups and other.relation != scene.relation
            else:
                changed = [k for k in range(2) if other.groups[k] != scene.groups[k]]
                assert len(changed) == 1
    assert _variants(shapes.parse_caption("a red circle"))["position"] == []


def test_swap_attributes_keeps_the_words():
    scene = shapes.parse_caption("a red circle left of a blue square")
    swapped = swap_attributes(scene, "colour")
    assert shapes.caption(swapped) == "a blue circle left of a red square"
    assert sorted(shapes.caption(swapped).split()) == sorted(shapes.caption(scene).split())
    assert shapes.caption(swap_attributes(scene, "shape")) == "a red square left of a blue circle"
    assert swap_attributes(shapes.parse_caption("a red circle"), "colour") is None
    assert swap_attributes(shapes.parse_caption("a red circle above a blue circle"), "shape") is None


# -- the binding scorer ------------------------------------------------------------------------------


def test_binding_outcomes_on_rendered_images():
    asked = ["a red circle left of a blue square", "two green triangles above a red circle",
             "a red circle below a blue circle", "a red circle"]
    drawn_right = [shapes.render(shapes.parse_caption(c), 64, i) for i, c in enumerate(asked)]
    assert shapes.binding_outcomes(drawn_right, asked) == ["bound", "bound", None, None]
    drawn_swapped = [shapes.render(shapes.parse_caption(c), 64, i) for i, c in
                     enumerate(["a blue circle left of a red square", "two red triangles above a green circle"])]
    assert shapes.binding_outcomes(drawn_swapped, asked[:2]) == ["swapped", "swapped"]
    empty = [torch.full((3, 64, 64), -1.0)] * 2
    assert shapes.binding_outcomes(empty, asked[:2]) == ["other", "other"]
    rates = shapes.binding_rates(drawn_right[:2] + drawn_swapped + empty, asked[:2] * 3)
    assert rates["n"] == 6 and rates["decided"] == 4
    assert rates["bound"] == rates["swapped"] == rates["other"] == pytest.approx(1 / 3, abs=1e-4)
    assert rates["swap_rate_decided"] == 0.5


def test_binding_rates_needs_two_shapes():
    with pytest.raises(ValueError, match="two groups of different shapes"):
        shapes.binding_rates([torch.zeros(3, 64, 64)], ["a red circle"])


# -- training pieces ---------------------------------------------------------------------------------


def test_lr_warms_up_then_decays_to_zero():
    assert lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 10, 100) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(55, 1.0, 10, 100) == pytest.approx(0.5)


def test_prior_loss_is_x0_mse_on_the_forward_marginal():
    torch.manual_seed(1)
    prior = PriorTransformer(PriorConfig.tiny(8, 4, num_layers=1, num_attention_heads=2, attention_head_dim=4))
    sampler = UnCLIPSampler()
    x0, noise = torch.randn(3, 8), torch.randn(3, 8)
    hidden, pooled, mask = torch.randn(3, 4, 8), torch.randn(3, 8), torch.ones(3, 4, dtype=torch.bool)
    t = torch.tensor([0, 500, 999])
    a = sampler.alphas_cumprod[t][:, None]
    expected = torch.nn.functional.mse_loss(prior(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, pooled, hidden, mask), x0)
    assert prior_loss(prior, sampler, x0, hidden, pooled, mask, t, noise).item() == pytest.approx(expected.item(), rel=1e-6)
    regression = torch.nn.functional.mse_loss(prior(torch.zeros(3, 8), torch.full((3,), 999), pooled, hidden, mask), x0)
    assert prior_loss(prior, sampler, x0, hidden, pooled, mask, t, noise, regression=True).item() == pytest.approx(
        regression.item(), rel=1e-6)


def test_empty_caption_pools_at_its_end_token(tokenizer):
    empty = empty_caption(2, MAX_LENGTH)
    assert empty["input_ids"].shape == (2, MAX_LENGTH) and empty["attention_mask"].sum().item() == 2
    clip = CLIP(CLIPTextConfig.tiny(tokenizer.vocab_size, MAX_LENGTH), CLIPVisionConfig.tiny())
    hidden, pooled = clip.text_tower(empty["input_ids"], empty["attention_mask"])
    assert torch.allclose(pooled, clip.text_tower.text_projection(hidden[:, 0]))


# -- the pipeline (random weights) ---------------------------------------------------------------------


def test_pipeline_shapes_range_and_determinism(random_pipe):
    images = random_pipe(["a red circle", "two blue squares above a green triangle"], steps=2, prior_steps=2, seed=3)
    assert images.shape == (2, 3, 64, 64) and images.min() >= -1 and images.max() <= 1
    again = random_pipe(["a red circle", "two blue squares above a green triangle"], steps=2, prior_steps=2, seed=3)
    assert torch.equal(images, again)
    variations = random_pipe.variations(images, n=2, steps=2)
    assert variations.shape == (4, 3, 64, 64)


def test_prior_embeddings_are_post_processed(random_pipe, tokenizer):
    prior, clip = random_pipe.prior, random_pipe.clip
    e = sample_prior(prior, clip, tokenizer, ["a red circle"] * 64, steps=2, guidance=1.0)
    assert e.shape == (64, 64)
    # the sampler works on normalised embeddings; post-processing maps them to CLIP's scale (mean ≈ clip_mean)
    assert (e.mean(0) - prior.clip_mean[0]).abs().mean() < (e.mean(0)).abs().mean()
    r = regress_prior(prior, clip, tokenizer, ["a red circle", "a blue square"])
    assert r.shape == (2, 64)


def test_mixing_is_the_weighted_sum(random_pipe):
    a, b = (shapes.render(shapes.parse_caption(c), 64, 0) for c in ("a red circle", "a blue square"))
    ea, eb = random_pipe.embed_images(torch.stack([a, b]))
    mixed = random_pipe.mix_embeddings([a, b], [0.25, 0.75])
    assert torch.allclose(mixed[0], 0.25 * ea + 0.75 * eb, atol=1e-6)
    with pytest.raises(ValueError, match="one weight per image or prompt"):
        random_pipe.mix_embeddings([a, b], [1.0])
    with pytest.raises(TypeError, match="a prompt"):
        random_pipe.mix_embeddings([a[None]], [1.0])


def test_slerp_endpoints_and_norm():
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    mid = slerp(a, b, 0.5)
    assert mid.norm().item() == pytest.approx(2.0)  # the norms 3 and 1, linearly
    assert torch.allclose(mid / mid.norm(), torch.tensor([2**-0.5, 2**-0.5]), atol=1e-6)


def test_pipeline_errors(random_pipe, tokenizer):
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        random_pipe.embed_images(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 64\) CLIP image embeddings"):
        random_pipe.decode_embeddings(torch.zeros(2, 32))
    with pytest.raises(ValueError, match="chunks"):
        random_pipe.decode_embeddings(torch.zeros(5000, 64))
    with pytest.raises(ValueError, match="prior guidance"):
        random_pipe.prior_embeddings("a red circle", guidance=float("nan"))
    with pytest.raises(ValueError, match="steps"):
        random_pipe("a red circle", steps=0)
    with pytest.raises(ValueError, match="load models trained together"):
        UnCLIPPipeline(random_pipe.clip, PriorTransformer(PriorConfig.tiny(32, MAX_LENGTH)), random_pipe.decoder,
                       random_pipe.movq, 2.32, tokenizer)


# -- the shipped models --------------------------------------------------------------------------------

shipped = pytest.mark.skipif(not SHIPPED, reason="lesson 08's models are not in data/ (kandlab train clip-tiny ...)")


@shipped
def test_shipped_clip_card_reproduces():
    from kandlab.train_unclip import clip_binding, clip_retrieval, load_tiny_clip

    card = json.loads((DATA / "clip_tiny.json").read_text())
    clip = load_tiny_clip()
    n = card["recipe"]["n_eval"]
    assert clip_binding(clip, n) == card["binding"]
    retrieval = clip_retrieval(clip, n)
    for category in ("colour", "shape", "count", "position"):
        assert retrieval[category]["accuracy"] == pytest.approx(card["retrieval"][category]["accuracy"], abs=2e-3)


@shipped
def test_shipped_pipeline_draws_its_prompt():
    pipe = UnCLIPPipeline.from_tiny()
    prompts = ["a large red circle", "two small blue squares"]
    images = pipe(prompts, seed=0)
    verdicts = shapes.score_per_image(images, prompts)
    assert images.shape == (2, 3, 64, 64)
    assert sum(v["colour"] for v in verdicts) >= 1  # a colour is the easiest thing for an embedding to keep


# -- the training loops (a few steps, in a temporary run folder) -----------------------------------------


def test_clip_training_resumes_where_it_stopped(tmp_path):
    from kandlab.train_unclip import train_clip

    recipe = ClipRecipe(steps=2, num_images=64, batch_size=8, save_every=1)
    _, log = train_clip(recipe, tmp_path, progress=False)
    assert log["step"] == 2 and len(log["losses"]) == 2 and (tmp_path / "clip_tiny" / "state.pt").exists()
    recipe.steps = 3
    _, log = train_clip(recipe, tmp_path, progress=False)
    assert log["step"] == 3 and len(log["losses"]) == 3  # two steps kept from the first run, one new


@pytest.mark.skipif(not (DATA / "clip_tiny.safetensors").exists(), reason="needs the shipped clip_tiny")
def test_prior_and_decoder_training_run(tmp_path):
    from kandlab.train_unclip import DecoderRecipe, PriorRecipe, train_decoder, train_prior

    prior, log = train_prior(PriorRecipe(steps=2, num_images=64, batch_size=8), tmp_path, progress=False)
    assert log["step"] == 2 and all(torch.isfinite(torch.tensor(log["losses"])))
    assert (prior.clip_std > 0).all()  # set from the training embeddings before the first step
    decoder, log = train_decoder(DecoderRecipe(steps=2, num_images=64, batch_size=4), tmp_path, progress=False)
    assert log["step"] == 2 and log["init"]["from"] == "latent_text"
    assert len(list(tmp_path.glob("decoder_data_movq_tiny_*.pt"))) == 1  # cached once for every stage


@pytest.mark.skipif(not SHIPPED, reason="needs the shipped unCLIP models")
def test_decoder_stage_two_continues_stage_one(tmp_path, monkeypatch):
    """A later stage starts from the EMA weights of the stage before it (in a rebuild: runs/<stage>/state.pt),
    else from the shipped decoder; its card sums the stages; a resumed stage reads only its own state."""
    import dataclasses

    from kandlab import train_unclip as tu
    from kandlab import weights
    from kandlab.train_unclip import DecoderRecipe, _stage_totals, decoder_polish, init_decoder, train_decoder

    small = dict(num_images=64, batch_size=4, save_every=1)
    shipped = ImageConditionedUNet(DecoderConfig.tiny())
    note = init_decoder(shipped, "decoder_tiny", tmp_path)  # no run of that name here: the shipped weights
    want = weights.load_tiny_state_dict("decoder_tiny.safetensors")
    assert all(torch.equal(v, want[k]) for k, v in shipped.state_dict().items())
    assert note["from"].startswith("data/decoder_tiny") and note["earlier"][-1]["steps"] > 0
    card = weights.load_card("decoder_tiny.safetensors")  # a staged card hands on its whole loss curve
    assert note["earlier_curve"] == card["loss_curve_every_25_steps"] and len(note["earlier_curve"]) == card["steps"] // 25

    base, _ = train_decoder(DecoderRecipe(steps=2, **small), tmp_path, progress=False)
    polish = dataclasses.replace(decoder_polish(), steps=1, **small)
    model, log = train_decoder(polish, tmp_path, progress=False)
    assert log["init"]["from"].startswith(str(tmp_path / "decoder_tiny" / "state.pt"))
    [earlier] = log["init"]["earlier"]
    assert earlier["steps"] == 2 and earlier["stage"] == "base" and earlier["lr"] == DecoderRecipe().lr
    assert log["stage_fields"]["stage"] == "polish" and log["stage_fields"]["lr"] == polish.lr
    monkeypatch.setattr(tu, "init_decoder", lambda *a: pytest.fail("a resumed stage read its starting weights again"))
    _, resumed = train_decoder(dataclasses.replace(polish, steps=2), tmp_path, progress=False)
    assert resumed["step"] == 2 and resumed["init"] == log["init"]
    facts = {"steps": 1, "wall_time_seconds": 3.0, "steps_per_second": 1 / 3, "hardware": {},
             "loss_curve_every_25_steps": [0.5]}
    totals = _stage_totals(log["init"]["earlier"], log["init"]["earlier_curve"], facts, polish, log["init"]["from"])
    assert [s["steps"] for s in totals["stages"]] == [2, 1] and totals["steps"] == 3
    assert totals["wall_time_seconds"] == round(earlier["wall_time_seconds"] + 3.0, 1)
    assert totals["loss_curve_every_25_steps"][-1] == 0.5 and len(totals["loss_curve_every_25_steps"]) == 2


def test_staged_decoder_rebuild_trains_both_stages_and_ships_once(monkeypatch):
    """``kandlab train decoder-tiny`` runs base then polish (the polish starting from the base run) and writes
    data/decoder_tiny once, after the last stage; the polish stage alone continues and ships the same name."""
    from kandlab import train_unclip as tu

    calls = []
    monkeypatch.setattr(tu, "train_decoder", lambda r, run_dir, resume, progress:
                        calls.append(("train", r.name, r.init_from, r.steps)) or (None, {}))
    monkeypatch.setattr(tu, "export_decoder", lambda r, model, log: calls.append(("export", r.ships_as)) or r.ships_as)
    assert tu.rebuild("decoder-tiny", steps=1) == ["decoder_tiny"]
    assert calls == [("train", "decoder_tiny", "latent_text", 1), ("train", "decoder_tiny_polish", "decoder_tiny", 1),
                     ("export", "decoder_tiny")]
    calls.clear()
    assert tu.rebuild("decoder-tiny-polish") == ["decoder_tiny"]
    assert calls == [("train", "decoder_tiny_polish", "decoder_tiny", tu.decoder_polish().steps), ("export", "decoder_tiny")]
