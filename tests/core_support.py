"""Helpers for the core tests: the tiny SD1-shaped diffusers model, the demo photo, fake denoisers."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from nti_core.hosts.base import Rows, model_fingerprint
from nti_core.schedule import scaled_linear_alphas_cumprod

ROOT = Path(__file__).resolve().parents[1]
CAT = ROOT / "nti_core" / "assets" / "gnochi_mirror.jpeg"
CAT_PROMPT = "a cat sitting next to a mirror"


@lru_cache(maxsize=1)
def tiny_model():
    """The demo's random SD1-shaped model (seed 0), built once per test session."""
    from nti_core.hosts.diffusers_models import tiny_sd1

    return tiny_sd1(seed=0)


@lru_cache(maxsize=4)
def cat_latent(size: int = 128) -> Tensor:
    """z₀ of the cat photo under the tiny model's VAE."""
    from nti_core.images import load_image

    return tiny_model().encode_image(load_image(CAT, size))


# Real photos: the demo's, and scikit-image's bundled ones (offline), with fitting prompts.
PHOTOS = {
    "gnochi_mirror": CAT_PROMPT,
    "chelsea": "a cat lying on a wooden floor",
    "coffee": "a cup of coffee on a saucer",
}


@lru_cache(maxsize=8)
def photo_latent(name: str, size: int = 128) -> Tensor:
    """z₀ of a named real photo (see PHOTOS) under the tiny model's VAE."""
    from nti_core.images import from_array

    if name == "gnochi_mirror":
        return cat_latent(size)
    import skimage.data

    return tiny_model().encode_image(from_array(getattr(skimage.data, name)(), size))


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
