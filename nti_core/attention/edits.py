"""Prompt-to-Prompt attention edits (Hertz et al. 2022) and P2Plus (StyleDiffusion, Li et al.).

Batch layout: slot 0 = source prompt, slots 1…K = targets (target k uses row k−1 of every
per-target tensor). On conditional rows, after the softmax and without renormalising:
    cross:  A_tgt ← edit(A_src, A_tgt)·α_i + A_tgt·(1 − α_i)       α_i = cross_alpha[step i]
            edit = Replace  A_src·M                (M [L, L] source × target)
                 | Refine   A_src[…, m]·a + A_tgt·(1 − a)       (m, a [L] from the alignment)
                 | none     A_src                  (target prompt = source prompt)
            then Reweight multiplies edit by the equaliser e [L].
    self:   A_tgt ← A_src where Nq ≤ self_max_pixels (32², or 16² as the P2P notebook) and
            lo ≤ step < hi.
P2Plus also injects the source's self-attention into the targets' *unconditional* rows, into
maps up to 32² whatever self_max_pixels is (as StyleDiffusion's official code).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..denoiser import Rows, Site, attention_probs, sdpa
from .controller import MAX_MAP_PIXELS, AttentionStore, Branch, by_branch, probs_times_v


def blend_map_size(latent_hw: tuple[int, int]) -> tuple[int, int]:
    """Query size two downsamplings below the latent (64 → 16 for SD1 at 512²; ceil per conv)."""
    h, w = ((((n + 1) // 2) + 1) // 2 for n in latent_hw)
    return h, w


def region_mask(mask: Tensor, latent_hw: tuple[int, int]) -> Tensor:
    """A user's mask (1 = may change) → [1, 1, h, w] at the latent's size, area-averaged.

    ``mask`` [H, W] or [1, H, W] in 0…1 at the latent's size or the image's (any aspect ratio:
    the latent's; see :func:`latent_window`)."""
    h, w = latent_hw
    if not isinstance(mask, Tensor) or mask.ndim not in (2, 3):
        raise ValueError(f"expected a mask [H, W] or [1, H, W], got "
                         f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
    if mask.ndim == 3 and mask.shape[0] != 1:
        raise ValueError(f"expected one mask, got a batch of {mask.shape[0]}: pick one "
                         "(1 = may change)")
    m = mask.reshape(1, 1, *mask.shape[-2:]).float()
    if not bool(torch.isfinite(m).all()) or float(m.min()) < 0 or float(m.max()) > 1:
        raise ValueError(f"mask values must lie in 0…1 (1 = may change), got "
                         f"{float(m.min()):g}…{float(m.max()):g}")
    big_h, big_w = m.shape[-2:]
    window = latent_window((big_h, big_w), latent_hw)
    if window is None:
        raise ValueError(f"the mask is {big_w}×{big_h} (width×height) but the image is "
                         f"{w}×{h} latent cells: give the mask at the image's size or the "
                         "latent's")
    f, top, left = window
    return F.interpolate(m[..., top : top + f * h, left : left + f * w], size=(h, w),
                         mode="area")


def latent_window(big_hw: tuple[int, int], latent_hw: tuple[int, int]
                  ) -> tuple[int, int, int] | None:
    """(f, top, left) when an image of ``big_hw`` covers the latent ``latent_hw`` as f·h × f·w
    for a whole factor f (the latent's own size: 1; SD's VAE: 8) plus fewer than f rows and
    columns that VAE Encode crops from the centre (ComfyUI crops 100×70 px to 96×64); None when
    it is of another shape (another aspect ratio, another image)."""
    (big_h, big_w), (h, w) = big_hw, latent_hw
    f = big_h // h
    if f < 1 or big_w // w != f or big_h - f * h >= f or big_w - f * w >= f:
        return None
    return f, (big_h - f * h) // 2, (big_w - f * w) // 2


@dataclass
class LocalBlend:
    """P2P local blending: keep target latents equal to the source outside the region allowed
    to change — the edited words' mask, the user's own mask (``region``), or both (their product:
    the change stays inside both).

    ``words`` / ``subtract`` [K+1, L]: 1 at the token positions of the chosen words of each slot
    (``words`` None: no word mask). From ``start_step`` on, mask_s = threshold(normalise(
    upsample(maxpool₃ₓ₃(mean_layers Σ_words A_s)))) OR mask_0, from the summed 16×16 maps, times
    ``region`` [1, 1, h, w] in 0…1 (see :func:`region_mask`); z_s ← z_0 + mask_s·(z_s − z_0).
    """

    words: Tensor | None
    start_step: int
    threshold: float = 0.3
    subtract: Tensor | None = None
    subtract_threshold: float = 0.3
    region: Tensor | None = None
    last_mask: Tensor | None = field(default=None, repr=False, compare=False)  # [K+1, 1, h, w]

    def mask(self, store: AttentionStore, latent_hw: tuple[int, int], select: Tensor,
             pool: bool, threshold: float) -> Tensor:
        """Boolean mask [K+1, 1, h, w] from the store's summed maps at latent_hw/4."""
        hw = blend_map_size(latent_hw)
        maps = torch.stack([store.sums(hw, s) for s in range(select.shape[0])])  # [S, n, h, w, L]
        sel = select.to(maps.device, maps.dtype)[:, None, None, None, :]
        m = (maps * sel).sum(-1).mean(1, keepdim=True)  # [S, 1, h, w]
        if pool:
            m = F.max_pool2d(m, 3, stride=1, padding=1)
        m = F.interpolate(m, size=tuple(latent_hw))
        m = m / m.amax(dim=(2, 3), keepdim=True)
        m = m > threshold
        return m[:1] | m

    def __post_init__(self) -> None:
        if self.words is None and self.region is None:
            raise ValueError("LocalBlend needs blend words, a mask, or both")

    def word_mask(self, store: AttentionStore, hw: tuple[int, int], words: Tensor,
                  rows: int) -> Tensor:
        """The words' boolean mask [K+1, 1, h, w] (blend words minus subtract words)."""
        if rows != words.shape[0]:
            raise ValueError(f"local blend was built for {words.shape[0]} prompts, "
                             f"got {rows} latents")
        if blend_map_size(hw) not in store.resolutions():
            raise ValueError(
                f"LocalBlend reads the cross-attention maps at a quarter of the latent side "
                f"({blend_map_size(hw)}), but this model has maps at {store.resolutions()} only: "
                "leave the blend words empty for it"
            )
        mask = self.mask(store, hw, words, True, self.threshold)
        if self.subtract is not None:
            mask = mask & ~self.mask(store, hw, self.subtract, False, self.subtract_threshold)
        return mask

    def __call__(self, step: int, latents: Tensor, store: AttentionStore) -> Tensor:
        """latents [K+1, C, h, w] → blended latents (unchanged before ``start_step``)."""
        if step < self.start_step:
            return latents
        hw = (int(latents.shape[-2]), int(latents.shape[-1]))
        rows = latents.shape[0]
        mask: Tensor = (torch.ones(rows, 1, *hw, dtype=torch.bool, device=latents.device)
                        if self.words is None else self.word_mask(store, hw, self.words, rows))
        if self.region is not None:
            if tuple(self.region.shape[-2:]) != hw:
                raise ValueError(f"the mask was made for a {tuple(self.region.shape[-2:])} "
                                 f"latent, got {hw}")
            mask = mask.to(latents.dtype) * self.region.to(latents.device, latents.dtype)
        self.last_mask = mask
        return latents[:1] + mask.to(latents.dtype) * (latents - latents[:1])


class P2PController:
    """Prompt-to-Prompt controller for slots [source, target 1…K] (see module docstring).

    cross_alpha [N+1, K, L]; replace [K, L, L] or refine = (mapper [K, L] int64, alphas [K, L]),
    at most one of them; equalizer [K, L]; self_range / uncond_self_range: [lo, hi) steps.
    Self-attention is injected only into maps of at most ``self_max_pixels`` query positions
    (32² as the null-text notebook; 16² as the P2P notebook and diffusers' Prompt2PromptPipeline);
    cross-attention maps are stored up to ``max_pixels``.
    ``store_edited`` records target maps after the edit (what the reference's in-place write does).
    """

    def __init__(
        self,
        cross_alpha: Tensor,
        self_range: tuple[int, int] = (0, 0),
        *,
        replace: Tensor | None = None,
        refine: tuple[Tensor, Tensor] | None = None,
        equalizer: Tensor | None = None,
        local_blend: LocalBlend | None = None,
        uncond_self_range: tuple[int, int] = (0, 0),
        max_pixels: int = MAX_MAP_PIXELS,
        self_max_pixels: int = MAX_MAP_PIXELS,
        store: AttentionStore | None = None,
        store_edited: bool = True,
    ) -> None:
        if replace is not None and refine is not None:
            raise ValueError("choose replace or refine, not both")
        self.n_targets = int(cross_alpha.shape[1])
        length = int(cross_alpha.shape[2])
        for name, t, shape in (("replace", replace, (self.n_targets, length, length)),
                               ("equalizer", equalizer, (self.n_targets, length)),
                               ("refine mapper", refine and refine[0], (self.n_targets, length)),
                               ("refine alphas", refine and refine[1], (self.n_targets, length))):
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        self.cross_alpha = cross_alpha.float()
        self.self_range, self.uncond_self_range = self_range, uncond_self_range
        self.replace, self.refine, self.equalizer = replace, refine, equalizer
        self.local_blend = local_blend
        self.max_pixels, self.self_max_pixels = max_pixels, self_max_pixels
        self.store = store if store is not None else AttentionStore(max_pixels)
        self.store_edited = store_edited
        self._cache: dict[tuple[str, int, torch.device, torch.dtype], Tensor] = {}

    def _on(self, name: str, k: int, t: Tensor, like: Tensor) -> Tensor:
        dtype = t.dtype if t.dtype == torch.long else like.dtype
        key = (name, k, like.device, dtype)
        if key not in self._cache:
            self._cache[key] = t[k].to(like.device, dtype)
        return self._cache[key]

    def alpha(self, step: int) -> Tensor:
        """Cross-injection α [K, L] at ``step`` (zero past the schedule)."""
        if 0 <= step < self.cross_alpha.shape[0]:
            return self.cross_alpha[step]
        return torch.zeros_like(self.cross_alpha[0])

    def edit_cross(self, a_src: Tensor, a_tgt: Tensor, k: int, alpha: Tensor) -> Tensor:
        """Edited cross-attention of target k: a_src, a_tgt [h, Nq, L] → [h, Nq, L]."""
        if a_tgt.shape[-1] != self.cross_alpha.shape[2]:
            raise ValueError(f"cross-attention has {a_tgt.shape[-1]} tokens, the edit was built "
                             f"for {self.cross_alpha.shape[2]}")
        if self.replace is not None:
            base = torch.matmul(a_src, self._on("replace", k, self.replace, a_src))
        elif self.refine is not None:
            a = self._on("refine_a", k, self.refine[1], a_src)
            base = a_src[..., self._on("refine_m", k, self.refine[0], a_src)] * a + a_tgt * (1 - a)
        else:
            base = a_src
        if self.equalizer is not None:
            base = base * self._on("eq", k, self.equalizer, a_src)
        w = alpha[k].to(a_src.device, a_src.dtype)
        return base * w + a_tgt * (1 - w)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, heads: int, site: Site,
               hw: tuple[int, int], step: int, rows: Rows) -> Tensor:
        """Attention output [B, Nq, h·d] with the edits of this step applied."""
        slots = rows.slot.to(q.device)
        small = hw[0] * hw[1] <= self.self_max_pixels
        if site.cross:
            alpha = self.alpha(step)
            edit = bool((alpha != 0).any())
            if not (edit or self.store.wants(site, hw)):
                return sdpa(q, k, v, heads)

            def cond(q: Tensor, k: Tensor, v: Tensor, idx: Tensor) -> Tensor:
                return self._cross(q, k, v, heads, site, hw, step, slots[idx], alpha, edit)

            return by_branch(q, k, v, rows, lambda q, k, v, _: sdpa(q, k, v, heads), cond)
        inject_c = small and self.self_range[0] <= step < self.self_range[1]
        # P2Plus reaches every map up to 32×32 whatever self_max_pixels says, as the official
        # code's unconditional injection does
        inject_u = (hw[0] * hw[1] <= MAX_MAP_PIXELS
                    and self.uncond_self_range[0] <= step < self.uncond_self_range[1])
        if not (inject_c or inject_u):
            return sdpa(q, k, v, heads)

        def branch(on: bool) -> Branch:
            def run(q: Tensor, k: Tensor, v: Tensor, idx: Tensor) -> Tensor:
                return self._self(q, k, v, heads, slots[idx]) if on else sdpa(q, k, v, heads)

            return run

        return by_branch(q, k, v, rows, branch(inject_u), branch(inject_c))

    def _source_row(self, slots: Tensor, what: str) -> int:
        src = (slots == 0).nonzero()
        if src.numel() != 1:
            raise RuntimeError(f"{what} needs exactly one source row (slot 0) in the same call "
                               f"as the targets, got slots {slots.tolist()}")
        return int(src[0, 0])

    def _cross(self, q: Tensor, k: Tensor, v: Tensor, heads: int, site: Site,
               hw: tuple[int, int], step: int, slots: Tensor, alpha: Tensor, edit: bool) -> Tensor:
        p = attention_probs(q, k, heads)  # [n, h, Nq, L]
        record = self.store.wants(site, hw)
        if record and not self.store_edited:
            self.store.record(site, hw, step, slots, p.mean(1))
        if edit and bool((slots > 0).any()):
            s = self._source_row(slots, "cross-attention injection")
            rows = []
            for r, slot in enumerate(slots.tolist()):
                if slot > self.n_targets:
                    raise ValueError(f"slot {slot} but the edit has {self.n_targets} targets")
                rows.append(p[r] if slot == 0 else self.edit_cross(p[s], p[r], slot - 1, alpha))
            p = torch.stack(rows)
        if record and self.store_edited:
            self.store.record(site, hw, step, slots, p.mean(1))
        return probs_times_v(p, v)

    def _self(self, q: Tensor, k: Tensor, v: Tensor, heads: int, slots: Tensor) -> Tensor:
        if not bool((slots > 0).any()):
            return sdpa(q, k, v, heads)
        s = self._source_row(slots, "self-attention injection")
        p = attention_probs(q[s : s + 1], k[s : s + 1], heads)  # [1, h, Nq, Nq]
        return probs_times_v(p.expand(q.shape[0], -1, -1, -1), v)

    def after_step(self, step: int, latents: Tensor) -> Tensor:
        """LocalBlend (when configured) on latents [K+1, C, h, w]."""
        if self.local_blend is None:
            return latents
        return self.local_blend(step, latents, self.store)
