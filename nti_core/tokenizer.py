"""The tokenizer seen by the alignment code: ids without BOS/EOS, the specials and the context length.

``sd1_clip_tokenizer()`` builds SD 1.x's CLIP BPE tokenizer (transformers' ``CLIPTokenizer``) from,
in order: an explicit folder, ``$NTI_CLIP_TOKENIZER``, ``$COMFYUI_PATH/comfy/sd1_tokenizer``, or the
vocabulary shipped in the ``clip-anytorch`` wheel converted once into a cache folder.
transformers is imported lazily, inside the functions that need it.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger(__name__)

SD1_MAX_LENGTH = 77
INSTALL_HINT = "pip install --no-deps clip-anytorch"
_ENV_FOLDER = "NTI_CLIP_TOKENIZER"
_ENV_COMFY = "COMFYUI_PATH"
_ENV_CACHE = "NTI_CACHE_DIR"
_BPE_GZ = "bpe_simple_vocab_16e6.txt.gz"
_N_MERGES = 49152 - 256 - 2  # what CLIP's SimpleTokenizer keeps of the gz file


@runtime_checkable
class TokenizerSpec(Protocol):
    """What alignment needs: ``encode`` gives ids *without* BOS/EOS; ``max_length`` counts both."""

    bos: int
    eos: int
    max_length: int

    def encode(self, text: str) -> list[int]: ...

    def decode_token(self, token_id: int) -> str: ...


@dataclass(frozen=True)
class HFTokenizer:
    """Adapter from any Hugging Face tokenizer (e.g. ``pipe.tokenizer``) to :class:`TokenizerSpec`."""

    tokenizer: Any
    max_length: int = SD1_MAX_LENGTH

    @property
    def bos(self) -> int:
        return int(self.tokenizer.bos_token_id)

    @property
    def eos(self) -> int:
        return int(self.tokenizer.eos_token_id)

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text, add_special_tokens=False)]

    def decode_token(self, token_id: int) -> str:
        return str(self.tokenizer.decode([int(token_id)])).strip()


def from_hf(tokenizer: Any, max_length: int = SD1_MAX_LENGTH) -> HFTokenizer:
    """Wrap a Hugging Face tokenizer object (already a spec → returned as is)."""
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer
    for attr in ("bos_token_id", "eos_token_id", "encode", "decode"):
        if not hasattr(tokenizer, attr):
            raise TypeError(f"expected a Hugging Face tokenizer, got {type(tokenizer).__name__} "
                            f"without .{attr}")
    return HFTokenizer(tokenizer, max_length)


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 reversible byte → printable unicode table (256 entries)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def bpe_to_vocab_merges(bpe_gz: str | Path) -> tuple[dict[str, int], list[str]]:
    """CLIP's ``bpe_simple_vocab_16e6.txt.gz`` → (vocab.json dict, merges lines), as SimpleTokenizer."""
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = lines[1 : _N_MERGES + 1]
    base = list(bytes_to_unicode().values())
    vocab = base + [b + "</w>" for b in base]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_vocab_merges(folder: Path, vocab: dict[str, int], merges: list[str]) -> None:
    """Write vocab.json / merges.txt in Hugging Face's layout (atomic per file)."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = {
        "vocab.json": json.dumps(vocab, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
    }
    for name, text in texts.items():
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, folder / name)


def clip_anytorch_bpe() -> Path | None:
    """Path of the BPE gz inside the installed clip-anytorch package (not imported), or None."""
    spec = importlib.util.find_spec("clip")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / _BPE_GZ
        if path.is_file():
            return path
    return None


def _default_cache() -> Path:
    if os.environ.get(_ENV_CACHE):
        return Path(os.environ[_ENV_CACHE])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nti_core"


def _has_files(folder: Path) -> bool:
    return (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()


def resolve_vocab_folder(folder: str | Path | None = None, cache_dir: str | Path | None = None) -> Path:
    """The folder with vocab.json + merges.txt to use, following the documented search order."""
    for label, given in (("folder", folder), (f"${_ENV_FOLDER}", os.environ.get(_ENV_FOLDER))):
        if given:
            path = Path(given).expanduser()
            if not _has_files(path):
                raise FileNotFoundError(f"{label} {str(path)!r} must hold vocab.json and merges.txt")
            return path
    comfy = os.environ.get(_ENV_COMFY)
    if comfy:
        path = Path(comfy).expanduser() / "comfy" / "sd1_tokenizer"
        if _has_files(path):
            return path
        log.warning("$%s=%s has no comfy/sd1_tokenizer; trying clip-anytorch", _ENV_COMFY, comfy)
    bpe = clip_anytorch_bpe()
    if bpe is None:
        raise FileNotFoundError(
            "no SD1 CLIP vocabulary found: set $NTI_CLIP_TOKENIZER to a folder with vocab.json and "
            f"merges.txt, set $COMFYUI_PATH to a ComfyUI checkout, or run `{INSTALL_HINT}`")
    out = Path(cache_dir) if cache_dir else _default_cache() / "sd1_clip_tokenizer"
    if not _has_files(out):
        log.info("converting %s to vocab.json/merges.txt in %s", bpe, out)
        write_vocab_merges(out, *bpe_to_vocab_merges(bpe))
    return out


@functools.lru_cache(maxsize=4)
def _load_clip(folder: str) -> Any:
    from transformers import CLIPTokenizer  # lazy: nti_core imports torch/numpy only at top level

    # SD 1.x reads 77 positions; ComfyUI's copy of the files declares a larger limit
    return CLIPTokenizer.from_pretrained(folder, model_max_length=SD1_MAX_LENGTH)


def sd1_clip_tokenizer(
    folder: str | Path | None = None, cache_dir: str | Path | None = None
) -> HFTokenizer:
    """SD 1.x CLIP tokenizer (BOS 49406, EOS 49407, 77 positions) as a :class:`TokenizerSpec`."""
    path = resolve_vocab_folder(folder, cache_dir)
    return HFTokenizer(_load_clip(str(path.resolve())), SD1_MAX_LENGTH)


# The vocabularies the families' text encoders read, by name (``Family.tokenizer``): CLIP-L (SD 1.x,
# SDXL's first), OpenCLIP-H (SD 2.x) and OpenCLIP-G (SDXL's second) all tokenise with CLIP's BPE
# of 49408 tokens and 77 positions; they differ only in how they pad, after the words.
TOKENIZERS = {"clip-bpe": sd1_clip_tokenizer}


def family_tokenizer(name: str, folder: str | Path | None = None) -> HFTokenizer:
    """The tokenizer a family names (``folder``: where its vocabulary files are, when known)."""
    if name not in TOKENIZERS:
        raise ValueError(f"no tokenizer named {name!r}; known: {sorted(TOKENIZERS)}")
    return TOKENIZERS[name](folder)
