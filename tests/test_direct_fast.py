"""Direct Inversion and the fast null-text mode, on the trained demo model.

Direct Inversion is checked against a transcription of the official two-pass code
(cure-lab/PnPInversion: ``offset_calculate`` + ``direct_inversion_p2p_guidance_diffusion_step``);
the fast mode against a transcription of its definition, with its UNet passes counted.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from core_support import PHOTOS, demo_model, demo_null_text, demo_pivot

from nti_core import NullTextOptions, null_text_optimize, p2p_sample
from nti_core.attention.plan import P2PSpec
from nti_core.denoiser import Rows
from nti_core.null_text import direct_inversion, negative_prompt_inversion, plain_null
from nti_core.schedule import sample_step
from nti_core.tokenizer import from_hf
from nti_core.trajectory import ValueEmbeddings, pivot_fingerprint

NAME = "gnochi_mirror"
SOURCE = PHOTOS[NAME]  # "a photo of a cat sitting next to a mirror"
TARGET = "a photo of a dog sitting next to a mirror"


def official_direct_edit(m, traj, null, contexts, controller, w=7.5):
    """PnP Inversion as its code runs: offsets from a pass of their own (z̄ = z*_{N−i}, context
    ["", source], guidance w), added to the source row after the scheduler step and before the
    controller's step callback (LocalBlend)."""
    n, grid = traj.num_steps, traj.grid
    cond = traj.embedding
    offsets, cur = [], traj.latents[n : n + 1]
    with torch.no_grad():
        for i in range(n):
            e_u, e_c = m.denoiser.eps(torch.cat([cur, cur]), grid.timesteps[i],
                                      torch.cat([null, cond])).chunk(2)
            rec = sample_step(grid, i, cur, e_u + w * (e_c - e_u))
            offsets.append(traj.latents[n - 1 - i : n - i] - rec)
            cur = rec + offsets[-1]
        s = contexts.shape[0]
        z = traj.z_T.expand(s, -1, -1, -1).clone()
        for i in range(n):
            eps = m.denoiser.eps(torch.cat([z, z]), grid.timesteps[i],
                                 torch.cat([null.expand(s, -1, -1), contexts]),
                                 rows=Rows.cfg(s), step=i, controller=controller)
            e_u, e_c = eps.chunk(2)
            z = sample_step(grid, i, z, e_u + w * (e_c - e_u))
            z = torch.cat([z[:1] + offsets[i], z[1:]])
            z = controller.after_step(i, z)
    return z


@pytest.fixture(scope="module")
def setup():
    m = demo_model()
    _, traj = demo_pivot(NAME, 128, 20)
    null = m.encode_prompt("")
    contexts = torch.cat([traj.embedding, m.encode_prompt(TARGET)])
    return m, traj, null, contexts


def blend_spec(**kw) -> P2PSpec:
    return P2PSpec(SOURCE, (TARGET,), blend_words=("cat", "dog"), **kw)


def test_direct_inversion_reconstructs_exactly_with_no_optimisation(setup):
    m, traj, null, _ = setup
    calls = []
    real = m.denoiser.eps
    m.denoiser.eps = lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k)
    try:
        uncond = direct_inversion(traj, null)
    finally:
        m.denoiser.eps = real
    assert calls == [] and uncond.method == "direct" and uncond.iterations == []
    assert torch.equal(uncond.embeddings, null.expand(traj.num_steps, -1, -1))
    rec = p2p_sample(m.denoiser, traj, uncond, traj.embedding)
    ddim = p2p_sample(m.denoiser, traj, plain_null(traj, null), traj.embedding)
    assert float(F.mse_loss(rec, traj.z_0)) <= 1e-12  # the pivot itself, at guidance 7.5
    assert float(F.mse_loss(ddim, traj.z_0)) > 1e-4  # what the same ∅ gives without it


def test_direct_inversion_equals_the_official_two_pass_code(setup):
    """Writing z*_{N−1−i} into the source row = adding the official offsets, up to rounding;
    the targets (replace + LocalBlend) agree as well."""
    m, traj, null, contexts = setup
    tok = from_hf(m.tokenizer)
    ours_ctrl = blend_spec().build(tok, traj.num_steps)
    ours = p2p_sample(m.denoiser, traj, direct_inversion(traj, null), contexts,
                      controller=ours_ctrl)
    theirs = official_direct_edit(m, traj, null, contexts, blend_spec().build(tok, traj.num_steps))
    assert float((ours[0] - theirs[0]).abs().max()) < 1e-5
    gap = float((ours[1] - theirs[1]).abs().max())
    assert gap < 1e-4, gap
    # and the targets are an edit: not the source, not the edit without Direct Inversion
    plain = p2p_sample(m.denoiser, traj, plain_null(traj, null), contexts,
                       controller=blend_spec().build(tok, traj.num_steps))
    assert float((ours[1] - ours[0]).abs().max()) > 1e-2
    assert float((ours[1] - plain[1]).abs().max()) > 100 * max(gap, 1e-6)


def test_direct_inversion_with_local_blend_keeps_the_background(setup):
    m, traj, null, contexts = setup
    # the demo model's maps are diffuse (README): a high threshold leaves a partial mask
    ctrl = blend_spec(blend_threshold=0.9).build(from_hf(m.tokenizer), traj.num_steps,
                                                 latent_hw=tuple(traj.latents.shape[-2:]))
    z = p2p_sample(m.denoiser, traj, direct_inversion(traj, null), contexts, controller=ctrl)
    mask = ctrl.local_blend.last_mask[1, 0]
    assert 0.0 < float(mask.float().mean()) < 1.0, "the blend mask should be partial"
    assert torch.equal(z[0], traj.z_0[0])  # the source row ends on the photo
    background = ~mask
    assert torch.equal(z[1][:, background], traj.z_0[0][:, background])  # exactly the photo
    assert float((z[1][:, mask] - traj.z_0[0][:, mask]).abs().max()) > 1e-2  # edited inside
    assert ctrl.store.resolutions() == [(4, 4)]  # LocalBlend's quarter side only (16 → 4)


def test_direct_inversion_composes_with_p2plus_reweight_and_values(setup):
    m, traj, null, contexts = setup
    tok = from_hf(m.tokenizer)
    g = torch.Generator().manual_seed(0)
    values = ValueEmbeddings(
        shift=0.05 * torch.randn(traj.num_steps, *contexts.shape[1:], generator=g),
        scale=1 + 0.05 * torch.randn(traj.num_steps, *contexts.shape[1:], generator=g),
        variant="official", encoder="test", guidance=7.5, prompt=traj.prompt,
        pivot=pivot_fingerprint(traj))
    same = torch.cat([traj.embedding, traj.embedding])
    spec = P2PSpec(SOURCE, (SOURCE,), mode="reweight", reweight="cat:2", uncond_self=0.5)
    direct = p2p_sample(m.denoiser, traj, direct_inversion(traj, null), same,
                        controller=spec.build(tok, traj.num_steps), values=values)
    plain = p2p_sample(m.denoiser, traj, plain_null(traj, null), same,
                       controller=spec.build(tok, traj.num_steps), values=values)
    assert torch.equal(direct[0], traj.z_0[0])
    assert float((plain[0] - traj.z_0[0]).abs().max()) > 1e-2
    assert float((direct[1] - direct[0]).abs().max()) > 1e-3  # the reweight still edits
    assert float((direct[1] - plain[1]).abs().max()) > 1e-3


# ----------------------------------------------------------------------------- the fast mode
def fast_by_definition(m, traj, cond, w=7.5, budget=10, early=1e-5, slope=2e-5):
    """The fast mode as its docstring defines it, written out: ∅ from C; per step ε_c once;
    up to ``budget`` passes, each tested before its Adam step; advance with the passing ε, or
    with one more ε_∅ and the step's ε_c. Returns ∅, per-step passes, UNet rows, backwards."""
    n, grid = traj.num_steps, traj.grid
    z, uncond = traj.latents[n : n + 1], cond.clone()
    out, iters, rows, backwards = [], [], 0, 0
    for i in range(n):
        t = grid.timesteps[i]
        target = traj.latents[n - 1 - i : n - i]
        with torch.no_grad():
            eps_c = m.denoiser.eps(z, t, cond)
        rows += 1
        uncond = uncond.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([uncond], lr=1e-2 * (1 - i / 100))
        kept = None
        for j in range(budget):  # noqa: B007 (read after the loop)
            eps_u = m.denoiser.eps(z, t, uncond)
            rows += 1
            eps = eps_u + w * (eps_c - eps_u)
            loss = F.mse_loss(sample_step(grid, i, z, eps), target)
            if loss.item() < early + i * slope:
                kept = eps.detach()
                break
            opt.zero_grad()
            loss.backward()
            backwards += 1
            opt.step()
        iters.append(j + 1)
        uncond = uncond.detach()
        out.append(uncond)
        with torch.no_grad():
            if kept is None:
                eps_u = m.denoiser.eps(z, t, uncond)
                rows += 1
                kept = eps_u + w * (eps_c - eps_u)
            z = sample_step(grid, i, z, kept)
    return torch.cat(out), iters, rows, backwards


class Counting:
    """Counts the UNet rows a denoiser evaluates and the backwards through them."""

    def __init__(self, denoiser):
        self.denoiser, self.rows, self.backwards = denoiser, 0, 0

    def __getattr__(self, name):
        return getattr(self.denoiser, name)

    def eps(self, z, *args, **kwargs):
        self.rows += z.shape[0]
        e = self.denoiser.eps(z, *args, **kwargs)
        if e.requires_grad:
            e.register_hook(lambda g: setattr(self, "backwards", self.backwards + z.shape[0]) or g)
        return e


def test_fast_mode_is_its_definition_with_the_passes_it_states(setup):
    m, traj, null, _ = setup
    counted = Counting(m.denoiser)
    ours = null_text_optimize(counted, traj, null, NullTextOptions(fast=True))
    emb, iters, rows, backwards = fast_by_definition(m, traj, traj.embedding)
    assert ours.method == "null-text-fast"
    assert ours.iterations == iters
    assert (counted.rows, counted.backwards) == (rows, backwards)
    assert float((ours.embeddings - emb).abs().max()) < 1e-5
    # fewer passes than the reference, which costs 1 + 3·K + 2 rows per step (measured here,
    # 128² and 20 steps: 205 against 594; the bench's 256² and 50 steps: about a tenth)
    reference = demo_null_text(NAME, 128, 20)
    ref_fe = sum(1 + 3 * k + 2 for k in reference.iterations)
    assert rows + 2 * backwards < ref_fe / 2, (rows + 2 * backwards, ref_fe)
    # and it starts from negative-prompt inversion's ∅ (every step that met the threshold at once
    # keeps the ∅ it started the step with)
    assert torch.equal(ours.embeddings[0], traj.embedding[0]) == (ours.iterations[0] == 1)


def test_fast_mode_reconstructs_at_least_as_well_as_the_reference(setup):
    m, traj, null, _ = setup
    fast = null_text_optimize(m.denoiser, traj, null, NullTextOptions(fast=True))
    reference = demo_null_text(NAME, 128, 20)
    errors = {k: float(F.mse_loss(p2p_sample(m.denoiser, traj, u, traj.embedding), traj.z_0))
              for k, u in (("fast", fast), ("reference", reference),
                           ("npi", negative_prompt_inversion(traj)))}
    assert errors["fast"] <= errors["reference"], errors
    assert errors["fast"] < errors["npi"], errors  # it optimises, not just NPI
    # every step ends below its threshold or spends the budget
    for i, (it, loss) in enumerate(zip(fast.iterations, fast.final_loss, strict=True)):
        assert loss < 1e-5 + i * 2e-5 or it == 10
