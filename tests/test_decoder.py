"""kandlab.decoder: Kandinsky 2.2's image conditioning on kandlab's Kandinsky 3 UNet.

Parity: ImageProjection and ImageTimeEmbedding against diffusers' classes of the same name (random
weights, LayerNorm gains included, batch > 1, two sizes each, fp32, max abs diff ≤ 1e-6), and against
how ``UNet2DConditionModel`` applies them. The decoder: shapes, the embedding matters, dropout to zeros
is the unconditional branch, guidance, gradients, and errors on bad input.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kandlab.decoder import (
    DecoderConfig,
    ImageConditionedUNet,
    ImageProjection,
    ImageTimeEmbedding,
    drop_image_embeds,
    guided_eps,
    unet_trunk,
)
from kandlab.unet import UNet, UNetConfig, text_mask_bias

pytest.importorskip("diffusers")
from diffusers.models.embeddings import ImageProjection as HFImageProjection  # noqa: E402
from diffusers.models.embeddings import ImageTimeEmbedding as HFImageTimeEmbedding  # noqa: E402

TOL = 1e-6
DATA = Path(__file__).resolve().parents[1] / "data"

# (image_embed_dim, cross_attention_dim, num_image_text_embeds) and (image_embed_dim, time_embed_dim)
PROJECTION_SIZES = [(12, 8, 3), (20, 16, 32)]
TIME_SIZES = [(12, 24), (20, 7)]


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every tensor random, LayerNorm gains around 1 (their default ones and zeros would hide a swap)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight") and "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.5)
    return module.eval()


def embeds(B: int, E: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, E, generator=torch.Generator().manual_seed(seed)) * 3.0  # (B, E)


# --------------------------------------------------------------------------------------
# ImageProjection and ImageTimeEmbedding against diffusers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("E,D,N", PROJECTION_SIZES)
def test_image_projection_matches_diffusers(E, D, N):
    theirs = randomise(HFImageProjection(image_embed_dim=E, cross_attention_dim=D, num_image_text_embeds=N), E)
    ours = ImageProjection.from_diffusers(theirs)
    assert (ours.image_embed_dim, ours.cross_attention_dim, ours.num_image_text_embeds) == (E, D, N)
    e = embeds(5, E)
    with torch.no_grad():
        got, want = ours(e), theirs(e)
    assert got.shape == want.shape == (5, N, D)
    assert (got - want).abs().max().item() <= TOL


@pytest.mark.parametrize("E,T", TIME_SIZES)
def test_image_time_embedding_matches_diffusers(E, T):
    theirs = randomise(HFImageTimeEmbedding(image_embed_dim=E, time_embed_dim=T), E + T)
    ours = ImageTimeEmbedding.from_diffusers(theirs)
    e = embeds(4, E)
    with torch.no_grad():
        got, want = ours(e), theirs(e)
    assert got.shape == want.shape == (4, T)
    assert (got - want).abs().max().item() <= TOL


def test_conditioning_matches_how_unet2dcondition_applies_it():
    """diffusers' Kandinsky 2.2 wiring: encoder_hid_proj → the context, add_embedding → added to the time emb."""
    from diffusers import UNet2DConditionModel

    hf = UNet2DConditionModel(
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=16, attention_head_dim=8, encoder_hid_dim=12,
        encoder_hid_dim_type="image_proj", addition_embed_type="image",
    )
    randomise(hf.encoder_hid_proj, 0), randomise(hf.add_embedding, 1)
    projection = ImageProjection.from_diffusers(hf.encoder_hid_proj)
    time_vector = ImageTimeEmbedding.from_diffusers(hf.add_embedding)
    assert projection.num_image_text_embeds == 32  # diffusers' default: the UNet never passes it
    e = embeds(3, 12)
    kwargs = {"image_embeds": e}
    with torch.no_grad():
        context = hf.process_encoder_hidden_states(None, kwargs)  # (B, 32, 16)
        aug = hf.get_aug_embed(torch.zeros(3, 128), None, kwargs)  # (B, 128): added to the time embedding
        assert (projection(e) - context).abs().max().item() <= TOL
        assert (time_vector(e) - aug).abs().max().item() <= TOL


# --------------------------------------------------------------------------------------
# State dicts: round trips and key-map errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ours_cls,theirs",
    [(ImageProjection, lambda: HFImageProjection(10, 6, 4)), (ImageTimeEmbedding, lambda: HFImageTimeEmbedding(10, 6))],
)
def test_state_dict_round_trip(ours_cls, theirs):
    hf = randomise(theirs(), 3)
    ours = ours_cls.from_diffusers(hf.state_dict())  # sizes read from the tensor shapes
    out = ours.to_diffusers_state_dict()
    assert set(out) == set(hf.state_dict())
    for k, v in hf.state_dict().items():
        assert torch.equal(out[k], v)
    back = theirs()
    back.load_state_dict(out, strict=True)
    e = embeds(2, 10)
    with torch.no_grad():
        assert torch.equal(back(e), hf(e))
    assert set(k for k, _ in ours_cls.DIFFUSERS_KEYS) == set(ours.state_dict())


def test_from_state_dict_shares_and_from_module_copies():
    hf = randomise(HFImageTimeEmbedding(6, 4), 0)
    shared = ImageTimeEmbedding.from_diffusers(hf.state_dict())
    copied = ImageTimeEmbedding.from_diffusers(hf)
    assert shared.linear.weight.data_ptr() == hf.image_proj.weight.data_ptr()
    assert copied.linear.weight.data_ptr() != hf.image_proj.weight.data_ptr()


def test_key_map_errors_list_missing_unexpected_and_shapes():
    sd = dict(HFImageProjection(8, 4, 2).state_dict())
    sd.pop("norm.bias")
    sd["proj.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"(?s)missing keys \(1\): norm.bias.*unexpected keys \(1\): proj.extra"):
        ImageProjection.from_diffusers(sd)
    mismatch = r"shape mismatches .*image_embeds.weight: checkpoint \(8, 8\), kandlab \(12, 8\)"
    with pytest.raises(ValueError, match=mismatch):
        ImageProjection.from_diffusers(HFImageProjection(8, 4, 2), num_image_text_embeds=3)
    with pytest.raises(ValueError, match=r"image_proj.weight: checkpoint \(6, 5\), kandlab \(6, 7\)"):
        ImageTimeEmbedding.from_diffusers(HFImageTimeEmbedding(5, 6), image_embed_dim=7)
    wrong = dict(HFImageTimeEmbedding(5, 6).state_dict(), **{"image_norm.weight": torch.ones(3)})
    with pytest.raises(ValueError, match=r"image_norm.weight: checkpoint \(3,\), kandlab \(6,\)"):
        ImageTimeEmbedding.from_diffusers(wrong)
    with pytest.raises(TypeError, match="diffusers ImageTimeEmbedding or its state dict"):
        ImageTimeEmbedding.from_diffusers([1, 2])


@pytest.mark.parametrize("module", [ImageProjection(8, 4, 2), ImageTimeEmbedding(8, 6)])
def test_projections_reject_an_embedding_of_the_wrong_width(module):
    name = type(module).__name__
    with pytest.raises(ValueError, match=rf"{name}: image_embeds has shape \(2, 9\) but must be .*\(B, 8\)"):
        module(torch.randn(2, 9))
    with pytest.raises(ValueError, match=r"add a batch axis"):
        module(torch.randn(8))
    with pytest.raises(TypeError, match="floating-point"):
        module(torch.ones(2, 8, dtype=torch.long))


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


def test_tiny_has_the_widths_of_the_shipped_latent_unet():
    shipped = json.loads((DATA / "latent_text.json").read_text())["unet_config"]
    unet = DecoderConfig.tiny().unet
    for key in ("in_channels", "out_channels", "time_embedding_dim", "groups", "head_dim", "layers_per_block",
                "cross_attention_dim", "attention_levels", "expansion_ratio", "compression_ratio"):
        assert getattr(unet, key) == (tuple(shipped[key]) if isinstance(shipped[key], list) else shipped[key]), key
    assert unet.block_out_channels == tuple(shipped["block_out_channels"])


def test_kandinsky2_2_sizes_on_meta():
    config = DecoderConfig.kandinsky2_2()
    assert (config.image_embed_dim, config.num_image_tokens) == (1280, 32)
    assert (config.unet.cross_attention_dim, config.unet.time_embedding_dim) == (768, 1536)
    with torch.device("meta"):
        model = ImageConditionedUNet(config)
        hf_proj, hf_time = HFImageProjection(1280, 768, 32), HFImageTimeEmbedding(1280, 1536)

    def count(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    assert count(model.image_projection) == count(hf_proj) == 31_483_392
    assert count(model.image_time_embedding) == count(hf_time) == 1_970_688
    assert count(model) == 1_406_125_252  # the figure in DecoderConfig.kandinsky2_2's docstring


def test_config_errors_teach():
    with pytest.raises(ValueError, match=r"encoder_hid_dim=64 but image_embed_dim=32"):
        DecoderConfig(unet=UNetConfig.tiny_latent(), image_embed_dim=32)
    with pytest.raises(ValueError, match="4 channels of MoVQ latents"):
        DecoderConfig(unet=UNetConfig.tiny_pixel())
    with pytest.raises(ValueError, match="text_conditioned=True"):
        DecoderConfig(unet=UNetConfig.tiny_latent(text_conditioned=False))
    with pytest.raises(ValueError, match="num_image_tokens must be a positive int"):
        DecoderConfig.tiny(num_image_tokens=0)


# --------------------------------------------------------------------------------------
# The decoder
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> ImageConditionedUNet:
    torch.manual_seed(0)
    m = ImageConditionedUNet(DecoderConfig.tiny()).eval()
    with torch.no_grad():  # trained-looking conditional norms: fresh ones (zeros) would ignore t_emb entirely
        for name, p in m.named_parameters():
            if "to_scale_shift" in name:
                p.normal_(0.0, 0.05)
    return m


def latents(B: int = 2, size: int = 16, seed: int = 2) -> torch.Tensor:
    return torch.randn(B, 4, size, size, generator=torch.Generator().manual_seed(seed))  # (B, 4, h, w)


def test_forward_shape_and_no_text_path(model):
    x, e = latents(3), embeds(3, 64)
    with torch.no_grad():
        eps = model(x, torch.tensor([0, 400, 999]), e)
    assert eps.shape == (3, 4, 16, 16)
    assert model.unet.text_projection is None and model.unet.attention_pooling is None
    names = list(dict(model.named_parameters()))
    assert not any("text_projection" in n or "attention_pooling" in n for n in names)
    with torch.no_grad():
        assert model(latents(1, 8), 10, embeds(1, 64)).shape == (1, 4, 8, 8)


def test_trunk_walks_the_unet_as_its_forward_does():
    """``unet_trunk`` with UNet.forward's own conditioning gives UNet.forward's numbers exactly."""
    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny_latent()).eval()
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "to_scale_shift" in name:
                p.normal_(0.0, 0.05)
        x, t = latents(2), torch.tensor([3, 700])
        text, mask = torch.randn(2, 5, 64), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
        context = unet.text_projection(text)
        bias = text_mask_bias(mask, context.dtype)
        t_emb = unet.time_embedding(t) + unet.attention_pooling(context, bias)
        assert torch.equal(unet_trunk(unet, x, t_emb, context, bias), unet(x, t, text, mask))


def test_the_image_embedding_changes_the_output(model):
    x, t = latents(2), torch.tensor([500, 500])
    with torch.no_grad():
        a, b = model(x, t, embeds(2, 64, seed=1)), model(x, t, embeds(2, 64, seed=2))
    assert (a - b).abs().amax(dim=(1, 2, 3)).min().item() > 1e-3  # every row differs


def test_each_path_carries_the_embedding(model):
    """Through the context tokens alone and through the time vector alone, the embedding still matters."""
    x, t, e1, e2 = latents(2), torch.tensor([200, 800]), embeds(2, 64, seed=1), embeds(2, 64, seed=2)
    with torch.no_grad():
        c1, c2 = model.image_projection(e1), model.image_projection(e2)
        t_emb = model.unet.time_embedding(t)  # (B, T)
        t1, t2 = t_emb + model.image_time_embedding(e1), t_emb + model.image_time_embedding(e2)
        only_context = unet_trunk(model.unet, x, t1, c1) - unet_trunk(model.unet, x, t1, c2)
        only_time = unet_trunk(model.unet, x, t1, c1) - unet_trunk(model.unet, x, t2, c1)
        eps = model(x, t, e1)
        assert torch.equal(eps, unet_trunk(model.unet, x, t1, c1, text_mask_bias(torch.ones(2, 4))))
        assert (eps - unet_trunk(model.unet, x, t1, c1)).abs().max().item() <= TOL  # no mask, as diffusers
    assert only_context.abs().max().item() > 1e-3 and only_time.abs().max().item() > 1e-3


def test_dropped_rows_give_the_unconditional_output(model):
    x, t, e = latents(4), torch.tensor([100, 300, 600, 900]), embeds(4, 64)
    g = torch.Generator().manual_seed(0)
    dropped = drop_image_embeds(e, 0.5, generator=g)
    gone = (dropped == 0).all(dim=1)  # (B,)
    assert 0 < gone.sum() < 4  # this seed drops some rows, not all
    assert torch.equal(dropped[~gone], e[~gone])
    with torch.no_grad():
        eps = model(x, t, dropped)
        uncond = model(x, t, torch.zeros_like(e))
        cond = model(x, t, e)
    assert torch.equal(eps[gone], uncond[gone])
    assert torch.equal(eps[~gone], cond[~gone])


def test_drop_image_embeds_edge_cases_and_errors():
    e = embeds(6, 5)
    assert torch.equal(drop_image_embeds(e, 0.0), e)
    assert torch.equal(drop_image_embeds(e, 1.0), torch.zeros_like(e))
    null = torch.arange(5.0)
    assert torch.equal(drop_image_embeds(e, 1.0, null=null), null.expand(6, 5))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(drop_image_embeds(e, 0.3, g1), drop_image_embeds(e, 0.3, g2))
    with pytest.raises(ValueError, match=r"p=1.5 is the probability"):
        drop_image_embeds(e, 1.5)
    with pytest.raises(ValueError, match=r"null must be one embedding of shape \(5,\)"):
        drop_image_embeds(e, 0.1, null=torch.zeros(6, 5))
    with pytest.raises(ValueError, match=r"\(B, E\) tensor"):
        drop_image_embeds(e[0], 0.1)


def test_guided_eps(model):
    # guided_eps runs one batch of 2B; batched kernels need not round like two batches of B: ~1e-5 apart.
    x, t, e = latents(2), torch.tensor([250, 750]), embeds(2, 64)
    with torch.no_grad():
        uncond, cond = model(x, t, torch.zeros_like(e)), model(x, t, e)
        for s in (0.0, 1.0, 4.0):
            want = uncond + s * (cond - uncond)
            assert (guided_eps(model, x, t, e, s) - want).abs().max().item() <= 1e-4
        negative = embeds(2, 64, seed=9)
        neg = model(x, t, negative)
        assert (guided_eps(model, x, t, e, 0.0, negative) - neg).abs().max().item() <= 1e-4
        assert guided_eps(model, x, 500, e, 4.0).shape == (2, 4, 16, 16)
    with pytest.raises(ValueError, match="negative_image_embeds must have the shape of image_embeds"):
        guided_eps(model, x, t, e, 4.0, negative[:1])


def test_one_training_step_reaches_both_projections():
    """From a fresh model: step 1 trains the context path; the time path gets gradient once the norms have weights."""
    torch.manual_seed(0)
    model = ImageConditionedUNet(DecoderConfig.tiny()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x0, e, t = latents(2), embeds(2, 64), torch.tensor([100, 900])
    grads = []
    for _ in range(2):
        noise = torch.randn_like(x0)
        loss = torch.nn.functional.mse_loss(model(x0 + noise, t, drop_image_embeds(e, 0.0)), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads.append({n: p.grad.abs().max().item() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
    first, second = grads
    assert first["image_projection.linear.weight"] > 0 and first["image_projection.norm.weight"] > 0
    # ConditionalGroupNorm starts at zero weights, so no gradient reaches t_emb on step one ...
    assert first["image_time_embedding.linear.weight"] == 0 and first["unet.time_embedding.linear_1.weight"] == 0
    # ... and after one step the norms read t_emb: the image time vector trains too.
    assert second["image_time_embedding.linear.weight"] > 0 and second["image_time_embedding.norm.weight"] > 0
    assert second["image_projection.linear.weight"] > 0


def test_bad_inputs_teach(model):
    x, e = latents(2), embeds(2, 64)
    with pytest.raises(ValueError, match=r"ImageConditionedUNet: image_embeds has shape \(2, 32\) .*\(B, 64\)"):
        model(x, 10, torch.randn(2, 32))
    with pytest.raises(ValueError, match="image_embeds has 3 rows but x_t has batch size 2"):
        model(x, 10, embeds(3, 64))
    with pytest.raises(ValueError, match="x_t has 3 channels but the decoder works on 4 latent channels"):
        model(torch.randn(2, 3, 16, 16), 10, e)
    with pytest.raises(ValueError, match="latent size 12 is not divisible by 8"):
        model(torch.randn(2, 4, 12, 16), 10, e)
    with pytest.raises(ValueError, match=r"x_t must be a \(B, 4, h, w\) tensor"):
        model(torch.randn(4, 16, 16), 10, e)
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(B,\) = \(2,\)"):
        model(x, torch.tensor([1, 2, 3]), e)
    with pytest.raises(TypeError, match="t must be a number or a tensor"):
        model(x, "10", e)
