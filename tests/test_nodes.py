"""The node pack (``__init__.py`` + ``nodes/``) in-process against a real ComfyUI checkout.

Needs $COMFYUI_PATH (skipped, saying so, without it). The pack is loaded the way ComfyUI loads a
custom node folder (a package named after its path), nodes run through V3's own execute wrapper
under ``torch.inference_mode()`` as in ComfyUI's executor, on the generated tiny SD1.5 checkpoint
at an 8×8 latent with a few steps.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import comfy_support
import pytest
import torch
import torch.nn.functional as F
from core_support import assert_mostly_close, assert_same_uncond

REPO = Path(__file__).resolve().parents[1]
PACK = "nti_pack_under_test"
SOURCE = "a cat sitting next to a mirror"
TARGETS = "a dog sitting next to a mirror\na cat sitting next to a big mirror"
STEPS = 4
INNER = 20  # null-text iterations per step: with 10 the random tiny model gains only ~7×
H = W = 8
EXPECTED = {  # node id → (display name, [(input, type)], [(output, type)])
    "NTIDDIMInvert": ("DDIM Invert (NTI)", [
        ("model", "MODEL"), ("clip", "CLIP"), ("latent", "LATENT"), ("source_prompt", "STRING"),
        ("steps", "INT"), ("grid", "COMBO"), ("record_maps", "BOOLEAN")],
        [("trajectory", "NTI_TRAJECTORY"), ("ddim_reconstruction", "LATENT")]),
    "NTINullTextOptimize": ("Null-Text Optimize (NTI)", [
        ("model", "MODEL"), ("clip", "CLIP"), ("trajectory", "NTI_TRAJECTORY"),
        ("guidance", "FLOAT"), ("inner_steps", "INT"), ("early_stop", "FLOAT"),
        ("method", "COMBO"), ("attention_loss", "FLOAT"), ("precision", "COMBO")],
        [("uncond", "NTI_UNCOND"), ("report", "STRING")]),
    "NTIAttentionEditPlan": ("Attention Edit Plan (NTI)", [
        ("clip", "CLIP"), ("source_prompt", "STRING"), ("target_prompts", "STRING"),
        ("edit_kind", "COMBO"), ("cross_start", "FLOAT"), ("cross_end", "FLOAT"),
        ("cross_words", "STRING"), ("self_start", "FLOAT"), ("self_end", "FLOAT"),
        ("reweight", "STRING"), ("blend_words", "STRING"), ("subtract_words", "STRING"),
        ("blend_threshold", "FLOAT"), ("blend_start", "FLOAT"), ("self_limit", "COMBO"),
        ("uncond_self_end", "FLOAT")],
        [("plan", "NTI_EDIT_PLAN")]),
    "NTIP2PSample": ("P2P Sample (NTI)", [
        ("model", "MODEL"), ("trajectory", "NTI_TRAJECTORY"), ("uncond", "NTI_UNCOND"),
        ("plan", "NTI_EDIT_PLAN"), ("guidance", "FLOAT"), ("values", "NTI_VALUES"),
        ("value_end", "FLOAT"), ("mask", "MASK")],
        [("latents", "LATENT"), ("attention", "NTI_ATTENTION")]),
    "NTIP2PSweep": ("P2P Sweep (NTI)", [
        ("model", "MODEL"), ("trajectory", "NTI_TRAJECTORY"), ("uncond", "NTI_UNCOND"),
        ("plan", "NTI_EDIT_PLAN"), ("vae", "VAE"), ("guidance", "FLOAT"), ("rows", "STRING"),
        ("columns", "STRING"), ("values", "NTI_VALUES"), ("value_end", "FLOAT"),
        ("mask", "MASK")],
        [("grid", "IMAGE"), ("latents", "LATENT")]),
    "NTISaveInversion": ("Save Inversion (NTI)", [
        ("trajectory", "NTI_TRAJECTORY"), ("uncond", "NTI_UNCOND"), ("filename_prefix", "STRING"),
        ("values", "NTI_VALUES")],
        []),
    "NTILoadInversion": ("Load Inversion (NTI)", [("model", "MODEL"), ("inversion", "COMBO")],
                         [("trajectory", "NTI_TRAJECTORY"), ("uncond", "NTI_UNCOND"),
                          ("values", "NTI_VALUES")]),
    "NTIStyleInvert": ("StyleDiffusion Invert (NTI)", [
        ("model", "MODEL"), ("clip", "CLIP"), ("clip_vision", "CLIP_VISION"), ("image", "IMAGE"),
        ("trajectory", "NTI_TRAJECTORY"), ("guidance", "FLOAT"), ("inner_steps", "INT"),
        ("attention_loss", "FLOAT"), ("variant", "COMBO"), ("precision", "COMBO")],
        [("values", "NTI_VALUES"), ("uncond", "NTI_UNCOND"), ("report", "STRING")]),
    "NTIAttentionMaps": ("Attention Maps (NTI)", [
        ("image", "IMAGE"), ("attention", "NTI_ATTENTION"), ("trajectory", "NTI_TRAJECTORY"),
        ("row", "INT"), ("sizes", "COMBO"), ("step_start", "FLOAT"), ("step_end", "FLOAT")],
        [("maps", "IMAGE"), ("mask", "MASK")]),
}
PLAN_DEFAULTS: dict[str, Any] = {
    "source_prompt": SOURCE, "target_prompts": TARGETS, "edit_kind": "auto", "cross_start": 0.0,
    "cross_end": 0.8, "cross_words": "", "self_start": 0.0, "self_end": 0.5, "reweight": "",
    "blend_words": "", "subtract_words": "", "blend_threshold": 0.3, "blend_start": 0.2,
    "self_limit": "32x32", "uncond_self_end": 0.0,
}


# ============================================================== helpers


def load_pack(name: str = PACK) -> ModuleType:
    """Import the repository root as ComfyUI does (a package whose name is not 'nti_core')."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def sub(name: str) -> ModuleType:
    """A submodule of the loaded pack, e.g. sub('nti_core.null_text')."""
    return importlib.import_module(f"{PACK}.{name}")


def run(node: type, hidden: dict[str, Any] | None = None, **inputs: Any) -> Any:
    """Execute a node as ComfyUI's executor does: locked class clone with the ``hidden`` inputs
    (e.g. {"UNIQUE_ID": "12"}), inference mode."""
    from comfy_api.internal import make_locked_method_func

    node.GET_SCHEMA()
    clone = node.PREPARE_CLASS_CLONE(hidden or {})
    call = make_locked_method_func(node, "EXECUTE_NORMALIZED", clone)
    with torch.inference_mode():
        return call(**inputs)


def raw_latent(batch: int = 1, seed: int = 0) -> dict:
    """A LATENT as VAE Encode gives it (raw, ≈ N(0, 1/0.18215²))."""
    g = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(batch, 4, H, W, generator=g) / 0.18215}


def other_model(model: Any) -> Any:
    """A clone whose UNet weights differ (a LoRA-like weight patch)."""
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    shape = model.model.state_dict()[key].shape
    patched = model.clone()
    patched.add_patches({key: (0.05 * torch.randn(shape, generator=torch.Generator().manual_seed(0)),)})
    return patched


# ============================================================== fixtures


@pytest.fixture(scope="module")
def pack(comfy_root: Path) -> ModuleType:
    return load_pack()


@pytest.fixture(scope="module")
def N(pack: ModuleType) -> Any:  # noqa: N802 (the node classes, by id)
    return {cls.GET_SCHEMA().node_id: cls for cls in pack.nodes.NODES}


@pytest.fixture(scope="module")
def chain(pack: ModuleType, N: Any, comfy_sd15: Any) -> dict[str, Any]:
    """DDIM Invert → Null-Text Optimize → Attention Edit Plan → P2P Sample, once, timed."""
    model, clip, _ = comfy_sd15
    latent = raw_latent()
    before = comfy_support.patcher_state(model)
    latent_before = latent["samples"].clone()
    times = {}
    t = time.perf_counter()
    traj, recon = run(N["NTIDDIMInvert"], model=model, clip=clip, latent=latent,
                      source_prompt=SOURCE, steps=STEPS, grid="reference").args
    times["ddim_invert"] = time.perf_counter() - t
    t = time.perf_counter()
    out = run(N["NTINullTextOptimize"], model=model, clip=clip, trajectory=traj, guidance=7.5,
              inner_steps=INNER, early_stop=1e-5, method="null-text")
    times["null_text"] = time.perf_counter() - t
    uncond, report = out.args
    t = time.perf_counter()
    (plan,) = run(N["NTIAttentionEditPlan"], clip=clip, **PLAN_DEFAULTS).args
    times["edit_plan"] = time.perf_counter() - t
    t = time.perf_counter()
    latents, attention = run(N["NTIP2PSample"], model=model, trajectory=traj, uncond=uncond,
                             plan=plan, guidance=7.5).args
    times["p2p_sample"] = time.perf_counter() - t
    print("\nnode times (s):", {k: round(v, 2) for k, v in times.items()})
    return {"latent": latent, "traj": traj, "recon": recon, "uncond": uncond, "report": report,
            "ui": out.ui, "plan": plan, "latents": latents, "attention": attention,
            "model_before": before,
            "latent_before": latent_before, "times": times}


# ============================================================== registration


def test_root_imports_without_comfyui() -> None:
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('pack', {str(REPO / '__init__.py')!r},"
        f" submodule_search_locations=[{str(REPO)!r}])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['pack'] = m\n"
        "spec.loader.exec_module(m)\n"
        "assert importlib.util.find_spec('comfy_api') is None\n"
        "assert not hasattr(m, 'comfy_entrypoint') and m.WEB_DIRECTORY == './web'\n"
        "assert not hasattr(m, 'NODE_CLASS_MAPPINGS')\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd="/", check=True)


def test_entrypoint_registers_every_node(pack: ModuleType) -> None:
    from comfy_api.latest import ComfyExtension

    assert not hasattr(pack, "NODE_CLASS_MAPPINGS")  # it would win over the entrypoint
    ext = asyncio.run(pack.comfy_entrypoint())
    assert isinstance(ext, ComfyExtension)
    nodes = asyncio.run(ext.get_node_list())
    schemas = {n.GET_SCHEMA().node_id: (n, n.GET_SCHEMA()) for n in nodes}
    assert set(schemas) == set(EXPECTED)
    for node_id, (display, inputs, outputs) in EXPECTED.items():
        cls, schema = schemas[node_id]
        assert schema.display_name == display and schema.category == "NTI Photo Edit"
        assert [(i.id, str(i.get_io_type())) for i in schema.inputs] == inputs, node_id
        assert [(o.id, str(o.io_type)) for o in schema.outputs] == outputs, node_id
        for i in schema.inputs:
            assert i.tooltip and len(i.tooltip) > 10, f"{node_id}.{i.id} has no tooltip"
        for o in schema.outputs:
            assert o.tooltip, f"{node_id} output {o.id} has no tooltip"
        assert list(cls.RETURN_TYPES) == [t for _, t in outputs]
    assert schemas["NTISaveInversion"][1].is_output_node
    info = schemas["NTIDDIMInvert"][0].INPUT_TYPES()["required"]
    assert info["steps"][1]["default"] == 50 and info["steps"][1]["max"] == 1000
    assert info["grid"][1]["options"] == ["reference", "ddim_uniform"]
    assert info["source_prompt"][1]["multiline"] is True
    nto = schemas["NTINullTextOptimize"][0].INPUT_TYPES()["required"]
    assert nto["method"][1]["options"] == ["null-text", "null-text-fast", "direct",
                                           "negative-prompt"]
    assert nto["method"][1]["default"] == "null-text-fast"  # the bench's choice (README)
    assert (nto["guidance"][1]["default"], nto["inner_steps"][1]["default"],
            nto["early_stop"][1]["default"]) == (7.5, 10, 1e-5)
    plan = schemas["NTIAttentionEditPlan"][0].INPUT_TYPES()["required"]
    assert plan["edit_kind"][1]["options"] == ["auto", "replace", "refine"]
    assert {k: plan[k][1]["default"] for k in PLAN_DEFAULTS if k not in (
        "source_prompt", "target_prompts")} == {k: v for k, v in PLAN_DEFAULTS.items() if k not in (
            "source_prompt", "target_prompts")}


def test_comfyui_loader_and_validation(comfy_root: Path) -> None:
    """ComfyUI's own loader registers the pack; its prompt validation runs validate_inputs."""
    import execution

    import nodes

    before, web_before = dict(nodes.NODE_CLASS_MAPPINGS), dict(nodes.EXTENSION_WEB_DIRS)
    try:
        assert asyncio.run(nodes.load_custom_node(str(REPO), module_parent="custom_nodes"))
        assert set(EXPECTED) <= set(nodes.NODE_CLASS_MAPPINGS)
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS["NTIP2PSample"] == "P2P Sample (NTI)"
        if (REPO / "web").is_dir():
            assert nodes.EXTENSION_WEB_DIRS[REPO.name] == str(REPO / "web")

        def validate(**plan: Any) -> Any:
            prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x"}},
                      "2": {"class_type": "NTIAttentionEditPlan",
                            "inputs": {"clip": ["1", 1], **PLAN_DEFAULTS, **plan}}}
            return asyncio.run(execution.validate_inputs("p", prompt, "2", {"1": (True, [], "1")}))

        ok, errors, _ = validate()
        assert ok, errors
        ok, errors, _ = validate(edit_kind="replace", target_prompts="a dog next to a mirror")
        assert not ok
        assert "same number of words: source has 7, target has 6" in errors[0]["details"]
        print("\nvalidation errors reported:", len(errors))
    finally:
        for key in set(nodes.NODE_CLASS_MAPPINGS) - set(before):
            nodes.NODE_CLASS_MAPPINGS.pop(key)
        nodes.EXTENSION_WEB_DIRS.clear()
        nodes.EXTENSION_WEB_DIRS.update(web_before)


# ============================================================== the chain


def test_chain_outputs(chain: dict[str, Any], comfy_sd15: Any) -> None:
    traj, uncond, latents = chain["traj"], chain["uncond"], chain["latents"]
    assert traj.latents.shape == (STEPS + 1, 4, H, W) and traj.num_steps == STEPS
    assert traj.prompt == SOURCE and traj.grid.kind == "reference"
    assert traj.embedding.shape == (1, 77, 768)
    z0 = comfy_sd15[0].model.process_latent_in(chain["latent"]["samples"])
    torch.testing.assert_close(traj.latents[:1], z0, atol=1e-6, rtol=0)
    assert uncond.embeddings.shape == (STEPS, 77, 768) and uncond.method == "null-text"
    assert chain["report"].startswith("method: null-text, guidance 7.5, 4 steps")
    assert chain["ui"]["text"] == (chain["report"],)
    assert chain["plan"].num_targets == 2 and chain["plan"].targets.shape == (2, 77, 768)
    samples = latents["samples"]
    assert samples.shape == (3, 4, H, W) and torch.isfinite(samples).all()
    assert (samples[1] - samples[0]).abs().max() > 1e-3  # the edits differ from the source row
    assert chain["recon"]["samples"].shape == (1, 4, H, W)


def test_null_text_reconstruction_beats_plain_ddim(
    chain: dict[str, Any], pack: ModuleType, N: Any, comfy_sd15: Any
) -> None:
    model, clip, _ = comfy_sd15
    raw = chain["latent"]["samples"]
    nti = F.mse_loss(chain["latents"]["samples"][:1], raw).item()
    null = sub("nodes.common").encode_empty(clip)
    plain = sub("nti_core.null_text").plain_null(chain["traj"], null, 7.5)
    ddim, _ = run(N["NTIP2PSample"], model=model, trajectory=chain["traj"], uncond=plain,
                  plan=chain["plan"], guidance=7.5).args
    ddim_err = F.mse_loss(ddim["samples"][:1], raw).item()
    round_trip = F.mse_loss(chain["recon"]["samples"], raw).item()
    print(f"\nlatent MSE (raw): DDIM@7.5 {ddim_err:.4g}, NTI@7.5 {nti:.4g}, DDIM@1 {round_trip:.4g}")
    assert nti < ddim_err / 10  # measured: DDIM 799, NTI 43, round trip 17 (raw latent MSE)
    assert round_trip < ddim_err


def test_parity_with_diffusers_host(
    chain: dict[str, Any], pack: ModuleType, comfy_sd15: Any, tiny_diffusers_unet: Any
) -> None:
    """Same weights, same conditioning tensors, same grid: the nodes equal the diffusers host."""
    core = sub("nti_core")
    hosts = sub("nti_core.hosts.diffusers")
    comfy = sub("nti_core.hosts.comfy")
    traj = chain["traj"]
    ref = hosts.DiffusersDenoiser(tiny_diffusers_unet,
                                  comfy.ComfyDenoiser(comfy_sd15[0]).alphas_cumprod)
    grid = core.make_grid(ref.alphas_cumprod, STEPS, "reference")
    assert grid.timesteps == traj.grid.timesteps
    theirs = core.ddim_invert(ref, traj.latents[:1].clone(), traj.embedding.clone(), grid, SOURCE)
    torch.testing.assert_close(traj.latents, theirs.latents, atol=1e-4, rtol=0)
    with torch.inference_mode():
        null = sub("nodes.common").encode_empty(comfy_sd15[1])
    null = null.clone()  # a normal tensor: the diffusers path runs outside inference mode
    u = core.null_text_optimize(ref, theirs, null, core.NullTextOptions(inner_steps=INNER))
    assert_same_uncond(chain["uncond"], u, null)
    # P2P sampling from the node's own ∅ and plan, on the diffusers host
    plan = chain["plan"]
    contexts = torch.cat([traj.embedding, plan.targets]).clone()
    z = core.p2p_sample(ref, theirs, chain["uncond"], contexts, guidance=7.5,
                        controller=plan.spec.build(sub("nodes.common").family_tokenizer(), STEPS))
    raw = comfy_sd15[0].model.process_latent_out(z)
    assert_mostly_close(chain["latents"]["samples"], raw, atol=1e-4 / 0.18215)


def test_separate_cond_uncond_calls_give_the_same_result(
    chain: dict[str, Any], pack: ModuleType, N: Any, comfy_sd15: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As ComfyUI does under memory pressure: every branch in its own UNet call."""
    model, clip, _ = comfy_sd15
    seen: list[list[int]] = []

    def wrapper(apply_model: Any, args: dict[str, Any]) -> Any:
        seen.append(list(args["cond_or_uncond"]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    watched = model.clone()
    watched.set_model_unet_function_wrapper(wrapper)
    common = sub("nodes.common")
    monkeypatch.setattr(common, "ComfyDenoiser",
                        functools.partial(common.ComfyDenoiser, separate_calls=True))
    uncond = run(N["NTINullTextOptimize"], model=watched, clip=clip, trajectory=chain["traj"],
                 guidance=7.5, inner_steps=INNER, early_stop=1e-5, method="null-text").args[0]
    latents, _ = run(N["NTIP2PSample"], model=watched, trajectory=chain["traj"], uncond=uncond,
                     plan=chain["plan"], guidance=7.5).args
    assert [1, 0] not in seen and [0] in seen and [1] in seen
    with torch.inference_mode():
        null = common.encode_empty(clip)
    assert_same_uncond(uncond, chain["uncond"], null)
    same_u, _ = run(N["NTIP2PSample"], model=watched, trajectory=chain["traj"],
                    uncond=chain["uncond"], plan=chain["plan"], guidance=7.5).args
    torch.testing.assert_close(same_u["samples"], chain["latents"]["samples"],
                               atol=1e-4 / 0.18215, rtol=0)
    assert (latents["samples"] - chain["latents"]["samples"]).abs().max() < 1e-2 / 0.18215


def test_inputs_are_left_alone(chain: dict[str, Any], comfy_sd15: Any) -> None:
    model = comfy_sd15[0]
    assert comfy_support.patcher_state(model) == chain["model_before"]
    assert "patches_replace" not in model.model_options.get("transformer_options", {})
    assert set(chain["latent"]) == {"samples"}
    assert torch.equal(chain["latent"]["samples"], chain["latent_before"])


def test_progress_and_interrupt(pack: ModuleType, N: Any, comfy_sd15: Any,
                                chain: dict[str, Any]) -> None:
    import comfy.model_management as mm
    import comfy.utils

    model, clip, _ = comfy_sd15
    updates: list[tuple[int, int]] = []
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda v, total, preview, node_id=None:
                                             updates.append((v, total)))
    try:
        run(N["NTIDDIMInvert"], model=model, clip=clip, latent=raw_latent(), source_prompt=SOURCE,
            steps=3, grid="ddim_uniform")
        assert updates == [(i, 6) for i in range(1, 7)]  # inversion + round trip
        updates.clear()
        run(N["NTINullTextOptimize"], model=model, clip=clip, trajectory=chain["traj"],
            guidance=7.5, inner_steps=1, early_stop=1e-5, method="null-text")
        assert updates == [(i, STEPS) for i in range(1, STEPS + 1)]
        updates.clear()
        mm.interrupt_current_processing(True)
        with pytest.raises(mm.InterruptProcessingException):
            run(N["NTIP2PSample"], model=model, trajectory=chain["traj"], uncond=chain["uncond"],
                plan=chain["plan"], guidance=7.5)
        assert updates == []  # stopped within the first step
        calls: list[int] = []

        def count(apply_model: Any, args: dict[str, Any]) -> Any:
            calls.append(1)
            return apply_model(args["input"], args["timestep"], **args["c"])

        watched = model.clone()
        watched.set_model_unet_function_wrapper(count)
        mm.interrupt_current_processing(True)  # raising the exception cleared the flag
        with pytest.raises(mm.InterruptProcessingException):
            run(N["NTINullTextOptimize"], model=watched, clip=clip, trajectory=chain["traj"],
                guidance=7.5, inner_steps=20, early_stop=0.0, method="null-text")
        assert len(calls) <= 1  # only ε_c of step 0: Cancel is seen before every inner iteration
    finally:
        mm.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(old)


def test_negative_prompt_method(N: Any, comfy_sd15: Any, chain: dict[str, Any]) -> None:
    model, clip, _ = comfy_sd15
    uncond, report = run(N["NTINullTextOptimize"], model=model, clip=clip,
                         trajectory=chain["traj"], guidance=5.0, inner_steps=10, early_stop=1e-5,
                         method="negative-prompt").args
    assert uncond.method == "negative-prompt" and uncond.guidance == 5.0
    torch.testing.assert_close(uncond.embeddings, chain["traj"].embedding.expand(STEPS, -1, -1))


def test_direct_inversion_method(folders: Path, N: Any, comfy_sd15: Any,
                                 chain: dict[str, Any]) -> None:
    """Direct Inversion through the nodes: no optimisation, ∅ = "", P2P Sample's reconstruction
    is the photo's latent itself while the targets are edited; it saves and loads."""
    model, clip, _ = comfy_sd15
    traj = chain["traj"]
    uncond, report = run(N["NTINullTextOptimize"], model=model, clip=clip, trajectory=traj,
                         guidance=7.5, inner_steps=10, early_stop=1e-5, method="direct").args
    assert uncond.method == "direct" and uncond.iterations == [] and "direct" in report
    null = sub("nodes.common").encode_empty(clip)
    torch.testing.assert_close(uncond.embeddings, null.expand(STEPS, -1, -1).to(uncond.embeddings))
    latents, _ = run(N["NTIP2PSample"], model=model, trajectory=traj, uncond=uncond,
                     plan=chain["plan"], guidance=7.5).args
    z = latents["samples"]
    photo = chain["latent"]["samples"]
    assert float((z[0] - photo[0]).abs().max()) < 1e-5  # the pivot's z*_0 = the photo's latent
    assert float((chain["latents"]["samples"][0] - photo[0]).abs().max()) > 1e-3  # NTI's is not
    assert float((z[1] - z[0]).abs().max()) > 1e-3  # the targets are edited
    run(N["NTISaveInversion"], trajectory=traj, uncond=uncond, filename_prefix="nti/direct")
    _, u2, _ = run(N["NTILoadInversion"], model=model,
                   inversion="nti/direct_00001.safetensors [output]").args
    assert u2.method == "direct" and torch.equal(u2.embeddings, uncond.embeddings.to(u2.embeddings))


def test_fast_null_text_method(N: Any, comfy_sd15: Any, chain: dict[str, Any]) -> None:
    model, clip, _ = comfy_sd15
    traj = chain["traj"]
    uncond, report = run(N["NTINullTextOptimize"], model=model, clip=clip, trajectory=traj,
                         guidance=7.5, inner_steps=INNER, early_stop=1e-5,
                         method="null-text-fast").args
    assert uncond.method == "null-text-fast" and uncond.num_steps == STEPS
    for i, (it, loss) in enumerate(zip(uncond.iterations, uncond.final_loss, strict=True)):
        assert loss < 1e-5 + i * 2e-5 or it == INNER  # met the threshold or spent the budget
    # it starts from the source prompt: the first step's first loss is negative-prompt
    # inversion's (ε_∅ = ε_c, the conditional DDIM step), not the reference's from ""
    assert uncond.first_loss[0] != pytest.approx(chain["uncond"].first_loss[0], rel=1e-3)
    latents, _ = run(N["NTIP2PSample"], model=model, trajectory=traj, uncond=uncond,
                     plan=chain["plan"], guidance=7.5).args
    photo = chain["latent"]["samples"]
    fast_err = float((latents["samples"][0] - photo[0]).pow(2).mean())
    ddim_err = float((chain["recon"]["samples"][0] - photo[0]).pow(2).mean())
    assert fast_err < ddim_err


def test_p2p_sample_keeps_maps_only_when_its_attention_output_is_wired(
        N: Any, comfy_sd15: Any, chain: dict[str, Any]) -> None:
    from comfy_api.internal import make_locked_method_func

    common = sub("nodes.common")
    wired = {"5": {"class_type": "NTIP2PSample", "inputs": {}},
             "6": {"class_type": "NTIAttentionMaps", "inputs": {"attention": ["5", 1]}}}
    unwired = {"5": {"class_type": "NTIP2PSample", "inputs": {}},
               "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0]}}}
    assert common.output_used(wired, "5", 1) and not common.output_used(unwired, "5", 1)
    assert common.output_used(None, "5", 1) and common.output_used(unwired, "99", 1)
    node = N["NTIP2PSample"]
    node.GET_SCHEMA()
    outs = {}
    for name, prompt in (("wired", wired), ("unwired", unwired)):
        clone = node.PREPARE_CLASS_CLONE({"PROMPT": prompt, "UNIQUE_ID": "5"})
        call = make_locked_method_func(node, "EXECUTE_NORMALIZED", clone)
        with torch.inference_mode():
            outs[name] = call(model=comfy_sd15[0], trajectory=chain["traj"],
                              uncond=chain["uncond"], plan=chain["plan"], guidance=7.5).args
    assert outs["unwired"][1] is None and outs["wired"][1] is not None
    assert torch.allclose(outs["wired"][0]["samples"], outs["unwired"][0]["samples"], atol=1e-5)


# ============================================================== files


@pytest.fixture()
def folders(comfy_root: Path, tmp_path: Path):
    import folder_paths

    old = folder_paths.get_input_directory(), folder_paths.get_output_directory()
    folder_paths.set_input_directory(str(tmp_path / "input"))
    folder_paths.set_output_directory(str(tmp_path / "output"))
    (tmp_path / "input").mkdir()
    try:
        yield tmp_path
    finally:
        folder_paths.set_input_directory(old[0])
        folder_paths.set_output_directory(old[1])


def test_save_load_round_trip(folders: Path, N: Any, comfy_sd15: Any,
                              chain: dict[str, Any]) -> None:
    model = comfy_sd15[0]
    traj, uncond = chain["traj"], chain["uncond"]
    first = run(N["NTISaveInversion"], trajectory=traj, uncond=uncond,
                filename_prefix="nti/inversion")
    second = run(N["NTISaveInversion"], trajectory=traj, uncond=uncond,
                 filename_prefix="nti/inversion")
    assert first.ui["text"] == ["nti/inversion_00001.safetensors"]
    assert second.ui["text"] == ["nti/inversion_00002.safetensors"]
    assert second.ui["nti_inversion"] == [
        {"filename": "inversion_00002.safetensors", "subfolder": "nti", "type": "output"}]
    saved = folders / "output" / "nti" / "inversion_00001.safetensors"
    assert saved.is_file() and not list(saved.parent.glob(".*tmp"))
    (folders / "input" / "nti").mkdir()
    shutil.copy(saved, folders / "input" / "nti" / "mine.safetensors")
    shutil.copy(saved, folders / "input" / "top.safetensors")
    options = N["NTILoadInversion"].INPUT_TYPES()["required"]["inversion"][1]["options"]
    assert options == ["top.safetensors", "nti/mine.safetensors",
                       "nti/inversion_00001.safetensors [output]",
                       "nti/inversion_00002.safetensors [output]"]
    for name in ("nti/mine.safetensors", "nti/inversion_00002.safetensors [output]"):
        assert N["NTILoadInversion"].validate_inputs(inversion=name) is True
        t2, u2, v2 = run(N["NTILoadInversion"], model=model, inversion=name).args
        assert v2 is None
        assert torch.equal(t2.latents, traj.latents) and torch.equal(u2.embeddings,
                                                                     uncond.embeddings)
        assert t2.prompt == SOURCE and t2.grid.timesteps == traj.grid.timesteps
        assert u2.iterations == uncond.iterations and u2.method == "null-text"
    fp = N["NTILoadInversion"].fingerprint_inputs(inversion="nti/mine.safetensors", model=None)
    assert isinstance(fp, str) and len(fp) == 64
    assert "no inversion file" in N["NTILoadInversion"].validate_inputs(inversion="gone.safetensors")
    assert "outside" in N["NTILoadInversion"].validate_inputs(inversion="../../x.safetensors")
    assert "not a .safetensors" in N["NTILoadInversion"].validate_inputs(inversion="a.png")
    with pytest.raises(Exception, match="outside the output folder"):
        run(N["NTISaveInversion"], trajectory=traj, uncond=uncond, filename_prefix="../escape")


def test_another_model_is_refused(folders: Path, N: Any, comfy_sd15: Any,
                                  chain: dict[str, Any]) -> None:
    model, clip, _ = comfy_sd15
    other = other_model(model)
    run(N["NTISaveInversion"], trajectory=chain["traj"], uncond=chain["uncond"],
        filename_prefix="nti/inversion")
    with pytest.raises(ValueError, match="different model"):
        run(N["NTILoadInversion"], model=other, inversion="nti/inversion_00001.safetensors [output]")
    with pytest.raises(ValueError, match="different model"):
        run(N["NTINullTextOptimize"], model=other, clip=clip, trajectory=chain["traj"],
            guidance=7.5, inner_steps=10, early_stop=1e-5, method="null-text")
    with pytest.raises(ValueError, match="different model"):
        run(N["NTIP2PSample"], model=other, trajectory=chain["traj"], uncond=chain["uncond"],
            plan=chain["plan"], guidance=7.5)


# ============================================================== bad inputs


@pytest.mark.parametrize(("change", "message"), [
    ({"edit_kind": "replace", "target_prompts": "a big dog sitting next to a mirror"},
     "replace needs the same number of words: source has 7, target has 8"),
    ({"blend_words": "cat horse"}, "blend word 'horse' is in none of the prompts"),
    ({"reweight": "zebra:2", "target_prompts": "a dog sitting next to a mirror"},
     "'zebra' is not a word of the prompt 'a dog sitting next to a mirror'"),
    ({"reweight": "zebra:2"}, "reweight word 'zebra' is in none of the target prompts"),
    ({"reweight": "dog=2"}, "expected 'word:value'"),
    ({"reweight": "dog:lots"}, "expected a number"),
    ({"cross_words": "dog:1.5"}, "cross_words: 'dog' needs a fraction in [0, 1]"),
    ({"cross_words": "mirror:0.5", "target_prompts": "a dog sitting next to a mirror"}, None),
    ({"cross_words": "zebra:0.5"}, "'zebra' is in none of the target prompts"),
    ({"cross_start": 0.9, "cross_end": 0.5}, "cross_start (0.9) is after cross_end (0.5)"),
    ({"self_end": 1.5}, "self_end must be a fraction in [0, 1]"),
    ({"blend_threshold": -0.1}, "blend_threshold must be a fraction"),
    ({"subtract_words": "mirror"}, "subtract words need blend words"),
    ({"source_prompt": "  "}, "source prompt is empty"),
    ({"target_prompts": "\n \n"}, "write at least one target prompt"),
    ({"target_prompts": "a cat " * 40}, "more than the 77"),
    ({"edit_kind": "sideways"}, "edit_kind must be one of"),
    ({"blend_words": "cat, dog", "subtract_words": "mirror"}, None),
    ({"target_prompts": SOURCE, "reweight": "mirror:3"}, None),  # auto → reweight
    ({"self_limit": "16x16"}, None),
    ({"self_limit": "64x64"}, "self_limit must be one of ['32x32', '16x16']"),
    ({"uncond_self_end": 0.5}, None),
    ({"uncond_self_end": 1.5}, "uncond_self_end must be a fraction in [0, 1]"),
])
def test_plan_validation(N: Any, change: dict[str, Any], message: str | None) -> None:
    result = N["NTIAttentionEditPlan"].validate_inputs(**{**PLAN_DEFAULTS, **change})
    if message is None:
        assert result is True
    else:
        assert isinstance(result, str) and message in result, result


def test_plan_self_limit_reaches_the_controller(N: Any, comfy_sd15: Any) -> None:
    clip = comfy_sd15[1]
    for option, pixels in (("32x32", 32 * 32), ("16x16", 16 * 16)):
        (plan,) = run(N["NTIAttentionEditPlan"], clip=clip,
                      **{**PLAN_DEFAULTS, "self_limit": option}).args
        controller = plan.spec.build(sub("nodes.common").family_tokenizer(), STEPS)
        assert controller.self_max_pixels == pixels


def test_plan_p2plus_reaches_the_controller(N: Any, comfy_sd15: Any) -> None:
    clip = comfy_sd15[1]
    for tau, steps in ((0.0, (0, 0)), (0.5, (0, STEPS // 2))):
        (plan,) = run(N["NTIAttentionEditPlan"], clip=clip,
                      **{**PLAN_DEFAULTS, "uncond_self_end": tau}).args
        controller = plan.spec.build(sub("nodes.common").family_tokenizer(), STEPS)
        assert controller.uncond_self_range == steps


@pytest.fixture(scope="module")
def quarter(N: Any, quarter_sd15: Any) -> dict[str, Any]:
    """DDIM Invert with and without record_maps on a model with cross-attention at a quarter of
    the latent side (the maps the attention loss and LocalBlend read)."""
    model, clip, _ = quarter_sd15
    latent = raw_latent()
    kw = dict(model=model, clip=clip, latent=latent, source_prompt=SOURCE, steps=STEPS,
              grid="reference")
    plain, _ = run(N["NTIDDIMInvert"], **kw).args
    mapped, _ = run(N["NTIDDIMInvert"], record_maps=True, **kw).args
    uncond = run(N["NTINullTextOptimize"], model=model, clip=clip, trajectory=mapped,
                 guidance=7.5, inner_steps=2, early_stop=1e-5, method="null-text").args[0]
    return {"latent": latent, "plain": plain, "mapped": mapped, "uncond": uncond}


def test_attention_loss_through_the_nodes(N: Any, quarter_sd15: Any,
                                          quarter: dict[str, Any]) -> None:
    """record_maps keeps per-head maps at a quarter of the latent side; attention_loss uses them
    and is refused, before any work, on a trajectory without them."""
    model, clip, _ = quarter_sd15
    common = dict(model=model, clip=clip, guidance=7.5, inner_steps=2, early_stop=1e-5,
                  method="null-text")
    with pytest.raises(ValueError, match="turn on record_maps in DDIM Invert"):
        run(N["NTINullTextOptimize"], trajectory=quarter["plain"], attention_loss=1.0, **common)
    with pytest.raises(ValueError, match="attention_loss applies to methods"):
        run(N["NTINullTextOptimize"], trajectory=quarter["plain"], attention_loss=1.0,
            **{**common, "method": "negative-prompt"})
    traj = quarter["mapped"]
    assert quarter["plain"].maps is None
    # one down and two up cross-attention layers at 2×2 (the middle block is never read), 8 heads
    assert tuple(traj.maps.shape) == (STEPS, 3, 8, (H // 4) * (W // 4), 77)
    assert torch.allclose(traj.latents, quarter["plain"].latents, atol=1e-4, rtol=0)
    uncond, report = run(N["NTINullTextOptimize"], trajectory=traj, attention_loss=1.0,
                         **common).args
    assert len(uncond.attention_loss) == STEPS and uncond.attention_weight == 1.0
    assert "attention loss weight λ = 1.0" in report


def test_attention_maps_node(N: Any, chain: dict[str, Any], quarter_sd15: Any,
                             quarter: dict[str, Any]) -> None:
    """One labelled map per word of the chosen row, the mask of LocalBlend, and the inversion's
    own maps; wrong connections are refused with what to connect."""
    model, clip, _ = quarter_sd15
    photo = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    am = chain["attention"]  # the main chain (maps at the latent size and half of it)
    assert am.prompts == (SOURCE, *TARGETS.splitlines()) and am.mask is None
    opts = dict(row=1, sizes="all", step_start=0.0, step_end=1.0)
    grid, mask = run(N["NTIAttentionMaps"], image=photo, attention=am, **opts).args
    assert grid.ndim == 4 and grid.shape[0] == 1 and grid.shape[-1] == 3
    assert 0 <= float(grid.min()) and float(grid.max()) <= 1
    assert torch.equal(mask, torch.ones(1, 64, 64))  # no LocalBlend in the chain's plan
    maps_mod = sub("nti_core.attention.maps")
    target = TARGETS.splitlines()[0]
    maps, labels = maps_mod.word_maps(
        maps_mod.average_maps(am, 1, None, range(STEPS)),
        sub("nti_core.alignment").tokenize(sub("nodes.common").family_tokenizer(), target))
    assert labels == target.split() and maps.shape[0] == len(labels)
    # with LocalBlend the mask is LocalBlend's, upsampled to the image
    (plan,) = run(N["NTIAttentionEditPlan"], clip=clip,
                  **{**PLAN_DEFAULTS, "blend_words": "cat, dog", "blend_start": 0.0}).args
    _, blended = run(N["NTIP2PSample"], model=model, trajectory=quarter["mapped"],
                     uncond=quarter["uncond"], plan=plan, guidance=7.5).args
    _, mask = run(N["NTIAttentionMaps"], image=photo, attention=blended, **opts).args
    want = torch.nn.functional.interpolate(blended.mask[1:2].float(), size=(64, 64))[:, 0]
    assert torch.equal(mask, want) and 0 < float(mask.mean()) <= 1
    # the inversion's own maps
    grid, mask = run(N["NTIAttentionMaps"], image=photo, trajectory=quarter["mapped"],
                     **{**opts, "row": 0, "sizes": "1/4"}).args
    assert grid.shape[-1] == 3 and torch.equal(mask, torch.ones(1, 64, 64))
    with pytest.raises(ValueError, match="connect exactly one of"):
        run(N["NTIAttentionMaps"], image=photo, **opts)
    with pytest.raises(ValueError, match="record_maps"):
        run(N["NTIAttentionMaps"], image=photo, trajectory=quarter["plain"], **opts)
    with pytest.raises(ValueError, match="row 5 is not in this run"):
        run(N["NTIAttentionMaps"], image=photo, attention=am, **{**opts, "row": 5})
    check = sub("nodes.attention_maps").NTIAttentionMaps.validate_inputs
    assert "is after step_end" in check(0.9, 0.1)


@pytest.fixture(scope="module")
def clip_vision(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return comfy_support.tiny_clip_vision(tmp_path_factory.mktemp("clip_vision"))


def test_style_diffusion_through_the_nodes(N: Any, quarter_sd15: Any, quarter: dict[str, Any],
                                           clip_vision: Any) -> None:
    """DDIM Invert (record_maps) → StyleDiffusion Invert → P2P Sample with values: the values
    reach the sampler, τ_v matters, and values of another inversion are refused."""
    model, clip, _ = quarter_sd15
    photo = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    tokens, _ = sub("nodes.style_invert").vision_tokens(clip_vision, photo)
    assert tuple(tokens.shape) == (1, 197, 768)
    traj = quarter["mapped"]
    style = dict(model=model, clip=clip, clip_vision=clip_vision, image=photo, guidance=7.5,
                 inner_steps=3, attention_loss=1.0, variant="official")
    with pytest.raises(ValueError, match="turn on record_maps"):
        run(N["NTIStyleInvert"], trajectory=quarter["plain"], **style)
    out = run(N["NTIStyleInvert"], trajectory=traj, **style)
    values, uncond, report = out.args
    assert tuple(values.shift.shape) == (STEPS, 77, 768) and values.scale is not None
    assert len(values.attention_loss) == STEPS and "StyleDiffusion (official" in report
    assert uncond.method == "null" and out.ui is not None
    (plan,) = run(N["NTIAttentionEditPlan"], clip=clip, **PLAN_DEFAULTS).args
    common = dict(model=model, trajectory=traj, uncond=uncond, plan=plan, guidance=7.5)
    plain, _ = run(N["NTIP2PSample"], **common).args
    styled, _ = run(N["NTIP2PSample"], values=values, value_end=0.5, **common).args
    late, _ = run(N["NTIP2PSample"], values=values, value_end=1.0, **common).args
    assert not torch.allclose(styled["samples"][0], plain["samples"][0], atol=1e-4)
    assert torch.equal(styled["samples"][0], late["samples"][0])  # τ_v never touches the source
    assert not torch.equal(styled["samples"][1], late["samples"][1])
    other, _ = run(N["NTIDDIMInvert"], model=model, clip=clip, latent=raw_latent(seed=1),
                   source_prompt=SOURCE, steps=STEPS, grid="reference").args
    with pytest.raises(ValueError, match="optimised on another inversion"):
        run(N["NTIP2PSample"], model=model, trajectory=other, uncond=uncond, plan=plan,
            guidance=7.5, values=values)

    class NotClip:
        model = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="needs a CLIP or SigLIP vision encoder"):
        run(N["NTIStyleInvert"], trajectory=traj, **{**style, "clip_vision": NotClip()})


# ============================================================== the loss curve


class LossSpy:
    """ComfyUI's PromptServer.instance as the loss messages use it: the id of the client that
    queued the prompt, and send_sync (recorded)."""

    def __init__(self, client_id: str | None = "client-7") -> None:
        self.client_id = client_id
        self.sent: list[tuple[str, dict[str, Any], Any]] = []

    def send_sync(self, event: str, data: dict[str, Any], sid: Any = None) -> None:
        self.sent.append((event, data, sid))


@pytest.fixture()
def loss_spy(monkeypatch: pytest.MonkeyPatch) -> LossSpy:
    """A running server as ``main.py`` leaves it: module ``server`` with PromptServer.instance."""
    spy = LossSpy()
    monkeypatch.setitem(sys.modules, "server",
                        SimpleNamespace(PromptServer=SimpleNamespace(instance=spy)))
    return spy


def executor_hidden(node: type, unique_id: str) -> dict[str, Any]:
    """The hidden inputs ComfyUI's executor hands ``node`` (those its schema asks for)."""
    import execution

    return execution.get_input_data({}, node, unique_id)[2]


def assert_loss_curve(spy: LossSpy, ui: dict[str, Any], result: Any, report: str) -> None:
    """One message per step to the queuing client, in order, with the node's id and the losses
    the result records; the UI output carries the report and the whole curve, as JSON."""
    first, final = result.first_loss, result.final_loss
    assert len(first) == len(final) == STEPS and first != final
    assert spy.sent == [("nti_photo_edit.loss", {"node": "12", "step": i, "total": STEPS,
                                                  "first": first[i], "final": final[i]},
                         "client-7") for i in range(STEPS)]
    assert ui == {"text": (report,), "nti_loss": [{"first": first, "final": final}]}
    json.dumps([ui, spy.sent], allow_nan=False)  # what the websocket and /history carry


@pytest.mark.parametrize("method", ["null-text", "null-text-fast", "direct"])
def test_null_text_sends_its_loss_curve(N: Any, comfy_sd15: Any, chain: dict[str, Any],
                                        loss_spy: LossSpy, method: str) -> None:
    model, clip, _ = comfy_sd15
    node = N["NTINullTextOptimize"]
    out = run(node, hidden=executor_hidden(node, "12"), model=model, clip=clip,
              trajectory=chain["traj"], guidance=7.5, inner_steps=3, early_stop=1e-5,
              method=method)
    uncond, report = out.args
    if method == "direct":  # no optimisation, no loss: nothing sent, the report alone
        assert loss_spy.sent == [] and out.ui == {"text": (report,)}
    else:
        assert_loss_curve(loss_spy, out.ui, uncond, report)


def test_style_invert_sends_its_loss_curve(N: Any, quarter_sd15: Any, quarter: dict[str, Any],
                                           clip_vision: Any, loss_spy: LossSpy) -> None:
    model, clip, _ = quarter_sd15
    photo = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    node = N["NTIStyleInvert"]
    out = run(node, hidden=executor_hidden(node, "12"), model=model, clip=clip,
              clip_vision=clip_vision, image=photo, trajectory=quarter["mapped"], guidance=7.5,
              inner_steps=2, attention_loss=1.0, variant="official")
    values, _, report = out.args
    assert_loss_curve(loss_spy, out.ui, values, report)


def test_loss_messages_need_a_server_and_a_client(pack: ModuleType,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    common = sub("nodes.common")
    no_step_loss = sub("nti_core.progress").no_step_loss
    monkeypatch.delitem(sys.modules, "server", raising=False)
    assert common.loss_messages("12") is no_step_loss  # in-process, as these tests run
    spy = LossSpy(client_id=None)  # a prompt queued without a client id
    monkeypatch.setitem(sys.modules, "server",
                        SimpleNamespace(PromptServer=SimpleNamespace(instance=spy)))
    assert common.loss_messages(None) is no_step_loss
    common.loss_messages("12")(0, 4, 1.0, 0.5)
    assert spy.sent == []


def test_loss_curve_leaves_the_cache_key_alone(N: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hidden unique_id the messages name is no cache input: two copies of the node with the
    same inputs share one cache key (ComfyUI 0.3.64 adds the node's id only for a V1 hidden
    "UNIQUE_ID"), and UI outputs are never part of a key."""
    from comfy_execution import caching
    from comfy_execution.graph import DynamicPrompt
    from execution import IsChangedCache

    import nodes

    class TaggedV1:  # a V1 node that asks for UNIQUE_ID: its copies get keys of their own
        @classmethod
        def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 (ComfyUI's name)
            return {"required": {"x": ("INT", {})}, "hidden": {"unique_id": "UNIQUE_ID"}}

    for node_id in ("NTINullTextOptimize", "NTIStyleInvert"):
        monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, node_id, N[node_id])
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "NTITestTagged", TaggedV1)
    monkeypatch.setattr(caching, "NODE_CLASS_CONTAINS_UNIQUE_ID", {})
    loader = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}}
    copies = {
        "NTINullTextOptimize": {"model": ["1", 0], "clip": ["1", 1], "trajectory": ["1", 2],
                                "guidance": 7.5, "inner_steps": 10, "early_stop": 1e-5,
                                "method": "null-text", "attention_loss": 0.0,
                                "precision": "auto"},
        "NTIStyleInvert": {"model": ["1", 0], "clip": ["1", 1], "clip_vision": ["1", 2],
                           "image": ["1", 2], "trajectory": ["1", 2], "guidance": 7.5,
                           "inner_steps": 100, "attention_loss": 1.0, "variant": "official",
                           "precision": "auto"},
        "NTITestTagged": {"x": 1},
    }
    for class_type, inputs in copies.items():
        prompt = {"1": loader, "2": {"class_type": class_type, "inputs": inputs},
                  "3": {"class_type": class_type, "inputs": dict(inputs)}}
        dynprompt = DynamicPrompt(prompt)
        keys = caching.CacheKeySetInputSignature(dynprompt, ["2", "3"],
                                                 IsChangedCache("p", dynprompt, None))
        asyncio.run(keys.add_keys(["2", "3"]))
        same = keys.get_data_key("2") == keys.get_data_key("3")
        assert same == (class_type != "NTITestTagged"), class_type


def test_invert_validation(N: Any) -> None:
    node = N["NTIDDIMInvert"]
    assert node.validate_inputs(source_prompt=SOURCE) is True
    assert node.validate_inputs(source_prompt=None) is True  # linked
    assert "source prompt is empty" in node.validate_inputs(source_prompt=" \n")
    assert "more than the 77" in node.validate_inputs(source_prompt="a cat " * 40)


def test_plan_validation_waits_for_linked_values(N: Any) -> None:
    assert N["NTIAttentionEditPlan"].validate_inputs(**{**PLAN_DEFAULTS, "source_prompt": None,
                                                        "edit_kind": "replace"}) is True


def test_plan_refuses_comfy_prompt_syntax_and_another_clip(
    N: Any, comfy_sd15: Any, chain: dict[str, Any]
) -> None:
    model, clip, _ = comfy_sd15
    with pytest.raises(ValueError, match="weighting syntax"):
        run(N["NTIAttentionEditPlan"], clip=clip,
            **{**PLAN_DEFAULTS, "target_prompts": "a (dog:1.3) sitting next to a mirror"})
    with pytest.raises(ValueError, match="weighting syntax"):
        run(N["NTIDDIMInvert"], model=model, clip=clip, latent=raw_latent(),
            source_prompt="a (cat) sitting next to a mirror", steps=2, grid="reference")
    skipped = clip.clone()
    skipped.clip_layer(-2)
    (plan,) = run(N["NTIAttentionEditPlan"], clip=skipped, **PLAN_DEFAULTS).args
    with pytest.raises(ValueError, match="connect the same CLIP"):
        run(N["NTIP2PSample"], model=model, trajectory=chain["traj"], uncond=chain["uncond"],
            plan=plan, guidance=7.5)


def test_bad_node_inputs(N: Any, comfy_sd15: Any, chain: dict[str, Any]) -> None:
    model, clip, _ = comfy_sd15
    with pytest.raises(ValueError, match="takes one image, got a batch of 2"):
        run(N["NTIDDIMInvert"], model=model, clip=clip, latent=raw_latent(2),
            source_prompt=SOURCE, steps=2, grid="reference")
    with pytest.raises(ValueError, match="4 channels, got 16"):
        run(N["NTIDDIMInvert"], model=model, clip=clip,
            latent={"samples": torch.zeros(1, 16, H, W)}, source_prompt=SOURCE, steps=2,
            grid="reference")
    (other,) = run(N["NTIAttentionEditPlan"], clip=clip, **{
        **PLAN_DEFAULTS, "source_prompt": "a cat sitting next to the mirror",
        "target_prompts": "a dog sitting next to the mirror"}).args
    with pytest.raises(ValueError, match="use the same source prompt in DDIM Invert"):
        run(N["NTIP2PSample"], model=model, trajectory=chain["traj"], uncond=chain["uncond"],
            plan=other, guidance=7.5)
    short = sub("nti_core.trajectory").UncondEmbeddings(
        chain["uncond"].embeddings[:2], "null-text", 7.5)
    with pytest.raises(ValueError, match="have 2 steps but the inversion has 4"):
        run(N["NTIP2PSample"], model=model, trajectory=chain["traj"], uncond=short,
            plan=chain["plan"], guidance=7.5)


# ============================================================== image sizes


def test_image_not_multiple_of_8_is_cropped_by_vae_encode(
    comfy_sd15: Any, N: Any, folders: Path
) -> None:
    """ComfyUI 0.3.64: VAE Encode centre-crops to multiples of 8 (100×100 → 96×96); the latent
    carries no original size, so the pack inverts what it gets and says so in the tooltip."""
    import numpy as np
    from PIL import Image

    import nodes

    model, clip, vae = comfy_sd15
    pixels = (np.random.default_rng(0).random((100, 100, 3)) * 255).astype("uint8")
    Image.fromarray(pixels).save(folders / "input" / "odd.png")
    with torch.inference_mode():
        image = nodes.LoadImage().load_image("odd.png")[0]
        latent = nodes.VAEEncode().encode(vae, image)[0]
    assert image.shape == (1, 100, 100, 3) and latent["samples"].shape == (1, 4, 12, 12)
    traj, recon = run(N["NTIDDIMInvert"], model=model, clip=clip, latent=latent,
                      source_prompt=SOURCE, steps=2, grid="reference").args
    with torch.inference_mode():
        decoded = nodes.VAEDecode().decode(vae, recon)[0]
    assert decoded.shape == (1, 96, 96, 3)
    schema = N["NTIDDIMInvert"].GET_SCHEMA()
    assert "multiple of 8" in next(i for i in schema.inputs if i.id == "latent").tooltip


class TwoEncoderClip:
    """A stand-in SDXL CLIP whose CLIP-G tokenizer puts the words one position later."""

    def __init__(self, real_ids: list[int]) -> None:
        self.ids = real_ids

    def tokenize(self, text: str) -> dict:
        pad = [(0, 1.0)] * (77 - len(self.ids))
        return {"l": [[(i, 1.0) for i in self.ids] + pad],
                "g": [[(self.ids[0], 1.0), (320, 1.0)] + [(i, 1.0) for i in self.ids[1:]]
                      + pad[1:]]}


def test_sdxl_word_positions_must_agree_for_both_encoders(pack: ModuleType) -> None:
    """SDXL's two tokenizers share the vocabulary; a prompt they place differently is refused."""
    common = sub("nodes.common")
    tok = common.family_tokenizer()
    text = "a cat sitting next to a mirror"
    clip = TwoEncoderClip([tok.bos, *tok.encode(text), tok.eos])
    with pytest.raises(ValueError, match=r"CLIP \(g\) tokenises the prompt .* word positions"):
        common.clip_tokens(clip, text, tok)
