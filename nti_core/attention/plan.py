"""From prompts and user options to a ready :class:`P2PController` (all checks before sampling).

Defaults are those of the null-text notebook of google/prompt-to-prompt: cross injection 0.8,
self injection 0.5 into maps up to 32×32, local-blend threshold 0.3 from step ⌊0.2·N⌋. ``uncond_self`` is P2Plus's τ_u
(StyleDiffusion; 0 = off).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..alignment import (
    Tokenized,
    WordValues,
    equalizers,
    refine_alignment,
    replace_mapper,
    tokenize,
)
from ..tokenizer import TokenizerSpec
from .controller import AttentionStore
from .edits import LocalBlend, P2PController, blend_map_size, region_mask
from .schedules import Bounds, CrossSpec, cross_injection_alpha, injection_range

EditMode = Literal["auto", "replace", "refine", "reweight"]
EDIT_MODES: tuple[EditMode, ...] = ("auto", "replace", "refine", "reweight")
# Largest self-attention map side that receives the source's self-attention: 32 as the null-text
# notebook (the default), 16 as the P2P notebook and diffusers' Prompt2PromptPipeline.
SELF_LIMITS = (32, 16)


def word_selection(toks: Sequence[Tokenized], words: Sequence[str] | Sequence[Sequence[str]],
                   what: str = "blend") -> Tensor:
    """[S, L] with 1 at the chosen words' tokens of each prompt.

    A flat list looks every word up in every prompt (it must occur in at least one); a list of
    lists gives each prompt its own words (each must occur in that prompt).
    """
    sel = torch.zeros(len(toks), toks[0].max_length)
    if words and not isinstance(words[0], str):
        if len(words) != len(toks):
            raise ValueError(f"{what} words: got {len(words)} lists for {len(toks)} prompts")
        for s, (t, ws) in enumerate(zip(toks, words, strict=True)):
            for w in ws:
                sel[s, t.indices(w)] = 1.0
        return sel
    for w in words:
        found = [t.find(w) for t in toks]  # type: ignore[arg-type]
        if all(f is None for f in found):
            listed = ", ".join(repr(t.text) for t in toks)
            raise ValueError(f"{what} word {w!r} is in none of the prompts {listed}")
        for s, inds in enumerate(found):
            if inds is not None:
                sel[s, inds] = 1.0
    return sel


@dataclass(frozen=True)
class P2PSpec:
    """A Prompt-to-Prompt edit as the user states it (prompts, words, fractions of the N steps)."""

    source: str
    targets: tuple[str, ...]
    mode: EditMode = "replace"
    cross: CrossSpec = 0.8
    self_steps: Bounds = 0.5
    reweight: WordValues | None = None
    blend_words: tuple[str, ...] | tuple[tuple[str, ...], ...] = ()
    subtract_words: tuple[str, ...] | tuple[tuple[str, ...], ...] = ()
    blend_threshold: float = 0.3
    blend_start: float = 0.2
    uncond_self: Bounds = 0.0
    store_edited: bool = True
    self_limit: int = SELF_LIMITS[0]  # self-attention injected into maps ≤ self_limit² only

    def build(self, tokenizer: TokenizerSpec, num_steps: int, keep_step_maps: bool = False,
              latent_hw: tuple[int, int] | None = None,
              mask: Tensor | None = None) -> P2PController:
        """Tokenise, align and schedule; raises ValueError on anything inconsistent.
        ``keep_step_maps``: the store keeps per-step layer means (for the attention-map view);
        ``latent_hw``: lets a LocalBlend-only store keep the one size it reads; ``mask``: the
        user's own region (1 = may change, see ``edits.region_mask``; needs ``latent_hw``)."""
        return build_p2p(tokenizer, self, num_steps, keep_step_maps, latent_hw, mask)


def resolve_mode(mode: EditMode, source: str, targets: Sequence[str], src: Tokenized,
                 tgts: Sequence[Tokenized]) -> EditMode:
    """``auto``: reweight when every target is the source, replace when every target has the
    source's word count, refine otherwise."""
    if mode != "auto":
        return mode
    if all(t.ids == src.ids for t in tgts):
        return "reweight"
    if all(len(t.split()) == len(source.split()) for t in targets):
        return "replace"
    return "refine"


def build_p2p(tokenizer: TokenizerSpec, spec: P2PSpec, num_steps: int,
              keep_step_maps: bool = False,
              latent_hw: tuple[int, int] | None = None,
              mask: Tensor | None = None) -> P2PController:
    """The controller for slots [source, *targets] (see :class:`P2PSpec`); ``mask`` confines
    the change like LocalBlend, from the same start step (with blend words: their product).

    Its store materialises only what is read: every small cross-attention map for the
    attention-map view (``keep_step_maps``); else LocalBlend's quarter-side maps (all sizes up
    to 32² when ``latent_hw`` is unknown); else nothing."""
    targets = (spec.targets,) if isinstance(spec.targets, str) else tuple(spec.targets)
    if not targets:
        raise ValueError("P2P needs at least one target prompt")
    if spec.self_limit not in SELF_LIMITS:
        raise ValueError(f"self-attention limit must be one of {SELF_LIMITS} (map side in "
                         f"positions), got {spec.self_limit!r}")
    if spec.mode not in EDIT_MODES:
        raise ValueError(f"mode must be one of {EDIT_MODES}, got {spec.mode!r}")
    src = tokenize(tokenizer, spec.source)
    tgts = [tokenize(tokenizer, t) for t in targets]
    mode = resolve_mode(spec.mode, spec.source, targets, src, tgts)
    replace = refine = None
    if mode == "replace":
        replace = torch.stack([replace_mapper(tokenizer, spec.source, t) for t in targets])
    elif mode == "refine":
        pairs = [refine_alignment(tokenizer, spec.source, t) for t in targets]
        refine = (torch.stack([m for m, _ in pairs]), torch.stack([a for _, a in pairs]))
    else:
        for t in tgts:
            if t.ids != src.ids:
                raise ValueError(f"reweight alone keeps the source prompt, but target {t.text!r} "
                                 f"differs from source {src.text!r}: use replace or refine")
    eq = equalizers(tgts, spec.reweight) if spec.reweight else None
    if spec.subtract_words and not spec.blend_words:
        raise ValueError("subtract words need blend words")
    if mask is not None and latent_hw is None:
        raise ValueError("a mask needs the latent's size (latent_hw) to be resized to it")
    region = None if mask is None else region_mask(mask, latent_hw)  # type: ignore[arg-type]
    blend = None
    if spec.blend_words or region is not None:
        toks = [src, *tgts]
        if not 0.0 <= spec.blend_start <= 1.0:
            raise ValueError(f"blend start must be a fraction in [0, 1], got {spec.blend_start}")
        words = word_selection(toks, spec.blend_words) if spec.blend_words else None
        sub = word_selection(toks, spec.subtract_words, "subtract") if spec.subtract_words else None
        blend = LocalBlend(words, int(spec.blend_start * num_steps), spec.blend_threshold, sub,
                           spec.blend_threshold, region)
    return P2PController(
        cross_injection_alpha(num_steps, spec.cross, targets, tokenizer),
        injection_range(num_steps, spec.self_steps),
        replace=replace, refine=refine, equalizer=eq, local_blend=blend,
        uncond_self_range=injection_range(num_steps, spec.uncond_self, "unconditional self injection"),
        store_edited=spec.store_edited, self_max_pixels=spec.self_limit**2,
        store=_store(keep_step_maps, bool(spec.blend_words), latent_hw),
    )


def _store(keep_step_maps: bool, blend: bool, latent_hw: tuple[int, int] | None) -> AttentionStore:
    if keep_step_maps:
        return AttentionStore(step_means=True)
    if blend:
        return AttentionStore(sizes=None if latent_hw is None else [blend_map_size(latent_hw)])
    return AttentionStore(max_pixels=0)
