"""Words → tokens, the replace mapper, the refine alignment and the reweight equaliser."""

from __future__ import annotations

import pytest
import torch

from nti_core import alignment as al
from nti_core import tokenizer as tk

CAT = "a cat sitting next to a mirror"


def test_word_positions_count_bos_and_repeat(tok: tk.TokenizerSpec) -> None:
    t = al.tokenize(tok, CAT)
    assert t.ids[0] == tok.bos and t.ids[-1] == tok.eos and len(t.ids) == 9
    assert t.indices("cat") == [2]
    assert t.indices("A") == [1, 6]  # case-insensitive, every occurrence
    assert t.indices("next to") == [4, 5]  # a phrase finds consecutive words


def test_multi_token_word(tok: tk.TokenizerSpec) -> None:
    t = al.tokenize(tok, "a ragamuffin sitting next to a mirror")
    assert len(tok.encode("ragamuffin")) == 4
    assert t.indices("ragamuffin") == [2, 3, 4, 5]
    assert t.indices("sitting") == [6]


def test_punctuation_is_not_part_of_the_word(tok: tk.TokenizerSpec) -> None:
    with_dot = al.tokenize(tok, CAT + ".")
    assert with_dot.spans[-1] == (7, 9)  # "mirror." is two tokens …
    assert with_dot.indices("mirror") == [7]  # … but "mirror" is only the first
    assert with_dot.indices("mirror.") == [7]
    assert al.tokenize(tok, CAT).indices("mirror") == [7]
    assert al.tokenize(tok, "a (cat), sitting").indices("cat") == [3]


def test_unknown_word_lists_the_prompt_words(tok: tk.TokenizerSpec) -> None:
    with pytest.raises(ValueError, match=r"'dog' is not a word .*'cat', 'sitting'"):
        al.word_indices(tok, CAT, "dog")


def test_too_long_prompt(tok: tk.TokenizerSpec) -> None:
    al.tokenize(tok, " ".join(["cat"] * 75))  # 75 + BOS + EOS = 77 fits
    with pytest.raises(ValueError, match="the prompt has 78 tokens"):
        al.tokenize(tok, " ".join(["cat"] * 76))


def test_replace_mapper_one_to_many_and_tail(tok: tk.TokenizerSpec) -> None:
    m = al.replace_mapper(tok, CAT, "a ragamuffin sitting next to a mirror")
    assert m.shape == (77, 77)
    assert torch.equal(m[2, 2:6], torch.full((4,), 0.25))  # cat → 4 tokens, ¼ each
    assert m[0, 0] == 1 and m[1, 1] == 1
    for i in range(3, 77 - 3):  # sitting … EOS … padding: source i → target i + 3
        assert m[i, i + 3] == 1 and m[i].sum() == 1
    a_src = torch.rand(2, 5, 77)
    a_tgt = a_src @ m
    assert torch.allclose(a_tgt[..., 2:6], a_src[..., 2:3].expand(-1, -1, 4) / 4)


def test_replace_mapper_many_to_one_sums_and_follows_alignment(tok: tk.TokenizerSpec) -> None:
    m = al.replace_mapper(tok, "a ragamuffin sitting next to a mirror", CAT)
    assert torch.equal(m[2:6, 2], torch.ones(4))  # several source tokens → one target token: sum
    assert m[6, 3] == 1 and m[11, 8] == 1  # "sitting" and EOS along the alignment
    assert m[8, 8] == 0  # the reference's mapper[j, j] would put a 1 here
    a_src = torch.rand(3, 77)
    assert torch.allclose((a_src @ m)[:, 2], a_src[:, 2:6].sum(-1))


def test_replace_same_length_words_map_one_to_one(tok: tk.TokenizerSpec) -> None:
    m = al.replace_mapper(tok, CAT, "a dog sitting next to a mirror")
    assert torch.equal(m, torch.eye(77))


def test_replace_needs_same_word_count(tok: tk.TokenizerSpec) -> None:
    with pytest.raises(ValueError, match="source has 7, target has 8 — use refine"):
        al.replace_mapper(tok, CAT, "a silver cat sitting next to a mirror")


def test_needleman_wunsch_tie_break() -> None:
    assert al.needleman_wunsch([7, 8], [8, 7]) == [1, -1]  # left beats up beats diagonal
    assert al.needleman_wunsch([0, 7, 8, 9], [0, 8, 7, 9]) == [0, 2, -1, 3]
    assert al.needleman_wunsch([1, 2, 3], [1, 2, 3]) == [0, 1, 2]
    assert al.needleman_wunsch([1, 5, 3], [1, 6, 3]) == [0, -1, 2]  # mismatch is never matched


def test_refine_insertion(tok: tk.TokenizerSpec) -> None:
    mapper, alphas = al.refine_alignment(tok, CAT, "a silver cat sitting next to a mirror")
    assert mapper[:10].tolist() == [0, 1, 0, 2, 3, 4, 5, 6, 7, 8]
    assert alphas[:10].tolist() == [1, 1, 0, 1, 1, 1, 1, 1, 1, 1]  # "silver" is new
    assert torch.equal(mapper[10:], torch.arange(10, 77)) and bool(alphas[10:].eq(1).all())


def test_refine_deletion_and_punctuation(tok: tk.TokenizerSpec) -> None:
    mapper, alphas = al.refine_alignment(tok, CAT + ".", CAT)
    assert mapper[:9].tolist() == list(range(8)) + [9]  # target EOS ← source EOS, "." dropped
    assert bool(alphas.eq(1).all())


def test_equalizer(tok: tk.TokenizerSpec) -> None:
    eq = al.equalizer(tok, "a ragamuffin sitting next to a mirror.", "ragamuffin:2, mirror:0.5")
    expected = torch.ones(77)
    expected[2:6], expected[10] = 2.0, 0.5
    assert torch.equal(eq, expected)  # the "." after mirror (position 11) keeps 1
    assert torch.equal(al.equalizer(tok, CAT, {"cat": 3}), al.equalizer(tok, CAT, ["cat:3"]))
    with pytest.raises(ValueError, match="expected 'word:value'"):
        al.equalizer(tok, CAT, "cat")
    with pytest.raises(ValueError, match="expected a number"):
        al.equalizer(tok, CAT, "cat:big")
    for text in ("cat:nan", "cat:inf", "cat:-inf"):  # float() reads them; a weight cannot be
        with pytest.raises(ValueError, match="expected a finite number for 'cat'"):
            al.equalizer(tok, CAT, text)
    with pytest.raises(ValueError, match="'tiger' is not a word"):
        al.equalizer(tok, CAT, "tiger:2")
