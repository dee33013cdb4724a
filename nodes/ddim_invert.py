"""NTIDDIMInvert: the photo's latent → DDIM inversion pivot (guidance 1) and its round trip."""

from __future__ import annotations

import logging
import time

from comfy_api.latest import io

from ..nti_core.alignment import tokenize
from ..nti_core.inversion import ddim_invert
from ..nti_core.plan_spec import SOURCE
from ..nti_core.sampling import ddim_reconstruct
from ..nti_core.schedule import GRID_KINDS, make_grid
from ..nti_core.validate import check_prompt
from . import types
from .common import (
    CATEGORY,
    encode_prompt,
    family_tokenizer,
    intermediate,
    latent_in,
    latent_out,
    make_denoiser,
    progress_bar,
    queue_check,
    trajectory_to,
)

log = logging.getLogger(__name__)


class NTIDDIMInvert(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NTIDDIMInvert",
            display_name="DDIM Invert (NTI)",
            category=CATEGORY,
            description="Invert a photo's latent into the model with deterministic DDIM at "
            "guidance 1 under the source prompt: the pivot trajectory z*_0 … z*_T that "
            "Null-text optimisation and Prompt-to-Prompt sampling start from.",
            inputs=[
                io.Model.Input("model", tooltip="An SD 1.x, SD 2.x or SDXL MODEL (ε- or v-prediction; "
                               "Flux, SD3 and video models are refused)."),
                io.Clip.Input("clip", tooltip="The same checkpoint's CLIP: encodes the source "
                              "prompt."),
                io.Latent.Input("latent", tooltip="One image encoded by the checkpoint's VAE "
                                "(VAE Encode centre-crops it to a multiple of 8 px). A batch "
                                "of several images is refused."),
                io.String.Input(SOURCE.name, multiline=True, default="",
                                tooltip="Plain words describing the photo as it is. The edit "
                                "plan's source prompt must be exactly this text."),
                io.Int.Input("steps", default=50, min=1, max=1000,
                             tooltip="DDIM steps of the inversion; sampling uses the same ones "
                             "(50 as in the paper)."),
                io.Combo.Input("grid", options=list(GRID_KINDS), default="reference",
                               tooltip="Timesteps: 'reference' as the papers' diffusers DDIM, "
                               "'ddim_uniform' as ComfyUI's scheduler of that name."),
                io.Boolean.Input("record_maps", default=False,
                                 tooltip="Keep the source prompt's cross-attention maps of every "
                                 "step with the trajectory: the attention_loss of the "
                                 "optimisation nodes reads them."),
            ],
            outputs=[
                types.Trajectory.Output("trajectory", display_name="trajectory",
                                        tooltip="The inversion pivot (latents, timesteps, source "
                                        "prompt and its embedding, model fingerprint)."),
                io.Latent.Output("ddim_reconstruction", display_name="ddim_reconstruction",
                                 tooltip="The pivot sampled back at guidance 1 with the source "
                                 "prompt: shows the inversion round trip (decode to compare)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, source_prompt: str | None = None) -> bool | str:
        """Empty or over-long prompts fail when the prompt is queued, not after loading."""
        return queue_check(lambda prompt: tokenize(family_tokenizer(),
                                                   check_prompt(prompt, "source prompt")),
                           source_prompt)

    @classmethod
    def execute(cls, model, clip, latent, source_prompt: str, steps: int,
                grid: str, record_maps: bool = False) -> io.NodeOutput:
        den = make_denoiser(model, clip=clip)
        z0 = latent_in(model, latent, den.device)  # one image, else a clear error first
        cond = encode_prompt(clip, source_prompt, family_tokenizer(clip), "source prompt")
        g = make_grid(den.alphas_cumprod, steps, grid)  # type: ignore[arg-type]
        tick = progress_bar(2 * g.num_steps)
        start = time.perf_counter()
        traj = ddim_invert(den, z0, cond.to(den.device), g, source_prompt.strip(),
                           record_maps=record_maps, progress=tick)
        recon = ddim_reconstruct(den, traj, progress=tick)
        log.info("[NTI] DDIM inversion and round trip: %s, latent %dx%d, UNet attention in %s, "
                 "%.1f s", g.describe(), z0.shape[-2], z0.shape[-1], den.seen(),
                 time.perf_counter() - start)
        return io.NodeOutput(trajectory_to(traj, intermediate(), maps=True),
                             latent_out(model, recon))
