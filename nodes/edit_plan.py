"""NTIAttentionEditPlan: source and target prompts plus Prompt-to-Prompt options → an edit plan.

Everything a plan can get wrong is found by ``validate_inputs`` when the prompt is queued (the
same checks run again at execution, for values that arrive through links).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from comfy_api.latest import io

from ..nti_core.alignment import parse_word_values
from ..nti_core.attention.plan import SELF_LIMITS, P2PSpec, build_p2p
from ..nti_core.validate import check_prompt
from . import types
from .common import CATEGORY, encode_prompt, intermediate, sd1_tokenizer

EDIT_KINDS = ["auto", "replace", "refine"]
SELF_LIMIT_OPTIONS = [f"{n}x{n}" for n in SELF_LIMITS]  # "32x32" (default), "16x16"
VALIDATION_STEPS = 50  # the real N is known only at sampling; schedules are rebuilt there


def _fraction(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value}")
    return float(value)


def _bounds(name: str, start: float, end: float) -> tuple[float, float]:
    start, end = _fraction(f"{name}_start", start), _fraction(f"{name}_end", end)
    if start > end:
        raise ValueError(f"{name}_start ({start}) is after {name}_end ({end})")
    return start, end


def _words(text: str) -> tuple[str, ...]:
    return tuple(w for w in re.split(r"[,\s]+", text or "") if w)


def targets_of(target_prompts: str) -> tuple[str, ...]:
    """One target prompt per non-empty line."""
    lines = tuple(line.strip() for line in (target_prompts or "").splitlines() if line.strip())
    if not lines:
        raise ValueError("write at least one target prompt (one per line)")
    return lines


def spec_from_inputs(source_prompt: str, target_prompts: str, edit_kind: str, cross_start: float,
                     cross_end: float, cross_words: str, self_start: float, self_end: float,
                     reweight: str, blend_words: str, subtract_words: str,
                     blend_threshold: float, blend_start: float,
                     self_limit: str = SELF_LIMIT_OPTIONS[0],
                     uncond_self_end: float = 0.0) -> P2PSpec:
    """The node's widget values → P2PSpec (syntax and ranges checked; words are checked by
    ``build_p2p``)."""
    if edit_kind not in EDIT_KINDS:
        raise ValueError(f"edit_kind must be one of {EDIT_KINDS}, got {edit_kind!r}")
    source = check_prompt(source_prompt, "source prompt")
    targets = targets_of(target_prompts)
    default = _bounds("cross", cross_start, cross_end)
    cross: Any = default
    if (cross_words or "").strip():
        cross = {"default_": default}
        for word, end in parse_word_values(cross_words):
            if not 0.0 <= end <= 1.0:
                raise ValueError(f"cross_words: {word!r} needs a fraction in [0, 1], got {end}")
            if end < default[0]:
                raise ValueError(f"cross_words: {word!r} ends at {end}, before cross_start "
                                 f"({default[0]})")
            cross[word] = (default[0], end)
    if (reweight or "").strip():
        parse_word_values(reweight)  # syntax first; the words are looked up by build_p2p
    if self_limit not in SELF_LIMIT_OPTIONS:
        raise ValueError(f"self_limit must be one of {SELF_LIMIT_OPTIONS}, got {self_limit!r}")
    return P2PSpec(
        source=source,
        targets=targets,
        mode=edit_kind,  # type: ignore[arg-type]
        cross=cross,
        self_steps=_bounds("self", self_start, self_end),
        reweight=reweight.strip() or None,
        blend_words=_words(blend_words),
        subtract_words=_words(subtract_words),
        blend_threshold=_fraction("blend_threshold", blend_threshold),
        blend_start=_fraction("blend_start", blend_start),
        self_limit=SELF_LIMITS[SELF_LIMIT_OPTIONS.index(self_limit)],
        uncond_self=_fraction("uncond_self_end", uncond_self_end),
    )


def check_plan(spec: P2PSpec, num_steps: int = VALIDATION_STEPS) -> None:
    """Tokenise, align and schedule with the CLIP tokenizer (every family's vocabulary); ValueError says what is wrong."""
    build_p2p(sd1_tokenizer(), spec, num_steps)


PLAN_INPUTS = ("source_prompt", "target_prompts", "edit_kind", "cross_start", "cross_end",
               "cross_words", "self_start", "self_end", "reweight", "blend_words",
               "subtract_words", "blend_threshold", "blend_start", "self_limit", "uncond_self_end")


class NTIAttentionEditPlan(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        frac = {"min": 0.0, "max": 1.0, "step": 0.01}
        return io.Schema(
            node_id="NTIAttentionEditPlan",
            display_name="Attention Edit Plan (NTI)",
            category=CATEGORY,
            description="Prompt-to-Prompt edit: which prompts, how the source's attention is "
            "injected, reweighted words and the local blend. Checked when the prompt is queued.",
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP used for DDIM Invert (NTI): encodes the "
                              "target prompts."),
                io.String.Input("source_prompt", multiline=True, default="",
                                tooltip="Exactly the source prompt given to DDIM Invert (NTI); "
                                "P2P Sample (NTI) checks it."),
                io.String.Input("target_prompts", multiline=True, default="",
                                tooltip="One edited prompt per line; each gives one edited "
                                "image."),
                io.Combo.Input("edit_kind", options=EDIT_KINDS, default="auto",
                               tooltip="'replace': swap words, same word count as the source; "
                               "'refine': add or change words (aligned tokens keep the source's "
                               "attention); 'auto': replace when word counts match, refine "
                               "otherwise, reweight only when the targets equal the source."),
                io.Float.Input("cross_start", default=0.0, **frac,
                               tooltip="Fraction of the steps where cross-attention injection "
                               "starts (0 = first, noisiest step)."),
                io.Float.Input("cross_end", default=0.8, **frac,
                               tooltip="Fraction of the steps where cross-attention injection "
                               "ends; later steps use the targets' own maps."),
                io.String.Input("cross_words", default="",
                                tooltip="Optional per-word cross-injection end for words of the "
                                "targets: 'word:fraction, …' (starts at cross_start)."),
                io.Float.Input("self_start", default=0.0, **frac,
                               tooltip="Fraction of the steps where self-attention injection "
                               "starts."),
                io.Float.Input("self_end", default=0.5, **frac,
                               tooltip="Fraction of the steps where self-attention injection "
                               "ends (higher keeps more of the photo's layout)."),
                io.String.Input("reweight", default="",
                                tooltip="Scale words' attention in the targets: 'word:value, …' "
                                "(e.g. 'fluffy:2'; values below 1 weaken the word)."),
                io.String.Input("blend_words", default="",
                                tooltip="Local blend: words (comma or space separated) whose "
                                "attention marks the region allowed to change; empty = whole "
                                "image."),
                io.String.Input("subtract_words", default="",
                                tooltip="Local blend: words whose region must not change (needs "
                                "blend_words)."),
                io.Float.Input("blend_threshold", default=0.3, **frac,
                               tooltip="Local blend: attention level (0–1 of the map's maximum) "
                               "that counts as inside the region."),
                io.Float.Input("blend_start", default=0.2, **frac,
                               tooltip="Local blend: fraction of the steps after which the "
                               "region mask is applied."),
                io.Combo.Input("self_limit", options=SELF_LIMIT_OPTIONS,
                               default=SELF_LIMIT_OPTIONS[0],
                               tooltip="Largest self-attention map that receives the source's "
                               "self-attention: '32x32' as the null-text notebook (keeps more "
                               "layout), '16x16' as the P2P notebook and diffusers' "
                               "Prompt2PromptPipeline (SD 1.x at 512²: 64×64 maps are never "
                               "injected)."),
                io.Float.Input("uncond_self_end", default=0.0, **frac,
                               tooltip="P2Plus (StyleDiffusion) τ_u: fraction of the first "
                               "steps where the targets' unconditional branch also takes the "
                               "source's self-attention. 0 = plain Prompt-to-Prompt; 0.5 helps "
                               "large structural edits (e.g. tent → tiger)."),
            ],
            outputs=[
                types.EditPlanType.Output("plan", display_name="plan",
                                          tooltip="The checked edit with CLIP's target "
                                          "embeddings, for P2P Sample (NTI)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, source_prompt=None, target_prompts=None, edit_kind=None,
                        cross_start=None, cross_end=None, cross_words=None, self_start=None,
                        self_end=None, reweight=None, blend_words=None, subtract_words=None,
                        blend_threshold=None, blend_start=None,
                        self_limit=SELF_LIMIT_OPTIONS[0], uncond_self_end=0.0) -> bool | str:
        values = dict(zip(PLAN_INPUTS, (
            source_prompt, target_prompts, edit_kind, cross_start, cross_end, cross_words,
            self_start, self_end, reweight, blend_words, subtract_words, blend_threshold,
            blend_start, self_limit, uncond_self_end), strict=True))
        if any(v is None for v in values.values()):
            return True  # a linked value is known only at execution, which checks again
        try:
            check_plan(spec_from_inputs(**values))
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, clip, source_prompt: str, target_prompts: str, edit_kind: str,
                cross_start: float, cross_end: float, cross_words: str, self_start: float,
                self_end: float, reweight: str, blend_words: str, subtract_words: str,
                blend_threshold: float, blend_start: float,
                self_limit: str = SELF_LIMIT_OPTIONS[0],
                uncond_self_end: float = 0.0) -> io.NodeOutput:
        spec = spec_from_inputs(source_prompt, target_prompts, edit_kind, cross_start, cross_end,
                                cross_words, self_start, self_end, reweight, blend_words,
                                subtract_words, blend_threshold, blend_start, self_limit,
                                uncond_self_end)
        check_plan(spec)
        tok = sd1_tokenizer()
        source = encode_prompt(clip, spec.source, tok, "source prompt")
        targets = torch.cat([encode_prompt(clip, t, tok, "target prompt") for t in spec.targets])
        plan = types.EditPlan(spec, targets.to(intermediate()), source.to(intermediate()))
        return io.NodeOutput(plan)
