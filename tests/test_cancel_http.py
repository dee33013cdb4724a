"""Cancel over HTTP, as the browser's Cancel button does it: POST /interrupt while a node of the
pack runs, found by the websocket's "progress" messages of that node.

For DDIM Invert, Null-Text Optimize, P2P Sample and StyleDiffusion Invert: the prompt ends
interrupted at that node (history and the websocket's "execution_interrupted", no
"execution_error"), no file appears that the node feeds (Save Inversion, SaveImage,
SaveLatent) and no temporary file; the same prompt then runs to completion, and again after
POST /free (ComfyUI's cache reset, models reloaded): both give the same latents, bit for bit —
the interrupted runs left neither a patched MODEL nor other state behind.

The session's server (``comfy_server``) at the sizes of test_workflows_http.py (64 px, 2 inner
iterations) with more steps, so that the node is still running when Cancel arrives. Needs
$COMFYUI_PATH and aiohttp (ComfyUI's own dependency) for the websocket.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import http_support
import pytest
import torch
from test_families_http import latents
from test_workflows_http import NULL_TEXT_WORKFLOWS, STYLED, load_ui, small
from workflow_api import find_nodes, set_input, ui_to_api

from nti_core.files import check_inversion_file

STEPS = 8  # DDIM steps: each node of the chain then runs for a second or more


@pytest.fixture(scope="module")
def object_info(comfy_server: http_support.ComfyServer) -> dict[str, Any]:
    return comfy_server.get("/object_info", timeout=60).body


def cancellable(object_info: dict[str, Any], workflow: str, prefix: str) -> dict[str, Any]:
    """A shipped workflow, small but with STEPS steps, plus Save Inversion (node 904) and the
    rows' latents saved (node 903)."""
    api = small(ui_to_api(load_ui(workflow), object_info), prefix)
    set_input(api, "NTIDDIMInvert", "steps", STEPS)
    (invert,) = find_nodes(api, "NTIDDIMInvert")
    (sample,) = find_nodes(api, "NTIP2PSample")
    uncond = find_nodes(api, "NTINullTextOptimize") or find_nodes(api, "NTIStyleInvert")
    slot = 0 if api[uncond[0]]["class_type"] == "NTINullTextOptimize" else 1
    api["903"] = {"class_type": "SaveLatent",
                  "inputs": {"samples": [sample, 0], "filename_prefix": f"{prefix}_rows"}}
    api["904"] = {"class_type": "NTISaveInversion",
                  "inputs": {"trajectory": [invert, 0], "uncond": [uncond[0], slot],
                             "filename_prefix": f"{prefix}/inversion"}}
    if slot:  # StyleDiffusion's values are saved with the inversion
        api["904"]["inputs"]["values"] = [uncond[0], 0]
    return api


def files(server: http_support.ComfyServer) -> set[Path]:
    """Every file under the output and temp folders."""
    return {p for folder in ("output", "temp") for p in (server.base / folder).rglob("*")
            if p.is_file()}


async def _cancel(server: http_support.ComfyServer, prompt: dict[str, Any],
                  node: str) -> dict[str, Any]:
    import aiohttp

    client = uuid.uuid4().hex
    seen: dict[str, Any] = {"progress": None}
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(f"{server.url}/ws?clientId={client}") as ws:
        async with session.post(f"{server.url}/prompt",
                                json={"prompt": prompt, "client_id": client}) as reply:
            body = await reply.json()
            assert reply.status == 200, body
        seen["prompt_id"] = body["prompt_id"]
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            event = json.loads(msg.data)
            kind, data = event["type"], event.get("data") or {}
            if data.get("prompt_id") != seen["prompt_id"]:
                continue
            if kind == "progress" and data["node"] == node and seen["progress"] is None:
                seen["progress"] = (data["value"], data["max"])
                seen["sent"] = time.perf_counter()
                await session.post(f"{server.url}/interrupt",
                                   json={"prompt_id": seen["prompt_id"]})
            if kind in ("execution_interrupted", "execution_error", "execution_success"):
                seen["end"], seen["data"] = kind, data
                seen["latency"] = time.perf_counter() - seen.get("sent", time.perf_counter())
                return seen
    raise AssertionError("the websocket closed before the prompt ended")


def cancel_when_running(server: http_support.ComfyServer, prompt: dict[str, Any],
                        node: str) -> dict[str, Any]:
    """Queue ``prompt``, POST /interrupt at the first "progress" of ``node``; → what was seen
    (progress at Cancel, the closing event, its latency) and the history entry."""
    seen = asyncio.run(asyncio.wait_for(_cancel(server, prompt, node), timeout=600))
    seen["entry"] = server.wait_history(seen["prompt_id"], timeout=60)
    return seen


def assert_interrupted_at(seen: dict[str, Any], node: str) -> None:
    assert seen["progress"] is not None, "the node sent no progress"
    value, total = seen["progress"]
    assert value < total, f"Cancel came after the node's last step ({value}/{total})"
    assert seen["end"] == "execution_interrupted" and seen["data"]["node_id"] == node, seen
    status = seen["entry"]["status"]
    assert status["status_str"] == "error" and not status["completed"], status
    kinds = [kind for kind, _ in status["messages"]]
    assert "execution_interrupted" in kinds and "execution_error" not in kinds, kinds


def free(server: http_support.ComfyServer) -> None:
    """POST /free: ComfyUI's cache reset and models unloaded before the next prompt."""
    assert server.post("/free", {"free_memory": True}).status == 200
    time.sleep(1.0)  # the idle worker takes the flags at once; a prompt queued with them waits


def cached_nodes(entry: dict[str, Any]) -> list[str]:
    """The nodes a finished prompt took from ComfyUI's cache (its "execution_cached")."""
    (cached,) = [d["nodes"] for kind, d in entry["status"]["messages"]
                 if kind == "execution_cached"]
    return cached


def rerun_after_free(server: http_support.ComfyServer, prompt: dict[str, Any]) -> dict:
    """POST /free, then run ``prompt``: nothing was cached."""
    free(server)
    entry = server.run(prompt, timeout=900)
    assert cached_nodes(entry) == [], f"the cache was not reset: {cached_nodes(entry)}"
    return entry


def check_cancel_then_same_result(server: http_support.ComfyServer, prompt: dict[str, Any],
                                  stages: dict[str, str]) -> None:
    """Cancel in each of ``stages`` (name → node id) in turn, then compare a completed run
    with one after a cache reset."""
    before = files(server)
    for name, node in stages.items():
        start, logged = time.perf_counter(), len(server.log_text())
        seen = cancel_when_running(server, prompt, node)
        assert_interrupted_at(seen, node)
        log = server.log_text()[logged:]  # what docs/troubleshooting.md quotes
        assert f"Interrupting prompt {seen['prompt_id']}" in log and "Processing interrupted" in log
        new = files(server) - before
        assert not [p for p in new if p.suffix == ".tmp" or p.name.startswith(".")], new
        if name == "sampling":  # Save Inversion is not downstream of P2P Sample: it may run
            assert all(p.suffix == ".safetensors" and "inversion" in p.name for p in new), new
            for p in new:
                check_inversion_file(p)  # whole, readable
        else:
            assert new == set(), f"files written although {name} was cancelled: {new}"
        print(f"\n{name}: Cancel at step {seen['progress'][0]}/{seen['progress'][1]}, "
              f"interrupted {1e3 * seen['latency']:.0f} ms later; {time.perf_counter() - start:.1f}"
              " s for the prompt")
    start = time.perf_counter()
    completed = server.run(prompt, timeout=900)
    middle = time.perf_counter()
    clean = rerun_after_free(server, prompt)
    print(f"completed after the cancels in {middle - start:.1f} s, after /free in "
          f"{time.perf_counter() - middle:.1f} s")
    assert torch.equal(latents(server, completed, "903"), latents(server, clean, "903"))


def test_cancel_null_text_chain_over_http(comfy_server, object_info) -> None:
    """Cancel during DDIM Invert, then Null-Text Optimize, then P2P Sample."""
    api = cancellable(object_info, NULL_TEXT_WORKFLOWS[0], "test/cancel_nti")
    stages = {"inversion": find_nodes(api, "NTIDDIMInvert")[0],
              "null-text": find_nodes(api, "NTINullTextOptimize")[0],
              "sampling": find_nodes(api, "NTIP2PSample")[0]}
    check_cancel_then_same_result(comfy_server, api, stages)


def test_cancel_style_diffusion_over_http(comfy_server, object_info) -> None:
    """Cancel during StyleDiffusion Invert (CLIP ViT-L/14 vision, attention loss)."""
    api = cancellable(object_info, STYLED, "test/cancel_styled")
    check_cancel_then_same_result(comfy_server, api,
                                  {"StyleDiffusion": find_nodes(api, "NTIStyleInvert")[0]})
