"""Null-text optimisation cost: this engine against the reference semantics, in one process.

The baseline is the test's literal transcription of REFERENCE §3 (tests/test_inversion.py), run the
way the reference notebook runs it: UNet weights left trainable, so every backward also computes
weight gradients. Both runs take the same trajectory and the same number of inner iterations
(early stop off), so the ratio is the cost per iteration. Measured on the trained demo model.
Run: python bench/null_text_speed.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from core_support import CAT, PHOTOS, demo_model  # noqa: E402
from test_inversion import reference_null_text  # noqa: E402

from nti_core import NullTextOptions, ddim_invert, make_grid, null_text_optimize  # noqa: E402
from nti_core.images import load_image  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    m = demo_model()  # the trained demo model (nti_core/hosts/diffusers_demo.py)
    z0 = m.encode_image(load_image(CAT, a.size))
    prompt = PHOTOS["gnochi_mirror"]
    c, null = m.encode_prompt(prompt), m.encode_prompt("")
    grid = make_grid(m.alphas_cumprod, a.steps)
    traj = ddim_invert(m.denoiser, z0, c, grid, prompt)
    opts = NullTextOptions(early_stop=0.0, early_stop_slope=0.0)

    def ours():
        return null_text_optimize(m.denoiser, traj, null, opts).embeddings

    def reference():
        m.unet.requires_grad_(True)
        try:
            return reference_null_text(m.unet, traj.latents, c, null, grid, early=-1.0)[0]
        finally:
            m.unet.requires_grad_(False)

    times: dict[str, list[float]] = {"reference": [], "ours": []}
    results = {}
    for _ in range(a.repeats):  # interleaved, so drift of the machine hits both alike
        for name, fn in (("reference", reference), ("ours", ours)):
            t = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t)
    ref, us = min(times["reference"]), min(times["ours"])
    diff = (results["reference"] - results["ours"]).abs()
    print(f"null-text on the demo model, {a.steps} steps × 10 iterations, latent "
          f"{tuple(z0.shape[2:])}, {torch.get_num_threads()} threads")
    print(f"reference {ref:.2f} s · ours {us:.2f} s · speed-up {ref / us:.2f}× · "
          f"Δ∅ max {float(diff.max()):.2e}, RMS {float(diff.pow(2).mean().sqrt()):.2e}")


if __name__ == "__main__":
    main()
