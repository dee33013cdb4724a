"""NTIP2PSweep: one edit over a grid of edit-plan values from one inversion → a labelled grid
image and the cells' latents (``nti_core.sweep``)."""

from __future__ import annotations

import logging
import time

import torch
from comfy_api.latest import io

from ..nti_core.family import for_embedding
from ..nti_core.images import labelled_grid
from ..nti_core.plan_spec import PER_WORD, fields_of
from ..nti_core.sweep import EXAMPLE, SWEEPABLE, plan_sweep, sample_sweep
from ..nti_core.trajectory import Trajectory, UncondEmbeddings, ValueEmbeddings
from . import types
from .common import CATEGORY, family_tokenizer, latent_out, progress_bar, uncond_to
from .p2p_sample import (
    check_inputs,
    guidance_input,
    inversion_inputs,
    sampler,
    style_and_mask_inputs,
)

log = logging.getLogger(__name__)
AXIS_HELP = (f"'field=v1,v2,…' of the plan (a fraction or a choice; {' and '.join(PER_WORD)} as "
             f"'word:v1,v2,…'), one of: {', '.join(SWEEPABLE)}.")


class NTIP2PSweep(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NTIP2PSweep",
            display_name="P2P Sweep (NTI)",
            category=CATEGORY,
            description="The plan's edit of its first target prompt over a grid of settings, "
            "from one inversion: one P2P sampling per cell, nothing optimised again.",
            inputs=[
                *inversion_inputs("The edit from Attention Edit Plan (NTI): every cell is this "
                                  "plan with the swept values; only its first target prompt is "
                                  "edited."),
                io.Vae.Input("vae", tooltip="The VAE that decodes the cells into the grid."),
                guidance_input(),
                io.String.Input("rows", default=EXAMPLE,
                                tooltip="The values down the rows, " + AXIS_HELP
                                + " Empty: one row."),
                io.String.Input("columns", default="",
                                tooltip="The values across the columns, the same way. Empty: "
                                "one column."),
                *style_and_mask_inputs(),
            ],
            outputs=[
                io.Image.Output("grid", display_name="grid",
                                tooltip="The cells decoded and laid out with the swept values "
                                "as row and column labels."),
                io.Latent.Output("latents", display_name="latents",
                                 tooltip="The cells' latents, row by row (the reconstruction is "
                                 "not among them: P2P Sample gives it)."),
            ],
        )

    @classmethod
    def execute(cls, model, trajectory: Trajectory, uncond: UncondEmbeddings,
                plan: types.EditPlan, vae, guidance: float, rows: str, columns: str,
                values: ValueEmbeddings | None = None, value_end: float = 0.5,
                mask: torch.Tensor | None = None) -> io.NodeOutput:
        check_inputs(trajectory, uncond, plan)
        tok = family_tokenizer(for_embedding(trajectory.embedding))
        cells = plan_sweep(fields_of(plan.spec), (rows, columns), tok, trajectory.num_steps)
        den, traj = sampler(model, trajectory, uncond, guidance, values)
        contexts = torch.cat([traj.embedding, plan.targets[:1].to(traj.embedding)])
        start = time.perf_counter()
        n = len(cells.plans)
        z = sample_sweep(den, traj, uncond_to(uncond, den.device), contexts, cells, tok,
                         guidance=guidance, values=values, value_end=value_end, mask=mask,
                         progress=progress_bar(n * traj.num_steps))
        log.info("[NTI] P2P sweep: %d cells × %d steps, %.1f s", n, traj.num_steps,
                 time.perf_counter() - start)
        latents = latent_out(model, z)
        images = vae.decode(latents["samples"])
        images = images.reshape(-1, *images.shape[-3:])  # [B, H, W, 3] in 0…1
        grid = labelled_grid(images.movedim(-1, 1) * 2 - 1, *cells.labels(), cells.title)
        return io.NodeOutput(torch.from_numpy(grid).float()[None] / 255, latents)
