"""Noise schedules: parity with diffusers, the cosine formula, SNR, and bad inputs."""

import math

import pytest
import torch
from diffusers import DDPMScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from kandlab.schedules import alpha_bar, cosine_betas, linear_betas, snr, snr_db

SCHEDULES = [("linear", linear_betas), ("squaredcos_cap_v2", cosine_betas)]


@pytest.mark.parametrize("T", [1000, 50, 7])
@pytest.mark.parametrize("name,make", SCHEDULES)
def test_betas_and_alpha_bar_match_diffusers(name, make, T):
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=name)
    betas = make(T)
    assert betas.dtype == torch.float32 and betas.shape == (T,)
    assert torch.allclose(betas, ref.betas, rtol=0, atol=1e-6)
    # diffusers takes the cumulative product in float32, we in float64: equal to ~1e-7
    assert torch.allclose(alpha_bar(betas), ref.alphas_cumprod, rtol=0, atol=1e-6)


def test_linear_endpoints_are_the_papers():
    betas = linear_betas(dtype=torch.float64)
    assert betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert torch.all(betas[1:] > betas[:-1])


def test_cosine_alpha_bar_follows_eq17():
    T, s = 1000, 0.008
    a = alpha_bar(cosine_betas(T, s, dtype=torch.float64))
    t = torch.arange(1, T + 1, dtype=torch.float64) / T
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    # eq. 17 holds exactly until the cap at max_beta bites on the very last step
    assert torch.allclose(a[:-1], (f / f0)[:-1], rtol=1e-10, atol=0)
    assert cosine_betas(T, dtype=torch.float64)[-1].item() == pytest.approx(0.999)


def test_dtype_argument():
    assert linear_betas(10, dtype=torch.float64).dtype == torch.float64
    assert cosine_betas(10, dtype=torch.float64).dtype == torch.float64
    assert alpha_bar(linear_betas(10, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("name,make", SCHEDULES)
def test_snr_decreases_and_db_is_log(name, make):
    a = alpha_bar(make(1000))
    r = snr(a)
    assert torch.all(r[1:] < r[:-1]), "more noise at every step means a strictly falling SNR"
    assert torch.allclose(snr_db(a).double(), 10 * torch.log10(r.double()), rtol=1e-6)


def test_snr_values():
    a = torch.tensor([0.5, 0.8, 0.2], dtype=torch.float64)
    assert torch.allclose(snr(a), torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64))
    assert snr_db(torch.tensor([0.5]))[0].item() == pytest.approx(0.0, abs=1e-6)


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 2000))
def test_schedules_are_valid_for_any_T(T):
    for betas in (linear_betas(T), cosine_betas(T)):
        assert betas.shape == (T,)
        assert torch.all((betas > 0) & (betas <= 0.999))
        a = alpha_bar(betas)
        assert torch.all((a > 0) & (a < 1))
        assert torch.all(a[1:] < a[:-1])


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: linear_betas(0), ValueError, "at least 1"),
        (lambda: cosine_betas(-3), ValueError, "at least 1"),
        (lambda: linear_betas(10.0), TypeError, "must be an int"),
        (lambda: linear_betas(10, beta_start=0.0), ValueError, "strictly between 0 and 1"),
        (lambda: linear_betas(10, beta_end=1.5), ValueError, "strictly between 0 and 1"),
        (lambda: linear_betas(10, beta_start=0.02, beta_end=1e-4), ValueError, "swap them"),
        (lambda: cosine_betas(10, s=-0.1), ValueError, "0.008"),
        (lambda: cosine_betas(10, max_beta=1.0), ValueError, "strictly between 0 and 1"),
        (lambda: alpha_bar(torch.tensor([0.1, 1.0])), ValueError, "strictly between 0 and 1"),
        (lambda: alpha_bar(torch.zeros(2, 3) + 0.1), ValueError, r"shape \(T,\)"),
        (lambda: alpha_bar([0.1, 0.2]), TypeError, "torch.Tensor"),
        (lambda: snr(torch.tensor([0.5, 0.0])), ValueError, "did you pass betas"),
        (lambda: snr(torch.tensor([1.5])), ValueError, "alpha_bar"),
    ],
)
def test_bad_inputs_teach(call, error, match):
    with pytest.raises(error, match=match):
        call()
