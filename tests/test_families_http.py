"""SD 1.x, SD 2.x (v-prediction) and SDXL checkpoints through a real ComfyUI over HTTP: the
shipped workflow (SDXL: its own) loads the checkpoint with CheckpointLoaderSimple, inverts the
photo, optimises the null text, edits, decodes and saves — for each family, in one server.

The checkpoints are the generated test files of tests/comfy_support.py that ComfyUI's own
detection recognises (SD15; SD20 with ComfyUI's v-prediction test; SDXL with the SDXL layout,
scaled down to 320 channels, full-size CLIP-L + CLIP-G), ~0.3 / 0.9 / 2.4 GB, cached in
$NTI_TEST_CACHE. Marked slow: run before resolving (``-m slow``), not in CI (no ComfyUI there).

Reported per family (printed, and read into the README's support table): the error of the
reconstructed latent against the photo's latent (SaveLatent files; MSE / variance of the photo's
latent) for the paper's null-text, the fast mode, negative-prompt inversion (= DDIM's round trip
at guidance 1) and Direct Inversion (exact: asserted). Latents, not pixels: the test VAEs are
random, their decoders amplify any latent difference.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import comfy_support
import http_support
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from workflow_api import find_nodes, save_latents, set_input, ui_to_api

from nti_core.methods import offered_by

pytestmark = pytest.mark.slow

WORKFLOWS = http_support.REPO_ROOT / "workflows"
PHOTO = http_support.REPO_ROOT / "nti_core" / "assets" / "gnochi_mirror.jpeg"
SIDE, STEPS, INNER = 64, 4, 10
# family → (checkpoint spec, file name in models/checkpoints, shipped workflow)
FAMILIES = {
    "sd1": (comfy_support.HTTP_SPEC_GAIN, "nti_tiny_sd15.safetensors", "nti_p2p_real_image_edit"),
    "sd2-v": (comfy_support.SD2_V_SPEC, "nti_tiny_sd2_v.safetensors", "nti_p2p_real_image_edit"),
    "sdxl": (comfy_support.SDXL_SPEC, "nti_tiny_sdxl.safetensors", "nti_sdxl_real_image_edit"),
}
METHODS = offered_by("NTINullTextOptimize")  # every method the node offers (nti_core/methods.py)


@pytest.fixture(scope="module")
def family_server(comfy_root: Path, tmp_path_factory: pytest.TempPathFactory):
    base = http_support.prepare_base(tmp_path_factory.mktemp("comfy_families"), images=(PHOTO,))
    cache = os.environ.get(comfy_support.CACHE_ENV)
    folder = Path(cache) if cache else tmp_path_factory.mktemp("nti_family_checkpoints")
    for spec, name, _ in FAMILIES.values():
        comfy_support.install_checkpoint(base / "models",
                                         comfy_support.cached_checkpoint(folder, spec), name)
    server = http_support.ComfyServer.start(comfy_root, base)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def object_info(family_server) -> dict[str, Any]:
    return family_server.get("/object_info", timeout=60).body


def small_workflow(object_info: dict, family: str, method: str) -> dict[str, Any]:
    """The family's shipped workflow at 64² px, 4 steps, with the photo's latent (node 902) and
    P2P Sample's latents (node 903) saved as files."""
    spec, ckpt, workflow = FAMILIES[family]
    ui = json.loads((WORKFLOWS / f"{workflow}.json").read_text())
    api = copy.deepcopy(ui_to_api(ui, object_info))
    set_input(api, "CheckpointLoaderSimple", "ckpt_name", ckpt)
    set_input(api, "ImageScale", "width", SIDE)
    set_input(api, "ImageScale", "height", SIDE)
    set_input(api, "NTIDDIMInvert", "steps", STEPS)
    set_input(api, "NTINullTextOptimize", "inner_steps", INNER)
    set_input(api, "NTINullTextOptimize", "method", method)
    (save,) = find_nodes(api, "SaveImage")
    api[save]["inputs"]["filename_prefix"] = f"test/{family}_{method}"
    return save_latents(api, f"test/{family}_photo", f"test/{family}_{method}")


def latents(server: http_support.ComfyServer, entry: dict, node_id: str) -> torch.Tensor:
    (record,) = entry["outputs"][node_id]["latents"]
    return load_file(str(server.image_file(record)))["latent_tensor"].double()


def images(server: http_support.ComfyServer, entry: dict, node_id: str) -> list[np.ndarray]:
    out = []
    for record in entry["outputs"][node_id]["images"]:
        with Image.open(server.image_file(record)) as im:
            out.append(np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_invert_null_text_and_edit_through_http(family_server, object_info, family) -> None:
    errors = {}
    for method in METHODS:
        api = small_workflow(object_info, family, method)
        entry = family_server.run(api, timeout=1800)
        (save,) = find_nodes(api, "SaveImage")
        recon, edit = images(family_server, entry, save)
        assert recon.shape == edit.shape == (SIDE, SIDE, 3)
        assert np.isfinite(edit).all() and edit.std() > 1e-3
        assert np.abs(edit - recon).mean() > 1e-3, "the edit is identical to the reconstruction"
        photo, rows = latents(family_server, entry, "902"), latents(family_server, entry, "903")
        assert rows.shape[0] == 2 and rows.shape[1:] == photo.shape[1:]
        errors[method] = float(((rows[:1] - photo) ** 2).mean() / photo.var())
    print(f"\n{family}: reconstructed latent MSE / var(photo latent): "
          + ", ".join(f"{m} {e:.2e}" for m, e in errors.items()))
    assert errors["direct"] < 1e-10  # the source row is the pivot: the photo's latent itself
    assert errors["null-text"] < 0.05 and errors["null-text-fast"] < 0.05


def test_family_of_the_clip_must_match_the_model(family_server, object_info) -> None:
    """An SD 1.x CLIP wired to an SDXL MODEL is refused with both families named."""
    api = small_workflow(object_info, "sdxl", "negative-prompt")
    api["950"] = {"class_type": "CheckpointLoaderSimple",
                  "inputs": {"ckpt_name": FAMILIES["sd1"][1]}}
    (invert,) = find_nodes(api, "NTIDDIMInvert")
    api[invert]["inputs"]["clip"] = ["950", 1]
    reply = family_server.queue(api)
    assert reply.status == 200, reply.body
    entry = family_server.wait_history(reply.body["prompt_id"], timeout=600)
    message = http_support.execution_error(entry)
    assert "the CLIP is SD 1.x's but the MODEL is SDXL" in message, message
