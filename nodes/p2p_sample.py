"""NTIP2PSample: guided DDIM from the pivot with per-step ∅ and Prompt-to-Prompt control →
the reconstruction and one edited latent per target prompt."""

from __future__ import annotations

import logging
import time

import torch
from comfy_api.latest import io

from ..nti_core.null_text import check_trajectory_model
from ..nti_core.sampling import p2p_sample
from ..nti_core.trajectory import Trajectory, UncondEmbeddings
from . import types
from .common import (
    CATEGORY,
    latent_out,
    make_denoiser,
    progress_bar,
    sd1_tokenizer,
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
                io.Model.Input("model", tooltip="The MODEL the image was inverted with."),
                types.Trajectory.Input("trajectory", tooltip="The pivot from DDIM Invert (NTI) "
                                       "or Load Inversion (NTI)."),
                types.Uncond.Input("uncond", tooltip="Per-step ∅ from Null-Text Optimize (NTI) "
                                   "or Load Inversion (NTI), made on this trajectory."),
                types.EditPlanType.Input("plan", tooltip="The edit from Attention Edit Plan "
                                         "(NTI); its source prompt must be the inversion's."),
                io.Float.Input("guidance", default=7.5, min=1.0, max=30.0, step=0.1,
                               tooltip="Classifier-free guidance; use the value ∅ was optimised "
                               "for, or the reconstruction drifts."),
            ],
            outputs=[
                io.Latent.Output("latents", display_name="latents",
                                 tooltip="Batch of 1 + K latents: the reconstruction first, then "
                                 "one edit per target prompt (VAE Decode to see them)."),
            ],
        )

    @classmethod
    def execute(cls, model, trajectory: Trajectory, uncond: UncondEmbeddings,
                plan: types.EditPlan, guidance: float) -> io.NodeOutput:
        check_inputs(trajectory, uncond, plan)
        controller = plan.spec.build(sd1_tokenizer(), trajectory.num_steps)  # the real N now
        if abs(guidance - uncond.guidance) > 1e-6:
            log.warning("[NTI] sampling at guidance %g with ∅ made for %g (%s): the "
                        "reconstruction will not match the photo exactly", guidance,
                        uncond.guidance, uncond.method)
        den = make_denoiser(model)
        check_trajectory_model(trajectory, den)
        traj = trajectory_to(trajectory, den.device)
        contexts = torch.cat([traj.embedding, plan.targets.to(traj.embedding)])
        start = time.perf_counter()
        z = p2p_sample(den, traj, uncond_to(uncond, den.device), contexts, guidance=guidance,
                       controller=controller, progress=progress_bar(traj.num_steps))
        log.info("[NTI] P2P sampling: %d steps, %d prompts, %.1f s", traj.num_steps,
                 contexts.shape[0], time.perf_counter() - start)
        return io.NodeOutput(latent_out(model, z))
