"""NTIP2PSample: guided DDIM from the pivot with per-step ∅ and Prompt-to-Prompt control →
the reconstruction and one edited latent per target prompt."""

from __future__ import annotations

import logging
import time

import torch
from comfy_api.latest import io

from ..nti_core.attention.maps import AttentionMaps
from ..nti_core.family import for_embedding
from ..nti_core.hosts.comfy import ComfyDenoiser, model_compute_dtype
from ..nti_core.null_text import check_trajectory_model
from ..nti_core.precision import sampling_dtype
from ..nti_core.sampling import p2p_sample
from ..nti_core.trajectory import Trajectory, UncondEmbeddings, ValueEmbeddings
from . import types
from .common import (
    CATEGORY,
    family_tokenizer,
    latent_out,
    make_denoiser,
    output_used,
    progress_bar,
    trajectory_to,
    uncond_to,
)

log = logging.getLogger(__name__)


def check_inputs(traj: Trajectory, uncond: UncondEmbeddings, plan: types.EditPlan) -> None:
    """The three inputs must belong together (checked before any sampling)."""
    if plan.source != traj.prompt:
        raise ValueError(
            f"the edit plan's source prompt {plan.source!r} differs from the prompt the image was "
            f"inverted with {traj.prompt!r}: use the same source prompt in DDIM Invert (NTI) and "
            "Attention Edit Plan (NTI)"
        )
    if uncond.num_steps != traj.num_steps:
        raise ValueError(
            f"the unconditional embeddings have {uncond.num_steps} steps but the inversion has "
            f"{traj.num_steps}: optimise them on this trajectory"
        )
    a, b = plan.source_embedding.float().cpu(), traj.embedding.float().cpu()
    if a.shape != b.shape or float((a - b).norm() / b.norm().clamp_min(1e-12)) > 1e-2:
        raise ValueError(
            "the edit plan's CLIP encodes the source prompt differently from the CLIP used for the "
            "inversion: connect the same CLIP (same checkpoint, same CLIP skip) to both nodes"
        )


# The inputs P2P Sample and P2P Sweep share, in the order their schemas list them.


def inversion_inputs(plan_tooltip: str) -> list:
    """model, trajectory, uncond and plan."""
    return [
        io.Model.Input("model", tooltip="The MODEL the image was inverted with."),
        types.Trajectory.Input("trajectory", tooltip="The pivot from DDIM Invert (NTI) or Load "
                               "Inversion (NTI)."),
        types.Uncond.Input("uncond", tooltip="Per-step ∅ from Null-Text Optimize (NTI) or Load "
                           "Inversion (NTI), made on this trajectory."),
        types.EditPlanType.Input("plan", tooltip=plan_tooltip),
    ]


def guidance_input() -> io.Float.Input:
    return io.Float.Input("guidance", default=7.5, min=1.0, max=30.0, step=0.1,
                          tooltip="Classifier-free guidance; use the value ∅ was optimised for, "
                          "or the reconstruction drifts.")


def style_and_mask_inputs() -> list:
    """StyleDiffusion's values and τ_v, and the MASK that confines the change (all optional)."""
    return [
        types.Values.Input("values", optional=True,
                           tooltip="StyleDiffusion's value embeddings (StyleDiffusion Invert or "
                           "Load Inversion), made on this trajectory."),
        io.Float.Input("value_end", default=0.5, min=0.0, max=1.0, step=0.01, optional=True,
                       tooltip="StyleDiffusion τ_v: fraction of the first steps where the "
                       "targets read the learned values; the source row always does (the "
                       "official code: 0.5)."),
        io.Mask.Input("mask", optional=True,
                      tooltip="Your own region (any mask node: painted, SAM, segmentation; 1 = "
                      "may change) at the image's size: outside it the edits keep the "
                      "reconstruction, from the plan's blend_start on; with blend words, only "
                      "where both allow."),
    ]


def sampler(model, trajectory: Trajectory, uncond: UncondEmbeddings, guidance: float,
            values: ValueEmbeddings | None) -> tuple[ComfyDenoiser, Trajectory]:
    """The denoiser on a clone of ``model`` in the dtype ∅ was optimised in, and the trajectory
    on its device; warns when ``guidance`` is not the one ∅ was made for."""
    if abs(guidance - uncond.guidance) > 1e-6 and not uncond.direct:
        log.warning("[NTI] sampling at guidance %g with ∅ made for %g (%s): the "
                    "reconstruction will not match the photo exactly", guidance,
                    uncond.guidance, uncond.method)
    den = make_denoiser(model, compute=sampling_dtype(  # the dtype ∅ was optimised in
        model_compute_dtype(model), uncond, values))
    check_trajectory_model(trajectory, den)
    return den, trajectory_to(trajectory, den.device)


class NTIP2PSample(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NTIP2PSample",
            display_name="P2P Sample (NTI)",
            category=CATEGORY,
            description="Sample the source and every target prompt together from the inverted "
            "noise with the optimised ∅, injecting the source's attention as the plan says.",
            inputs=[
                *inversion_inputs("The edit from Attention Edit Plan (NTI); its source prompt "
                                  "must be the inversion's."),
                guidance_input(),
                *style_and_mask_inputs(),
            ],
            outputs=[
                io.Latent.Output("latents", display_name="latents",
                                 tooltip="Batch of 1 + K latents: the reconstruction first, then "
                                 "one edit per target prompt (VAE Decode to see them)."),
                types.Attention.Output("attention", display_name="attention",
                                       tooltip="The run's cross-attention maps per step and "
                                       "the LocalBlend mask, for Attention Maps (NTI); "
                                       "kept only when this output is connected."),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],  # is the attention output wired?
        )

    @classmethod
    def execute(cls, model, trajectory: Trajectory, uncond: UncondEmbeddings,
                plan: types.EditPlan, guidance: float, values: ValueEmbeddings | None = None,
                value_end: float = 0.5, mask: torch.Tensor | None = None) -> io.NodeOutput:
        check_inputs(trajectory, uncond, plan)  # values and τ_v: p2p_sample checks them first
        maps_wanted = output_used(cls.hidden.prompt, cls.hidden.unique_id, 1)
        controller = plan.spec.build(family_tokenizer(for_embedding(trajectory.embedding)), trajectory.num_steps,  # the real N now
                                     keep_step_maps=maps_wanted,  # else only what edits read
                                     latent_hw=tuple(trajectory.latents.shape[-2:]), mask=mask)
        den, traj = sampler(model, trajectory, uncond, guidance, values)
        contexts = torch.cat([traj.embedding, plan.targets.to(traj.embedding)])
        start = time.perf_counter()
        z = p2p_sample(den, traj, uncond_to(uncond, den.device), contexts, guidance=guidance,
                       controller=controller, values=values, value_end=value_end,
                       progress=progress_bar(traj.num_steps))
        log.info("[NTI] P2P sampling: %d steps, %d prompts, UNet attention in %s, %.1f s",
                 traj.num_steps, contexts.shape[0], den.seen(), time.perf_counter() - start)
        blend = controller.local_blend
        maps = None
        if maps_wanted:
            maps = AttentionMaps.from_store(
                controller.store, (plan.source, *plan.spec.targets), traj.num_steps,
                (int(z.shape[-2]), int(z.shape[-1])), None if blend is None else blend.last_mask)
        return io.NodeOutput(latent_out(model, z), maps)
