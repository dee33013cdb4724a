"""The first GPU run, prepared: family × precision × method on whatever device is at hand.

    python bench/gpu_check.py --out gpu_check.json            # a CUDA GPU, ~5 min on an H100
    python bench/gpu_check.py --smoke --out smoke.json        # toy sizes on the CPU, < 2 min

No download: the trained demo model (SD 1.x-shaped, 512²), a full-size SD 1.5 UNet (512²) and a
full-size SDXL UNet (1024²) with random weights from diffusers' classes and the published
configs (bench/unets.py); the photo is the demo cat, encoded by the demo VAE; SD 1.5's prompts
come from the demo text encoder, SDXL's are random embeddings of its layout. Every run goes
through the engine as the CLI does — DDIM inversion, the method's optimisation with the precision
policy (``nti_core.precision``), one P2P edit (replace + LocalBlend) — on the chosen device,
which is also the check that no tensor made on one device meets another.

Per family × precision × method it prints one table row and writes JSON: seconds per optimiser
iteration, UNet passes (rows through the UNet; a backward counts two), the peak of
``torch.cuda.max_memory_allocated`` per stage (inversion, optimisation, sampling; on the CPU the
process's peak RSS instead, labelled), whether a stage stopped on NaN/inf (``nti_core.finite``),
the reconstruction's latent MSE against the photo's latent and its ratio to the same
family's fp32 run. ``--smoke`` swaps in the test suite's tiny SD 1.x / SDXL models at 64² and 3
steps so the script runs in CI and cannot rot.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

PRECISIONS = {"fp32": (torch.float32, "model"), "bf16": (torch.bfloat16, "model"),
              "fp16": (torch.float16, "model")}
# family → (side, steps, methods) of the full run; --smoke: 64², 3 steps, the fast methods
PLAN = {
    "demo": (512, 50, ("null-text", "null-text-fast", "styled", "direct")),
    "sd15": (512, 50, ("null-text", "null-text-fast", "direct")),
    "sdxl": (1024, 20, ("null-text-fast", "direct")),
}
SMOKE = ("null-text-fast", "direct")
SMOKE_INNER = 2  # optimiser iterations per step at most in --smoke (the paper's 10 otherwise)


@dataclass
class Subject:
    """What a run needs: a UNet and its denoiser, the photo's latent, the prompts."""

    name: str
    unet: torch.nn.Module
    denoiser: object
    z0: torch.Tensor
    cond: torch.Tensor
    target: torch.Tensor
    null: torch.Tensor
    tokens: torch.Tensor | None


def subject(name: str, side: int, device: torch.device, smoke: bool) -> Subject:
    from tiny_models import tiny_clip_vision, tiny_sd1, tiny_sdxl

    from nti_core.hosts.diffusers import DiffusersDenoiser
    from nti_core.hosts.diffusers.demo import demo_sd1
    from nti_core.hosts.diffusers.vision import image_tokens
    from nti_core.images import load_image

    demo = demo_sd1(device=device)
    photo = load_image(ROOT / "nti_core" / "assets" / "gnochi_mirror.jpeg", side).to(device)
    z0 = demo.encode_image(photo)
    source, target = ("a photo of a cat sitting next to a mirror",
                      "a photo of a dog sitting next to a mirror")
    tokens = image_tokens(tiny_clip_vision(0).to(device), photo)
    if name == "demo":
        m = demo
    elif name == "sd15":
        if smoke:
            m = tiny_sd1(device=device)
        else:
            from unets import random_unet

            m = demo
            unet = random_unet("sd1", device=device)
            den = DiffusersDenoiser(unet, demo.alphas_cumprod)
            return Subject(name, unet, den, z0, demo.encode_prompt(source),
                           demo.encode_prompt(target), demo.encode_prompt(""), tokens)
    else:
        from nti_core.family import SDXL

        if smoke:
            m = tiny_sdxl(device=device)
        else:
            from unets import random_unet

            unet = random_unet("sdxl", device=device)
            den = DiffusersDenoiser(unet, demo.alphas_cumprod, SDXL)
            g = torch.Generator().manual_seed(0)

            def prompt() -> torch.Tensor:
                return SDXL.pack(torch.randn(1, 77, 2048, generator=g),
                                 torch.randn(1, 1280, generator=g)).to(device)

            cond = prompt()
            return Subject(name, unet, den, z0, cond, cond.clone(), prompt(), tokens)
    return Subject(name, m.unet, m.denoiser, z0, m.encode_prompt(source),
                   m.encode_prompt(target), m.encode_prompt(""), tokens)


class Peak:
    """Peak memory of a stage: CUDA's allocator on a GPU, the process's RSS elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.label = "cuda_max_allocated_mb" if self.cuda else "process_peak_rss_mb"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            from inversion import reset_peak

            reset_peak()

    def read(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        from inversion import peak_mb

        return peak_mb()


def run_one(s: Subject, precision: str, method: str, steps: int, peak: Peak,
            inner: int = 10) -> dict:
    from inversion import UNetCounter

    from nti_core import NullTextOptions, ddim_invert, make_grid, null_text_optimize
    from nti_core.attention.edits import LocalBlend, P2PController
    from nti_core.family import TOKENS
    from nti_core.finite import NonFiniteError
    from nti_core.hosts.diffusers import cast_unet
    from nti_core.null_text import direct_inversion, plain_null
    from nti_core.precision import resolve
    from nti_core.sampling import p2p_sample
    from nti_core.style import StyleOptions, style_invert

    dtype, choice = PRECISIONS[precision]
    cast_unet(s.unet, dtype)
    den, counter = s.denoiser, UNetCounter(s.unet)

    def passes() -> int:
        n = counter.forward_equivalents
        counter.reset()
        return n

    grid = make_grid(den.alphas_cumprod, steps)
    row: dict = {"memory": peak.label, "nan": None}
    try:
        peak.reset()
        t0 = time.perf_counter()
        traj = ddim_invert(den, s.z0, s.cond, grid, "source")
        row["inversion_s"], row["inversion_peak_mb"] = time.perf_counter() - t0, peak.read()
        row["passes"] = passes()
        prec = resolve(choice, den.dtype)
        peak.reset()
        t0 = time.perf_counter()
        values, log = None, None
        if method == "direct":
            uncond = direct_inversion(traj, s.null)
        elif method == "styled":
            uncond = plain_null(traj, s.null)
            with den.optimising(prec):
                values = log = style_invert(den, traj, s.tokens, s.null,
                                            StyleOptions(inner_steps=10 * inner), precision=prec)
        else:
            with den.optimising(prec):
                uncond = log = null_text_optimize(
                    den, traj, s.null,
                    NullTextOptions(fast=method == "null-text-fast", inner_steps=inner),
                    precision=prec)
        seconds = time.perf_counter() - t0
        row["optimisation_peak_mb"] = peak.read() if log is not None else None
        row["passes"] += passes()
        iterations = sum(log.iterations) if log is not None else 0
        row["iterations"], row["optimisation_s"] = iterations, seconds
        row["s_per_iteration"] = seconds / iterations if iterations else None
        peak.reset()
        t0 = time.perf_counter()
        rec = p2p_sample(den, traj, uncond, traj.embedding, values=values)
        length = TOKENS  # the keys' length (SDXL's 78th row is its pooled vector)
        words = torch.zeros(2, length)
        words[:, 5] = 1.0  # one word's maps (LocalBlend reads a quarter of the latent side)
        ctrl = P2PController(torch.ones(steps + 1, 1, length), (0, steps // 2),
                             replace=torch.eye(length)[None],
                             local_blend=LocalBlend(words, steps // 5))
        p2p_sample(den, traj, uncond, torch.cat([traj.embedding, s.target]), controller=ctrl,
                   values=values)
        row["sampling_s"], row["sampling_peak_mb"] = time.perf_counter() - t0, peak.read()
        row["passes"] += passes()
        row["latent_mse"] = float(F.mse_loss(rec.float(), s.z0.float()))
    except NonFiniteError as e:
        row["nan"] = str(e)
    finally:
        counter.remove()
        cast_unet(s.unet, torch.float32)
    return row


def run(a) -> dict:
    device = torch.device(a.device)
    peak = Peak(device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else platform.processor() or platform.machine(),
              "torch": torch.__version__, "smoke": a.smoke, "rows": []}
    start = time.perf_counter()
    for family in a.families:
        side, steps, methods = PLAN[family]
        if a.smoke:
            side, steps, methods = 64, 3, tuple(m for m in methods if m in SMOKE)
        s = subject(family, side, device, a.smoke)
        base: dict[str, float] = {}
        for precision in a.precisions:
            for method in methods:
                row = run_one(s, precision, method, steps, peak,
                              SMOKE_INNER if a.smoke else 10)
                row.update(family=family, side=side, steps=steps, precision=precision,
                           method=method)
                if precision == "fp32" and "latent_mse" in row:
                    base[method] = row["latent_mse"]
                if "latent_mse" in row and method in base and base[method] > 0:
                    row["ratio_to_fp32"] = row["latent_mse"] / base[method]
                result["rows"].append(row)
                print(line(row), flush=True)
        del s
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["seconds"] = time.perf_counter() - start
    return result


HEADER = ("| family | precision | method | s/it | UNet passes | peak MB inv / opt / sample | "
          "NaN | latent MSE | × fp32 |\n|---|---|---|---:|---:|---|---|---:|---:|")


def line(r: dict) -> str:
    def mb(k: str) -> str:
        return "—" if r.get(k) is None else f"{r[k]:.0f}"

    spi = "—" if r.get("s_per_iteration") is None else f"{r['s_per_iteration']:.3f}"
    nan = "no" if r["nan"] is None else "YES"
    mse = "—" if "latent_mse" not in r else f"{r['latent_mse']:.3e}"
    ratio = "—" if "ratio_to_fp32" not in r else f"{r['ratio_to_fp32']:.2f}"
    return (f"| {r['family']} {r['side']}² | {r['precision']} | {r['method']} | {spi} | "
            f"{r.get('passes', '—')} | {mb('inversion_peak_mb')} / {mb('optimisation_peak_mb')} / "
            f"{mb('sampling_peak_mb')} | {nan} | {mse} | {ratio} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--families", default=",".join(PLAN))
    p.add_argument("--precisions", default=",".join(PRECISIONS))
    p.add_argument("--smoke", action="store_true",
                   help="toy sizes (64², 3 steps, tiny UNets) on the CPU: the test suite's run")
    p.add_argument("--out", default=None, help="JSON file")
    a = p.parse_args()
    a.families = [f for f in a.families.split(",") if f]
    a.precisions = [x for x in a.precisions.split(",") if x]
    if a.smoke:
        a.device = "cpu"
    print(HEADER)
    result = run(a)
    print(f"\n{result['device']}, torch {result['torch']}: {result['seconds']:.0f} s")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
