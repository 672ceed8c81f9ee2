"""GaussianDiffusion: forward process statistics, conversions, posterior and samplers.

Parity tests run our samplers and diffusers' DDPMScheduler / DDIMScheduler with
the same deterministic model function and the same generator, and compare the
whole trajectory (every x_t and every x̂₀). To test the sampler arithmetic on its
own, the schedulers are given our ᾱ (the schedules themselves are compared in
test_schedules.py); one end-to-end test also keeps each library's own ᾱ.
"""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from kandlab.diffusion import (
    GaussianDiffusion,
    cfg_eps,
    dynamic_threshold,
    kandinsky3_cfg_eps,
    make_timesteps,
    sample_timesteps,
    static_threshold,
)
from kandlab.schedules import cosine_betas, linear_betas

T = 1000
SHAPE = (2, 3, 4, 4)
DIFFUSERS_NAME = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one intra-op thread avoids thread hand-off costs on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def gd():
    return {"linear": GaussianDiffusion(linear_betas(T)), "cosine": GaussianDiffusion(cosine_betas(T))}


def gaussian_denoiser(alphas_cumprod, data_std=0.5, wiggle=0.1):
    r"""A deterministic "model": the exact E[ε | x_t] for data x0 ~ N(0, data_std²), plus 0.1·sin(t).

    It keeps trajectories bounded (like a trained model) while depending on t non-linearly.
    """

    def model_fn(x_t, t):
        a = alphas_cumprod[t].view(-1, *([1] * (x_t.ndim - 1)))
        eps = (1 - a).sqrt() * x_t / (a * data_std**2 + 1 - a)
        return eps + wiggle * torch.sin(t.float()).view_as(a)

    return model_fn


def make_scheduler(cls, diffusion, schedule, share_alpha_bar=True, **config):
    sched = cls(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAME[schedule], **config)
    if share_alpha_bar:
        sched.alphas_cumprod = diffusion.alphas_cumprod.clone()
        if cls is DDIMScheduler and not config.get("set_alpha_to_one", True):
            sched.final_alpha_cumprod = sched.alphas_cumprod[0]
    return sched


def diffusers_trajectory(sched, model_fn, num_steps, seed, **step_kwargs):
    """The usual diffusers loop; returns [(t, x_t, x0_hat), ...] + the final sample."""
    sched.set_timesteps(num_steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)
    frames = []
    for t in sched.timesteps:
        eps = model_fn(x, torch.full((SHAPE[0],), int(t)))
        out = sched.step(eps, t, x, generator=g, **step_kwargs)
        frames.append((int(t), x, out.pred_original_sample))
        x = out.prev_sample
    return frames, x


def assert_same_trajectory(ours, theirs, atol=1e-5):
    frames, final = theirs
    assert [f.t for f in ours[:-1]] == [t for t, _, _ in frames]
    for mine, (t, x_t, x0_hat) in zip(ours, frames):
        assert torch.allclose(mine.x_t, x_t, rtol=0, atol=atol), f"x_t differs at t={t}"
        assert torch.allclose(mine.x0_hat, x0_hat, rtol=0, atol=atol), f"x0_hat differs at t={t}"
    assert torch.allclose(ours[-1].x_t, final, rtol=0, atol=atol)


# --------------------------------------------------------------------------- buffers


def test_buffers_are_float32_and_exact(gd):
    d = gd["linear"]
    assert d.num_timesteps == T
    betas = linear_betas(T, dtype=torch.float64)
    a_bar = torch.cumprod(1 - betas, 0)
    a_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), a_bar[:-1]])
    expected = {
        "alphas_cumprod": a_bar,
        "sqrt_one_minus_alphas_cumprod": (1 - a_bar).sqrt(),
        "posterior_variance": betas * (1 - a_bar_prev) / (1 - a_bar),
        "posterior_mean_coef1": betas * a_bar_prev.sqrt() / (1 - a_bar),
        "posterior_mean_coef2": (1 - a_bar_prev) * (1 - betas).sqrt() / (1 - a_bar),
    }
    for name, value in expected.items():
        buf = getattr(d, name)
        assert buf.dtype == torch.float32 and buf.shape == (T,)
        assert torch.allclose(buf.double(), value, rtol=1e-6, atol=0), name
    assert d.posterior_variance[0] == 0  # β̃ at the last reverse step: no noise
    assert d.state_dict() == {}  # the schedule is not a learned parameter


# --------------------------------------------------------------------------- forward process


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_sample_moments(gd, schedule):
    d = gd[schedule]
    N = 20_000
    x0 = torch.tensor([-1.0, 0.3, 0.8]).expand(N, 3)  # (N, 3): N draws for each of 3 pixels
    torch.manual_seed(0)
    for t in (0, 100, 500, 999):
        a = d.alphas_cumprod[t].double().item()
        x_t = d.q_sample(x0, torch.full((N,), t)).double()
        mean_err = (x_t.mean(0) - math.sqrt(a) * x0[0]).abs().max().item()
        var_err = (x_t.var(0) - (1 - a)).abs().max().item()
        assert mean_err < 5 * math.sqrt((1 - a) / N), (t, mean_err)
        assert var_err < 5 * math.sqrt(2 / N) * (1 - a), (t, var_err)


def test_closed_form_equals_step_by_step_in_distribution(gd):
    d = gd["linear"]
    N, k = 20_000, 300
    x0 = torch.tensor([-0.7, 0.0, 0.9]).expand(N, 3)
    torch.manual_seed(1)
    x = x0
    for t in range(k + 1):  # x_0 (clean) -> q_step(t=0) -> ... -> x_k
        x = d.q_step(x, t)
    jump = d.q_sample(x0, k)
    a = d.alphas_cumprod[k].double().item()
    for sample in (x.double(), jump.double()):
        assert (sample.mean(0) - math.sqrt(a) * x0[0]).abs().max() < 5 * math.sqrt((1 - a) / N)
        assert (sample.var(0) - (1 - a)).abs().max() < 5 * math.sqrt(2 / N) * (1 - a)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_conversions_invert_q_sample(gd, schedule):
    d = gd[schedule]
    torch.manual_seed(2)
    t = torch.arange(T)  # one sample per timestep
    x0, noise = torch.randn(T, 3, 4, 4), torch.randn(T, 3, 4, 4)
    x_t = d.q_sample(x0, t, noise)
    a = d.alphas_cumprod.double().view(T, 1, 1, 1)
    # float32 rounding of x_t is amplified by 1/sqrt(ᾱ) (resp. 1/sqrt(1-ᾱ)): scale the tolerance
    assert torch.all((d.predict_x0(x_t, t, noise) - x0).abs() <= 4e-6 / a.sqrt())
    assert torch.all((d.predict_eps(x_t, t, x0) - noise).abs() <= 4e-6 / (1 - a).sqrt())
    # v is a rotation of (x0, ε): its inverses are well conditioned at every t
    v = d.predict_v(x0, t, noise)
    assert torch.allclose(d.x0_from_v(x_t, t, v), x0, atol=1e-5)
    assert torch.allclose(d.eps_from_v(x_t, t, v), noise, atol=1e-5)
    ref = make_scheduler(DDPMScheduler, d, schedule)
    assert torch.allclose(v, ref.get_velocity(x0, noise, t), atol=1e-5)
    assert torch.allclose(x_t, ref.add_noise(x0, noise, t), atol=1e-5)


# --------------------------------------------------------------------------- posterior


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_step_matches_diffusers_at_every_timestep(gd, schedule):
    """Each of the 1000 steps of the full schedule, batched as 1000 samples with their own t."""
    d = gd[schedule]
    ref = make_scheduler(DDPMScheduler, d, schedule, clip_sample=False, variance_type="fixed_small")
    torch.manual_seed(3)
    t = torch.arange(T)
    x_t, eps = torch.randn(T, 2, 3, 3), torch.randn(T, 2, 3, 3)
    noise = torch.stack([torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(i)) for i in range(T)])
    ours = d.ddpm_step(eps, t, x_t, noise=noise)
    for i in range(T):
        out = ref.step(eps[i : i + 1], i, x_t[i : i + 1], generator=torch.Generator().manual_seed(i))
        assert torch.allclose(ours.x0_hat[i : i + 1], out.pred_original_sample, rtol=1e-6, atol=1e-6), i
        assert torch.allclose(ours.x_prev[i : i + 1], out.prev_sample, rtol=0, atol=1e-5), i
        if i > 0:
            var = ref._get_variance(i)
            _, ours_var, _ = d.posterior_mean_variance(ours.x0_hat[i : i + 1], x_t[i : i + 1], i, i - 1)
            assert torch.allclose(ours_var.flatten(), var.flatten(), rtol=1e-6)


def test_posterior_exact_buffers_vs_general_form(gd):
    """t_prev=None uses the float64-exact coefficients; the general (ᾱ-ratio) form recovers a
    small β_t from a float32 ratio and so agrees only to ~1e-3 — the same rounding diffusers has."""
    d = gd["linear"]
    torch.manual_seed(4)
    t = torch.arange(1, T)
    x0, x_t = torch.randn(T - 1, 8), torch.randn(T - 1, 8)
    exact, var_exact, logvar_exact = d.posterior_mean_variance(x0, x_t, t)
    general, var_general, _ = d.posterior_mean_variance(x0, x_t, t, t - 1)
    assert torch.allclose(exact, general, atol=3e-3)
    assert torch.allclose(var_exact, var_general, rtol=2e-3)
    assert torch.allclose(logvar_exact, var_exact.log())
    betas = linear_betas(T, dtype=torch.float64)
    a = torch.cumprod(1 - betas, 0)
    c1 = (betas[1:] * a[:-1].sqrt() / (1 - a[1:]))[:, None]
    c2 = ((1 - a[:-1]) * (1 - betas[1:]).sqrt() / (1 - a[1:]))[:, None]
    assert torch.allclose(exact.double(), c1 * x0.double() + c2 * x_t.double(), atol=1e-6)


# --------------------------------------------------------------------------- whole trajectories


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("num_steps", [1000, 50])
def test_ddpm_trajectory_matches_diffusers(gd, schedule, num_steps):
    d = gd[schedule]
    model_fn = gaussian_denoiser(d.alphas_cumprod)
    sched = make_scheduler(DDPMScheduler, d, schedule, clip_sample=False)
    theirs = diffusers_trajectory(sched, model_fn, num_steps, seed=num_steps)
    ours = d.sample(
        model_fn, SHAPE, num_steps=num_steps, generator=torch.Generator().manual_seed(num_steps),
        progress=False, return_trajectory=True,
    )
    assert len(ours) == num_steps + 1 and ours[-1].t == -1
    assert_same_trajectory(ours, theirs)


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_ddpm_respaced_trajectory_matches_diffusers(gd, spacing):
    d = gd["cosine"]
    model_fn = gaussian_denoiser(d.alphas_cumprod)
    sched = make_scheduler(DDPMScheduler, d, "cosine", clip_sample=False, timestep_spacing=spacing)
    theirs = diffusers_trajectory(sched, model_fn, 7, seed=5)
    ours = d.sample(
        model_fn, SHAPE, timesteps=make_timesteps(T, 7, spacing), generator=torch.Generator().manual_seed(5),
        progress=False, return_trajectory=True,
    )
    assert_same_trajectory(ours, theirs)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_trajectory_matches_diffusers(gd, schedule, eta, set_alpha_to_one):
    """Kandinsky 3 setting: leading spacing with steps_offset 1 (the last step jumps from t=1)."""
    d = gd[schedule]
    model_fn = gaussian_denoiser(d.alphas_cumprod)
    sched = make_scheduler(
        DDIMScheduler, d, schedule, clip_sample=False, steps_offset=1, set_alpha_to_one=set_alpha_to_one
    )
    theirs = diffusers_trajectory(sched, model_fn, 50, seed=6, eta=eta)
    ours = d.sample(
        model_fn, SHAPE, timesteps=make_timesteps(T, 50, "leading", steps_offset=1), method="ddim", eta=eta,
        generator=torch.Generator().manual_seed(6), progress=False, return_trajectory=True,
        set_alpha_to_one=set_alpha_to_one,
    )
    assert_same_trajectory(ours, theirs)


def test_set_alpha_to_one_makes_the_last_step_return_x0_hat(gd):
    """With ᾱ_prev = 1 the last DDIM (η=0) step returns its x̂₀; with ᾱ_prev = ᾱ_0 it keeps a little noise."""
    d = gd["linear"]
    model_fn = gaussian_denoiser(d.alphas_cumprod)
    ts = make_timesteps(T, 10, "leading", 1)
    one, first = (
        d.sample(model_fn, SHAPE, ts, method="ddim", generator=torch.Generator().manual_seed(0), progress=False,
                 set_alpha_to_one=flag, return_trajectory=True)
        for flag in (True, False)
    )
    assert torch.equal(one[-1].x_t, one[-2].x0_hat)
    assert (first[-1].x_t - first[-2].x0_hat).abs().max() > 1e-4


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_clip_sample_matches_static_threshold(gd, method):
    """Kandinsky 3's diffusers scheduler: cosine, 25 leading steps, offset 1, clip_sample=True."""
    d = gd["cosine"]
    model_fn = gaussian_denoiser(d.alphas_cumprod, data_std=2.0)  # x̂₀ often outside [-1, 1]
    cls = DDPMScheduler if method == "ddpm" else DDIMScheduler
    sched = make_scheduler(cls, d, "cosine", clip_sample=True, steps_offset=1)
    kwargs = {} if method == "ddpm" else {"eta": 1.0, "use_clipped_model_output": True}
    theirs = diffusers_trajectory(sched, model_fn, 25, seed=7, **kwargs)
    run = dict(
        timesteps=make_timesteps(T, 25, "leading", 1), method=method, eta=kwargs.get("eta", 0.0),
        progress=False, return_trajectory=True,
    )
    ours = d.sample(model_fn, SHAPE, generator=torch.Generator().manual_seed(7), x0_fn=static_threshold, **run)
    assert_same_trajectory(ours, theirs)
    unclipped = d.sample(model_fn, SHAPE, generator=torch.Generator().manual_seed(7), **run)
    assert (unclipped[-1].x_t - ours[-1].x_t).abs().max() > 1e-2, "clipping should have mattered here"


@pytest.mark.parametrize("ratio", [0.9, 0.995])
@pytest.mark.parametrize("max_value", [1.0, 1.5, 3.0])
def test_diffusers_thresholding_matches_dynamic_threshold(gd, ratio, max_value):
    d = gd["cosine"]
    model_fn = gaussian_denoiser(d.alphas_cumprod, data_std=2.0)
    sched = make_scheduler(
        DDPMScheduler, d, "cosine", thresholding=True, dynamic_thresholding_ratio=ratio,
        sample_max_value=max_value, steps_offset=1,
    )
    theirs = diffusers_trajectory(sched, model_fn, 20, seed=8)
    ours = d.sample(
        model_fn, SHAPE, timesteps=make_timesteps(T, 20, "leading", 1), generator=torch.Generator().manual_seed(8),
        x0_fn=lambda x0: dynamic_threshold(x0, ratio, max_value), progress=False, return_trajectory=True,
    )
    assert_same_trajectory(ours, theirs)
    static = d.sample(
        model_fn, SHAPE, timesteps=make_timesteps(T, 20, "leading", 1), generator=torch.Generator().manual_seed(8),
        x0_fn=static_threshold, progress=False,
    )
    if max_value == 1.0:  # diffusers' default sample_max_value: dynamic thresholding is static clipping
        assert torch.equal(ours[-1].x_t, static)
    else:  # s > 1 was reached and rescaled x̂₀ instead of clipping it
        assert (ours[-1].x_t - static).abs().max() > 1e-2


def test_ddim_dynamic_threshold_matches_diffusers(gd):
    """The original Kandinsky 3 sampler: DDIM η=1, dynamic thresholding, ε recomputed from x̂₀."""
    d = gd["cosine"]
    model_fn = gaussian_denoiser(d.alphas_cumprod, data_std=2.0)
    sched = make_scheduler(
        DDIMScheduler, d, "cosine", thresholding=True, dynamic_thresholding_ratio=0.99, sample_max_value=10.0,
        steps_offset=1,
    )
    theirs = diffusers_trajectory(sched, model_fn, 20, seed=9, eta=1.0, use_clipped_model_output=True)
    ours = d.sample(
        model_fn, SHAPE, timesteps=make_timesteps(T, 20, "leading", 1), method="ddim", eta=1.0,
        generator=torch.Generator().manual_seed(9), x0_fn=lambda x0: dynamic_threshold(x0, 0.99),
        progress=False, return_trajectory=True,
    )
    assert_same_trajectory(ours, theirs)


@pytest.mark.parametrize("method,eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_end_to_end_with_each_librarys_own_alpha_bar(gd, method, eta):
    """No shared ᾱ: diffusers' float32 cumprod vs our float64 one; differences stay ~1e-5."""
    d = gd["cosine"]
    model_fn = gaussian_denoiser(d.alphas_cumprod)
    cls = DDPMScheduler if method == "ddpm" else DDIMScheduler
    sched = make_scheduler(cls, d, "cosine", share_alpha_bar=False, clip_sample=False)
    kwargs = {"eta": eta} if method == "ddim" else {}
    theirs = diffusers_trajectory(sched, model_fn, 50, seed=10, **kwargs)
    ours = d.sample(
        model_fn, SHAPE, num_steps=50, method=method, eta=eta, generator=torch.Generator().manual_seed(10),
        progress=False, return_trajectory=True,
    )
    assert_same_trajectory(ours, theirs, atol=5e-5)


@pytest.mark.parametrize("method,steps", [("ddpm", 100), ("ddim", 25)])
def test_samplers_recover_gaussian_data(method, steps):
    """With the exact ε-predictor for x0 ~ N(0.5, 0.3²), samples must have that mean and std."""
    d = GaussianDiffusion(cosine_betas(T))
    m, s = 0.5, 0.3

    def model_fn(x_t, t):
        a = d.alphas_cumprod[t][:, None]
        return (1 - a).sqrt() * (x_t - a.sqrt() * m) / (a * s**2 + 1 - a)

    x = d.sample(model_fn, (4000, 1), num_steps=steps, method=method, generator=torch.Generator().manual_seed(0),
                 progress=False)
    assert abs(x.mean().item() - m) < 0.03
    assert abs(x.std().item() - s) < 0.03


def test_trajectory_is_consistent_with_plain_sample(gd):
    d = gd["linear"]
    model_fn = gaussian_denoiser(d.alphas_cumprod)
    run = dict(num_steps=10, method="ddim", eta=0.5, progress=False)
    x = d.sample(model_fn, SHAPE, generator=torch.Generator().manual_seed(11), **run)
    traj = d.sample(model_fn, SHAPE, generator=torch.Generator().manual_seed(11), return_trajectory=True, **run)
    assert [f.t for f in traj] == make_timesteps(T, 10) + [-1]
    assert torch.equal(traj[-1].x_t, x) and torch.equal(traj[-1].x0_hat, x)
    t0 = torch.full((SHAPE[0],), traj[0].t)
    x_T = traj[0].x_t
    assert torch.allclose(traj[0].x0_hat, d.predict_x0(x_T, t0, model_fn(x_T, t0)), atol=1e-5)


def test_ddim_eta0_is_deterministic_given_x_T(gd):
    d = gd["linear"]
    model_fn = gaussian_denoiser(d.alphas_cumprod)
    a, b = (
        d.sample(model_fn, SHAPE, num_steps=10, method="ddim", generator=torch.Generator().manual_seed(0),
                 progress=False)
        for _ in range(2)
    )
    assert torch.equal(a, b)


def test_start_mean_starts_from_the_forward_marginal():
    """Signal-leak start: x_{t0} = √ᾱ_{t0}·μ + √(1−ᾱ_{t0})·z with the same z as the plain start."""
    d = GaussianDiffusion(cosine_betas(1000))
    seen = []

    def record(x_t, t):
        seen.append((x_t.clone(), int(t[0])))
        return torch.zeros_like(x_t)

    shape = (2, 3, 4, 4)
    d.sample(record, shape, num_steps=5, method="ddim", generator=torch.Generator().manual_seed(3), progress=False)
    z, t0 = seen[0]
    assert t0 == make_timesteps(1000, 5)[0]
    seen.clear()
    mu = torch.tensor([-0.8, 0.1, 0.5]).view(3, 1, 1)  # per channel
    d.sample(record, shape, num_steps=5, method="ddim", generator=torch.Generator().manual_seed(3), progress=False,
             start_mean=mu)
    a = d.alphas_cumprod[t0]
    assert torch.allclose(seen[0][0], a.sqrt() * mu + (1 - a).sqrt() * z, atol=1e-6)
    # the same as noising an image that equals μ everywhere (DDPM eq. 4)
    assert torch.allclose(seen[0][0], d.q_sample(mu.expand(shape), t0, z), atol=1e-6)
    # a plain number works too and shifts every value by the same amount
    seen.clear()
    d.sample(record, shape, num_steps=5, method="ddim", generator=torch.Generator().manual_seed(3), progress=False,
             start_mean=-0.83)
    assert torch.allclose(seen[0][0] - (1 - a).sqrt() * z, (a.sqrt() * -0.83).expand(shape), atol=1e-6)


def test_start_mean_bad_input():
    d = GaussianDiffusion(cosine_betas(100))
    zero = lambda x_t, t: torch.zeros_like(x_t)  # noqa: E731
    with pytest.raises(ValueError, match="does not broadcast"):
        d.sample(zero, (2, 3, 4, 4), num_steps=2, progress=False, start_mean=torch.zeros(4, 1, 1))
    with pytest.raises(ValueError, match="finite"):
        d.sample(zero, (2, 3, 4, 4), num_steps=2, progress=False, start_mean=float("nan"))


# --------------------------------------------------------------------------- loss


def test_loss_is_eps_mse():
    d = GaussianDiffusion(linear_betas(100))
    x0, noise = torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4)
    seen = {}

    def zero_model(x_t, t, context=None):
        seen.update(t=t, context=context)
        return torch.zeros_like(x_t)

    loss = d.loss(zero_model, x0, noise=noise, context="text")
    assert torch.allclose(loss, (noise**2).mean())
    assert seen["context"] == "text"
    assert seen["t"].dtype == torch.long and seen["t"].shape == (8,)
    assert 0 <= seen["t"].min() and seen["t"].max() < 100
    oracle = lambda x_t, t: d.predict_eps(x_t, t, x0)  # noqa: E731 knows x0, hence ε
    assert d.loss(oracle, x0, t=torch.full((8,), 50)).item() < 1e-8
    with pytest.raises(ValueError, match="same shape as x0"):
        d.loss(lambda x_t, t: x_t[:, :1], x0)


def test_min_snr_weighting_follows_eq_7():
    """Min-SNR-γ for ε-prediction: each sample's squared error times min(SNR_t, γ)/SNR_t."""
    d = GaussianDiffusion(cosine_betas(1000))
    x0, noise = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    zero = lambda x_t, t: torch.zeros_like(x_t)  # noqa: E731 error = noise
    t = torch.tensor([0, 10, 100, 400, 800, 999])
    snr = d.alphas_cumprod[t].double() / (1 - d.alphas_cumprod[t].double())
    per_sample = (noise**2).flatten(1).mean(1).double()
    for gamma in (1.0, 5.0, 20.0):
        expected = (torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / snr * per_sample).mean()
        got = d.loss(zero, x0, t=t, noise=noise, min_snr_gamma=gamma)
        assert torch.allclose(got.double(), expected, rtol=1e-5), (gamma, got, expected)
    # noisy steps (SNR <= γ) keep weight 1: the weighted loss equals the plain one there
    noisy = torch.full((6,), 900)
    assert d.snr[900] < 5
    assert torch.allclose(d.loss(zero, x0, t=noisy, noise=noise, min_snr_gamma=5.0),
                          d.loss(zero, x0, t=noisy, noise=noise))
    # nearly clean steps are turned down: t = 0 has SNR in the thousands
    clean = torch.zeros(6, dtype=torch.long)
    plain, weighted = (d.loss(zero, x0, t=clean, noise=noise, min_snr_gamma=g) for g in (None, 5.0))
    assert weighted < plain / 100
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="min_snr_gamma"):
            d.loss(zero, x0, min_snr_gamma=bad)


# --------------------------------------------------------------------------- thresholding

finite_images = st.builds(
    lambda seed, scale: torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(seed)) * scale,
    st.integers(0, 10_000),
    st.floats(0.1, 20.0),
)


@settings(max_examples=30, deadline=None)
@given(x=finite_images, p=st.floats(0.5, 1.0), max_value=st.one_of(st.none(), st.floats(1.0, 10.0)))
def test_dynamic_threshold_properties(x, p, max_value):
    out = dynamic_threshold(x, p, max_value)
    assert out.shape == x.shape and out.abs().max() <= 1.0 + 1e-6
    assert torch.equal(static_threshold(x), x.clamp(-1, 1))
    assert torch.equal(dynamic_threshold(x, p, 1.0), static_threshold(x))  # diffusers' default max 1.0
    # batch independence: changing sample 1 leaves sample 0's output untouched
    y = x.clone()
    y[1] = y[1] * 7 + 3
    assert torch.equal(dynamic_threshold(y, p, max_value)[0], out[0])


def test_dynamic_equals_static_when_percentile_is_inside_range():
    x = torch.rand(2, 1, 10, 10) * 1.8 - 0.9  # |x| < 0.9 ...
    x[:, 0, 0, :3] = torch.tensor([5.0, -3.0, 2.0])  # ... except 3 % outliers beyond 1
    assert torch.quantile(x.reshape(2, -1).abs(), 0.95, dim=1).max() <= 1  # so s = max(q, 1) = 1
    assert torch.equal(dynamic_threshold(x, 0.95), static_threshold(x))
    assert not torch.equal(dynamic_threshold(x, 0.99), static_threshold(x))  # 0.99 reaches an outlier


def test_dynamic_threshold_by_hand():
    x = torch.tensor([[0.5, 2.0, -4.0, 1.0]])
    assert torch.allclose(dynamic_threshold(x, 1.0), torch.tensor([[0.125, 0.5, -1.0, 0.25]]))
    assert torch.allclose(dynamic_threshold(x, 1.0, max_value=2.0), torch.tensor([[0.25, 1.0, -1.0, 0.5]]))
    half = dynamic_threshold(x.half(), 1.0)
    assert half.dtype == torch.float16 and torch.allclose(half.float(), dynamic_threshold(x, 1.0))


@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (2, 16)])
@pytest.mark.parametrize("ratio,max_value", [(0.9, 1.5), (0.995, 1.0), (0.8, 100.0)])
def test_dynamic_threshold_equals_diffusers(shape, ratio, max_value):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 3
    if len(shape) == 2:
        shape, x = shape + (1,), x[..., None]  # diffusers wants (B, C, ...)
    ref = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=max_value)
    assert torch.equal(dynamic_threshold(x, ratio, max_value), ref._threshold_sample(x))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"percentile": 99.5}, "percentile is a fraction: use 0.995 for 99.5 %"),
        ({"percentile": 0.0}, r"\(0, 1\]"),
        ({"percentile": 150.0}, r"\(0, 1\]"),
        ({"max_value": 0.0}, "positive"),
    ],
)
def test_dynamic_threshold_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dynamic_threshold(torch.randn(2, 3), **kwargs)


def test_threshold_shape_errors():
    with pytest.raises(ValueError, match="add a batch dimension"):
        dynamic_threshold(torch.randn(5))
    with pytest.raises(TypeError, match="floating-point"):
        static_threshold(torch.ones(2, 2, dtype=torch.long))


# --------------------------------------------------------------------------- guidance


@settings(max_examples=30, deadline=None)
@given(w=st.floats(0.0, 20.0), seed=st.integers(0, 1000))
def test_cfg_forms_coincide(w, seed):
    g = torch.Generator().manual_seed(seed)
    u, c = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    assert torch.allclose(cfg_eps(u, c, w + 1), kandinsky3_cfg_eps(u, c, w), atol=1e-5 * (1 + w))


def test_cfg_special_scales():
    u, c = torch.randn(2, 8), torch.randn(2, 8)
    assert torch.allclose(cfg_eps(u, c, 1.0), c, atol=1e-6)
    assert torch.equal(cfg_eps(u, c, 0.0), u)
    assert torch.allclose(kandinsky3_cfg_eps(u, c, 0.0), c)
    assert torch.allclose(cfg_eps(u, c, 3.0), c + 2 * (c - u), atol=1e-5)  # extrapolates past ε_c


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda u, c: cfg_eps(u, c, -1.0), ValueError, "negative"),
        (lambda u, c: kandinsky3_cfg_eps(u, c, -0.5), ValueError, "negative"),
        (lambda u, c: cfg_eps(u, c, float("nan")), ValueError, "not finite"),
        (lambda u, c: cfg_eps(u, c, float("inf")), ValueError, "not finite"),
        (lambda u, c: cfg_eps(u, c[:1], 2.0), ValueError, "shape"),
        (lambda u, c: cfg_eps(u, c, torch.tensor(2.0)), TypeError, "number"),
    ],
)
def test_cfg_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(2, 4), torch.randn(2, 4))


# --------------------------------------------------------------------------- timesteps


@settings(max_examples=40, deadline=None)
@given(
    T_=st.sampled_from([1000, 50, 7]),
    frac=st.floats(0.0, 1.0),
    spacing=st.sampled_from(["leading", "trailing", "linspace"]),
    offset=st.integers(0, 1),
)
def test_make_timesteps_matches_set_timesteps(T_, frac, spacing, offset):
    n = max(1, round(frac * T_))
    if spacing != "leading":
        offset = 0  # diffusers applies steps_offset to "leading" only
    elif (n - 1) * (T_ // n) + offset > T_ - 1:
        n = max(1, n - 1)
    ref = DDPMScheduler(num_train_timesteps=T_, timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(n)
    ours = make_timesteps(T_, n, spacing, offset)
    assert len(ours) == n and ours == sorted(set(ours), reverse=True) and 0 <= ours[-1] and ours[0] < T_
    assert ours == ref.timesteps.tolist()[:n]


def test_make_timesteps_examples():
    assert make_timesteps(1000, 4) == [750, 500, 250, 0]
    assert make_timesteps(1000, 4, steps_offset=1) == [751, 501, 251, 1]
    assert make_timesteps(1000, 4, "trailing") == [999, 749, 499, 249]
    assert make_timesteps(1000, 4, "linspace") == [999, 666, 333, 0]
    # diffusers' float arange yields a 62nd timestep, -1, here; we keep exactly 61
    ref = DDPMScheduler(timestep_spacing="trailing")
    ref.set_timesteps(61)
    assert len(ref.timesteps) == 62 and ref.timesteps[-1] == -1
    assert len(make_timesteps(1000, 61, "trailing")) == 61


@pytest.mark.parametrize(
    "args,match",
    [
        ((1000, 0), "between 1 and T"),
        ((1000, 1001), "between 1 and T"),
        ((1000, 1000, "leading", 1), "past the last one"),
        ((1000, 10, "cosine"), "is not one of"),
    ],
)
def test_make_timesteps_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        make_timesteps(*args)


# --------------------------------------------------------------------------- bad inputs to the process


def test_gaussian_diffusion_bad_inputs(gd):
    d = gd["linear"]
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="0-indexed"):
        d.q_sample(x, torch.tensor([0, 1000]))
    with pytest.raises(TypeError, match="integer timesteps"):
        d.q_sample(x, torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"pass shape \(2,\)"):
        d.q_sample(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="noise has shape"):
        d.q_sample(x, 5, torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="floating-point"):
        d.q_sample(x.long(), 5)
    with pytest.raises(ValueError, match="t_prev must be smaller"):
        d.ddim_step(x, 10, x, 10)
    with pytest.raises(ValueError, match="strictly decreasing"):
        d.sample(lambda x_t, t: x_t, (1, 2), timesteps=[0, 10], progress=False)
    with pytest.raises(ValueError, match='"ddpm" or "ddim"'):
        d.sample(lambda x_t, t: x_t, (1, 2), method="euler", progress=False)
    with pytest.raises(ValueError, match="only applies to method='ddim'"):
        d.sample(lambda x_t, t: x_t, (1, 2), eta=1.0, progress=False)
    with pytest.raises(ValueError, match="either timesteps or num_steps"):
        d.sample(lambda x_t, t: x_t, (1, 2), timesteps=[5, 0], num_steps=2, progress=False)
    with pytest.raises(ValueError, match="model_fn must return"):
        d.sample(lambda x_t, t: x_t[:, :1], (1, 2), num_steps=2, progress=False)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        GaussianDiffusion(torch.tensor([0.1, 1.0]))


def test_sample_runs_with_a_progress_bar(gd, capsys):
    d = gd["linear"]
    x = d.sample(gaussian_denoiser(d.alphas_cumprod), (1, 2), num_steps=3, progress=True)
    assert x.shape == (1, 2) and torch.isfinite(x).all()
    assert "ddpm sampling" in capsys.readouterr().err


def test_uniform_timesteps_are_ddpms_draw():
    torch.manual_seed(3)
    expected = torch.randint(0, 1000, (64,))
    torch.manual_seed(3)
    assert torch.equal(sample_timesteps(64, 1000), expected)  # the shipped recipes' t, unchanged


@given(st.floats(-2.0, 2.0))
@settings(max_examples=10, deadline=None)
def test_logit_normal_timesteps_have_the_asked_median(mean):
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(20_000, 1000, "logit_normal", logit_mean=mean, generator=g)
    assert t.dtype == torch.int64 and 0 <= t.min() and t.max() <= 999
    median = 1000 / (1 + math.exp(-mean))  # t/T = sigmoid(u), u ~ N(m, 1): the median is sigmoid(m)·T
    assert abs(t.float().median().item() - median) < 15


def test_logit_normal_with_positive_mean_favours_high_noise():
    g = torch.Generator().manual_seed(0)
    uniform = sample_timesteps(20_000, 1000, generator=g)
    shifted = sample_timesteps(20_000, 1000, "logit_normal", logit_mean=1.0, generator=g)
    assert (shifted >= 700).float().mean() > 1.5 * (uniform >= 700).float().mean()
    assert (shifted < 100).float().mean() < 0.05  # nearly clean steps still appear, rarely


def test_timestep_sampling_refuses_unknown_modes():
    with pytest.raises(ValueError, match="uniform.*logit_normal"):
        sample_timesteps(4, 1000, "lognormal")
    with pytest.raises(ValueError, match="logit_mean"):
        sample_timesteps(4, 1000, "logit_normal", logit_mean=float("nan"))
