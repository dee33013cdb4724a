"""``python -m nti_core demo``: the cat photo of the Null-text paper through the pipeline a user's
edit runs (``nti_core.editing``), on the demo model that ships with the pack: every inversion
method's reconstruction at guidance 7.5, then the edits the demo model can express."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from ..attention.plan import P2PSpec
from ..editing import build_controller, ddim, edit, optimise
from ..images import contact_sheet, load_image, psnr, save_png
from ..methods import METHODS, REFERENCE
from .args import check_args
from .phases import Phases
from .render import attention_pngs

DEMO_SOURCE = "a photo of a cat sitting next to a mirror"
DEMO_EDITS = (  # what the demo model can express: its training looks (hosts/diffusers/demo.py)
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
SHOWN = tuple(n for n, m in METHODS.items() if not m.needs_encoder)  # no encoder in the demo


def run(a: argparse.Namespace) -> dict:
    """Invert the cat photo into the demo model; compare the reconstructions of every method
    that needs no image encoder at guidance 7.5; run the demo edits from the null-text
    inversion; write PNGs, a contact sheet and report.json."""
    check_args(a)
    out = Path(a.out)
    phases = Phases(5)
    maps_png: list[str] = []
    t0 = time.perf_counter()
    with phases("load the demo model"):
        from ..hosts.diffusers.demo import demo_sd1

        model = demo_sd1()
    t_build = time.perf_counter() - t0
    photo = Path(__file__).resolve().parents[1] / "assets" / "gnochi_mirror.jpeg"
    x = load_image(photo, a.size)
    z0 = model.encode_image(x)
    vae_x = model.decode(z0)
    controllers = [(n, about, s, build_controller(model, s, a.steps, keep_step_maps=True))
                   for n, about, s in DEMO_EDITS]
    timings: dict[str, float] = {}
    with phases(f"DDIM inversion ({a.steps} steps)", a.steps) as tick:
        t = time.perf_counter()
        traj = ddim(model, z0, DEMO_SOURCE, steps=a.steps, progress=tick)
        timings["ddim_inversion"] = time.perf_counter() - t
    inversions = {}
    optimised = [n for n in SHOWN if METHODS[n].optimises]
    with phases("null-text optimisation (the paper's, then the fast mode)",
                len(optimised) * a.steps) as tick:
        for name in optimised:
            inversions[name] = optimise(model, traj, name, progress=tick)
            timings[name] = inversions[name].timings[name]
    for name in SHOWN:
        if name not in inversions:
            inversions[name] = optimise(model, traj, name)
    recon, rec_images = {}, {}
    with phases("reconstructions at guidance 7.5 (DDIM, NPI, NTI, fast NTI, Direct)",
                len(SHOWN) * a.steps) as tick:
        for name in SHOWN:
            t = time.perf_counter()
            rec = edit(model, inversions[name], progress=tick)
            timings[f"sample_{name}"] = time.perf_counter() - t
            rec_images[name] = model.decode(rec)
            recon[name] = {"latent_mse": float(F.mse_loss(rec, z0)),
                           "psnr_db": psnr(rec_images[name], x),
                           "relative_error": float((rec - z0).norm() / z0.norm())}
            save_png(rec_images[name], out / f"reconstruction_{name}.png")
    save_png(x, out / "input.png")
    save_png(vae_x, out / "input_vae_roundtrip.png")
    edits, edit_tiles = {}, []
    nti = inversions[REFERENCE]
    with phases(f"{len(controllers)} P2P edits", len(controllers) * a.steps) as tick:
        for name, about, spec, ctrl in controllers:
            t = time.perf_counter()
            lat = edit(model, nti, spec, controller=ctrl, progress=tick)
            timings[f"edit_{name}"] = time.perf_counter() - t
            img = model.decode(lat[1:2])
            save_png(img, out / f"edit_{name}.png")
            blend = ctrl.local_blend
            coverage = (None if blend is None or blend.last_mask is None
                        else float(blend.last_mask[1].float().mean()))
            edits[name] = {
                "about": about, "spec": asdict(spec),
                "blend_mask_coverage": coverage,
                "source_row_latent_mse": float(F.mse_loss(lat[:1], z0)),
                "edit_change_mse": float(F.mse_loss(lat[1:2], lat[:1])),
            }
            cover = "" if coverage is None else f" (mask {coverage:.0%})"
            edit_tiles.append((img, f"'{spec.targets[0]}'\n{about}{cover}"))
            if blend is not None:  # where the words look: the blended edit's target row
                maps_png = attention_pngs(ctrl, spec, model.plan_tokenizer(), a.steps,
                                          torch.cat([x, x]), lat, out / f"attention_{name}")
    vae_psnr = psnr(vae_x, x)

    def label(name: str) -> str:
        r = recon[name]
        return f"{name} (w 7.5)\nlatent MSE {r['latent_mse']:.2g}\n{r['psnr_db']:.1f} dB"

    tiles = [(x, f"input ({a.size}x{a.size} px)\n'{DEMO_SOURCE}'"),
             (vae_x, f"VAE round trip\n{vae_psnr:.1f} dB"),
             *((rec_images[n], label(n)) for n in SHOWN), *edit_tiles]
    sheet = contact_sheet(
        tiles, out / "contact_sheet.png", columns=7,
        title=f"nti_core demo: {model.name}, {a.steps} steps, guidance 7.5 "
              f"(reconstructions from the inverted noise; edits from the null-text inversion)")
    reference = recon[REFERENCE]["latent_mse"]
    report = {
        "what": "the demo model (trained by this project on six photos in three looks); "
                "see nti_core/hosts/diffusers/demo.py",
        "model": model.name, "image": f"{photo.name} centre-cropped to {a.size}²",
        "prompt": DEMO_SOURCE, "steps": a.steps, "guidance": 7.5, "grid": traj.grid.describe(),
        "vae_roundtrip_psnr_db": vae_psnr,
        "reconstruction_at_guidance_7.5": recon,
        "over_reference": {n: recon[n]["latent_mse"] / reference for n in SHOWN},
        **{n.replace("-", "_"): {"iterations": inversions[n].uncond.iterations,
                                 "final_loss": inversions[n].uncond.final_loss,
                                 "first_loss": inversions[n].uncond.first_loss}
           for n in optimised},
        "edits": edits, "contact_sheet": str(sheet), "attention_maps": maps_png,
        "timings_s": {"load_model": t_build, **timings, "total": time.perf_counter() - t0},
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print("at guidance 7.5 (latent MSE, PSNR): " + " · ".join(
        f"{n} {recon[n]['latent_mse']:.3g}, {recon[n]['psnr_db']:.1f} dB" for n in SHOWN)
        + f" (VAE alone {vae_psnr:.1f} dB); "
        + " · ".join(f"{n} {timings[n]:.1f} s" for n in optimised))
    print(f"contact sheet: {sheet.resolve()}")
    return report
