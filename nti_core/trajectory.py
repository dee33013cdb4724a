"""Typed values that travel between the stages: the inversion pivot and the per-step ∅."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .methods import DIRECT
from .schedule import Grid


@dataclass(frozen=True)
class Trajectory:
    """DDIM inversion pivot (REFERENCE §2).

    latents: [N+1, C, h, w]; latents[0] = z*_0 (the encoded image), latents[N] = z*_T.
    prompt / embedding [1, L, D]: the source prompt C; fingerprint: the model it was made with.
    maps (when recorded): [N, layers, heads, h·w, L], maps[j] = the source prompt's per-head
    cross-attention at a quarter of the latent side while the UNet read z*_j (StyleDiffusion's
    ``ddim_inv_attn``), the targets of the attention loss.
    """

    latents: Tensor
    grid: Grid
    prompt: str
    embedding: Tensor
    fingerprint: Tensor
    maps: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.grid.num_steps
        if self.latents.ndim != 4 or self.latents.shape[0] != n + 1:
            raise ValueError(
                f"trajectory needs {n + 1} latents [N+1, C, h, w] for {n} steps, "
                f"got shape {tuple(self.latents.shape)}"
            )
        if self.maps is not None and (self.maps.ndim != 5 or self.maps.shape[0] != n):
            raise ValueError(f"attention maps must be [N={n}, layers, heads, positions, tokens], "
                             f"got shape {tuple(self.maps.shape)}")

    def loss_maps(self, i: int) -> Tensor:
        """The attention loss's target at sampling step i: the maps recorded at the pivot latent
        the step starts from, z*_{N−i}; at i = 0, where z*_N never entered the UNet, those of
        z*_{N−1} (the official code's A*(T) = A*(T−1)). [layers, heads, h·w, L]."""
        if self.maps is None:
            raise ValueError("this inversion has no attention maps: run DDIM Invert with "
                             "record_maps on (files saved before format 3 have none)")
        n = self.num_steps
        return self.maps[min(n - i, n - 1)]

    @property
    def num_steps(self) -> int:
        return self.grid.num_steps

    @property
    def z_T(self) -> Tensor:
        return self.latents[-1:]

    @property
    def z_0(self) -> Tensor:
        return self.latents[:1]


@dataclass(frozen=True)
class UncondEmbeddings:
    """Per-step unconditional embeddings ∅_i (i = 0 = noisiest step), [N, L, D], and how they came.

    method: "null-text" | "null-text-fast" | "negative-prompt" | "direct" (∅ = "", the sampler
    keeps the source row on the pivot) | "null" (the plain embedding of "", no inversion).
    final_loss / first_loss / iterations: per step (null-text only; empty otherwise).
    """

    embeddings: Tensor
    method: str
    guidance: float
    final_loss: list[float] = field(default_factory=list)
    first_loss: list[float] = field(default_factory=list)
    iterations: list[int] = field(default_factory=list)
    seconds: float = 0.0
    attention_weight: float = 0.0  # λ of the attention loss; 0 = plain null-text
    attention_loss: list[float] = field(default_factory=list)  # per step, at the last iteration
    precision: str = ""  # Precision.describe() of the optimisation ("" = not optimised)
    skipped: int = 0  # Adam steps skipped by fp16 loss scaling (gradients overflowed)
    compute: str = ""  # the dtype the UNet computed in while optimising ("" = not optimised)

    @property
    def num_steps(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def direct(self) -> bool:
        """Direct Inversion: the sampler keeps the source row on the pivot."""
        return self.method == DIRECT

    def at(self, i: int) -> Tensor:
        """∅_i as [1, L, D]."""
        return self.embeddings[i : i + 1]

    def report(self) -> str:
        """A readable multi-line summary (for the UI and the CLI)."""
        lines = [f"method: {self.method}, guidance {self.guidance}, {self.num_steps} steps"]
        lines += optimisation_lines(self.precision, self.skipped)
        if self.iterations:
            total = sum(self.iterations)
            lines.append(f"inner iterations: {total} total ({self.seconds:.1f} s)")
            if self.attention_weight:
                lines.append(f"attention loss weight λ = {self.attention_weight}; map error "
                             f"{self.attention_loss[0]:.3e} (step 0) → "
                             f"{self.attention_loss[-1]:.3e} (last step)")
            for i, (it, a, b) in enumerate(zip(self.iterations, self.first_loss, self.final_loss)):
                lines.append(f"step {i:3d}: {it:2d} it, loss {a:.3e} → {b:.3e}")
        return "\n".join(lines)


def optimisation_lines(precision: str, skipped: int) -> list[str]:
    """The report lines of an optimisation's precision and loss-scaling skips."""
    lines = [precision] if precision else []
    if skipped:
        lines.append(f"fp16 loss scaling: {skipped} Adam step(s) skipped (gradients overflowed)")
    return lines


def stack(embeddings: list[Tensor]) -> Tensor:
    """[1, L, D] × N → [N, L, D] (detached)."""
    return torch.cat([e.detach() for e in embeddings], dim=0)


def pivot_fingerprint(traj: Trajectory) -> Tensor:
    """Identifies one inversion: mean and std of z*_0 and z*_T (float64), and the step count."""
    z0, zt = traj.z_0.detach().double().cpu(), traj.z_T.detach().double().cpu()
    return torch.stack([z0.mean(), z0.std(), zt.mean(), zt.std(),
                        torch.tensor(float(traj.num_steps), dtype=torch.float64)])


@dataclass(frozen=True)
class ValueEmbeddings:
    """StyleDiffusion's per-step value inputs of the conditional cross-attention (see ``style``).

    shift [N, L, D]; scale [N, L, D] for the ``official`` variant (value = scale ⊙ c + shift, c the
    row's own prompt embedding), None for ``paper`` (value = shift). ``pivot`` identifies the
    inversion they were optimised on (``pivot_fingerprint``); losses and iterations per step.
    """

    shift: Tensor
    scale: Tensor | None
    variant: str
    encoder: str
    guidance: float
    prompt: str
    pivot: Tensor
    final_loss: list[float] = field(default_factory=list)
    first_loss: list[float] = field(default_factory=list)
    iterations: list[int] = field(default_factory=list)
    attention_weight: float = 0.0
    attention_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0
    precision: str = ""  # Precision.describe() of the optimisation
    skipped: int = 0  # Adam steps skipped by fp16 loss scaling
    compute: str = ""  # the dtype the UNet computed in while optimising

    @property
    def num_steps(self) -> int:
        return int(self.shift.shape[0])

    def values(self, i: int, contexts: Tensor) -> Tensor:
        """Value inputs of step i for prompt embeddings [S, L, D] → [S, L, D]."""
        shift = self.shift[i : i + 1].to(contexts)
        if self.scale is None:
            return shift.expand_as(contexts)
        return self.scale[i : i + 1].to(contexts) * contexts + shift

    def check_for(self, traj: Trajectory) -> None:
        """Refuse value embeddings optimised on another inversion (or another step count)."""
        if self.num_steps != traj.num_steps:
            raise ValueError(f"the value embeddings have {self.num_steps} steps but the inversion "
                             f"has {traj.num_steps}: run StyleDiffusion on this inversion")
        if self.prompt != traj.prompt or not torch.allclose(
                self.pivot.double().cpu(), pivot_fingerprint(traj), rtol=1e-4, atol=1e-6):
            raise ValueError("these value embeddings were optimised on another inversion (other "
                             "photo, prompt or model): run StyleDiffusion on this one")

    def report(self) -> str:
        lines = [f"method: StyleDiffusion ({self.variant} mapping network, E = {self.encoder}), "
                 f"guidance {self.guidance}, {self.num_steps} steps"]
        lines += optimisation_lines(self.precision, self.skipped)
        if self.iterations:
            lines.append(f"iterations: {sum(self.iterations)} total ({self.seconds:.1f} s)"
                         + (f"; attention loss weight λ = {self.attention_weight}"
                            if self.attention_weight else ""))
            for i, (it, a, b) in enumerate(zip(self.iterations, self.first_loss, self.final_loss)):
                lines.append(f"step {i:3d}: {it:3d} it, loss {a:.3e} → {b:.3e}")
        return "\n".join(lines)
