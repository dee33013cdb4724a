"""Non-finite values stop the run where they start (nti_core.finite): NaN / inf injected at each
stage — the photo's latent, inversion, null-text and StyleDiffusion optimisation, sampling, the
reconstruction, the VAE — gives an error naming the stage, the step, the likely cause and the
fix, before any image is made."""

from __future__ import annotations

import math

import pytest
import torch
from core_support import LinearDenoiser

from nti_core import NullTextOptions, ddim_invert, make_grid, null_text_optimize
from nti_core.finite import NonFiniteError, check_finite
from nti_core.null_text import plain_null
from nti_core.sampling import ddim_reconstruct, p2p_sample
from nti_core.style import StyleOptions, style_invert


class Poisoned:
    """A denoiser whose ε of call ``at`` (0-based) gets ``value`` added (NaN or inf), optionally
    claiming to compute in ``dtype`` (what the message's likely cause depends on)."""

    def __init__(self, at: int, value: float = math.nan, dtype: torch.dtype | None = None):
        self.inner, self.at, self.value, self.calls = LinearDenoiser(a=0.1), at, value, 0
        if dtype is not None:
            self.dtype = dtype

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def eps(self, *args, **kwargs):
        e = self.inner.eps(*args, **kwargs)
        self.calls += 1
        return e + self.value if self.calls - 1 == self.at else e


def setup(steps: int = 4):
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(1, 4, 8, 8, generator=g)
    cond = torch.randn(1, 77, 768, generator=g)
    null = torch.randn(1, 77, 768, generator=g)
    return z0, cond, null, make_grid(LinearDenoiser().alphas_cumprod, steps)


def test_a_nan_photo_latent_is_refused_naming_the_vae_and_the_fix() -> None:
    z0, cond, _, grid = setup()
    z0[0, 0, 0, 0] = math.nan
    with pytest.raises(NonFiniteError, match=r"NaN in the photo's latent z0 at input latent: the "
                       r"VAE overflows in fp16 .*--fp32-vae"):
        ddim_invert(LinearDenoiser(), z0, cond, grid, "p")


@pytest.mark.parametrize("dtype, cause", [
    (torch.float16, r" \(fp16\): fp16 overflow in the UNet: run the model in bf16 or fp32 "
                    r"\(ComfyUI: --bf16-unet or --fp32-unet; CLI: --dtype bf16 or fp32\)"),
    (None, r": the values grew without bound"),
])
def test_a_nan_eps_in_inversion_stops_at_its_step(dtype, cause) -> None:
    z0, cond, _, grid = setup()
    with pytest.raises(NonFiniteError, match=r"NaN in ε at step 2 of DDIM inversion" + cause):
        ddim_invert(Poisoned(2, dtype=dtype), z0, cond, grid, "p")


def test_an_overflowing_iteration_stops_null_text_naming_precision_fp32() -> None:
    z0, cond, null, grid = setup()
    traj = ddim_invert(LinearDenoiser(a=0.1), z0, cond, grid, "p")
    den = Poisoned(1, math.inf, torch.float16)  # call 0: ε_c of step 0; call 1: its first ε_∅
    with pytest.raises(NonFiniteError, match=r"(inf|NaN) in loss at step 0 of null-text "
                       r"optimisation \(fp16\): fp16 overflow in the optimisation's UNet passes: "
                       r"set precision to fp32"):
        null_text_optimize(den, traj, null, NullTextOptions(inner_steps=2))


def test_a_nan_source_eps_stops_null_text_at_its_step() -> None:
    z0, cond, null, grid = setup()
    traj = ddim_invert(LinearDenoiser(a=0.1), z0, cond, grid, "p")
    den = Poisoned(1)  # fast mode, early stop at once: step 0 is ε_c, ε_∅; step 1's ε_c is #2
    den.at = 2
    with pytest.raises(NonFiniteError, match=r"NaN in the source prompt's ε at step 1 of "
                       r"null-text optimisation"):
        null_text_optimize(den, traj, null, NullTextOptions(fast=True, early_stop=1e9))


def test_a_nan_loss_stops_style_diffusion() -> None:
    z0, cond, null, grid = setup()
    den = Poisoned(1, dtype=torch.float16)  # call 0: ε_∅ of step 0; call 1: the first valued ε
    traj = ddim_invert(den.inner, z0, cond, grid, "p")
    tokens = torch.randn(1, 5, 768, generator=torch.Generator().manual_seed(1))
    with pytest.raises(NonFiniteError, match=r"NaN in loss at step 0 of StyleDiffusion "
                       r"optimisation \(fp16\): .*set precision to fp32"):
        style_invert(den, traj, tokens, null, StyleOptions(inner_steps=2, attention_weight=0.0))


def test_a_nan_in_sampling_or_reconstruction_stops_at_its_step() -> None:
    z0, cond, null, grid = setup()
    traj = ddim_invert(LinearDenoiser(a=0.1), z0, cond, grid, "p")
    with pytest.raises(NonFiniteError, match=r"inf in ε at step 3 of P2P sampling"):
        p2p_sample(Poisoned(3, math.inf), traj, plain_null(traj, null), cond)
    with pytest.raises(NonFiniteError, match=r"NaN in ε at step 1 of DDIM reconstruction"):
        ddim_reconstruct(Poisoned(1), traj)


def test_the_vae_is_named_when_it_decodes_or_encodes_non_finite_values(monkeypatch) -> None:
    from core_support import tiny_model

    m = tiny_model()
    z = torch.zeros(1, 4, 8, 8)
    decode, encode = m.vae.decode, m.vae.encode

    def nan_decode(*a, **k):
        out = decode(*a, **k)
        out.sample[0, 0, 0, 0] = math.nan
        return out

    def inf_encode(*a, **k):
        out = encode(*a, **k)
        out.latent_dist.mean[0, 0, 0, 0] = math.inf
        return out

    monkeypatch.setattr(m.vae, "decode", nan_decode)
    with pytest.raises(NonFiniteError, match=r"NaN in the decoded image at VAE decode \(fp32\): "
                       r"the values grew"):
        m.decode(z)
    monkeypatch.setattr(m.vae, "encode", inf_encode)
    with pytest.raises(NonFiniteError, match=r"inf in the photo's latent at VAE encode"):
        m.encode_image(torch.zeros(1, 3, 64, 64))


def test_finite_values_pass_and_the_first_bad_one_is_named() -> None:
    check_finite("P2P sampling", step=0, a=torch.ones(2), b=None)
    with pytest.raises(NonFiniteError, match=r"^inf in b at step 4 of P2P sampling \(bf16\)"):
        check_finite("P2P sampling", step=4, dtype=torch.bfloat16, a=torch.ones(2),
                     b=torch.tensor([1.0, math.inf]))
