"""One photo edit end to end on the diffusers host: invert, optimise ∅, sample the P2P batch."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from .attention.edits import P2PController
from .attention.plan import P2PSpec
from .hosts.diffusers_models import SD1Model
from .inversion import ddim_invert
from .null_text import NullTextOptions, negative_prompt_inversion, null_text_optimize, plain_null
from .progress import Progress, no_progress
from .sampling import p2p_sample
from .schedule import GridKind, make_grid
from .tokenizer import from_hf
from .trajectory import Trajectory, UncondEmbeddings
from .validate import check_prompt

Method = Literal["null-text", "negative-prompt", "none"]
METHODS: tuple[Method, ...] = ("null-text", "negative-prompt", "none")


@dataclass
class Inversion:
    """A photo inverted into the model: the pivot and the per-step ∅, with timings in seconds."""

    trajectory: Trajectory
    uncond: UncondEmbeddings
    timings: dict[str, float] = field(default_factory=dict)


def invert(
    model: SD1Model,
    z0: Tensor,
    source: str,
    *,
    steps: int = 50,
    grid: GridKind = "reference",
    method: Method = "null-text",
    options: NullTextOptions = NullTextOptions(),
    progress: Progress = no_progress,
) -> Inversion:
    """DDIM inversion of z0 under ``source``, then ∅ by ``method``."""
    source = check_prompt(source, "source prompt")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    g = make_grid(model.alphas_cumprod, steps, grid)
    cond, null = model.encode_prompt(source), model.encode_prompt("")
    t0 = time.perf_counter()
    traj = ddim_invert(model.denoiser, z0, cond, g, source, progress=progress)
    t1 = time.perf_counter()
    if method == "null-text":
        uncond = null_text_optimize(model.denoiser, traj, null, options, progress=progress)
    elif method == "negative-prompt":
        uncond = negative_prompt_inversion(traj, options.guidance)
    else:
        uncond = plain_null(traj, null, options.guidance)
    t2 = time.perf_counter()
    return Inversion(traj, uncond, {"ddim_inversion": t1 - t0, method: t2 - t1})


def build_controller(model: SD1Model, spec: P2PSpec, num_steps: int) -> P2PController:
    """The P2P controller for ``spec`` with the model's own tokenizer (all checks happen here)."""
    check_prompt(spec.source, "source prompt")
    for t in spec.targets:
        check_prompt(t, "target prompt")
    return spec.build(from_hf(model.tokenizer), num_steps)


def edit(
    model: SD1Model,
    inv: Inversion,
    spec: P2PSpec,
    *,
    controller: P2PController | None = None,
    guidance: float | None = None,
    progress: Progress = no_progress,
) -> Tensor:
    """Latents [1 + K, 4, h, w]: the reconstruction, then one edit per target prompt."""
    if spec.source != inv.trajectory.prompt:
        raise ValueError(
            f"the edit's source prompt {spec.source!r} is not the inversion's "
            f"{inv.trajectory.prompt!r}"
        )
    ctrl = controller or build_controller(model, spec, inv.trajectory.num_steps)
    contexts = torch.cat([inv.trajectory.embedding] + [model.encode_prompt(t) for t in spec.targets])
    return p2p_sample(model.denoiser, inv.trajectory, inv.uncond, contexts,
                      guidance=guidance, controller=ctrl, progress=progress)
