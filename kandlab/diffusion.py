r"""Gaussian diffusion: the forward process, its posterior, the loss and the samplers.

Read top to bottom:

1. helpers that check a timestep tensor and broadcast a per-step constant;
2. thresholding of the predicted clean image :math:`\hat x_0` (static and
   Imagen's dynamic) and classifier-free guidance — plain functions;
3. ``make_timesteps``: which of the T training steps a sampler visits;
4. ``GaussianDiffusion``: q(x_t | x_0), ε / x₀ / v conversions, the posterior
   q(x_{t'} | x_t, x_0), the "simple" ε-loss, one DDPM step, one DDIM step, and
   the sampling loop.

Notation (DDPM, Ho et al. 2020): :math:`\bar\alpha_t = \prod_{s\le t}(1-\beta_s)`,
:math:`x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon`.
Timesteps are 0-indexed: ``t = 0`` is the paper's :math:`t = 1` and ``t = -1``
stands for the clean image (:math:`\bar\alpha = 1`).

The samplers read only :math:`\bar\alpha` and do their arithmetic at run time in
the dtype of the stored buffers (float32), operation for operation like
diffusers' ``DDPMScheduler.step`` and ``DDIMScheduler.step``; this is what lets
the trajectories agree with diffusers to ~1e-6.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from kandlab.schedules import alpha_bar as _alpha_bar_of

__all__ = [
    "GaussianDiffusion",
    "StepOutput",
    "TrajectoryStep",
    "make_timesteps",
    "static_threshold",
    "dynamic_threshold",
    "out_of_range",
    "overshoot",
    "saturation",
    "cfg_eps",
    "kandinsky3_cfg_eps",
    "min_snr_weight",
]

ModelFn = Callable[[Tensor, Tensor], Tensor]  # (x_t (B, ...), t (B,)) -> eps_hat (B, ...)
X0Fn = Callable[[Tensor], Tensor]  # x0_hat (B, ...) -> processed x0_hat (B, ...)


class StepOutput(NamedTuple):
    """Result of one reverse step: the less noisy sample and the x̂₀ it was built from."""

    x_prev: Tensor  # (B, ...) sample at the previous (less noisy) timestep
    x0_hat: Tensor  # (B, ...) predicted clean sample, after x0_fn


class TrajectoryStep(NamedTuple):
    """One frame of a sampling trajectory; ``t = -1`` marks the final sample."""

    t: int
    x_t: Tensor  # (B, ...) on the CPU
    x0_hat: Tensor  # (B, ...) on the CPU


# --------------------------------------------------------------------------- helpers


def _check_tensor(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor with the batch first, e.g. (B, C, H, W); got {type(x).__name__}"
        )
    if x.ndim < 1:
        raise ValueError(f"{name} must have a batch dimension first, e.g. (B, C, H, W); got a 0-d tensor")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}; call .float() first")


def _check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_b} has shape {tuple(b.shape)} but {name_a} has shape {tuple(a.shape)}; they must be equal"
        )


def _broadcast(values: Tensor, ndim: int) -> Tensor:
    """(B,) -> (B, 1, ..., 1) so a per-sample constant multiplies a (B, ...) tensor."""
    return values.reshape(values.shape[0], *([1] * (ndim - 1)))


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Standard normal noise drawn on the generator's device (like diffusers' randn_tensor)."""
    rand_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=rand_device).to(device)


# --------------------------------------------------------------------------- thresholding


def static_threshold(x0_hat: Tensor, max_value: float = 1.0) -> Tensor:
    r"""Clip the **predicted clean image** :math:`\hat x_0` to ``[-max_value, max_value]``.

    This acts on x̂₀, not on the predicted noise: the sampler then builds the
    next x_t from the clipped x̂₀ (DDPM's ``clip_sample``, diffusers
    ``clip_sample_range``). Shape is kept: (B, ...) -> (B, ...).
    """
    _check_tensor(x0_hat, "x0_hat")
    if not (max_value > 0 and math.isfinite(max_value)):
        raise ValueError(f"max_value={max_value} must be a positive number (images live in [-1, 1]: use 1.0)")
    return x0_hat.clamp(-max_value, max_value)


def dynamic_threshold(x0_hat: Tensor, percentile: float = 0.995, max_value: float | None = None) -> Tensor:
    r"""Imagen's dynamic thresholding (Saharia et al. 2022, §2.3) of the **predicted clean image**.

    Per sample, :math:`s` is the ``percentile`` quantile of :math:`|\hat x_0|`
    over all of its pixels and channels; :math:`s \leftarrow \max(s, 1)` (and
    :math:`\min(s, \text{max\_value})` if given); then
    :math:`\hat x_0 \leftarrow \mathrm{clamp}(\hat x_0, -s, s) / s`.
    Saturated pixels are pushed inwards instead of being flattened at ±1, which
    is what lets large guidance scales work. Acts on x̂₀, never on the noise.

    With ``max_value=1.0`` (diffusers' default ``sample_max_value``) s is always
    1 and this is exactly ``static_threshold``. Shape kept: (B, ...) -> (B, ...).
    """
    _check_tensor(x0_hat, "x0_hat")
    if x0_hat.ndim < 2:
        raise ValueError(
            f"x0_hat has shape {tuple(x0_hat.shape)}; dynamic thresholding needs a batch of samples (B, ...), "
            "one threshold per sample: add a batch dimension with x0_hat[None]"
        )
    if 1 < percentile <= 100:
        raise ValueError(
            f"percentile={percentile}: percentile is a fraction: use {percentile / 100:g} for {percentile:g} %"
        )
    if not (0 < percentile <= 1):
        raise ValueError(f"percentile={percentile} must lie in (0, 1]; Imagen uses 0.995, Kandinsky 3 uses 0.99")
    if max_value is not None and not (max_value > 0 and math.isfinite(max_value)):
        raise ValueError(f"max_value={max_value} must be a positive number or None (DeepFloyd IF stage I uses 1.5)")

    dtype = x0_hat.dtype
    B = x0_hat.shape[0]
    flat = x0_hat.reshape(B, -1)  # (B, N), N = C·H·W
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # torch.quantile needs float32/64
    s = torch.quantile(flat.abs(), percentile, dim=1)  # (B,) per-sample percentile of |x0_hat|
    s = s.clamp(min=1.0)  # s = max(s, 1): never expand a sample that is already in range
    if max_value is not None:
        s = s.clamp(max=max_value)
    s = s[:, None]  # (B, 1)
    out = torch.clamp(flat, -s, s) / s  # (B, N) Imagen §2.3
    return out.reshape(x0_hat.shape).to(dtype)


def _check_measured(x: Tensor, name: str) -> Tensor:
    """Checks shared by the range measures; returns x as (B, N) float."""
    _check_tensor(x, name)
    if x.ndim < 2:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}; pass a batch of images (B, C, H, W) — one fraction per "
            f"image — e.g. {name}[None] for a single image"
        )
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); there is nothing to measure")
    if torch.isnan(x).any():
        raise ValueError(f"{name} contains NaN: the sampler diverged; the range measures need finite or ±inf values")
    return x.reshape(x.shape[0], -1)  # (B, N)


def out_of_range(x: Tensor, limit: float = 1.0) -> Tensor:
    r"""Per-sample fraction of values **outside** the image range: :math:`|x| > \text{limit}` (strictly).

    Use it *before* any clamp — on x̂₀ or on the unclamped final sample of
    ``sample(..., return_trajectory=True)`` — to see how far a sampler overshoots
    [-1, 1]. A value exactly at ±limit is inside. (B, ...) -> (B,) in [0, 1].
    """
    flat = _check_measured(x, "x")
    if not (limit > 0 and math.isfinite(limit)):
        raise ValueError(f"limit={limit} must be a positive number; images live in [-1, 1]: use 1.0")
    return (flat.abs() > limit).float().mean(dim=1)


def overshoot(x: Tensor, limit: float = 1.0) -> Tensor:
    r"""Per-sample **mean excess** beyond the image range: :math:`\operatorname{mean}\,\max(|x| - \text{limit}, 0)`.

    `out_of_range` counts how many values cross ±limit, however slightly; this measures how
    far they go. A ±1 background that overshoots by a hair (|x| = 1.01) adds almost nothing,
    a prediction that blows up to |x| = 5 adds 4 per value. Use it before any clamp, like
    `out_of_range`. (B, ...) -> (B,), in the units of x (0 when every value is inside).
    """
    flat = _check_measured(x, "x")
    if not (limit > 0 and math.isfinite(limit)):
        raise ValueError(f"limit={limit} must be a positive number; images live in [-1, 1]: use 1.0")
    return (flat.abs() - limit).clamp(min=0).float().mean(dim=1)


def saturation(images: Tensor, tol: float = 0.02) -> Tensor:
    r"""Per-sample fraction of values pinned at the edge of [-1, 1] or beyond: :math:`|x| \ge 1 - \text{tol}`.

    Meant for final images *after* the clamp to [-1, 1]: every value that
    overshot is now exactly ±1, so this counts overshoot plus values that really
    are extreme. ``tol=0`` counts only exact ±1 (and beyond); the default 0.02 is
    about 2.5 levels of an 8-bit pixel. Compare with the training data: a world
    of pure colours on black (the shapes) is fully saturated by design, natural
    photos are not. (B, ...) -> (B,) in [0, 1].
    """
    flat = _check_measured(images, "images")
    if not (0 <= tol < 1):
        raise ValueError(f"tol={tol} must lie in [0, 1): the distance from ±1 that still counts as saturated, e.g. 0.02")
    return (flat.abs() >= 1 - tol).float().mean(dim=1)


# --------------------------------------------------------------------------- classifier-free guidance


def _check_guidance(value: float, name: str, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value} is not finite; {hint}")
    if value < 0:
        raise ValueError(f"{name}={value} is negative, which pushes samples *away* from the prompt; {hint}")


def cfg_eps(eps_uncond: Tensor, eps_cond: Tensor, scale: float) -> Tensor:
    r"""Classifier-free guidance (Ho & Salimans 2022, eq. 6 in ε form).

    :math:`\hat\varepsilon = \varepsilon_u + s\,(\varepsilon_c - \varepsilon_u)`.
    ``scale=0`` is unconditional, ``scale=1`` conditional only, ``scale>1``
    exaggerates the difference the prompt makes. Shapes: (B, ...) each.
    """
    _check_tensor(eps_uncond, "eps_uncond")
    _check_tensor(eps_cond, "eps_cond")
    _check_same_shape(eps_uncond, eps_cond, "eps_uncond", "eps_cond")
    _check_guidance(scale, "scale", "use scale >= 0 (1 = no guidance, 3-10 is typical)")
    return eps_uncond + scale * (eps_cond - eps_uncond)


def kandinsky3_cfg_eps(eps_uncond: Tensor, eps_cond: Tensor, w: float) -> Tensor:
    r"""Classifier-free guidance as written in Kandinsky 3: :math:`(w+1)\,\varepsilon_c - w\,\varepsilon_u`.

    The same as :func:`cfg_eps` with ``scale = w + 1``: ``w=0`` means no
    guidance. Kandinsky 3 uses w = 3.0. Shapes: (B, ...) each.
    """
    _check_tensor(eps_uncond, "eps_uncond")
    _check_tensor(eps_cond, "eps_cond")
    _check_same_shape(eps_uncond, eps_cond, "eps_uncond", "eps_cond")
    _check_guidance(w, "w", "use w >= 0 (0 = no guidance; Kandinsky 3 uses 3.0; cfg_eps scale = w + 1)")
    return (w + 1) * eps_cond - w * eps_uncond


# --------------------------------------------------------------------------- timesteps


def make_timesteps(
    T: int,
    num_steps: int,
    spacing: Literal["leading", "trailing", "linspace"] = "leading",
    steps_offset: int = 0,
) -> list[int]:
    """Which of the T training timesteps a ``num_steps``-step sampler visits, in decreasing order.

    Matches diffusers ``set_timesteps`` (Lin et al. 2023, Table 2):

    * ``"leading"``: 0, k, 2k, … with k = T // num_steps, plus ``steps_offset``
      (Kandinsky 3 uses 1); never reaches T-1 unless k = 1.
    * ``"trailing"``: counts down from T-1 in steps of T / num_steps (rounded),
      so the first step always starts from (almost) pure noise.
    * ``"linspace"``: num_steps evenly spaced values from 0 to T-1 (rounded).
    """
    for name, value in (("T", T), ("num_steps", num_steps), ("steps_offset", steps_offset)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if T < 1:
        raise ValueError(f"T={T}: the number of training timesteps must be at least 1")
    if not (1 <= num_steps <= T):
        raise ValueError(f"num_steps={num_steps} must lie between 1 and T={T} (a sampler cannot visit more steps)")
    if steps_offset < 0:
        raise ValueError(f"steps_offset={steps_offset} must be >= 0")
    if spacing == "leading":
        k = T // num_steps
        ts = [i * k + steps_offset for i in range(num_steps)]
    elif spacing == "trailing":
        # numpy's float arange, as diffusers, so that round-half cases agree. For some
        # num_steps (e.g. T=1000, num_steps=61) that arange yields one extra value that
        # becomes timestep -1 in diffusers; we keep exactly num_steps values.
        ratio = T / num_steps
        ts = (np.round(np.arange(T, 0, -ratio)).astype(np.int64) - 1)[:num_steps].tolist()
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, num_steps).round().astype(np.int64).tolist()
    else:
        raise ValueError(f'spacing={spacing!r} is not one of "leading", "trailing", "linspace"')
    ts = sorted(ts, reverse=True)
    if ts[0] >= T:
        raise ValueError(
            f"steps_offset={steps_offset} pushes the first timestep to {ts[0]}, past the last one (T-1={T - 1}); "
            "use fewer steps or steps_offset=0"
        )
    return ts


TimestepSampling = Literal["uniform", "logit_normal"]


def sample_timesteps(
    batch: int,
    num_timesteps: int,
    sampling: TimestepSampling = "uniform",
    logit_mean: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Training timesteps :math:`t \in \{0, \dots, T-1\}`, one per sample: (batch,) int64.

    ``"uniform"``: DDPM's Algorithm 1, :math:`t \sim \mathcal{U}\{0, T-1\}` (the default).
    ``"logit_normal"``: :math:`t/T = \sigma(u),\ u \sim \mathcal{N}(m, 1)` -- the logit-normal
    sampling of Esser et al. 2024 (SD3, §3.1) on the discrete DDPM grid. Its median is
    :math:`\sigma(m)\,T`; ``logit_mean`` :math:`m > 0` trains more often at high noise,
    where a picture's layout (which group goes where, how many objects) is decided.
    """
    check_timestep_sampling(sampling, logit_mean)
    if sampling == "uniform":
        return torch.randint(0, num_timesteps, (batch,), generator=generator)
    u = torch.randn(batch, generator=generator) + logit_mean  # (B,)
    return (torch.sigmoid(u) * num_timesteps).long().clamp(max=num_timesteps - 1)


def check_timestep_sampling(sampling: str, logit_mean: float) -> None:
    """Refuse a sampling mode `sample_timesteps` does not know, or a non-finite logit mean."""
    if sampling not in ("uniform", "logit_normal"):
        raise ValueError(f"timestep sampling must be 'uniform' or 'logit_normal', got {sampling!r}")
    if not math.isfinite(logit_mean):
        raise ValueError(f"logit_mean must be a finite number (0: SD3's median T/2; 1: median 0.73·T), got {logit_mean}")


def min_snr_weight(snr: Tensor, gamma: float) -> Tensor:
    r"""Min-SNR-γ loss weight for ε-prediction (Hang et al. 2023, eq. 7):
    :math:`w_t = \min(\mathrm{SNR}_t, \gamma)/\mathrm{SNR}_t`. ``snr``: (B,) → (B,).

    Noisy steps (SNR ≤ γ, where the layout of a picture is decided) keep weight 1;
    nearly clean steps, whose tiny noise dominates the plain ε-loss, are turned down.
    """
    _check_min_snr_gamma(gamma)
    return snr.clamp(max=gamma) / snr


def _check_min_snr_gamma(gamma: float) -> None:
    if not (gamma > 0 and math.isfinite(gamma)):
        raise ValueError(f"min_snr_gamma={gamma} must be a positive number (the paper uses 5) or None")


# --------------------------------------------------------------------------- the diffusion process


class GaussianDiffusion(nn.Module):
    r"""The DDPM forward process and its reverse samplers for a fixed β schedule.

    ``betas``: (T,) tensor, e.g. ``cosine_betas(1000)``. Every per-timestep
    constant is computed once in float64 and stored as a float32 buffer named
    after its expression (so ``.to(device)`` moves them with the module).
    """

    def __init__(self, betas: Tensor) -> None:
        super().__init__()
        betas = betas.detach().cpu().double()
        alphas_cumprod = _alpha_bar_of(betas)  # checks 0 < β < 1; (T,)
        alphas = 1.0 - betas
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        # Posterior q(x_{t-1} | x_t, x_0) = N(coef1·x_0 + coef2·x_t, β̃_t) (DDPM eq. 6-7).
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)  # β̃_t, "fixed_small"
        buffers = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            "snr": alphas_cumprod / (1 - alphas_cumprod),  # SNR(t) = ᾱ_t / (1 − ᾱ_t)
            "posterior_variance": posterior_variance,
            "posterior_log_variance": posterior_variance.clamp(min=1e-20).log(),  # β̃_0 = 0
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
            "posterior_mean_coef2": (1 - alphas_cumprod_prev) * alphas.sqrt() / (1 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    @property
    def num_timesteps(self) -> int:
        """T, the number of training timesteps."""
        return self.betas.shape[0]

    # ----------------------------------------------------------------- boundary checks

    def _timesteps(self, t: int | Tensor, batch: int, name: str = "t", allow_clean: bool = False) -> Tensor:
        """Check ``t`` and return it as a LongTensor (B,) on the buffers' device."""
        T = self.num_timesteps
        low = -1 if allow_clean else 0
        if isinstance(t, bool):
            raise TypeError(f"{name} must be an int or a LongTensor of shape (B,), got a bool")
        if isinstance(t, int):
            t = torch.full((batch,), t, dtype=torch.long)
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be an int or a LongTensor of shape (B,), got {type(t).__name__}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer timesteps (torch.long), got {t.dtype}; use t.long()")
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but the batch has {batch} samples; pass shape ({batch},)"
            )
        if t.numel() and (t.min() < low or t.max() > T - 1):
            extra = " (or -1 for the clean image)" if allow_clean else ""
            raise ValueError(
                f"{name} must lie in [0, {T - 1}]{extra} for this {T}-step schedule; got values in "
                f"[{t.min().item()}, {t.max().item()}] (timesteps are 0-indexed)"
            )
        return t.to(device=self.betas.device, dtype=torch.long)

    def _at(self, buffer: Tensor, t: Tensor, ndim: int) -> Tensor:
        return _broadcast(buffer[t], ndim)  # (B, 1, ..., 1)

    def _signal_noise(self, x: Tensor, t: int | Tensor) -> tuple[Tensor, Tensor]:
        """Check t against the batch of x and return (√ᾱ_t, √(1-ᾱ_t)), each (B, 1, ..., 1)."""
        t = self._timesteps(t, x.shape[0])
        return self._at(self.sqrt_alphas_cumprod, t, x.ndim), self._at(self.sqrt_one_minus_alphas_cumprod, t, x.ndim)

    def _alpha_bar_prev(self, t_prev: Tensor, ndim: int, final_alpha_bar: Tensor) -> Tensor:
        """ᾱ at t_prev, with t_prev = -1 meaning "the clean image" (ᾱ = final_alpha_bar)."""
        a = torch.where(t_prev >= 0, self.alphas_cumprod[t_prev.clamp(min=0)], final_alpha_bar)
        return _broadcast(a, ndim)

    # ----------------------------------------------------------------- forward process

    def q_sample(self, x0: Tensor, t: int | Tensor, noise: Tensor | None = None) -> Tensor:
        r"""Jump straight to step t: :math:`x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon`.

        DDPM eq. 4. x0: (B, ...); t: LongTensor (B,) or one int for the whole
        batch; noise: like x0 (drawn if None). Returns x_t: (B, ...).
        """
        _check_tensor(x0, "x0")
        if noise is None:
            noise = torch.randn_like(x0)
        _check_same_shape(x0, noise, "x0", "noise")
        sqrt_alpha_bar, sqrt_one_minus_alpha_bar = self._signal_noise(x0, t)
        return sqrt_alpha_bar * x0 + sqrt_one_minus_alpha_bar * noise  # DDPM eq. 4

    def q_step(self, x_prev: Tensor, t: int | Tensor, noise: Tensor | None = None) -> Tensor:
        r"""One forward step: :math:`x_t = \sqrt{1-\beta_t}\,x_{t-1} + \sqrt{\beta_t}\,\varepsilon` (DDPM eq. 2).

        Applying it for t = 0, 1, …, k gives x_k with the same distribution as ``q_sample(x0, k)``.
        """
        _check_tensor(x_prev, "x_prev")
        if noise is None:
            noise = torch.randn_like(x_prev)
        _check_same_shape(x_prev, noise, "x_prev", "noise")
        t = self._timesteps(t, x_prev.shape[0])
        beta = self._at(self.betas, t, x_prev.ndim)  # (B, 1, ..., 1)
        return (1 - beta).sqrt() * x_prev + beta.sqrt() * noise  # DDPM eq. 2

    # ----------------------------------------------------------------- ε / x0 / v conversions

    def predict_x0(self, x_t: Tensor, t: int | Tensor, eps: Tensor) -> Tensor:
        r"""Predicted clean sample :math:`\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\varepsilon)/\sqrt{\bar\alpha_t}`.

        DDPM eq. 4 solved for x_0 (eq. 15). All shapes (B, ...); t: LongTensor (B,) or an int.
        """
        _check_tensor(x_t, "x_t")
        _check_same_shape(x_t, eps, "x_t", "eps")
        sqrt_alpha_bar, sqrt_one_minus_alpha_bar = self._signal_noise(x_t, t)
        return (x_t - sqrt_one_minus_alpha_bar * eps) / sqrt_alpha_bar

    def predict_eps(self, x_t: Tensor, t: int | Tensor, x0: Tensor) -> Tensor:
        r"""DDPM eq. 4 solved for ε: :math:`\varepsilon = (x_t - \sqrt{\bar\alpha_t}\,x_0) / \sqrt{1-\bar\alpha_t}`."""
        _check_tensor(x_t, "x_t")
        _check_same_shape(x_t, x0, "x_t", "x0")
        sqrt_alpha_bar, sqrt_one_minus_alpha_bar = self._signal_noise(x_t, t)
        return (x_t - sqrt_alpha_bar * x0) / sqrt_one_minus_alpha_bar

    def predict_v(self, x0: Tensor, t: int | Tensor, eps: Tensor) -> Tensor:
        r"""Velocity target (Salimans & Ho 2022, §4).

        :math:`v = \sqrt{\bar\alpha_t}\,\varepsilon - \sqrt{1-\bar\alpha_t}\,x_0`: a rotation of (x_0, ε),
        so x_0 and ε can both be recovered from (x_t, v) without dividing by a small number.
        """
        _check_tensor(x0, "x0")
        _check_same_shape(x0, eps, "x0", "eps")
        sqrt_alpha_bar, sqrt_one_minus_alpha_bar = self._signal_noise(x0, t)
        return sqrt_alpha_bar * eps - sqrt_one_minus_alpha_bar * x0

    def x0_from_v(self, x_t: Tensor, t: int | Tensor, v: Tensor) -> Tensor:
        r""":math:`\hat x_0 = \sqrt{\bar\alpha_t}\,x_t - \sqrt{1-\bar\alpha_t}\,v`."""
        _check_tensor(x_t, "x_t")
        _check_same_shape(x_t, v, "x_t", "v")
        sqrt_alpha_bar, sqrt_one_minus_alpha_bar = self._signal_noise(x_t, t)
        return sqrt_alpha_bar * x_t - sqrt_one_minus_alpha_bar * v

    def eps_from_v(self, x_t: Tensor, t: int | Tensor, v: Tensor) -> Tensor:
        r""":math:`\hat\varepsilon = \sqrt{1-\bar\alpha_t}\,x_t + \sqrt{\bar\alpha_t}\,v`."""
        _check_tensor(x_t, "x_t")
        _check_same_shape(x_t, v, "x_t", "v")
        sqrt_alpha_bar, sqrt_one_minus_alpha_bar = self._signal_noise(x_t, t)
        return sqrt_one_minus_alpha_bar * x_t + sqrt_alpha_bar * v

    # ----------------------------------------------------------------- posterior

    def posterior_mean_variance(
        self, x0: Tensor, x_t: Tensor, t: int | Tensor, t_prev: int | Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        r"""Mean, variance and log-variance of :math:`q(x_{t'} \mid x_t, x_0)` (DDPM eq. 6-7).

        With ``t_prev=None`` (t' = t-1) the precomputed float64-exact buffers are used:
        :math:`\tilde\mu = \frac{\sqrt{\bar\alpha_{t-1}}\beta_t}{1-\bar\alpha_t}x_0
        + \frac{\sqrt{\alpha_t}(1-\bar\alpha_{t-1})}{1-\bar\alpha_t}x_t`,
        :math:`\tilde\beta_t = \frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}\beta_t`.

        With an explicit ``t_prev`` < t (a respaced schedule; -1 = clean image) the
        same formulas hold with the *effective* step
        :math:`\alpha' = \bar\alpha_t / \bar\alpha_{t'}`, :math:`\beta' = 1 - \alpha'`,
        computed at run time from the float32 ᾱ exactly as diffusers'
        ``DDPMScheduler.step`` does. (Recovering a small β' from a float32 ratio
        loses digits: for t' = t-1 this differs from the exact buffers by up to ~1e-3.)
        The variance is clamped at 1e-20 so its log is finite.

        Shapes: x0, x_t (B, ...) -> mean (B, ...), variance and log_variance (B, 1, ..., 1).
        """
        _check_tensor(x_t, "x_t")
        _check_same_shape(x_t, x0, "x_t", "x0")
        B, nd = x_t.shape[0], x_t.ndim
        t = self._timesteps(t, B)
        if t_prev is None:
            mean = self._at(self.posterior_mean_coef1, t, nd) * x0 + self._at(self.posterior_mean_coef2, t, nd) * x_t
            return mean, self._at(self.posterior_variance, t, nd), self._at(self.posterior_log_variance, t, nd)

        t_prev = self._timesteps(t_prev, B, name="t_prev", allow_clean=True)
        if torch.any(t_prev >= t):
            raise ValueError("t_prev must be smaller than t: the reverse process goes from noisy to clean")
        alpha_bar_t = self._at(self.alphas_cumprod, t, nd)  # (B, 1, ..., 1)
        alpha_bar_prev = self._alpha_bar_prev(t_prev, nd, self.alphas_cumprod.new_ones(()))
        alpha_t = alpha_bar_t / alpha_bar_prev  # effective α' for the jump t -> t_prev
        beta_t = 1 - alpha_t
        coef_x0 = alpha_bar_prev**0.5 * beta_t / (1 - alpha_bar_t)  # DDPM eq. 7
        coef_xt = alpha_t**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
        mean = coef_x0 * x0 + coef_xt * x_t
        variance = ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t).clamp(min=1e-20)  # β̃, "fixed_small"
        return mean, variance, variance.log()

    # ----------------------------------------------------------------- training

    def loss(
        self,
        model: Callable[..., Tensor],
        x0: Tensor,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        min_snr_gamma: float | None = None,
        **model_kwargs,
    ) -> Tensor:
        r"""The "simple" loss (DDPM eq. 14): :math:`\lVert\varepsilon - \varepsilon_\theta(x_t, t)\rVert^2`.

        t is drawn uniformly from {0, …, T-1} per sample if None; extra keyword
        arguments (e.g. the text embedding) are passed to ``model(x_t, t, **model_kwargs)``.
        Returns the mean squared error, a scalar.

        ``min_snr_gamma=γ`` weighs each sample's error by :func:`min_snr_weight`
        (Min-SNR-γ, Hang et al. 2023); ``None`` (the default) is DDPM's unweighted loss.
        """
        _check_tensor(x0, "x0")
        if min_snr_gamma is not None:
            _check_min_snr_gamma(min_snr_gamma)  # before the forward pass, not after it
        B = x0.shape[0]
        if t is None:
            t = sample_timesteps(B, self.num_timesteps).to(x0.device)
        t = self._timesteps(t, B)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)  # (B, ...)
        eps_hat = model(x_t, t.to(x0.device), **model_kwargs)
        if not isinstance(eps_hat, Tensor) or eps_hat.shape != x0.shape:
            got = tuple(eps_hat.shape) if isinstance(eps_hat, Tensor) else type(eps_hat).__name__
            raise ValueError(f"the model must return ε̂ with the same shape as x0 {tuple(x0.shape)}, got {got}")
        if min_snr_gamma is None:
            return F.mse_loss(eps_hat, noise)
        per_sample = (eps_hat - noise).pow(2).flatten(1).mean(1)  # (B,)
        weight = min_snr_weight(self.snr[t], min_snr_gamma)  # (B,)
        return (weight.to(per_sample.dtype) * per_sample).mean()

    # ----------------------------------------------------------------- reverse steps

    def _x0_hat(self, eps: Tensor, alpha_bar_t: Tensor, x_t: Tensor, x0_fn: X0Fn | None) -> Tensor:
        x0_hat = (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t**0.5  # DDPM eq. 15
        if x0_fn is not None:
            x0_hat = x0_fn(x0_hat)  # e.g. static_threshold or dynamic_threshold
            if not isinstance(x0_hat, Tensor) or x0_hat.shape != x_t.shape:
                raise ValueError("x0_fn must return a tensor of the same shape as x0_hat")
        return x0_hat

    def _check_step_inputs(self, eps: Tensor, x_t: Tensor, noise: Tensor | None) -> None:
        _check_tensor(x_t, "x_t")
        _check_tensor(eps, "eps")
        _check_same_shape(x_t, eps, "x_t", "eps")
        if noise is not None:
            _check_same_shape(x_t, noise, "x_t", "noise")

    def ddpm_step(
        self,
        eps: Tensor,
        t: int | Tensor,
        x_t: Tensor,
        t_prev: int | Tensor | None = None,
        noise: Tensor | None = None,
        x0_fn: X0Fn | None = None,
    ) -> StepOutput:
        r"""One ancestral DDPM step x_t -> x_{t'} (DDPM Algorithm 2, with the posterior of eq. 6-7).

        1. :math:`\hat x_0` from ε (eq. 15), then ``x0_fn`` (thresholding acts here, on x̂₀);
        2. :math:`x_{t'} = \tilde\mu(\hat x_0, x_t) + \sqrt{\tilde\beta}\,z` with ``z = noise``;
           no noise is added at t = 0 (the last step of a full schedule).

        ``t_prev`` defaults to t-1; pass the next timestep of a respaced schedule
        (-1 after the last one). Equals diffusers ``DDPMScheduler.step`` with
        ``variance_type="fixed_small"``.
        """
        self._check_step_inputs(eps, x_t, noise)
        B, nd = x_t.shape[0], x_t.ndim
        t = self._timesteps(t, B)
        t_prev = t - 1 if t_prev is None else self._timesteps(t_prev, B, name="t_prev", allow_clean=True)
        x0_hat = self._x0_hat(eps, self._at(self.alphas_cumprod, t, nd), x_t, x0_fn)
        mean, variance, _ = self.posterior_mean_variance(x0_hat, x_t, t, t_prev)
        if not torch.any(t > 0):
            return StepOutput(mean, x0_hat)  # the last step of a full schedule adds no noise
        if noise is None:
            noise = torch.randn_like(x_t)
        nonzero = _broadcast(t > 0, nd)  # (B, 1, ..., 1): no noise for samples already at t = 0
        x_prev = torch.where(nonzero, mean + variance**0.5 * noise, mean)
        return StepOutput(x_prev, x0_hat)

    def ddim_step(
        self,
        eps: Tensor,
        t: int | Tensor,
        x_t: Tensor,
        t_prev: int | Tensor,
        eta: float = 0.0,
        noise: Tensor | None = None,
        x0_fn: X0Fn | None = None,
        set_alpha_to_one: bool = True,
    ) -> StepOutput:
        r"""One DDIM step x_t -> x_{t'} (Song et al. 2021, eq. 12 with σ from eq. 16).

        .. math::

            x_{t'} = \sqrt{\bar\alpha_{t'}}\,\hat x_0
                   + \sqrt{1-\bar\alpha_{t'}-\sigma^2}\,\hat\varepsilon + \sigma z, \qquad
            \sigma = \eta\sqrt{\frac{1-\bar\alpha_{t'}}{1-\bar\alpha_t}
                               \Big(1-\frac{\bar\alpha_t}{\bar\alpha_{t'}}\Big)}

        ``eta=0`` is deterministic DDIM, ``eta=1`` matches DDPM's variance. If
        ``x0_fn`` is given (thresholding of x̂₀), ε̂ is recomputed from the
        processed x̂₀ so the update stays consistent, as GLIDE, the original
        Kandinsky 3 sampler and diffusers (``use_clipped_model_output=True``) do.
        ``t_prev = -1`` means the clean image: ᾱ = 1 if ``set_alpha_to_one``
        else ᾱ_0 (diffusers' ``final_alpha_cumprod``).
        """
        self._check_step_inputs(eps, x_t, noise)
        if not (eta >= 0 and math.isfinite(eta)):
            raise ValueError(f"eta={eta} must be >= 0 (0 = deterministic DDIM, 1 = DDPM-like noise)")
        B, nd = x_t.shape[0], x_t.ndim
        t = self._timesteps(t, B)
        t_prev = self._timesteps(t_prev, B, name="t_prev", allow_clean=True)
        if torch.any(t_prev >= t):
            raise ValueError("t_prev must be smaller than t: the reverse process goes from noisy to clean")
        final = self.alphas_cumprod.new_ones(()) if set_alpha_to_one else self.alphas_cumprod[0]
        alpha_bar_t = self._at(self.alphas_cumprod, t, nd)  # (B, 1, ..., 1)
        alpha_bar_prev = self._alpha_bar_prev(t_prev, nd, final)

        x0_hat = self._x0_hat(eps, alpha_bar_t, x_t, x0_fn)
        if x0_fn is not None:
            eps = (x_t - alpha_bar_t**0.5 * x0_hat) / (1 - alpha_bar_t) ** 0.5  # ε̂ consistent with x̂₀
        variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)  # eq. 16 / η²
        sigma = eta * variance**0.5
        direction = (1 - alpha_bar_prev - sigma**2).clamp(min=0) ** 0.5 * eps  # "direction pointing to x_t"
        x_prev = alpha_bar_prev**0.5 * x0_hat + direction  # eq. 12
        if eta > 0:
            if noise is None:
                noise = torch.randn_like(x_t)
            x_prev = x_prev + sigma * noise
        return StepOutput(x_prev, x0_hat)

    # ----------------------------------------------------------------- sampling loop

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        shape: tuple[int, ...],
        timesteps: list[int] | None = None,
        num_steps: int | None = None,
        method: Literal["ddpm", "ddim"] = "ddpm",
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        x0_fn: X0Fn | None = None,
        progress: bool = True,
        return_trajectory: bool = False,
        set_alpha_to_one: bool = True,
        start_mean: float | Tensor | None = None,
    ) -> Tensor | list[TrajectoryStep]:
        r"""Generate samples of ``shape`` = (B, ...) starting from pure noise :math:`x_T \sim \mathcal N(0, I)`.

        ``model_fn(x_t, t) -> eps`` with x_t (B, ...) and t a LongTensor (B,);
        wrap guidance inside it (see :func:`cfg_eps`). The visited timesteps are
        ``timesteps`` if given (decreasing), else ``make_timesteps(T, num_steps)``
        ("leading" spacing; all T steps if ``num_steps`` is None). Each step goes
        to the next timestep in the list, the last one to the clean image.

        ``start_mean`` (the data mean μ: a number, or a tensor broadcastable to one
        image, e.g. per channel (C, 1, 1)) starts from the true marginal's mean instead of 0,
        :math:`x_{t_0} = \sqrt{\bar\alpha_{t_0}}\,\mu + \sqrt{1-\bar\alpha_{t_0}}\,z` at the
        first visited step t₀ ("signal leak", Everaert et al. 2024). A network
        trained on data whose mean is far from 0 (the shapes world is 83 % black
        background) reads the global mean of x_t as evidence about the image; pure
        N(0, I) noise then looks like a bright picture and the sampler draws too
        much foreground. ``None`` (the default) starts from N(0, I) like diffusers.

        Noise is drawn from ``generator`` in this order: x_T, then one tensor per
        DDPM step with t > 0 (per DDIM step if eta > 0) — the same order as a
        diffusers loop with the same generator.

        Returns the final sample (B, ...), or with ``return_trajectory=True`` a
        list of ``TrajectoryStep(t, x_t, x0_hat)`` (on the CPU), one per step plus a
        last entry ``(-1, x_0, x_0)`` holding the final sample.
        """
        if method not in ("ddpm", "ddim"):
            raise ValueError(f'method={method!r} must be "ddpm" or "ddim"')
        if not (eta >= 0 and math.isfinite(eta)):
            raise ValueError(f"eta={eta} must be >= 0 (0 = deterministic DDIM, 1 = DDPM-like noise)")
        if method == "ddpm" and eta != 0.0:
            raise ValueError("eta only applies to method='ddim'; DDPM always uses the posterior variance")
        timesteps = self._sampling_timesteps(timesteps, num_steps)
        shape = tuple(shape)
        if len(shape) < 1 or any((not isinstance(n, int)) or n < 1 for n in shape):
            raise ValueError(f"shape={shape} must be a tuple of positive ints, batch first, e.g. (4, 3, 32, 32)")

        device = self.betas.device
        B = shape[0]
        x = _randn(shape, generator, device)  # x_T ~ N(0, I)
        if start_mean is not None:
            x = self._leaky_start(x, timesteps[0], start_mean)
        trajectory: list[TrajectoryStep] = []
        for i, t in enumerate(tqdm(timesteps, desc=f"{method} sampling", disable=not progress)):
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            t_batch = torch.full((B,), t, dtype=torch.long, device=device)
            eps = model_fn(x, t_batch)
            if not isinstance(eps, Tensor) or eps.shape != x.shape:
                got = tuple(eps.shape) if isinstance(eps, Tensor) else type(eps).__name__
                raise ValueError(f"model_fn must return ε̂ with the same shape as x_t {shape}, got {got}")
            if method == "ddpm":
                noise = _randn(shape, generator, device) if t > 0 else None
                out = self.ddpm_step(eps, t_batch, x, t_prev, noise=noise, x0_fn=x0_fn)
            else:
                noise = _randn(shape, generator, device) if eta > 0 else None
                out = self.ddim_step(eps, t_batch, x, t_prev, eta, noise, x0_fn, set_alpha_to_one)
            if return_trajectory:
                trajectory.append(TrajectoryStep(t, x.detach().cpu(), out.x0_hat.detach().cpu()))
            x = out.x_prev
        if return_trajectory:
            trajectory.append(TrajectoryStep(-1, x.detach().cpu(), x.detach().cpu()))
            return trajectory
        return x

    def _leaky_start(self, z: Tensor, t0: int, mean: float | Tensor) -> Tensor:
        """x_{t0} = √ᾱ_{t0}·μ + √(1 − ᾱ_{t0})·z: `q_sample` of a picture that is μ everywhere (DDPM eq. 4)."""
        mean = torch.as_tensor(mean, dtype=z.dtype, device=z.device)
        if not torch.isfinite(mean).all():
            raise ValueError("start_mean must be finite: pass the data mean, e.g. -0.83 for the shapes world")
        try:
            mu = mean.expand(z.shape[1:])  # (C, H, W)
        except RuntimeError:
            raise ValueError(
                f"start_mean has shape {tuple(mean.shape)}, which does not broadcast to one image {tuple(z.shape[1:])}; "
                "pass a number or a per-channel tensor of shape (C, 1, 1)"
            ) from None
        return self.q_sample(mu.expand_as(z), t0, z)

    def _sampling_timesteps(self, timesteps: list[int] | Tensor | None, num_steps: int | None) -> list[int]:
        T = self.num_timesteps
        if timesteps is None:
            return make_timesteps(T, T if num_steps is None else num_steps)
        if num_steps is not None:
            raise ValueError("pass either timesteps or num_steps, not both")
        ts = [int(v) for v in (timesteps.tolist() if isinstance(timesteps, Tensor) else timesteps)]
        if not ts:
            raise ValueError("timesteps is empty; use make_timesteps(T, num_steps)")
        if any(a <= b for a, b in zip(ts, ts[1:])):
            raise ValueError(f"timesteps must be strictly decreasing (noisy to clean), got {ts[:5]}...")
        if ts[0] > T - 1 or ts[-1] < 0:
            raise ValueError(f"timesteps must lie in [0, {T - 1}], got values from {ts[-1]} to {ts[0]}")
        return ts
