"""Cancel (ComfyUI's interrupt) inside the pack's long loops, in-process: a run stops within one
UNet call, the input MODEL is left as it was, and the next run equals a clean one.

A unet function wrapper on a clone of the MODEL counts the UNet calls and sets ComfyUI's
interrupt flag (what POST /interrupt does) during call k; the node must raise
InterruptProcessingException before call k + 1, for every k up to the next step's first —
inside the inner optimisation loops, between the cond and uncond calls, and between steps.
Over HTTP: tests/test_cancel_http.py. Needs $COMFYUI_PATH; toy sizes (8×8 latents, 3 steps).
"""

from __future__ import annotations

import functools
from typing import Any

import comfy_support
import pytest
import torch
from test_nodes import PLAN_DEFAULTS, SOURCE, load_pack, raw_latent, run, sub

STEPS, INNER = 3, 2


class Canceller:
    """A unet function wrapper: counts the calls, sets the interrupt flag during call ``at``."""

    def __init__(self, at: int | None = None) -> None:
        self.at, self.calls = at, 0

    def __deepcopy__(self, memo: dict) -> Canceller:  # ModelPatcher.clone() deep-copies options
        return self

    def __call__(self, apply_model: Any, args: dict[str, Any]) -> Any:
        import comfy.model_management as mm

        self.calls += 1
        if self.calls == self.at:
            mm.interrupt_current_processing(True)
        return apply_model(args["input"], args["timestep"], **args["c"])


@pytest.fixture(scope="module")
def nodes(comfy_root: Any) -> dict[str, type]:
    return {cls.GET_SCHEMA().node_id: cls for cls in load_pack().nodes.NODES}


@pytest.fixture(scope="module")
def inputs(nodes: dict[str, type], quarter_sd15: Any,
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A trajectory with maps, its ∅, a plan and a tiny CLIP vision on the quarter model."""
    model, clip, _ = quarter_sd15
    traj, _ = run(nodes["NTIDDIMInvert"], model=model, clip=clip, latent=raw_latent(),
                  source_prompt=SOURCE, steps=STEPS, grid="reference", record_maps=True).args
    uncond = run(nodes["NTINullTextOptimize"], model=model, clip=clip, trajectory=traj,
                 guidance=7.5, inner_steps=INNER, early_stop=0.0, method="null-text").args[0]
    (plan,) = run(nodes["NTIAttentionEditPlan"], clip=clip, **PLAN_DEFAULTS).args
    vision = comfy_support.tiny_clip_vision(tmp_path_factory.mktemp("clip_vision"))
    photo = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    return {"traj": traj, "uncond": uncond, "plan": plan, "vision": vision, "photo": photo}


def stage_call(stage: str, nodes: dict[str, type], model: Any, clip: Any,
               given: dict[str, Any]) -> Any:
    """Run the node of ``stage`` on ``model``; → its first output (a tensor-holding value)."""
    if stage == "inversion":
        return run(nodes["NTIDDIMInvert"], model=model, clip=clip, latent=raw_latent(),
                   source_prompt=SOURCE, steps=STEPS, grid="reference").args[0].latents
    if stage == "null-text":
        return run(nodes["NTINullTextOptimize"], model=model, clip=clip,
                   trajectory=given["traj"], guidance=7.5, inner_steps=INNER, early_stop=0.0,
                   method="null-text").args[0].embeddings
    if stage == "styled":
        return run(nodes["NTIStyleInvert"], model=model, clip=clip, clip_vision=given["vision"],
                   image=given["photo"], trajectory=given["traj"], guidance=7.5,
                   inner_steps=INNER, attention_loss=1.0, variant="official").args[0].shift
    return run(nodes["NTIP2PSample"], model=model, trajectory=given["traj"],
               uncond=given["uncond"], plan=given["plan"], guidance=7.5).args[0]["samples"]


STAGES = ("inversion", "null-text", "styled", "sampling", "sampling, separate calls")


@pytest.mark.parametrize("stage", STAGES)
def test_interrupt_stops_within_one_unet_call(stage: str, nodes: dict[str, type],
                                              quarter_sd15: Any, inputs: dict[str, Any],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """For every k up to the next step's first call: Cancel during UNet call k → exactly k calls,
    InterruptProcessingException, the MODEL's patches and options as before; then a full run
    on the same MODEL equals one on the untouched MODEL, bit for bit."""
    import comfy.model_management as mm

    model, clip, _ = quarter_sd15
    if stage.endswith("separate calls"):  # cond and uncond in two calls, as under memory pressure
        common = sub("nodes.common")
        monkeypatch.setattr(common, "ComfyDenoiser",
                            functools.partial(common.ComfyDenoiser, separate_calls=True))
    kind = stage.split(",")[0]
    clean = stage_call(kind, nodes, model, clip, inputs)
    counter = Canceller()
    watched = model.clone()
    watched.set_model_unet_function_wrapper(counter)
    assert torch.equal(stage_call(kind, nodes, watched, clip, inputs), clean)
    per_step = counter.calls // STEPS
    assert per_step >= 1 and counter.calls % STEPS == 0, counter.calls
    before = comfy_support.patcher_state(watched)
    try:
        for k in range(1, per_step + 2):  # every call of a step, and the next step's first
            canceller = Canceller(at=k)
            watched.model_options["model_function_wrapper"] = canceller
            with pytest.raises(mm.InterruptProcessingException):
                stage_call(kind, nodes, watched, clip, inputs)
            assert canceller.calls == k, f"Cancel during call {k}: {canceller.calls} calls"
            assert not mm.processing_interrupted()  # the exception consumed the flag
            watched.model_options["model_function_wrapper"] = counter
            assert comfy_support.patcher_state(watched) == before
    finally:
        mm.interrupt_current_processing(False)
    assert "patches_replace" not in watched.model_options.get("transformer_options", {})
    again = stage_call(kind, nodes, watched, clip, inputs)
    assert torch.equal(again, clean)
    print(f"\n{stage}: {per_step * STEPS} UNet calls in {STEPS} steps; Cancel during call k "
          f"(k = 1…{per_step + 1}) → k calls, none after")
