"""Attention maps recorded at inversion, the attention loss of null-text optimisation, and
P2Plus's unconditional self-injection through the whole sampler (StyleDiffusion, REFERENCE §6)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from core_support import (
    CAT_PROMPT,
    PHOTOS,
    cat_latent,
    demo_model,
    demo_null_text,
    demo_pivot,
    photo_image,
    tiny_model,
)

from nti_core import NullTextOptions, ddim_invert, make_grid, null_text_optimize, p2p_sample
from nti_core.attention.controller import MapRecorder
from nti_core.attention.edits import P2PController, blend_map_size
from nti_core.attention.plan import P2PSpec
from nti_core.denoiser import Rows, attention_probs
from nti_core.files import load_inversion, save_inversion
from nti_core.null_text import attention_loss
from nti_core.schedule import sample_step
from nti_core.tokenizer import from_hf


@pytest.fixture(scope="module")
def tiny_pivot():
    m = tiny_model()
    c, null = m.encode_prompt(CAT_PROMPT), m.encode_prompt("")
    grid = make_grid(m.alphas_cumprod, 6)
    plain = ddim_invert(m.denoiser, cat_latent(64), c, grid, CAT_PROMPT)
    mapped = ddim_invert(m.denoiser, cat_latent(64), c, grid, CAT_PROMPT, record_maps=True)
    return m, null, plain, mapped


def test_inversion_records_per_head_maps_at_a_quarter_of_the_latent(tiny_pivot):
    m, _, plain, mapped = tiny_pivot
    assert plain.maps is None
    # 64 px → latent 8 → maps at 2×2: one down and two up cross-attention layers (one layer per
    # block; SD 1.x has two, so 2 + 3), 8 heads
    assert blend_map_size((8, 8)) == (2, 2)
    assert tuple(mapped.maps.shape) == (6, 3, 8, 4, 77)
    assert torch.allclose(mapped.maps.sum(-1), torch.ones(()), atol=1e-5)  # softmax rows
    assert not torch.equal(mapped.maps[0], mapped.maps[5])  # one set per step
    # recording leaves the pivot as it was (the recorded layers run an unfused softmax)
    assert torch.allclose(mapped.latents, plain.latents, atol=1e-5, rtol=0)
    # maps[j] were taken at z*_j: recompute the last one directly
    rec = MapRecorder((2, 2))
    n = mapped.num_steps
    m.denoiser.eps(mapped.latents[n - 1 : n], mapped.grid.timesteps[0], mapped.embedding, step=0,
                   controller=rec)
    assert torch.allclose(rec.step_maps(0), mapped.maps[n - 1], atol=1e-6)
    assert torch.equal(mapped.loss_maps(0), mapped.maps[n - 1])  # A*(T) = A*(T−1)
    assert torch.equal(mapped.loss_maps(1), mapped.maps[n - 1])
    assert torch.equal(mapped.loss_maps(n - 1), mapped.maps[1])


def test_recorder_touches_only_its_row_and_size(tiny_pivot):
    m = tiny_pivot[0]
    z = cat_latent(64).expand(2, -1, -1, -1)
    ctx = torch.cat([m.encode_prompt(""), m.encode_prompt(CAT_PROMPT)])
    rows = Rows.cfg(1)
    rec = MapRecorder((2, 2), branch=False)
    with torch.no_grad():
        plain = m.denoiser.eps(z, 500, ctx, rows=rows, step=3)
        spied = m.denoiser.eps(z, 500, ctx, rows=rows, step=3, controller=rec)
    assert torch.allclose(plain, spied, atol=1e-5)
    assert list(rec.maps) == [3] and len(rec.maps[3]) == 3
    assert all(site.cross for site in rec.maps[3])


def test_lambda_zero_is_the_reference_exactly(tiny_pivot):
    """λ = 0 makes exactly the reference's UNet calls (no controller, no map, no row labels on
    the ∅ pass), so its ∅ is bit for bit today's, with or without maps on the pivot."""
    m, null, plain, mapped = tiny_pivot
    calls = []

    class Spy:
        def __getattr__(self, name):
            return getattr(m.denoiser, name)

        def eps(self, z, t, context, **kw):
            calls.append({k: v for k, v in kw.items() if v is not None})
            return m.denoiser.eps(z, t, context, **kw)

    a = null_text_optimize(m.denoiser, mapped, null)
    b = null_text_optimize(Spy(), mapped, null, NullTextOptions(attention_weight=0.0))
    assert torch.equal(a.embeddings, b.embeddings) and a.final_loss == b.final_loss
    assert b.attention_loss == [] and b.attention_weight == 0.0
    assert all("controller" not in c for c in calls)
    assert sum("rows" not in c for c in calls) == sum(b.iterations) + 6  # ∅ passes and ε_c
    c = null_text_optimize(m.denoiser, mapped, null, NullTextOptions(attention_weight=1.0))
    assert not torch.equal(c.embeddings, a.embeddings)


def test_attention_loss_needs_maps_before_any_work(tiny_pivot):
    m, null, plain, _ = tiny_pivot
    calls = []

    class Counting:
        def __getattr__(self, name):
            return getattr(m.denoiser, name)

        def eps(self, *a, **k):
            calls.append(1)
            return m.denoiser.eps(*a, **k)

    with pytest.raises(ValueError, match="no attention maps"):
        null_text_optimize(Counting(), plain, null, NullTextOptions(attention_weight=1.0))
    assert calls == []
    with pytest.raises(ValueError, match="attention loss weight must be ≥ 0"):
        NullTextOptions(attention_weight=-1.0)


def test_attention_loss_is_the_official_sum_of_layer_mses():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(5, 8, 16, 77, generator=g), torch.rand(5, 8, 16, 77, generator=g)
    assert attention_loss(a, b).item() == pytest.approx(
        sum(F.mse_loss(x, y).item() for x, y in zip(a, b, strict=True)), rel=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        attention_loss(a, b[:4])


def uncond_map_error(denoiser, traj, uncond) -> list[float]:
    """Per step, the attention loss of ∅_i on the CFG walk it drives (what λ targets)."""
    hw = blend_map_size(tuple(traj.latents.shape[-2:]))
    z, out = traj.z_T, []
    for i in range(traj.num_steps):
        rec = MapRecorder(hw, branch=False)
        with torch.no_grad():
            eps_u, eps_c = denoiser.eps(torch.cat([z, z]), traj.grid.timesteps[i],
                                        torch.cat([uncond.at(i), traj.embedding]),
                                        rows=Rows.cfg(1), step=i, controller=rec).chunk(2)
        out.append(attention_loss(rec.step_maps(i), traj.loss_maps(i)).item())
        z = sample_step(traj.grid, i, z, eps_u + uncond.guidance * (eps_c - eps_u))
    return out


@pytest.fixture(scope="module")
def demo_attention_runs():
    """NTI with λ = 0 and λ = 1 on the trained demo model and the cat photo (128², 20 steps)."""
    traj = demo_pivot("gnochi_mirror")[1]
    runs = {lam: demo_null_text("gnochi_mirror", attention_weight=lam) for lam in (0.0, 1.0)}
    return demo_model(), traj, runs


def test_attention_loss_lowers_the_map_error_it_targets(demo_attention_runs):
    m, traj, runs = demo_attention_runs
    err = {lam: uncond_map_error(m.denoiser, traj, u) for lam, u in runs.items()}
    mean = {lam: sum(e) / len(e) for lam, e in err.items()}
    print(f"\nmap error per step, mean: λ=0 {mean[0.0]:.3e}, λ=1 {mean[1.0]:.3e}")
    assert mean[1.0] < 0.9 * mean[0.0], mean
    assert len(runs[1.0].attention_loss) == 20
    # the latent term still does its job: reconstruction far below plain DDIM's at 7.5
    rec = {lam: float(F.mse_loss(p2p_sample(m.denoiser, traj, u, traj.embedding), traj.z_0))
           for lam, u in runs.items()}
    print(f"latent MSE at guidance 7.5: λ=0 {rec[0.0]:.3e}, λ=1 {rec[1.0]:.3e}")
    assert rec[1.0] < 5 * rec[0.0], rec


def test_maps_and_attention_loss_survive_a_file(tmp_path, tiny_pivot):
    m, null, _, mapped = tiny_pivot
    u = null_text_optimize(m.denoiser, mapped, null, NullTextOptions(attention_weight=1.0,
                                                                     inner_steps=2))
    assert "attention loss weight λ = 1.0" in u.report()
    p = save_inversion(tmp_path / "inv", mapped, u)
    traj, back = load_inversion(p, m.denoiser.fingerprint())
    assert torch.equal(traj.maps, mapped.maps)
    assert back.attention_loss == u.attention_loss and back.attention_weight == 1.0


def test_older_file_loads_without_maps_and_says_so_when_needed(tmp_path, tiny_pivot):
    from safetensors import safe_open
    from safetensors.torch import save_file

    m, null, plain, _ = tiny_pivot
    p = save_inversion(tmp_path / "old", plain, None)
    with safe_open(str(p), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, str(p), metadata={**meta, "format": "nti-inversion/2"})
    traj, _ = load_inversion(p)
    assert traj.maps is None
    with pytest.raises(ValueError, match="files saved before format 3 have none"):
        null_text_optimize(m.denoiser, traj, null, NullTextOptions(attention_weight=0.5))


class UncondSelfSpy(P2PController):
    """Notes the steps where a target's unconditional self-attention output equals the source's
    attention applied to the target's values (in every small self-attention layer)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.matches: dict[int, list[bool]] = {}

    def attend(self, q, k, v, *, heads, site, hw, step, rows):
        out = super().attend(q, k, v, heads=heads, site=site, hw=hw, step=step, rows=rows)
        if not site.cross and hw[0] * hw[1] <= self.self_max_pixels:
            u = (~rows.branch).nonzero().squeeze(1).tolist()
            if len(u) == 2:
                s, t = u
                p = attention_probs(q[s : s + 1], k[s : s + 1], heads)
                want = torch.matmul(p, v[t : t + 1].reshape(1, -1, heads, v.shape[-1] // heads)
                                    .transpose(1, 2)).transpose(1, 2).reshape(1, -1, v.shape[-1])
                same = torch.allclose(out[t : t + 1], want, atol=1e-6, rtol=0)
                self.matches.setdefault(step, []).append(same)
        return out

    @property
    def injected(self) -> set[int]:
        """Steps where every small self-attention layer matched."""
        return {step for step, m in self.matches.items() if all(m)}


def test_p2plus_injects_the_unconditional_self_attention_for_exactly_the_steps_asked():
    from nti_core import negative_prompt_inversion

    m = demo_model()  # trained: source and target rows part ways after the first step
    c = m.encode_prompt(PHOTOS["gnochi_mirror"])
    plain = ddim_invert(m.denoiser, m.encode_image(photo_image("gnochi_mirror", 64)), c,
                        make_grid(m.alphas_cumprod, 6), PHOTOS["gnochi_mirror"])
    u = negative_prompt_inversion(plain)
    tok = from_hf(m.tokenizer)
    target = "a negative of a cat sitting next to a mirror"
    contexts = torch.cat([plain.embedding, m.encode_prompt(target)])
    outs = {}
    for tau in (0.0, 0.5):
        ctrl = P2PSpec(plain.prompt, (target,), uncond_self=tau).build(tok, 6)
        spy = UncondSelfSpy(ctrl.cross_alpha, ctrl.self_range, replace=ctrl.replace,
                            uncond_self_range=ctrl.uncond_self_range, store=ctrl.store)
        outs[tau] = p2p_sample(m.denoiser, plain, u, contexts, controller=spy)
        assert set(spy.matches) == set(range(6))
        # at step 0 every unconditional row is the same latent with the same ∅, so its
        # self-attention equals the source's anyway; from step 1 on only injection makes it so
        assert spy.injected - {0} == (set() if tau == 0 else {1, 2}), (tau, spy.injected)
    plain_p2p = P2PSpec(plain.prompt, (target,)).build(tok, 6)
    assert torch.equal(outs[0.0], p2p_sample(m.denoiser, plain, u, contexts, controller=plain_p2p))
    assert not torch.allclose(outs[0.5][1], outs[0.0][1], atol=1e-4)
    # the source row keeps its own attention (computed unfused where injected: rounding only)
    assert torch.allclose(outs[0.5][0], outs[0.0][0], atol=1e-5, rtol=0)
