"""NTIStyleInvert: StyleDiffusion's value-embedding inversion — per-step mapping networks from the
photo's CLIP-vision tokens to the conditional cross-attention's values."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from comfy_api.latest import io

from ..nti_core.hosts.comfy import autograd, check_interrupt
from ..nti_core.methods import Job, check_request, offered_by
from ..nti_core.null_text import check_trajectory_model
from ..nti_core.style import VARIANTS, StyleOptions, check_image_tokens
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
    rgb_image,
    trajectory_to,
    uncond_to,
)

log = logging.getLogger(__name__)

NODE = "NTIStyleInvert"
(METHOD,) = offered_by(NODE)


def vision_tokens(clip_vision: Any, image: torch.Tensor) -> tuple[torch.Tensor, str]:
    """E(x) [1, n, W] from ComfyUI's CLIP_VISION: every token after the final layer norm (the
    official code's ln_post(x)); SigLIP already applies it. Other encoders are refused; the
    image must be one (RGBA and greyscale are made RGB: ``rgb_image``)."""
    image = rgb_image(image, "StyleDiffusion Invert's image")
    if image.shape[0] != 1:
        raise ValueError(f"StyleDiffusion Invert takes one image (the photo that was inverted), "
                         f"got a batch of {image.shape[0]}: pick it with ImageFromBatch")
    vision = getattr(getattr(clip_vision, "model", None), "vision_model", None)
    if vision is None or not hasattr(vision, "post_layernorm"):
        raise ValueError(f"StyleDiffusion needs a CLIP or SigLIP vision encoder (CLIPVisionLoader: "
                         f"ViT-L/14, ViT-H/14, ViT-bigG, SigLIP); got "
                         f"{type(getattr(clip_vision, 'model', clip_vision)).__name__}")
    out = clip_vision.encode_image(image, crop=True)
    x = out["last_hidden_state"]
    if not getattr(vision, "output_layernorm", False):
        x = vision.post_layernorm(x.to(next(vision.parameters()).device,
                                       next(vision.parameters()).dtype))
    tokens = x.float().to(intermediate())
    check_image_tokens(tokens)
    return tokens, f"CLIP vision {getattr(clip_vision, 'image_size', '?')} px"


class NTIStyleInvert(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            display_name="StyleDiffusion Invert (NTI)",
            category=CATEGORY,
            description="StyleDiffusion (Li et al.): learn, per step, the values of the "
            "conditional cross-attention from the photo (a mapping network on CLIP-vision "
            "tokens), keys staying on the source prompt, so that guided sampling retraces the "
            "pivot. ∅ stays the empty prompt's. Edit with P2P Sample's values input.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL the trajectory was inverted with."),
                io.Clip.Input("clip", tooltip="Its CLIP (encodes the empty prompt for ∅)."),
                io.ClipVision.Input("clip_vision", tooltip="The image encoder E, from Load CLIP "
                                    "Vision (the paper used CLIP ViT-B/16; ComfyUI loads "
                                    "ViT-L/14, ViT-H/14, bigG and SigLIP)."),
                io.Image.Input("image", tooltip="The photo that was inverted, one image (encoded "
                               "by E, centre-cropped as CLIP does; RGBA loses its alpha, "
                               "greyscale is made RGB)."),
                types.Trajectory.Input("trajectory", tooltip="The pivot from DDIM Invert (NTI) "
                                       "with record_maps on when attention_loss > 0."),
                io.Float.Input("guidance", default=7.5, min=1.0, max=30.0, step=0.1,
                               tooltip="Classifier-free guidance the values are learned for."),
                io.Int.Input("inner_steps", default=100, min=1, max=1000,
                             tooltip="K: step i runs at most ⌈K·e^(−0.1·i)⌉ Adam iterations "
                             "(the official code: 100)."),
                io.Float.Input("attention_loss", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="λ of the attention loss (the official code: 1; needs "
                               "record_maps on DDIM Invert); 0 = latent loss only."),
                io.Combo.Input("variant", options=list(VARIANTS), default="official",
                               tooltip="'official': a scale and shift of the prompt embedding "
                               "(the official code); 'paper': values from the image alone."),
                precision_input(),
            ],
            outputs=[
                types.Values.Output("values", display_name="values",
                                    tooltip="Per-step value embeddings, for P2P Sample (NTI) "
                                    "and Save Inversion (NTI)."),
                types.Uncond.Output("uncond", display_name="uncond",
                                    tooltip="∅ = the empty prompt at every step (what "
                                    "StyleDiffusion samples with)."),
                io.String.Output("report", display_name="report",
                                 tooltip="Per-step iterations and losses (first → last)."),
            ],
            hidden=[io.Hidden.unique_id],  # the loss messages name the node
        )

    @classmethod
    def execute(cls, model, clip, clip_vision, image, trajectory: Trajectory, guidance: float,
                inner_steps: int, attention_loss: float, variant: str,
                precision: str = "auto") -> io.NodeOutput:
        options = StyleOptions(guidance=guidance, inner_steps=inner_steps,
                               attention_weight=attention_loss, variant=variant)  # type: ignore[arg-type]
        m = check_request(METHOD, attention_weight=attention_loss,
                          has_maps=trajectory.maps is not None)
        den = make_denoiser(model, for_grad=True, clip=clip, precision=precision,
                            latent_hw=tuple(trajectory.latents.shape[-2:]))
        check_trajectory_model(trajectory, den)  # before minutes of optimisation
        tokens, encoder = vision_tokens(clip_vision, image)
        null = encode_empty(clip)
        try:
            with autograd():
                traj = trajectory_to(normal_copy(trajectory), den.device)
                uncond, values = m.run(Job(
                    den, traj, null.clone().to(den.device), style=options,
                    image_tokens=tokens.clone().to(den.device), encoder=encoder,
                    precision=den.precision, progress=progress_bar(traj.num_steps),
                    check=check_interrupt, on_step=loss_messages(cls.hidden.unique_id)))
        finally:
            finish_optimisation()
        assert values is not None
        values = dataclasses.replace(
            values, shift=values.shift.to(intermediate()),
            scale=None if values.scale is None else values.scale.to(intermediate()),
            precision=den.describe())
        uncond = uncond_to(uncond, intermediate())
        report = values.report()
        log.info("[NTI] %s", "; ".join(report.splitlines()[:2]))
        return io.NodeOutput(values, uncond, report,
                             ui=loss_ui(report, values.first_loss, values.final_loss))
