"""The edit plan as a user states it: one table of fields, read by the Attention Edit Plan node
(its schema and checks), the command line (its arguments) and the node's help page.

Each field is spelled here once. ``plan_from_fields`` turns the values into the engine's
:class:`~nti_core.attention.plan.P2PSpec` and checks everything a value can get wrong on its own
or with its neighbours; ``check_words`` then finds the words and aligns the prompts with a
tokenizer. Both raise ``ValueError`` with the message the node and the CLI show.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .alignment import parse_word_values
from .attention.plan import SELF_LIMITS, P2PSpec, build_p2p
from .attention.schedules import DEFAULT_KEY, fraction_bounds
from .tokenizer import TokenizerSpec
from .validate import check_prompt

Kind = Literal["prompt", "lines", "choice", "fraction", "words"]
CHECK_STEPS = 50  # the real N is known only at sampling, where the schedules are rebuilt


@dataclass(frozen=True)
class Field:
    """One input of the plan. ``alone``: its widget's own range or options make it valid (ComfyUI
    checks those when a prompt is queued); the others are checked together by the plan."""

    name: str
    kind: Kind
    default: Any
    help: str
    options: tuple[str, ...] = ()
    alone: bool = False
    flag: str = ""  # the CLI's name, when not --name-with-dashes

    @property
    def cli(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


SOURCE = Field("source_prompt", "prompt", "", "Exactly the prompt the photo was inverted with.",
               flag="--source")  # also DDIM Invert's input
FIELDS: tuple[Field, ...] = (
    SOURCE,
    Field("target_prompts", "lines", "", "One edited prompt per line; each gives one image.",
          flag="--target"),
    Field("edit_kind", "choice", "auto",
          "replace swaps words (same word count), refine adds or changes words; auto picks one "
          "(reweight alone when the targets equal the source).",
          options=("auto", "replace", "refine")),
    Field("cross_start", "fraction", 0.0,
          "Fraction of the steps where the source's cross-attention injection starts."),
    Field("cross_end", "fraction", 0.8,
          "Fraction of the steps where it ends; lower lets the new words change more."),
    Field("cross_words", "words", "",
          "Per-word injection ends for target words, 'word:fraction, …'."),
    Field("self_start", "fraction", 0.0,
          "Fraction of the steps where the source's self-attention injection starts."),
    Field("self_end", "fraction", 0.5,
          "Fraction of the steps where it ends; higher keeps more of the photo's layout."),
    Field("reweight", "words", "",
          "Scale target words' attention, 'word:value, …' (above 1 strengthens a word)."),
    Field("blend_words", "words", "",
          "LocalBlend: words whose attention marks the only region allowed to change."),
    Field("subtract_words", "words", "",
          "LocalBlend: words whose region must not change (needs blend_words)."),
    Field("blend_threshold", "fraction", 0.3,
          "LocalBlend: attention level (of the map's maximum) counted as inside the region.",
          alone=True),
    Field("blend_start", "fraction", 0.2,
          "LocalBlend: fraction of the steps after which the region mask applies.", alone=True),
    Field("self_limit", "choice", f"{SELF_LIMITS[0]}x{SELF_LIMITS[0]}",
          "Largest self-attention map that takes the source's: 32x32 as the null-text "
          "notebook, 16x16 as the P2P notebook.",
          options=tuple(f"{n}x{n}" for n in SELF_LIMITS), alone=True),
    Field("uncond_self_end", "fraction", 0.0,
          "P2Plus τ_u: fraction of the first steps where the targets' unconditional branch "
          "also takes the source's self-attention, in maps up to 32x32 (0 = plain "
          "Prompt-to-Prompt).", alone=True),
)
BY_NAME = {f.name: f for f in FIELDS}
PER_WORD = ("cross_words", "reweight")  # the "words" fields written 'word:number, …'
DEFAULTS = {f.name: f.default for f in FIELDS}
CHECKED_TOGETHER = tuple(f.name for f in FIELDS if not f.alone)


def _fraction(name: str, value: Any) -> float:
    if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value}")
    return float(value)


def _bounds(name: str, start: Any, end: Any) -> tuple[float, float]:
    start, end = _fraction(f"{name}_start", start), _fraction(f"{name}_end", end)
    if start > end:
        raise ValueError(f"{name}_start ({start}) is after {name}_end ({end})")
    return start, end


def _choice(name: str, value: Any) -> str:
    options = list(BY_NAME[name].options)
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def word_values(name: str, text: str) -> list[tuple[str, float]]:
    """``parse_word_values`` of a per-word field, its messages naming the field."""
    try:
        return parse_word_values(text)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def words(text: str) -> tuple[str, ...]:
    """Words separated by commas or spaces."""
    return tuple(w for w in re.split(r"[,\s]+", text or "") if w)


def target_lines(text: str) -> tuple[str, ...]:
    """One target prompt per non-empty line."""
    lines = tuple(check_prompt(line, "target prompt") for line in (text or "").splitlines()
                  if line.strip())
    if not lines:
        raise ValueError("write at least one target prompt (one per line)")
    return lines


def plan_from_fields(values: Mapping[str, Any]) -> P2PSpec:
    """The fields' values (missing ones at their defaults) → P2PSpec; syntax, ranges and order
    checked here, the words by ``check_words``."""
    unknown = sorted(set(values) - set(BY_NAME))
    if unknown:
        raise ValueError(f"unknown edit-plan fields {unknown}; expected some of {list(BY_NAME)}")
    v = {**DEFAULTS, **values}
    edit_kind = _choice("edit_kind", v["edit_kind"])
    source = check_prompt(v["source_prompt"], "source prompt")
    targets = target_lines(v["target_prompts"])
    default = _bounds("cross", v["cross_start"], v["cross_end"])
    cross: Any = default
    if (v["cross_words"] or "").strip():
        cross = {"default_": default}
        for word, end in word_values("cross_words", v["cross_words"]):
            if not 0.0 <= end <= 1.0:
                raise ValueError(f"cross_words: {word!r} needs a fraction in [0, 1], got {end}")
            if end < default[0]:
                raise ValueError(f"cross_words: {word!r} ends at {end}, before cross_start "
                                 f"({default[0]})")
            cross[word] = (default[0], end)
    reweight = (v["reweight"] or "").strip()
    if reweight:
        word_values("reweight", reweight)  # syntax first; check_words looks the words up
    self_limit = _choice("self_limit", v["self_limit"])
    return P2PSpec(
        source=source,
        targets=targets,
        mode=edit_kind,  # type: ignore[arg-type]
        cross=cross,
        self_steps=_bounds("self", v["self_start"], v["self_end"]),
        reweight=reweight or None,
        blend_words=words(v["blend_words"]),
        subtract_words=words(v["subtract_words"]),
        blend_threshold=_fraction("blend_threshold", v["blend_threshold"]),
        blend_start=_fraction("blend_start", v["blend_start"]),
        self_limit=SELF_LIMITS[BY_NAME["self_limit"].options.index(self_limit)],
        uncond_self=_fraction("uncond_self_end", v["uncond_self_end"]),
    )


def fields_of(spec: P2PSpec) -> dict[str, Any]:
    """The field values that make ``spec``: ``plan_from_fields(fields_of(s)) == s`` for a plan
    made from fields; a spec the fields cannot state (per-prompt words, per-word cross starts,
    an unconditional injection not from step 0, maps stored before the edit) is refused."""
    cross = dict(spec.cross) if isinstance(spec.cross, Mapping) else {DEFAULT_KEY: spec.cross}
    start, end = fraction_bounds(cross.pop(DEFAULT_KEY, (0.0, 1.0)), "cross injection")
    per_word = {w: fraction_bounds(b, f"cross injection of {w!r}") for w, b in cross.items()}
    uncond = fraction_bounds(spec.uncond_self, "unconditional self injection")
    flat = all(isinstance(w, str) for w in (*spec.blend_words, *spec.subtract_words))
    if (any(s != start for s, _ in per_word.values()) or uncond[0] or not flat
            or not spec.store_edited):
        raise ValueError(f"this plan cannot be written as edit-plan fields: {spec}")
    reweight = spec.reweight or ""
    if not isinstance(reweight, str):
        reweight = ", ".join(f"{w}:{v}" for w, v in parse_word_values(reweight))
    self_start, self_end = fraction_bounds(spec.self_steps, "self injection")
    return {
        "source_prompt": spec.source,
        "target_prompts": "\n".join(spec.targets),
        "edit_kind": spec.mode,
        "cross_start": start,
        "cross_end": end,
        "cross_words": ", ".join(f"{w}:{e}" for w, (_, e) in per_word.items()),
        "self_start": self_start,
        "self_end": self_end,
        "reweight": reweight,
        "blend_words": " ".join(spec.blend_words),  # type: ignore[arg-type]
        "subtract_words": " ".join(spec.subtract_words),  # type: ignore[arg-type]
        "blend_threshold": spec.blend_threshold,
        "blend_start": spec.blend_start,
        "self_limit": BY_NAME["self_limit"].options[SELF_LIMITS.index(spec.self_limit)],
        "uncond_self_end": uncond[1],
    }


def check_words(spec: P2PSpec, tokenizer: TokenizerSpec, num_steps: int = CHECK_STEPS) -> None:
    """Tokenise, align and schedule with ``tokenizer``: words not found, replace with different
    word counts, prompts over the token limit."""
    check_prompt(spec.source, "source prompt")
    for t in spec.targets:
        check_prompt(t, "target prompt")
    build_p2p(tokenizer, spec, num_steps)


def markdown() -> str:
    """The fields as a Markdown list (the plan node's help page)."""
    lines = []
    for f in FIELDS:
        if f.kind == "fraction":
            kind = f"fraction 0–1, default {f.default}"
        elif f.kind == "choice":
            kind = " / ".join(f"`{o}`" for o in f.options) + f", default `{f.default}`"
        else:
            kind = {"prompt": "text", "lines": "text, one per line",
                    "words": "text, optional"}[f.kind]
        lines.append(f"- **{f.name}** ({kind}; CLI `{f.cli}`): {f.help}")
    return "\n".join(lines)
