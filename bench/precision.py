"""Mixed precision against all-fp32, per method: reconstruction error, ∅ distance, iterations.

    python bench/precision.py --model demo --out bench/results/precision_demo_cpu.json

Each configuration is a (model dtype, optimisation precision) pair, ``nti_core.precision``:

- ``fp32``: everything in fp32 — the baseline;
- ``bf16/model``, ``fp16/model``: the UNet in half precision for inversion, optimisation
  (forward and backward; ∅, Adam and the loss in fp32; fp16 with loss scaling) and sampling;
- ``bf16/fp32``, ``fp16/fp32``: the half UNet for the inversion; the optimisation's passes and
  the sampling with its ∅ in fp32 (what precision ``fp32`` does: sampling follows the dtype
  the ∅ were optimised in, ``precision.sampling_dtype``).

Half precision is real here: the UNet's weights and activations are bf16 / fp16 and PyTorch's
CPU kernels compute in them (slowly: no bf16/fp16 units on most CPUs). Per method and
configuration: the guidance-7.5 reconstruction's latent MSE against the photo's latent (sampled
in the dtype the ∅ were optimised in, as the CLI and P2P Sample sample), its ratio to all-fp32's, the distance of ∅ (of the
values, for StyleDiffusion) from all-fp32's relative to how far all-fp32's moved from where it
started, optimiser iterations, steps stopped early, loss-scaling skips and seconds. The last
lines say, per half dtype, whether ``model`` kept every optimising method within 1.5× of
all-fp32's error — the rule ``auto`` follows (``nti_core.precision.AUTO``).

``--model demo`` is the trained demo model; ``--model sd15`` a full-size SD 1.5 UNet with random
weights (bench/unets.py) with the demo model's text encoder and VAE.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

OPTIMISING = ("null-text", "null-text-fast", "null-text+attention", "styled")
SAMPLING_ONLY = ("negative-prompt", "direct")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load(name: str):
    from nti_core.hosts.diffusers.demo import demo_sd1
    from nti_core.hosts.diffusers.models import SDModel

    demo = demo_sd1()
    if name == "demo":
        return demo
    from unets import random_unet

    return SDModel(random_unet("sd1"), demo.vae, demo.text_encoder, demo.tokenizer,
                   demo.alphas_cumprod, "SD 1.5 UNet (random weights) + demo text encoder/VAE")


def configs(dtypes: list[str]) -> list[tuple[str, torch.dtype, str]]:
    out = [("fp32", torch.float32, "auto")]
    for d in dtypes:
        out += [(f"{d}/model", DTYPES[d], "model"), (f"{d}/fp32", DTYPES[d], "fp32")]
    return out


def optimise(m, traj, null, method: str, choice: str, tokens, style_inner: int = 100):
    """∅ (and values) of ``method`` with the optimisation at ``choice``; the start of what is
    optimised, for the distance."""
    from nti_core import NullTextOptions, null_text_optimize
    from nti_core.null_text import direct_inversion, negative_prompt_inversion, plain_null
    from nti_core.precision import resolve
    from nti_core.style import StyleOptions, style_invert

    den = m.denoiser
    if method == "negative-prompt":
        return negative_prompt_inversion(traj), None
    if method == "direct":
        return direct_inversion(traj, null), None
    prec = resolve(choice, den.dtype)
    with den.optimising(prec):
        if method == "styled":
            return plain_null(traj, null), style_invert(
                den, traj, tokens, null, StyleOptions(inner_steps=style_inner), precision=prec)
        opts = NullTextOptions(fast=method == "null-text-fast",
                               attention_weight=1.0 if method == "null-text+attention" else 0.0)
        return null_text_optimize(den, traj, null, opts, precision=prec), None


def values_at(values, traj) -> torch.Tensor:
    return torch.cat([values.values(i, traj.embedding.float()) for i in range(traj.num_steps)])


def run(a) -> dict:
    from core_support import PHOTOS, photo_image
    from tiny_models import tiny_clip_vision

    from nti_core import ddim_invert, make_grid
    from nti_core.hosts.diffusers import cast_unet
    from nti_core.hosts.diffusers.vision import image_tokens
    from nti_core.precision import sampling_dtype
    from nti_core.sampling import p2p_sample

    torch.manual_seed(0)
    m = load(a.model)
    master = {k: v.detach().clone().float() for k, v in m.unet.state_dict().items()}
    photo = "gnochi_mirror"
    x = photo_image(photo, a.size)
    z0 = m.encode_image(x)
    cond, null = m.encode_prompt(PHOTOS[photo]), m.encode_prompt("")
    grid = make_grid(m.alphas_cumprod, a.steps)
    tokens = image_tokens(tiny_clip_vision(0), x) if "styled" in a.methods else None
    result: dict = {"model": m.name, "photo": photo, "size": a.size, "steps": a.steps,
                    "style_inner_steps": a.style_inner,
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu": platform.processor() or platform.machine(), "configs": {}}
    reference: dict[str, torch.Tensor] = {}
    start_of: dict[str, torch.Tensor] = {}
    for label, dtype, choice in configs(a.dtypes):
        m.unet.load_state_dict(master)
        cast_unet(m.unet, dtype)
        t0 = time.perf_counter()
        traj = ddim_invert(m.denoiser, z0, cond, grid, PHOTOS[photo], record_maps=True)
        rows = {"_inversion_s": time.perf_counter() - t0}
        for method in a.methods:
            t0 = time.perf_counter()
            uncond, values = optimise(m, traj, null, method, choice, tokens, a.style_inner)
            seconds = time.perf_counter() - t0
            dtype_s = sampling_dtype(m.denoiser.dtype, uncond, values)
            with m.denoiser.computing(dtype_s):  # as the CLI and P2P Sample sample
                rec = p2p_sample(m.denoiser, traj, uncond, traj.embedding, values=values)
            what = values_at(values, traj) if values is not None else uncond.embeddings.float()
            row = {"latent_mse": float(F.mse_loss(rec.float(), z0)), "seconds": seconds}
            if label == "fp32":
                reference[method] = what
                start_of[method] = (traj.embedding.float() if method in ("null-text-fast",
                                                                         "negative-prompt")
                                    else null.float()).expand_as(what)
                if values is not None:
                    start_of[method] = traj.embedding.float().expand_as(what)
            else:
                moved = (reference[method] - start_of[method]).norm()
                row["distance"] = float((what - reference[method]).norm() / moved.clamp_min(1e-12))
            log = values if values is not None else uncond
            if log.iterations:
                budget = [10] * len(log.iterations) if values is None else None
                row["iterations"] = sum(log.iterations)
                row["stopped_early"] = (sum(i < b for i, b in zip(log.iterations, budget))
                                        if budget else None)
                row["skipped"] = log.skipped
                row["precision"] = log.precision
            rows[method] = row
            print(f"{label:10s} {method:22s} " + " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                if k != "precision"), flush=True)
        result["configs"][label] = rows
    base = result["configs"]["fp32"]
    for rows in result["configs"].values():
        for method, row in rows.items():
            if isinstance(row, dict):
                row["ratio_to_fp32"] = row["latent_mse"] / max(base[method]["latent_mse"], 1e-30)
    result["decision"] = decide(result, a.dtypes)
    return result


def decide(result: dict, dtypes: list[str]) -> dict:
    """Per half dtype: 'model' when every optimising method stayed within 1.5× of all-fp32's
    reconstruction error with the optimisation at the model's dtype, else 'fp32'."""
    out = {}
    for d in dtypes:
        rows = result["configs"][f"{d}/model"]
        worst = max(rows[m]["ratio_to_fp32"] for m in OPTIMISING if m in rows)
        out[d] = {"worst_ratio": worst, "auto": "model" if worst <= 1.5 else "fp32"}
    return out


def table(result: dict) -> str:
    lines = ["| method | config | latent MSE | × fp32 | ∅ distance | iterations | early stops "
             "| skipped | s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    methods = [k for k in result["configs"]["fp32"] if not k.startswith("_")]
    for method in methods:
        for label, rows in result["configs"].items():
            r = rows[method]
            dist = f"{r['distance']:.3f}" if "distance" in r else "—"
            lines.append(f"| {method} | {label} | {r['latent_mse']:.3e} | "
                         f"{r['ratio_to_fp32']:.2f} | {dist} | {r.get('iterations', '—')} | "
                         f"{r.get('stopped_early') if r.get('stopped_early') is not None else '—'} "
                         f"| {r.get('skipped', '—')} | {r['seconds']:.1f} |")
    for d, v in result["decision"].items():
        lines.append(f"\n{d}: worst ratio {v['worst_ratio']:.2f} → auto = {v['auto']}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("demo", "sd15"), default="demo")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dtypes", default="bf16,fp16")
    p.add_argument("--methods", default=",".join(OPTIMISING + SAMPLING_ONLY))
    p.add_argument("--style-inner", type=int, default=100,
                   help="StyleDiffusion's K (the official 100; less keeps the full-size UNet "
                        "affordable on a CPU)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    a.dtypes = [d for d in a.dtypes.split(",") if d]
    a.methods = [m for m in a.methods.split(",") if m]
    if a.threads:
        torch.set_num_threads(a.threads)
    result = run(a)
    print(table(result))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
