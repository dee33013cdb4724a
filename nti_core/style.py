"""StyleDiffusion (Li, van de Weijer et al.): prompt-embedding inversion into the cross-attention
*values* (REFERENCE §6; behaviour read from sen-mao/StyleDiffusion's ``stylediffusion.py``).

An image encoder E gives the photo's tokens E(x) [n, W] once. At every step t a mapping network
M_t turns them into the value input of the conditional branch's cross-attention; the keys keep
the source prompt's embedding c, the unconditional branch keeps "" untouched. Two variants:

- ``official`` (the code): M_t(E(x)) = [s; b] of 2·77 rows and c̃_t = s ⊙ c + b, where c is the
  embedding of the row's own prompt — so in an edit the target rows get s ⊙ c_tgt + b;
- ``paper`` (Table 1): c̃_t = M_t(E(x)), 77 rows, the same for every prompt.
Both: 1×1 Conv1d over tokens (n → rows), [Conv1d, BatchNorm1d (always on batch statistics, as
the code leaves it in train mode), LeakyReLU], Conv1d; PyTorch's default initialisation, seeded.

Optimisation per step i (0 = noisiest) as the official code runs it: ε_∅ = ε(z̄, t_i, "") once;
K_i = ⌈K·e^{−0.1·i}⌉ Adam iterations (lr 1e-2·(1 − i/100), default betas) on M_i, which starts
from M_{i−1}; loss = MSE(DDIM(z̄, ε_∅ + w(ε_c̃ − ε_∅)), z*_{N−1−i}) + λ·Σ_layers MSE(A_c̃, A*),
A = the conditional pass's per-head cross-attention at a quarter of the latent side, A* the
maps recorded at inversion (``Trajectory.loss_maps``); early stop below 1e-5 + i·2e-5; then
z̄ ← DDIM with c̃_i, from ε_c̃ and the step's ε_∅ (the code runs the two branches as separate calls
and recomputes ε_∅ at the same z̄, t and "": the same value, computed once here). The paper's alternatives (Adam β = (0, 0.999), N(0, 0.01) weights) are not
what its code runs, so they are not used.

Other encoders than CLIP ViT-B/16 (197 tokens × 768): the first Conv1d takes their token count;
a width W ≠ the text width D gets a Linear(W → D) first (not in the paper, where W = D = 768).

SDXL (embeddings of 77 token states + 1 pooled row, see :mod:`nti_core.family`): M_t produces
the values of the 77 token states, what cross-attention reads; the pooled row of c̃_t is zero
(scale and shift padded with a zero row), as the pooled vector feeds the UNet's vector input,
not the values.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .denoiser import Denoiser, compute_dtype, guided
from .family import TOKENS
from .finite import check_finite
from .null_text import (
    UNCOND_ROW,
    attention_recorder,
    check_precision,
    check_trajectory_model,
    fit_step,
    loss_scaler,
)
from .precision import Precision, dtype_key
from .progress import Progress, StepLoss, no_progress, no_step_loss
from .schedule import sample_step
from .trajectory import Trajectory, ValueEmbeddings, pivot_fingerprint
from .validate import check_context

Variant = Literal["official", "paper"]
VARIANTS: tuple[Variant, ...] = ("official", "paper")


@dataclass(frozen=True)
class StyleOptions:
    """Constants of the official code (its defaults and README)."""

    guidance: float = 7.5
    inner_steps: int = 100  # K: step i runs at most ⌈K·e^{−decay·i}⌉ iterations
    inner_decay: float = 0.1
    early_stop: float = 1e-5
    early_stop_slope: float = 2e-5
    lr: float = 1e-2
    lr_decay_steps: float = 100.0
    attention_weight: float = 1.0  # the code's --w_attnloss True: latent loss + attention loss
    variant: Variant = "official"
    blocks: int = 1  # BLOCK_NUM
    seed: int = 0  # initialisation of M_0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"mapping network variant must be one of {VARIANTS}, got "
                             f"{self.variant!r}")
        if not self.guidance > 0:
            raise ValueError(f"guidance must be positive, got {self.guidance}")
        if not isinstance(self.inner_steps, int) or self.inner_steps < 1:
            raise ValueError(f"inner iterations must be a positive integer, got {self.inner_steps!r}")
        if not self.attention_weight >= 0:
            raise ValueError(f"attention loss weight must be ≥ 0, got {self.attention_weight}")

    def iterations(self, i: int) -> int:
        """K_i = ⌈K·e^{−decay·i}⌉ (the code: np.ceil(K * np.exp(-.1 * x)))."""
        return int(math.ceil(self.inner_steps * math.exp(-self.inner_decay * i)))


class MappingNet(nn.Module):
    """M_t: image tokens [B, n, W] → [B, rows, D] (rows = 2·L for ``official``, L for ``paper``)."""

    def __init__(self, tokens: int, width: int, length: int, dim: int, variant: Variant,
                 blocks: int = 1) -> None:
        super().__init__()
        rows = length * (2 if variant == "official" else 1)
        self.variant, self.length = variant, length
        self.project = nn.Linear(width, dim) if width != dim else nn.Identity()
        self.conv_start = nn.Conv1d(tokens, rows, kernel_size=1)
        self.conv_block = nn.Sequential(*[
            nn.Sequential(nn.Conv1d(rows, rows, kernel_size=1), nn.BatchNorm1d(rows), nn.LeakyReLU())
            for _ in range(blocks)
        ])
        self.conv_end = nn.Conv1d(rows, rows, kernel_size=1)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.conv_end(self.conv_block(self.conv_start(self.project(tokens))))

    def split(self, out: Tensor) -> tuple[Tensor | None, Tensor]:
        """Output [1, rows, D] → (scale [1, L, D] or None, shift [1, L, D])."""
        if self.variant == "official":
            return out[:, : self.length], out[:, self.length :]
        return None, out


def check_image_tokens(tokens: Tensor, what: str = "image encoder output") -> None:
    if tokens.ndim != 3 or tokens.shape[0] != 1 or tokens.shape[1] < 1 or tokens.shape[2] < 1:
        raise ValueError(f"{what}: expected tokens [1, n, width] of one image, got shape "
                         f"{tuple(tokens.shape)}")
    if not torch.isfinite(tokens).all():
        raise ValueError(f"{what} contains NaN or inf")


def style_invert(
    denoiser: Denoiser,
    traj: Trajectory,
    image_tokens: Tensor,
    null_embedding: Tensor,
    options: StyleOptions = StyleOptions(),
    *,
    encoder: str = "image encoder",
    progress: Progress = no_progress,
    check: Callable[[], None] = lambda: None,
    precision: Precision | None = None,
    on_step: StepLoss = no_step_loss,
) -> ValueEmbeddings:
    """Per-step value embeddings that make CFG sampling at guidance w retrace the pivot.

    image_tokens [1, n, W] = E(x) (frozen); null_embedding [1, L, D] = the embedding of "".
    ``progress`` is told once per step; ``check`` runs before every iteration (Cancel);
    ``on_step`` gets each step's first and final loss as soon as its iterations end.
    ``precision`` as in ``null_text_optimize``: the mapping network, Adam and the loss are fp32,
    the UNet passes compute in ``precision.compute``.
    """
    check_image_tokens(image_tokens)
    check_context(null_embedding, "null embedding")
    check_trajectory_model(traj, denoiser)
    check_precision(denoiser, precision)
    scaler, dtype, stage = loss_scaler(denoiser), compute_dtype(denoiser), \
        "StyleDiffusion optimisation"
    o = options
    recorder = attention_recorder(traj, branch=True) if o.attention_weight > 0 else None
    grid, n, cond = traj.grid, traj.num_steps, traj.embedding.float()
    rows, dim = int(cond.shape[1]), int(cond.shape[2])
    length = TOKENS if rows == TOKENS + 1 else rows  # SDXL: values for the token states only
    tokens = image_tokens.detach().float().to(cond.device)
    null = null_embedding.detach().float().to(cond.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(o.seed)
        net = MappingNet(tokens.shape[1], tokens.shape[2], length, dim, o.variant, o.blocks)
    net = net.to(cond.device).train()  # BatchNorm on batch statistics, as the official code
    z = traj.z_T.float()
    scales: list[Tensor] = []
    shifts: list[Tensor] = []
    first: list[float] = []
    final: list[float] = []
    iters: list[int] = []
    map_err: list[float] = []
    start = time.perf_counter()

    def padded(x: Tensor) -> Tensor:  # [1, length, D] → [1, rows, D], zero rows appended
        return x if length == rows else torch.cat([x, x.new_zeros(1, rows - length, dim)], 1)

    def value_of(out: Tensor) -> Tensor:
        scale, shift = net.split(out)
        return padded(shift if scale is None else scale * cond[:, :length] + shift)

    for i in range(n):
        t = grid.timesteps[i]
        with torch.no_grad():
            eps_u = denoiser.eps(z, t, null, rows=UNCOND_ROW, step=i)
        check_finite(stage, step=i, dtype=dtype, **{"the empty prompt's ε": eps_u})

        def guided_eps(z=z, t=t, i=i, eps_u=eps_u) -> Tensor:
            eps_c = denoiser.eps(z, t, cond, step=i, controller=recorder,
                                 value_context=value_of(net(tokens)))
            return guided(denoiser, z, t, eps_u, eps_c, o.guidance, cond=cond, uncond=null)

        fit = fit_step(guided_eps, list(net.parameters()), traj=traj, i=i, z=z,
                       lr=o.lr * (1.0 - i / o.lr_decay_steps), budget=o.iterations(i),
                       threshold=o.early_stop + i * o.early_stop_slope, recorder=recorder,
                       attention_weight=o.attention_weight, check=check, scaler=scaler,
                       stage=stage, dtype=dtype)
        first.append(fit.first)
        final.append(fit.final)
        iters.append(fit.iterations)
        on_step(i, n, fit.first, fit.final)
        if fit.attention is not None:
            map_err.append(fit.attention)
        with torch.no_grad():  # ε_∅ of this step is the one above (same z̄, t, ""): reused
            scale, shift = net.split(net(tokens))
            scale, shift = None if scale is None else padded(scale), padded(shift)
            scales.append(scale.detach() if scale is not None else shift.new_zeros(0))
            shifts.append(shift.detach())
            value = shift if scale is None else scale * cond + shift
            eps_c = denoiser.eps(z, t, cond, step=i, value_context=value)
            z = sample_step(grid, i, z, guided(denoiser, z, t, eps_u, eps_c, o.guidance,
                                               cond=cond, uncond=null))
        check_finite(stage, step=i, dtype=dtype, **{"the valued ε": eps_c, "the latent": z})
        progress(1)
    return ValueEmbeddings(
        shift=torch.cat(shifts),
        scale=None if o.variant == "paper" else torch.cat(scales),
        variant=o.variant,
        encoder=f"{encoder} ({tokens.shape[1]}×{tokens.shape[2]})",
        guidance=o.guidance,
        prompt=traj.prompt,
        pivot=pivot_fingerprint(traj),
        final_loss=final,
        first_loss=first,
        iterations=iters,
        attention_weight=o.attention_weight,
        attention_loss=map_err,
        seconds=time.perf_counter() - start,
        precision="" if precision is None else precision.describe(),
        skipped=scaler.skipped,
        compute=dtype_key(dtype),
    )
