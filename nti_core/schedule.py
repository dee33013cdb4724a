"""ᾱ schedules, timestep grids and the DDIM step (Song et al. 2021, η = 0).

Notation: ᾱ_t = alphas_cumprod[t]; ε = predicted noise; x̂₀ = predicted clean latent.
A grid of N steps is the descending timesteps t_0 > … > t_{N-1} plus ᾱ_end, the level the last
step lands on. Level k (k = 0 … N) of a grid is ᾱ(t_k) for k < N and ᾱ_end for k = N; trajectory
latent j (0 = clean … N = noisiest) lives at level N − j.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

GridKind = Literal["reference", "ddim_uniform"]
GRID_KINDS: tuple[GridKind, ...] = ("reference", "ddim_uniform")
REFERENCE_STEPS_OFFSET = 1  # StableDiffusionPipeline forces it on the reference's DDIMScheduler
LEGACY_REFERENCE = "reference-offset0"  # 980…0: this pack's "reference" grid before format 2


def scaled_linear_alphas_cumprod(
    beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000
) -> Tensor:
    """ᾱ of SD 1.x: β linear in √β from beta_start to beta_end; [T] float64."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """ᾱ rescaled to zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", Algorithm 1; diffusers' ``rescale_zero_terminal_snr`` on the β):
    √ᾱ' = (√ᾱ − √ᾱ_T)·√ᾱ_0 / (√ᾱ_0 − √ᾱ_T), so ᾱ'_0 = ᾱ_0 and ᾱ'_T = 0. [T] float64."""
    root = alphas_cumprod.to(torch.float64).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    return ((root - last) * first / (first - last)) ** 2  # ᾱ'_T: exactly 0


def eps_from_v(v: Tensor, z: Tensor, alpha_t: float) -> Tensor:
    """ε from a v-prediction (Salimans & Ho 2022, §4: v = √ᾱ·ε − √(1−ᾱ)·x₀) at latent z_t:
    ε = √ᾱ_t·v + √(1−ᾱ_t)·z_t (diffusers' DDIMScheduler, ``v_prediction``'s pred_epsilon)."""
    return math.sqrt(alpha_t) * v + math.sqrt(1.0 - alpha_t) * z


@dataclass(frozen=True)
class Grid:
    """Descending integer timesteps [N], their ᾱ [N] (float64) and ᾱ_end, the last step's target."""

    kind: str
    timesteps: tuple[int, ...]
    alphas: Tensor
    alpha_end: float

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def level(self, k: int) -> float:
        """ᾱ of level k: ᾱ(t_k) for k < N, ᾱ_end for k = N."""
        if not 0 <= k <= self.num_steps:
            raise IndexError(f"grid level {k} outside 0…{self.num_steps}")
        return float(self.alphas[k]) if k < self.num_steps else self.alpha_end

    def describe(self) -> str:
        t = self.timesteps
        text = f"{self.kind}: {self.num_steps} steps, t = {t[0]}…{t[-1]}, ends at ᾱ = {self.alpha_end:.6g}"
        if self.kind == LEGACY_REFERENCE:
            text += (" (the pack's 'reference' grid before format 2, one timestep off the papers' "
                     "981…1: invert again for the reference grid)")
        return text


def make_grid(alphas_cumprod: Tensor, num_steps: int, kind: GridKind = "reference") -> Grid:
    """The reference grid or ComfyUI's ``ddim_uniform`` grid for ``num_steps`` steps.

    ``reference``: what the papers' code runs — diffusers' DDIMScheduler as StableDiffusionPipeline
    leaves it (``steps_offset`` 1, "leading" spacing, ``set_alpha_to_one=False``): t_i =
    ⌊T/N⌋·(N−1−i) + 1 (981, 961, …, 1 for N = 50), the last step landing on ᾱ[0].
    ``ddim_uniform``: ComfyUI's scheduler, the same timesteps for N dividing T, ending at ᾱ = 1
    (and one step more when T % N ≠ 0, as ComfyUI does).
    """
    total = int(alphas_cumprod.shape[0])
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or not 1 <= num_steps <= total:
        raise ValueError(f"steps must be an integer from 1 to {total}, got {num_steps!r}")
    if kind == "reference":
        ratio = total // num_steps
        ts = [ratio * (num_steps - 1 - i) + REFERENCE_STEPS_OFFSET for i in range(num_steps)]
        if ts[0] >= total:
            raise ValueError(f"the reference grid has at most {total - 1} steps (its first "
                             f"timestep would be {ts[0]}), got {num_steps}: use ddim_uniform")
        end = float(alphas_cumprod[0])
    elif kind == "ddim_uniform":
        # comfy.samplers.ddim_scheduler: sigmas[1], sigmas[1+ss], … reversed, then σ = 0.
        ss = max(total // num_steps, 1)
        ts = list(range(1, total, ss))[::-1]
        end = 1.0
    else:
        raise ValueError(f"grid must be one of {GRID_KINDS}, got {kind!r}")
    alphas = alphas_cumprod.to(torch.float64)[torch.tensor(ts)]
    if not bool((alphas > 0).all()):
        # zero-terminal-SNR schedules: ᾱ[T−1] = 0, where x̂₀ = (z − √(1−ᾱ)·ε)/√ᾱ is undefined
        raise ValueError(f"the {kind} grid of {num_steps} steps starts at t = {ts[0]}, where this "
                         f"model's ᾱ is 0 (zero terminal SNR): DDIM cannot step from there; use "
                         f"a step count whose first timestep is below {total - 1} (50 steps "
                         f"start at t = 981)")
    return Grid(kind, tuple(ts), alphas, end)


def grid_from_file(kind: str, timesteps: tuple[int, ...], alphas: Tensor, alpha_end: float) -> Grid:
    """A grid read back from an inversion file, named for what it is.

    Files written before the reference grid followed StableDiffusionPipeline (format 1) call
    980…0 "reference"; that grid is kept as it was made and named ``LEGACY_REFERENCE``.
    """
    if kind == "reference" and timesteps and timesteps[-1] == 0:
        kind = LEGACY_REFERENCE
    return Grid(kind, tuple(timesteps), alphas.to(torch.float64), float(alpha_end))


def ddim_step(z: Tensor, eps: Tensor, alpha_t: float, alpha_prev: float) -> Tensor:
    """DDIM (η = 0) from level ᾱ_t to ᾱ_prev: x̂₀ = (z − √(1−ᾱ_t)·ε)/√ᾱ_t; √ᾱ_prev·x̂₀ + √(1−ᾱ_prev)·ε.

    Run with ᾱ_prev < ᾱ_t it is the inversion step of REFERENCE §1 (same formula, forward).
    """
    x0 = (z - math.sqrt(1.0 - alpha_t) * eps) / math.sqrt(alpha_t)
    return math.sqrt(alpha_prev) * x0 + math.sqrt(1.0 - alpha_prev) * eps


def sample_step(grid: Grid, i: int, z: Tensor, eps: Tensor) -> Tensor:
    """Denoising step i of the grid: level i → level i+1 (ε evaluated at t_i)."""
    return ddim_step(z, eps, grid.level(i), grid.level(i + 1))


def inversion_step(grid: Grid, j: int, z: Tensor, eps: Tensor) -> Tensor:
    """Inversion step j (0 = cleanest): trajectory latent j → j+1, i.e. level N−j → N−1−j.

    ε must be evaluated at the destination timestep t_{N−1−j} (the reference's convention).
    """
    n = grid.num_steps
    return ddim_step(z, eps, grid.level(n - j), grid.level(n - 1 - j))
