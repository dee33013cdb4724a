"""The UI→API workflow converter on a core-only workflow, against hand-written node specs.

The same file is converted with a live server's /object_info in test_workflows_http.py.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from workflow_api import (
    WorkflowError,
    ui_structure_problems,
    ui_to_api,
    widget_count_problems,
)

CORE_WORKFLOW = Path(__file__).parent / "data" / "core_txt2img.json"
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "workflows"

_INT = ["INT", {"default": 0}]
# The input definitions (types and order) of the core nodes the workflow uses, as /object_info
# reports them in ComfyUI 0.3.64 (options trimmed to what the conversion reads).
OBJECT_INFO = {
    "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["a.safetensors"], {}]}}},
    "CLIPTextEncode": {"input": {"required": {"text": ["STRING", {"multiline": True}],
                                              "clip": ["CLIP", {}]}}},
    "EmptyLatentImage": {"input": {"required": {"width": _INT, "height": _INT,
                                                "batch_size": _INT}}},
    "PrimitiveInt": {"input": {"required": {"value": ["INT", {"control_after_generate": True}]}}},
    "KSampler": {"input": {"required": {
        "model": ["MODEL", {}], "seed": ["INT", {"control_after_generate": True}],
        "steps": _INT, "cfg": ["FLOAT", {}], "sampler_name": [["euler", "ddim"], {}],
        "scheduler": [["normal", "ddim_uniform"], {}], "positive": ["CONDITIONING", {}],
        "negative": ["CONDITIONING", {}], "latent_image": ["LATENT", {}],
        "denoise": ["FLOAT", {}]}}},
    "VAEDecode": {"input": {"required": {"samples": ["LATENT"], "vae": ["VAE"]}}},
    "SaveImage": {"input": {"required": {"images": ["IMAGE", {}],
                                         "filename_prefix": ["STRING", {}]},
                            "hidden": {"prompt": "PROMPT"}}},
    "LoadImage": {"input": {"required": {"image": [["cat.png"], {"image_upload": True}]}}},
}

EXPECTED = {
    "1": {"ckpt_name": "nti_tiny_sd15.safetensors"},
    "2": {"text": "a photo of a cat", "clip": ["1", 1]},
    "3": {"text": "text, watermark", "clip": ["1", 1]},
    "4": {"width": 64, "height": 64, "batch_size": 1},
    "5": {"value": 2},
    "6": {"model": ["1", 0], "seed": 42, "steps": ["5", 0], "cfg": 7.0, "sampler_name": "euler",
          "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0],
          "latent_image": ["4", 0], "denoise": 1.0},
    "7": {"samples": ["6", 0], "vae": ["1", 2]},
    "9": {"images": ["7", 0], "filename_prefix": "core_check"},
}


@pytest.fixture
def core() -> dict:
    return json.loads(CORE_WORKFLOW.read_text())


def test_core_workflow_converts(core: dict) -> None:
    """Seed control value skipped, linked widget (steps) taken from the link, Reroute followed,
    Note dropped, hidden inputs ignored."""
    api = ui_to_api(core, OBJECT_INFO)
    assert {k: v["inputs"] for k, v in api.items()} == EXPECTED
    assert api["6"]["class_type"] == "KSampler"
    assert api["5"]["_meta"]["title"] == "Steps"


def test_core_workflow_is_consistent(core: dict) -> None:
    assert ui_structure_problems(core) == []
    assert widget_count_problems(core, OBJECT_INFO) == []


@pytest.mark.parametrize("path", sorted(SHIPPED_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_shipped_workflow_files_are_consistent(path: Path) -> None:
    """Links agree with node slots (widget counts are checked against a live server in
    test_workflows_http.py)."""
    workflow = json.loads(path.read_text())
    assert workflow["version"] == 0.4
    assert ui_structure_problems(workflow) == []


def test_input_order_follows_object_info(core: dict) -> None:
    """``input_order`` (what /object_info sends) wins over the dict order of ``input``."""
    info = copy.deepcopy(OBJECT_INFO)
    info["EmptyLatentImage"]["input_order"] = {"required": ["height", "width", "batch_size"]}
    core["nodes"][3]["widgets_values"] = [32, 64, 1]  # height first now
    assert ui_to_api(core, info)["4"]["inputs"] == {"height": 32, "width": 64, "batch_size": 1}


def test_upload_button_value_is_ignored() -> None:
    wf = {"nodes": [{"id": 1, "type": "LoadImage", "inputs": [],
                     "widgets_values": ["cat.png", "image"]}], "links": []}
    assert ui_to_api(wf, OBJECT_INFO)["1"]["inputs"] == {"image": "cat.png"}
    assert widget_count_problems(wf, OBJECT_INFO) == []


def test_force_input_is_not_a_widget() -> None:
    info = {"Sink": {"input": {"required": {"n": ["INT", {"forceInput": True}],
                                            "s": ["STRING", {}]}}},
            "Src": {"input": {}}}
    wf = {"nodes": [{"id": 1, "type": "Src", "outputs": [{"name": "INT", "type": "INT",
                                                          "links": [1]}]},
                    {"id": 2, "type": "Sink", "inputs": [{"name": "n", "type": "INT", "link": 1}],
                     "widgets_values": ["hello"]}],
          "links": [[1, 1, 0, 2, 0, "INT"]]}
    assert ui_to_api(wf, info)["2"]["inputs"] == {"n": ["1", 0], "s": "hello"}


def test_muted_nodes_left_out_and_bypass_refused(core: dict) -> None:
    core["nodes"][8]["mode"] = 2  # SaveImage muted
    assert "9" not in ui_to_api(core, OBJECT_INFO)
    core["nodes"][8]["mode"] = 4
    with pytest.raises(WorkflowError, match="bypassed"):
        ui_to_api(core, OBJECT_INFO)


def test_unknown_node_and_missing_link_are_refused(core: dict) -> None:
    core["nodes"][6]["type"] = "NoSuchNode"
    with pytest.raises(WorkflowError, match="NoSuchNode"):
        ui_to_api(core, OBJECT_INFO)
    core["nodes"][6]["type"] = "VAEDecode"
    core["nodes"][6]["inputs"][1]["link"] = None  # vae unlinked
    with pytest.raises(WorkflowError, match="required input 'vae'"):
        ui_to_api(core, OBJECT_INFO)


def test_structure_lint_catches_a_dangling_link(core: dict) -> None:
    core["links"][0][4] = 3  # MODEL link now claims KSampler slot 3 (latent_image)
    problems = ui_structure_problems(core)
    assert any("link 1" in p for p in problems), problems


def test_widget_lint_catches_a_missing_value(core: dict) -> None:
    core["nodes"][5]["widgets_values"] = [42, 20, 7.0, "euler", "normal", 1.0]  # no "fixed"
    assert widget_count_problems(core, OBJECT_INFO) == [
        "node 6 (KSampler): 6 widget values, expected 7"]


def test_structure_lint_catches_missing_frontend_fields(core: dict) -> None:
    del core["nodes"][0]["pos"]
    del core["last_link_id"]
    assert ui_structure_problems(core) == [
        "workflow lacks 'last_link_id'",
        "node 1 (CheckpointLoaderSimple) lacks 'pos'",
        "node 1 (CheckpointLoaderSimple): pos must be [x, y], got None",
    ]
