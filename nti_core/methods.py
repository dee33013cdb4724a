"""The inversion methods: how the per-step unconditional embeddings ∅ (and StyleDiffusion's value
embeddings) are made from a DDIM-inverted trajectory. One entry each, read by the pipeline
(``editing``), the nodes, the command line, the docs and the tests.

Adding a method is one function ``(Job) -> (UncondEmbeddings, ValueEmbeddings | None)`` and one
entry in ``METHODS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .progress import Progress, StepLoss, no_progress, no_step_loss

if TYPE_CHECKING:  # the functions are imported when they run: null_text and trajectory read
    from torch import Tensor  # the names below

    from .denoiser import Denoiser
    from .null_text import NullTextOptions
    from .precision import Precision
    from .style import StyleOptions
    from .trajectory import Trajectory, UncondEmbeddings, ValueEmbeddings

NULL_TEXT, NULL_TEXT_FAST, DIRECT = "null-text", "null-text-fast", "direct"
NEGATIVE_PROMPT, STYLED, DDIM = "negative-prompt", "styled", "ddim"


@dataclass(frozen=True)
class Job:
    """What a method gets: the pivot, the embedding of "" and the options of every method (each
    reads its own). The denoiser is on the trajectory's device, in the optimisation's
    ``precision`` when the method optimises."""

    denoiser: Denoiser
    trajectory: Trajectory
    null: Tensor
    options: NullTextOptions | None = None  # None: the reference's constants
    style: StyleOptions | None = None  # None: the official code's constants
    image_tokens: Tensor | None = None  # the image encoder's tokens of the photo (styled)
    encoder: str = "image encoder"
    direct: bool = False  # styled: keep the source row on the pivot (Direct Inversion's ∅)
    precision: Precision | None = None
    progress: Progress = no_progress
    check: Callable[[], None] = lambda: None  # runs before every iteration; raises to cancel
    on_step: StepLoss = no_step_loss  # each step's first and final loss (optimising methods)


    @property
    def null_text(self) -> NullTextOptions:
        from .null_text import NullTextOptions

        return self.options or NullTextOptions()

    @property
    def styled(self) -> StyleOptions:
        from .style import StyleOptions

        return self.style or StyleOptions()


Result = tuple["UncondEmbeddings", "ValueEmbeddings | None"]


@dataclass(frozen=True)
class Method:
    """One inversion method. ``optimises``: it runs a backward through the UNet (autograd, the
    optimisation precision); ``attention_loss``: it takes an attention-loss weight, which needs
    the attention maps recorded at inversion when above 0; ``needs_encoder``: it reads an image
    encoder's tokens of the photo; ``makes_values``: it returns value embeddings for sampling;
    ``node``: the node that offers it (None: the command line only)."""

    name: str
    run: Callable[[Job], Result]
    summary: str
    optimises: bool = False
    attention_loss: bool = False
    needs_encoder: bool = False
    makes_values: bool = False
    node: str | None = "NTINullTextOptimize"

    def attention_weight(self, options: NullTextOptions, style: StyleOptions) -> float:
        """The attention-loss weight this method would use (0 when it takes none)."""
        if not self.attention_loss:
            return 0.0
        return style.attention_weight if self.makes_values else options.attention_weight


def _null_text(fast: bool) -> Callable[[Job], Result]:
    def run(job: Job) -> Result:
        from .null_text import null_text_optimize

        return null_text_optimize(job.denoiser, job.trajectory, job.null,
                                  replace(job.null_text, fast=fast), progress=job.progress,
                                  check=job.check, precision=job.precision,
                                  on_step=job.on_step), None
    return run


def _direct(job: Job) -> Result:
    from .null_text import direct_inversion

    return direct_inversion(job.trajectory, job.null, job.null_text.guidance), None


def _negative_prompt(job: Job) -> Result:
    from .null_text import negative_prompt_inversion

    return negative_prompt_inversion(job.trajectory, job.null_text.guidance), None


def _styled(job: Job) -> Result:
    from .null_text import direct_inversion, plain_null
    from .style import style_invert

    if job.image_tokens is None:
        raise ValueError("StyleDiffusion needs the image encoder's tokens of the photo")
    null = direct_inversion if job.direct else plain_null
    values = style_invert(job.denoiser, job.trajectory, job.image_tokens, job.null, job.styled,
                          encoder=job.encoder, progress=job.progress, check=job.check,
                          precision=job.precision, on_step=job.on_step)
    return null(job.trajectory, job.null, job.styled.guidance), values


def _ddim(job: Job) -> Result:
    from .null_text import plain_null

    return plain_null(job.trajectory, job.null, job.null_text.guidance), None


METHODS: dict[str, Method] = {m.name: m for m in (
    Method(NULL_TEXT, _null_text(False), "the paper's optimisation of ∅ (Mokady et al. 2023)",
           optimises=True, attention_loss=True),
    Method(NULL_TEXT_FAST, _null_text(True), "the same loss and constants, ∅ starting from "
           "the source prompt and no UNet pass computed twice",
           optimises=True, attention_loss=True),
    Method(DIRECT, _direct, "Direct Inversion (Ju et al. 2024): ∅ = \"\", the source row "
           "kept on the pivot while sampling; no optimisation"),
    Method(NEGATIVE_PROMPT, _negative_prompt, "∅ = the source prompt (Miyake et al. 2023); "
           "no optimisation"),
    Method(STYLED, _styled, "StyleDiffusion (Li et al. 2023): value embeddings mapped from "
           "an image encoder's view of the photo", optimises=True, attention_loss=True,
           needs_encoder=True, makes_values=True, node="NTIStyleInvert"),
    Method(DDIM, _ddim, "plain DDIM inversion: ∅ = \"\" (the baseline)", node=None),
)}
NAMES = tuple(METHODS)
DEFAULT = NULL_TEXT_FAST  # the nodes' and the CLI's
REFERENCE = NULL_TEXT  # the paper's: what the demo edits from


def method(name: str) -> Method:
    """The method called ``name``; ValueError listing the names otherwise."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {name!r}")
    return METHODS[name]


def offered_by(node: str) -> list[str]:
    """The names a node offers, in table order."""
    return [m.name for m in METHODS.values() if m.node == node]


def check_request(name: str, *, attention_weight: float = 0.0, direct: bool = False,
                  encoder: bool = True, has_maps: bool = True) -> Method:
    """Refuse what ``name`` cannot do, before any work: an attention loss for a method without
    one (or without the inversion's maps), Direct Inversion's ∅ outside StyleDiffusion, a
    method that reads an image encoder without one."""
    m = method(name)
    if attention_weight > 0 and not m.attention_loss:
        takes = [n for n, x in METHODS.items() if x.attention_loss]
        raise ValueError(f"attention_loss applies to methods {takes}, not {name!r}: set it to 0 "
                         "or switch the method")
    if attention_weight > 0 and not has_maps:
        raise ValueError("attention_loss needs the attention maps of the inversion: turn on "
                         "record_maps in DDIM Invert (NTI), or set attention_loss to 0 (a file "
                         "saved before format 3 has none: invert again)")
    if direct and not m.makes_values:
        raise ValueError(f"direct composes Direct Inversion with method 'styled'; for {name!r} "
                         "use method 'direct'")
    if m.needs_encoder and not encoder:
        raise ValueError(f"method {name!r} needs an image encoder (a CLIP vision model, e.g. "
                         "openai/clip-vit-base-patch16)")
    return m
