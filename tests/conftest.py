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
