"""kandlab.clip against its production twins in transformers.models.clip.

Parity: random tiny configs (different widths, depths, heads, quick GELU and GELU, both ways of
finding the end token), every weight randomised (norm gains and biases too), right-padded text of
different lengths with an attention mask, fp32, max abs diff ≤ 1e-5.
Full size: parameter counts on the meta device, no download.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from transformers.models.clip import modeling_clip

from kandlab.clip import (
    CLIP,
    CLIPImageTower,
    CLIPTextConfig,
    CLIPTextTower,
    CLIPVisionConfig,
    clip_key_map,
    clip_logits,
    contrastive_loss,
    eos_positions,
    quick_gelu,
    text_key_map,
    vision_key_map,
)

TOL = 1e-5

# Two text towers: the legacy end-token rule (eos_token_id == 2: argmax of the ids) with quick GELU,
# and the current one (first position of eos_token_id, padding with the same id) with exact GELU.
TEXT_CONFIGS = {
    "legacy-eos-quick_gelu": dict(vocab_size=50, hidden_size=32, intermediate_size=37, projection_dim=24,
                                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=20,
                                  hidden_act="quick_gelu", pad_token_id=1, bos_token_id=0, eos_token_id=2),
    "first-eos-gelu": dict(vocab_size=61, hidden_size=48, intermediate_size=64, projection_dim=40,
                           num_hidden_layers=3, num_attention_heads=6, max_position_embeddings=16,
                           hidden_act="gelu", layer_norm_eps=1e-6, pad_token_id=7, bos_token_id=5, eos_token_id=7),
}
VISION_CONFIGS = {
    "16px-p4-quick_gelu": dict(hidden_size=32, intermediate_size=48, projection_dim=24, num_hidden_layers=2,
                               num_attention_heads=4, num_channels=3, image_size=16, patch_size=4,
                               hidden_act="quick_gelu"),
    "30px-p6-4ch-gelu": dict(hidden_size=48, intermediate_size=80, projection_dim=20, num_hidden_layers=3,
                             num_attention_heads=3, num_channels=4, image_size=30, patch_size=6,
                             hidden_act="gelu", layer_norm_eps=1e-6),
}


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight random: LayerNorm gains around 1, biases and embeddings clearly non-zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)  # default all ones would hide a mixed-up norm
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)  # default zeros would hide a missing bias
            elif "embedding" in name:
                p.normal_(0.0, 0.5)  # positions as large as tokens: a shifted position table shows
            elif name == "logit_scale":
                p.fill_(1.3)
    return model.eval()


def hf_text(name: str, attn: str = "sdpa") -> transformers.CLIPTextModelWithProjection:
    config = transformers.CLIPTextConfig(**TEXT_CONFIGS[name], attn_implementation=attn)
    return randomise(transformers.CLIPTextModelWithProjection(config))


def hf_vision(name: str, attn: str = "sdpa") -> transformers.CLIPVisionModelWithProjection:
    config = transformers.CLIPVisionConfig(**VISION_CONFIGS[name], attn_implementation=attn)
    return randomise(transformers.CLIPVisionModelWithProjection(config))


def padded_text(name: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Four right-padded prompts of 20/16, 11, 5 and 2 tokens, each ending in its end token."""
    c = TEXT_CONFIGS[name]
    L, vocab = c["max_position_embeddings"], c["vocab_size"]
    legacy = c["eos_token_id"] == 2
    eos = vocab - 1 if legacy else c["eos_token_id"]  # the legacy rule needs the end token to be the largest id
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab - 1, (4, L), generator=g)
    ids[ids == c["eos_token_id"]] = 3  # no stray end tokens inside the prompts
    mask = torch.zeros(4, L, dtype=torch.long)
    for row, n in enumerate([L, 11, 5, 2]):
        mask[row, :n] = 1
        ids[row, n - 1] = eos
        ids[row, n:] = c["pad_token_id"]  # 1 < eos (legacy), or the end token itself (pad == eos)
    return ids, mask


def images(name: str, batch: int = 3, seed: int = 0) -> torch.Tensor:
    c = VISION_CONFIGS[name]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, c["num_channels"], c["image_size"], c["image_size"], generator=g)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(TEXT_CONFIGS))
def test_text_tower_parity(name, attn):
    torch.manual_seed(0)
    hf = hf_text(name, attn)
    ours = CLIPTextTower.from_transformers(hf).eval()
    assert ours.config.eos_token_id == TEXT_CONFIGS[name]["eos_token_id"]
    ids, mask = padded_text(name)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask)
        hidden, embeds = ours(ids, mask)
        ref_full = hf(input_ids=ids)
        hidden_full, embeds_full = ours(ids)
    diffs = {
        "last_hidden_state": max_diff(hidden, ref.last_hidden_state),
        "text_embeds": max_diff(embeds, ref.text_embeds),
        "last_hidden_state (no mask)": max_diff(hidden_full, ref_full.last_hidden_state),
        "text_embeds (no mask)": max_diff(embeds_full, ref_full.text_embeds),
    }
    print(f"text {name} {attn}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert hidden.shape == (4, ids.shape[1], TEXT_CONFIGS[name]["hidden_size"])
    assert embeds.shape == (4, TEXT_CONFIGS[name]["projection_dim"])
    assert max(diffs.values()) <= TOL, diffs
    # Causal attention means right padding cannot reach the real tokens, but padded positions see
    # fewer keys with the mask: the mask must really have changed something there.
    assert max_diff(hidden[mask == 0], hidden_full[mask == 0]) > 1e-3


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(VISION_CONFIGS))
def test_image_tower_parity(name, attn):
    torch.manual_seed(1)
    hf = hf_vision(name, attn)
    ours = CLIPImageTower.from_transformers(hf).eval()
    x = images(name)
    with torch.no_grad():
        ref = hf(pixel_values=x)
        hidden, embeds = ours(x)
    c = VISION_CONFIGS[name]
    assert hidden.shape == (3, (c["image_size"] // c["patch_size"]) ** 2 + 1, c["hidden_size"])
    assert embeds.shape == (3, c["projection_dim"])
    diffs = {"last_hidden_state": max_diff(hidden, ref.last_hidden_state),
             "image_embeds": max_diff(embeds, ref.image_embeds)}
    print(f"vision {name} {attn}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOL, diffs


def hf_clip_model() -> transformers.CLIPModel:
    # The sub-configs keep their own projection_dim (24, 20); CLIPModel projects with the top-level one.
    config = transformers.CLIPConfig(text_config=TEXT_CONFIGS["first-eos-gelu"],
                                     vision_config=VISION_CONFIGS["16px-p4-quick_gelu"], projection_dim=16)
    return randomise(transformers.CLIPModel(config))


def test_clip_model_parity_logits_and_loss():
    torch.manual_seed(2)
    hf = hf_clip_model()
    ours = CLIP.from_transformers(hf).eval()
    assert ours.text_tower.config.projection_dim == ours.image_tower.config.projection_dim == 16
    ids, mask = padded_text("first-eos-gelu")
    x = images("16px-p4-quick_gelu", batch=4)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=x, attention_mask=mask, return_loss=True)
        image_embeds, text_embeds = ours(ids, x, mask)
        logits = ours.logits(ids, x, mask)
        loss = ours.loss(ids, x, mask)
    diffs = {"logits_per_image": max_diff(logits, ref.logits_per_image),
             "loss": abs(loss.item() - ref.loss.item()),
             "image_embeds": max_diff(image_embeds / image_embeds.norm(dim=-1, keepdim=True), ref.image_embeds),
             "text_embeds": max_diff(text_embeds / text_embeds.norm(dim=-1, keepdim=True), ref.text_embeds)}
    print("CLIPModel: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOL, diffs
    assert ours.logit_scale.item() == pytest.approx(1.3)


def test_padding_is_invisible_to_real_tokens():
    torch.manual_seed(3)
    ours = CLIPTextTower.from_transformers(hf_text("first-eos-gelu"))
    ids, mask = padded_text("first-eos-gelu")
    other = ids.clone()
    other[mask == 0] = 3  # change what sits under the padding
    with torch.no_grad():
        (h1, e1), (h2, e2) = ours(ids, mask), ours(other, mask)
    assert torch.allclose(h1[mask == 1], h2[mask == 1], atol=1e-6)
    assert torch.allclose(e1, e2, atol=1e-6)


def test_eos_positions_follow_transformers_rules():
    ids = torch.tensor([[5, 9, 7, 7, 7],  # first 7 at 2; largest id at 1
                        [7, 3, 9, 9, 1]])  # first 7 at 0; first of the two largest at 2
    assert eos_positions(ids, 7).tolist() == [2, 0]
    assert eos_positions(ids, 2).tolist() == [1, 2]  # legacy: argmax of the ids, ignoring the id itself


def test_quick_gelu_matches_transformers():
    x = torch.linspace(-6, 6, 101)
    assert torch.equal(quick_gelu(x), transformers.activations.ACT2FN["quick_gelu"](x))


# ---------------------------------------------------------------------------
# Weights in and out


def test_round_trip_to_transformers_state_dict():
    torch.manual_seed(4)
    text = CLIPTextTower(CLIPTextConfig(**TEXT_CONFIGS["first-eos-gelu"]))  # kandlab's own init
    fresh = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TEXT_CONFIGS["first-eos-gelu"]))
    fresh.load_state_dict(text.to_transformers_state_dict(), strict=True)
    ids, mask = padded_text("first-eos-gelu")
    vision = CLIPImageTower(CLIPVisionConfig(**VISION_CONFIGS["30px-p6-4ch-gelu"]))
    fresh_v = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        **VISION_CONFIGS["30px-p6-4ch-gelu"]))
    fresh_v.load_state_dict(vision.to_transformers_state_dict(), strict=True)
    x = images("30px-p6-4ch-gelu")
    with torch.no_grad():
        assert max_diff(text(ids, mask)[1], fresh.eval()(input_ids=ids, attention_mask=mask).text_embeds) <= TOL
        assert max_diff(vision(x)[1], fresh_v.eval()(pixel_values=x).image_embeds) <= TOL
    # and back again: the same tensors under the same kandlab keys
    back = CLIPTextTower.from_transformers(text.to_transformers_state_dict(), config=text.config)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), text.state_dict().values()))
    hf = hf_clip_model()
    clip = CLIP.from_transformers(hf)
    assert set(clip.to_transformers_state_dict()) == set(hf.state_dict())
    again = CLIP.from_transformers(clip.to_transformers_state_dict(), clip.text_tower.config,
                                   clip.image_tower.config)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), clip.state_dict().values()))


def test_towers_load_from_a_clip_model_and_share_its_tensors():
    torch.manual_seed(5)
    hf = hf_clip_model()
    text = CLIPTextTower.from_transformers(hf)  # the image half and logit_scale are skipped
    vision = CLIPImageTower.from_transformers(hf)
    assert text.text_projection.weight.data_ptr() == hf.text_projection.weight.data_ptr()  # no copy
    ids, mask = padded_text("first-eos-gelu")
    x = images("16px-p4-quick_gelu")
    with torch.no_grad():
        ref_text = hf.get_text_features(input_ids=ids, attention_mask=mask).pooler_output  # projected
        assert max_diff(text(ids, mask)[1], ref_text) <= TOL
        assert max_diff(vision(x)[1], hf.get_image_features(pixel_values=x).pooler_output) <= TOL


def test_load_errors_name_the_keys():
    hf = hf_text("legacy-eos-quick_gelu")
    config = CLIPTextConfig.from_transformers_config(hf.config)
    sd = dict(hf.state_dict())

    missing = {k: v for k, v in sd.items() if k != "text_model.encoder.layers.1.mlp.fc2.bias"}
    with pytest.raises(ValueError, match=r"missing keys \(1\):\s+text_model\.encoder\.layers\.1\.mlp\.fc2\.bias"):
        CLIPTextTower.from_transformers(missing, config=config)

    extra = {**sd, "text_model.encoder.layers.2.layer_norm1.weight": torch.ones(32)}
    with pytest.raises(ValueError, match=r"unexpected keys \(1\):\s+text_model\.encoder\.layers\.2\.layer_norm1"):
        CLIPTextTower.from_transformers(extra, config=config)

    wide = CLIPTextConfig(**{**vars(config), "intermediate_size": 40})
    fc1 = r"shape mismatches \(\d+\):[\s\S]*layers\.0\.mlp\.fc1\.weight: checkpoint \(37, 32\) vs kandlab \(40, 32\)"
    with pytest.raises(ValueError, match=fc1):
        CLIPTextTower.from_transformers(sd, config=wide)

    # a CLIPTextModel has no projection and no text_model. prefix: the hint says what to use
    bare = transformers.CLIPTextModel(hf.config)
    with pytest.raises(ValueError, match=r"missing keys \(\d+\)[\s\S]*… and \d+ more[\s\S]*"
                                         r"use CLIPTextModelWithProjection"):
        CLIPTextTower.from_transformers(bare)

    vsd = dict(hf_vision("16px-p4-quick_gelu").state_dict())
    vconfig = CLIPVisionConfig(**VISION_CONFIGS["16px-p4-quick_gelu"])
    bigger = CLIPVisionConfig(**{**vars(vconfig), "image_size": 20})
    pos = r"vision_model\.embeddings\.position_embedding\.weight: checkpoint \(17, 32\) vs kandlab \(26, 32\)"
    with pytest.raises(ValueError, match=pos):
        CLIPImageTower.from_transformers(vsd, config=bigger)
    with pytest.raises(ValueError, match=r"missing keys \(1\):\s+visual_projection\.weight[\s\S]*"
                                         r"CLIPVisionModelWithProjection"):
        CLIPImageTower.from_transformers({k: v for k, v in vsd.items() if k != "visual_projection.weight"},
                                         config=vconfig)

    with pytest.raises(ValueError, match="needs config"):
        CLIPTextTower.from_transformers(sd)
    with pytest.raises(TypeError, match="state dict"):
        CLIPImageTower.from_transformers([1, 2, 3])


@pytest.mark.parametrize("which", ["text", "vision"])
def test_key_map_covers_every_parameter_once(which):
    cases = {"text": (CLIPTextTower, CLIPTextConfig, transformers.CLIPTextModelWithProjection,
                      transformers.CLIPTextConfig, text_key_map, TEXT_CONFIGS),
             "vision": (CLIPImageTower, CLIPVisionConfig, transformers.CLIPVisionModelWithProjection,
                        transformers.CLIPVisionConfig, vision_key_map, VISION_CONFIGS)}
    tower, config_cls, hf_cls, hf_config_cls, key_map, configs = cases[which]
    for fields in configs.values():
        pairs = key_map(config_cls(**fields))
        with torch.device("meta"):
            ours, hf = tower(config_cls(**fields)), hf_cls(hf_config_cls(**fields))
        assert sorted(k for k, _ in pairs) == sorted(ours.state_dict())
        assert sorted(h for _, h in pairs) == sorted(hf.state_dict())  # one to one, both ways


def test_clip_key_map_matches_clip_model():
    hf = hf_clip_model()
    text = CLIPTextConfig.from_transformers_config(hf.config)
    vision = CLIPVisionConfig.from_transformers_config(hf.config)
    pairs = clip_key_map(text, vision)
    assert sorted(h for _, h in pairs) == sorted(hf.state_dict())
    assert sorted(k for k, _ in pairs) == sorted(CLIP(text, vision).state_dict())


# ---------------------------------------------------------------------------
# The contrastive loss


def hand_infonce(image: torch.Tensor, text: torch.Tensor, logit_scale: float) -> float:
    """Figure 3 of Radford et al. (2021), written out with Python floats."""
    n = image.shape[0]
    image = [[float(v) for v in row / row.norm()] for row in image.double()]
    text = [[float(v) for v in row / row.norm()] for row in text.double()]
    s = math.exp(logit_scale)
    logits = [[s * sum(a * b for a, b in zip(image[i], text[j])) for j in range(n)] for i in range(n)]
    loss_i = sum(-logits[i][i] + math.log(sum(math.exp(logits[i][j]) for j in range(n))) for i in range(n)) / n
    loss_t = sum(-logits[j][j] + math.log(sum(math.exp(logits[i][j]) for i in range(n))) for j in range(n)) / n
    return (loss_i + loss_t) / 2


def test_contrastive_loss_matches_hand_computation_and_transformers():
    torch.manual_seed(6)
    image, text = torch.randn(5, 8), torch.randn(5, 8) * 3
    for logit_scale in (0.0, math.log(1 / 0.07), 3.5):
        loss = contrastive_loss(image, text, logit_scale)
        assert loss.item() == pytest.approx(hand_infonce(image, text, logit_scale), abs=1e-5)
        ref = modeling_clip.image_text_contrastive_loss(clip_logits(image, text, logit_scale).T)  # logits_per_text
        assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    assert contrastive_loss(image, text, 1.0).item() == pytest.approx(contrastive_loss(text, image, 1.0).item())


def test_contrastive_loss_invariants():
    torch.manual_seed(7)
    n = 6
    image, text = torch.randn(n, 8), torch.randn(n, 8)
    perm = torch.randperm(n)
    assert contrastive_loss(image[perm], text[perm], 2.0).item() == pytest.approx(
        contrastive_loss(image, text, 2.0).item(), abs=1e-6)  # the order of the pairs does not matter
    aligned = torch.eye(n, 8) * torch.rand(n, 1).add(0.5)  # orthogonal, any length: cosine is 1 or 0
    assert contrastive_loss(aligned, aligned * 2, math.log(100.0)).item() < 1e-6
    same_image, same_text = torch.randn(1, 8).expand(n, 8), torch.randn(1, 8).expand(n, 8)
    assert contrastive_loss(same_image, same_text, 2.0).item() == pytest.approx(math.log(n), abs=1e-5)
    assert contrastive_loss(image, text, -50.0).item() == pytest.approx(math.log(n), abs=1e-5)  # τ → ∞
    logit_scale = torch.tensor(1.0, requires_grad=True)
    contrastive_loss(image, text, logit_scale).backward()
    assert logit_scale.grad is not None and torch.isfinite(logit_scale.grad)


def test_clip_starts_at_the_papers_temperature_and_trains():
    torch.manual_seed(8)
    clip = CLIP.tiny(vocab_size=20, max_position_embeddings=8, image_size=16)
    assert clip.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert transformers.CLIPConfig().logit_scale_init_value == pytest.approx(clip.logit_scale.item(), abs=1e-4)
    ids = torch.randint(2, 20, (3, 8))
    ids[:, -1] = 1  # the tiny preset's end token
    loss = clip.loss(ids, torch.randn(3, 3, 16, 16))
    loss.backward()
    assert torch.isfinite(loss) and clip.logit_scale.grad is not None
    assert clip.image_tower.class_embedding.grad.abs().sum() > 0


# ---------------------------------------------------------------------------
# Full size on the meta device


@pytest.mark.parametrize(
    "tower, preset, expected",
    [
        ("text", "vit_bigg_14", 694_659_840),  # Kandinsky 2.2 text encoder (OpenCLIP ViT-bigG/14)
        ("vision", "vit_bigg_14", 1_844_907_264),  # Kandinsky 2.2 image encoder
        ("text", "vit_l_14", 123_650_304),  # OpenAI ViT-L/14 (Kandinsky 2.1)
        ("vision", "vit_l_14", 303_966_208),
    ],
)
def test_full_size_parameter_counts_on_meta(tower, preset, expected):
    if tower == "text":
        config = getattr(CLIPTextConfig, preset)()
        ours_cls, hf_cls = CLIPTextTower, transformers.CLIPTextModelWithProjection
        hf_config_cls = transformers.CLIPTextConfig
    else:
        config = getattr(CLIPVisionConfig, preset)()
        ours_cls, hf_cls = CLIPImageTower, transformers.CLIPVisionModelWithProjection
        hf_config_cls = transformers.CLIPVisionConfig
    # the published sizes, typed by hand (hidden, layers, heads, intermediate, projection, act[, patch, image])
    reference = {
        ("text", "vit_bigg_14"): (1280, 32, 20, 5120, 1280, "gelu"),
        ("vision", "vit_bigg_14"): (1664, 48, 16, 8192, 1280, "gelu", 14, 224),
        ("text", "vit_l_14"): (768, 12, 12, 3072, 768, "quick_gelu"),
        ("vision", "vit_l_14"): (1024, 24, 16, 4096, 768, "quick_gelu", 14, 224),
    }[tower, preset]
    got = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size,
           config.projection_dim, config.hidden_act)
    if tower == "vision":
        got += (config.patch_size, config.image_size)
    assert got == reference
    with torch.device("meta"):
        hf = hf_cls(hf_config_cls(**vars(config)))  # kandlab's field names are transformers' names
        ours = ours_cls(config)
    n_hf, n_ours = (sum(p.numel() for p in m.parameters()) for m in (hf, ours))
    assert n_ours == n_hf == expected
    loaded = ours_cls.from_transformers(hf)  # the key map fits at full size too
    assert loaded.config == config
    assert next(loaded.parameters()).is_meta


# ---------------------------------------------------------------------------
# Presets, bad inputs and configs


def test_tiny_text_tower_reads_the_shapes_tokenizer():
    from kandlab.tokenizer import EOS_ID, PAD_ID, ShapesTokenizer

    tok = ShapesTokenizer.from_shapes(max_length=16)
    config = CLIPTextConfig.tiny(vocab_size=tok.vocab_size, max_position_embeddings=tok.max_length)
    assert (config.eos_token_id, config.pad_token_id) == (EOS_ID, PAD_ID)
    torch.manual_seed(9)
    tower = CLIPTextTower(config).eval()
    batch = tok(["a red circle", "two blue squares above a green triangle"])
    with torch.no_grad():
        hidden, embeds = tower(**batch)
    assert hidden.shape == (2, 16, 64) and embeds.shape == (2, 64)
    at_eos = batch["attention_mask"].sum(1) - 1  # the end token closes each prompt
    assert torch.allclose(embeds, tower.text_projection(hidden[torch.arange(2), at_eos]))


@pytest.fixture(scope="module")
def tiny_text():
    torch.manual_seed(10)
    return CLIPTextTower(CLIPTextConfig.tiny(vocab_size=20, max_position_embeddings=8)).eval()


@pytest.fixture(scope="module")
def tiny_image():
    torch.manual_seed(11)
    return CLIPImageTower(CLIPVisionConfig.tiny(image_size=16)).eval()


def _ids(*rows):
    return torch.tensor(rows, dtype=torch.long)


@pytest.mark.parametrize(
    "ids, mask, message",
    [
        (_ids([3, 25, 1]), None, r"token id 25 is outside the vocabulary of 20 tokens \(valid ids: 0\.\.19\)"),
        (_ids([3, -1, 1]), None, r"token id -1 is outside the vocabulary"),
        (torch.ones(2, 9, dtype=torch.long), None,
         r"9 tokens but this text tower has positions for 8; truncate.*max_length=8"),
        (torch.tensor([3, 4, 1]), None, r"2-D \(batch, length\).*input_ids\[None\]"),
        (torch.rand(1, 4), None, r"torch\.long.*\.long\(\)"),
        (torch.zeros(2, 0, dtype=torch.long), None, r"length 0"),
        (_ids([3, 4, 1], [3, 4, 5]), None, r"rows \[1\] of input_ids hold no end token \(eos_token_id=1\)"),
        (_ids([3, 1]), torch.ones(1, 3), r"attention_mask shape \(1, 3\) must equal input_ids shape \(1, 2\)"),
        (_ids([3, 1]), torch.full((1, 2), 2), r"only 1 .* and 0"),
    ],
)
def test_bad_text_inputs_raise_value_error(tiny_text, ids, mask, message):
    with pytest.raises(ValueError, match=message):
        tiny_text(ids, mask)


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.randn(2, 3, 32, 32), r"32 × 32 but this tower was built for 16 × 16.*resize first"),
        (torch.randn(2, 3, 16, 12), r"16 × 12 but this tower was built for 16 × 16"),
        (torch.randn(2, 1, 16, 16), r"1 channels but this tower takes 3: pass \(batch, 3, 16, 16\).*grey image"),
        (torch.randn(2, 16, 16, 3), r"16 channels but this tower takes 3.*not last"),
        (torch.randn(3, 16, 16), r"4-D \(batch, 3, 16, 16\).*pixel_values\[None\]"),
        (torch.zeros(2, 3, 16, 16, dtype=torch.uint8), r"must be floats.*/ 255"),
    ],
)
def test_bad_images_raise_value_error(tiny_image, x, message):
    with pytest.raises(ValueError, match=message):
        tiny_image(x)


def test_bad_types_configs_and_pairs(tiny_text, tiny_image):
    with pytest.raises(TypeError, match="torch.LongTensor"):
        tiny_text([[1, 2, 3]])
    with pytest.raises(TypeError, match="float tensor"):
        tiny_image([[0.0]])
    with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
        CLIPTextConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="hidden_act must be one of"):
        CLIPVisionConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="image_size 30 is not divisible by patch_size 4.*use image_size=28"):
        CLIPVisionConfig(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="not supported"):
        CLIPTextConfig.from_transformers_config(transformers.CLIPTextConfig(hidden_act="gelu_new"))
    with pytest.raises(ValueError, match="square images"):
        CLIPVisionConfig.from_transformers_config(transformers.CLIPVisionConfig(image_size=(224, 160)))
    with pytest.raises(ValueError, match="same joint space"):
        CLIP(CLIPTextConfig.tiny(), CLIPVisionConfig(**{**vars(CLIPVisionConfig.tiny()), "projection_dim": 32}))
    with pytest.raises(ValueError, match="3 images but 4 texts"):
        contrastive_loss(torch.randn(3, 8), torch.randn(4, 8), 1.0)
    with pytest.raises(ValueError, match="8-wide but text_embeds 6-wide"):
        contrastive_loss(torch.randn(3, 8), torch.randn(3, 6), 1.0)
    assert clip_logits(torch.randn(3, 8), torch.randn(5, 8), 0.0).shape == (3, 5)  # unequal batches are fine here
