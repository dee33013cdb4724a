"""DDIM inversion at guidance 1: the pivot trajectory (NTI paper §3.1, REFERENCE §1–2)."""

from __future__ import annotations

import torch
from torch import Tensor

from .attention.controller import MapRecorder
from .attention.edits import blend_map_size
from .denoiser import Controller, Denoiser, compute_dtype
from .finite import check_finite
from .progress import Progress, no_progress
from .schedule import Grid, inversion_step
from .trajectory import Trajectory
from .validate import check_context, check_latent


@torch.no_grad()
def ddim_invert(
    denoiser: Denoiser,
    z0: Tensor,
    cond: Tensor,
    grid: Grid,
    prompt: str,
    *,
    controller: Controller | None = None,
    record_maps: bool = False,
    progress: Progress = no_progress,
) -> Trajectory:
    """z0 [1, 4, h, w] (scaled VAE mean), cond [1, L, D] → Trajectory with latents z*_0 … z*_N.

    Step j evaluates ε = ε_θ(z*_j, t_{N−1−j}, C) — the destination label, as the reference does —
    and maps level N−j to N−1−j. ``controller`` (e.g. an AttentionStore) sees step N−1−j.
    ``record_maps`` keeps the per-head cross-attention maps at a quarter of the latent side
    (``Trajectory.maps``, for the attention loss); only those layers leave the fused kernel.
    """
    check_latent(z0, "the photo's latent z0")
    check_context(cond, "source embedding")
    if record_maps and controller is not None:
        raise ValueError("record_maps brings its own controller: pass one or the other")
    hw = blend_map_size((int(z0.shape[-2]), int(z0.shape[-1])))
    recorder = MapRecorder(hw) if record_maps else None
    n = grid.num_steps
    dtype = compute_dtype(denoiser)
    latents = [z0]
    z = z0
    for j in range(n):
        i = n - 1 - j
        eps = denoiser.eps(z, grid.timesteps[i], cond, step=i, controller=controller or recorder)
        z = inversion_step(grid, j, z, eps)
        check_finite("DDIM inversion", step=j, dtype=dtype, **{"ε": eps, "the latent": z})
        latents.append(z)
        progress(1)
    maps = None
    if recorder is not None:
        if not recorder.maps:
            raise ValueError(f"this model has no cross-attention at {hw} (a quarter of the "
                             f"latent side), so there are no maps to record")
        maps = torch.stack([recorder.step_maps(n - 1 - j) for j in range(n)])
    return Trajectory(
        latents=torch.cat(latents).detach(),
        grid=grid,
        prompt=prompt,
        embedding=cond.detach(),
        fingerprint=denoiser.fingerprint(),
        maps=maps,
    )
