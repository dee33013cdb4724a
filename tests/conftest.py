"""Shared pytest fixtures. Importable without ComfyUI and without diffusers."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import comfy_support` from tests

import comfy_support  # noqa: E402  (imports torch only; ComfyUI is imported on first use)

# ============================================================================ core section


@pytest.fixture(scope="session")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The SD1 CLIP tokenizer, converted from clip-anytorch's BPE file into a temp folder."""
    from nti_core import tokenizer as tk

    if tk.clip_anytorch_bpe() is None:
        pytest.skip(f"no SD1 vocabulary ({tk.INSTALL_HINT})")
    folder: Path = tmp_path_factory.mktemp("clip_vocab")
    tk.write_vocab_merges(folder, *tk.bpe_to_vocab_merges(tk.clip_anytorch_bpe()))
    return tk.sd1_clip_tokenizer(folder)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD1 model as an LDM-layout .safetensors declaring its 16-group GroupNorms (a
    user's single-file checkpoint, for the command line and the single-file loader)."""
    pytest.importorskip("diffusers", reason="the command line loads models with diffusers")
    import ldm_export
    from core_support import TINY_GROUPS, tiny_model

    path = tmp_path_factory.mktemp("single_file") / "tiny_sd1.safetensors"
    return ldm_export.save_ldm_checkpoint(path, tiny_model(), TINY_GROUPS)


# ============================================================================ ComfyUI section
# Everything below needs a ComfyUI checkout named by $COMFYUI_PATH; tests that use these
# fixtures are skipped, saying why, when it is unset. The tiny SD1.5 checkpoint is generated
# once per session (or reused from $NTI_TEST_CACHE when that directory is set).


@pytest.fixture(scope="session")
def comfy_root() -> Path:
    """The ComfyUI checkout, importable in-process with ``--cpu`` semantics."""
    root = comfy_support.comfy_path()
    if root is None:
        pytest.skip(f"ComfyUI tests need ${comfy_support.COMFYUI_ENV} (a ComfyUI checkout)")
    return comfy_support.import_comfy(root)


@pytest.fixture(scope="session")
def tiny_spec() -> comfy_support.TinySpec:
    """Layout of the generated test UNet."""
    return comfy_support.TinySpec()


@pytest.fixture(scope="session")
def tiny_checkpoint(
    comfy_root: Path, tiny_spec: comfy_support.TinySpec, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Path of the generated SD1.5-format ``.safetensors`` (random weights, seed 1234)."""
    cache = os.environ.get(comfy_support.CACHE_ENV)
    folder = Path(cache) if cache else tmp_path_factory.mktemp("nti_checkpoints")
    return comfy_support.cached_checkpoint(folder, tiny_spec, comfy_support.DEFAULT_SEED)


@pytest.fixture(scope="session")
def install_tiny_checkpoint(tiny_checkpoint: Path) -> Callable[..., Path]:
    """``install(models_dir, name=...)`` puts the checkpoint in ``<models_dir>/checkpoints/``."""

    def install(models_dir: Path, name: str = comfy_support.DEFAULT_NAME) -> Path:
        return comfy_support.install_checkpoint(Path(models_dir), tiny_checkpoint, name)

    return install


@pytest.fixture(scope="session")
def comfy_sd15(tiny_checkpoint: Path) -> tuple[Any, Any, Any]:
    """(MODEL, CLIP, VAE) of the tiny checkpoint loaded by ComfyUI. Do not mutate: shared."""
    return comfy_support.load_comfy_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_diffusers_unet(tiny_checkpoint: Path, tiny_spec: comfy_support.TinySpec) -> Any:
    """A diffusers ``UNet2DConditionModel`` holding the tiny checkpoint's UNet weights (fp32)."""
    pytest.importorskip("diffusers", reason="the diffusers reference UNet needs diffusers")
    return comfy_support.diffusers_unet(tiny_checkpoint, tiny_spec)


# ============================================================================ HTTP workflow section
# A real ComfyUI server (``main.py --cpu`` from $COMFYUI_PATH on a loopback port) in a throwaway
# base directory: this repository symlinked as custom_nodes/comfyui-nti-p2p, a tiny checkpoint
# in models/checkpoints, the example photo in input/. Started once per session, stopped at the end.

import http_support  # noqa: E402  (standard library only)

EXAMPLE_PHOTO = http_support.REPO_ROOT / "nti_core" / "assets" / "gnochi_mirror.jpeg"

HTTP_SPEC = comfy_support.HTTP_SPEC


@pytest.fixture(scope="session")
def http_checkpoint(comfy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HTTP tests' SD1.5-format checkpoint (random weights; cached like ``tiny_checkpoint``)."""
    cache = os.environ.get(comfy_support.CACHE_ENV)
    folder = Path(cache) if cache else tmp_path_factory.mktemp("nti_http_checkpoints")
    return comfy_support.cached_checkpoint(folder, HTTP_SPEC, comfy_support.DEFAULT_SEED)


@pytest.fixture(scope="session")
def quarter_sd15(http_checkpoint: Path) -> tuple[Any, Any, Any]:
    """(MODEL, CLIP, VAE) of the HTTP tests' checkpoint, in-process: its cross-attention sits at
    a quarter of the latent side, what LocalBlend, the recorded maps and the attention loss
    read. Shared: do not mutate."""
    return comfy_support.load_comfy_checkpoint(http_checkpoint)


@pytest.fixture(scope="session")
def comfy_server(
    comfy_root: Path, http_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
):
    """A running :class:`http_support.ComfyServer` with this pack loaded; the checkpoint is
    ``models/checkpoints/nti_tiny_sd15.safetensors``."""
    base = http_support.prepare_base(tmp_path_factory.mktemp("comfy_base"),
                                     images=(EXAMPLE_PHOTO,))
    comfy_support.install_checkpoint(base / "models", http_checkpoint)
    cache = os.environ.get(comfy_support.CACHE_ENV)
    folder = Path(cache) if cache else tmp_path_factory.mktemp("nti_clip_vision")
    comfy_support.install_clip_vision(base / "models", comfy_support.cached_clip_vision_vitl(folder))
    server = http_support.ComfyServer.start(comfy_root, base)
    try:
        yield server
    finally:
        server.stop()
