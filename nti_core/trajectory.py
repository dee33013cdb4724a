"""Typed values that travel between the stages: the inversion pivot and the per-step ∅."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .schedule import Grid


@dataclass(frozen=True)
class Trajectory:
    """DDIM inversion pivot (REFERENCE §2).

    latents: [N+1, C, h, w]; latents[0] = z*_0 (the encoded image), latents[N] = z*_T.
    prompt / embedding [1, L, D]: the source prompt C; fingerprint: the model it was made with.
    """

    latents: Tensor
    grid: Grid
    prompt: str
    embedding: Tensor
    fingerprint: Tensor

    def __post_init__(self) -> None:
        n = self.grid.num_steps
        if self.latents.ndim != 4 or self.latents.shape[0] != n + 1:
            raise ValueError(
                f"trajectory needs {n + 1} latents [N+1, C, h, w] for {n} steps, "
                f"got shape {tuple(self.latents.shape)}"
            )

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

    method: "null-text" | "negative-prompt" | "null" (the plain embedding of "", no inversion).
    final_loss / first_loss / iterations: per step (null-text only; empty otherwise).
    """

    embeddings: Tensor
    method: str
    guidance: float
    final_loss: list[float] = field(default_factory=list)
    first_loss: list[float] = field(default_factory=list)
    iterations: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def num_steps(self) -> int:
        return int(self.embeddings.shape[0])

    def at(self, i: int) -> Tensor:
        """∅_i as [1, L, D]."""
        return self.embeddings[i : i + 1]

    def report(self) -> str:
        """A readable multi-line summary (for the UI and the CLI)."""
        lines = [f"method: {self.method}, guidance {self.guidance}, {self.num_steps} steps"]
        if self.iterations:
            total = sum(self.iterations)
            lines.append(f"inner iterations: {total} total ({self.seconds:.1f} s)")
            for i, (it, a, b) in enumerate(zip(self.iterations, self.first_loss, self.final_loss)):
                lines.append(f"step {i:3d}: {it:2d} it, loss {a:.3e} → {b:.3e}")
        return "\n".join(lines)


def stack(embeddings: list[Tensor]) -> Tensor:
    """[1, L, D] × N → [N, L, D] (detached)."""
    return torch.cat([e.detach() for e in embeddings], dim=0)
