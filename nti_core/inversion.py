"""DDIM inversion at guidance 1: the pivot trajectory (NTI paper §3.1, REFERENCE §1–2)."""

from __future__ import annotations

import torch
from torch import Tensor

from .hosts.base import Controller, Denoiser
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
    progress: Progress = no_progress,
) -> Trajectory:
    """z0 [1, 4, h, w] (scaled VAE mean), cond [1, L, D] → Trajectory with latents z*_0 … z*_N.

    Step j evaluates ε = ε_θ(z*_j, t_{N−1−j}, C) — the destination label, as the reference does —
    and maps level N−j to N−1−j. ``controller`` (e.g. an AttentionStore) sees step N−1−j.
    """
    check_latent(z0, "z0")
    check_context(cond, "source embedding")
    n = grid.num_steps
    latents = [z0]
    z = z0
    for j in range(n):
        i = n - 1 - j
        eps = denoiser.eps(z, grid.timesteps[i], cond, step=i, controller=controller)
        z = inversion_step(grid, j, z, eps)
        latents.append(z)
        progress(1)
    return Trajectory(
        latents=torch.cat(latents).detach(),
        grid=grid,
        prompt=prompt,
        embedding=cond.detach(),
        fingerprint=denoiser.fingerprint(),
    )
