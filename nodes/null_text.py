"""NTINullTextOptimize: per-step unconditional embeddings ∅ that make guided sampling retrace
the pivot (Null-text Inversion, as the paper or in the fast mode), Direct Inversion, or the
negative-prompt shortcut."""

from __future__ import annotations

import dataclasses
import logging

from comfy_api.latest import io

from ..nti_core.hosts.comfy import autograd, check_interrupt
from ..nti_core.methods import DEFAULT, Job, check_request, offered_by
from ..nti_core.null_text import NullTextOptions, check_trajectory_model
from ..nti_core.trajectory import Trajectory
from . import types
from .common import (
    CATEGORY,
    encode_empty,
    finish_optimisation,
    intermediate,
    loss_messages,
    loss_ui,
    make_denoiser,
    normal_copy,
    precision_input,
    progress_bar,
    trajectory_to,
    uncond_to,
)

log = logging.getLogger(__name__)

NODE = "NTINullTextOptimize"


class NTINullTextOptimize(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            display_name="Null-Text Optimize (NTI)",
            category=CATEGORY,
            description="One unconditional embedding ∅ per step, so that sampling at the "
            "chosen guidance reproduces the photo; the method input says how (optimised as "
            "Null-text Inversion, or instant).",
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
                io.Combo.Input("method", options=offered_by(NODE), default=DEFAULT,
                               tooltip="How ∅ is made: optimised as the paper, in its fast "
                               "mode, or instantly; the help page compares them."),
                io.Float.Input("attention_loss", default=0.0, min=0.0, max=100.0, step=0.1,
                               tooltip="λ of StyleDiffusion's attention loss: also pull the ∅ "
                               "pass's cross-attention toward the maps DDIM Invert recorded "
                               "(record_maps). 0 = the paper's algorithm."),
                precision_input(),
            ],
            outputs=[
                types.Uncond.Output("uncond", display_name="uncond",
                                    tooltip="Per-step unconditional embeddings ∅ for P2P Sample "
                                    "(NTI) and Save Inversion (NTI)."),
                io.String.Output("report", display_name="report",
                                 tooltip="Per-step iterations and losses (first → last)."),
            ],
            hidden=[io.Hidden.unique_id],  # the loss messages name the node
        )

    @classmethod
    def execute(cls, model, clip, trajectory: Trajectory, guidance: float, inner_steps: int,
                early_stop: float, method: str, attention_loss: float = 0.0,
                precision: str = "auto") -> io.NodeOutput:
        if method not in offered_by(NODE):
            raise ValueError(f"method must be one of {offered_by(NODE)}, got {method!r}")
        m = check_request(method, attention_weight=attention_loss,
                          has_maps=trajectory.maps is not None)
        den = make_denoiser(model, for_grad=m.optimises, clip=clip, precision=precision,
                            latent_hw=tuple(trajectory.latents.shape[-2:]) if m.optimises else None)
        check_trajectory_model(trajectory, den)  # before minutes of optimisation
        options = NullTextOptions(guidance=guidance, inner_steps=inner_steps,
                                  early_stop=early_stop, attention_weight=attention_loss)
        null = encode_empty(clip)
        if m.optimises:
            try:
                with autograd():  # ComfyUI runs nodes under inference_mode: leave it, clone
                    traj = trajectory_to(normal_copy(trajectory), den.device)
                    uncond, _ = m.run(Job(den, traj, null.clone().to(den.device), options,
                                          precision=den.precision,
                                          progress=progress_bar(traj.num_steps),
                                          check=check_interrupt,  # Cancel: every iteration
                                          on_step=loss_messages(cls.hidden.unique_id)))
            finally:
                finish_optimisation()
            uncond = dataclasses.replace(uncond, precision=den.describe())
        else:
            uncond, _ = m.run(Job(den, trajectory, null, options))
        report = uncond.report()
        log.info("[NTI] %s", report.splitlines()[0] + (f"; {report.splitlines()[1]}"
                                                       if len(report.splitlines()) > 1 else ""))
        return io.NodeOutput(uncond_to(uncond, intermediate()), report,
                             ui=loss_ui(report, uncond.first_loss, uncond.final_loss))
