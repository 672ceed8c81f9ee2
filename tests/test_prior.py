"""kandlab.prior against its production twins, diffusers' PriorTransformer and UnCLIPScheduler.

Parity: random tiny configs with every weight random (positions, the prd token, LayerNorm gains
and clip_mean / clip_std too), padded batches, several timesteps, fp32, max abs diff ≤ 1e-5.
Full size: parameter counts on the meta device, no download. Sampler: whole trajectories against
a hand-written copy of KandinskyV22PriorPipeline's loop with the same generator.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import PriorTransformer as HFPrior
from diffusers import UnCLIPScheduler
from diffusers.utils.torch_utils import randn_tensor

from kandlab.prior import (
    PriorConfig,
    PriorTransformer,
    UnCLIPSampler,
    diffusers_key_map,
    guided_x0,
    prior_attention_mask,
    prior_model_fn,
    timestep_embedding,
)

TOL = 1e-5
K22_PARAMETERS = 1_026_225_920  # REFERENCE.md; diffusers counts clip_mean / clip_std as parameters

# Varied: heads, head dim (odd widths too), layers, num_embeddings, and the optional parts.
PARITY_CONFIGS = [
    dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=12, num_embeddings=5),
    dict(num_attention_heads=3, attention_head_dim=5, num_layers=3, embedding_dim=10, num_embeddings=7,
         time_embed_act_fn="gelu", time_embed_dim=24),  # inner width 15: odd, the sinusoid gets a zero pad
    dict(num_attention_heads=4, attention_head_dim=4, num_layers=1, embedding_dim=16, num_embeddings=9,
         norm_in_type="layer", embedding_proj_norm_type="layer", embedding_proj_dim=6, clip_embed_dim=20),
]


def hf_random(config: PriorConfig, seed: int = 0) -> HFPrior:
    """A diffusers PriorTransformer of ``config`` with every tensor random (its zeros would hide bugs)."""
    torch.manual_seed(seed)
    model = HFPrior(**config.to_diffusers_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "clip_std":
                p.uniform_(0.5, 2.0)
            elif name.endswith("weight") and "norm" in name:
                p.uniform_(0.5, 1.5)  # LayerNorm gains (default: ones)
            elif name in ("positional_embedding", "prd_embedding", "clip_mean"):
                p.normal_(0.0, 1.0)  # default: zeros
            else:
                p.normal_(0.0, 0.3)
    return model


def inputs(config: PriorConfig, B: int = 3, seed: int = 1):
    """x_t, pooled text, text hidden states and a mask with different padding lengths per row."""
    g = torch.Generator().manual_seed(seed)
    N, D = config.num_embeddings, config.embedding_dim
    x_t = torch.randn(B, D, generator=g)
    proj = torch.randn(B, config.text_embed_dim, generator=g)
    text = torch.randn(B, N, D, generator=g)
    lengths = [N, 2, 1, 0][:B]  # full, short, one token, and (B = 4) all padding
    mask = torch.arange(N)[None, :] < torch.tensor(lengths)[:, None]  # (B, N) bool, right padding
    return x_t, proj, text, mask


def hf_out(model: HFPrior, *args, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(*args, **kwargs).predicted_image_embedding


# ---------------------------------------------------------------------------- parity


@pytest.mark.parametrize("fields", PARITY_CONFIGS)
def test_parity_with_diffusers(fields):
    config = PriorConfig(**fields)
    hf = hf_random(config)
    ours = PriorTransformer.from_diffusers(hf).eval()
    x_t, proj, text, mask = inputs(config, B=4)
    worst = 0.0
    for t in (torch.tensor([999, 500, 17, 0]), 999, torch.tensor(250), torch.tensor([3.5, 0.25, 998.0, 1.0])):
        expected = hf_out(hf, x_t, t, proj, text, mask)
        with torch.no_grad():
            got = ours(x_t, t, proj, text, mask)
        assert got.shape == (4, config.out_dim)
        worst = max(worst, (got - expected).abs().max().item())
    assert worst <= TOL, f"max abs diff {worst:.2e}"


def test_post_process_and_its_inverse():
    config = PriorConfig(**PARITY_CONFIGS[0])
    hf = hf_random(config)
    ours = PriorTransformer.from_diffusers(hf)
    x = torch.randn(5, config.out_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf.post_process_latents(x)
    assert (ours.post_process_latents(x) - expected).abs().max() <= TOL
    assert torch.allclose(ours.pre_process_latents(ours.post_process_latents(x)), x, atol=1e-5)
    fresh = PriorTransformer.from_diffusers(HFPrior(**config.to_diffusers_config()))  # clip_std = 0 there
    with pytest.raises(ValueError, match="set_clip_stats"):
        fresh.pre_process_latents(x)
    fresh.set_clip_stats(x)
    assert torch.allclose(fresh.pre_process_latents(x).mean(0), torch.zeros(config.out_dim), atol=1e-5)


def test_mask_none_means_no_padding_and_stays_causal():
    """diffusers drops the causal mask too when attention_mask is None; kandlab keeps it (documented)."""
    config = PriorConfig(**PARITY_CONFIGS[0])
    hf = hf_random(config)
    ours = PriorTransformer.from_diffusers(hf)
    x_t, proj, text, _ = inputs(config)
    ones = torch.ones(3, config.num_embeddings, dtype=torch.bool)
    with torch.no_grad():
        got = ours(x_t, 10, proj, text, None)
    assert (got - hf_out(hf, x_t, 10, proj, text, ones)).abs().max() <= TOL
    assert (got - hf_out(hf, x_t, 10, proj, text, None)).abs().max() > 1e-3  # diffusers' None: no causal mask


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import Timesteps

    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    for dim in (2, 15, 64):
        expected = Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)(t)
        assert torch.equal(timestep_embedding(t, dim), expected)


# ---------------------------------------------------------------------------- mask


def test_mask_structure_is_padding_plus_causal():
    N, extra = 6, 4
    text_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    bias = prior_attention_mask(text_mask, extra)
    S = N + extra
    assert bias.shape == (3, 1, S, S)
    i = torch.arange(S)[:, None]
    j = torch.arange(S)[None, :]
    for b in range(3):
        padded_key = torch.zeros(S, dtype=torch.bool)
        padded_key[:N] = ~text_mask[b]
        expected = -10000.0 * (j > i).float() + -10000.0 * padded_key[None, :].float()  # (S, S)
        assert torch.equal(bias[b, 0], expected)
    assert torch.equal(bias[0, 0, -1], torch.zeros(S))  # the read-out token sees every real token


def test_padded_text_tokens_do_not_reach_the_output():
    """Changing what sits at padded positions leaves the prediction bit-for-bit unchanged."""
    config = PriorConfig(**PARITY_CONFIGS[1])
    ours = PriorTransformer.from_diffusers(hf_random(config))
    x_t, proj, text, mask = inputs(config)
    other = text.clone()
    other[~mask] = torch.randn(int((~mask).sum()), config.embedding_dim) * 100
    with torch.no_grad():
        assert torch.equal(ours(x_t, 5, proj, text, mask), ours(x_t, 5, proj, other, mask))
        changed = text.clone()
        changed[0, 0] += 1.0  # a real token: the output must move
        assert not torch.equal(ours(x_t, 5, proj, text, mask), ours(x_t, 5, proj, changed, mask))


# ---------------------------------------------------------------------------- loading


def test_state_dict_round_trip():
    config = PriorConfig(**PARITY_CONFIGS[2])
    hf = hf_random(config)
    ours = PriorTransformer.from_diffusers(hf)
    theirs = hf.state_dict()
    back = ours.to_diffusers_state_dict()
    assert set(back) == set(theirs)
    assert all(torch.equal(back[k], theirs[k]) for k in theirs)
    # from a plain state dict + a diffusers config dict, then into a fresh diffusers model
    again = PriorTransformer.from_diffusers(theirs, config=dict(hf.config))
    fresh = HFPrior(**config.to_diffusers_config()).eval()
    fresh.load_state_dict(again.to_diffusers_state_dict(), strict=True)
    x_t, proj, text, mask = inputs(config)
    assert torch.equal(hf_out(fresh, x_t, 7, proj, text, mask), hf_out(hf, x_t, 7, proj, text, mask))
    # clip statistics stay buffers; the other tensors are parameters
    assert {n for n, _ in again.named_buffers()} == {"clip_mean", "clip_std"}
    assert len(list(again.parameters())) == len(diffusers_key_map(config)) - 2


def test_loading_errors_list_the_keys():
    config = PriorConfig(**PARITY_CONFIGS[0])
    sd = dict(hf_random(config).state_dict())
    with pytest.raises(ValueError, match="needs config"):
        PriorTransformer.from_diffusers(sd)
    broken = dict(sd)
    broken.pop("transformer_blocks.1.attn1.to_q.weight")
    broken["transformer_blocks.1.attn2.to_q.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        PriorTransformer.from_diffusers(broken, config)
    text = str(err.value)
    assert "missing keys (1)" in text and "transformer_blocks.1.attn1.to_q.weight" in text
    assert "unexpected keys (1)" in text and "transformer_blocks.1.attn2.to_q.weight" in text
    wider = PriorConfig(**{**PARITY_CONFIGS[0], "num_embeddings": 8})
    with pytest.raises(ValueError, match=r"(?s)shape mismatches \(1\).*positional_embedding: checkpoint \(1, 9, 16\) "
                                         r"vs kandlab \(1, 12, 16\)"):
        PriorTransformer.from_diffusers(sd, wider)
    deeper = PriorConfig(**{**PARITY_CONFIGS[0], "num_layers": 3})
    with pytest.raises(ValueError, match=r"(?s)missing keys \(\d+\).*transformer_blocks\.2\."):
        PriorTransformer.from_diffusers(sd, deeper)
    with pytest.raises(TypeError, match="state dict"):
        PriorTransformer.from_diffusers([1, 2, 3])


def test_config_conversion_and_checks():
    hf = HFPrior(**PriorConfig.tiny().to_diffusers_config())
    assert PriorConfig.from_diffusers_config(hf.config) == PriorConfig.tiny()
    assert PriorConfig.from_diffusers_config({"_class_name": "PriorTransformer"}) == PriorConfig()
    with pytest.raises(ValueError, match="unknown PriorTransformer config keys"):
        PriorConfig.from_diffusers_config({"num_heads": 4})
    with pytest.raises(ValueError, match="Shap-E"):
        PriorConfig(added_emb_type=None)
    with pytest.raises(ValueError, match="exactly 4"):
        PriorConfig(additional_embeddings=0)
    with pytest.raises(ValueError, match="time_embed_act_fn"):
        PriorConfig(time_embed_act_fn="tanh")


# ---------------------------------------------------------------------------- full size on meta


def test_kandinsky2_2_parameter_count_on_meta():
    config = PriorConfig.kandinsky2_2()
    assert (config.num_attention_heads, config.attention_head_dim, config.num_layers) == (32, 64, 20)
    assert (config.embedding_dim, config.num_embeddings, config.additional_embeddings) == (1280, 77, 4)
    with torch.device("meta"):
        hf = HFPrior(**config.to_diffusers_config())
        ours = PriorTransformer(config)
    n_hf = sum(p.numel() for p in hf.parameters())
    n_ours = sum(p.numel() for p in ours.parameters())
    n_stats = sum(b.numel() for b in ours.buffers())
    assert n_hf == K22_PARAMETERS
    assert n_ours + n_stats == K22_PARAMETERS and n_stats == 2 * 1280  # clip_mean / clip_std are buffers here
    loaded = PriorTransformer.from_diffusers(hf)  # the key map fits at full size (meta: no memory)
    assert sum(p.numel() for p in loaded.parameters()) == n_ours


# ---------------------------------------------------------------------------- bad input


def test_bad_inputs_say_what_to_pass():
    config = PriorConfig(**PARITY_CONFIGS[0])
    ours = PriorTransformer(config)
    x_t, proj, text, mask = inputs(config)
    with pytest.raises(ValueError, match=r"hidden_states .* must have shape \(B, 12\)"):
        ours(torch.randn(3, 11), 1, proj, text, mask)
    with pytest.raises(ValueError, match=r"proj_embedding .* \(3, 12\)"):
        ours(x_t, 1, torch.randn(3, 8), text, mask)
    with pytest.raises(ValueError, match="longer than the 5.*max_length=5"):
        ours(x_t, 1, proj, torch.randn(3, 6, 12), mask)
    with pytest.raises(ValueError, match="shorter than the 5"):
        ours(x_t, 1, proj, torch.randn(3, 4, 12), mask)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        ours(x_t, 1, proj, text, mask[:, :4])
    with pytest.raises(ValueError, match="bool"):
        ours(x_t, 1, proj, text, mask.float())
    with pytest.raises(ValueError, match="timestep has shape"):
        ours(x_t, torch.tensor([1, 2]), proj, text, mask)
    with pytest.raises(ValueError, match="fractional"):
        ours(x_t, 2.5, proj, text, mask)
    sampler = UnCLIPSampler()
    for steps in (0, 1, -3, 1001):
        with pytest.raises(ValueError, match="steps="):
            sampler.timesteps(steps)
    with pytest.raises(ValueError, match="steps="):
        sampler.sample(lambda x, t: x, (2, 4), steps=0)
    with pytest.raises(ValueError, match=r"\(4, 3\) \(\[unconditional; text\] rows"):
        sampler.sample(lambda x, t: x[:2], (2, 3), steps=3, guidance_scale=4.0)


# ---------------------------------------------------------------------------- sampler


def unclip_scheduler() -> UnCLIPScheduler:
    """The Kandinsky 2.2 prior's scheduler settings (REFERENCE.md)."""
    return UnCLIPScheduler(num_train_timesteps=1000, variance_type="fixed_small_log", clip_sample=True,
                           clip_sample_range=10.0, prediction_type="sample")


def diffusers_loop(model_fn, shape, steps, seed, guidance_scale=None):
    """KandinskyV22PriorPipeline's denoising loop (pipeline_kandinsky2_2_prior.py), written out."""
    scheduler = unclip_scheduler()
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    generator = torch.Generator().manual_seed(seed)
    latents = randn_tensor(shape, generator=generator, dtype=torch.float32) * scheduler.init_noise_sigma
    frames = []
    for i, t in enumerate(timesteps):
        model_in = latents if guidance_scale is None else torch.cat([latents] * 2)
        pred = model_fn(model_in, t.expand(model_in.shape[0]))
        if guidance_scale is not None:
            uncond, text = pred.chunk(2)
            pred = uncond + guidance_scale * (text - uncond)
        prev_timestep = None if i + 1 == timesteps.shape[0] else timesteps[i + 1]
        frames.append(latents)
        latents = scheduler.step(pred, timestep=t, sample=latents, generator=generator,
                                 prev_timestep=prev_timestep).prev_sample
    return frames + [latents]


def test_timesteps_match_set_timesteps():
    sampler, scheduler = UnCLIPSampler(), unclip_scheduler()
    for n in (2, 3, 7, 25, 64, 100, 999, 1000):
        scheduler.set_timesteps(n)
        assert sampler.timesteps(n) == scheduler.timesteps.tolist()
    assert sampler.timesteps(25)[:3] == [999, 957, 916] and sampler.timesteps(25)[-2:] == [42, 0]


def test_schedule_is_diffusers_bit_for_bit():
    sampler, scheduler = UnCLIPSampler(), unclip_scheduler()
    assert torch.equal(sampler.betas, scheduler.betas)
    assert torch.equal(sampler.alphas_cumprod, scheduler.alphas_cumprod)


def test_25_step_trajectory_with_the_tiny_prior_and_guidance():
    config = PriorConfig(**PARITY_CONFIGS[0])
    prior = PriorTransformer.from_diffusers(hf_random(config)).eval()
    B = 2
    x_t, proj, text, mask = inputs(config, B=2 * B, seed=4)  # rows 0-1 "unconditional", rows 2-3 "text"
    model_fn = prior_model_fn(prior, proj, text, mask)
    expected = diffusers_loop(model_fn, (B, config.embedding_dim), 25, seed=11, guidance_scale=4.0)
    got = UnCLIPSampler().sample(model_fn, (B, config.embedding_dim), steps=25, guidance_scale=4.0,
                                 generator=torch.Generator().manual_seed(11), return_trajectory=True)
    assert len(got) == 26 and got[0].t == 999 and got[-2].t == 0 and got[-1].t == -1
    worst = max((frame.x_t - ref).abs().max().item() for frame, ref in zip(got, expected))
    assert worst <= TOL, f"max abs diff over the trajectory {worst:.2e}"


@pytest.mark.parametrize("steps", [2, 25, 1000])
def test_trajectory_with_a_fixed_linear_map(steps):
    """A model whose x̂₀ often exceeds ±10, so the clipping is exercised; 1000 steps uses β_t itself."""
    g = torch.Generator().manual_seed(5)
    W = torch.randn(16, 16, generator=g)
    bias = torch.randn(16, generator=g)

    def model_fn(x, t):
        return 20 * torch.tanh(x @ W / 4 + bias) + t.float()[:, None] / 200

    expected = diffusers_loop(model_fn, (3, 16), steps, seed=6)[-1]
    got = UnCLIPSampler().sample(model_fn, (3, 16), steps=steps, generator=torch.Generator().manual_seed(6))
    assert (got - expected).abs().max() <= TOL


def test_final_sample_stays_within_the_clip_range():
    got = UnCLIPSampler().sample(lambda x, t: 1e3 * torch.sign(x), (4, 32), steps=25,
                                 generator=torch.Generator().manual_seed(7))
    assert got.abs().max() <= 10.0
    # the last step is x_0 = β₀/(1 − ᾱ₀) · clip(x̂₀): 0.99947, not 1, in float32
    sampler = UnCLIPSampler()
    last = sampler.step(torch.full((1, 3), 50.0), 0, torch.randn(1, 3), -1).x_prev
    assert torch.allclose(last, torch.full((1, 3), 10.0 * 0.99947), atol=1e-4)


def test_one_step_with_the_true_x0_contracts_toward_it():
    sampler = UnCLIPSampler()
    g = torch.Generator().manual_seed(8)
    x0 = torch.randn(4, 64, generator=g)
    for t, t_prev in ((999, 957), (500, 458), (42, 0), (1, 0), (300, 299), (5, 4)):
        a, a_prev = sampler.alphas_cumprod[t], sampler.alphas_cumprod[t_prev]
        eps = torch.randn(4, 64, generator=g)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps  # DDPM eq. 4
        x_prev = sampler.step(x0, t, x_t, t_prev, noise=torch.zeros_like(x_t)).x_prev
        assert ((x_prev - x0).norm(dim=1) < (x_t - x0).norm(dim=1)).all()
        # In exact arithmetic the signal part becomes √ᾱ′·x0 and the noise part shrinks by c < 1
        # (μ̃ = √ᾱ′·x0 + c·√(1−ᾱ)·ε). In float32 it holds to ~1e-4: a small β recovered from a ratio
        # of ᾱs near 1 (or β_t next to the float32 cumprod ᾱ) loses digits, as in the scheduler.
        c = (a / a_prev).sqrt() * (1 - a_prev) / (1 - a)
        assert 0 < c < 1
        assert torch.allclose(x_prev - a_prev.sqrt() * x0, c * (x_t - a.sqrt() * x0), atol=1e-3)


def test_guidance_formula():
    u, c = torch.randn(2, 5), torch.randn(2, 5)
    assert torch.allclose(guided_x0(u, c, 4.0), u + 4.0 * (c - u))
    assert torch.allclose(guided_x0(u, c, 1.0), c)
    assert torch.equal(guided_x0(u, c, 0.0), u)
