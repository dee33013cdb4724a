"""One photo edit end to end on any host's ``Model`` (``nti_core.denoiser``): DDIM-invert the
photo, make ∅ by an inversion method (``nti_core.methods``), sample the Prompt-to-Prompt batch.
The command line's ``edit`` and ``demo`` run it."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .attention.edits import P2PController
from .attention.plan import P2PSpec
from .denoiser import Model
from .inversion import ddim_invert
from .memory import checkpointing_needed
from .methods import DEFAULT, Job, check_request
from .null_text import NullTextOptions
from .precision import Precision, resolve, sampling_dtype
from .progress import Progress, StepLoss, no_progress, no_step_loss
from .sampling import p2p_sample
from .schedule import GridKind, make_grid
from .style import StyleOptions
from .sweep import Sweep, sample_sweep
from .trajectory import Trajectory, UncondEmbeddings, ValueEmbeddings
from .validate import check_prompt


@dataclass
class Inversion:
    """A photo inverted into the model: the pivot and the per-step ∅, with timings in seconds."""

    trajectory: Trajectory
    uncond: UncondEmbeddings
    timings: dict[str, float] = field(default_factory=dict)
    values: ValueEmbeddings | None = None  # StyleDiffusion's (method "styled")
    precision: Precision | None = None  # the optimisation's (optimising methods only)
    checkpointing: bool = False  # gradient checkpointing during the optimisation


def ddim(model: Model, z0: Tensor, source: str, *, steps: int = 50,
         grid: GridKind = "reference", record_maps: bool = False,
         progress: Progress = no_progress) -> Trajectory:
    """The DDIM pivot of z0 under ``source`` (``record_maps``: keep the source's cross-attention
    maps, which an attention loss reads)."""
    source = check_prompt(source, "source prompt")
    g = make_grid(model.denoiser.alphas_cumprod, steps, grid)
    return ddim_invert(model.denoiser, z0, model.encode_prompt(source), g, source,
                       record_maps=record_maps, progress=progress)


def optimise(
    model: Model,
    traj: Trajectory,
    method: str = DEFAULT,
    *,
    options: NullTextOptions = NullTextOptions(),
    style: StyleOptions = StyleOptions(),
    image_tokens: Tensor | None = None,
    encoder: str = "image encoder",
    direct: bool = False,
    precision: str = "auto",
    checkpointing: bool | None = None,
    progress: Progress = no_progress,
    on_step: StepLoss = no_step_loss,
) -> Inversion:
    """∅ (and StyleDiffusion's values) by ``method`` on an inverted trajectory; ``on_step`` gets
    each optimised step's first and final loss as it ends.

    ``precision`` (auto / fp32 / model, ``nti_core.precision``) sets what the optimising
    methods' UNet passes compute in; ``checkpointing`` (None: when the estimated activations
    would not fit the device's free memory, ``nti_core.memory``) recomputes UNet blocks in the
    backward instead of keeping their activations — the same result, less memory."""
    m = check_request(method, direct=direct, encoder=image_tokens is not None)
    prec = resolve(precision, model.denoiser.dtype)
    if checkpointing is None:  # an fp32 optimisation of a half UNet casts it: its size again
        cast = sum(p.numel() * 4 for p in model.unet.parameters()) if prec.changed else 0
        checkpointing = m.optimises and checkpointing_needed(
            model.family.key, tuple(traj.latents.shape[-2:]), prec.compute, model.device,
            extra=cast)
    job = Job(model.denoiser, traj, model.encode_prompt(""), options, style, image_tokens,
              encoder, direct, prec if m.optimises else None, progress, on_step=on_step)
    session = (model.denoiser.optimising(prec, checkpointing) if m.optimises
               else contextlib.nullcontext())
    start = time.perf_counter()
    with session:
        uncond, values = m.run(job)
    return Inversion(traj, uncond, {method: time.perf_counter() - start}, values,
                     prec if m.optimises else None, bool(checkpointing))


def invert(
    model: Model,
    z0: Tensor,
    source: str,
    *,
    steps: int = 50,
    grid: GridKind = "reference",
    method: str = DEFAULT,
    options: NullTextOptions = NullTextOptions(),
    style: StyleOptions = StyleOptions(),
    image_tokens: Tensor | None = None,
    encoder: str = "image encoder",
    direct: bool = False,
    precision: str = "auto",
    checkpointing: bool | None = None,
    progress: Progress = no_progress,
    on_step: StepLoss = no_step_loss,
) -> Inversion:
    """DDIM inversion of z0 under ``source``, then ∅ by ``method`` (``nti_core.methods``: the
    paper's ``null-text`` with ``options``, ``null-text-fast``, ``direct``, ``negative-prompt``,
    ``ddim``; ``styled`` optimises StyleDiffusion's value embeddings from ``image_tokens`` = E(x)
    instead, ∅ staying "" — or Direct Inversion's with ``direct``). Every request is checked
    before the inversion starts."""
    source = check_prompt(source, "source prompt")
    m = check_request(method, direct=direct, encoder=image_tokens is not None)
    start = time.perf_counter()
    traj = ddim(model, z0, source, steps=steps, grid=grid,
                record_maps=m.attention_weight(options, style) > 0, progress=progress)
    took = time.perf_counter() - start
    inv = optimise(model, traj, method, options=options, style=style, image_tokens=image_tokens,
                   encoder=encoder, direct=direct, precision=precision,
                   checkpointing=checkpointing, progress=progress, on_step=on_step)
    inv.timings = {"ddim_inversion": took, **inv.timings}
    return inv


def build_controller(model: Model, spec: P2PSpec, num_steps: int,
                     keep_step_maps: bool = False,
                     latent_hw: tuple[int, int] | None = None,
                     mask: Tensor | None = None) -> P2PController:
    """The P2P controller for ``spec`` with the model's own tokenizer (all checks happen here);
    ``keep_step_maps`` for the attention-map view, ``latent_hw`` so LocalBlend stores one size;
    ``mask`` the user's region (1 = may change, ``attention.edits.region_mask``)."""
    check_prompt(spec.source, "source prompt")
    for t in spec.targets:
        check_prompt(t, "target prompt")
    return spec.build(model.plan_tokenizer(), num_steps, keep_step_maps, latent_hw, mask)


def edit(
    model: Model,
    inv: Inversion,
    spec: P2PSpec | None = None,
    *,
    controller: P2PController | None = None,
    guidance: float | None = None,
    value_end: float = 0.5,
    mask: Tensor | None = None,
    progress: Progress = no_progress,
) -> Tensor:
    """Latents [1 + K, 4, h, w]: the reconstruction, then one edit per target prompt
    (with StyleDiffusion's values: targets read them while step < ``value_end``·N; with
    ``mask``, changed only where it allows, unless ``controller`` is given); without ``spec``,
    the reconstruction alone. The UNet samples in the dtype the ∅ (and values) were optimised
    in (``precision.sampling_dtype``)."""
    traj = inv.trajectory
    contexts = traj.embedding
    if spec is not None:
        if spec.source != traj.prompt:
            raise ValueError(f"the edit's source prompt {spec.source!r} is not the inversion's "
                             f"{traj.prompt!r}")
        controller = controller or build_controller(model, spec, traj.num_steps,
                                                    latent_hw=tuple(traj.latents.shape[-2:]),
                                                    mask=mask)
        contexts = torch.cat([traj.embedding] + [model.encode_prompt(t) for t in spec.targets])
    dtype = sampling_dtype(model.denoiser.dtype, inv.uncond, inv.values)
    with model.denoiser.computing(dtype):  # in the dtype the ∅ were optimised in
        return p2p_sample(model.denoiser, traj, inv.uncond, contexts, guidance=guidance,
                          controller=controller, values=inv.values, value_end=value_end,
                          progress=progress)


def sweep(
    model: Model,
    inv: Inversion,
    cells: Sweep,
    *,
    guidance: float | None = None,
    value_end: float = 0.5,
    mask: Tensor | None = None,
    progress: Progress = no_progress,
) -> Tensor:
    """Latents [R·C, 4, h, w]: the edit of the first target prompt under each cell's plan
    (``nti_core.sweep``), one P2P sampling per cell from this inversion, in the dtype its ∅
    were optimised in."""
    traj = inv.trajectory
    first = cells.plans[0]
    if first.source != traj.prompt:
        raise ValueError(f"the sweep's source prompt {first.source!r} is not the inversion's "
                         f"{traj.prompt!r}")
    contexts = torch.cat([traj.embedding, model.encode_prompt(first.targets[0])])
    dtype = sampling_dtype(model.denoiser.dtype, inv.uncond, inv.values)
    with model.denoiser.computing(dtype):
        return sample_sweep(model.denoiser, traj, inv.uncond, contexts, cells,
                            model.plan_tokenizer(), guidance=guidance, values=inv.values,
                            value_end=value_end, mask=mask, progress=progress)
