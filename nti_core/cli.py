"""Command line: ``python -m nti_core edit …`` on a user's SD 1.x, SD 2.x or SDXL model, ``… demo``
on the built-in demo model (trained by this project on photos that ship with it; no download).

Progress goes to stderr: a numbered line when each phase starts and ends (also when the output
is piped or logged), a progress bar on a terminal. Errors print as one line (``error: …``) with
exit status 2, before any long computation; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from .attention.plan import EDIT_MODES, SELF_LIMITS, P2PSpec
from .editing import METHODS, OPTIMISED
from .null_text import NULL_TEXT_METHODS, NullTextOptions
from .precision import PRECISIONS, dtype_key, sampling_dtype
from .progress import Progress
from .schedule import GRID_KINDS
from .style import StyleOptions

log = logging.getLogger("nti_core")

DEMO_SOURCE = "a photo of a cat sitting next to a mirror"
DEMO_EDITS = (  # what the demo model can express: its training looks (see hosts/diffusers_demo)
    ("negative", "replace 'photo' by 'negative'",
     P2PSpec(DEMO_SOURCE, ("a negative of a cat sitting next to a mirror",), mode="replace")),
    ("negative+blend", "… only where 'cat' attends (LocalBlend)",
     P2PSpec(DEMO_SOURCE, ("a negative of a cat sitting next to a mirror",), mode="replace",
             blend_words=("cat",))),
    ("sepia", "refine: add 'sepia'",
     P2PSpec(DEMO_SOURCE, ("a sepia photo of a cat sitting next to a mirror",), mode="refine")),
    ("sepia-reweight", "… with 'sepia' reweighted to 0.5",
     P2PSpec(DEMO_SOURCE, ("a sepia photo of a cat sitting next to a mirror",), mode="refine",
             reweight="sepia:0.5")),
)


class Phases:
    """Numbered phases on stderr: a line when each starts and ends, a bar that stays on a
    terminal, and without a terminal a line at every tenth of a long phase."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    @contextlib.contextmanager
    def __call__(self, name: str, units: int = 0) -> Iterator[Progress]:
        self.done += 1
        tag = f"[{self.done}/{self.total}] {name}"
        log.info("%s …", tag)
        start = time.perf_counter()
        bar = None
        if units and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=units, desc=tag, leave=True, file=sys.stderr)
        count, report_at = 0, 0.1

        def tick(n: int = 1) -> None:
            nonlocal count, report_at
            count += n
            if bar is not None:
                bar.update(n)
                return
            while units and count < units and count >= report_at * units:
                log.info("%s: %d/%d (%.0f s)", tag, count, units, time.perf_counter() - start)
                report_at += 0.1

        try:
            yield tick
        finally:
            if bar is not None:
                bar.close()
        log.info("%s: done in %.1f s", tag, time.perf_counter() - start)


def _quiet_import_noise() -> None:
    """transformers warns, while diffusers imports, that image processors fall back to PIL when
    torchvision is absent: nothing here uses them. Other transformers warnings stay."""
    logging.getLogger("transformers.utils.import_utils").addFilter(
        lambda r: "requires torchvision" not in r.getMessage())


def _check_args(a: argparse.Namespace) -> None:
    """Numeric options, checked with the option's own name before anything loads."""
    if a.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {a.steps}")
    if getattr(a, "guidance", 1.0) <= 0:
        raise ValueError(f"--guidance must be positive, got {a.guidance}")
    if getattr(a, "inner_steps", 1) < 1:
        raise ValueError(f"--inner-steps must be at least 1, got {a.inner_steps}")
    if getattr(a, "early_stop", 0.0) < 0:
        raise ValueError(f"--early-stop must be ≥ 0, got {a.early_stop}")
    if getattr(a, "method", None) == "styled" and not a.image_encoder:
        raise ValueError("--method styled needs --image-encoder (a transformers CLIP vision "
                         "folder, e.g. openai/clip-vit-base-patch16)")
    if getattr(a, "style_inner_steps", 1) < 1:
        raise ValueError(f"--style-inner-steps must be at least 1, got {a.style_inner_steps}")
    if getattr(a, "style_attention_loss", 0.0) < 0:
        raise ValueError(f"--style-attention-loss must be ≥ 0, got {a.style_attention_loss}")
    for name in ("uncond_self", "cross", "self_steps", "value_end"):
        v = getattr(a, name, 0.0)
        if v is not None and not 0.0 <= v <= 1.0:
            raise ValueError(f"--{name.replace('_', '-')} must be a fraction in [0, 1], got {v}")
    if getattr(a, "attention_loss", 0.0) < 0:
        raise ValueError(f"--attention-loss must be ≥ 0, got {a.attention_loss}")
    if getattr(a, "attention_loss", 0.0) > 0 and a.method not in NULL_TEXT_METHODS:
        raise ValueError(f"--attention-loss applies to --method null-text or null-text-fast, not "
                         f"{a.method}")
    if getattr(a, "direct", False) and a.method != "styled":
        raise ValueError(f"--direct applies to --method styled (use --method direct alone), not "
                         f"{a.method}")
    if a.size % 8 or a.size < 64:
        raise ValueError(f"--size must be a multiple of 8 and at least 64, got {a.size}")


def _spec_from_args(a: argparse.Namespace) -> P2PSpec:
    cross: float | tuple[float, float] = a.cross if a.cross_end is None else (a.cross, a.cross_end)
    return P2PSpec(
        a.source, tuple(a.target), mode=a.mode, cross=cross, self_steps=a.self_steps,
        reweight=a.reweight or None, blend_words=tuple(a.blend), subtract_words=tuple(a.subtract),
        blend_threshold=a.blend_threshold, blend_start=a.blend_start, self_limit=a.self_limit,
        uncond_self=a.uncond_self,
    )


def cmd_edit(a: argparse.Namespace) -> dict:
    from .editing import build_controller, edit, invert
    from .images import contact_sheet, load_image, psnr, save_png
    from .schedule import make_grid, scaled_linear_alphas_cumprod
    from .tokenizer import from_hf, sd1_clip_tokenizer
    from .validate import check_prompt

    _check_args(a)
    spec = _spec_from_args(a)
    options = NullTextOptions(guidance=a.guidance, inner_steps=a.inner_steps, early_stop=a.early_stop,
                              attention_weight=a.attention_loss)
    check_prompt(a.source, "source prompt")
    for t in a.target:
        check_prompt(t, "target prompt")
    make_grid(scaled_linear_alphas_cumprod(), a.steps, a.grid)  # step count fits the grid
    image = load_image(a.image, a.size)  # all cheap checks first, the plan with CLIP's vocabulary
    try:
        tok = sd1_clip_tokenizer()
    except FileNotFoundError:
        log.info("no standalone CLIP vocabulary: the edit plan is checked after the model loads")
    else:
        spec.build(tok, a.steps)
    from .hosts.diffusers.models import check_model_path

    check_model_path(a.model)
    if a.method == "styled" and not (Path(a.image_encoder) / "config.json").is_file():
        raise ValueError(f"no image encoder at {a.image_encoder}: expected a transformers CLIP "
                         "vision folder (config.json + model.safetensors)")
    phases = Phases(3)
    with phases(f"load {a.model}"):
        from .hosts.diffusers.models import load_model

        model = load_model(a.model, a.device, a.dtype)
        log.info("model: %s", model.family.label)
        z0 = model.encode_image(image)
        controller = build_controller(model, spec, _grid_steps(a, model),
                                      keep_step_maps=not a.no_attention_maps,
                                      latent_hw=tuple(z0.shape[-2:]))
    tokens, encoder = None, "image encoder"
    if a.method == "styled":
        from .hosts.diffusers.vision import describe, image_tokens, load_clip_vision

        vision = load_clip_vision(a.image_encoder, a.device)
        tokens, encoder = image_tokens(vision, image.to(a.device)), describe(vision)
        del vision
    style = StyleOptions(guidance=a.guidance, inner_steps=a.style_inner_steps,
                         attention_weight=a.style_attention_loss, variant=a.style_variant)
    units = a.steps * (2 if a.method in OPTIMISED else 1)
    with phases(f"DDIM inversion + {a.method}", units) as tick:
        inv = invert(model, z0, a.source, steps=a.steps, grid=a.grid, method=a.method,
                     options=options, style=style, image_tokens=tokens, encoder=encoder,
                     direct=a.direct, precision=a.precision, progress=tick)
    if inv.precision is not None:
        log.info("%s; gradient checkpointing %s", inv.precision.describe(),
                 "on" if inv.checkpointing else "off")
    with phases(f"P2P sampling of {len(a.target)} edit(s)", inv.trajectory.num_steps) as tick:
        latents = edit(model, inv, spec, controller=controller, value_end=a.value_end,
                       progress=tick)
    out = Path(a.out)
    images = model.decode(latents)
    reconstruction = {"latent_mse": float(torch.nn.functional.mse_loss(latents[:1], z0)),
                      "psnr_db": psnr(images[:1], image)}
    paths = [str(save_png(images[:1], out / "reconstruction.png"))]
    paths += [str(save_png(images[k : k + 1], out / f"edit_{k}.png")) for k in range(1, len(images))]
    if not a.no_attention_maps:
        paths += _attention_pngs(controller, spec, from_hf(model.tokenizer),
                                 inv.trajectory.num_steps, images, latents, out)
    tiles = [(image, "input"), (images[:1], f"reconstruction ({a.method})")]
    tiles += [(images[k : k + 1], f"edit {k}: {t}") for k, t in enumerate(a.target, start=1)]
    sheet = contact_sheet(tiles, out / "contact_sheet.png", columns=min(len(tiles), 4),
                          title=f"source: {a.source}")
    report = {"model": {"name": model.name, "family": model.family.key,
                        "label": model.family.label},
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
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _attention_pngs(controller, spec: P2PSpec, tokenizer, num_steps: int, images, latents,
                    out: Path) -> list[str]:
    """Per-word cross-attention of every row (all steps, maps at a quarter of the latent side)
    over its image, and the LocalBlend masks: attention_source.png, attention_edit_k.png,
    blend_mask_k.png."""
    import numpy as np
    from PIL import Image

    from .alignment import tokenize
    from .attention.maps import AttentionMaps, average_maps, size_of, word_maps
    from .images import heatmap_grid

    blend = controller.local_blend
    hw = (int(latents.shape[-2]), int(latents.shape[-1]))
    prompts = (spec.source, *spec.targets)
    am = AttentionMaps.from_store(controller.store, prompts, num_steps, hw,
                                  None if blend is None else blend.last_mask)
    quarter = size_of("1/4", hw)
    sizes = quarter if quarter[0] in am.sizes else None
    written = []
    for row, prompt in enumerate(prompts):
        name = "attention_source" if row == 0 else f"attention_edit_{row}"
        maps, words = word_maps(average_maps(am, row, sizes, range(am.num_steps)),
                                tokenize(tokenizer, prompt))
        grid = heatmap_grid(images[row : row + 1], maps, words, f"'{prompt}' (all steps)")
        p = out / f"{name}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(p)
        written.append(str(p))
        if am.mask is not None and row > 0:
            m = (am.mask[row, 0].cpu().numpy() * 255).astype(np.uint8)
            mp = out / f"blend_mask_{row}.png"
            Image.fromarray(m).save(mp)
            written.append(str(mp))
    return written


def _grid_steps(a: argparse.Namespace, model) -> int:
    from .schedule import make_grid

    return make_grid(model.alphas_cumprod, a.steps, a.grid).num_steps


def cmd_demo(a: argparse.Namespace) -> dict:
    """Invert the cat photo into the demo model; compare DDIM, NPI and NTI reconstructions at
    guidance 7.5; run the demo edits; write PNGs, a contact sheet and report.json."""
    import torch.nn.functional as F

    from .editing import build_controller
    from .images import contact_sheet, load_image, psnr, save_png
    from .inversion import ddim_invert
    from .null_text import (
        direct_inversion,
        negative_prompt_inversion,
        null_text_optimize,
        plain_null,
    )
    from .sampling import p2p_sample
    from .schedule import make_grid
    from .tokenizer import from_hf

    _check_args(a)
    out = Path(a.out)
    phases = Phases(5)
    maps_png: list[str] = []
    t0 = time.perf_counter()
    with phases("load the demo model"):
        from .hosts.diffusers.demo import demo_sd1

        model = demo_sd1()
    t_build = time.perf_counter() - t0
    photo = Path(__file__).parent / "assets" / "gnochi_mirror.jpeg"
    x = load_image(photo, a.size)
    z0 = model.encode_image(x)
    vae_x = model.decode(z0)
    controllers = [(n, about, s, build_controller(model, s, a.steps, keep_step_maps=True))
                   for n, about, s in DEMO_EDITS]
    cond, null = model.encode_prompt(DEMO_SOURCE), model.encode_prompt("")
    timings: dict[str, float] = {}
    with phases(f"DDIM inversion ({a.steps} steps)", a.steps) as tick:
        t = time.perf_counter()
        traj = ddim_invert(model.denoiser, z0, cond, make_grid(model.alphas_cumprod, a.steps),
                           DEMO_SOURCE, progress=tick)
        timings["ddim_inversion"] = time.perf_counter() - t
    with phases("null-text optimisation (the paper's, then the fast mode)", 2 * a.steps) as tick:
        t = time.perf_counter()
        nti = null_text_optimize(model.denoiser, traj, null, progress=tick)
        timings["null_text"] = time.perf_counter() - t
        t = time.perf_counter()
        fast = null_text_optimize(model.denoiser, traj, null, NullTextOptions(fast=True),
                                  progress=tick)
        timings["null_text_fast"] = time.perf_counter() - t
    recon, rec_images = {}, {}
    methods = (("ddim", plain_null(traj, null)), ("negative-prompt", negative_prompt_inversion(traj)),
               ("null-text", nti), ("null-text-fast", fast), ("direct", direct_inversion(traj, null)))
    with phases("reconstructions at guidance 7.5 (DDIM, NPI, NTI, fast NTI, Direct)",
                len(methods) * a.steps) as tick:
        for name, u in methods:
            t = time.perf_counter()
            rec = p2p_sample(model.denoiser, traj, u, traj.embedding, progress=tick)
            timings[f"sample_{name}"] = time.perf_counter() - t
            rec_images[name] = model.decode(rec)
            recon[name] = {"latent_mse": float(F.mse_loss(rec, z0)),
                           "psnr_db": psnr(rec_images[name], x),
                           "relative_error": float((rec - z0).norm() / z0.norm())}
            save_png(rec_images[name], out / f"reconstruction_{name}.png")
    save_png(x, out / "input.png")
    save_png(vae_x, out / "input_vae_roundtrip.png")
    edits, edit_tiles = {}, []
    with phases(f"{len(controllers)} P2P edits", len(controllers) * a.steps) as tick:
        for name, about, spec, ctrl in controllers:
            t = time.perf_counter()
            contexts = torch.cat([traj.embedding, model.encode_prompt(spec.targets[0])])
            lat = p2p_sample(model.denoiser, traj, nti, contexts, controller=ctrl, progress=tick)
            timings[f"edit_{name}"] = time.perf_counter() - t
            img = model.decode(lat[1:2])
            save_png(img, out / f"edit_{name}.png")
            blend = ctrl.local_blend
            coverage = (None if blend is None or blend.last_mask is None
                        else float(blend.last_mask[1].float().mean()))
            edits[name] = {
                "target": spec.targets[0], "mode": spec.mode, "about": about,
                "reweight": spec.reweight, "blend_words": list(spec.blend_words),
                "blend_mask_coverage": coverage,
                "source_row_latent_mse": float(F.mse_loss(lat[:1], z0)),
                "edit_change_mse": float(F.mse_loss(lat[1:2], lat[:1])),
            }
            cover = "" if coverage is None else f" (mask {coverage:.0%})"
            edit_tiles.append((img, f"'{spec.targets[0]}'\n{about}{cover}"))
            if blend is not None:  # where the words look: the blended edit's target row
                maps_png = _attention_pngs(ctrl, spec, from_hf(model.tokenizer), a.steps,
                                           torch.cat([x, x]), lat, out / f"attention_{name}")
    ddim, npi, nti_err = (recon[k]["latent_mse"] for k in ("ddim", "negative-prompt", "null-text"))
    vae_psnr = psnr(vae_x, x)

    def label(name: str, title: str) -> str:
        r = recon[name]
        return f"{title}\nlatent MSE {r['latent_mse']:.2g}\n{r['psnr_db']:.1f} dB"

    tiles = [(x, f"input ({a.size}x{a.size} px)\n'{DEMO_SOURCE}'"), (vae_x, f"VAE round trip\n{vae_psnr:.1f} dB"),
             (rec_images["ddim"], label("ddim", "DDIM inversion, w 7.5")),
             (rec_images["negative-prompt"], label("negative-prompt", "negative-prompt inv.")),
             (rec_images["null-text"], label("null-text", "null-text inversion")),
             (rec_images["null-text-fast"], label("null-text-fast", "fast null-text")),
             (rec_images["direct"], label("direct", "Direct Inversion")), *edit_tiles]
    sheet = contact_sheet(
        tiles, out / "contact_sheet.png", columns=7,
        title=f"nti_core demo: {model.name}, {a.steps} steps, guidance 7.5 "
              f"(reconstructions from the inverted noise; edits from the null-text inversion)")
    report = {
        "what": "the demo model (trained by this project on six photos in three looks); "
                "see nti_core/hosts/diffusers_demo.py",
        "model": model.name, "image": f"{photo.name} centre-cropped to {a.size}²",
        "prompt": DEMO_SOURCE, "steps": a.steps, "guidance": 7.5, "grid": traj.grid.describe(),
        "vae_roundtrip_psnr_db": vae_psnr,
        "reconstruction_at_guidance_7.5": recon,
        "ddim_over_null_text": ddim / nti_err, "negative_prompt_over_null_text": npi / nti_err,
        "null_text": {"iterations": nti.iterations, "final_loss": nti.final_loss,
                      "first_loss": nti.first_loss},
        "null_text_fast": {"iterations": fast.iterations, "final_loss": fast.final_loss,
                           "first_loss": fast.first_loss},
        "edits": edits, "contact_sheet": str(sheet), "attention_maps": maps_png,
        "timings_s": {"load_model": t_build, **timings, "total": time.perf_counter() - t0},
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"latent MSE at guidance 7.5: DDIM {ddim:.3g} · negative-prompt {npi:.3g} · null-text "
          f"{nti_err:.3g} · fast null-text {recon['null-text-fast']['latent_mse']:.3g} "
          f"({timings['null_text'] / timings['null_text_fast']:.1f}× faster) · Direct "
          f"{recon['direct']['latent_mse']:.3g}; PSNR {recon['ddim']['psnr_db']:.1f} / "
          f"{recon['negative-prompt']['psnr_db']:.1f} / {recon['null-text']['psnr_db']:.1f} / "
          f"{recon['null-text-fast']['psnr_db']:.1f} / {recon['direct']['psnr_db']:.1f} dB "
          f"(VAE alone {vae_psnr:.1f} dB)")
    print(f"contact sheet: {sheet.resolve()}")
    return report


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default, except where there is none (required options, unset ones)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or action.default in (None, [], "", False):
            return action.help or ""
        return super()._get_help_string(action) or ""


def parser() -> argparse.ArgumentParser:
    fmt = _Help
    p = argparse.ArgumentParser(prog="python -m nti_core", description=__doc__.split("\n\n")[0],
                                formatter_class=fmt)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", formatter_class=fmt,
                       help="invert → null-text → edits on the built-in demo model (no download)",
                       description="Invert the cat photo of the Null-text paper into the demo "
                       "model, compare DDIM, negative-prompt and null-text reconstructions at "
                       "guidance 7.5, run the edits the demo model can express, and write PNGs, "
                       "contact_sheet.png and report.json.")
    d.add_argument("--out", default="nti_out/demo", help="output folder")
    d.add_argument("--steps", type=int, default=50, help="DDIM steps")
    d.add_argument("--size", type=int, default=256, help="square image side in pixels")

    e = sub.add_parser("edit", formatter_class=fmt,
                       help="edit a photo with a local SD 1.x, SD 2.x or SDXL model",
                       description="Invert a photo into an SD 1.x, SD 2.x or SDXL model (ε- or "
                       "v-prediction), optimise the null-text embeddings and sample "
                       "Prompt-to-Prompt edits; writes the reconstruction, one PNG per target, "
                       "contact_sheet.png and report.json (with the reconstruction's latent MSE "
                       "and PSNR).")
    e.add_argument("--model", required=True,
                   help="a diffusers folder of SD 1.x, SD 2.x or SDXL (StableDiffusionPipeline / "
                        "StableDiffusionXLPipeline), or a single-file SD 1.x .safetensors")
    e.add_argument("--image", required=True, help="the photo (centre-cropped to a square)")
    e.add_argument("--source", required=True, help="prompt describing the photo as it is")
    e.add_argument("--target", action="append", required=True,
                   help="edited prompt (repeat for several edits)")
    e.add_argument("--mode", choices=EDIT_MODES, default="auto",
                   help="replace: swap words (same count); refine: add words; reweight: target = "
                        "source; auto: picks one")
    e.add_argument("--method", choices=METHODS, default="null-text-fast",
                   help="null-text: the paper's optimisation of ∅; null-text-fast: the same "
                        "from the source prompt, without repeated passes (measured 6× faster at "
                        "lower error, README: Performance); "
                        "direct: Direct Inversion (no optimisation, the source row kept on the "
                        "pivot); negative-prompt: ∅ = the source prompt; styled: StyleDiffusion's "
                        "value embeddings (needs --image-encoder); none: plain DDIM inversion")
    e.add_argument("--direct", action="store_true",
                   help="with --method styled: also keep the source row on the pivot (Direct "
                        "Inversion)")
    e.add_argument("--no-attention-maps", action="store_true",
                   help="skip the attention-map PNGs (sampling then keeps only the maps "
                        "LocalBlend reads)")
    e.add_argument("--image-encoder", default=None,
                   help="StyleDiffusion's E: a transformers CLIP vision folder (the paper: "
                        "openai/clip-vit-base-patch16)")
    e.add_argument("--style-variant", choices=("official", "paper"), default="official",
                   help="mapping network: the official code's scale and shift of the prompt "
                        "embedding, or the paper's Table 1 (values from the image alone)")
    e.add_argument("--style-inner-steps", type=int, default=100,
                   help="StyleDiffusion's K: step i runs at most ⌈K·e^(−0.1·i)⌉ iterations")
    e.add_argument("--style-attention-loss", type=float, default=1.0,
                   help="λ of StyleDiffusion's attention loss (the official code: 1)")
    e.add_argument("--value-end", type=float, default=0.5,
                   help="StyleDiffusion τ_v: fraction of the first steps where the targets read "
                        "the learned values (then their own prompt)")
    e.add_argument("--steps", type=int, default=50, help="DDIM steps")
    e.add_argument("--grid", choices=GRID_KINDS, default="reference",
                   help="reference: the papers' 981…1 ending at ᾱ[0]; ddim_uniform: ComfyUI's")
    e.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    e.add_argument("--inner-steps", type=int, default=10, help="null-text Adam steps per DDIM step")
    e.add_argument("--early-stop", type=float, default=1e-5,
                   help="null-text early stop: loss < this + step·2e-5")
    e.add_argument("--cross", type=float, default=0.8,
                   help="fraction of steps with the source's cross-attention (the end, or the "
                        "start with --cross-end)")
    e.add_argument("--cross-end", type=float, default=None, help="makes --cross the start")
    e.add_argument("--self-steps", type=float, default=0.5,
                   help="fraction of steps with the source's self-attention")
    e.add_argument("--self-limit", type=int, choices=SELF_LIMITS, default=SELF_LIMITS[0],
                   help="largest self-attention map side injected: 32 as the null-text notebook, "
                        "16 as the P2P notebook and diffusers' Prompt2PromptPipeline")
    e.add_argument("--uncond-self", type=float, default=0.0,
                   help="P2Plus τ_u: fraction of the first steps where the targets' "
                        "unconditional branch takes the source's self-attention (0 = plain P2P)")
    e.add_argument("--attention-loss", type=float, default=0.0,
                   help="λ of the attention loss added to null-text optimisation (StyleDiffusion "
                        "§3.2): the ∅ pass's cross-attention pulled toward the source prompt's "
                        "maps recorded at inversion; 0 = the reference algorithm")
    e.add_argument("--reweight", default="", help="'word:value, …' scales words of the targets")
    e.add_argument("--blend", action="append", default=[],
                   help="LocalBlend word: only its region changes (repeatable)")
    e.add_argument("--subtract", action="append", default=[],
                   help="LocalBlend word whose region must not change (repeatable)")
    e.add_argument("--blend-threshold", type=float, default=0.3, help="LocalBlend mask threshold")
    e.add_argument("--blend-start", type=float, default=0.2,
                   help="fraction of steps after which LocalBlend applies")
    e.add_argument("--size", type=int, default=512, help="square image side in pixels")
    e.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, mps")
    e.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="the model's dtype: UNet, text encoders and VAE load and compute in it "
                        "(SDXL's VAE stays fp32 under fp16)")
    e.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="what the optimisation (null-text, StyleDiffusion) computes the UNet "
                        "in: model = the --dtype, forward and backward (∅, Adam and the loss "
                        "stay fp32; fp16 with loss scaling); fp32 = always fp32; auto = model "
                        "where measured within 1.5× of fp32's error (README: Precision)")
    e.add_argument("--out", default="nti_out/edit", help="output folder")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    _quiet_import_noise()
    try:
        report = cmd_demo(a) if a.command == "demo" else cmd_edit(a)
    except (ValueError, FileNotFoundError, NotImplementedError, OSError) as e:
        if a.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {Path(a.out).resolve()} (report.json)")
    log.debug("%s", report)
    return 0
