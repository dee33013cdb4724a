"""The README's pictures, made with the project's own demo model (no download, CPU is enough).

    python tools/readme_pictures.py --out docs/images

Inverts the cat photo that ships with the project ONCE (DDIM inversion at 256², 50 steps, then
fast null-text inversion at guidance 7.5) and renders labelled JPEG grids from it:

* ``before_after.jpg``       input | reconstruction | three edits (the README's first picture)
* ``tuning_injection.jpg``   a replace edit over cross-injection end × self-injection end
* ``tuning_reweight.jpg``    a refine edit with the new word reweighted
* ``tuning_blend.jpg``       LocalBlend thresholds, each edit next to its mask
* ``tuning_p2plus.jpg``      P2Plus's τ_u (source self-attention in the unconditional rows)
* ``tuning_sweep.jpg``       a settings sweep (``nti_core.sweep``, the P2P Sweep node and
  ``--sweep``): LocalBlend threshold × self-injection end of one edit
* ``inversion_methods.jpg``  reconstructions by DDIM, negative-prompt, null-text, fast null-text,
  Direct Inversion, each with its latent MSE and PSNR

and ``pictures.json`` with the settings and numbers the README quotes. The demo model is tiny
(3 M parameters, six training photos in three looks: "photo", "negative", "sepia"): the pictures
show what it does, not what Stable Diffusion does. Takes a few minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from nti_core.attention.plan import P2PSpec  # noqa: E402
from nti_core.images import labelled_grid, load_image, psnr, wrap_text  # noqa: E402
from nti_core.inversion import ddim_invert  # noqa: E402
from nti_core.null_text import (  # noqa: E402
    NullTextOptions,
    direct_inversion,
    negative_prompt_inversion,
    null_text_optimize,
    plain_null,
)
from nti_core.plan_spec import fields_of  # noqa: E402
from nti_core.sampling import p2p_sample  # noqa: E402
from nti_core.schedule import make_grid  # noqa: E402
from nti_core.sweep import plan_sweep, sample_sweep  # noqa: E402
from nti_core.tokenizer import from_hf  # noqa: E402

PHOTO = ROOT / "nti_core" / "assets" / "gnochi_mirror.jpeg"
SOURCE = "a photo of a cat sitting next to a mirror"
NEGATIVE = "a negative of a cat sitting next to a mirror"
SEPIA = "a sepia photo of a cat sitting next to a mirror"
GUIDANCE = 7.5
CAPTION = ("demo model trained by this project (3 M parameters), real output at 256², "
           "not Stable Diffusion")
MAX_BYTES = 250_000

CROSS_ENDS = (0.2, 0.5, 0.8, 1.0)
SELF_ENDS = (0.0, 0.5, 1.0)
REWEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0)
THRESHOLDS = (0.3, 0.7, 0.8, 0.9)
SHOWN_THRESHOLD = 0.8  # before_after.jpg
REWEIGHT_CROSS = 1.0  # reweight holds while cross injection runs: here every step
UNCOND_SELF = (0.0, 0.3, 0.5, 0.8)
SWEEP = ("blend_threshold=0.7,0.8,0.9", "self_end=0,0.5,1")  # rows, columns of tuning_sweep.jpg


# --------------------------------------------------------------------------- pictures


def to_pil(x: torch.Tensor) -> Image.Image:
    """[1, 3, H, W] in [−1, 1] → RGB PIL image."""
    a = ((x[0].detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return Image.fromarray(a.permute(1, 2, 0).cpu().numpy())


def pixels(x: torch.Tensor) -> np.ndarray:
    """[1, 3, H, W] in [−1, 1] → float array [H, W, 3] in 0…255 (as the saved 8-bit image)."""
    return np.asarray(to_pil(x), dtype=np.float64)


def font(size: int) -> ImageFont.ImageFont:
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            pass
    return ImageFont.load_default(size=size)


def grid(tiles: list[tuple[Image.Image, str]], path: Path, columns: int, *, title: str,
         footer: str = CAPTION, tile: int = 256, size: int = 15,
         row_labels: list[str] | None = None) -> Path:
    """A JPEG of labelled tiles, ``columns`` per row, title on top, footer below; optional labels
    left of each row. Saved at quality 85, lowered until it fits MAX_BYTES."""
    f, fb = font(size), font(size + 2)
    line, pad = int(size * 1.3), 10
    left = 0
    if row_labels:
        left = int(max(max(f.getlength(s) for t in row_labels for s in t.split("\n")), 40)) + pad
    width = left + columns * (tile + pad) + pad
    head = wrap_text(title, fb, width - 2 * pad)
    foot = wrap_text(footer, f, width - 2 * pad) if footer else []
    caps = [wrap_text(c, f, tile) for _, c in tiles]
    rows = -(-len(tiles) // columns)
    cell_h = tile + 6 + max(map(len, caps)) * line + pad
    top = pad + len(head) * int((size + 2) * 1.3) + pad
    height = top + rows * cell_h + len(foot) * line + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for k, s in enumerate(head):
        draw.text((pad, pad + k * int((size + 2) * 1.3)), s, fill="black", font=fb)
    for n, (img, lines) in enumerate(zip((t for t, _ in tiles), caps, strict=True)):
        r, c = divmod(n, columns)
        x0, y0 = left + pad + c * (tile + pad), top + r * cell_h
        sheet.paste(img.resize((tile, tile), Image.LANCZOS) if img.size != (tile, tile) else img,
                    (x0, y0))
        for k, s in enumerate(lines):
            draw.text((x0, y0 + tile + 4 + k * line), s, fill="black", font=f)
    for r, label in enumerate(row_labels or []):
        for k, s in enumerate(label.split("\n")):
            draw.text((pad, top + tile // 2 - line + k * line + r * cell_h), s, fill="black",
                      font=fb if k == 0 else f)
    for k, s in enumerate(foot):
        draw.text((pad, top + rows * cell_h + k * line), s, fill=(70, 70, 70), font=f)
    return save_jpeg(sheet, path)


def save_jpeg(sheet: Image.Image, path: Path) -> Path:
    """Saved at quality 85, lowered until it fits MAX_BYTES."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for quality in (85, 80, 75, 70, 60):
        sheet.save(path, "JPEG", quality=quality, optimize=True)
        if path.stat().st_size <= MAX_BYTES:
            break
    return path


def mask_tile(base: torch.Tensor, mask: torch.Tensor) -> Image.Image:
    """``base`` with everything outside the (latent-sized) boolean mask greyed out and dimmed."""
    img = pixels(base)
    m = F.interpolate(mask[None, None].float(), size=img.shape[:2], mode="nearest")[0, 0]
    m = m.numpy()[..., None]
    grey = img.mean(-1, keepdims=True) * 0.25 + 20
    return Image.fromarray((img * m + grey * (1 - m)).clip(0, 255).astype(np.uint8))


# --------------------------------------------------------------------------- the run


def describe(spec: P2PSpec) -> dict:
    d = asdict(spec)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()
            if k not in ("source", "store_edited", "subtract_words")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "images"))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: several threads on shared cores crawl)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out, n = Path(a.out), a.steps
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def clock(name: str, since: float) -> None:
        timings[name] = round(time.perf_counter() - since, 2)
        print(f"  {name}: {timings[name]:.1f} s (total {time.perf_counter() - t0:.0f} s)",
              flush=True)

    from nti_core.hosts.diffusers.demo import demo_sd1

    t = time.perf_counter()
    model = demo_sd1()
    tok = from_hf(model.tokenizer)
    clock("load_model", t)
    params = sum(p.numel() for p in model.unet.parameters()) + sum(
        p.numel() for p in model.vae.parameters())
    x = load_image(PHOTO, a.size)
    z0 = model.encode_image(x)
    vae_x = model.decode(z0)
    cond, null = model.encode_prompt(SOURCE), model.encode_prompt("")
    t = time.perf_counter()
    traj = ddim_invert(model.denoiser, z0, cond, make_grid(model.alphas_cumprod, n), SOURCE)
    clock("ddim_inversion", t)
    t = time.perf_counter()
    fast = null_text_optimize(model.denoiser, traj, null, NullTextOptions(fast=True))
    clock("null_text_fast", t)
    t = time.perf_counter()
    full = null_text_optimize(model.denoiser, traj, null, NullTextOptions())
    clock("null_text", t)

    # reconstructions (inversion_methods.jpg); the fast one is every edit's reference
    recon, rec_img = {}, {}
    methods = (("ddim", "DDIM inversion (∅ = \"\")", plain_null(traj, null)),
               ("negative-prompt", "negative-prompt inv.", negative_prompt_inversion(traj)),
               ("null-text", "null-text inversion", full),
               ("null-text-fast", "null-text-fast", fast),
               ("direct", "Direct Inversion", direct_inversion(traj, null)))
    t = time.perf_counter()
    for name, _, u in methods:
        rec = p2p_sample(model.denoiser, traj, u, traj.embedding)
        rec_img[name] = model.decode(rec)
        recon[name] = {"latent_mse": float(F.mse_loss(rec, z0)),
                       "psnr_db": round(psnr(rec_img[name], x), 2),
                       "relative_error": float((rec - z0).norm() / z0.norm())}
    clock("reconstructions", t)
    vae_psnr = round(psnr(vae_x, x), 2)
    reference = pixels(rec_img["null-text-fast"])

    cache: dict[P2PSpec, dict] = {}
    target_ctx = {p: model.encode_prompt(p) for p in (NEGATIVE, SEPIA)}
    t_edits = time.perf_counter()

    def edit(spec: P2PSpec) -> dict:
        """Edit from the fast null-text inversion; the image, numbers and mask, cached."""
        if spec in cache:
            return cache[spec]
        ctrl = spec.build(tok, n, latent_hw=tuple(z0.shape[-2:]))
        contexts = torch.cat([traj.embedding, target_ctx[spec.targets[0]]])
        lat = p2p_sample(model.denoiser, traj, fast, contexts, controller=ctrl)
        img = model.decode(lat[1:2])
        diff = np.abs(pixels(img) - reference).mean(-1)
        r = {"image": img, "spec": spec, "mean_abs_change": round(float(diff.mean()), 2)}
        blend = ctrl.local_blend
        if blend is not None and blend.last_mask is not None:
            m = blend.last_mask[1, 0].cpu()
            r["mask"] = m
            r["mask_coverage"] = round(float(m.float().mean()), 3)
            big = F.interpolate(m[None, None].float(), size=diff.shape, mode="nearest")[0, 0]
            big = big.numpy() > 0.5
            r["change_inside_mask"] = round(float(diff[big].mean()), 2) if big.any() else None
            r["change_outside_mask"] = round(float(diff[~big].mean()), 2) if (~big).any() else None
        cache[spec] = r
        print(f"    edit {len(cache)}: Δ {r['mean_abs_change']:.1f}/255 "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        return r

    def record(r: dict, **extra) -> dict:
        keep = ("mean_abs_change", "mask_coverage", "change_inside_mask", "change_outside_mask")
        return {"target": r["spec"].targets[0], **describe(r["spec"]), **extra,
                **{k: r[k] for k in keep if k in r}}

    def delta(r: dict) -> str:
        return f"Δ {r['mean_abs_change']:.1f}/255 vs recon."

    report: dict = {
        "what": "README pictures by tools/readme_pictures.py with the demo model "
                "(nti_core/assets/demo_sd1.safetensors)",
        "caption": CAPTION,
        "model": model.name, "parameters_unet_plus_vae": params,
        "image": f"{PHOTO.name}, centre-cropped to {a.size}²", "source_prompt": SOURCE,
        "steps": n, "guidance": GUIDANCE, "grid": traj.grid.describe(),
        "edits_from": "null-text-fast",
        "mean_abs_change": "mean |edit − null-text-fast reconstruction| over pixels and RGB "
                           "channels, 8-bit scale (0–255)",
        "vae_roundtrip_psnr_db": vae_psnr,
        "reconstruction_at_guidance_7.5": recon,
        "null_text": {"iterations": sum(full.iterations), "final_loss_last": full.final_loss[-1]},
        "null_text_fast": {"iterations": sum(fast.iterations),
                           "final_loss_last": fast.final_loss[-1]},
        "pictures": {},
    }

    def vs(r: dict, other: dict) -> float:
        return round(float(np.abs(pixels(r["image"]) - pixels(other["image"])).mean()), 2)

    def visibility(d: float) -> str:
        """Mean |Δ| on the 8-bit scale, in words (as judged by looking at the grids)."""
        return ("invisible" if d < 1.0 else "subtle (seen by flipping between tiles)" if d < 8.0
                else "visible side by side")

    # 1. before / after
    neg = P2PSpec(SOURCE, (NEGATIVE,), mode="replace")
    neg_blend = replace(neg, blend_words=("cat",), blend_threshold=SHOWN_THRESHOLD)
    sepia = P2PSpec(SOURCE, (SEPIA,), mode="refine")
    shown = [("'photo' → 'negative'\nreplace, cross 0.8, self 0.5", neg),
             (f"'photo' → 'negative'\n+ LocalBlend 'cat', th. {SHOWN_THRESHOLD:g}",
              neg_blend),
             ("refine: add 'sepia'\ncross 0.8, self 0.5", sepia)]
    rf = recon["null-text-fast"]
    tiles = [(to_pil(x), f"input photo ({a.size}²)\n'{SOURCE}'"),
             (to_pil(rec_img["null-text-fast"]),
              f"reconstruction (null-text-fast)\n{rf['psnr_db']:.1f} dB PSNR")]
    entries = []
    for label, spec in shown:
        r = edit(spec)
        cover = (f"\nmask: {r['mask_coverage']:.0%} of the image" if "mask_coverage" in r
                 else "")
        tiles.append((to_pil(r["image"]), f"{label}\n{delta(r)}{cover}"))
        entries.append(record(r, label=label))
    p = grid(tiles, out / "before_after.jpg", 5, tile=224, size=15,
             title=f"Invert a real photo, then edit it with Prompt-to-Prompt "
                   f"({n} DDIM steps, guidance {GUIDANCE}, fast null-text inversion)")
    report["pictures"]["before_after.jpg"] = {"tiles": entries}
    print(f"  wrote {p}", flush=True)

    # 2. cross × self injection
    default = edit(neg)
    tiles, entries, rows = [], [], []
    for cross in CROSS_ENDS:
        rows.append(f"cross\nend {cross:g}")
        for self_end in SELF_ENDS:
            r = edit(replace(neg, cross=cross, self_steps=self_end))
            d = vs(r, default)
            tiles.append((to_pil(r["image"]), f"cross {cross:g} · self {self_end:g}\n{delta(r)}"
                                              f"\nvs default (0.8 · 0.5): Δ {d:.1f}"))
            entries.append(record(r, change_vs_default=d))
    spread = max(e["change_vs_default"] for e in entries)
    p = grid(tiles, out / "tuning_injection.jpg", len(SELF_ENDS), tile=200, size=14,
             row_labels=rows,
             title="Injection: replace 'photo' → 'negative'; rows = cross-attention injection "
                   "end, columns = self-attention injection end (fraction of the steps)")
    report["pictures"]["tuning_injection.jpg"] = {
        "tiles": entries, "largest_change_vs_default": spread, "visibility": visibility(spread),
        "note": f"the injection ends change this edit by at most {spread:.1f}/255 against the "
                f"default (cross 0.8, self 0.5): {visibility(spread)} on the demo model"
                + ("; neither 'edit has no effect' nor 'layout breaks' shows up here"
                   if spread < 5.0 else "")}
    print(f"  wrote {p}", flush=True)

    # 3. reweight (cross injection on every step, so that the reweight holds to the end)
    sepia_rw = replace(sepia, cross=REWEIGHT_CROSS)
    tiles, entries = [(to_pil(rec_img["null-text-fast"]), "reconstruction\n(no edit)")], []
    unit = edit(replace(sepia_rw, reweight="sepia:1"))
    for w in REWEIGHTS:
        r = edit(replace(sepia_rw, reweight=f"sepia:{w:g}"))
        d = vs(r, unit)
        tiles.append((to_pil(r["image"]), f"reweight 'sepia:{w:g}'\n{delta(r)}\n"
                                          f"vs 'sepia:1': Δ {d:.1f}"))
        entries.append(record(r, change_vs_weight_1=d))
    lo, hi = REWEIGHTS[0], REWEIGHTS[-1]
    at_default = vs(edit(replace(sepia, reweight=f"sepia:{lo:g}")),
                    edit(replace(sepia, reweight=f"sepia:{hi:g}")))
    ends = vs(cache[replace(sepia_rw, reweight=f"sepia:{lo:g}")],
              cache[replace(sepia_rw, reweight=f"sepia:{hi:g}")])
    p = grid(tiles, out / "tuning_reweight.jpg", len(tiles), tile=192, size=14,
             title=f"Reweight: refine 'a sepia photo of a cat …' with the new word's "
                   f"cross-attention scaled; cross injection {REWEIGHT_CROSS:g} (every step: "
                   f"reweight acts only while cross injection runs)")
    report["pictures"]["tuning_reweight.jpg"] = {
        "tiles": entries,
        f"change_weight_{lo:g}_vs_{hi:g}_cross_{REWEIGHT_CROSS:g}": ends,
        f"change_weight_{lo:g}_vs_{hi:g}_cross_0.8": at_default,
        "note": f"'sepia:{lo:g}' vs 'sepia:{hi:g}' differ by {ends:.1f}/255 with cross injection "
                f"{REWEIGHT_CROSS:g} ({visibility(ends)}), by {at_default:.1f}/255 with the "
                f"default 0.8 ({visibility(at_default)}); the sepia look comes through at "
                "weight 0 too (probably because the causal text encoder also puts 'sepia' into "
                "the later tokens' embeddings)"
                + ("; a larger weight does not strengthen the look: the change from the "
                   f"reconstruction falls from {entries[0]['mean_abs_change']:.1f} to "
                   f"{entries[-1]['mean_abs_change']:.1f}/255"
                   if entries[-1]["mean_abs_change"] < entries[0]["mean_abs_change"] else "")}
    print(f"  wrote {p}", flush=True)

    # 4. LocalBlend thresholds
    # row 1: the reconstruction, then the edit at each threshold; row 2: below each its mask
    tiles = [(to_pil(rec_img["null-text-fast"]), "reconstruction\n(no edit)")]
    masks = [(to_pil(default["image"]), f"no LocalBlend\n{delta(default)}")]
    entries = [record(default, label="no LocalBlend")]

    def num(v: float | None) -> str:
        return "— (mask = whole image)" if v is None else f"{v:.1f}"

    for th in THRESHOLDS:
        r = edit(replace(neg_blend, blend_threshold=th))
        tiles.append((to_pil(r["image"]),
                      f"threshold {th:g}\n{delta(r)}\ninside mask {num(r['change_inside_mask'])}"
                      f"\noutside {num(r['change_outside_mask'])}"))
        masks.append((mask_tile(rec_img["null-text-fast"], r["mask"]),
                      f"mask at threshold {th:g}\n{r['mask_coverage']:.0%} of the image"))
        entries.append(record(r))
    tiles += masks
    p = grid(tiles, out / "tuning_blend.jpg", len(masks), tile=192, size=14,
             title=f"LocalBlend on 'cat': replace 'photo' → 'negative', kept only where 'cat' "
                   f"attends (mask from step {int(neg_blend.blend_start * n)} of {n}). Top: the "
                   "edit at each threshold; below it: its final mask (greyed = outside, kept from "
                   "the source)")
    report["pictures"]["tuning_blend.jpg"] = {
        "tiles": entries,
        "mask_coverage": {f"{e['blend_threshold']:g}": e["mask_coverage"] for e in entries[1:]},
        "note": "the mask is read from 8×8 cross-attention maps at 256² (a quarter of the 32² "
                "latent), hence its blocks; 'cat' attends widely on this model: mask coverage "
                + ", ".join(f"{e['mask_coverage']:.0%} at {e['blend_threshold']:g}"
                            for e in entries[1:])
                + "; where the mask is the whole image the edit is the same as without "
                  "LocalBlend (it leaks everywhere)"}
    print(f"  wrote {p}", flush=True)

    # 5. P2Plus τ_u
    tiles, entries = [], []
    for tau in UNCOND_SELF:
        r = edit(replace(neg, uncond_self=tau))
        d = vs(r, default)
        tiles.append((to_pil(r["image"]),
                      f"τ_u {tau:g} (uncond. self-attn.)\n{delta(r)}\nvs τ_u 0: Δ {d:.1f}/255"))
        entries.append(record(r, change_vs_uncond_self_0=d))
    largest = max(e["change_vs_uncond_self_0"] for e in entries)
    p = grid(tiles, out / "tuning_p2plus.jpg", len(tiles), tile=224, size=14,
             title="P2Plus: replace 'photo' → 'negative' with the source's self-attention also "
                   "in the unconditional rows for the first τ_u of the steps")
    report["pictures"]["tuning_p2plus.jpg"] = {
        "tiles": entries, "largest_change_vs_uncond_self_0": largest,
        "visibility": visibility(largest),
        "note": f"τ_u changes the edit by at most {largest:.1f}/255 on this model "
                f"({visibility(largest)})"
                + (": small local changes, the same look" if largest < 5.0 else "")}
    print(f"  wrote {p}", flush=True)
    clock("edits", t_edits)

    # 6. a settings sweep by the engine the P2P Sweep node and --sweep run, from the same ∅
    t = time.perf_counter()
    cells = plan_sweep(fields_of(neg_blend), SWEEP, tok, n)
    lat = sample_sweep(model.denoiser, traj, fast, torch.cat([traj.embedding, target_ctx[NEGATIVE]]),
                       cells, tok)
    imgs = model.decode(lat)
    clock("sweep", t)
    rows, columns = cells.labels()
    changes = [round(float(np.abs(pixels(imgs[k : k + 1]) - reference).mean()), 2)
               for k in range(len(imgs))]
    same = columns.index("self_end 0.5") + len(columns) * rows.index(
        f"blend_threshold {SHOWN_THRESHOLD:g}")
    alone = model.decode(lat[same : same + 1])  # decoded alone, as the single run's edit
    check = float((alone - cache[neg_blend]["image"]).abs().max())
    title = (f"P2P Sweep: {cells.title}, LocalBlend on 'cat'; rows: LocalBlend threshold, "
             f"columns: self-attention injection end; {len(imgs)} cells, one P2P sampling each "
             f"from one inversion. {CAPTION}")
    sheet = Image.fromarray(labelled_grid(imgs, rows, columns, title, tile=200, font=font(14)))
    p = save_jpeg(sheet, out / "tuning_sweep.jpg")
    report["pictures"]["tuning_sweep.jpg"] = {
        "rows": rows, "columns": columns, "base_plan": describe(neg_blend),
        "mean_abs_change": changes, "seconds": timings["sweep"],
        "cell_vs_single_run_max_abs": check,
        "note": f"{len(imgs)} P2P samplings ({timings['sweep']:.0f} s with the decoding), no "
                f"optimisation; the cell with the plan's own settings (threshold "
                f"{SHOWN_THRESHOLD:g}, self_end 0.5), decoded alone, differs from the single "
                f"run's edit by {check:.2g} (pixels in −1…1); the change from the "
                f"reconstruction spans "
                f"{min(changes):.1f}–{max(changes):.1f}/255 across the cells"}
    print(f"  wrote {p}", flush=True)

    # 7. inversion methods
    tiles = [(to_pil(x), f"input photo\n'{SOURCE}'"),
             (to_pil(vae_x), f"VAE round trip (the ceiling)\n{vae_psnr:.1f} dB")]
    for name, title, _ in methods:
        rr = recon[name]
        tiles.append((to_pil(rec_img[name]),
                      f"{title}\nlatent MSE {rr['latent_mse']:.2g}\n{rr['psnr_db']:.1f} dB PSNR"))
    p = grid(tiles, out / "inversion_methods.jpg", len(tiles), tile=192, size=14,
             title=f"Reconstruction from the inverted noise at guidance {GUIDANCE} "
                   f"({n} steps): how well each method gives the photo back")
    psnrs = [recon[m[0]]["psnr_db"] for m in methods]
    mses = [recon[m[0]]["latent_mse"] for m in methods if recon[m[0]]["latent_mse"] > 0]
    report["pictures"]["inversion_methods.jpg"] = {
        "methods": [m[0] for m in methods],
        "note": f"PSNR {min(psnrs):.1f}–{max(psnrs):.1f} dB against a VAE round trip of "
                f"{vae_psnr:.1f} dB: the decoder, not the inversion, limits the pixels on this "
                "model, so the tiles look alike; the latent MSE spans "
                f"{max(mses) / min(mses):.0f}× (Direct Inversion puts the source back on the "
                "pivot: 0 by construction)"}
    print(f"  wrote {p}", flush=True)

    timings["total"] = round(time.perf_counter() - t0, 1)
    report["timings_s"] = timings
    report["torch"], report["torch_threads"] = torch.__version__, torch.get_num_threads()
    report["sizes_bytes"] = {f.name: f.stat().st_size for f in sorted(out.glob("*.jpg"))}
    (out / "pictures.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")

    print(f"\nREADME pictures in {out} ({timings['total']:.0f} s, {model.name})")
    print(f"VAE round trip {vae_psnr:.1f} dB; reconstructions at guidance {GUIDANCE}:")
    for name, rr in recon.items():
        print(f"  {name:16s} latent MSE {rr['latent_mse']:.3g}  PSNR {rr['psnr_db']:.1f} dB")
    for name, pic in report["pictures"].items():
        for e in pic.get("tiles", []):
            extra = "".join(f" {k} {e[k]}" for k in ("mask_coverage", "change_outside_mask")
                            if k in e)
            print(f"  {name:22s} {e['mode']:7s} cross {e['cross']} self {e['self_steps']} "
                  f"rw {e['reweight']} th {e['blend_threshold'] if e['blend_words'] else '-'} "
                  f"τu {e['uncond_self']}: Δ {e['mean_abs_change']}{extra}")
    for pic in report["pictures"].values():
        if "note" in pic:
            print(pic["note"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
