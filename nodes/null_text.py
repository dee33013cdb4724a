"""NTINullTextOptimize: per-step unconditional embeddings ∅ that make guided sampling retrace
the pivot (Null-text Inversion, as the paper or in the fast mode), Direct Inversion, or the
negative-prompt shortcut."""

from __future__ import annotations

import dataclasses
import logging

from comfy_api.latest import io, ui

from ..nti_core.hosts.comfy import autograd, check_interrupt
from ..nti_core.null_text import (
    NULL_TEXT_METHODS,
    NullTextOptions,
    check_trajectory_model,
    direct_inversion,
    negative_prompt_inversion,
    null_text_optimize,
)
from ..nti_core.trajectory import Trajectory
from . import types
from .common import (
    CATEGORY,
    encode_empty,
    finish_optimisation,
    intermediate,
    make_denoiser,
    normal_copy,
    precision_input,
    progress_bar,
    require_maps,
    trajectory_to,
    uncond_to,
)

log = logging.getLogger(__name__)

METHODS = [*NULL_TEXT_METHODS, "direct", "negative-prompt"]
OPTIMISED = NULL_TEXT_METHODS


class NTINullTextOptimize(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NTINullTextOptimize",
            display_name="Null-Text Optimize (NTI)",
            category=CATEGORY,
            description="Optimise one unconditional embedding per step so that sampling at the "
            "chosen guidance reproduces the photo (Mokady et al. 2023; 'null-text-fast' reaches "
            "it with far fewer UNet passes), keep the source on the photo's trajectory while "
            "editing (Direct Inversion, Ju et al. 2024, instant and exact), or use the source "
            "prompt as ∅ (negative-prompt inversion, instant, less exact).",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL the trajectory was inverted with."),
                io.Clip.Input("clip", tooltip="Its CLIP: ∅ starts from the embedding of the "
                              "empty prompt \"\"."),
                types.Trajectory.Input("trajectory", tooltip="The pivot from DDIM Invert (NTI) "
                                       "or Load Inversion (NTI)."),
                io.Float.Input("guidance", default=7.5, min=1.0, max=30.0, step=0.1,
                               tooltip="Classifier-free guidance the ∅ are optimised for; sample "
                               "with the same value."),
                io.Int.Input("inner_steps", default=10, min=1, max=100,
                             tooltip="Adam iterations per step at most (null-text methods)."),
                io.Float.Input("early_stop", default=1e-5, min=0.0, max=1.0, step=1e-6,
                               round=1e-8, tooltip="Stop a step's iterations once the latent "
                               "MSE is below this (+ 2e-5 per step, as the paper's code)."),
                io.Combo.Input("method", options=METHODS, default="null-text-fast",
                               tooltip="'null-text': the paper's optimisation of ∅ (about 1 "
                               "minute at 512² on a GPU); 'null-text-fast': the same loss and "
                               "constants, ∅ starting from the source prompt, no pass computed "
                               "twice (measured 6× faster at lower error; the default, README: Performance); 'direct': "
                               "Direct Inversion, ∅ = \"\" and P2P Sample keeps the source row "
                               "on the photo's trajectory (no optimisation, exact "
                               "reconstruction); 'negative-prompt': ∅ = the source prompt."),
                io.Float.Input("attention_loss", default=0.0, min=0.0, max=100.0, step=0.1,
                               tooltip="λ of StyleDiffusion's attention loss (null-text "
                               "methods): "
                               "also pull the ∅ pass's cross-attention toward the source "
                               "prompt's maps recorded at inversion (DDIM Invert with "
                               "record_maps). 0 = the paper's algorithm exactly."),
                precision_input(),
            ],
            outputs=[
                types.Uncond.Output("uncond", display_name="uncond",
                                    tooltip="Per-step unconditional embeddings ∅ for P2P Sample "
                                    "(NTI) and Save Inversion (NTI)."),
                io.String.Output("report", display_name="report",
                                 tooltip="Per-step iterations and losses (first → last)."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, trajectory: Trajectory, guidance: float, inner_steps: int,
                early_stop: float, method: str, attention_loss: float = 0.0,
                precision: str = "auto") -> io.NodeOutput:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if attention_loss > 0 and method not in OPTIMISED:
            raise ValueError(f"attention_loss applies to methods {OPTIMISED}, not {method!r}: "
                             "set it to 0 or switch the method")
        require_maps(trajectory, attention_loss)
        optimise = method in OPTIMISED
        den = make_denoiser(model, for_grad=optimise, clip=clip, precision=precision,
                            latent_hw=tuple(trajectory.latents.shape[-2:]) if optimise else None)
        check_trajectory_model(trajectory, den)  # before minutes of optimisation
        if optimise:
            options = NullTextOptions(guidance=guidance, inner_steps=inner_steps,
                                      early_stop=early_stop, attention_weight=attention_loss,
                                      fast=method == "null-text-fast")
            null = encode_empty(clip)
            try:
                with autograd():  # ComfyUI runs nodes under inference_mode: leave it, clone
                    traj = trajectory_to(normal_copy(trajectory), den.device)
                    uncond = null_text_optimize(den, traj, null.clone().to(den.device), options,
                                                progress=progress_bar(traj.num_steps),
                                                check=check_interrupt,  # Cancel: every iteration
                                                precision=den.precision)
            finally:
                finish_optimisation()
            uncond = dataclasses.replace(uncond, precision=den.describe())
        elif method == "direct":
            uncond = direct_inversion(trajectory, encode_empty(clip), guidance)
        else:
            uncond = negative_prompt_inversion(trajectory, guidance)
        report = uncond.report()
        log.info("[NTI] %s", report.splitlines()[0] + (f"; {report.splitlines()[1]}"
                                                       if len(report.splitlines()) > 1 else ""))
        return io.NodeOutput(uncond_to(uncond, intermediate()), report,
                             ui=ui.PreviewText(report))
