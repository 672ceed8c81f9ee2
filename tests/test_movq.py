"""kandlab.movq: the VQ invariants, parity with diffusers' VQModel(norm_type="spatial"), full-size counts,
and the errors that teach."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kandlab.movq import (MoVQ, MoVQConfig, SpatialNorm, codebook_usage, diffusers_key_map, lookup, nearest_code,
                          straight_through, to_diffusers_config, vq_loss)

diffusers = pytest.importorskip("diffusers")

# ---------------------------------------------------------------------------
# Vector quantisation: exact invariants


@settings(max_examples=30, deadline=None)
@given(k=st.integers(2, 40), d=st.integers(1, 6), h=st.integers(1, 5), w=st.integers(1, 5), seed=st.integers(0, 10**6))
def test_nearest_code_is_the_argmin_of_the_distance(k, d, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    z, codebook = torch.randn(2, d, h, w, generator=g), torch.randn(k, d, generator=g)
    idx = nearest_code(z, codebook)  # (2, h, w)
    dist = ((z.permute(0, 2, 3, 1)[..., None, :] - codebook) ** 2).sum(-1)  # (2, h, w, k)
    assert idx.shape == (2, h, w)
    chosen = dist.gather(-1, idx[..., None])[..., 0]
    assert torch.all(chosen <= dist.min(-1).values + 1e-5)


def test_a_code_maps_to_itself_and_lookup_inverts_nearest_code():
    codebook = torch.randn(16, 4)
    idx = torch.randint(0, 16, (3, 5, 7))
    z = lookup(idx, codebook)  # (3, 4, 5, 7)
    assert torch.equal(nearest_code(z, codebook), idx)


def test_straight_through_forwards_z_q_and_passes_the_gradient_unchanged():
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q = torch.randn(2, 4, 3, 3)
    out = straight_through(z, z_q)
    assert torch.allclose(out, z_q)
    weight = torch.randn_like(z)
    (out * weight).sum().backward()
    assert torch.equal(z.grad, weight)  # d out / d z = identity


def test_vq_loss_places_beta_on_the_codebook_term_as_diffusers_legacy_does():
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    codes = torch.randn(2, 4, 3, 3, requires_grad=True)
    loss = vq_loss(z, codes, beta=0.25)
    assert torch.allclose(loss, 1.25 * ((z - codes) ** 2).mean())
    loss.backward()
    diff = (z - codes).detach()
    n = z.numel()
    assert torch.allclose(z.grad, 2 * diff / n)  # commitment: weight 1
    assert torch.allclose(codes.grad, -0.25 * 2 * diff / n)  # codebook: weight β


def test_codebook_usage_counts_dead_codes_and_perplexity():
    assert codebook_usage(torch.tensor([0, 1, 2, 3]), 8) == {"perplexity": pytest.approx(4.0), "dead_share": 0.5,
                                                            "used": 4, "codes": 8}
    assert codebook_usage(torch.zeros(10, dtype=torch.long), 4)["perplexity"] == pytest.approx(1.0)


def test_spatial_norm_is_group_norm_scaled_and_shifted_by_the_resized_codes():
    torch.manual_seed(0)
    norm = SpatialNorm(32, 4)
    f, zq = torch.randn(2, 32, 8, 6), torch.randn(2, 4, 4, 3)
    zq_big = zq.repeat_interleave(2, -2).repeat_interleave(2, -1)  # nearest ×2
    expected = (torch.nn.functional.group_norm(f, 32, norm.norm.weight, norm.norm.bias, 1e-6)
                * norm.scale(zq_big) + norm.shift(zq_big))
    assert torch.allclose(norm(f, zq), expected, atol=1e-6)


# ---------------------------------------------------------------------------
# Parity with diffusers

CONFIGS = [
    (MoVQConfig.tiny(), (64, 64)),
    (MoVQConfig(block_out_channels=(32, 64), layers_per_block=2, num_vq_embeddings=64, attention=(True, True)),
     (24, 40)),  # non-square, attention at both levels
    (MoVQConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1, num_vq_embeddings=32, latent_channels=3,
                vq_embed_dim=3, mid_attention=False), (32, 48)),  # 4 levels, 3-wide codes, no mid attention
    (MoVQConfig.tiny(spatial_norm=False), (32, 32)),  # the plain VQGAN decoder (norm_type="group") lesson 07 compares
]


def _pair(config: MoVQConfig, seed: int = 0):
    torch.manual_seed(seed)
    theirs = diffusers.VQModel(**to_diffusers_config(config)).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.05)  # away from the zero/one init, so every weight matters
    return theirs, MoVQ.from_diffusers(theirs).eval()


@pytest.mark.parametrize("config,hw", CONFIGS)
def test_movq_matches_diffusers_vqmodel(config, hw):
    theirs, ours = _pair(config)
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        z_theirs, z_ours = theirs.encode(x).latents, ours.encode(x)
        assert (z_theirs - z_ours).abs().max() <= 1e-5
        plain = theirs.decode(z_theirs, force_not_quantize=True).sample
        assert (plain - ours.decode(z_ours)).abs().max() <= 1e-5
        through = theirs.decode(z_theirs)
        assert (through.sample - ours.decode(z_ours, quantize=True)).abs().max() <= 1e-5
        q_theirs, loss_theirs, (_, _, idx_theirs) = theirs.quantize(z_theirs)
        q_ours, loss_ours, idx_ours = ours.quantize(z_ours)
        assert torch.equal(idx_theirs.view(idx_ours.shape), idx_ours)
        assert (q_theirs - q_ours).abs().max() <= 1e-5 and abs(loss_theirs - loss_ours) <= 1e-5
        full = theirs(x)
        rec, loss = ours(x)
        assert (full.sample - rec).abs().max() <= 1e-5 and (full.commit_loss - loss).abs().max() <= 1e-5


@pytest.mark.parametrize("config,hw", CONFIGS[:2])
def test_round_trip_through_diffusers_names(config, hw):
    theirs, ours = _pair(config, seed=1)
    fresh = diffusers.VQModel(**to_diffusers_config(config)).eval()
    fresh.load_state_dict(ours.to_diffusers_state_dict(), strict=True)
    again = MoVQ.from_diffusers(fresh.state_dict(), config)
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        assert torch.equal(again.decode(again.encode(x)), ours.decode(ours.encode(x)))


@pytest.mark.parametrize("preset,count", [(MoVQConfig.kandinsky2_2, 67_832_495), (MoVQConfig.kandinsky3, 270_669_103)])
def test_full_size_parameter_counts_and_one_to_one_key_map(preset, count):
    config = preset()
    with torch.device("meta"):
        ours = MoVQ(config)
        theirs = diffusers.VQModel(**to_diffusers_config(config))
    assert sum(p.numel() for p in ours.parameters()) == count
    assert sum(p.numel() for p in theirs.parameters()) == count
    pairs = diffusers_key_map(config)
    assert sorted(a for a, _ in pairs) == sorted(ours.state_dict())
    assert sorted(b for _, b in pairs) == sorted(theirs.state_dict())
    assert len({b for _, b in pairs}) == len(pairs)
    shapes_ours, shapes_theirs = ours.state_dict(), theirs.state_dict()
    assert all(shapes_ours[a].shape == shapes_theirs[b].shape for a, b in pairs)


def test_a_published_config_dict_reads_back():
    config = MoVQConfig.kandinsky3()
    from kandlab.movq import config_from_diffusers

    published = {**to_diffusers_config(config), "act_fn": "silu", "scaling_factor": 0.18215, "sample_size": 32}
    assert config_from_diffusers(published) == config


# ---------------------------------------------------------------------------
# Errors that say what to do


def test_loading_a_mismatched_state_dict_lists_the_problem():
    theirs, _ = _pair(CONFIGS[0][0])
    state = dict(theirs.state_dict())
    state.pop("quant_conv.weight")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys: quant_conv.weight[\s\S]*unexpected keys: extra.weight"):
        MoVQ.from_diffusers(state, CONFIGS[0][0])
    wider = MoVQConfig.tiny(num_vq_embeddings=512)
    with pytest.raises(ValueError, match=r"shape mismatches: quantize.embedding.weight"):
        MoVQ.from_diffusers(theirs.state_dict(), wider)
    with pytest.raises(ValueError, match="needs config="):
        MoVQ.from_diffusers(theirs.state_dict())


def test_other_norm_types_are_refused():
    from kandlab.movq import config_from_diffusers

    with pytest.raises(ValueError, match="norm_type='spatial'"):
        config_from_diffusers({**to_diffusers_config(MoVQConfig.tiny()), "norm_type": "layer"})


@pytest.fixture(scope="module")
def tiny():
    return MoVQ(MoVQConfig.tiny()).eval()


def test_image_size_not_divisible_by_the_factor(tiny):
    with pytest.raises(ValueError, match=r"62×64 is not divisible by this MoVQ's downsampling factor 4.*60×64"):
        tiny.encode(torch.zeros(1, 3, 62, 64))


def test_wrong_channel_count_and_missing_batch(tiny):
    with pytest.raises(ValueError, match="expects 3 channels"):
        tiny.encode(torch.zeros(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"x\[None\]"):
        tiny.encode(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="channels-last"):
        tiny.encode(torch.zeros(1, 64, 64, 3))


def test_latents_of_the_wrong_width(tiny):
    with pytest.raises(ValueError, match=r"expects latents \(B, 4, h, w\)"):
        tiny.decode(torch.zeros(1, 8, 16, 16))
    with pytest.raises(ValueError, match="did you pass an image"):
        tiny.decode(torch.zeros(1, 3, 64, 64))


def test_config_refuses_widths_spatial_norm_cannot_group():
    with pytest.raises(ValueError, match="multiples of 32"):
        MoVQConfig(block_out_channels=(48, 64))
