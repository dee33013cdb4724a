"""Classifier-free-guided DDIM sampling from the pivot, with Prompt-to-Prompt control (REFERENCE §5)."""

from __future__ import annotations

import torch
from torch import Tensor

from .denoiser import Controller, Denoiser, Rows, compute_dtype, guided
from .finite import check_finite
from .progress import Progress, no_progress
from .schedule import sample_step
from .trajectory import Trajectory, UncondEmbeddings, ValueEmbeddings
from .validate import check_context


@torch.no_grad()
def p2p_sample(
    denoiser: Denoiser,
    traj: Trajectory,
    uncond: UncondEmbeddings,
    contexts: Tensor,
    *,
    guidance: float | None = None,
    controller: Controller | None = None,
    values: ValueEmbeddings | None = None,
    value_end: float = 0.5,
    progress: Progress = no_progress,
) -> Tensor:
    """Source and targets as one batch from z*_T → latents [S, 4, h, w] (row 0 = reconstruction).

    contexts [S, L, D]: slot 0 = the source prompt, 1… = targets. Each step runs rows
    [∅_i × S | contexts] (branch-labelled), ε = ε_∅ + w(ε_c − ε_∅) (or the host's own
    guidance, ``guided``), DDIM, then ``controller.after_step`` (LocalBlend). ``guidance`` defaults to the one ∅ was optimised for.

    Direct Inversion (``uncond.direct``, PnP Inversion, Ju et al. 2024): after each
    step's DDIM update and before ``after_step``, the source row is put back on the pivot,
    z_0 ← z*_{N−1−i}; targets are untouched. The official code adds offset_i = z*_{N−1−i} −
    DDIM(z*_{N−i}, ε) computed in a pass of its own; that pass sees the same input, prompts and
    ε as the source row here (no edit touches slot 0), so the sum is z*_{N−1−i} up to rounding
    — written directly, without the extra pass (checked against a transcription in the tests).

    ``values`` (StyleDiffusion): the conditional cross-attention reads its values from them —
    always on the source row, on target rows while i < τ_v·N (``value_end`` = τ_v; the official
    code's ``v_replace_steps``), then from the target's own prompt embedding.
    """
    check_context(contexts, "prompt embeddings", batch=None)
    if uncond.num_steps != traj.num_steps:
        raise ValueError(
            f"the unconditional embeddings have {uncond.num_steps} steps but the inversion has "
            f"{traj.num_steps}: optimise them on this inversion"
        )
    if values is not None:
        values.check_for(traj)
        if not 0.0 <= value_end <= 1.0:
            raise ValueError(f"τ_v (value_end) must be a fraction in [0, 1], got {value_end}")
        if values.shift.shape[1:] != contexts.shape[1:]:
            raise ValueError(f"value embeddings {tuple(values.shift.shape[1:])} do not match the "
                             f"prompt embeddings {tuple(contexts.shape[1:])}")
    w = uncond.guidance if guidance is None else guidance
    dtype = compute_dtype(denoiser)
    s, n = contexts.shape[0], traj.num_steps
    grid = traj.grid
    rows = Rows.cfg(s, device=contexts.device)
    z = traj.z_T.expand(s, -1, -1, -1).clone()
    for i in range(n):
        null = uncond.at(i).to(contexts).expand(s, -1, -1)
        ctx = torch.cat([null, contexts])
        vctx = None
        if values is not None:
            learned = values.values(i, contexts)
            if not i < value_end * traj.num_steps:  # targets back on their own prompt
                learned = torch.cat([learned[:1], contexts[1:]])
            vctx = torch.cat([null, learned])
        eps = denoiser.eps(
            torch.cat([z, z]), grid.timesteps[i], ctx,
            rows=rows, step=i, controller=controller, value_context=vctx,
        )
        eps_u, eps_c = eps.chunk(2)
        t = grid.timesteps[i]
        z = sample_step(grid, i, z, guided(denoiser, z, t, eps_u, eps_c, w, cond=contexts,
                                           uncond=null))
        check_finite("P2P sampling", step=i, dtype=dtype, **{"ε": eps, "the latent": z})
        if uncond.direct:
            z[0] = traj.latents[n - 1 - i].to(z)
        if controller is not None:
            z = controller.after_step(i, z)
        progress(1)
    return z


@torch.no_grad()
def ddim_reconstruct(
    denoiser: Denoiser, traj: Trajectory, *, progress: Progress = no_progress
) -> Tensor:
    """The pivot sampled back from z*_T at guidance 1 with the source prompt → z [1, 4, h, w].

    The inversion's round trip (one UNet row per step, no unconditional branch): it differs
    from z*_0 only by DDIM's step error, which guidance > 1 then amplifies (NTI paper §3.1).
    """
    grid, z = traj.grid, traj.z_T.clone()
    dtype = compute_dtype(denoiser)
    for i in range(traj.num_steps):
        eps = denoiser.eps(z, grid.timesteps[i], traj.embedding, step=i)
        z = sample_step(grid, i, z, eps)
        check_finite("DDIM reconstruction", step=i, dtype=dtype, **{"ε": eps, "the latent": z})
        progress(1)
    return z
