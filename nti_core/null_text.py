"""Null-text optimisation (Mokady et al. 2023, Algorithm 1, and a fast mode of it), negative-prompt
inversion and Direct Inversion's ∅.

Notation: ∅_i = unconditional embedding of step i (i = 0 is the noisiest), w = guidance,
z̄ = the latent being walked down, z* = the pivot trajectory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention.controller import MapRecorder
from .attention.edits import blend_map_size
from .denoiser import Denoiser, Rows, compute_dtype, guided, same_model
from .finite import check_finite
from .methods import DIRECT, NEGATIVE_PROMPT, NULL_TEXT, NULL_TEXT_FAST
from .precision import LossScaler, Precision, dtype_key
from .progress import Progress, StepLoss, no_progress, no_step_loss
from .schedule import sample_step
from .trajectory import Trajectory, UncondEmbeddings, stack
from .validate import check_context

UNCOND_ROW = Rows.make([False], [0])  # the ∅ pass, labelled as such for the map recorder


@dataclass(frozen=True)
class NullTextOptions:
    """Constants of the reference (REFERENCE §3)."""

    guidance: float = 7.5
    inner_steps: int = 10
    early_stop: float = 1e-5  # stop when loss < early_stop + i · early_stop_slope
    early_stop_slope: float = 2e-5
    lr: float = 1e-2  # lr_i = lr · (1 − i / lr_decay_steps)
    lr_decay_steps: float = 100.0
    attention_weight: float = 0.0  # λ of the attention loss (0 = the reference, bit for bit)
    fast: bool = False  # the fast mode (see null_text_optimize); False = the reference

    @property
    def method(self) -> str:
        return NULL_TEXT_FAST if self.fast else NULL_TEXT

    def __post_init__(self) -> None:
        if not self.guidance > 0:
            raise ValueError(f"guidance must be positive, got {self.guidance}")
        if not isinstance(self.inner_steps, int) or self.inner_steps < 1:
            raise ValueError(f"inner iterations must be a positive integer, got {self.inner_steps!r}")
        if self.early_stop < 0 or self.lr <= 0:
            raise ValueError(f"early stop must be ≥ 0 and lr > 0, got {self.early_stop}, {self.lr}")
        if not self.attention_weight >= 0:
            raise ValueError(f"attention loss weight must be ≥ 0, got {self.attention_weight}")


def attention_loss(maps: Tensor, target: Tensor) -> Tensor:
    """Σ over layers of the MSE between per-head maps [layers, heads, Nq, L] (StyleDiffusion's
    ``attn_loss``: one ``mse_loss`` per layer, summed)."""
    if maps.shape != target.shape:
        raise ValueError(f"attention maps {tuple(maps.shape)} do not match the recorded "
                         f"{tuple(target.shape)}")
    return (maps.float() - target.to(maps.device, torch.float32)).pow(2).mean(dim=(1, 2, 3)).sum()


def check_trajectory_model(traj: Trajectory, denoiser: Denoiser) -> None:
    """Refuse a trajectory made with other weights."""
    if not same_model(traj.fingerprint, denoiser.fingerprint()):
        raise ValueError(
            "this inversion was made with a different model: invert the image again with this "
            "model (or load the model it was made with)"
        )


def attention_recorder(traj: Trajectory, branch: bool) -> MapRecorder:
    """The recorder the attention loss reads (maps of ``branch`` at a quarter of the latent side,
    graph kept); refuses an inversion without maps, before any work."""
    traj.loss_maps(0)
    return MapRecorder(blend_map_size(tuple(traj.latents.shape[-2:])), branch=branch, detach=False)


@dataclass
class StepFit:
    """One step's optimisation: first and last loss, iterations (UNet passes with a loss),
    last attention loss, and the guided ε of the last pass when no update followed it."""

    first: float
    final: float
    iterations: int
    attention: float | None
    eps: Tensor | None = None


def check_precision(denoiser: Denoiser, precision: Precision | None) -> None:
    """The denoiser must compute in the dtype the precision resolved to (set up by the host)."""
    dtype = compute_dtype(denoiser)
    if precision is not None and dtype is not None and dtype != precision.compute:
        raise ValueError(f"the denoiser computes in {dtype} but the precision asks for "
                         f"{precision.compute}: build it with that precision")


def loss_scaler(denoiser: Denoiser) -> LossScaler:
    """Dynamic loss scaling when the optimisation's UNet passes compute in fp16 (the gradient of
    a latent MSE of ~1e-5 underflows there), a plain backward otherwise (precision module)."""
    return LossScaler(enabled=compute_dtype(denoiser) == torch.float16)


def fit_step(
    guided_eps: Callable[[], Tensor],
    params: list[Tensor],
    *,
    traj: Trajectory,
    i: int,
    z: Tensor,
    lr: float,
    budget: int,
    threshold: float,
    recorder: MapRecorder | None = None,
    attention_weight: float = 0.0,
    check: Callable[[], None] = lambda: None,
    stop_before_update: bool = False,
    scaler: LossScaler | None = None,
    stage: str = "null-text optimisation",
    dtype: torch.dtype | None = None,
) -> StepFit:
    """The reference's inner loop at step i, shared by null-text and StyleDiffusion: fresh Adam
    on ``params``; at most ``budget`` times loss = MSE(DDIM(z̄, guided_eps()), z*_{N−1−i})
    (+ λ·attention loss on what ``recorder`` saw), one Adam step; stop once loss < threshold.

    ``stop_before_update`` (the fast mode) tests the loss before the Adam step instead of after
    it: a pass below the threshold ends the loop with ``params`` as they were evaluated, and
    its guided ε is returned in ``StepFit.eps`` so the caller need not compute it again.

    The loss is fp32 whatever the UNet computes in; ``scaler`` (fp16: dynamic loss scaling)
    runs the backward and skips the Adam step of an iteration whose gradients overflowed. A
    non-finite loss stops the run naming ``stage``, the step and ``dtype``'s likely cause."""
    n = traj.num_steps
    target = traj.latents[n - 1 - i : n - i].float()
    opt = torch.optim.Adam(params, lr=lr)
    scaler = scaler or LossScaler(enabled=False)
    first, a_loss, kept = 0.0, None, None
    for k in range(budget):
        check()
        if recorder is not None:
            recorder.maps.clear()
        eps = guided_eps()
        loss = F.mse_loss(sample_step(traj.grid, i, z, eps.float()), target)
        if recorder is not None:
            a_loss = attention_loss(recorder.step_maps(i), traj.loss_maps(i))
            loss = loss + attention_weight * a_loss
        value = loss.item()
        if not math.isfinite(value):
            check_finite(stage, step=i, dtype=dtype, loss=loss)
        if k == 0:
            first = value
        if stop_before_update and value < threshold:
            kept = eps.detach()
            break
        opt.zero_grad(set_to_none=True)
        if scaler.backward(loss, params):
            opt.step()
        if value < threshold:
            break
    return StepFit(first, value, k + 1, None if a_loss is None else a_loss.item(), kept)


def null_text_optimize(
    denoiser: Denoiser,
    traj: Trajectory,
    null_embedding: Tensor,
    options: NullTextOptions = NullTextOptions(),
    *,
    progress: Progress = no_progress,
    check: Callable[[], None] = lambda: None,
    precision: Precision | None = None,
    on_step: StepLoss = no_step_loss,
) -> UncondEmbeddings:
    """Per-step ∅_i [N, L, D] that make CFG sampling at guidance w retrace the pivot.

    At step i: ε_c = ε(z̄, t_i, C) once; K times: ε = ε_∅ + w(ε_c − ε_∅) (or the host's own
    guidance, ``guided``: ∅ is fitted under what sampling then applies), z̃ = DDIM(z̄, ε),
    loss = MSE(z̃, z*_{N−1−i}), Adam on ∅ (fresh, lr_i); then z̄ ← DDIM with ∅_i. ``progress`` is
    told once per step; ``check`` runs before every inner iteration and may raise to cancel;
    ``on_step`` gets each step's first and final loss as soon as its iterations end.

    With ``options.attention_weight`` λ > 0 the loss adds λ·Σ_layers MSE(A_∅, A*_i): the
    unconditional pass's per-head cross-attention at a quarter of the latent side against the
    source prompt's maps recorded at inversion (``Trajectory.loss_maps``) — the only maps ∅
    moves. λ = 0 runs exactly the reference loop (no map is materialised).

    ``options.fast`` (method "null-text-fast") changes three things and keeps every constant:
    ∅ starts from the source prompt's embedding C (negative-prompt inversion, where ε_∅ = ε_c
    and the guided step is the conditional one) instead of ""; the early stop is tested before
    the Adam step, so a step whose ∅ already meets the threshold costs one pass and no
    backward; and z̄ advances with the ε of that pass (or, when the budget runs out, with one
    more unconditional pass and the step's ε_c) instead of a fresh two-row CFG call.

    ``precision`` (``nti_core.precision``) is what the host's ``denoiser`` was built for: its
    UNet passes compute in ``precision.compute`` (checked), ∅, Adam and the loss stay fp32,
    fp16 runs with loss scaling; the report names it.
    """
    check_context(null_embedding, "null embedding")
    check_precision(denoiser, precision)
    if null_embedding.shape[1:] != traj.embedding.shape[1:]:
        raise ValueError(
            f"null embedding {tuple(null_embedding.shape)} does not match the source "
            f"embedding {tuple(traj.embedding.shape)}"
        )
    o = options
    grid, n, cond = traj.grid, traj.num_steps, traj.embedding
    recorder = attention_recorder(traj, branch=False) if o.attention_weight > 0 else None
    scaler, dtype, stage = loss_scaler(denoiser), compute_dtype(denoiser), "null-text optimisation"
    map_err: list[float] = []
    z = traj.latents[n : n + 1].float()
    start = traj.embedding if o.fast else null_embedding
    uncond = start.detach().float().clone()
    out: list[Tensor] = []
    first: list[float] = []
    final: list[float] = []
    iters: list[int] = []
    clock = time.perf_counter()
    for i in range(n):
        t = grid.timesteps[i]
        with torch.no_grad():
            eps_c = denoiser.eps(z, t, cond, step=i)
        check_finite(stage, step=i, dtype=dtype, **{"the source prompt's ε": eps_c})
        uncond = uncond.detach().clone().requires_grad_(True)

        def guided_eps(z=z, t=t, i=i, eps_c=eps_c, uncond=uncond) -> Tensor:
            if recorder is None:  # λ = 0: exactly the reference's call
                eps_u = denoiser.eps(z, t, uncond, step=i)
            else:
                eps_u = denoiser.eps(z, t, uncond, rows=UNCOND_ROW, step=i, controller=recorder)
            return guided(denoiser, z, t, eps_u, eps_c, o.guidance, cond=cond, uncond=uncond)

        fit = fit_step(guided_eps, [uncond], traj=traj, i=i, z=z,
                       lr=o.lr * (1.0 - i / o.lr_decay_steps), budget=o.inner_steps,
                       threshold=o.early_stop + i * o.early_stop_slope, recorder=recorder,
                       attention_weight=o.attention_weight, check=check,
                       stop_before_update=o.fast, scaler=scaler, stage=stage, dtype=dtype)
        first.append(fit.first)
        final.append(fit.final)
        iters.append(fit.iterations)
        on_step(i, n, fit.first, fit.final)
        if fit.attention is not None:
            map_err.append(fit.attention)
        uncond = uncond.detach()
        out.append(uncond)
        with torch.no_grad():
            if o.fast:  # the ε of the pass that met the threshold, or ε_∅ once more
                eps = fit.eps
                if eps is None:
                    eps_u = denoiser.eps(z, t, uncond, step=i)
                    eps = guided(denoiser, z, t, eps_u, eps_c, o.guidance, cond=cond,
                                 uncond=uncond)
            else:  # one batched CFG call, as the reference (parity to 1e-5)
                eps_u, eps_c = denoiser.eps(
                    torch.cat([z, z]), t, torch.cat([uncond, cond]), rows=Rows.cfg(1), step=i
                ).chunk(2)
                eps = guided(denoiser, z, t, eps_u, eps_c, o.guidance, cond=cond, uncond=uncond)
            z = sample_step(grid, i, z, eps)
        check_finite(stage, step=i, dtype=dtype, **{"the guided ε": eps, "the latent": z})
        progress(1)
    return UncondEmbeddings(
        embeddings=stack(out),
        method=o.method,
        guidance=o.guidance,
        final_loss=final,
        first_loss=first,
        iterations=iters,
        seconds=time.perf_counter() - clock,
        attention_weight=o.attention_weight,
        attention_loss=map_err,
        precision="" if precision is None else precision.describe(),
        skipped=scaler.skipped,
        compute=dtype_key(dtype),
    )


def negative_prompt_inversion(traj: Trajectory, guidance: float = 7.5) -> UncondEmbeddings:
    """NPI (Miyake et al. 2023): ∅_i := C for every step — no optimisation."""
    emb = traj.embedding.detach().expand(traj.num_steps, -1, -1).clone()
    return UncondEmbeddings(embeddings=emb, method=NEGATIVE_PROMPT, guidance=guidance)


def direct_inversion(traj: Trajectory, null_embedding: Tensor,
                     guidance: float = 7.5) -> UncondEmbeddings:
    """Direct Inversion (Ju et al. 2024, "PnP Inversion"): no optimisation; ∅ = "" at every
    step, and ``p2p_sample`` puts the source row back on the pivot after every step."""
    return replace(plain_null(traj, null_embedding, guidance), method=DIRECT)


def plain_null(traj: Trajectory, null_embedding: Tensor, guidance: float = 7.5) -> UncondEmbeddings:
    """The un-inverted baseline: ∅ = embedding of "" at every step."""
    emb = null_embedding.detach().expand(traj.num_steps, -1, -1).clone()
    return UncondEmbeddings(embeddings=emb, method="null", guidance=guidance)
