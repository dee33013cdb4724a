"""nti_core against the reference implementation itself: diffusers' community NullTextPipeline,
read at run time from the diffusers checkout named by $NTI_DIFFUSERS_PATH (skipped without it).

Shared weights (the trained demo model) and shared conditioning tensors (the pipeline's own
``get_context``): the diffusers host must retrace the pipeline's DDIM inversion to 1e-4 and its
null-text optimisation up to kernel rounding. The ComfyUI host's twin is in test_comfy_host.py.
"""

from __future__ import annotations

import pytest
import torch
from core_support import CAT, assert_same_uncond, community_null_text_pipeline, demo_model

from nti_core import NullTextOptions, ddim_invert, make_grid, null_text_optimize
from nti_core.images import load_image

PROMPT = "a photo of a cat sitting next to a mirror"
STEPS = 10


@pytest.fixture(scope="module")
def reference():
    m = demo_model()
    pipe = community_null_text_pipeline(m.unet, m.vae, m.text_encoder, m.tokenizer, STEPS)
    z0 = m.encode_image(load_image(CAT, 128))
    with torch.no_grad():
        context = pipe.get_context(PROMPT)  # [uncond; cond], the pipeline's own tensors
    latents = pipe.ddim_inversion_loop(z0, context)
    return m, pipe, z0, context, torch.cat(latents)


def test_diffusers_host_retraces_the_reference_inversion(reference):
    m, _, z0, context, theirs = reference
    cond = context[1:]
    ours = ddim_invert(m.denoiser, z0, cond, make_grid(m.alphas_cumprod, STEPS), PROMPT)
    assert theirs.shape == ours.latents.shape == (STEPS + 1, 4, 16, 16)
    gap = float((ours.latents - theirs).abs().max())
    assert gap < 1e-4, gap
    # the grid matters: ComfyUI's ddim_uniform (same timesteps, starts from ᾱ = 1) does not
    uniform = ddim_invert(m.denoiser, z0, cond, make_grid(m.alphas_cumprod, STEPS, "ddim_uniform"),
                          PROMPT)
    assert float((uniform.latents - theirs).abs().max()) > 100 * max(gap, 1e-6)


def test_null_text_equals_the_reference_up_to_rounding(reference):
    m, pipe, z0, context, latents = reference
    null, cond = context[:1], context[1:]
    traj = ddim_invert(m.denoiser, z0, cond, make_grid(m.alphas_cumprod, STEPS), PROMPT)
    ours = null_text_optimize(m.denoiser, traj, null, NullTextOptions(early_stop=1e-5))
    theirs_list = pipe.null_optimization(list(latents[:, None]), context, 10, 1e-5)
    theirs = type(ours)(torch.cat(theirs_list), "null-text", 7.5, ours.final_loss,
                        ours.first_loss, ours.iterations)  # the pipeline reports no losses
    assert_same_uncond(ours, theirs, null)
