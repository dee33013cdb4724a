"""Prompt-to-Prompt sampling end to end on the tiny SD1-shaped model through the diffusers host."""

from __future__ import annotations

import pytest
import torch
from core_support import CAT_PROMPT, cat_latent, tiny_model

from nti_core import ddim_invert, make_grid, negative_prompt_inversion, p2p_sample
from nti_core.attention.plan import P2PSpec
from nti_core.denoiser import Rows
from nti_core.tokenizer import from_hf

STEPS = 6


@pytest.fixture(scope="module")
def setup():
    m = tiny_model()
    z0 = cat_latent(256)  # 32×32 latent: maps at 32², 16², 8² (LocalBlend reads 8²)
    c = m.encode_prompt(CAT_PROMPT)
    traj = ddim_invert(m.denoiser, z0, c, make_grid(m.alphas_cumprod, STEPS), CAT_PROMPT)
    return m, traj, negative_prompt_inversion(traj), from_hf(m.tokenizer)


def run(setup, spec: P2PSpec):
    m, traj, uncond, tok = setup
    ctrl = spec.build(tok, STEPS)
    ctx = torch.cat([traj.embedding] + [m.encode_prompt(t) for t in spec.targets])
    return p2p_sample(m.denoiser, traj, uncond, ctx, controller=ctrl), ctrl


def test_source_row_is_the_plain_reconstruction(setup):
    m, traj, uncond, _ = setup
    plain = p2p_sample(m.denoiser, traj, uncond, traj.embedding)
    out, _ = run(setup, P2PSpec(CAT_PROMPT, ("a tiger sitting next to a mirror",)))
    assert torch.allclose(out[:1], plain, atol=1e-5)
    assert not torch.allclose(out[1:], plain, atol=1e-3)  # the edit changed something


def test_identical_prompts_with_full_injection_reproduce_the_source(setup):
    out, _ = run(setup, P2PSpec(CAT_PROMPT, (CAT_PROMPT,), mode="reweight", cross=1.0,
                                self_steps=1.0))
    assert torch.allclose(out[1], out[0], atol=1e-6)


def test_reweight_changes_only_through_the_chosen_word(setup):
    base, _ = run(setup, P2PSpec(CAT_PROMPT, (CAT_PROMPT,), mode="reweight", cross=1.0))
    up, _ = run(setup, P2PSpec(CAT_PROMPT, (CAT_PROMPT,), mode="reweight", cross=1.0,
                               reweight="mirror:4"))
    assert torch.allclose(base[1], base[0], atol=1e-6)
    assert float((up[1] - up[0]).abs().max()) > 1e-3
    assert torch.allclose(up[0], base[0], atol=1e-6)  # the source row is untouched


def test_local_blend_keeps_outside_of_mask_equal_to_source(setup):
    out, ctrl = run(setup, P2PSpec(CAT_PROMPT, ("a tiger sitting next to a mirror",),
                                   blend_words=("cat", "tiger"), blend_start=0.0,
                                   blend_threshold=0.95))  # random maps are near-flat (min/max 0.88)
    mask = ctrl.local_blend.last_mask  # [2, 1, h, w] of the last step
    assert mask is not None and mask.shape == (2, 1, 32, 32)
    inside = mask[1, 0]
    assert 0 < int(inside.sum()) < inside.numel()  # a real, partial mask
    diff = (out[1] - out[0]).abs().amax(0)
    assert float(diff[~inside].max()) == 0.0
    assert float(diff[inside].max()) > 0.0


def test_one_call_or_two_calls_give_the_same_eps(setup):
    m, traj, uncond, tok = setup
    spec = P2PSpec(CAT_PROMPT, ("a tiger sitting next to a mirror",), reweight="tiger:2",
                   blend_words=("cat", "tiger"))
    ctx = torch.cat([traj.embedding, m.encode_prompt(spec.targets[0])])
    null = uncond.at(0).expand(2, -1, -1)
    z = traj.z_T.expand(2, -1, -1, -1)
    t = traj.grid.timesteps[0]
    one = m.denoiser.eps(torch.cat([z, z]), t, torch.cat([null, ctx]), rows=Rows.cfg(2), step=0,
                         controller=spec.build(tok, STEPS))
    ctrl = spec.build(tok, STEPS)
    u = m.denoiser.eps(z, t, null, rows=Rows.make([False, False], [0, 1]), step=0, controller=ctrl)
    c = m.denoiser.eps(z, t, ctx, rows=Rows.cond(2), step=0, controller=ctrl)
    assert torch.allclose(one, torch.cat([u, c]), atol=1e-5)
    # and the stored maps are the same too: LocalBlend sees one picture either way
    a = spec.build(tok, STEPS)
    m.denoiser.eps(torch.cat([z, z]), t, torch.cat([null, ctx]), rows=Rows.cfg(2), step=0,
                   controller=a)
    hw = (8, 8)
    assert torch.allclose(a.store.sums(hw, 1), ctrl.store.sums(hw, 1), atol=1e-6)


def test_bad_plans_fail_before_sampling(setup):
    m, traj, uncond, tok = setup
    with pytest.raises(ValueError, match="same number of words.*refine"):
        P2PSpec(CAT_PROMPT, ("a big tiger sitting next to a mirror",), mode="replace").build(tok, 6)
    with pytest.raises(ValueError, match="dog"):
        P2PSpec(CAT_PROMPT, ("a tiger sitting next to a mirror",), blend_words=("dog",)).build(tok, 6)
    with pytest.raises(ValueError, match="zebra"):
        P2PSpec(CAT_PROMPT, (CAT_PROMPT,), reweight="zebra:2").build(tok, 6)
    with pytest.raises(ValueError, match="78 tokens|tokens"):
        P2PSpec(CAT_PROMPT, (" ".join(["cat"] * 76),), mode="refine").build(tok, 6)
