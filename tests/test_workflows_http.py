"""The pack inside a real ComfyUI server, driven over HTTP like a user's browser or script.

One server per session (fixture ``comfy_server`` in conftest.py): ``main.py --cpu`` from
$COMFYUI_PATH, this repository linked as custom_nodes/comfyui-nti-p2p, the tiny random SD1.5
checkpoint, the example photo. Skipped, saying why, without $COMFYUI_PATH.

To stay fast on CPU the shipped workflows are run with test overrides applied *after* the UI→API
conversion: the tiny checkpoint, the photo scaled to 64×64 (8×8 latents) instead of 512×512,
4 DDIM steps instead of 50 and 2 null-text iterations instead of 10. The JSON files keep the real
defaults (checked below).
"""

from __future__ import annotations

import copy
import json
import time
from typing import Any

import http_support
import numpy as np
import pytest
from PIL import Image
from test_workflow_api import CORE_WORKFLOW, EXPECTED
from workflow_api import (
    find_nodes,
    set_input,
    ui_structure_problems,
    ui_to_api,
    widget_count_problems,
)

WORKFLOWS = http_support.REPO_ROOT / "workflows"
NULL_TEXT_WORKFLOWS = ("nti_p2p_real_image_edit", "nti_p2p_reweight_localblend")
STYLED = "nti_styled_p2plus_attention_maps"
SDXL_WORKFLOW = "nti_sdxl_real_image_edit"  # run on an SDXL checkpoint in test_families_http.py
SHIPPED = (*NULL_TEXT_WORKFLOWS, STYLED, SDXL_WORKFLOW)
TINY = "nti_tiny_sd15.safetensors"
SIDE, STEPS, INNER = 64, 4, 2

# The node contract: inputs in widget/socket definition order, output types.
NTI_NODES = {
    "NTIDDIMInvert": (["model", "clip", "latent", "source_prompt", "steps", "grid", "record_maps"],
                      ["NTI_TRAJECTORY", "LATENT"]),
    "NTINullTextOptimize": (["model", "clip", "trajectory", "guidance", "inner_steps",
                             "early_stop", "method", "attention_loss", "precision"],
                            ["NTI_UNCOND", "STRING"]),
    "NTIAttentionEditPlan": (["clip", "source_prompt", "target_prompts", "edit_kind",
                              "cross_start", "cross_end", "cross_words", "self_start", "self_end",
                              "reweight", "blend_words", "subtract_words", "blend_threshold",
                              "blend_start", "self_limit", "uncond_self_end"], ["NTI_EDIT_PLAN"]),
    "NTIP2PSample": (["model", "trajectory", "uncond", "plan", "guidance"],
                     ["LATENT", "NTI_ATTENTION"]),
    "NTISaveInversion": (["trajectory", "uncond", "filename_prefix"], []),
    "NTILoadInversion": (["model", "inversion"], ["NTI_TRAJECTORY", "NTI_UNCOND", "NTI_VALUES"]),
    "NTIStyleInvert": (["model", "clip", "clip_vision", "image", "trajectory", "guidance",
                        "inner_steps", "attention_loss", "variant", "precision"],
                       ["NTI_VALUES", "NTI_UNCOND", "STRING"]),
    "NTIAttentionMaps": (["image", "row", "sizes", "step_start", "step_end"], ["IMAGE", "MASK"]),
}


@pytest.fixture(scope="module")
def object_info(comfy_server: http_support.ComfyServer) -> dict[str, Any]:
    reply = comfy_server.get("/object_info", timeout=60)
    assert reply.status == 200
    return reply.body


def load_ui(name: str) -> dict[str, Any]:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def small(api: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The test overrides (see the module docstring) on a converted shipped workflow."""
    api = copy.deepcopy(api)
    set_input(api, "CheckpointLoaderSimple", "ckpt_name", TINY)
    set_input(api, "ImageScale", "width", SIDE)
    set_input(api, "ImageScale", "height", SIDE)
    set_input(api, "NTIDDIMInvert", "steps", STEPS)
    if find_nodes(api, "NTINullTextOptimize"):
        set_input(api, "NTINullTextOptimize", "inner_steps", INNER)
    if find_nodes(api, "NTIStyleInvert"):
        set_input(api, "NTIStyleInvert", "inner_steps", INNER)
    for save in find_nodes(api, "SaveImage"):
        api[save]["inputs"]["filename_prefix"] = f"{prefix}_{save}"
    return api


def saved_images(server: http_support.ComfyServer, entry: dict, node_id: str) -> list[np.ndarray]:
    records = entry["outputs"][node_id]["images"]
    arrays = []
    for record in records:
        path = server.image_file(record)
        assert path.is_file(), f"{record} not on disk at {path}"
        with Image.open(path) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            arrays.append(np.asarray(im, dtype=np.float32) / 255.0)
    return arrays


# --------------------------------------------------------------------------- loading


def test_pack_loads_without_import_error(comfy_server, object_info) -> None:
    log = comfy_server.log_text()
    link = str(comfy_server.base / "custom_nodes" / http_support.PACK_NAME)
    import_lines = [line for line in log.splitlines() if line.rstrip().endswith(link)]
    assert import_lines, "the pack is not in the import-times table" + comfy_server.log_tail()
    assert all("IMPORT FAILED" not in line for line in import_lines), import_lines
    assert f"Cannot import {link}" not in log
    for node_id, (inputs, outputs) in NTI_NODES.items():
        assert node_id in object_info, f"{node_id} missing from /object_info"
        info = object_info[node_id]
        assert info["input_order"]["required"] == inputs, node_id
        assert info["output"] == outputs, node_id
        assert info["python_module"].startswith("custom_nodes."), info["python_module"]
    assert object_info["NTISaveInversion"]["output_node"] is True


def test_shipped_workflows_are_valid_ui_files(object_info) -> None:
    """Links agree with node slots, widget values fit the live node definitions, and the files
    keep the real defaults (the test overrides are applied to copies only)."""
    for name in SHIPPED:
        ui = load_ui(name)
        assert ui["version"] == 0.4
        assert ui_structure_problems(ui) == [], name
        assert widget_count_problems(ui, object_info) == [], name
        api = ui_to_api(ui, object_info)
        (invert,) = find_nodes(api, "NTIDDIMInvert")
        # StyleDiffusion's official code runs 30 steps (its schedules are shaped for 30)
        assert api[invert]["inputs"]["steps"] == (30 if find_nodes(api, "NTIStyleInvert") else 50)
        (scale,) = find_nodes(api, "ImageScale")
        side = 1024 if name == SDXL_WORKFLOW else 512  # each family's native resolution
        assert (api[scale]["inputs"]["width"], api[scale]["inputs"]["height"]) == (side, side)
        assert api[scale]["inputs"]["crop"] == "center"
        (load,) = find_nodes(api, "LoadImage")
        assert api[load]["inputs"]["image"] == "gnochi_mirror.jpeg"
        (plan,) = find_nodes(api, "NTIAttentionEditPlan")
        assert api[plan]["inputs"]["source_prompt"] == api[invert]["inputs"]["source_prompt"]
        assert find_nodes(api, "SaveImage"), name


def test_web_extension_is_served(comfy_server) -> None:
    """web/ is registered (WEB_DIRECTORY): the frontend loads our script from /extensions."""
    listed = comfy_server.get("/extensions")
    assert listed.status == 200
    script = f"/extensions/{http_support.PACK_NAME}/nti_report.js"
    assert script in listed.body, listed.body
    served = comfy_server.get(script)
    body = served.body if isinstance(served.body, str) else served.body.decode()
    assert served.status == 200 and "registerExtension" in body


# --------------------------------------------------------------------------- template browser


def test_template_browser_lists_the_workflows(comfy_server) -> None:
    """GET /workflow_templates maps custom-node folder names to workflow names (files of
    <pack>/workflows/*.json); the frontend then fetches
    /api/workflow_templates/<pack>/<name>.json (and <name>.jpg as the thumbnail)."""
    reply = comfy_server.get("/workflow_templates")
    assert reply.status == 200
    assert sorted(reply.body.get(http_support.PACK_NAME, [])) == sorted(SHIPPED), reply.body
    for name in SHIPPED:
        served = comfy_server.get(f"/api/workflow_templates/{http_support.PACK_NAME}/{name}.json")
        assert served.status == 200
        body = served.body if isinstance(served.body, dict) else json.loads(served.body)
        assert body == load_ui(name)
        thumbnail = comfy_server.get(f"/api/workflow_templates/{http_support.PACK_NAME}/{name}.jpg")
        assert thumbnail.status == 200 and thumbnail.body[:3] == b"\xff\xd8\xff"  # JPEG


# --------------------------------------------------------------------------- running workflows


def test_core_workflow_runs(comfy_server, object_info) -> None:
    """The converter against the live /object_info, then a core-only run (harness check)."""
    api = ui_to_api(json.loads(CORE_WORKFLOW.read_text()), object_info)
    assert {k: v["inputs"] for k, v in api.items()} == EXPECTED
    entry = comfy_server.run(api, timeout=180)
    (image,) = saved_images(comfy_server, entry, "9")
    assert image.shape == (64, 64, 3)


@pytest.mark.parametrize("name", NULL_TEXT_WORKFLOWS)
def test_shipped_workflow_runs(comfy_server, object_info, name: str) -> None:
    api = small(ui_to_api(load_ui(name), object_info), f"test/{name}")
    (plan,) = find_nodes(api, "NTIAttentionEditPlan")
    targets = [t for t in api[plan]["inputs"]["target_prompts"].splitlines() if t.strip()]
    (save,) = find_nodes(api, "SaveImage")
    (optimize,) = find_nodes(api, "NTINullTextOptimize")
    start = time.perf_counter()
    entry = comfy_server.run(api, timeout=600)
    elapsed = time.perf_counter() - start

    images = saved_images(comfy_server, entry, save)
    assert len(images) == 1 + len(targets), "reconstruction first, then one image per target"
    for image in images:
        assert image.shape == (SIDE, SIDE, 3)
        assert np.isfinite(image).all() and image.std() > 1e-3  # not a flat/black frame
    recon, edit = images[0], images[1]
    assert np.abs(edit - recon).mean() > 1e-3, "the edit is identical to the reconstruction"
    report = entry["outputs"][optimize]["text"][0]  # ui text shown on the node
    assert str(STEPS) in report, report
    print(f"{name}: {elapsed:.1f} s, |edit - recon| = {np.abs(edit - recon).mean():.4f}")


def test_styled_workflow_runs(comfy_server, object_info) -> None:
    """Photo → DDIM Invert (maps) → StyleDiffusion Invert (CLIP ViT-L/14 from CLIPVisionLoader)
    → P2Plus plan → P2P Sample with values → decoded reconstruction and edit, and the attention
    maps grid, each saved."""
    api = small(ui_to_api(load_ui(STYLED), object_info), "test/styled")
    (style,) = find_nodes(api, "NTIStyleInvert")
    (maps,) = find_nodes(api, "NTIAttentionMaps")
    (plan,) = find_nodes(api, "NTIAttentionEditPlan")
    assert api[plan]["inputs"]["uncond_self_end"] == 0.5  # P2Plus
    saves = find_nodes(api, "SaveImage")
    entry = comfy_server.run(api, timeout=900)
    by_source = {api[s]["inputs"]["images"][0]: s for s in saves}
    images = saved_images(comfy_server, entry, by_source[find_nodes(api, "VAEDecode")[0]])
    assert len(images) == 2 and all(i.shape == (SIDE, SIDE, 3) for i in images)
    assert np.abs(images[1] - images[0]).mean() > 1e-3
    (grid,) = saved_images(comfy_server, entry, by_source[maps])
    words = len(api[plan]["inputs"]["target_prompts"].split())
    assert grid.shape[1] > 4 * 192 and grid.std() > 1e-2  # labelled tiles, one per word
    assert words == 7
    report = entry["outputs"][style]["text"][0]
    assert "StyleDiffusion (official" in report and "257×1024" in report, report


def reconstruction(server: http_support.ComfyServer, object_info: dict, name: str) -> np.ndarray:
    """Run a shipped workflow (small) and return the batch's first image."""
    api = small(ui_to_api(load_ui(name), object_info), f"test/recon_{name}")
    (save,) = find_nodes(api, "SaveImage")
    return saved_images(server, server.run(api, timeout=600), save)[0]


def test_edit_plans_leave_the_reconstruction_alone(comfy_server, object_info) -> None:
    """Row 0 of P2P Sample is the source prompt's: the two shipped plans (replace vs replace +
    reweight + local blend) give the same reconstruction from the same inversion."""
    first, second = (reconstruction(comfy_server, object_info, name)
                     for name in NULL_TEXT_WORKFLOWS)
    assert np.abs(first - second).max() <= 1 / 255


def run_with_decoded(server: http_support.ComfyServer, api: dict[str, Any], latent: list,
                     prefix: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run ``api`` with ``latent`` (a [node, output] link) also decoded by the workflow's VAE and
    saved (test nodes 900/901) → the reconstruction, the edit and that decoded image."""
    (vae_source,) = {tuple(api[n]["inputs"]["vae"]) for n in find_nodes(api, "VAEDecode")}
    api["900"] = {"class_type": "VAEDecode", "inputs": {"samples": latent, "vae": list(vae_source)}}
    api["901"] = {"class_type": "SaveImage",
                  "inputs": {"images": ["900", 0], "filename_prefix": prefix}}
    entry = server.run(api, timeout=600)
    (save,) = [n for n in find_nodes(api, "SaveImage") if n != "901"]
    recon, edit = saved_images(server, entry, save)
    (decoded,) = saved_images(server, entry, "901")
    return recon, edit, decoded


def test_negative_prompt_reconstruction_is_the_ddim_round_trip(comfy_server, object_info) -> None:
    """With ∅ = the source prompt (negative-prompt inversion) guidance cancels out, so P2P
    Sample's reconstruction must equal DDIM Invert's own round trip (decoded by a test node)."""
    api = small(ui_to_api(load_ui(SHIPPED[0]), object_info), "test/npi")
    set_input(api, "NTINullTextOptimize", "method", "negative-prompt")
    (invert,) = find_nodes(api, "NTIDDIMInvert")
    recon, edit, ddim = run_with_decoded(comfy_server, api, [invert, 1], "test/npi_ddim")
    assert np.abs(recon - ddim).max() <= 2 / 255
    assert np.abs(edit - ddim).mean() > 1e-3


def test_direct_inversion_reconstruction_is_the_vae_round_trip(comfy_server, object_info) -> None:
    """Direct Inversion keeps the source row on the pivot: P2P Sample's reconstruction is the
    photo's own latent, so it decodes to the VAE round trip of the input; the edit differs."""
    api = small(ui_to_api(load_ui(SHIPPED[0]), object_info), "test/direct")
    set_input(api, "NTINullTextOptimize", "method", "direct")
    (encode,) = find_nodes(api, "VAEEncode")
    recon, edit, vae = run_with_decoded(comfy_server, api, [encode, 0], "test/direct_vae")
    assert np.abs(recon - vae).max() <= 1 / 255
    assert np.abs(edit - vae).mean() > 1e-3


# --------------------------------------------------------------------------- validation


def test_replace_with_different_word_counts_is_refused_at_queue_time(
    comfy_server, object_info
) -> None:
    """ComfyUI calls the plan's validate_inputs in POST /prompt: nothing runs, 400 + message."""
    api = small(ui_to_api(load_ui(SHIPPED[0]), object_info), "test/refused")
    (plan,) = find_nodes(api, "NTIAttentionEditPlan")
    api[plan]["inputs"]["edit_kind"] = "replace"
    api[plan]["inputs"]["target_prompts"] = "a big tiger sitting next to a mirror"
    start = time.perf_counter()
    reply = comfy_server.queue(api)
    elapsed = time.perf_counter() - start
    assert reply.status == 400, reply.body
    assert plan in reply.body["node_errors"], reply.body
    errors = reply.body["node_errors"][plan]["errors"]
    assert errors[0]["type"] == "custom_validation_failed", errors
    # ComfyUI repeats the message once per validated input; the first says it all.
    message = "replace needs the same number of words: source has 7, target has 8 — use refine"
    assert message in errors[0]["details"], http_support.node_error_text(reply.body)
    assert elapsed < 10, f"validation took {elapsed:.1f} s"
    queue = comfy_server.get("/queue").body
    assert queue["queue_running"] == [] and queue["queue_pending"] == []
