"""Progress reporting and cancellation, host-agnostic: the CLI passes tqdm, ComfyUI its ProgressBar."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Told once per unit of work; may raise to cancel (ComfyUI's interrupt check does)."""

    def __call__(self, done: int = 1) -> None: ...


def no_progress(done: int = 1) -> None:
    """The default: report nothing, never cancel."""


class StepLoss(Protocol):
    """Told once per optimised step i of ``total``, in order, as soon as the step is done: its
    first and final loss, the values that end up in the result's ``first_loss`` and
    ``final_loss`` (ComfyUI draws them as the loss curve)."""

    def __call__(self, step: int, total: int, first: float, final: float) -> None: ...


def no_step_loss(step: int, total: int, first: float, final: float) -> None:
    """The default: tell nobody."""
