"""Tests for kandlab.unet: parity with diffusers' Kandinsky3UNet, the full-size model
on the meta device, unconditional mode, and errors on bad input."""

from __future__ import annotations

import pytest
import torch

from kandlab.unet import (
    Attention,
    AttentionBlock,
    AttentionPooling,
    ConditionalGroupNorm,
    Conv1x1,
    UNet,
    UNetConfig,
    diffusers_key_map,
    sinusoidal_embedding,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import Kandinsky3UNet  # noqa: E402
from diffusers.models.embeddings import get_timestep_embedding  # noqa: E402

# Random tiny diffusers configs: 4 levels (as in Kandinsky 3), different widths,
# heads, groups, layers_per_block 2 and 3, non-square images.
DIFFUSERS_CONFIGS = [
    dict(in_channels=3, time_embedding_dim=64, groups=4, attention_head_dim=8, layers_per_block=2,
         block_out_channels=(16, 32, 32, 48), cross_attention_dim=24, encoder_hid_dim=20),
    dict(in_channels=4, time_embedding_dim=48, groups=8, attention_head_dim=16, layers_per_block=3,
         block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, encoder_hid_dim=12),
    dict(in_channels=2, time_embedding_dim=32, groups=2, attention_head_dim=4, layers_per_block=2,
         block_out_channels=(8, 16, 24, 24), cross_attention_dim=16, encoder_hid_dim=8),
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is fastest, and avoids OpenMP spin-waits on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_diffusers_unet(config: dict, seed: int = 0) -> Kandinsky3UNet:
    """diffusers zero-initialises the conditional-norm projections; randomise every
    parameter so that parity cannot hold by accident."""
    torch.manual_seed(seed)
    model = Kandinsky3UNet(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.05)
    return model


def make_inputs(config: dict, batch: int = 3, size=(16, 24), text_len: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config["in_channels"], *size, generator=g)
    text = torch.randn(batch, text_len, config["encoder_hid_dim"], generator=g)
    # row 0: all tokens real; row 1: 4 real + padding; row 2: a single real token
    lengths = [text_len, 4, 1][:batch] + [2] * max(0, batch - 3)
    mask = torch.arange(text_len)[None, :] < torch.tensor(lengths)[:, None]  # (B, L) bool
    return x, text, mask


# --------------------------------------------------------------------------------------
# parity with diffusers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", DIFFUSERS_CONFIGS, ids=["lpb2", "lpb3", "narrow"])
def test_parity_with_diffusers(config):
    theirs = random_diffusers_unet(config)
    ours = UNet.from_diffusers(theirs).eval()
    x, text, mask = make_inputs(config)
    t = torch.tensor([0, 371, 999])  # a different timestep per sample

    with torch.no_grad():
        expected = theirs(x, t, text, mask).sample
        got = ours(x, t, text, mask)
        assert got.shape == expected.shape == x.shape
        assert expected.std() > 0.01  # not trivially ~0
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

        # an all-zero mask (the unconditional branch of classifier-free guidance) is not
        # -inf: the (1 - mask)·(-10000) bias makes that row attend uniformly
        empty = mask.clone()
        empty[2] = False
        torch.testing.assert_close(ours(x, t, text, empty), theirs(x, t, text, empty).sample, atol=1e-5, rtol=0)

        # a float mask and a scalar timestep give the same as diffusers too
        expected = theirs(x, 500, text, mask.float()).sample
        torch.testing.assert_close(ours(x, 500, text, mask.float()), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(x, torch.tensor(500), text, mask), expected, atol=1e-5, rtol=0)

    # round trip: our weights load back into diffusers with strict=True
    back = Kandinsky3UNet(**config).eval()
    back.load_state_dict(ours.to_diffusers_state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(back(x, t, text, mask).sample, theirs(x, t, text, mask).sample, atol=0, rtol=0)


def test_from_diffusers_copies_weights():
    config = DIFFUSERS_CONFIGS[2]
    theirs = random_diffusers_unet(config)
    ours = UNet.from_diffusers(theirs)
    params = list(ours.parameters())
    assert sum(p.numel() for p in params) == sum(p.numel() for p in theirs.parameters())
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in params)  # trainable
    with torch.no_grad():
        ours.conv_in.weight.add_(1.0)
    assert not torch.equal(ours.conv_in.weight, theirs.conv_in.weight)


def test_output_depends_on_text_and_mask():
    config = DIFFUSERS_CONFIGS[0]
    ours = UNet.from_diffusers(random_diffusers_unet(config)).eval()
    x, text, mask = make_inputs(config)
    t = torch.tensor([10, 500, 900])
    with torch.no_grad():
        base = ours(x, t, text, mask)
        changed = text.clone()
        changed[1, 2] += 1.0  # a real token of sample 1
        out = ours(x, t, changed, mask)
        assert (out[1] - base[1]).abs().max() > 1e-3
        torch.testing.assert_close(out[0], base[0], atol=1e-6, rtol=0)  # samples stay independent
        # the mask matters: the same text with every token real gives another output
        assert (ours(x, t, text, torch.ones_like(mask)) - base)[1:].abs().max() > 1e-3


def test_masked_tokens_are_ignored_by_attention_but_not_by_the_pooling_query():
    """Kandinsky 3 masks keys/values, but the pooling query is the plain mean of all
    tokens, padding included (the diffusers pipeline zeroes padded embeddings)."""
    torch.manual_seed(0)
    config = UNetConfig.tiny_pixel()
    D = config.cross_attention_dim
    text = torch.randn(2, 5, D)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    bias = ((1.0 - mask.float()) * -10000.0)[:, None, None, :]
    changed = text.clone()
    changed[0, 4] += 3.0  # a padded token

    block = AttentionBlock(32, config, context_dim=D)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, t_act = torch.randn(2, 32, 4, 4), torch.randn(2, config.time_embedding_dim)
    with torch.no_grad():
        torch.testing.assert_close(block(x, t_act, changed, bias), block(x, t_act, text, bias), atol=1e-6, rtol=0)
        pooling = AttentionPooling(config)
        assert (pooling(changed, bias)[0] - pooling(text, bias)[0]).abs().max() > 1e-4


# --------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [8, 15, 192])
def test_sinusoidal_embedding_matches_diffusers(dim):
    t = torch.tensor([0, 1, 17, 999])
    expected = get_timestep_embedding(t, dim, flip_sin_to_cos=False, downscale_freq_shift=1)
    torch.testing.assert_close(sinusoidal_embedding(t, dim), expected)


def test_conditional_group_norm_equals_the_plain_formula():
    torch.manual_seed(0)
    norm = ConditionalGroupNorm(4, 12, 10)
    torch.nn.init.normal_(norm.to_scale_shift.weight)
    x, t_act = torch.randn(3, 12, 5, 6), torch.randn(3, 10)
    scale, shift = norm.to_scale_shift(t_act).chunk(2, dim=1)
    expected = torch.nn.functional.group_norm(x, 4) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    torch.testing.assert_close(norm(x, t_act), expected, atol=1e-5, rtol=1e-5)
    # fresh: the projection starts at zero, so the block is a plain group norm
    fresh = ConditionalGroupNorm(4, 12, 10)
    torch.testing.assert_close(fresh(x, t_act), torch.nn.functional.group_norm(x, 4))


def test_conv1x1_equals_conv2d():
    torch.manual_seed(0)
    conv = Conv1x1(6, 5)
    x = torch.randn(2, 6, 3, 4)
    torch.testing.assert_close(conv(x), torch.nn.functional.conv2d(x, conv.weight, conv.bias))


def test_attention_heads_and_mask():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, context_dim=8, inner_dim=16, out_dim=12, head_dim=4)
    assert attn.heads == 4
    x, ctx = torch.randn(2, 3, 16), torch.randn(2, 5, 8)
    out = attn(x, ctx)
    assert out.shape == (2, 3, 12)
    # hand-written reference: softmax(q kᵀ / √d) v per head
    q = attn.to_q(x).view(2, 3, 4, 4).transpose(1, 2)
    k = attn.to_k(ctx).view(2, 5, 4, 4).transpose(1, 2)
    v = attn.to_v(ctx).view(2, 5, 4, 4).transpose(1, 2)
    ref = ((q @ k.transpose(-1, -2)) / 2.0).softmax(-1) @ v
    torch.testing.assert_close(out, attn.to_out(ref.transpose(1, 2).reshape(2, 3, 16)), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------
# the published model on the meta device
# --------------------------------------------------------------------------------------


def test_full_size_parameter_count_and_key_map():
    config = UNetConfig.kandinsky3()
    with torch.device("meta"):
        ours = UNet(config)
        theirs = Kandinsky3UNet()
    assert sum(p.numel() for p in ours.parameters()) == 3_055_348_228
    assert config.init_channels == 192

    pairs = diffusers_key_map(config)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert len({a for a, _ in pairs}) == len({b for _, b in pairs}) == len(pairs)  # one-to-one
    assert {a for a, _ in pairs} == set(ours_sd)
    assert {b for _, b in pairs} == set(theirs_sd)
    bad = [(a, b) for a, b in pairs if ours_sd[a].shape != theirs_sd[b].shape]
    assert not bad, bad[:5]


def test_from_diffusers_full_size_state_dict_on_meta():
    with torch.device("meta"):
        state_dict = Kandinsky3UNet().state_dict()
    model = UNet.from_diffusers(state_dict, UNetConfig.kandinsky3())
    assert model.conv_in.weight.shape == (192, 4, 3, 3)
    assert model.conv_in.weight.is_meta  # the tensors are used as they are, not copied


# --------------------------------------------------------------------------------------
# tiny presets and unconditional mode
# --------------------------------------------------------------------------------------


def test_tiny_presets_have_a_few_million_parameters():
    n = lambda cfg: sum(p.numel() for p in UNet(cfg).parameters())  # noqa: E731
    pixel = n(UNetConfig.tiny_pixel())
    assert 2_000_000 < pixel < 8_000_000
    assert 2_000_000 < n(UNetConfig.tiny_pixel(text_conditioned=False)) < pixel
    assert 2_000_000 < n(UNetConfig.tiny_latent()) < 8_000_000


def test_tiny_pixel_loads_into_diffusers():
    """The tiny model is the real architecture: its weights load into Kandinsky3UNet."""
    cfg = UNetConfig.tiny_pixel()
    theirs = Kandinsky3UNet(
        in_channels=cfg.in_channels, time_embedding_dim=cfg.time_embedding_dim, groups=cfg.groups,
        attention_head_dim=cfg.head_dim, layers_per_block=cfg.layers_per_block,
        block_out_channels=cfg.block_out_channels, cross_attention_dim=cfg.cross_attention_dim,
        encoder_hid_dim=cfg.encoder_hid_dim,
    )
    theirs.load_state_dict(UNet(cfg).to_diffusers_state_dict(), strict=True)


def test_unconditional_forward_and_backward():
    torch.manual_seed(0)
    model = UNet(UNetConfig.tiny_pixel(text_conditioned=False))
    assert model.text_projection is None and model.attention_pooling is None
    assert not any("cross_attention" in name for name, _ in model.named_parameters())
    x = torch.randn(2, 3, 32, 32)
    out = model(x, torch.tensor([3, 700]))
    assert out.shape == x.shape
    out.square().mean().backward()
    assert model.conv_in.weight.grad.abs().sum() > 0
    with torch.no_grad():
        # t enters only through the conditional norms, whose projections start at zero
        torch.testing.assert_close(model(x, 3), model(x, 700))
        for module in model.modules():
            if isinstance(module, ConditionalGroupNorm):
                torch.nn.init.normal_(module.to_scale_shift.weight, std=0.1)
        assert (model(x, 3) - model(x, 700)).abs().max() > 1e-4


def test_layers_per_block_1_works_in_kandlab():
    model = UNet(UNetConfig.tiny_pixel(layers_per_block=1, block_out_channels=(32, 64), attention_levels=(False, True)))
    x = torch.randn(2, 3, 8, 8)
    assert model(x, 1, torch.randn(2, 3, 64)).shape == x.shape


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return UNet(UNetConfig.tiny_pixel()).eval()


def test_wrong_channel_count(tiny):
    with pytest.raises(ValueError, match=r"x has 4 channels but this UNet expects in_channels=3"):
        tiny(torch.randn(1, 4, 32, 32), 1, torch.randn(1, 3, 64))


def test_indivisible_image_size(tiny):
    with pytest.raises(ValueError, match=r"image size 30 is not divisible by 8 \(the UNet halves it 3 times\); use 32"):
        tiny(torch.randn(1, 3, 30, 32), 1, torch.randn(1, 3, 64))


def test_wrong_text_hidden_size(tiny):
    expected = r"text must have shape \(B, L, encoder_hid_dim\) = \(1, L, 64\), got \(1, 3, 32\)"
    with pytest.raises(ValueError, match=expected):
        tiny(torch.randn(1, 3, 32, 32), 1, torch.randn(1, 3, 32))


def test_mismatched_mask_shape(tiny):
    with pytest.raises(ValueError, match=r"text_mask must have shape \(B, L\) = \(1, 3\)"):
        tiny(torch.randn(1, 3, 32, 32), 1, torch.randn(1, 3, 64), torch.ones(1, 4))
    with pytest.raises(ValueError, match="only 0 and 1"):
        tiny(torch.randn(1, 3, 32, 32), 1, torch.randn(1, 3, 64), torch.full((1, 3), 0.5))


def test_missing_text_for_conditional_model(tiny):
    with pytest.raises(ValueError, match=r"text-conditioned.*text_conditioned=False"):
        tiny(torch.randn(1, 3, 32, 32), 1)


def test_text_for_unconditional_model():
    model = UNet(UNetConfig.tiny_pixel(text_conditioned=False))
    with pytest.raises(ValueError, match="text_conditioned=False"):
        model(torch.randn(1, 3, 32, 32), 1, torch.randn(1, 3, 64))


def test_bad_timesteps(tiny):
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(B,\) = \(2,\)"):
        tiny(torch.randn(2, 3, 32, 32), torch.tensor([1, 2, 3]), torch.randn(2, 3, 64))


def test_bad_configs():
    with pytest.raises(ValueError, match=r"groups=16 does not divide 8 channels"):
        UNetConfig.tiny_pixel(block_out_channels=(16, 32, 64, 64), groups=16)
    with pytest.raises(ValueError, match=r"head_dim=32 does not divide 48 channels"):
        UNetConfig.tiny_pixel(block_out_channels=(32, 48, 64, 128))
    with pytest.raises(ValueError, match=r"attention_levels has 4 entries but there are 3 levels"):
        UNetConfig.tiny_pixel(block_out_channels=(32, 64, 64))


def test_from_diffusers_with_mismatched_config():
    config = DIFFUSERS_CONFIGS[2]
    theirs = random_diffusers_unet(config)
    wrong = UNetConfig(in_channels=2, time_embedding_dim=32, groups=2, head_dim=4, layers_per_block=2,
                       block_out_channels=(8, 16, 24, 32), cross_attention_dim=16, encoder_hid_dim=8)
    with pytest.raises(ValueError, match=r"block_out_channels: given \(8, 16, 24, 32\), model has \(8, 16, 24, 24\)"):
        UNet.from_diffusers(theirs, wrong)
    with pytest.raises(ValueError, match=r"shape mismatches: .*checkpoint .* model") as info:
        UNet.from_diffusers(theirs.state_dict(), wrong)
    assert "check the config matches the checkpoint" in str(info.value)
    # fewer layers per block: the extra diffusers keys are reported as unexpected, with a count
    fewer = UNetConfig(in_channels=2, time_embedding_dim=32, groups=2, head_dim=4, layers_per_block=1,
                       block_out_channels=(8, 16, 24, 24), cross_attention_dim=16, encoder_hid_dim=8)
    with pytest.raises(ValueError, match=r"\d+ unexpected keys: .*… and \d+ more"):
        UNet.from_diffusers(theirs.state_dict(), fewer)
    with pytest.raises(ValueError, match=r"needs config=UNetConfig"):
        UNet.from_diffusers(theirs.state_dict())


def test_level_resolutions_match_a_meta_forward():
    """`level_resolutions` (lesson 03) says where each down level works; a forward pass on the
    meta device (shapes only, no memory) records the same sides for Kandinsky 3 at 1024²."""
    from kandlab.unet import level_resolutions

    config = UNetConfig.kandinsky3()
    assert level_resolutions(config, 128) == [(128, 64), (64, 32), (32, 16), (16, 16)]
    with torch.device("meta"):
        model = UNet(config)
        seen = []
        hooks = [level.register_forward_hook(lambda m, args, out: seen.append((args[0].shape[-1], out.shape[-1])))
                 for level in model.down]
        model(torch.empty(1, 4, 128, 128), torch.tensor([10.0]), torch.empty(1, 8, 4096))  # no mask: its 0/1 check reads values
    for h in hooks:
        h.remove()
    assert seen == level_resolutions(config, 128)
    assert level_resolutions(UNetConfig.tiny_pixel(), 32) == [(32, 16), (16, 8), (8, 4), (4, 4)]
    with pytest.raises(ValueError, match="divisible by 8"):
        level_resolutions(config, 100)


def test_text_mask_bias():
    from kandlab.unet import MASK_BIAS, text_mask_bias

    bias = text_mask_bias(torch.tensor([[1, 1, 0], [True, False, False]]).bool())
    assert bias.shape == (2, 1, 1, 3)
    assert bias[0, 0, 0].tolist() == [0.0, 0.0, MASK_BIAS] and bias[1, 0, 0].tolist() == [0.0, MASK_BIAS, MASK_BIAS]


def test_config_to_diffusers_is_the_inverse_of_config_from_diffusers():
    from kandlab.unet import config_from_diffusers, config_to_diffusers

    for cfg in (UNetConfig.tiny_pixel(), UNetConfig.tiny_latent(), UNetConfig.kandinsky3()):
        assert config_from_diffusers(config_to_diffusers(cfg)) == cfg
