"""Command line: ``python -m nti_core edit …`` on a user's checkpoint, ``… demo`` on a built-in model.

Errors print as one line (``error: …``) with exit status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from .attention.plan import EDIT_MODES, P2PSpec
from .null_text import NullTextOptions
from .schedule import GRID_KINDS

log = logging.getLogger("nti_core")

DEMO_SOURCE = "a cat sitting next to a mirror"
DEMO_EDITS = (
    ("replace+blend", P2PSpec(DEMO_SOURCE, ("a tiger sitting next to a mirror",), mode="replace",
                              blend_words=("cat", "tiger"))),
    ("refine", P2PSpec(DEMO_SOURCE, ("a cat sitting next to a silver mirror",), mode="refine")),
    ("reweight", P2PSpec(DEMO_SOURCE, (DEMO_SOURCE,), mode="reweight", reweight="mirror:3")),
)


def _bar(total: int, desc: str):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, leave=False, disable=None)
    return bar, (lambda n=1: bar.update(n))


def _spec_from_args(a: argparse.Namespace) -> P2PSpec:
    cross: float | tuple[float, float] = a.cross if a.cross_end is None else (a.cross, a.cross_end)
    return P2PSpec(
        a.source, tuple(a.target), mode=a.mode, cross=cross, self_steps=a.self_steps,
        reweight=a.reweight or None, blend_words=tuple(a.blend), subtract_words=tuple(a.subtract),
        blend_threshold=a.blend_threshold, blend_start=a.blend_start,
    )


def cmd_edit(a: argparse.Namespace) -> dict:
    from .editing import build_controller, edit, invert
    from .hosts.diffusers_models import load_sd1
    from .images import load_image, save_png
    from .tokenizer import sd1_clip_tokenizer
    from .validate import check_prompt

    spec = _spec_from_args(a)
    options = NullTextOptions(guidance=a.guidance, inner_steps=a.inner_steps, early_stop=a.early_stop)
    check_prompt(a.source, "source prompt")
    for t in a.target:
        check_prompt(t, "target prompt")
    image = load_image(a.image, a.size)  # all cheap checks first, the plan with SD1's vocabulary
    try:
        tok = sd1_clip_tokenizer()
    except FileNotFoundError:
        log.info("no standalone CLIP vocabulary: the edit plan is checked after the model loads")
    else:
        spec.build(tok, a.steps)
    dtype = a.dtype
    if a.method == "null-text" and dtype != "fp32":
        log.info("null-text optimisation fails in %s (REFERENCE §3): the UNet runs in fp32", dtype)
        dtype = "fp32"
    model = load_sd1(a.model, a.device, dtype)
    controller = build_controller(model, spec, _grid_steps(a, model))
    z0 = model.encode_image(image)
    bar, tick = _bar(a.steps * 2, "invert")
    inv = invert(model, z0, a.source, steps=a.steps, grid=a.grid, method=a.method,
                 options=options, progress=tick)
    bar.close()
    bar, tick = _bar(inv.trajectory.num_steps, "edit")
    latents = edit(model, inv, spec, controller=controller, progress=tick)
    bar.close()
    out = Path(a.out)
    images = model.decode(latents)
    paths = [str(save_png(images[:1], out / "reconstruction.png"))]
    paths += [str(save_png(images[k : k + 1], out / f"edit_{k}.png")) for k in range(1, len(images))]
    report = {"paths": paths, "uncond": inv.uncond.report(), "timings": inv.timings}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _grid_steps(a: argparse.Namespace, model) -> int:
    from .schedule import make_grid

    return make_grid(model.alphas_cumprod, a.steps, a.grid).num_steps


def cmd_demo(a: argparse.Namespace) -> dict:
    """Invert the cat photo into a small random-weight SD1-shaped model; compare DDIM, NPI and NTI
    reconstructions at guidance 7.5; run three P2P edits; write images and report.json."""
    import torch.nn.functional as F

    from .editing import build_controller, edit, invert
    from .hosts.diffusers_models import tiny_sd1
    from .images import load_image, save_png
    from .null_text import negative_prompt_inversion, plain_null
    from .sampling import p2p_sample

    out = Path(a.out)
    t0 = time.perf_counter()
    model = tiny_sd1(seed=a.seed)
    t_build = time.perf_counter() - t0
    photo = Path(__file__).parent / "assets" / "gnochi_mirror.jpeg"
    x = load_image(photo, a.size)
    z0 = model.encode_image(x)
    controllers = [(n, s, build_controller(model, s, a.steps)) for n, s in DEMO_EDITS]
    bar, tick = _bar(a.steps * 2, "invert + null-text")
    inv = invert(model, z0, DEMO_SOURCE, steps=a.steps, method="null-text", progress=tick)
    bar.close()
    traj, null = inv.trajectory, model.encode_prompt("")
    recon, timings = {}, dict(inv.timings)
    for name, u in (("ddim", plain_null(traj, null)), ("negative-prompt", negative_prompt_inversion(traj)),
                    ("null-text", inv.uncond)):
        t = time.perf_counter()
        rec = p2p_sample(model.denoiser, traj, u, traj.embedding)
        timings[f"sample_{name}"] = time.perf_counter() - t
        recon[name] = {"latent_mse": float(F.mse_loss(rec, z0)),
                       "relative_error": float((rec - z0).norm() / z0.norm())}
        save_png(model.decode(rec), out / f"reconstruction_{name}.png")
    save_png(x, out / "input.png")
    save_png(model.decode(z0), out / "input_vae_roundtrip.png")
    edits = {}
    for name, spec, ctrl in controllers:
        t = time.perf_counter()
        lat = edit(model, inv, spec, controller=ctrl)
        timings[f"edit_{name}"] = time.perf_counter() - t
        imgs = model.decode(lat)
        save_png(imgs[1:2], out / f"edit_{name}.png")
        blend = ctrl.local_blend
        edits[name] = {
            "target": spec.targets[0],
            "mode": spec.mode,
            "blend_mask_coverage": None if blend is None or blend.last_mask is None
            else float(blend.last_mask[1].float().mean()),
            "source_row_equals_null_text_reconstruction_mse": float(
                F.mse_loss(lat[:1], z0)),
            "edit_change_mse": float(F.mse_loss(lat[1:2], lat[:1])),
        }
    ddim, nti = recon["ddim"]["latent_mse"], recon["null-text"]["latent_mse"]
    npi = recon["negative-prompt"]["latent_mse"]
    report = {
        "what": "random-weight SD1-shaped model: shows the machinery, not real edits",
        "model": model.name, "image": f"{photo.name} centre-cropped to {a.size}²",
        "prompt": DEMO_SOURCE, "steps": a.steps, "guidance": 7.5, "grid": traj.grid.describe(),
        "reconstruction_at_guidance_7.5": recon,
        "ddim_over_null_text": ddim / nti, "ddim_over_negative_prompt": ddim / npi,
        "null_text": {"iterations": inv.uncond.iterations, "final_loss": inv.uncond.final_loss,
                      "first_loss": inv.uncond.first_loss},
        "edits": edits,
        "timings_s": {"build_model": t_build, **timings, "total": time.perf_counter() - t0},
        "torch_threads": torch.get_num_threads(),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"DDIM {ddim:.4g} · negative-prompt {npi:.4g} · null-text {nti:.4g} "
          f"(latent MSE at guidance 7.5; DDIM/NTI = {ddim / nti:.1f}×)")
    return report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nti_core", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run inversion → null-text → edits on a built-in model")
    d.add_argument("--out", default="nti_out/demo", help="output folder")
    d.add_argument("--steps", type=int, default=50)
    d.add_argument("--size", type=int, default=256, help="square image side in pixels")
    d.add_argument("--seed", type=int, default=0, help="seed of the random weights")

    e = sub.add_parser("edit", help="edit a photo with a local SD 1.x checkpoint")
    e.add_argument("--model", required=True, help="diffusers folder or .safetensors/.ckpt file")
    e.add_argument("--image", required=True)
    e.add_argument("--source", required=True, help="prompt describing the photo")
    e.add_argument("--target", action="append", required=True, help="edited prompt (repeatable)")
    e.add_argument("--mode", choices=EDIT_MODES, default="auto")
    e.add_argument("--method", choices=("null-text", "negative-prompt", "none"), default="null-text")
    e.add_argument("--steps", type=int, default=50)
    e.add_argument("--grid", choices=GRID_KINDS, default="reference")
    e.add_argument("--guidance", type=float, default=7.5)
    e.add_argument("--inner-steps", type=int, default=10)
    e.add_argument("--early-stop", type=float, default=1e-5)
    e.add_argument("--cross", type=float, default=0.8, help="cross-attention injection fraction")
    e.add_argument("--cross-end", type=float, default=None, help="makes --cross the start")
    e.add_argument("--self-steps", type=float, default=0.5, help="self-attention injection fraction")
    e.add_argument("--reweight", default="", help="'word:value, …' for the target prompt")
    e.add_argument("--blend", action="append", default=[], help="LocalBlend word (repeatable)")
    e.add_argument("--subtract", action="append", default=[], help="LocalBlend subtract word")
    e.add_argument("--blend-threshold", type=float, default=0.3)
    e.add_argument("--blend-start", type=float, default=0.2)
    e.add_argument("--size", type=int, default=512)
    e.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, mps")
    e.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="UNet precision for negative-prompt/none (null-text always runs fp32)")
    e.add_argument("--out", default="nti_out/edit")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
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
