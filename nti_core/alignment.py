"""Words → token positions, and the token maps of Prompt-to-Prompt (Hertz et al. 2022, §3.2).

Positions count the BOS token: position 0 is BOS, the prompt's first token is 1, and the text
encoder sees ``max_length`` (77) positions, padded after EOS. A *word* is a whitespace-separated
piece of the prompt; users name words case-insensitively and without surrounding punctuation
("mirror" finds "mirror."), and a phrase ("teddy bear") finds consecutive words.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .tokenizer import TokenizerSpec

_EDGE_PUNCT = re.compile(r"^[\W_]+|[\W_]+$")


def word_key(word: str) -> str:
    """How words are compared: lower case, surrounding punctuation removed (after lowering,
    which can add some: "İ" → "i̇"), so that a key is its own key."""
    return _EDGE_PUNCT.sub("", word.lower())


@dataclass(frozen=True)
class Tokenized:
    """A prompt's ids [BOS, …, EOS] (unpadded) and, per word, its token span [start, end) and the
    span of its core (the word without surrounding punctuation tokens)."""

    text: str
    ids: tuple[int, ...]
    words: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]
    cores: tuple[tuple[int, int], ...]
    max_length: int

    def keys(self) -> list[str]:
        return [word_key(w) for w in self.words]

    def unknown(self, word: str) -> ValueError:
        listed = ", ".join(repr(k) for k in dict.fromkeys(self.keys()) if k)
        return ValueError(f"{word!r} is not a word of the prompt {self.text!r}; its words are: {listed}")

    def find(self, word: str) -> list[int] | None:
        """Token positions of every occurrence of ``word`` (or phrase), None when absent."""
        wanted = [word_key(w) for w in word.split()]
        if not wanted or not all(wanted):
            raise ValueError(f"{word!r} is not a word (letters or digits needed)")
        keys, n = self.keys(), len(wanted)
        out: list[int] = []
        for i in range(len(keys) - n + 1):
            if keys[i : i + n] == wanted:
                for a, b in self.cores[i : i + n]:
                    out.extend(range(a, b))
        return sorted(set(out)) or None

    def indices(self, word: str) -> list[int]:
        """Like :meth:`find` but an unknown word raises ValueError listing the prompt's words."""
        found = self.find(word)
        if found is None:
            raise self.unknown(word)
        return found


def find_in_targets(toks: Sequence[Tokenized], word: str, what: str) -> list[list[int] | None]:
    """Token positions of ``word`` in each target (None where absent); ValueError when it is in
    none of them (with one target: the prompt's words are listed)."""
    found = [t.find(word) for t in toks]
    if all(f is None for f in found):
        if len(toks) == 1:
            raise toks[0].unknown(word)
        texts = [t.text for t in toks]
        raise ValueError(f"{what} word {word!r} is in none of the target prompts {texts}")
    return found


def tokenize(tok: TokenizerSpec, text: str) -> Tokenized:
    """Tokenise a prompt word by word; ValueError when it exceeds ``tok.max_length`` tokens."""
    words = tuple(text.split())
    body = tok.encode(text)
    n = len(body) + 2
    if n > tok.max_length:
        raise ValueError(f"the prompt has {n} tokens (with start/end), more than the {tok.max_length} "
                         f"the text encoder reads: shorten it ({text[:60]!r}…)")
    per_word = [tok.encode(w) for w in words]
    if [i for ids in per_word for i in ids] != body:
        raise ValueError(f"the prompt {text!r} tokenises differently as a whole than word by "
                         "word, so word positions cannot be found: remove control characters "
                         "and unusual spaces")
    spans, cores, pos = [], [], 1
    for word, ids in zip(words, per_word, strict=True):
        spans.append((pos, pos + len(ids)))
        cores.append(_core_span(tok, word, ids, pos))
        pos += len(ids)
    return Tokenized(text, (tok.bos, *body, tok.eos), words, tuple(spans), tuple(cores),
                     tok.max_length)


def _core_span(tok: TokenizerSpec, word: str, ids: list[int], pos: int) -> tuple[int, int]:
    m = re.match(r"^([\W_]*)(.*?)([\W_]*)$", word, flags=re.S)
    lead, core, trail = m.groups() if m else ("", word, "")
    if not core or (not lead and not trail):
        return pos, pos + len(ids)
    lead_ids, core_ids, trail_ids = tok.encode(lead), tok.encode(core), tok.encode(trail)
    if lead_ids + core_ids + trail_ids != ids:  # e.g. "'tis" → "'t" "is": keep the whole word
        return pos, pos + len(ids)
    return pos + len(lead_ids), pos + len(lead_ids) + len(core_ids)


def word_indices(tok: TokenizerSpec, prompt: str, word: str) -> list[int]:
    """Token positions (BOS = 0) of every occurrence of ``word`` in ``prompt``."""
    return tokenize(tok, prompt).indices(word)


def replace_mapper(tok: TokenizerSpec, source: str, target: str) -> Tensor:
    """Word-swap token map M [L, L] (source × target) with A_tgt = A_src·M (P2P Replace).

    Words are paired in order. A pair with as many tokens on both sides maps token to token; else
    every source token of the word sends 1/len(target tokens) to each target token (so several
    source tokens onto one target token sum). BOS, EOS and padding follow the alignment.
    """
    s, t = tokenize(tok, source), tokenize(tok, target)
    if len(s.words) != len(t.words):
        raise ValueError(f"replace needs the same number of words: source has {len(s.words)}, "
                         f"target has {len(t.words)} — use refine")
    n = tok.max_length
    m = torch.zeros(n, n)
    m[0, 0] = 1.0
    for (a, b), (c, d) in zip(s.spans, t.spans, strict=True):
        if b - a == d - c:
            m[torch.arange(a, b), torch.arange(c, d)] = 1.0
        else:
            m[a:b, c:d] = 1.0 / (d - c)
    # EOS and padding: source position i → target position j along the alignment. The reference
    # (google/prompt-to-prompt seq_aligner.get_replacement_mapper_) writes mapper[j, j] here,
    # which maps the wrong source tokens when the two prompts have different token counts.
    i, j = s.spans[-1][1] if s.spans else 1, t.spans[-1][1] if t.spans else 1
    while i < n and j < n:
        m[i, j] = 1.0
        i, j = i + 1, j + 1
    return m


def needleman_wunsch(
    x: Sequence[int], y: Sequence[int], gap: int = 0, match: int = 1, mismatch: int = -1
) -> list[int]:
    """Global alignment of x (source) and y (target): for each y position its x position or −1.

    Ties are broken as in the reference seq_aligner.global_align: left (gap in x) > up > diagonal.
    """
    nx, ny = len(x), len(y)
    score = [[0] * (ny + 1) for _ in range(nx + 1)]
    trace = [[0] * (ny + 1) for _ in range(nx + 1)]
    for j in range(1, ny + 1):
        score[0][j], trace[0][j] = j * gap, 1
    for i in range(1, nx + 1):
        score[i][0], trace[i][0] = i * gap, 2
    for i in range(1, nx + 1):
        for j in range(1, ny + 1):
            left = score[i][j - 1] + gap
            up = score[i - 1][j] + gap
            diag = score[i - 1][j - 1] + (match if x[i - 1] == y[j - 1] else mismatch)
            best = max(left, up, diag)
            score[i][j] = best
            trace[i][j] = 1 if best == left else 2 if best == up else 3
    out = [-1] * ny
    i, j = nx, ny
    while i > 0 or j > 0:
        move = trace[i][j]
        if move == 3:
            i, j = i - 1, j - 1
            out[j] = i
        elif move == 1:
            j -= 1
        else:
            i -= 1
    return out


def refine_alignment(tok: TokenizerSpec, source: str, target: str) -> tuple[Tensor, Tensor]:
    """P2P Refine: mapper [L] (int64, source position for each target position) and alphas [L].

    alphas = 1 where the target token is matched to a source token, 0 where it is new (there the
    mapper holds 0, a placeholder that α = 0 switches off; the reference keeps −1). Positions past
    the target's EOS map to themselves with α = 1, as in the reference.
    """
    s, t = tokenize(tok, source), tokenize(tok, target)
    n = tok.max_length
    pairs = torch.tensor(needleman_wunsch(s.ids, t.ids), dtype=torch.long)
    mapper = torch.arange(n, dtype=torch.long)
    alphas = torch.ones(n)
    alphas[: len(pairs)] = (pairs >= 0).float()
    mapper[: len(pairs)] = pairs.clamp(min=0)
    return mapper, alphas


WordValues = str | Mapping[str, float] | Iterable[str | tuple[str, float]]


def parse_word_values(spec: WordValues) -> list[tuple[str, float]]:
    """'cat:2, mirror:0.5' (commas or new lines), ['cat:2'], {'cat': 2} or [('cat', 2)] → pairs."""
    if isinstance(spec, Mapping):
        items: list[str | tuple[str, float]] = [(str(k), float(v)) for k, v in spec.items()]
    elif isinstance(spec, str):
        items = [p for p in re.split(r"[,\n;]", spec) if p.strip()]
    else:
        items = list(spec)
    out = []
    for item in items:
        if isinstance(item, str):
            word, sep, value = item.rpartition(":")
            if not sep or not word.strip():
                raise ValueError(f"expected 'word:value', got {item.strip()!r}")
            try:
                out.append((word.strip(), float(value)))
            except ValueError:
                raise ValueError(f"expected a number after ':' in {item.strip()!r}") from None
        else:
            word, value = item
            out.append((str(word), float(value)))
    for word, value in out:
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number for {word!r}, got {value}")
    return out


def equalizers(targets: Sequence[Tokenized], spec: WordValues) -> Tensor:
    """P2P Reweight equalisers [K, L]: each value at its word's tokens in every target that has
    the word, 1 elsewhere; a word in none of the targets is an error."""
    eq = torch.ones(len(targets), targets[0].max_length)
    for word, value in parse_word_values(spec):
        if not abs(value) <= torch.finfo(eq.dtype).max:  # would be stored as inf
            raise ValueError(f"reweight {word!r}: expected a factor of at most "
                             f"{torch.finfo(eq.dtype).max:.3g} in size, got {value}")
        for k, inds in enumerate(find_in_targets(targets, word, "reweight")):
            if inds is not None:
                eq[k, inds] = value
    return eq


def equalizer(tok: TokenizerSpec, prompt: str, spec: WordValues) -> Tensor:
    """P2P Reweight equaliser [L] of one prompt (see :func:`equalizers`)."""
    return equalizers([tokenize(tok, prompt)], spec)[0]
