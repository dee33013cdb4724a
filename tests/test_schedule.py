"""Schedule, grids and the DDIM step against closed forms and diffusers' DDIMScheduler."""

from __future__ import annotations

import math

import pytest
import torch

from nti_core.schedule import (
    ddim_step,
    inversion_step,
    make_grid,
    sample_step,
    scaled_linear_alphas_cumprod,
)


def reference_scheduler():
    from diffusers import DDIMScheduler

    s = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=0)
    s.set_timesteps(50)
    return s


def test_alphas_match_diffusers_scaled_linear():
    ours = scaled_linear_alphas_cumprod()
    theirs = reference_scheduler().alphas_cumprod.double()
    assert ours.shape == (1000,)
    assert torch.allclose(ours, theirs, atol=1e-7)


def test_reference_grid_is_980_to_0_ending_at_alpha0():
    ac = scaled_linear_alphas_cumprod()
    g = make_grid(ac, 50, "reference")
    assert g.timesteps == tuple(range(980, -1, -20))
    assert list(g.timesteps) == reference_scheduler().timesteps.tolist()
    assert g.alpha_end == pytest.approx(float(ac[0]))
    assert g.level(50) == g.alpha_end and g.level(0) == pytest.approx(float(ac[980]))


def test_ddim_uniform_grid_is_981_to_1_ending_at_one():
    ac = scaled_linear_alphas_cumprod()
    g = make_grid(ac, 50, "ddim_uniform")
    assert g.timesteps == tuple(range(981, 0, -20))
    assert g.alpha_end == 1.0
    # ComfyUI's ddim_uniform takes every ⌊1000/N⌋-th sigma, so N = 30 gives 31 steps
    assert make_grid(ac, 30, "ddim_uniform").num_steps == 31


@pytest.mark.parametrize("bad", [0, -1, 1001, 2.5])
def test_bad_step_counts_are_refused(bad):
    with pytest.raises(ValueError, match="steps must be an integer"):
        make_grid(scaled_linear_alphas_cumprod(), bad)


def test_unknown_grid_is_refused():
    with pytest.raises(ValueError, match="grid must be one of"):
        make_grid(scaled_linear_alphas_cumprod(), 10, "karras")  # type: ignore[arg-type]


def test_ddim_step_closed_form():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    a_t, a_p = 0.3, 0.8
    z_t = math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * eps
    expected = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p) * eps
    assert torch.allclose(ddim_step(z_t, eps, a_t, a_p), expected, atol=1e-12)
    # run backwards it is the inversion step and undoes itself
    assert torch.allclose(ddim_step(expected, eps, a_p, a_t), z_t, atol=1e-12)


def test_sample_step_equals_diffusers_ddim_step():
    sched = reference_scheduler()
    grid = make_grid(scaled_linear_alphas_cumprod(), 50)
    g = torch.Generator().manual_seed(1)
    for i, t in enumerate(grid.timesteps):
        z = torch.randn(1, 4, 8, 8, generator=g)
        eps = torch.randn(1, 4, 8, 8, generator=g)
        theirs = sched.step(eps, t, z, eta=0.0).prev_sample
        assert torch.allclose(sample_step(grid, i, z, eps), theirs, atol=2e-5), f"step {i}"


def test_inversion_step_is_identity_at_t0_on_reference_grid():
    grid = make_grid(scaled_linear_alphas_cumprod(), 50)
    z = torch.randn(1, 4, 8, 8)
    eps = torch.randn(1, 4, 8, 8)
    assert torch.allclose(inversion_step(grid, 0, z, eps), z, atol=1e-6)
    # and step j uses levels N−j → N−1−j: the last step lands on ᾱ(980)
    x = inversion_step(grid, 49, z, eps)
    expected = ddim_step(z, eps, grid.level(1), grid.level(0))
    assert torch.allclose(x, expected)
