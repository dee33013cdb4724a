"""The SD1 CLIP tokenizer: where its vocabulary comes from, and that the conversion is exact."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nti_core import tokenizer as tk


def _bpe() -> Path:
    path = tk.clip_anytorch_bpe()
    if path is None:
        pytest.skip(f"clip-anytorch is not installed ({tk.INSTALL_HINT})")
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clip_vocab")
    tk.write_vocab_merges(folder, *tk.bpe_to_vocab_merges(_bpe()))
    return folder


def test_bytes_to_unicode_is_a_bijection_of_256_printable_chars() -> None:
    table = tk.bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ"


def test_conversion_sizes(converted: Path) -> None:
    vocab, merges = tk.bpe_to_vocab_merges(_bpe())
    assert len(merges) == 49152 - 256 - 2 == 48894
    assert len(vocab) == 49408
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["in"] == 512  # first merge "i n"


def test_conversion_equals_comfyui_files_byte_for_byte(converted: Path) -> None:
    root = os.environ.get("COMFYUI_PATH")
    if not root:
        pytest.skip("COMFYUI_PATH is unset: no ComfyUI checkout to compare the vocabulary with")
    ref = Path(root) / "comfy" / "sd1_tokenizer"
    for name in ("vocab.json", "merges.txt"):
        assert (converted / name).read_bytes() == (ref / name).read_bytes(), name


def test_sd1_tokenizer_from_folder(converted: Path) -> None:
    tok = tk.sd1_clip_tokenizer(converted)
    assert isinstance(tok, tk.TokenizerSpec)
    assert (tok.bos, tok.eos, tok.max_length) == (49406, 49407, 77)
    assert tok.encode("a cat sitting next to a Mirror.") == [320, 2368, 4919, 1131, 531, 320, 7220,
                                                             269]
    assert [tok.decode_token(i) for i in tok.encode("ragamuffin")] == ["ra", "gam", "u", "ffin"]


def test_search_order_and_errors(converted: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NTI_CLIP_TOKENIZER", str(converted))
    assert tk.resolve_vocab_folder() == converted
    other = tmp_path / "explicit"
    tk.write_vocab_merges(other, {"a": 0}, [])
    assert tk.resolve_vocab_folder(other) == other  # an explicit folder wins over the env var
    monkeypatch.setenv("NTI_CLIP_TOKENIZER", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="must hold vocab.json and merges.txt"):
        tk.resolve_vocab_folder()
    monkeypatch.delenv("NTI_CLIP_TOKENIZER")
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "no_comfy"))
    monkeypatch.setattr(tk, "clip_anytorch_bpe", lambda: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps clip-anytorch"):
        tk.resolve_vocab_folder()


def test_comfyui_folder_is_used_when_present(converted: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "ComfyUI"
    tk.write_vocab_merges(fake / "comfy" / "sd1_tokenizer", {"a": 0}, [])
    monkeypatch.delenv("NTI_CLIP_TOKENIZER", raising=False)
    monkeypatch.setenv("COMFYUI_PATH", str(fake))
    assert tk.resolve_vocab_folder() == fake / "comfy" / "sd1_tokenizer"


def test_cache_conversion_when_nothing_else(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _bpe()
    monkeypatch.delenv("NTI_CLIP_TOKENIZER", raising=False)
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    folder = tk.resolve_vocab_folder(cache_dir=tmp_path / "cache")
    assert folder == tmp_path / "cache"
    assert (folder / "vocab.json").stat().st_size > 1_000_000


def test_hf_adapter(converted: Path) -> None:
    hf = tk.sd1_clip_tokenizer(converted).tokenizer
    wrapped = tk.from_hf(hf)
    assert wrapped.encode("a cat") == [320, 2368] and wrapped.max_length == 77
    assert tk.from_hf(wrapped) is wrapped
    with pytest.raises(TypeError, match="Hugging Face tokenizer"):
        tk.from_hf(object())
