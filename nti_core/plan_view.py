"""The token view of an edit plan (Attention Edit Plan's widget): every prompt as the engine
tokenises it, every target token marked as the edit treats it, and every problem the node's
validation raises, one at a time.

Nothing is aligned here. A target token's mark is read off the map the controller applies
(Hertz et al. 2022, §3.2), written as W [L_src, L_tgt], "target token j takes W[i, j] of the
source's attention at token i": P2P Replace's mapper M (A_tgt = A_src·M) as it is, Refine's
mapper and α as W[mapper_j, j] = α_j, Reweight's identity. A token is *kept* when it takes all of
one source token with its own id, *added* when it takes nothing, *replaced* otherwise.

The messages are those ``plan_from_fields`` and ``check_words`` raise (the node shows the
first), found one concern at a time: a field, a target, a word.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .alignment import (
    Tokenized,
    equalizers,
    parse_word_values,
    refine_alignment,
    replace_mapper,
    tokenize,
    word_key,
)
from .attention.plan import EditMode, P2PSpec, resolve_mode, word_selection
from .attention.schedules import DEFAULT_KEY
from .family import FAMILIES, Family
from .plan_spec import (
    BY_NAME,
    DEFAULTS,
    FIELDS,
    SOURCE,
    check_words,
    plan_from_fields,
    target_lines,
    words,
)
from .tokenizer import TokenizerSpec
from .validate import check_prompt

MAX_BODY = 64 * 1024  # bytes of a request: a whole plan is far below it
# The view checks each target and each word against every target: its work grows as
# targets × (targets + words). At both limits, 70-word prompts: 2.6–2.9 s on 2 CPU cores.
MAX_TARGETS, MAX_WORDS = 8, 16
DEFAULT_FAMILY = "sd1"
PROMPT_KINDS = ("prompt", "lines")


def _name(field: str) -> str:
    return BY_NAME[field].name  # a KeyError at import when plan_spec renames the field


TARGETS, EDIT_KIND, CROSS_WORDS, REWEIGHT, BLEND, SUBTRACT = (_name(f) for f in (
    "target_prompts", "edit_kind", "cross_words", "reweight", "blend_words", "subtract_words"))


@dataclass(frozen=True)
class PlanWarning:
    field: str
    message: str


@dataclass(frozen=True)
class TokenView:
    """One token of a prompt: ``word`` as a plan field names it (lower case, no surrounding
    punctuation; "" for punctuation alone), ``word_index`` its place among the prompt's words,
    ``pos`` counts BOS as 0, ``sources`` the source positions it takes attention from; ``mark``
    None where the engine cannot align its prompt."""

    text: str
    word: str
    word_index: int
    pos: int
    mark: str | None
    sources: list[int]
    reweight: float | None = None
    blend: bool = False
    subtract: bool = False


@dataclass(frozen=True)
class PromptView:
    role: str  # "source" or "target"
    index: int
    text: str
    n_tokens: int  # with BOS and EOS, as the limit counts them
    tokens: list[TokenView]


@dataclass(frozen=True)
class PlanView:
    edit_kind: EditMode | None
    max_length: int
    prompts: list[PromptView]
    warnings: list[PlanWarning]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for prompt in out["prompts"]:
            for token in prompt["tokens"]:
                token["from"] = token.pop("sources")
        return out


# ----------------------------------------------------------------------------- the checks


def _problem(check: Callable[..., Any], *args: Any) -> str | None:
    """The message of the ValueError ``check(*args)`` raises, None when it passes."""
    try:
        check(*args)
    except ValueError as e:
        return str(e)
    return None


def read_fields(values: Mapping[str, Any]) -> tuple[P2PSpec | None, list[PlanWarning]]:
    """``plan_from_fields`` one problem at a time: each message is charged to the first field
    whose default clears it, and that field takes its default. The prompts have no default that
    clears anything: a blank one ends the search without a plan."""
    v = {**DEFAULTS, **values}
    found: list[PlanWarning] = []
    while (message := _problem(plan_from_fields, v)) is not None:
        field = next((f.name for f in FIELDS if f.kind not in PROMPT_KINDS
                      and v[f.name] != f.default
                      and _problem(plan_from_fields, {**v, f.name: f.default})
                      != message), None)
        if field is None:
            blank_source = _problem(check_prompt, v[SOURCE.name]) is not None
            return None, [*found, PlanWarning(SOURCE.name if blank_source else TARGETS, message)]
        found.append(PlanWarning(field, message))
        v[field] = DEFAULTS[field]
    return plan_from_fields(v), found


def _default_cross(spec: P2PSpec) -> Any:
    return spec.cross[DEFAULT_KEY] if isinstance(spec.cross, Mapping) else spec.cross


def word_warnings(spec: P2PSpec, mode: EditMode, tok: TokenizerSpec
                  ) -> tuple[list[PlanWarning], dict[str, list[Any]]]:
    """``check_words`` on one concern at a time: each target's alignment, then each per-word
    injection, reweighted, blend and subtract word. Returns the warnings and, per field, the
    items that passed."""
    bare = replace(spec, mode=mode, cross=_default_cross(spec), reweight=None, blend_words=(),
                   subtract_words=())
    found: list[PlanWarning] = []

    def warn(field: str, message: str | None) -> bool:
        """Note a message once; True when there was one."""
        if message is not None and message not in {w.message for w in found}:
            found.append(PlanWarning(field, message))
        return message is not None

    for t in spec.targets:
        warn(EDIT_KIND, _problem(check_words, replace(bare, targets=(t,)), tok))
    if found:  # the words are looked up the same way in every mode
        bare = replace(bare, mode="refine")
    cross = spec.cross if isinstance(spec.cross, Mapping) else {}
    variants: dict[str, Callable[[Any], P2PSpec]] = {
        CROSS_WORDS: lambda item: replace(bare, cross={DEFAULT_KEY: bare.cross, item[0]: item[1]}),
        REWEIGHT: lambda item: replace(bare, reweight=[item]),
        BLEND: lambda w: replace(bare, blend_words=(w,)),
        # beside blend words that are found (else a word of the source), or none when the plan
        # has none: what is checked is the subtract word
        SUBTRACT: lambda w: replace(bare, subtract_words=(w,), blend_words=tuple(
            passed[BLEND] or [k for k in tokenize(tok, spec.source).keys() if k][:1])
            if spec.blend_words else ()),
    }
    items: dict[str, list[Any]] = {
        CROSS_WORDS: [item for item in cross.items() if item[0] != DEFAULT_KEY],
        REWEIGHT: parse_word_values(spec.reweight or ""),
        BLEND: list(spec.blend_words),
        SUBTRACT: list(spec.subtract_words),
    }
    passed: dict[str, list[Any]] = {}
    for field, make in variants.items():
        passed[field] = []
        for item in items[field]:
            if not warn(field, _problem(check_words, make(item), tok)):
                passed[field].append(item)
    return found, passed


# ----------------------------------------------------------------------------- the view


def fitting(tok: TokenizerSpec, text: str) -> Tokenized:
    """``tokenize`` of the longest run of the prompt's first words that fits the limit."""
    words = text.split()
    lo, hi = 0, min(len(words), tok.max_length - 2)  # every word is at least one token
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _problem(tokenize, tok, " ".join(words[:mid])) is None:
            lo = mid
        else:
            hi = mid - 1
    return tokenize(tok, " ".join(words[:lo]))


def attention_sources(mode: EditMode, tok: TokenizerSpec, source: str, target: str) -> Tensor:
    """W [L, L]: target token j takes W[i, j] of the source's attention at token i."""
    if mode == "replace":
        return replace_mapper(tok, source, target)
    if mode == "refine":
        mapper, alphas = refine_alignment(tok, source, target)
        w = torch.zeros(tok.max_length, tok.max_length)
        w[mapper, torch.arange(tok.max_length)] = alphas
        return w
    return torch.eye(tok.max_length)  # reweight alone: the source's own maps


def mark(w: Tensor, j: int, source_ids: Sequence[int], token_id: int) -> tuple[str, list[int]]:
    """How target token j is edited, and the source positions it takes attention from."""
    sources = [int(i) for i in w[:, j].nonzero().flatten()]
    if not sources:
        return "added", []
    i = sources[0]
    if len(sources) == 1 and w[i, j] == 1 and i < len(source_ids) and source_ids[i] == token_id:
        return "kept", sources
    return "replaced", sources


def prompt_view(tok: TokenizerSpec, t: Tokenized, role: str, index: int, n_tokens: int,
                w: Tensor | None = None, source_ids: Sequence[int] = (),
                factors: Tensor | None = None, blend: Tensor | None = None,
                subtract: Tensor | None = None) -> PromptView:
    tokens = []
    for n, (word, (a, b)) in enumerate(zip(t.words, t.spans)):
        for p in range(a, b):
            if role == "source":
                how, sources = "source", []
            elif w is None:
                how, sources = None, []
            else:
                how, sources = mark(w, p, source_ids, t.ids[p])
            factor = 1.0 if factors is None else float(factors[p])
            tokens.append(TokenView(
                tok.decode_token(t.ids[p]), word_key(word), n, p, how, sources,
                factor if factor != 1.0 and math.isfinite(factor) else None,  # JSON has no NaN
                blend is not None and bool(blend[p]), subtract is not None and bool(subtract[p])))
    return PromptView(role, index, t.text, n_tokens, tokens)


def unaligned(tok: TokenizerSpec, source: str | None, targets: Sequence[str]) -> list[PromptView]:
    """The prompts drawn without an edit (the plan has none), each as far as it fits."""
    roles = [("source", 0, source)] if source is not None else []
    roles += [("target", k, t) for k, t in enumerate(targets)]
    return [replace(prompt_view(tok, fitting(tok, text), role, k, len(tok.encode(text)) + 2),
                    text=text) for role, k, text in roles]


class Remembering:
    """``tok`` encoding each text once: the view checks the same prompts once per word."""

    def __init__(self, tok: TokenizerSpec) -> None:
        self.tok, self.bos, self.eos, self.max_length = tok, tok.bos, tok.eos, tok.max_length
        self.known: dict[str, tuple[int, ...]] = {}

    def encode(self, text: str) -> list[int]:
        if text not in self.known:
            self.known[text] = tuple(self.tok.encode(text))
        return list(self.known[text])

    def decode_token(self, token_id: int) -> str:
        return self.tok.decode_token(token_id)


def plan_view(values: Mapping[str, Any], tok: TokenizerSpec) -> PlanView:
    """The token view of the plan's field values (missing ones at their defaults)."""
    tok = Remembering(tok)
    spec, warnings = read_fields(values)
    if spec is None:  # a blank prompt: draw the others
        v = {**DEFAULTS, **values}
        blank_source = _problem(check_prompt, v[SOURCE.name]) is not None
        no_targets = _problem(target_lines, v[TARGETS]) is not None
        return PlanView(None, tok.max_length, unaligned(
            tok, None if blank_source else check_prompt(v[SOURCE.name]),
            () if no_targets else target_lines(v[TARGETS])), warnings)
    texts = (spec.source, *spec.targets)
    too_long = [PlanWarning(SOURCE.name if k == 0 else TARGETS, message)
                for k, text in enumerate(texts)
                if (message := _problem(tokenize, tok, text)) is not None]
    if too_long:
        return PlanView(None, tok.max_length, unaligned(tok, spec.source, spec.targets),
                        warnings + too_long)
    src, *tgts = [tokenize(tok, text) for text in texts]
    mode = resolve_mode(spec.mode, spec.source, spec.targets, src, tgts)
    found, passed = word_warnings(spec, mode, tok)
    factors = equalizers(tgts, passed[REWEIGHT]) if passed[REWEIGHT] else None
    blend = word_selection([src, *tgts], passed[BLEND]) if passed[BLEND] else None
    subtract = (word_selection([src, *tgts], passed[SUBTRACT], "subtract")
                if passed[SUBTRACT] else None)

    def row(sel: Tensor | None, s: int) -> Tensor | None:
        return None if sel is None else sel[s]

    prompts = [prompt_view(tok, src, "source", 0, len(src.ids), blend=row(blend, 0),
                           subtract=row(subtract, 0))]
    for k, t in enumerate(tgts):
        try:
            w: Tensor | None = attention_sources(mode, tok, spec.source, t.text)
        except ValueError:  # replace with another word count: warned about above
            w = None
        prompts.append(prompt_view(tok, t, "target", k, len(t.ids), w, src.ids,
                                   row(factors, k), row(blend, k + 1), row(subtract, k + 1)))
    return PlanView(mode, tok.max_length, prompts, warnings + found)


# ----------------------------------------------------------------------------- the request


class RequestError(ValueError):
    """A malformed request: the route answers 400 with this message."""


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), "null")


def read_request(raw: bytes) -> tuple[dict[str, Any], Family]:
    """The request body → (field values, family); RequestError saying what was expected and
    what was received."""
    if len(raw) > MAX_BODY:
        raise RequestError(f"the request body must be at most {MAX_BODY} bytes, got "
                           f"{len(raw)} or more")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RequestError(f"expected a JSON body, got one that does not parse: {e}") from None
    if not isinstance(body, dict):
        raise RequestError('expected a JSON object {"fields": {...}, "family": "sd1"}, got '
                           + _json_type(body))
    extra = sorted(set(body) - {"fields", "family"})
    if extra:
        raise RequestError(f'expected the keys "fields" and "family", got also {extra}')
    fields = body.get("fields")
    if not isinstance(fields, dict):
        got = "no fields" if fields is None else _json_type(fields)
        raise RequestError(f'expected "fields": an object of Attention Edit Plan field values, '
                           f"got {got}")
    unknown = sorted(set(fields) - set(BY_NAME))
    if unknown:
        raise RequestError(f"unknown edit-plan fields {unknown}; expected some of {list(BY_NAME)}")
    for name, value in fields.items():
        number = BY_NAME[name].kind == "fraction"
        ok = (isinstance(value, int | float) and not isinstance(value, bool) if number
              else isinstance(value, str))
        if not ok:
            raise RequestError(f"field {name!r} must be {'a number' if number else 'a string'}, "
                               f"got {_json_type(value)}")
    targets = sum(1 for line in fields.get(TARGETS, "").splitlines() if line.strip())
    if targets > MAX_TARGETS:
        raise RequestError(f"the token view draws at most {MAX_TARGETS} target prompts, got "
                           f"{targets}")
    for name in (CROSS_WORDS, REWEIGHT, BLEND, SUBTRACT):
        if len(words(fields.get(name, ""))) > MAX_WORDS:
            raise RequestError(f"the token view checks at most {MAX_WORDS} words in {name!r}, "
                               f"got {len(words(fields[name]))}")
    family = body.get("family", DEFAULT_FAMILY)
    if not isinstance(family, str) or family not in FAMILIES:
        raise RequestError(f"family must be one of {list(FAMILIES)}, got {family!r:.40}")
    return fields, FAMILIES[family]


def respond(raw: bytes, tokenizer_of: Callable[[Family], TokenizerSpec]
            ) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) of the token-view route for a request body."""
    try:
        fields, family = read_request(raw)
    except RequestError as e:
        return 400, {"error": str(e)}
    return 200, plan_view(fields, tokenizer_of(family)).to_json()
