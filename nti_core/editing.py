"""One photo edit end to end on the diffusers host (SD 1.x, SD 2.x or SDXL): invert, optimise ∅,
sample the P2P batch."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

from .attention.edits import P2PController
from .attention.plan import P2PSpec
from .hosts.diffusers.models import SDModel
from .inversion import ddim_invert
from .memory import checkpointing_needed
from .null_text import (
    NULL_TEXT_METHODS,
    NullTextOptions,
    direct_inversion,
    negative_prompt_inversion,
    null_text_optimize,
    plain_null,
)
from .precision import Precision, resolve, sampling_dtype
from .progress import Progress, no_progress
from .sampling import p2p_sample
from .schedule import GridKind, make_grid
from .style import StyleOptions, style_invert
from .tokenizer import from_hf
from .trajectory import Trajectory, UncondEmbeddings, ValueEmbeddings
from .validate import check_prompt

Method = Literal["null-text", "null-text-fast", "direct", "negative-prompt", "styled", "none"]
METHODS: tuple[Method, ...] = ("null-text", "null-text-fast", "direct", "negative-prompt",
                               "styled", "none")
OPTIMISED: tuple[Method, ...] = ("null-text", "null-text-fast", "styled")  # need autograd


@dataclass
class Inversion:
    """A photo inverted into the model: the pivot and the per-step ∅, with timings in seconds."""

    trajectory: Trajectory
    uncond: UncondEmbeddings
    timings: dict[str, float] = field(default_factory=dict)
    values: ValueEmbeddings | None = None  # StyleDiffusion's (method "styled")
    precision: Precision | None = None  # the optimisation's (optimising methods only)
    checkpointing: bool = False  # gradient checkpointing during the optimisation


def invert(
    model: SDModel,
    z0: Tensor,
    source: str,
    *,
    steps: int = 50,
    grid: GridKind = "reference",
    method: Method = "null-text",
    options: NullTextOptions = NullTextOptions(),
    style: StyleOptions = StyleOptions(),
    image_tokens: Tensor | None = None,
    encoder: str = "image encoder",
    direct: bool = False,
    precision: str = "auto",
    checkpointing: bool | None = None,
    progress: Progress = no_progress,
) -> Inversion:
    """DDIM inversion of z0 under ``source``, then ∅ by ``method``: ``null-text`` (the
    reference's optimisation with ``options``), ``null-text-fast`` (the same with
    ``options.fast``), ``direct`` (Direct Inversion: ∅ = "", no optimisation, the sampler keeps
    the source row on the pivot), ``negative-prompt``, ``none``; ``styled`` optimises
    StyleDiffusion's value embeddings from ``image_tokens`` = E(x) instead (∅ stays "", or
    Direct Inversion's with ``direct``).

    ``precision`` (auto / fp32 / model, ``nti_core.precision``) sets what the optimising
    methods' UNet passes compute in; ``checkpointing`` (None: when the estimated activations
    would not fit the device's free memory, ``nti_core.memory``) recomputes UNet blocks in the
    backward instead of keeping their activations — the same result, less memory."""
    source = check_prompt(source, "source prompt")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    prec = resolve(precision, model.denoiser.dtype)
    g = make_grid(model.alphas_cumprod, steps, grid)
    cond, null = model.encode_prompt(source), model.encode_prompt("")
    t0 = time.perf_counter()
    if method == "styled" and image_tokens is None:
        raise ValueError("StyleDiffusion needs the image encoder's tokens of the photo")
    if direct and method != "styled":
        raise ValueError(f"direct=True composes Direct Inversion with method 'styled'; for "
                         f"{method!r} use method 'direct'")
    nti = method in NULL_TEXT_METHODS
    record = ((nti and options.attention_weight > 0)
              or (method == "styled" and style.attention_weight > 0))
    traj = ddim_invert(model.denoiser, z0, cond, g, source, record_maps=record, progress=progress)
    t1 = time.perf_counter()
    optimised = method in OPTIMISED
    if checkpointing is None:  # an fp32 optimisation of a half UNet casts it: its size again
        cast = sum(p.numel() * 4 for p in model.unet.parameters()) if prec.changed else 0
        checkpointing = optimised and checkpointing_needed(
            model.family.key, tuple(z0.shape[-2:]), prec.compute, model.device, extra=cast)
    session = (model.denoiser.optimising(prec, checkpointing) if optimised
               else contextlib.nullcontext())
    with session:
        uncond, values = _optimise(model, traj, null, method, options, style, image_tokens,
                                   encoder, direct, prec, progress)
    t2 = time.perf_counter()
    return Inversion(traj, uncond, {"ddim_inversion": t1 - t0, method: t2 - t1}, values,
                     prec if optimised else None, bool(checkpointing))


def _optimise(model: SDModel, traj: Trajectory, null: Tensor, method: Method,
              options: NullTextOptions, style: StyleOptions, image_tokens: Tensor | None,
              encoder: str, direct: bool, prec: Precision,
              progress: Progress) -> tuple[UncondEmbeddings, ValueEmbeddings | None]:
    """∅ (and StyleDiffusion's values) by ``method`` on an inverted trajectory."""
    values = None
    if method in NULL_TEXT_METHODS:
        options = replace(options, fast=method == "null-text-fast")
        uncond = null_text_optimize(model.denoiser, traj, null, options, progress=progress,
                                    precision=prec)
    elif method == "direct":
        uncond = direct_inversion(traj, null, options.guidance)
    elif method == "negative-prompt":
        uncond = negative_prompt_inversion(traj, options.guidance)
    elif method == "styled":
        assert image_tokens is not None
        uncond = (direct_inversion if direct else plain_null)(traj, null, style.guidance)
        values = style_invert(model.denoiser, traj, image_tokens, null, style, encoder=encoder,
                              progress=progress, precision=prec)
    else:
        uncond = plain_null(traj, null, options.guidance)
    return uncond, values


def build_controller(model: SDModel, spec: P2PSpec, num_steps: int,
                     keep_step_maps: bool = False,
                     latent_hw: tuple[int, int] | None = None) -> P2PController:
    """The P2P controller for ``spec`` with the model's own tokenizer (all checks happen here);
    ``keep_step_maps`` for the attention-map view, ``latent_hw`` so LocalBlend stores one size."""
    check_prompt(spec.source, "source prompt")
    for t in spec.targets:
        check_prompt(t, "target prompt")
    return spec.build(from_hf(model.tokenizer), num_steps, keep_step_maps, latent_hw)


def edit(
    model: SDModel,
    inv: Inversion,
    spec: P2PSpec,
    *,
    controller: P2PController | None = None,
    guidance: float | None = None,
    value_end: float = 0.5,
    progress: Progress = no_progress,
) -> Tensor:
    """Latents [1 + K, 4, h, w]: the reconstruction, then one edit per target prompt
    (with StyleDiffusion's values: targets read them while step < ``value_end``·N). The UNet
    samples in the dtype the ∅ (and values) were optimised in (``precision.sampling_dtype``)."""
    if spec.source != inv.trajectory.prompt:
        raise ValueError(
            f"the edit's source prompt {spec.source!r} is not the inversion's "
            f"{inv.trajectory.prompt!r}"
        )
    traj = inv.trajectory
    ctrl = controller or build_controller(model, spec, traj.num_steps,
                                          latent_hw=tuple(traj.latents.shape[-2:]))
    contexts = torch.cat([inv.trajectory.embedding] + [model.encode_prompt(t) for t in spec.targets])
    dtype = sampling_dtype(model.denoiser.dtype, inv.uncond, inv.values)
    with model.denoiser.computing(dtype):  # in the dtype the ∅ were optimised in
        return p2p_sample(model.denoiser, inv.trajectory, inv.uncond, contexts,
                          guidance=guidance, controller=ctrl, values=inv.values,
                          value_end=value_end, progress=progress)
