"""``python -m nti_core edit``: a user's photo and model through the pipeline, checked first."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from ..attention.plan import P2PSpec
from ..editing import Inversion, build_controller, edit, invert, sweep
from ..files import load_inversion_all, new_inversion_path, save_inversion
from ..images import contact_sheet, load_image, load_mask, psnr, save_png
from ..methods import METHODS
from ..null_text import NullTextOptions
from ..plan_spec import check_words
from ..precision import dtype_key, sampling_dtype
from ..schedule import make_grid, scaled_linear_alphas_cumprod
from ..style import StyleOptions
from ..sweep import plan_sweep
from ..tokenizer import family_tokenizer
from .args import check_args, plan_fields, plan_from_args, sweep_axes
from .phases import Phases
from .render import attention_pngs, loss_png, sweep_png

log = logging.getLogger("nti_core")


def check_loaded(a: argparse.Namespace, spec: P2PSpec, image: torch.Tensor) -> int:
    """The steps of --load-inversion's file, checked against --source and the photo's size
    before the model loads (its family and weights are checked once it has)."""
    traj, uncond, _ = load_inversion_all(a.load_inversion)
    name = Path(a.load_inversion).name
    if uncond is None:
        raise ValueError(f"{name} holds a trajectory but no ∅: save the inversion with its ∅ "
                         "(--save-inversion, or Save Inversion (NTI) after Null-Text Optimize)")
    if traj.prompt != spec.source:
        raise ValueError(f"{name} was inverted with the source prompt {traj.prompt!r}, not "
                         f"{spec.source!r}: give that prompt as --source")
    h, w = traj.latents.shape[-2:]
    if (8 * h, 8 * w) != tuple(image.shape[-2:]):
        raise ValueError(f"{name} is the inversion of a {8 * w}×{8 * h} px image, but --image "
                         f"at --size {a.size} gives {image.shape[-1]}×{image.shape[-2]} px: give "
                         "the photo, --size and --crop it was inverted with")
    return traj.num_steps


def run(a: argparse.Namespace) -> dict:
    check_args(a)
    spec = plan_from_args(a)
    cells = plan_sweep(plan_fields(a), sweep_axes(a)) if a.sweep else None
    options = NullTextOptions(guidance=a.guidance, inner_steps=a.inner_steps, early_stop=a.early_stop,
                              attention_weight=a.attention_loss)
    make_grid(scaled_linear_alphas_cumprod(), a.steps, a.grid)  # step count fits the grid
    save_to = None if a.save_inversion is None else new_inversion_path(a.save_inversion)
    image = load_image(a.image, a.size, a.crop)  # cheap checks first, words with CLIP's vocabulary
    mask = None if a.mask is None else load_mask(a.mask, a.image, a.size, a.crop)
    n = a.steps if a.load_inversion is None else check_loaded(a, spec, image)
    try:
        check_words(spec, family_tokenizer("clip-bpe"), n)
        if cells is not None:
            plan_sweep(plan_fields(a), sweep_axes(a), family_tokenizer("clip-bpe"), n)
    except FileNotFoundError:
        log.info("no standalone CLIP vocabulary: the edit plan is checked after the model loads")
    from ..hosts.diffusers.models import check_model_path

    check_model_path(a.model)
    encoder_needed = METHODS[a.method].needs_encoder and a.load_inversion is None
    if encoder_needed and not (Path(a.image_encoder) / "config.json").is_file():
        raise ValueError(f"no image encoder at {a.image_encoder}: expected a transformers CLIP "
                         "vision folder (config.json + model.safetensors)")
    phases = Phases(3 if cells is None else 4)
    with phases(f"load {a.model}"):
        from ..hosts.diffusers.models import load_model

        model = load_model(a.model, a.device, a.dtype)
        log.info("model: %s", model.family.label)
        z0 = model.encode_image(image)
        steps = n if a.load_inversion else make_grid(model.alphas_cumprod, n, a.grid).num_steps
        controller = build_controller(model, spec, steps, keep_step_maps=not a.no_attention_maps,
                                      latent_hw=tuple(z0.shape[-2:]), mask=mask)
        if cells is not None:  # every cell checked with the model's own tokenizer
            cells = plan_sweep(plan_fields(a), sweep_axes(a), model.plan_tokenizer(), steps)
    tokens, encoder = None, "image encoder"
    if encoder_needed:
        from ..hosts.diffusers.vision import describe, image_tokens, load_clip_vision

        vision = load_clip_vision(a.image_encoder, a.device)
        tokens, encoder = image_tokens(vision, image.to(a.device)), describe(vision)
        del vision
    style = StyleOptions(guidance=a.guidance, inner_steps=a.style_inner_steps,
                         attention_weight=a.style_attention_loss, variant=a.style_variant)
    if a.load_inversion:  # the file's family and weights against the model's
        with phases(f"load the inversion {a.load_inversion}"):
            traj, uncond, values = load_inversion_all(
                a.load_inversion, model.denoiser.fingerprint(), model.device, model.family)
        assert uncond is not None  # check_loaded refused a file without ∅
        inv = Inversion(traj, uncond, values=values)
        log.info("inversion: %d steps, grid %s; --method and its options are not used",
                 traj.num_steps, traj.grid.describe())
    else:
        units = a.steps * (2 if METHODS[a.method].optimises else 1)
        with phases(f"DDIM inversion + {a.method}", units) as tick:
            inv = invert(model, z0, spec.source, steps=a.steps, grid=a.grid, method=a.method,
                         options=options, style=style, image_tokens=tokens, encoder=encoder,
                         direct=a.direct, precision=a.precision, progress=tick)
    if save_to is not None:
        save_to.parent.mkdir(parents=True, exist_ok=True)
        log.info("saved the inversion to %s", save_inversion(
            save_to, inv.trajectory, inv.uncond, inv.values, model.family))
    if inv.precision is not None:
        log.info("%s; gradient checkpointing %s", inv.precision.describe(),
                 "on" if inv.checkpointing else "off")
    with phases(f"P2P sampling of {len(spec.targets)} edit(s)", inv.trajectory.num_steps) as tick:
        latents = edit(model, inv, spec, controller=controller, value_end=a.value_end,
                       progress=tick)
    out = Path(a.out)
    images = model.decode(latents)
    reconstruction = {"latent_mse": float(torch.nn.functional.mse_loss(latents[:1], z0)),
                      "psnr_db": psnr(images[:1], image)}
    paths = [str(save_png(images[:1], out / "reconstruction.png"))]
    paths += [str(save_png(images[k : k + 1], out / f"edit_{k}.png")) for k in range(1, len(images))]
    fitted = inv.values if inv.values is not None else inv.uncond  # what was optimised
    if fitted.first_loss:
        paths.append(str(loss_png(fitted.first_loss, fitted.final_loss, out)))
    if not a.no_attention_maps:
        paths += attention_pngs(controller, spec, model.plan_tokenizer(),
                                inv.trajectory.num_steps, images, latents, out)
    tiles = [(image, "input"), (images[:1], f"reconstruction ({a.method})")]
    tiles += [(images[k : k + 1], f"edit {k}: {t}") for k, t in enumerate(spec.targets, start=1)]
    sheet = contact_sheet(tiles, out / "contact_sheet.png", columns=min(len(tiles), 4),
                          title=f"source: {spec.source}")
    report = {"model": {"name": model.name, "family": model.family.key,
                        "label": model.family.label},
              "image": {"file": a.image, "width": int(image.shape[-1]),
                        "height": int(image.shape[-2]), "crop": a.crop},
              "reconstruction": reconstruction,
              "paths": paths, "contact_sheet": str(sheet), "uncond": inv.uncond.report(),
              "grid": inv.trajectory.grid.describe(), "timings": inv.timings,
              "dtype": a.dtype,
              "inversion_file": {"loaded": a.load_inversion,
                                 "saved": None if save_to is None else str(save_to)},
              "sampling_compute": dtype_key(sampling_dtype(model.denoiser.dtype, inv.uncond,
                                                           inv.values)),
              "precision": None if inv.precision is None else {
                  "requested": inv.precision.requested,
                  "optimisation_compute": dtype_key(inv.precision.compute),
                  "model_compute": dtype_key(inv.precision.model),
                  "described": inv.precision.describe(),
                  "gradient_checkpointing": inv.checkpointing}}
    if inv.values is not None:
        report["values"] = inv.values.report()
    if mask is not None:
        region = controller.local_blend.region  # type: ignore[union-attr]
        report["mask"] = {"file": a.mask, "may_change": float(region.mean())}  # of the latent
    if cells is not None:
        rows, columns = cells.shape
        with phases(f"sweep of {rows}×{columns} cells", len(cells.plans) * steps) as tick:
            swept = sweep(model, inv, cells, value_end=a.value_end, mask=mask, progress=tick)
        report["sweep"] = {"path": str(sweep_png(model.decode(swept), cells, out)),
                           "edit": cells.title, "rows": cells.labels()[0],
                           "columns": cells.labels()[1]}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report
