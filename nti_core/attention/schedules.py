"""When Prompt-to-Prompt injects the source's attention (Hertz et al. 2022, §3.2 "τ" and Eq. 3).

Cross-attention of target k at token j is injected at step i (0 = noisiest) when
⌊start·(N+1)⌋ ≤ i < ⌊end·(N+1)⌋ (the reference's ``get_time_words_attention_alpha``, N+1 rows);
self-attention when ⌊N·start⌋ ≤ i < ⌊N·end⌋. A single fraction f means (0, f).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..alignment import find_in_targets, tokenize
from ..tokenizer import TokenizerSpec

Bounds = float | tuple[float, float]
CrossSpec = Bounds | Mapping[str, Bounds]
DEFAULT_KEY = "default_"


def fraction_bounds(value: Bounds, what: str = "injection") -> tuple[float, float]:
    """A fraction f → (0, f); a pair (start, end) is checked: 0 ≤ start ≤ end ≤ 1."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    pair = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
    try:
        if not (number or pair):
            raise TypeError
        start, end = (0.0, float(value)) if number else (float(value[0]), float(value[1]))
    except (TypeError, ValueError, OverflowError):  # OverflowError: 10**400 has no float
        raise ValueError(f"{what} must be a fraction or a (start, end) pair, got "
                         f"{value!r:.80}") from None
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"{what} needs 0 ≤ start ≤ end ≤ 1, got ({start}, {end})")
    return start, end


def cross_injection_alpha(
    num_steps: int,
    spec: CrossSpec,
    targets: Sequence[str],
    tokenizer: TokenizerSpec | None = None,
    max_length: int = 77,
) -> Tensor:
    """Cross-injection α [N+1, K, L] (1 = inject the source's map) for K target prompts.

    ``spec``: a fraction, a (start, end) pair, or a dict with ``"default_"`` (default (0, 1)) and
    per-word bounds for words of the target prompts (needs ``tokenizer``; a word must occur in
    at least one target, and acts on the targets that contain it).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be ≥ 1, got {num_steps}")
    if tokenizer is not None:
        max_length = tokenizer.max_length
    spec = dict(spec) if isinstance(spec, Mapping) else {DEFAULT_KEY: spec}
    rows = num_steps + 1
    alpha = torch.zeros(rows, len(targets), max_length)
    start, end = fraction_bounds(spec.pop(DEFAULT_KEY, (0.0, 1.0)), "cross injection")
    alpha[int(start * rows) : int(end * rows)] = 1.0
    if not spec:
        return alpha
    if tokenizer is None:
        raise ValueError("per-word cross injection needs a tokenizer")
    toks = [tokenize(tokenizer, t) for t in targets]
    for word, bounds in spec.items():
        start, end = fraction_bounds(bounds, f"cross injection of {word!r}")
        for k, inds in enumerate(find_in_targets(toks, word, "cross injection")):
            if inds is not None:
                alpha[:, k, inds] = 0.0
                alpha[int(start * rows) : int(end * rows), k, inds] = 1.0
    return alpha


def injection_range(num_steps: int, spec: Bounds, what: str = "self injection") -> tuple[int, int]:
    """Steps [⌊N·start⌋, ⌊N·end⌋) of self-attention injection (also P2Plus's unconditional one)."""
    start, end = fraction_bounds(spec, what)
    return int(num_steps * start), int(num_steps * end)
