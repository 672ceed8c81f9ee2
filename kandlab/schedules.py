r"""Noise schedules: how much noise the forward process adds at each step.

A schedule is a vector of variances :math:`\beta_1, \dots, \beta_T` (stored
0-indexed as ``betas[0] … betas[T-1]``). Everything else follows from it:

.. math::

    \alpha_t = 1 - \beta_t, \qquad
    \bar\alpha_t = \prod_{s \le t} \alpha_s, \qquad
    \mathrm{SNR}(t) = \frac{\bar\alpha_t}{1 - \bar\alpha_t}.

Two schedules are used by the Kandinsky family:

* **linear** (DDPM, Ho et al. 2020 §4; Kandinsky 2.0): β from 1e-4 to 0.02 over
  1000 steps. Equal to diffusers ``DDPMScheduler(beta_schedule="linear")``.
* **cosine** (Nichol & Dhariwal 2021, eq. 17; Kandinsky 3): ᾱ follows a squared
  cosine, so the SNR falls more gently and the last steps are not wasted on
  pure noise. Equal to diffusers ``beta_schedule="squaredcos_cap_v2"``.

Schedules are computed in float64 and returned as float32 (or the ``dtype``
asked for), so they are computed once, accurately, and stored compactly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["linear_betas", "cosine_betas", "alpha_bar", "snr", "snr_db"]


def _check_num_timesteps(T: int) -> None:
    if isinstance(T, bool) or not isinstance(T, int):
        raise TypeError(f"T (the number of diffusion steps) must be an int, got {type(T).__name__}; e.g. T=1000")
    if T < 1:
        raise ValueError(f"T (the number of diffusion steps) must be at least 1, got {T}; DDPM uses T=1000")


def _check_beta(name: str, value: float) -> None:
    if not (0.0 < value < 1.0):
        raise ValueError(
            f"{name}={value} is not a valid noise variance: each β_t must lie strictly between 0 and 1 "
            "(DDPM uses beta_start=1e-4, beta_end=0.02)"
        )


def linear_betas(
    T: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    r"""Linearly increasing variances :math:`\beta_t` (DDPM §4, Kandinsky 2.0).

    Returns a tensor of shape ``(T,)``. The defaults are the paper's.
    """
    _check_num_timesteps(T)
    _check_beta("beta_start", beta_start)
    _check_beta("beta_end", beta_end)
    if beta_end < beta_start:
        raise ValueError(
            f"beta_end={beta_end} is smaller than beta_start={beta_start}: the forward process should add "
            "more noise as t grows; swap them"
        )
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)  # (T,)
    return betas.to(dtype)


def cosine_betas(
    T: int = 1000,
    s: float = 0.008,
    max_beta: float = 0.999,
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    r"""Cosine schedule (Nichol & Dhariwal 2021, eq. 17), diffusers' ``squaredcos_cap_v2``.

    .. math::

        f(t) = \cos^2\!\Big(\frac{t/T + s}{1 + s}\cdot\frac{\pi}{2}\Big), \qquad
        \bar\alpha_t = \frac{f(t)}{f(0)}, \qquad
        \beta_t = \min\Big(1 - \frac{\bar\alpha_t}{\bar\alpha_{t-1}},\ \text{max\_beta}\Big).

    The small offset ``s`` keeps β tiny near t = 0; ``max_beta`` < 1 avoids the
    singularity at t = T where f(T) = 0. Returns a tensor of shape ``(T,)``.
    """
    _check_num_timesteps(T)
    if not (s >= 0.0 and math.isfinite(s)):
        raise ValueError(f"s={s}: the cosine offset must be a small non-negative number (the paper uses 0.008)")
    _check_beta("max_beta", max_beta)
    t = torch.arange(T + 1, dtype=torch.float64) / T  # (T+1,) in [0, 1]
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2  # eq. 17; f(0) cancels in the ratio below
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)  # (T,)
    return betas.to(dtype)


def betas_by_name(name: str, T: int = 1000) -> Tensor:
    """The schedule a recipe or model card names: ``"cosine"`` or ``"linear"``, T steps (float64)."""
    if name == "cosine":
        return cosine_betas(T)
    if name == "linear":
        return linear_betas(T)
    raise ValueError(f"unknown schedule {name!r}; use 'cosine' or 'linear'")


def alpha_bar(betas: Tensor) -> Tensor:
    r""":math:`\bar\alpha_t = \prod_{s \le t} (1 - \beta_s)` (DDPM eq. 4), same shape and dtype as ``betas``."""
    if not isinstance(betas, Tensor):
        raise TypeError(f"betas must be a torch.Tensor of shape (T,), got {type(betas).__name__}")
    if betas.ndim != 1 or betas.numel() == 0:
        raise ValueError(f"betas must be a non-empty 1-D tensor of shape (T,), got shape {tuple(betas.shape)}")
    if not torch.all((betas > 0) & (betas < 1)):
        bad = betas[~((betas > 0) & (betas < 1))][0].item()
        raise ValueError(
            f"every β_t must lie strictly between 0 and 1 (found {bad}); build betas with linear_betas or cosine_betas"
        )
    return torch.cumprod(1 - betas.double(), dim=0).to(betas.dtype)  # (T,)


def snr(alpha_bar: Tensor) -> Tensor:
    r"""Signal-to-noise ratio :math:`\bar\alpha_t / (1 - \bar\alpha_t)` of :math:`x_t` (Kingma et al. 2021).

    Takes ᾱ (not β): call ``snr(alpha_bar(betas))``. Same shape and dtype as the input.
    """
    if not isinstance(alpha_bar, Tensor):
        raise TypeError(f"alpha_bar must be a torch.Tensor, got {type(alpha_bar).__name__}")
    if not torch.all((alpha_bar > 0) & (alpha_bar <= 1)):
        raise ValueError(
            "alpha_bar values must lie in (0, 1]; did you pass betas? use snr(alpha_bar(betas))"
        )
    a = alpha_bar.double()
    return (a / (1 - a)).to(alpha_bar.dtype)


def snr_db(alpha_bar: Tensor) -> Tensor:
    r"""SNR in decibels, :math:`10 \log_{10} \mathrm{SNR}(t)`: 0 dB is where signal and noise are equal."""
    return (10 * torch.log10(snr(alpha_bar).double())).to(alpha_bar.dtype)
