"""The engine's contract with a host (diffusers, ComfyUI): the ``Denoiser`` the math calls (ε with
the attention controller's hooks installed), the ``Controller`` it hooks in, and the ``Model`` the
pipeline (``nti_core.editing``) runs on. A host implements these; the engine never imports one.

Both hosts hand a controller the same picture of a batch: every row is labelled with its branch
(conditional or unconditional) and its prompt slot (0 = source, 1… = targets); the step comes from
the schedule, the site is a stable id of the attention layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .family import Family
    from .tokenizer import TokenizerSpec


class Rows(NamedTuple):
    """Per-row labels of a batch: ``branch`` True = conditional; ``slot`` 0 = source, 1… = targets."""

    branch: Tensor  # [B] bool
    slot: Tensor  # [B] int64

    @staticmethod
    def make(branches: list[bool], slots: list[int], device: torch.device | str = "cpu") -> Rows:
        return Rows(
            torch.tensor(branches, dtype=torch.bool, device=device),
            torch.tensor(slots, dtype=torch.long, device=device),
        )

    @staticmethod
    def cond(n_slots: int, device: torch.device | str = "cpu") -> Rows:
        """Conditional rows only, one per prompt slot."""
        return Rows.make([True] * n_slots, list(range(n_slots)), device)

    @staticmethod
    def cfg(n_slots: int, device: torch.device | str = "cpu") -> Rows:
        """[uncond slots 0..n-1 | cond slots 0..n-1]: the layout the samplers here build."""
        return Rows.make(
            [False] * n_slots + [True] * n_slots, list(range(n_slots)) * 2, device
        )

    def __len__(self) -> int:  # type: ignore[override]
        return int(self.branch.shape[0])


class Site(NamedTuple):
    """Stable id of one attention layer: ComfyUI's (block, number, depth) plus self/cross."""

    block: str  # "input" | "middle" | "output"
    index: int
    depth: int
    cross: bool

    def __str__(self) -> str:
        return f"{self.block}.{self.index}.{self.depth}.{'attn2' if self.cross else 'attn1'}"


class Controller(Protocol):
    """Owns one run's attention state; never learns who hosts it."""

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        heads: int,
        site: Site,
        hw: tuple[int, int],
        step: int,
        rows: Rows,
    ) -> Tensor:
        """q [B, Nq, h·d], k/v [B, Nk, h·d] (projected) → attention output [B, Nq, h·d].

        ``hw`` is the query map's (height, width); ``step`` the sampling step index (0 = noisiest).
        """
        ...

    def after_step(self, step: int, latents: Tensor) -> Tensor:
        """Called by the sampler after each denoising step with the latents of all slots."""
        ...


class Denoiser(Protocol):
    """A host's UNet: ε for latents at an integer timestep, with the controller's hooks installed."""

    def eps(
        self,
        z: Tensor,
        t: int,
        context: Tensor,
        *,
        rows: Rows | None = None,
        step: int | None = None,
        controller: Controller | None = None,
        value_context: Tensor | None = None,
    ) -> Tensor:
        """z [B, 4, h, w], context [B, L, D] (one row per latent) → ε [B, 4, h, w].

        ``rows`` default: all conditional, slots 0..B-1. ``step`` is what the controller is told.
        ``value_context`` (same shape as context) feeds the values of conditional cross-attention.
        Gradients flow to ``context`` when it requires grad.
        """
        ...

    @property
    def alphas_cumprod(self) -> Tensor:
        """ᾱ of the model's training schedule, [1000] float64."""
        ...

    def fingerprint(self) -> Tensor:
        """A small float64 vector that identifies the weights (compare with ``same_model``)."""
        ...

    # Optional: ``dtype``, the dtype the UNet computes in (read with ``compute_dtype``);
    # ``guide(z, t, eps_u, eps_c, w, *, cond, uncond) -> Tensor | None``, the host's own
    # guidance (ComfyUI: the MODEL's CFG functions), None when it has none (read by ``guided``).


class Model(Protocol):
    """A host's whole model as the pipeline reads it: the denoiser, the text encoder(s) and the
    tokenizer its prompts are aligned with (the VAE stays with the caller)."""

    @property
    def denoiser(self) -> Denoiser: ...

    @property
    def family(self) -> Family: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def unet(self) -> torch.nn.Module:
        """The UNet's module (what an fp32 optimisation of a half model copies)."""
        ...

    def encode_prompt(self, text: str) -> Tensor:
        """Prompt → the family's embedding [1, 77 (+1), D] (``nti_core.family``)."""
        ...

    def plan_tokenizer(self) -> TokenizerSpec:
        """The tokenizer the edit plan finds words with: the model's own."""
        ...


def compute_dtype(denoiser: Denoiser) -> torch.dtype | None:
    """The dtype the denoiser's UNet computes in (None when it does not say: test doubles)."""
    return getattr(denoiser, "dtype", None)


def guided(
    denoiser: Denoiser, z: Tensor, t: int, eps_u: Tensor, eps_c: Tensor, w: float, *,
    cond: Tensor, uncond: Tensor,
) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): ε = ε_∅ + w(ε_c − ε_∅), or the host's
    own guidance when the denoiser's optional ``guide`` gives one. z, ε_∅, ε_c [B, 4, h, w];
    cond, uncond [B, L, D]: the contexts of the rows ε_c and ε_∅ were computed with."""
    guide = getattr(denoiser, "guide", None)
    eps = None if guide is None else guide(z, t, eps_u, eps_c, w, cond=cond, uncond=uncond)
    return eps_u + w * (eps_c - eps_u) if eps is None else eps


def value_rows(rows: Rows, context: Tensor, value_context: Tensor | None) -> Tensor | None:
    """Cross-attention value input per row: ``value_context`` on conditional rows, ``context``
    on unconditional ones (StyleDiffusion's learned values feed only the conditional branch)."""
    if value_context is None:
        return None
    keep = rows.branch.to(context.device)[:, None, None]
    return torch.where(keep, value_context.to(context), context)


def sdpa(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Plain multi-head attention on projected q/k/v [B, N, h·d] → [B, Nq, h·d]."""
    b, nq, inner = q.shape
    d = inner // heads
    q, k, v = (x.reshape(b, -1, heads, d).transpose(1, 2) for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, nq, inner)


def split_heads(x: Tensor, heads: int) -> Tensor:
    """[B, N, h·d] → [B, h, N, d]."""
    b, n, inner = x.shape
    return x.reshape(b, n, heads, inner // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """[B, h, N, d] → [B, N, h·d]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def attention_probs(q: Tensor, k: Tensor, heads: int) -> Tensor:
    """softmax(QKᵀ/√d) per head: q [B, Nq, h·d], k [B, Nk, h·d] → [B, h, Nq, Nk] (fp32 softmax)."""
    qh, kh = split_heads(q, heads), split_heads(k, heads)
    scale = qh.shape[-1] ** -0.5
    scores = torch.matmul(qh.float() * scale, kh.float().transpose(-1, -2))
    return scores.softmax(dim=-1).to(q.dtype)


def model_fingerprint(tensors: list[Tensor]) -> Tensor:
    """Name-free weight fingerprint: the sorted per-tensor (mean, std) values, float64.

    Independent of key names and storage dtype, so the same weights loaded by two hosts agree
    to ~1e-3 relative; different weights differ by far more.
    """
    stats = []
    for t in tensors:  # on the tensor's own device, in fp32 at least: no copy of the weights
        x = t.detach()
        x = x if x.dtype == torch.float64 else x.float()
        std, mean = torch.std_mean(x) if x.numel() > 1 else (x.new_zeros(()), x.mean())
        stats += [mean.double().cpu(), std.double().cpu()]
    return torch.stack(stats).sort().values if stats else torch.zeros(0, dtype=torch.float64)


def same_model(a: Tensor, b: Tensor, rtol: float = 1e-3, atol: float = 1e-6) -> bool:
    """Whether two fingerprints come from the same weights (tolerant to fp16/fp32 storage)."""
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=rtol, atol=atol))
