"""``python -m nti_core edit``: a user's photo and model through the pipeline, checked first."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from ..editing import build_controller, edit, invert, sweep
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


def run(a: argparse.Namespace) -> dict:
    check_args(a)
    spec = plan_from_args(a)
    cells = plan_sweep(plan_fields(a), sweep_axes(a)) if a.sweep else None
    options = NullTextOptions(guidance=a.guidance, inner_steps=a.inner_steps, early_stop=a.early_stop,
                              attention_weight=a.attention_loss)
    make_grid(scaled_linear_alphas_cumprod(), a.steps, a.grid)  # step count fits the grid
    image = load_image(a.image, a.size, a.crop)  # cheap checks first, words with CLIP's vocabulary
    mask = None if a.mask is None else load_mask(a.mask, a.image, a.size, a.crop)
    try:
        check_words(spec, family_tokenizer("clip-bpe"), a.steps)
        if cells is not None:
            plan_sweep(plan_fields(a), sweep_axes(a), family_tokenizer("clip-bpe"), a.steps)
    except FileNotFoundError:
        log.info("no standalone CLIP vocabulary: the edit plan is checked after the model loads")
    from ..hosts.diffusers.models import check_model_path

    check_model_path(a.model)
    if METHODS[a.method].needs_encoder and not (Path(a.image_encoder) / "config.json").is_file():
        raise ValueError(f"no image encoder at {a.image_encoder}: expected a transformers CLIP "
                         "vision folder (config.json + model.safetensors)")
    phases = Phases(3 if cells is None else 4)
    with phases(f"load {a.model}"):
        from ..hosts.diffusers.models import load_model

        model = load_model(a.model, a.device, a.dtype)
        log.info("model: %s", model.family.label)
        z0 = model.encode_image(image)
        steps = make_grid(model.alphas_cumprod, a.steps, a.grid).num_steps
        controller = build_controller(model, spec, steps, keep_step_maps=not a.no_attention_maps,
                                      latent_hw=tuple(z0.shape[-2:]), mask=mask)
        if cells is not None:  # every cell checked with the model's own tokenizer
            cells = plan_sweep(plan_fields(a), sweep_axes(a), model.plan_tokenizer(), steps)
    tokens, encoder = None, "image encoder"
    if METHODS[a.method].needs_encoder:
        from ..hosts.diffusers.vision import describe, image_tokens, load_clip_vision

        vision = load_clip_vision(a.image_encoder, a.device)
        tokens, encoder = image_tokens(vision, image.to(a.device)), describe(vision)
        del vision
    style = StyleOptions(guidance=a.guidance, inner_steps=a.style_inner_steps,
                         attention_weight=a.style_attention_loss, variant=a.style_variant)
    units = a.steps * (2 if METHODS[a.method].optimises else 1)
    with phases(f"DDIM inversion + {a.method}", units) as tick:
        inv = invert(model, z0, spec.source, steps=a.steps, grid=a.grid, method=a.method,
                     options=options, style=style, image_tokens=tokens, encoder=encoder,
                     direct=a.direct, precision=a.precision, progress=tick)
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
