"""Schedule, grids and the DDIM step against closed forms and diffusers' DDIMScheduler."""

from __future__ import annotations

import copy
import functools
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


@functools.lru_cache(maxsize=1)
def pipeline_scheduler():
    """The reference's scheduler as it runs: the notebooks' DDIMScheduler handed to
    StableDiffusionPipeline, whose constructor sets steps_offset = 1 (REFERENCE §1)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from tiny_models import tiny_sd1

    m = tiny_sd1()
    notebook = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                             clip_sample=False, set_alpha_to_one=False)
    assert notebook.config.steps_offset == 0  # what the notebooks build …
    pipe = StableDiffusionPipeline(m.vae, m.text_encoder, m.tokenizer, m.unet, notebook,
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    assert pipe.scheduler.config.steps_offset == 1  # … and what the pipeline makes of it
    return pipe.scheduler


def reference_scheduler(num_steps: int = 50):
    s = copy.deepcopy(pipeline_scheduler())  # (DDIMScheduler.from_config drops steps_offset)
    s.set_timesteps(num_steps)
    return s


def test_alphas_match_diffusers_scaled_linear():
    ours = scaled_linear_alphas_cumprod()
    theirs = reference_scheduler().alphas_cumprod.double()
    assert ours.shape == (1000,)
    assert torch.allclose(ours, theirs, atol=1e-7)


@pytest.mark.parametrize("n", [50, 30, 7, 1, 999])
def test_reference_grid_is_the_pipelines(n):
    """Timesteps and every level equal what StableDiffusionPipeline's DDIM steps between."""
    ac = scaled_linear_alphas_cumprod()
    g = make_grid(ac, n, "reference")
    s = reference_scheduler(n)
    assert list(g.timesteps) == s.timesteps.tolist()
    for k, t in enumerate(g.timesteps):  # the step from t_k lands on ᾱ(t − T/N) or ᾱ[0]
        prev = t - s.config.num_train_timesteps // s.num_inference_steps
        theirs = s.alphas_cumprod[prev] if prev >= 0 else s.final_alpha_cumprod
        assert g.level(k + 1) == pytest.approx(float(theirs), rel=2e-6), f"step {k}"  # fp32 there
    assert g.alpha_end == pytest.approx(float(ac[0]))


def test_reference_grid_is_981_to_1_ending_at_alpha0():
    ac = scaled_linear_alphas_cumprod()
    g = make_grid(ac, 50, "reference")
    assert g.timesteps == tuple(range(981, 0, -20))
    assert g.level(50) == g.alpha_end == pytest.approx(float(ac[0]))
    assert g.level(49) == pytest.approx(float(ac[1]))  # inversion's first step: ᾱ[0] → ᾱ[1]
    with pytest.raises(ValueError, match="at most 999 steps"):
        make_grid(ac, 1000, "reference")
    assert make_grid(ac, 1000, "ddim_uniform").num_steps == 999


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


def test_inversion_step_starts_from_alpha0_on_reference_grid():
    """Step 0 maps ᾱ[0] → ᾱ[1] (as the reference's next_step does from t = 1), the last one
    ᾱ(961) → ᾱ(981); ddim_uniform's first step starts from ᾱ = 1 instead."""
    ac = scaled_linear_alphas_cumprod()
    grid = make_grid(ac, 50)
    z = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    eps = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    assert torch.allclose(inversion_step(grid, 0, z, eps), ddim_step(z, eps, float(ac[0]), float(ac[1])))
    assert torch.allclose(inversion_step(grid, 49, z, eps),
                          ddim_step(z, eps, float(ac[961]), float(ac[981])))
    uniform = make_grid(ac, 50, "ddim_uniform")
    assert torch.allclose(inversion_step(uniform, 0, z, eps), ddim_step(z, eps, 1.0, float(ac[1])))
    assert not torch.allclose(inversion_step(uniform, 0, z, eps), inversion_step(grid, 0, z, eps))


def test_grid_of_an_old_file_says_what_it_is():
    """Format-1 files called 980…0 "reference": read back, that grid keeps its levels and a name
    of its own."""
    from nti_core.schedule import LEGACY_REFERENCE, grid_from_file

    ac = scaled_linear_alphas_cumprod()
    ts = tuple(range(980, -1, -20))
    g = grid_from_file("reference", ts, ac[list(ts)], float(ac[0]))
    assert g.kind == LEGACY_REFERENCE and g.timesteps == ts
    assert "980…0" in g.describe() and "invert again" in g.describe()
    new = make_grid(ac, 50)
    assert grid_from_file("reference", new.timesteps, new.alphas, new.alpha_end).kind == "reference"
