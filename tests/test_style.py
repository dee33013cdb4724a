"""StyleDiffusion on the diffusers host: the value path, the mapping networks' optimisation, editing
with value embeddings, files, and the side-by-side reconstruction on the trained demo model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from core_support import CAT_PROMPT, cat_latent, demo_model, demo_null_text, demo_pivot, tiny_model

from nti_core import ddim_invert, make_grid, p2p_sample
from nti_core.denoiser import Rows
from nti_core.editing import optimise
from nti_core.files import load_inversion_all, save_inversion
from nti_core.images import psnr
from nti_core.null_text import negative_prompt_inversion, plain_null
from nti_core.style import MappingNet, StyleOptions, style_invert


@pytest.fixture(scope="module")
def vision():
    from tiny_models import tiny_clip_vision

    return tiny_clip_vision(seed=0)


def tokens_of(vision, image):
    from nti_core.hosts.diffusers.vision import image_tokens

    return image_tokens(vision, image)


@pytest.fixture(scope="module")
def tiny_style(vision):
    from core_support import CAT

    from nti_core.images import load_image

    m = tiny_model()
    c, null = m.encode_prompt(CAT_PROMPT), m.encode_prompt("")
    traj = ddim_invert(m.denoiser, cat_latent(64), c, make_grid(m.alphas_cumprod, 4), CAT_PROMPT,
                       record_maps=True)
    tokens = tokens_of(vision, load_image(CAT, 64))
    return m, null, traj, tokens


def test_encoder_gives_the_papers_token_layout(tiny_style):
    *_, tokens = tiny_style
    assert tuple(tokens.shape) == (1, 197, 768)  # ViT-B/16 at 224 px
    # post_layernorm over every token: zero mean, unit variance per token before its affine
    assert not tokens.requires_grad


def test_value_equal_to_the_prompt_changes_nothing_and_reaches_only_conditional_rows(tiny_style):
    m, null, traj, _ = tiny_style
    z = traj.z_0.expand(2, -1, -1, -1)
    ctx = torch.cat([null, traj.embedding])
    rows = Rows.cfg(1)
    with torch.no_grad():
        plain = m.denoiser.eps(z, 600, ctx, rows=rows)
        same = m.denoiser.eps(z, 600, ctx, rows=rows, value_context=ctx)
        other = torch.randn(ctx.shape, generator=torch.Generator().manual_seed(0))
        moved = m.denoiser.eps(z, 600, ctx, rows=rows, value_context=other)
        split = torch.cat([
            m.denoiser.eps(z[:1], 600, ctx[:1], rows=Rows.make([False], [0]), value_context=other[:1]),
            m.denoiser.eps(z[1:], 600, ctx[1:], rows=Rows.make([True], [0]), value_context=other[1:]),
        ])
    assert torch.equal(plain, same)
    assert torch.equal(moved[0], plain[0])  # the unconditional row never reads the values
    assert not torch.allclose(moved[1], plain[1], atol=1e-6)
    assert torch.allclose(split, moved, atol=1e-6)


def test_mapping_network_variants_and_shapes():
    e = torch.randn(1, 197, 768)
    official = MappingNet(197, 768, 77, 768, "official")
    paper = MappingNet(197, 768, 77, 768, "paper")
    assert official(e).shape == (1, 154, 768) and paper(e).shape == (1, 77, 768)
    assert isinstance(official.project, torch.nn.Identity)
    # another encoder: ViT-L/14 (257 × 1024) maps through Linear(1024 → 768) first
    vitl = MappingNet(257, 1024, 77, 768, "official")
    assert vitl(torch.randn(1, 257, 1024)).shape == (1, 154, 768)
    layers = [type(x).__name__ for x in paper.modules()]
    assert layers.count("Conv1d") == 3 and "BatchNorm1d" in layers and "LeakyReLU" in layers
    # the official inner-iteration decay: ⌈100·e^{−0.1 i}⌉
    o = StyleOptions()
    assert [o.iterations(i) for i in (0, 1, 10, 29)] == [100, 91, 37, 6]
    assert o.iterations(5) == math.ceil(100 * math.exp(-0.5))
    with pytest.raises(ValueError, match="variant must be one of"):
        StyleOptions(variant="large")


def test_gradients_reach_only_the_mapping_network(tiny_style, vision, monkeypatch):
    m, null, traj, tokens = tiny_style
    seen = []
    real = torch.optim.Adam

    def spy(params, **kw):
        params = list(params)
        seen.append(params)
        return real(params, **kw)

    monkeypatch.setattr(torch.optim, "Adam", spy)
    v = style_invert(m.denoiser, traj, tokens, null, StyleOptions(inner_steps=2))
    assert len(seen) == traj.num_steps
    net_params = seen[0]
    assert all(p.grad is not None for p in net_params)
    frozen = [*m.unet.parameters(), *m.text_encoder.parameters(), *vision.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in frozen)
    assert v.shift.shape == (4, 77, 768) and v.scale.shape == (4, 77, 768)
    assert all(1 <= k <= 2 for k in v.iterations)
    assert len(v.attention_loss) == 4 and "StyleDiffusion (official" in v.report()


def test_edit_reads_values_on_the_source_always_and_on_targets_until_tau_v(tiny_style):
    m, null, traj, tokens = tiny_style
    v = style_invert(m.denoiser, traj, tokens, null, StyleOptions(inner_steps=1, variant="paper"))
    contexts = torch.cat([traj.embedding, m.encode_prompt("a dog sitting next to a mirror")])
    calls = []

    class Spy:
        def __getattr__(self, name):
            return getattr(m.denoiser, name)

        def eps(self, z, t, context, *, value_context=None, step=None, **kw):
            calls.append((step, context.clone(), value_context.clone()))
            return m.denoiser.eps(z, t, context, value_context=value_context, step=step, **kw)

    p2p_sample(Spy(), traj, plain_null(traj, null), contexts, values=v, value_end=0.5)
    assert [c[0] for c in calls] == [0, 1, 2, 3]
    for step, ctx, vctx in calls:
        assert torch.equal(vctx[:2], ctx[:2])  # unconditional rows: their own context
        assert torch.equal(vctx[2], v.shift[step])  # source: c̃_t always
        want = v.shift[step] if step < 2 else contexts[1]
        assert torch.equal(vctx[3], want), step
    with pytest.raises(ValueError, match="τ_v"):
        p2p_sample(m.denoiser, traj, plain_null(traj, null), contexts, values=v, value_end=1.5)


def test_values_survive_a_file_and_refuse_another_inversion(tmp_path, tiny_style):
    m, null, traj, tokens = tiny_style
    v = style_invert(m.denoiser, traj, tokens, null, StyleOptions(inner_steps=1))
    p = save_inversion(tmp_path / "styled", traj, plain_null(traj, null), v)
    t2, u2, v2 = load_inversion_all(p, m.denoiser.fingerprint())
    assert torch.equal(v2.shift, v.shift) and torch.equal(v2.scale, v.scale)
    assert v2.iterations == v.iterations and v2.encoder == v.encoder
    other = ddim_invert(m.denoiser, cat_latent(64).flip(-1), traj.embedding, traj.grid, CAT_PROMPT)
    with pytest.raises(ValueError, match="optimised on another inversion"):
        p2p_sample(m.denoiser, other, plain_null(other, null), traj.embedding, values=v)
    with pytest.raises(ValueError, match="no attention maps"):
        style_invert(m.denoiser, other, tokens, null)
    with pytest.raises(ValueError, match=r"expected tokens \[1, n, width\]"):
        style_invert(m.denoiser, traj, tokens[0], null)


@pytest.fixture(scope="module")
def side_by_side(vision):
    """NTI, NTI + attention loss and StyleDiffusion on the demo model and the cat (128², 20 steps)."""
    m = demo_model()
    x, traj = demo_pivot("gnochi_mirror")
    z0, c, null = traj.z_0, traj.embedding, m.encode_prompt("")
    tokens = tokens_of(vision, x)
    out = {}
    for name, run in (
        ("ddim", lambda: (plain_null(traj, null), None)),
        ("npi", lambda: (negative_prompt_inversion(traj), None)),
        ("nti", lambda: (demo_null_text("gnochi_mirror"), None)),
        ("nti+attn", lambda: (demo_null_text("gnochi_mirror", attention_weight=1.0), None)),
        ("styled", lambda: (plain_null(traj, null),
                            style_invert(m.denoiser, traj, tokens, null))),
    ):
        u, v = run()
        rec = p2p_sample(m.denoiser, traj, u, c, values=v)
        out[name] = (float(F.mse_loss(rec, z0)), psnr(m.decode(rec), x))
    print("\nreconstruction at guidance 7.5 (latent MSE / PSNR): "
          + ", ".join(f"{k} {a:.3g} / {b:.1f} dB" for k, (a, b) in out.items()))
    return out


def test_reconstruction_side_by_side(side_by_side):
    r = side_by_side
    for name in ("nti", "nti+attn", "styled"):
        assert r[name][0] < r["ddim"][0] / 5, (name, r)
        assert r[name][1] > r["ddim"][1], (name, r)


def test_each_steps_losses_reach_on_step_as_they_are_recorded(tiny_style):
    """StyleDiffusion through the pipeline: ``on_step`` gets every step's first and final loss
    once, in order, before that step's progress tick, equal to what the values record."""
    m, _, traj, tokens = tiny_style
    events: list = []
    v = optimise(m, traj, "styled", style=StyleOptions(inner_steps=3), image_tokens=tokens,
                 progress=lambda done=1: events.append("tick"),
                 on_step=lambda *told: events.append(told)).values
    n = traj.num_steps
    assert len(v.first_loss) == len(v.final_loss) == n == 4
    assert events == [e for i in range(n) for e in ((i, n, v.first_loss[i], v.final_loss[i]), "tick")]
    assert any(a != b for a, b in zip(v.first_loss, v.final_loss, strict=True))
