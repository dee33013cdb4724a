"""Progress reporting and cancellation, host-agnostic: the CLI passes tqdm, ComfyUI its ProgressBar."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Told once per unit of work; may raise to cancel (ComfyUI's interrupt check does)."""

    def __call__(self, done: int = 1) -> None: ...


def no_progress(done: int = 1) -> None:
    """The default: report nothing, never cancel."""

