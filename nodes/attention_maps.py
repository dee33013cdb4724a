"""NTIAttentionMaps: per-word cross-attention heatmaps of an edit or an inversion over the photo,
and the edit's LocalBlend mask."""

from __future__ import annotations

import functools

import torch
from comfy_api.latest import io

from ..nti_core.alignment import tokenize
from ..nti_core.attention.maps import (
    SIZE_CHOICES,
    AttentionMaps,
    average_maps,
    mask_at,
    photo_window,
    size_of,
    step_range,
    word_maps,
)
from ..nti_core.images import heatmap_grid
from ..nti_core.trajectory import Trajectory
from . import types
from .common import CATEGORY, family_tokenizer, queue_check, rgb_image


def pick_maps(attention: AttentionMaps | None, trajectory: Trajectory | None) -> AttentionMaps:
    if (attention is None) == (trajectory is None):
        raise ValueError("connect exactly one of 'attention' (from P2P Sample: the maps of an "
                         "edit) or 'trajectory' (from DDIM Invert with record_maps: the maps "
                         "of the inversion)")
    return attention if attention is not None else AttentionMaps.from_trajectory(trajectory)


def render(am: AttentionMaps, photo: torch.Tensor, row: int, sizes: str, step_start: float,
           step_end: float) -> tuple[torch.Tensor, torch.Tensor]:
    """→ (grid IMAGE [1, H', W', 3] in [0, 1], MASK [1, H, W] at the photo's size). ``photo``:
    one image, or one per row of the run (the decoded latents of P2P Sample: row ``row``'s)."""
    photo = rgb_image(photo, "Attention Maps' image")
    if photo.shape[0] not in (1, len(am.prompts)):
        raise ValueError(f"Attention Maps draws on one image, got a batch of {photo.shape[0]} "
                         f"for a run of {len(am.prompts)} rows: connect the photo, or the "
                         "decoded latents of this P2P Sample (one image per row)")
    steps = step_range(am.num_steps, step_start, step_end)
    avg = average_maps(am, row, size_of(sizes, am.latent_hw), steps)  # checks the row
    prompt = am.prompts[row]
    maps, words = word_maps(avg, tokenize(family_tokenizer(), prompt))
    image = photo[row if photo.shape[0] > 1 else 0]
    hw = (int(image.shape[0]), int(image.shape[1]))
    rows, cols = photo_window(hw, am.latent_hw)  # the part the latent covers, else refused
    x = image[rows, cols].permute(2, 0, 1)[None].float() * 2 - 1
    who = "source" if row == 0 else f"target {row}"
    title = (f"{am.what} · {who}: '{prompt}' · steps {steps.start}-{steps.stop - 1} of "
             f"{am.num_steps} · maps {sizes}")
    grid = torch.from_numpy(heatmap_grid(x, maps, words, title)).float()[None] / 255
    return grid, mask_at(None if am.mask is None else am.mask[row : row + 1], hw, am.latent_hw)


class NTIAttentionMaps(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        frac = {"min": 0.0, "max": 1.0, "step": 0.01}
        return io.Schema(
            node_id="NTIAttentionMaps",
            display_name="Attention Maps (NTI)",
            category=CATEGORY,
            description="Where each word of a prompt looks: its cross-attention averaged over "
            "the chosen steps and map sizes, over the photo (the Prompt-to-Prompt papers' first "
            "figure), and the LocalBlend mask of the edit.",
            inputs=[
                io.Image.Input("image", tooltip="Drawn under the maps: the photo VAE Encode "
                               "encoded, or the decoded latents of P2P Sample (one image per "
                               "row: the chosen row's is drawn). RGBA loses its alpha, "
                               "greyscale is made RGB."),
                types.Attention.Input("attention", optional=True,
                                      tooltip="The maps of an edit, from P2P Sample (NTI)."),
                types.Trajectory.Input("trajectory", optional=True,
                                       tooltip="Or the maps of an inversion, from DDIM Invert "
                                       "(NTI) with record_maps on."),
                io.Int.Input("row", default=0, min=0, max=64,
                             tooltip="0 = the source prompt; k = the k-th target prompt."),
                io.Combo.Input("sizes", options=list(SIZE_CHOICES), default="1/4",
                               tooltip="Map sizes averaged, as a fraction of the latent side: "
                               "'1/4' is what LocalBlend reads, 'all' every stored size."),
                io.Float.Input("step_start", default=0.0, **frac,
                               tooltip="First step averaged (fraction; 0 = noisiest)."),
                io.Float.Input("step_end", default=1.0, **frac,
                               tooltip="Last step averaged (fraction)."),
            ],
            outputs=[
                io.Image.Output("maps", display_name="maps",
                                tooltip="One heatmap per word, labelled (brighter = more "
                                "attention, each map scaled to its own maximum)."),
                io.Mask.Output("mask", display_name="mask",
                               tooltip="The row's LocalBlend mask at the last step (1 = may "
                               "change); all ones without LocalBlend."),
            ],
        )

    @classmethod
    def validate_inputs(cls, step_start: float | None = None,
                        step_end: float | None = None) -> bool | str:
        """Fractions in order when the prompt is queued, before the sampling they follow."""
        return queue_check(functools.partial(step_range, 1), step_start, step_end)

    @classmethod
    def execute(cls, image, row: int, sizes: str, step_start: float, step_end: float,
                attention: AttentionMaps | None = None,
                trajectory: Trajectory | None = None) -> io.NodeOutput:
        am = pick_maps(attention, trajectory)
        grid, mask = render(am, image, row, sizes, step_start, step_end)
        return io.NodeOutput(grid, mask)
