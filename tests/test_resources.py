"""Resources: memory over repeated edits in one ComfyUI process, cond and uncond in separate UNet
calls, and two queued prompts sharing a cached inversion.

In-process through the nodes (as test_nodes.py runs them) on the HTTP tests' checkpoint
(cross-attention at a quarter of the latent side) at an 8×8 latent and 4 steps; the queued
prompts over HTTP on the session's server. Needs $COMFYUI_PATH.
"""

from __future__ import annotations

import copy
import functools
import gc
import os
import time
from typing import Any

import comfy_support
import pytest
import torch
from test_cancel_http import cached_nodes, free, rerun_after_free
from test_families_http import latents
from test_nodes import PLAN_DEFAULTS, SOURCE, load_pack, run, sub
from test_workflows_http import NULL_TEXT_WORKFLOWS, load_ui, small
from workflow_api import find_nodes, set_input, ui_to_api

STEPS, SIDE = 4, 8  # latent side
EDITS, WARMUP = 20, 10
GROWTH_BOUND = 1 << 20  # bytes of RSS per edit after the warm-up, on average


@pytest.fixture(scope="module")
def nodes(comfy_root: Any) -> dict[str, type]:
    return {cls.GET_SCHEMA().node_id: cls for cls in load_pack().nodes.NODES}


def photo_latent() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"samples": torch.randn(1, 4, SIDE, SIDE, generator=g) / 0.18215}


@pytest.fixture(scope="module")
def inverted(nodes: dict[str, type], quarter_sd15: Any) -> dict[str, Any]:
    model, clip, _ = quarter_sd15
    traj, _ = run(nodes["NTIDDIMInvert"], model=model, clip=clip, latent=photo_latent(),
                  source_prompt=SOURCE, steps=STEPS, grid="reference", record_maps=True).args
    uncond = run(nodes["NTINullTextOptimize"], model=model, clip=clip, trajectory=traj,
                 guidance=7.5, inner_steps=2, early_stop=1e-5, method="null-text").args[0]
    return {"traj": traj, "uncond": uncond}


def rss() -> int:
    """This process's resident set size in bytes (Linux /proc)."""
    with open("/proc/self/status") as f:
        (line,) = [x for x in f if x.startswith("VmRSS:")]
    return int(line.split()[1]) * 1024


def live_tensors() -> int:
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in a node output (tensors, dicts, lists, dataclasses)."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return sum(tensor_bytes(v) for v in getattr(value, "__dict__", {}).values())


def test_resources_memory_is_flat_over_repeated_edits(nodes: dict[str, type], quarter_sd15: Any,
                                                      inverted: dict[str, Any]) -> None:
    """20 edits (Attention Edit Plan → P2P Sample with its maps → VAE decode), each with another
    plan: after a warm-up of 10, no tensor stays alive per edit and RSS grows < 1 MB per edit
    on average (torch.cuda's allocated memory is flat too, on a GPU)."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("RSS is read from Linux's /proc/self/status")
    model, clip, vae = quarter_sd15
    sizes, resident, tensors, cuda, seconds = [], [], [], [], []
    for i in range(EDITS):
        start = time.perf_counter()
        (plan,) = run(nodes["NTIAttentionEditPlan"], clip=clip,
                      **{**PLAN_DEFAULTS, "cross_end": 0.2 + 0.03 * i}).args
        samples, attention = run(nodes["NTIP2PSample"], model=model, trajectory=inverted["traj"],
                                 uncond=inverted["uncond"], plan=plan, guidance=7.5).args
        with torch.inference_mode():
            image = vae.decode(samples["samples"])
        sizes.append(tensor_bytes([samples, attention, image]))
        seconds.append(time.perf_counter() - start)
        del plan, samples, attention, image
        gc.collect()
        resident.append(rss())
        tensors.append(live_tensors())
        if torch.cuda.is_available():
            cuda.append(torch.cuda.memory_allocated())
    growth = (resident[-1] - resident[WARMUP - 1]) / (EDITS - WARMUP)
    mb = [round(r / 2**20, 1) for r in resident]
    print(f"\nRSS after each edit (MB): {mb}\nlive tensors: {tensors}\none edit's outputs: "
          f"{sizes[-1] / 2**10:.0f} KB; RSS growth after the warm-up: {growth / 2**10:.1f} KB "
          f"per edit; {sum(seconds) / EDITS:.2f} s per edit" +
          (f"\ncuda allocated: {cuda}" if cuda else ""))
    assert max(tensors[WARMUP - 1:]) == min(tensors[WARMUP - 1:]), tensors
    assert growth < GROWTH_BOUND, mb
    if cuda:
        assert cuda[-1] <= cuda[WARMUP - 1], cuda


def chain_images(nodes: dict[str, type], quarter_sd15: Any, vision: Any, photo: torch.Tensor,
                 ) -> dict[str, torch.Tensor]:
    """DDIM Invert (maps) → Null-Text Optimize → P2P Sample and → StyleDiffusion Invert → P2P
    Sample with its values, each decoded: the IMAGEs [rows, H, W, 3]."""
    model, clip, vae = quarter_sd15
    traj, _ = run(nodes["NTIDDIMInvert"], model=model, clip=clip, latent=photo_latent(),
                  source_prompt=SOURCE, steps=STEPS, grid="reference", record_maps=True).args
    uncond = run(nodes["NTINullTextOptimize"], model=model, clip=clip, trajectory=traj,
                 guidance=7.5, inner_steps=3, early_stop=1e-5, method="null-text").args[0]
    values, null, _ = run(nodes["NTIStyleInvert"], model=model, clip=clip, clip_vision=vision,
                          image=photo, trajectory=traj, guidance=7.5, inner_steps=3,
                          attention_loss=1.0, variant="official").args
    (plan,) = run(nodes["NTIAttentionEditPlan"], clip=clip, **PLAN_DEFAULTS).args
    common = dict(model=model, trajectory=traj, plan=plan, guidance=7.5)
    nti, _ = run(nodes["NTIP2PSample"], uncond=uncond, **common).args
    styled, _ = run(nodes["NTIP2PSample"], uncond=null, values=values, value_end=0.5,
                    **common).args
    with torch.inference_mode():
        return {"null-text": vae.decode(nti["samples"]), "styled": vae.decode(styled["samples"])}


def test_resources_separate_cond_uncond_calls_give_the_same_images(
        nodes: dict[str, type], quarter_sd15: Any, tmp_path_factory: pytest.TempPathFactory,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole chain with every branch in its own UNet call (as ComfyUI does under memory
    pressure) against batched calls: the same images within 2/255."""
    model, clip, vae = quarter_sd15
    vision = comfy_support.tiny_clip_vision(tmp_path_factory.mktemp("clip_vision"))
    photo = torch.rand(1, 8 * SIDE, 8 * SIDE, 3, generator=torch.Generator().manual_seed(0))
    batched = chain_images(nodes, quarter_sd15, vision, photo)
    seen: list[list[int]] = []

    def record(apply_model: Any, args: dict[str, Any]) -> Any:
        seen.append(list(args["cond_or_uncond"]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    watched = model.clone()
    watched.set_model_unet_function_wrapper(record)
    common = sub("nodes.common")
    monkeypatch.setattr(common, "ComfyDenoiser",
                        functools.partial(common.ComfyDenoiser, separate_calls=True))
    separate = chain_images(nodes, (watched, clip, vae), vision, photo)
    assert seen and all(len(c) == 1 for c in seen) and [0] in seen and [1] in seen
    for name in batched:
        diff = (separate[name] - batched[name]).abs()
        print(f"\n{name}: separate vs batched calls, image max |Δ| = {float(diff.max()):.2e}, "
              f"mean {float(diff.mean()):.2e}")
        assert batched[name].shape == separate[name].shape
        assert float(diff.max()) <= 2 / 255, name


def test_resources_cond_and_uncond_split_when_the_batch_does_not_fit(
        quarter_sd15: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the batch does not fit (the model's memory estimate × 1.5 above the free memory),
    cond and uncond go in separate UNet calls by ComfyUI's own rule: the same ε as forced
    separate calls, bit for bit, and as one batched call to rounding."""
    import comfy.model_management as mm

    from nti_core.denoiser import Rows
    from nti_core.hosts.comfy import ComfyDenoiser

    seen: list[list[int]] = []

    def record(apply_model: Any, args: dict[str, Any]) -> Any:
        seen.append(list(args["cond_or_uncond"]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    watched = quarter_sd15[0].clone()
    watched.set_model_unet_function_wrapper(record)
    g = torch.Generator().manual_seed(0)
    z, ctx = torch.randn(2, 4, SIDE, SIDE, generator=g), torch.randn(2, 77, 768, generator=g)
    rows = Rows.cfg(1)
    with torch.no_grad():
        batched = ComfyDenoiser(watched).eps(z, 500, ctx, rows=rows)
        assert seen == [[1, 0]]
        forced = ComfyDenoiser(watched, separate_calls=True).eps(z, 500, ctx, rows=rows)
        seen.clear()
        free = mm.get_free_memory(watched.load_device)
        monkeypatch.setattr(watched.model, "memory_required", lambda *args, **kwargs: free)
        split = ComfyDenoiser(watched).eps(z, 500, ctx, rows=rows)
    assert seen == [[1], [0]]
    torch.testing.assert_close(split, forced, atol=0, rtol=0)
    torch.testing.assert_close(split, batched, atol=1e-4, rtol=0)


def test_resources_queued_prompts_sharing_a_cached_inversion(comfy_server) -> None:
    """After a cache reset, two prompts with one inversion and different plans, queued back to
    back: the second reuses the first's DDIM Invert and Null-Text Optimize (ComfyUI's cache),
    and its latents equal those of the same prompt run alone after another reset (the first
    ran alone: nothing ran before it)."""
    info = comfy_server.get("/object_info", timeout=60).body
    first = small(ui_to_api(load_ui(NULL_TEXT_WORKFLOWS[0]), info), "test/shared_a")
    (sample,) = find_nodes(first, "NTIP2PSample")
    first["903"] = {"class_type": "SaveLatent",
                    "inputs": {"samples": [sample, 0], "filename_prefix": "test/shared_a_rows"}}
    second = copy.deepcopy(first)
    set_input(second, "NTIAttentionEditPlan", "target_prompts",
              "a cat sitting next to a big mirror\na dog sitting next to a mirror")
    set_input(second, "NTIAttentionEditPlan", "cross_end", 0.6)
    second["903"]["inputs"]["filename_prefix"] = "test/shared_b_rows"
    for save in find_nodes(second, "SaveImage"):
        second[save]["inputs"]["filename_prefix"] = f"test/shared_b_{save}"
    free(comfy_server)
    ids = []
    for api in (first, second):
        reply = comfy_server.queue(api)
        assert reply.status == 200, reply.body
        ids.append(reply.body["prompt_id"])
    entries = [comfy_server.wait_history(i, timeout=900) for i in ids]
    assert all(e["status"]["status_str"] == "success" for e in entries)
    shared = find_nodes(first, "NTIDDIMInvert") + find_nodes(first, "NTINullTextOptimize")
    assert cached_nodes(entries[0]) == [] and set(shared) <= set(cached_nodes(entries[1]))
    a, b = (latents(comfy_server, e, "903") for e in entries)
    assert a.shape[0] == 2 and b.shape[0] == 3 and not torch.equal(a[1], b[1])
    alone = rerun_after_free(comfy_server, second)
    assert torch.equal(latents(comfy_server, alone, "903"), b)
