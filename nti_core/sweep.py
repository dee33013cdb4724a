"""A settings sweep: one edit over a grid of edit-plan values, from one inversion.

An axis is ``FIELD=v1,v2,…`` naming a field of the edit plan (``nti_core.plan_spec``): a fraction
(``cross_end=0.2,0.5,0.8``, ``self_end``, ``blend_threshold``, ``uncond_self_end`` …), a choice
(``self_limit=16x16,32x32``), or a per-word field with one word (``reweight=tiger:1,2,4``: that
word's value, the plan's other words keep theirs). Up to two axes: rows × columns.

Every cell's plan is made by ``plan_from_fields`` from the base plan's fields and checked with the
tokenizer before anything samples. A cell is the edit of the plan's *first* target prompt: one
Prompt-to-Prompt sampling of [source, first target] from the same pivot z*_T and ∅ — nothing is
inverted or optimised again, so a cell costs what one P2P Sample of one target costs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .alignment import parse_word_values
from .attention.plan import P2PSpec
from .denoiser import Denoiser
from .plan_spec import (
    BY_NAME,
    CHECK_STEPS,
    FIELDS,
    PER_WORD,
    check_words,
    plan_from_fields,
    target_lines,
)
from .progress import Progress, no_progress
from .sampling import p2p_sample
from .tokenizer import TokenizerSpec
from .trajectory import Trajectory, UncondEmbeddings, ValueEmbeddings

SWEEPABLE = tuple(f.name for f in FIELDS if f.kind in ("fraction", "choice") or f.name in PER_WORD)
TARGETS = next(f.name for f in FIELDS if f.kind == "lines")
EXAMPLE = "cross_end=0.2,0.5,0.8"


@dataclass(frozen=True)
class Axis:
    """One swept field: its value in each cell (as ``plan_from_fields`` takes it) and labels."""

    field: str
    values: tuple[Any, ...]
    labels: tuple[str, ...]


def parse_axis(text: str, base: Mapping[str, Any]) -> Axis:
    """``FIELD=v1,v2,…`` → Axis; ``base``: the plan's field values (a per-word field keeps the
    plan's other words)."""
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ValueError(f"a sweep axis is 'field=v1,v2,…' (e.g. {EXAMPLE!r}), got {text!r}")
    if name not in SWEEPABLE:
        kind = "is not an edit-plan field" if name not in BY_NAME else "cannot be swept"
        raise ValueError(f"sweep {text!r}: {name!r} {kind}; sweep one of {list(SWEEPABLE)}")
    items = [v.strip() for v in rest.split(",") if v.strip()]
    if not items:
        raise ValueError(f"sweep {name}: no values after '=' (e.g. {EXAMPLE!r})")
    word = ""
    if name in PER_WORD:
        word, colon, items[0] = items[0].rpartition(":")
        word = word.strip()
        if not colon or not word:
            raise ValueError(f"sweep {name} takes one word and its values, 'word:v1,v2,…', got "
                             f"{rest.strip()!r}")
    if BY_NAME[name].kind == "choice":
        return Axis(name, tuple(items), tuple(f"{name} {v}" for v in items))
    numbers = []
    for v in items:
        try:
            numbers.append(float(v))
        except ValueError:
            raise ValueError(f"sweep {name}: {v!r} is not a number") from None
    if not word:
        return Axis(name, tuple(numbers), tuple(f"{name} {x:g}" for x in numbers))
    others = [(w, x) for w, x in parse_word_values(base.get(name) or "") if w != word]
    values = tuple(", ".join(f"{w}:{x}" for w, x in [*others, (word, n)]) for n in numbers)
    return Axis(name, values, tuple(f"{name} {word}:{n:g}" for n in numbers))


@dataclass(frozen=True)
class Sweep:
    """The cells' checked plans, row-major: rows × columns (an absent axis counts as one)."""

    rows: Axis | None
    columns: Axis | None
    plans: tuple[P2PSpec, ...]

    @property
    def shape(self) -> tuple[int, int]:
        rows, columns = (1 if a is None else len(a.values) for a in (self.rows, self.columns))
        return rows, columns

    def labels(self) -> tuple[list[str], list[str]]:
        """(row labels, column labels); an absent axis gives one empty label."""
        rows, columns = ([""] if a is None else list(a.labels) for a in (self.rows, self.columns))
        return rows, columns

    @property
    def title(self) -> str:
        first = self.plans[0]
        return f"the edit of the first target prompt, '{first.targets[0]}'"


def plan_sweep(fields: Mapping[str, Any], axes: Sequence[str],
               tokenizer: TokenizerSpec | None = None, num_steps: int = CHECK_STEPS) -> Sweep:
    """Every cell's plan from the base plan's ``fields`` and ``axes`` = (rows, columns), or
    (columns,) alone; an empty string leaves that axis out. Each plan is made by
    ``plan_from_fields`` and, with ``tokenizer``, checked by ``check_words``: a bad value is
    refused with its field's own message, naming the cell, before any sampling."""
    if len(axes) > 2:
        raise ValueError(f"a sweep has at most two axes (rows × columns), got {len(axes)}: "
                         f"{list(axes)}")
    base = dict(fields)
    base[TARGETS] = target_lines(base.get(TARGETS, ""))[0]  # a cell edits the first target
    parsed = [parse_axis(a, base) if a.strip() else None for a in axes]
    rows, columns = ([None] * (2 - len(parsed)) + parsed)[-2:]
    if rows is None and columns is None:
        raise ValueError(f"a sweep needs an axis, 'field=v1,v2,…' (e.g. {EXAMPLE!r})")
    if rows is not None and columns is not None and rows.field == columns.field:
        raise ValueError(f"the rows and the columns both sweep {rows.field}: pick two fields")
    plans = []
    for r in range(1 if rows is None else len(rows.values)):
        for c in range(1 if columns is None else len(columns.values)):
            cell, where = dict(base), []
            for axis, k in ((rows, r), (columns, c)):
                if axis is not None:
                    cell[axis.field] = axis.values[k]
                    where.append(axis.labels[k])
            try:
                spec = plan_from_fields(cell)
                if tokenizer is not None:
                    check_words(spec, tokenizer, num_steps)
            except ValueError as e:
                raise ValueError(f"sweep cell {', '.join(where)}: {e}") from None
            plans.append(spec)
    return Sweep(rows, columns, tuple(plans))


@torch.no_grad()
def sample_sweep(
    denoiser: Denoiser,
    traj: Trajectory,
    uncond: UncondEmbeddings,
    contexts: Tensor,
    sweep: Sweep,
    tokenizer: TokenizerSpec,
    *,
    guidance: float | None = None,
    values: ValueEmbeddings | None = None,
    value_end: float = 0.5,
    mask: Tensor | None = None,
    progress: Progress = no_progress,
) -> Tensor:
    """Latents [R·C, 4, h, w], row-major: each cell's edit of the first target prompt.

    contexts [2, L, D]: the source prompt's and the first target's embeddings. Every cell's
    controller (and the ``mask``, see ``attention.edits.region_mask``) is built before the first
    sampling; then one ``p2p_sample`` per cell from ``traj`` and ``uncond`` (never re-optimised).
    """
    if contexts.shape[0] != 2:
        raise ValueError(f"a sweep samples the source and the first target: expected 2 prompt "
                         f"embeddings, got {contexts.shape[0]}")
    hw = (int(traj.latents.shape[-2]), int(traj.latents.shape[-1]))
    controllers = [p.build(tokenizer, traj.num_steps, latent_hw=hw, mask=mask)
                   for p in sweep.plans]
    return torch.cat([
        p2p_sample(denoiser, traj, uncond, contexts, guidance=guidance, controller=c,
                   values=values, value_end=value_end, progress=progress)[1:]
        for c in controllers])
