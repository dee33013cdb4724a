"""Helpers for the core tests: the tiny SD1-shaped diffusers model, the demo photo, fake denoisers."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from nti_core.denoiser import Rows, model_fingerprint
from nti_core.schedule import scaled_linear_alphas_cumprod

ROOT = Path(__file__).resolve().parents[1]
CAT = ROOT / "nti_core" / "assets" / "gnochi_mirror.jpeg"
CAT_PROMPT = "a cat sitting next to a mirror"


# The tiny model's GroupNorms (16 groups), as a checkpoint of it declares them.
TINY_GROUPS = {"unet": {"norm_num_groups": 16}, "vae": {"norm_num_groups": 16}}


@lru_cache(maxsize=1)
def tiny_model():
    """The demo's random SD1-shaped model (seed 0), built once per test session."""
    from tiny_models import tiny_sd1

    return tiny_sd1(seed=0)


@lru_cache(maxsize=1)
def demo_model():
    """The trained demo model (nti_core/assets/demo_sd1.safetensors), loaded once per session."""
    from nti_core.hosts.diffusers.demo import demo_sd1

    return demo_sd1()


@lru_cache(maxsize=4)
def cat_latent(size: int = 128) -> Tensor:
    """z₀ of the cat photo under the tiny model's VAE."""
    from nti_core.images import load_image

    return tiny_model().encode_image(load_image(CAT, size))


# Real photos the demo model was trained on, with their captions as the demo model knows them.
PHOTOS = {
    "gnochi_mirror": "a photo of a cat sitting next to a mirror",
    "chelsea": "a photo of the face of a tabby cat",
    "coffee": "a photo of a cup of coffee on a saucer",
}


@lru_cache(maxsize=8)
def photo_image(name: str, size: int = 128) -> Tensor:
    """A named real photo (see PHOTOS) as [1, 3, size, size] in [−1, 1]."""
    from nti_core.hosts.diffusers.demo import photo_rgb
    from nti_core.images import from_array

    return from_array(photo_rgb(name), size)


@lru_cache(maxsize=8)
def demo_pivot(name: str, size: int = 128, steps: int = 20):
    """(photo [1, 3, s, s], Trajectory with maps) of a named photo on the demo model, once per
    session: the fidelity tests of several modules share it."""
    from nti_core import ddim_invert, make_grid

    m = demo_model()
    x = photo_image(name, size)
    c = m.encode_prompt(PHOTOS[name])
    traj = ddim_invert(m.denoiser, m.encode_image(x), c, make_grid(m.alphas_cumprod, steps),
                       PHOTOS[name], record_maps=True)
    return x, traj


@lru_cache(maxsize=8)
def demo_null_text(name: str, size: int = 128, steps: int = 20, attention_weight: float = 0.0):
    """Null-text ∅ (reference settings, optional attention loss) on ``demo_pivot``, once."""
    from nti_core import NullTextOptions, null_text_optimize

    m = demo_model()
    traj = demo_pivot(name, size, steps)[1]
    return null_text_optimize(m.denoiser, traj, m.encode_prompt(""),
                              NullTextOptions(attention_weight=attention_weight))


class LinearDenoiser:
    """ε = a·z + b(context): an analytic stand-in with a known, z-independent part."""

    def __init__(self, a: float = 0.0, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.a = a
        self.proj = torch.randn(8, 4, generator=g, dtype=torch.float64).float() * 0.1
        self._alphas = scaled_linear_alphas_cumprod()

    @property
    def alphas_cumprod(self) -> Tensor:
        return self._alphas

    def fingerprint(self) -> Tensor:
        return model_fingerprint([self.proj])

    def eps(self, z, t, context, *, rows: Rows | None = None, step=None, controller=None,
            value_context=None):
        b = context[:, :, :8].mean(1) @ self.proj  # [B, 4]
        return self.a * z + b[:, :, None, None] * (1 + t / 1000)


# ----------------------------------------------------------------------------- robust parity
# Kernel rounding differs between machines, thread counts and hosts (~1e-6 relative in ε here;
# about 1e-5 on another CI-like machine). Adam's step lr·m̂/(√v̂ + 1e-8) is about ±lr wherever
# a gradient is non-zero, whatever its size, so elements whose gradient is ~0 (its sign decided
# by rounding) take different steps: ∅ from two runs cannot agree elementwise to 1e-5 everywhere.
# What holds everywhere, and what the tests assert, is below; measured with ε perturbed by
# 3e-5 relative noise (tests/test_inversion.py::test_null_text_rerun…): Δ∅ max 1e-3, RMS 7e-5,
# 59 % of elements beyond 1e-5, none beyond 1e-3; losses within 3e-7; iterations equal.


def assert_same_uncond(ours, theirs, initial: Tensor) -> None:
    """Two ∅ runs of the same algorithm on the same inputs, up to kernel rounding.

    RMS(Δ∅) < 2e-4; < 1 % of elements differ by more than 1e-3 and none by 1e-2; |Δ∅| below 1e-3
    of the distance ∅ travelled from ``initial``; same iterations; losses within 1e-5.
    """
    a, b = ours.embeddings.float(), theirs.embeddings.float()
    diff = (a - b).abs()
    travelled = (a - initial.float().to(a.device)).norm()
    assert float(diff.pow(2).mean().sqrt()) < 2e-4, f"RMS of Δ∅ {float(diff.pow(2).mean().sqrt()):.3g}"
    assert float((diff > 1e-3).float().mean()) < 1e-2, "more than 1 % of ∅ differs by > 1e-3"
    assert float(diff.max()) < 1e-2, f"max |Δ∅| {float(diff.max()):.3g}"
    assert float((a - b).norm() / travelled) < 1e-3, "Δ∅ above 1e-3 of the distance travelled"
    assert ours.iterations == theirs.iterations
    for name in ("final_loss", "first_loss"):
        x, y = torch.tensor(getattr(ours, name)), torch.tensor(getattr(theirs, name))
        assert x.shape == y.shape and torch.allclose(x, y, rtol=1e-3, atol=1e-5), name


def assert_mostly_close(a: Tensor, b: Tensor, atol: float, share: float = 0.98) -> None:
    """Latents from two runs or hosts: RMS below ``atol``, at least ``share`` of the elements
    within ``atol`` and none beyond 10·atol (guidance 7.5 amplifies rounding in a few)."""
    diff = (a.float() - b.float()).abs()
    assert float(diff.pow(2).mean().sqrt()) < atol, f"RMS {float(diff.pow(2).mean().sqrt()):.3g}"
    assert float((diff <= atol).float().mean()) >= share, (
        f"only {float((diff <= atol).float().mean()):.2%} of elements within {atol}")
    assert float(diff.max()) < 10 * atol, f"max |Δ| {float(diff.max()):.3g}"


class NoisyDenoiser:
    """Wraps a denoiser and multiplies ε by (1 + rel·noise): kernel rounding of another machine,
    made on purpose (seeded)."""

    def __init__(self, denoiser, rel: float, seed: int = 0) -> None:
        self.denoiser, self.rel = denoiser, rel
        self.gen = torch.Generator().manual_seed(seed)

    def __getattr__(self, name: str):
        return getattr(self.denoiser, name)

    def eps(self, *args, **kwargs) -> Tensor:
        e = self.denoiser.eps(*args, **kwargs)
        return e * (1 + self.rel * torch.randn(e.shape, generator=self.gen).to(e))


# ----------------------------------------------------------------------------- the reference
DIFFUSERS_ENV = "NTI_DIFFUSERS_PATH"  # a huggingface/diffusers checkout (its examples/community)
COMMUNITY_NTI = Path("examples") / "community" / "pipeline_null_text_inversion.py"


def community_module(relative: Path = COMMUNITY_NTI):
    """A community pipeline module read from the diffusers checkout named by $NTI_DIFFUSERS_PATH
    (never copied here); skips, saying how to run it, when none is named."""
    import importlib.util
    import os

    import pytest

    root = os.environ.get(DIFFUSERS_ENV)
    if not root:
        pytest.skip(f"the reference-pipeline parity tests need ${DIFFUSERS_ENV}: a checkout of "
                    "huggingface/diffusers (git clone https://github.com/huggingface/diffusers)")
    path = Path(root).expanduser() / relative
    if not path.is_file():
        pytest.fail(f"${DIFFUSERS_ENV}={root} has no {relative}")
    spec = importlib.util.spec_from_file_location(f"nti_reference_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def community_null_text_pipeline(unet, vae, text_encoder, tokenizer, num_steps: int):
    """diffusers' community NullTextPipeline as its README builds it, on a copy of ``unet`` with
    diffusers' own attention processors (nothing of nti_core inside)."""
    import copy

    from diffusers import DDIMScheduler
    from diffusers.models.attention_processor import AttnProcessor2_0

    module = community_module()
    unet = copy.deepcopy(unet)
    unet.set_attn_processor(AttnProcessor2_0())
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False)
    pipe = module.NullTextPipeline(vae, text_encoder, tokenizer, unet, scheduler,
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.num_inference_steps = num_steps
    return pipe
