"""Inversion methods side by side against the reference pipeline: one process per method, same
model, same photos, same machine; then P2P sampling of one edit against the store-everything
behaviour of diffusers' community Prompt2PromptPipeline.

    python bench/inversion.py --diffusers PATH --out FILE.json

PATH is a huggingface/diffusers checkout: the reference is its community NullTextPipeline
(examples/community/pipeline_null_text_inversion.py) and its Prompt2PromptPipeline, read at run
time and never copied here. Without --diffusers the reference is the test suite's transcription of
REFERENCE §3 (tests/test_inversion.py) and the P2P baseline a store-everything controller, both
labelled so.

Per method and photo: UNet forward-equivalents of the inversion (rows through the UNet; a backward
counts as two), its wall time, latent MSE and pixel PSNR of the guidance-7.5 reconstruction
against the input; per method the peak RSS of its fresh process (CUDA max-allocated on a GPU), and
ratios to the reference. "vae" is the VAE's own round trip, the ceiling of every method.
Default model: the trained demo model (nti_core/hosts/diffusers_demo.py); --model takes an SD 1.x
diffusers folder or .safetensors file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

METHODS = ("reference", "vae", "ddim", "negative-prompt", "null-text", "null-text-fast", "direct",
           "null-text+attention", "styled")
P2P_RUNS = ("p2p-baseline", "p2p-engine", "p2p-engine+maps")
DEMO_PHOTOS = ("gnochi_mirror", "chelsea", "coffee")


# ----------------------------------------------------------------------------- measuring
def _status_mb(field: str) -> float:
    """A memory line of /proc/self/status in MB (Linux; falls back to the lifetime peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Resident set size now."""
    return _status_mb("VmRSS")


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ≥ 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    """Peak RSS since the last reset (or of the process's life)."""
    return _status_mb("VmHWM")


class UNetCounter:
    """Counts rows through a diffusers UNet and rows of the backwards through its output."""

    def __init__(self, unet) -> None:
        self.rows = self.backward_rows = 0
        self.handles = [unet.register_forward_pre_hook(self._pre, with_kwargs=True),
                        unet.register_forward_hook(self._post, with_kwargs=True)]

    def remove(self) -> None:
        """Take the hooks off the UNet."""
        for h in self.handles:
            h.remove()

    def _pre(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.rows += int(sample.shape[0])

    def _post(self, module, args, kwargs, out):
        sample = out[0] if isinstance(out, tuple) else out.sample
        n = int(sample.shape[0])
        if sample.requires_grad:
            sample.register_hook(lambda g: self._backward(n))

    def _backward(self, n: int) -> None:
        self.backward_rows += n

    def reset(self) -> None:
        self.rows = self.backward_rows = 0

    @property
    def forward_equivalents(self) -> int:
        return self.rows + 2 * self.backward_rows


# ----------------------------------------------------------------------------- the worker
def load(a):
    import torch

    torch.manual_seed(0)
    if a.model == "demo":
        from nti_core.hosts.diffusers.demo import demo_sd1

        return demo_sd1(device=a.device)
    from nti_core.hosts.diffusers.models import load_sd1

    return load_sd1(a.model, a.device, "fp32")


def photos(a) -> list[tuple[str, object, str]]:
    """(name, image [1, 3, s, s], prompt): demo photo names, or PATH=PROMPT."""
    from nti_core.hosts.diffusers.demo import PHOTOS, photo_rgb
    from nti_core.images import from_array, load_image

    captions = {p.name: f"a photo of {p.caption}" for p in PHOTOS}
    out = []
    for entry in a.photos.split(","):
        if "=" in entry:
            path, prompt = entry.split("=", 1)
            out.append((Path(path).stem, load_image(path, a.size), prompt))
        else:
            if entry not in captions:
                raise SystemExit(f"unknown photo {entry!r}: demo photos are {sorted(captions)}, "
                                 "or give PATH=PROMPT")
            out.append((entry, from_array(photo_rgb(entry), a.size), captions[entry]))
    return out


def invert_ours(method: str, m, z0, prompt: str, a, image):
    """(trajectory, ∅, values) of one of this engine's methods."""
    from nti_core import NullTextOptions, ddim_invert, make_grid, null_text_optimize
    from nti_core.null_text import direct_inversion, negative_prompt_inversion, plain_null

    cond, null = m.encode_prompt(prompt), m.encode_prompt("")
    grid = make_grid(m.alphas_cumprod, a.steps)
    record = method in ("null-text+attention", "styled")
    traj = ddim_invert(m.denoiser, z0, cond, grid, prompt, record_maps=record)
    values = None
    if method == "ddim":
        uncond = plain_null(traj, null)
    elif method == "negative-prompt":
        uncond = negative_prompt_inversion(traj)
    elif method == "direct":
        uncond = direct_inversion(traj, null)
    elif method in ("null-text", "null-text-fast", "null-text+attention"):
        opts = NullTextOptions(fast=method == "null-text-fast",
                               attention_weight=1.0 if method == "null-text+attention" else 0.0)
        uncond = null_text_optimize(m.denoiser, traj, null, opts)
    elif method == "styled":
        from nti_core.hosts.diffusers.vision import image_tokens
        from nti_core.style import style_invert

        uncond = plain_null(traj, null)
        tokens = image_tokens(a.vision, image)
        values = style_invert(m.denoiser, traj, tokens, null, encoder="random CLIP vision")
    else:
        raise ValueError(method)
    return traj, uncond, values


def run_reference(m, image, prompt: str, a):
    """The community NullTextPipeline's invert() and reconstruction; (z0, latents, seconds, fe)."""
    import numpy as np
    import torch
    from core_support import community_null_text_pipeline
    from PIL import Image

    os.environ.setdefault("NTI_DIFFUSERS_PATH", a.diffusers)
    pipe = community_null_text_pipeline(m.unet, m.vae, m.text_encoder, m.tokenizer, a.steps)
    counter_ref = UNetCounter(pipe.unet)  # the pipeline runs a copy of the UNet
    with tempfile.TemporaryDirectory() as tmp:  # invert() caches ∅ beside the image: a temp copy
        path = Path(tmp) / "photo.png"
        rgb = ((image[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        Image.fromarray(np.ascontiguousarray(rgb)).save(path)
        z0 = pipe.image2latent(str(path))
        counter_ref.reset()
        t = time.perf_counter()
        z_T, uncond = pipe.invert(str(path), prompt, num_inner_steps=10, early_stop_epsilon=1e-5,
                                  num_inference_steps=a.steps)
        seconds = time.perf_counter() - t
        fe = counter_ref.forward_equivalents
    with torch.no_grad():
        rec = pipe(prompt, uncond, z_T, num_inference_steps=a.steps, output_type="latent").images
    return z0, torch.as_tensor(rec), seconds, fe


def run_transcription(m, z0, prompt: str, a):
    """The test suite's literal transcription of REFERENCE §3, with trainable UNet weights as the
    reference notebook leaves them; (latents, seconds)."""
    import torch
    from test_inversion import reference_null_text

    from nti_core import ddim_invert, make_grid
    from nti_core.sampling import p2p_sample
    from nti_core.trajectory import UncondEmbeddings

    cond, null = m.encode_prompt(prompt), m.encode_prompt("")
    grid = make_grid(m.alphas_cumprod, a.steps)
    t = time.perf_counter()
    traj = ddim_invert(m.denoiser, z0, cond, grid, prompt)
    m.unet.requires_grad_(True)
    try:
        emb, _, _ = reference_null_text(m.unet, traj.latents, cond, null, grid)
    finally:
        m.unet.requires_grad_(False)
    seconds = time.perf_counter() - t
    with torch.no_grad():
        rec = p2p_sample(m.denoiser, traj, UncondEmbeddings(emb, "reference", 7.5), cond)
    return rec, seconds


def worker(a) -> dict:
    import torch
    import torch.nn.functional as F

    from nti_core.images import psnr
    from nti_core.sampling import p2p_sample

    torch.set_grad_enabled(True)
    m = load(a)
    items = photos(a)
    if a.worker == "styled":
        from tiny_models import tiny_clip_vision

        a.vision = tiny_clip_vision(0).to(a.device)
    counter = UNetCounter(m.unet)
    cuda = str(a.device).startswith("cuda")
    base = rss_mb()
    reset_peak()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    per_photo = {}
    for name, image, prompt in items:
        image = image.to(a.device)
        z0 = m.encode_image(image)
        counter.reset()
        if a.worker == "reference" and a.diffusers:
            z0, rec, seconds, fe = run_reference(m, image, prompt, a)
        elif a.worker == "reference":
            rec, seconds = run_transcription(m, z0, prompt, a)
            fe = counter.forward_equivalents
        elif a.worker == "vae":
            rec, seconds, fe = z0, 0.0, 0
        else:
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            traj, uncond, values = invert_ours(a.worker, m, z0, prompt, a, image)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t
            fe = counter.forward_equivalents
            with torch.no_grad():
                rec = p2p_sample(m.denoiser, traj, uncond, traj.embedding, values=values)
        rec = rec.to(z0)
        per_photo[name] = {"forward_equivalents": fe, "wall_s": round(seconds, 3),
                           "latent_mse": float(F.mse_loss(rec, z0)),
                           "psnr": round(psnr(m.decode(rec), image), 3)}
        print(f"  {a.worker:<20} {name:<14} {json.dumps(per_photo[name])}", file=sys.stderr,
              flush=True)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    keys = ("forward_equivalents", "wall_s", "latent_mse", "psnr")
    summary = {k: sum(p[k] for p in per_photo.values()) / len(per_photo) for k in keys}
    return {**summary, "peak_mb": round(peak, 1), "loaded_mb": round(base, 1),
            "peak_over_loaded_mb": round(peak_mb() - base, 1) if not cuda else None,
            "photos": per_photo}


# ----------------------------------------------------------------------------- P2P sampling
class StoreEverything:
    """The reference's AttentionStore behaviour around this engine's edit: every attention layer
    computes its probabilities unfused; the conditional rows' per-head maps of query maps up to
    32² (self and cross) are kept for the step and summed into a running store between steps.
    (At edited layers the probabilities are computed a second time by the edit, so this
    baseline is an upper bound there.)"""

    def __init__(self, inner) -> None:
        self.inner, self.step_store, self.store, self.step = inner, [], [], None

    def attend(self, q, k, v, *, heads, site, hw, step, rows):
        from nti_core.denoiser import attention_probs

        if step != self.step:
            self._between_steps()
            self.step = step
        p = attention_probs(q, k, heads)
        if hw[0] * hw[1] <= 32 * 32:
            self.step_store.append(p[rows.branch.to(p.device)].detach())
        return self.inner.attend(q, k, v, heads=heads, site=site, hw=hw, step=step, rows=rows)

    def _between_steps(self) -> None:
        if not self.store:
            self.store = self.step_store
        else:
            for s, x in zip(self.store, self.step_store, strict=True):
                s += x
        self.step_store = []

    def after_step(self, step, latents):
        return self.inner.after_step(step, latents)


def p2p_worker(a) -> dict:
    """One edit (replace, cross 0.8, self 0.4 into maps ≤ 16², plain "" ∅: what the community
    pipeline runs) sampled from the first photo's z*_T; wall time and peak memory."""
    import torch

    from nti_core import ddim_invert, make_grid
    from nti_core.attention.plan import P2PSpec
    from nti_core.null_text import plain_null
    from nti_core.sampling import p2p_sample
    from nti_core.tokenizer import from_hf

    m = load(a)
    name, image, prompt = photos(a)[0]
    target = edit_target(prompt)
    z0 = m.encode_image(image.to(a.device))
    cond, null = m.encode_prompt(prompt), m.encode_prompt("")
    traj = ddim_invert(m.denoiser, z0, cond, make_grid(m.alphas_cumprod, a.steps), prompt)
    spec = P2PSpec(prompt, (target,), mode="replace", cross=0.8, self_steps=0.4, self_limit=16)
    contexts = torch.cat([cond, m.encode_prompt(target)])
    label = a.worker
    if a.worker == "p2p-baseline" and a.diffusers:
        pipe = community_p2p_pipeline(m, a.diffusers)
        label = "diffusers community Prompt2PromptPipeline"

        def run():
            return pipe([prompt, target], height=a.size, width=a.size,
                        num_inference_steps=a.steps, guidance_scale=7.5,
                        latents=traj.z_T.expand(2, -1, -1, -1).clone(), output_type="latent",
                        cross_attention_kwargs={"edit_type": "replace", "n_cross_replace": 0.8,
                                                "n_self_replace": 0.4}).images
    else:
        keep = a.worker == "p2p-engine+maps"
        ctrl = spec.build(from_hf(m.tokenizer), a.steps, keep_step_maps=keep,
                          latent_hw=tuple(z0.shape[-2:]))
        if a.worker == "p2p-baseline":
            ctrl = StoreEverything(ctrl)
            label = "store-everything controller (no --diffusers)"

        def run():
            return p2p_sample(m.denoiser, traj, plain_null(traj, null), contexts, controller=ctrl)
    base = rss_mb()
    reset_peak()
    t = time.perf_counter()
    with torch.no_grad():
        z = torch.as_tensor(run())
    seconds = time.perf_counter() - t
    return {"label": label, "wall_s": round(seconds, 3), "peak_mb": round(peak_mb(), 1),
            "peak_over_loaded_mb": round(peak_mb() - base, 1), "loaded_mb": round(base, 1),
            "photo": name, "edit": [prompt, target], "latents": z.float().cpu().tolist()}


def edit_target(prompt: str) -> str:
    """A one-word replacement the replace edit can align (same word count)."""
    words = prompt.split()
    swap = {"cat": "dog", "cup": "bowl", "photo": "negative"}
    for i, w in enumerate(words):
        if w in swap:
            return " ".join(words[:i] + [swap[w]] + words[i + 1 :])
    return " ".join(words[:-1] + ["dog"])


def community_p2p_pipeline(m, diffusers: str):
    import importlib.util

    from diffusers import DDIMScheduler

    path = Path(diffusers).expanduser() / "examples" / "community" / "pipeline_prompt2prompt.py"
    spec = importlib.util.spec_from_file_location("nti_reference_p2p", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = module.Prompt2PromptPipeline(m.vae, m.text_encoder, m.tokenizer, m.unet, scheduler,
                                        safety_checker=None, feature_extractor=None,
                                        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------- the parent
def spawn(run: str, a, size: int | None = None) -> dict:
    """One fresh process for one method; its JSON comes back through a temp file."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as f:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", run, "--result", f.name,
               "--size", str(size or a.size), "--steps", str(a.steps), "--device", a.device,
               "--photos", a.photos, "--model", a.model]
        if a.diffusers:
            cmd += ["--diffusers", a.diffusers]
        t = time.perf_counter()
        done = subprocess.run(cmd, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{run} failed (exit {done.returncode})")
        out = json.loads(Path(f.name).read_text())
        out["process_s"] = round(time.perf_counter() - t, 1)
        return out


def table(result: dict) -> str:
    ref = result["methods"].get(result["reference"])
    lines = [f"{'method':<22}{'fwd-eq':>8}{'× ref':>7}{'wall s':>9}{'× ref':>7}{'peak MB':>9}"
             f"{'latent MSE':>12}{'PSNR dB':>9}"]
    for name, r in result["methods"].items():
        fe_ratio = r["forward_equivalents"] / ref["forward_equivalents"] if ref else float("nan")
        t_ratio = r["wall_s"] / ref["wall_s"] if ref and ref["wall_s"] else float("nan")
        lines.append(f"{name:<22}{r['forward_equivalents']:>8.0f}{fe_ratio:>7.2f}"
                     f"{r['wall_s']:>9.2f}{t_ratio:>7.2f}{r['peak_mb']:>9.0f}"
                     f"{r['latent_mse']:>12.3e}{r['psnr']:>9.2f}")
    if "p2p" in result:
        p = result["p2p"]
        b = p["p2p-baseline"]
        lines.append("")
        lines.append(f"P2P sampling of one edit at {p['size']}² ({p['edit'][0]!r} → "
                     f"{p['edit'][1]!r})")
        for name, r in p.items():
            if not isinstance(r, dict) or "wall_s" not in r:
                continue
            lines.append(f"  {name:<18}{r['wall_s']:>8.2f} s ({b['wall_s'] / r['wall_s']:.2f}× "
                         f"faster than the baseline)  peak {r['peak_over_loaded_mb']:>7.1f} MB over "
                         f"the loaded model ({r['peak_over_loaded_mb'] / max(b['peak_over_loaded_mb'], 1e-9):.2f}"
                         f"× the baseline's)  [{r['label']}]")
        if "engine_vs_baseline_max_abs" in p:
            lines.append(f"  edits agree with the baseline to max |Δ| "
                         f"{p['engine_vs_baseline_max_abs']:.2e} (latents)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--diffusers", default=None,
                    help="a huggingface/diffusers checkout: its community NullTextPipeline and "
                         "Prompt2PromptPipeline are the references")
    ap.add_argument("--out", default=None, help="write the results here (JSON)")
    ap.add_argument("--model", default="demo",
                    help="'demo' (the committed trained demo model) or an SD 1.x diffusers "
                         "folder / .safetensors file")
    ap.add_argument("--device", default="cpu", help="torch device (cpu, cuda, mps)")
    ap.add_argument("--size", type=int, default=256, help="square photo side in pixels")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps")
    ap.add_argument("--photos", default=",".join(DEMO_PHOTOS),
                    help="comma-separated demo photo names, or PATH=PROMPT entries")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated subset of {', '.join(METHODS)}")
    ap.add_argument("--p2p-size", type=int, default=512,
                    help="photo side of the P2P sampling comparison (512: SD 1.x's own size, "
                         "where every attention map is materialised by the baseline)")
    ap.add_argument("--no-p2p", action="store_true", help="skip the P2P sampling comparison")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.diffusers and not (Path(a.diffusers).expanduser() / "examples" / "community").is_dir():
        raise SystemExit(f"--diffusers {a.diffusers}: no examples/community folder there")
    if a.worker:
        out = p2p_worker(a) if a.worker.startswith("p2p") else worker(a)
        Path(a.result).write_text(json.dumps(out))
        return
    methods = a.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    import torch

    ref_name = ("reference: diffusers community NullTextPipeline" if a.diffusers
                else "reference: transcription of REFERENCE §3 (tests)")
    result: dict = {"reference": ref_name, "methods": {},
                    "settings": {"model": a.model, "size": a.size, "p2p_size": a.p2p_size,
                                 "steps": a.steps,
                                 "device": a.device, "photos": a.photos.split(","),
                                 "threads": torch.get_num_threads(), "torch": torch.__version__}}
    for method in methods:
        print(f"[{method}]", file=sys.stderr, flush=True)
        r = spawn(method, a)
        result["methods"][ref_name if method == "reference" else method] = r
    if not a.no_p2p:
        p2p: dict = {}
        for run in P2P_RUNS:
            print(f"[{run}]", file=sys.stderr, flush=True)
            p2p[run] = spawn(run, a, size=a.p2p_size)
        p2p["edit"] = p2p["p2p-engine"]["edit"]
        p2p["size"] = a.p2p_size
        lat = {k: torch.tensor(p2p[k].pop("latents")) for k in P2P_RUNS}
        p2p["engine_vs_baseline_max_abs"] = float((lat["p2p-engine"] - lat["p2p-baseline"])
                                                  .abs().max())
        result["p2p"] = p2p
    ref = result["methods"].get(ref_name)
    if ref:
        for r in result["methods"].values():
            r["forward_equivalents_vs_reference"] = (r["forward_equivalents"]
                                                     / ref["forward_equivalents"])
            r["wall_vs_reference"] = r["wall_s"] / ref["wall_s"] if ref["wall_s"] else None
    print(table(result))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
