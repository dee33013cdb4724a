"""Checks that fail early with what was expected and what was received."""

from __future__ import annotations

from torch import Tensor

from .finite import check_finite


def check_latent(z: Tensor, name: str = "latent", batch: int | None = 1) -> None:
    """A latent must be [B, C, h, w] with finite values (NaN/inf: ``NonFiniteError`` naming the
    VAE as the likely cause — SDXL's VAE overflows in fp16)."""
    if z.ndim != 4:
        raise ValueError(f"{name} must be [B, C, h, w], got shape {tuple(z.shape)}")
    if batch is not None and z.shape[0] != batch:
        raise ValueError(f"{name} must hold {batch} image(s), got a batch of {z.shape[0]}")
    check_finite("input latent", **{name: z})


def check_context(c: Tensor, name: str = "embedding", batch: int | None = 1) -> None:
    """A text embedding must be [B, L, D]."""
    if c.ndim != 3:
        raise ValueError(f"{name} must be [B, tokens, dim], got shape {tuple(c.shape)}")
    if batch is not None and c.shape[0] != batch:
        raise ValueError(f"{name} must have batch {batch}, got {c.shape[0]}")


def check_prompt(text: str, name: str = "prompt") -> str:
    """A prompt must be text with at least one word; an unpaired UTF-16 surrogate (what a
    broken paste or an undecodable command-line byte leaves) is no character a tokenizer reads."""
    if not isinstance(text, str):
        raise ValueError(f"{name} must be text, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{name} is empty: write what the image shows, e.g. 'a cat sitting next to a mirror'")
    bad = next((c for c in text if "\ud800" <= c <= "\udfff"), None)
    if bad is not None:
        raise ValueError(f"{name} {text[:60]!r} holds {bad!r}, half of a surrogate pair and no "
                         "character: type that part of it again")
    return text.strip()
