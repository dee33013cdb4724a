"""Per-word cross-attention heatmaps of an inversion or an edit (the P2P papers' first figure;
the notebooks' ``show_cross_attention``), and the LocalBlend mask of an edit.

A run's maps travel as :class:`AttentionMaps`: per step and map size, the conditional rows'
cross-attention averaged over the layers of that size (and over heads), one row per prompt slot.
:func:`average_maps` averages a chosen step range and chosen sizes (upsampled to the largest);
:func:`word_maps` sums each word's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..alignment import Tokenized
from ..trajectory import Trajectory
from .controller import AttentionStore
from .edits import blend_map_size, latent_window

SIZE_CHOICES = ("all", "1/4", "1/2", "1/8")  # map side as a fraction of the latent side


@dataclass(frozen=True)
class AttentionMaps:
    """maps[(step, (h, w))] = [S, h, w, L] (slot 0 = source); ``mask`` = LocalBlend's last mask
    [S, 1, H, W] at latent size, None without LocalBlend; ``latent_hw`` the latent's size."""

    prompts: tuple[str, ...]
    num_steps: int
    latent_hw: tuple[int, int]
    maps: dict[tuple[int, tuple[int, int]], Tensor]
    mask: Tensor | None = None
    what: str = "edit"  # "edit" | "inversion"

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return sorted({hw for _, hw in self.maps})

    @staticmethod
    def from_store(store: AttentionStore, prompts: Sequence[str], num_steps: int,
                   latent_hw: tuple[int, int], mask: Tensor | None = None) -> AttentionMaps:
        """From a store that kept ``step_means`` during sampling."""
        maps = {}
        for hw in store.resolutions():
            for step in range(num_steps):
                rows = [store.step_mean(step, hw, s) for s in range(len(prompts))]
                if all(r is not None for r in rows):  # kept on the CPU: ~40 MB at 512²
                    maps[(step, hw)] = torch.stack(rows).cpu()  # type: ignore[arg-type]
        if not maps:
            raise ValueError("no per-step attention maps were kept in this run")
        return AttentionMaps(tuple(prompts), num_steps, tuple(latent_hw), maps,
                             None if mask is None else mask.detach().float().cpu())

    @staticmethod
    def from_trajectory(traj: Trajectory) -> AttentionMaps:
        """The inversion's recorded maps (a quarter of the latent side), as sampling steps."""
        if traj.maps is None:
            raise ValueError("this inversion has no attention maps: run DDIM Invert with "
                             "record_maps on")
        n = traj.num_steps
        lh, lw = (int(x) for x in traj.latents.shape[-2:])
        nq = traj.maps.shape[3]
        hw = blend_map_size((lh, lw))
        if hw[0] * hw[1] != nq:
            raise ValueError(f"maps of {nq} positions do not fit a {lh}×{lw} latent")
        # maps[j] were taken at z*_j, the UNet labelled step N−1−j
        maps = {(n - 1 - j, hw): traj.maps[j].float().mean((0, 1)).reshape(1, *hw, -1).cpu()
                for j in range(n)}
        return AttentionMaps((traj.prompt,), n, (lh, lw), maps, None, "inversion")


def size_of(choice: str, latent_hw: tuple[int, int]) -> list[tuple[int, int]] | None:
    """A size choice (see SIZE_CHOICES) → the map sizes it names (None = all)."""
    if choice not in SIZE_CHOICES:
        raise ValueError(f"map size must be one of {SIZE_CHOICES}, got {choice!r}")
    if choice == "all":
        return None
    hw = tuple(latent_hw)
    for _ in range({"1/2": 1, "1/4": 2, "1/8": 3}[choice]):
        hw = ((hw[0] + 1) // 2, (hw[1] + 1) // 2)
    return [hw]  # type: ignore[list-item]


def step_range(num_steps: int, start: float, end: float) -> range:
    """Fractions [start, end] of the steps (0 = noisiest) → step indices, at least one."""
    for name, v in (("step_start", start), ("step_end", end)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be a fraction in [0, 1], got {v}")
    if start > end:
        raise ValueError(f"step_start ({start}) is after step_end ({end})")
    lo = min(int(start * num_steps), num_steps - 1)
    return range(lo, max(lo + 1, round(end * num_steps)))


def average_maps(am: AttentionMaps, slot: int, sizes: list[tuple[int, int]] | None,
                 steps: range) -> Tensor:
    """Mean over ``steps`` and ``sizes`` of slot's maps → [h, w, L] at the largest chosen size."""
    if not 0 <= slot < len(am.prompts):
        raise ValueError(f"row {slot} is not in this run: it has rows 0 (source) to "
                         f"{len(am.prompts) - 1}")
    chosen = am.sizes if sizes is None else [tuple(s) for s in sizes]
    missing = [s for s in chosen if s not in am.sizes]
    if missing:
        raise ValueError(f"no maps of size {missing[0]} in this {am.what}; it has "
                         f"{am.sizes}")
    out_hw = max(chosen, key=lambda s: s[0] * s[1])
    per_size = []
    for hw in chosen:
        got = [am.maps[(i, hw)][slot] for i in steps if (i, hw) in am.maps]
        if not got:
            continue
        m = torch.stack(got).mean(0).permute(2, 0, 1)[None]  # [1, L, h, w]
        per_size.append(F.interpolate(m, size=out_hw, mode="bilinear", align_corners=False)[0])
    if not per_size:
        raise ValueError(f"no maps in steps {steps.start}…{steps.stop - 1} of this {am.what}")
    return torch.stack(per_size).mean(0).permute(1, 2, 0)


def photo_window(photo_hw: tuple[int, int], latent_hw: tuple[int, int]
                 ) -> tuple[slice, slice]:
    """The rows and columns of a photo [H, W] that the maps' latent covers (all of a decoded
    latent; the centre VAE Encode kept of a side not a multiple of 8), refused when the photo
    has another shape."""
    window = latent_window(tuple(photo_hw), tuple(latent_hw))  # type: ignore[arg-type]
    if window is None:
        (big_h, big_w), (h, w) = photo_hw, latent_hw
        raise ValueError(f"the image is {big_w}×{big_h} pixels (width×height) but the maps are "
                         f"of a {w}×{h} latent: connect the image that VAE Encode encoded (after "
                         "any scaling or cropping) or the decoded latents")
    f, top, left = window
    return slice(top, top + f * latent_hw[0]), slice(left, left + f * latent_hw[1])


def mask_at(mask: Tensor | None, photo_hw: tuple[int, int], latent_hw: tuple[int, int]
            ) -> Tensor:
    """One row's LocalBlend mask [1, 1, h, w] → [1, H, W] at the photo's size (all ones when
    None): upsampled (nearest) onto the part the latent covers, its edge repeated into the rows
    and columns VAE Encode cropped."""
    if mask is None:
        return torch.ones(1, *photo_hw)
    rows, cols = photo_window(photo_hw, latent_hw)
    m = F.interpolate(mask.float(), size=(rows.stop - rows.start, cols.stop - cols.start),
                      mode="nearest")
    pad = (cols.start, photo_hw[1] - cols.stop, rows.start, photo_hw[0] - rows.stop)
    return F.pad(m, pad, mode="replicate")[:, 0]


def word_maps(avg: Tensor, toks: Tokenized) -> tuple[Tensor, list[str]]:
    """[h, w, L] → one map per word of the prompt (its tokens summed) [n, h, w], and the words."""
    maps = [avg[..., a:b].sum(-1) for a, b in toks.spans]
    return torch.stack(maps), list(toks.words)
