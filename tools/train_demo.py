"""Train the demo model (``nti_core.hosts.diffusers.demo``) from photos that ship offline; writes the asset.

    python -m tools.train_demo --out nti_core/assets/demo_sd1.safetensors

Two stages on the CPU, seeded: (1) the VAE as an autoencoder on random crops of the six photos in
their three looks (MSE + ⅒ L1 + a small KL term), then its latent rescaled so that ×0.18215 gives
unit standard deviation, as SD's VAE does; (2) the UNet with the ε-prediction loss of DDPM on the
scaled-linear schedule (t uniform in 0…999) on those latents at 256² and 128², every caption of
every look, and the empty caption 10 % of the time so that classifier-free guidance works.
The result on another machine or torch differs in rounding only; the committed file is the model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from nti_core.hosts.diffusers.demo import (
    DEMO_FILE,
    FORMAT,
    LOOKS,
    PHOTOS,
    TEXT_SEED,
    UNLABELLED,
    VAE_CONFIG,
    build_text_encoder,
    build_unet,
    build_vae,
    captions,
    look,
    photo_rgb,
    state_sha256,
    text_encoder_state,
)
from nti_core.hosts.diffusers.models import SD1_SCALING
from nti_core.images import from_array, psnr
from nti_core.schedule import scaled_linear_alphas_cumprod

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """How long and how hard each stage trains (the defaults made the committed file)."""

    vae_steps: int = 1500
    vae_batch: int = 8
    vae_crop: int = 128
    vae_lr: float = 2e-3
    kl_weight: float = 1e-5
    unet_steps: int = 5000
    unet_batches: tuple[tuple[int, int], ...] = ((256, 8), (128, 16))  # (image side, batch), in turn
    unet_lr: float = 1e-3
    drop_caption: float = 0.1  # share of each batch that trains the unconditional branch
    # (side, latents) of a broader image pool for those rows; () = the batch's own photos (the
    # committed file). Tried ((256, 384), (128, 512)) with drop 0.2: guidance mattered even less
    # (DDIM at 7.5, 256², 50 steps: latent MSE 0.0021 against 0.0089), so it is off.
    uncond_pool: tuple[tuple[int, int], ...] = ()
    seed: int = 0

    def vae_part(self) -> dict:
        """What the VAE stage depends on (its cache key)."""
        return {k: v for k, v in asdict(self).items() if k.startswith(("vae_", "kl_")) or k == "seed"}


def images_at(size: int) -> list[tuple[str, str, Tensor]]:
    """(photo, look, image [1, 3, size, size] in [−1, 1]) for every photo and look."""
    out = []
    for photo in PHOTOS:
        x = from_array(photo_rgb(photo.name), size)
        out += [(photo.name, kind, look(x, kind)) for kind in LOOKS]
    return out


def cosine_lr(opt: torch.optim.Optimizer, base: float, step: int, total: int, warmup: int = 100) -> None:
    lr = base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))
    for group in opt.param_groups:
        group["lr"] = max(lr, base * 0.02)


def vae_batches(r: Recipe, g: torch.Generator):
    """Random crops (size ``vae_crop``) of the photos at random scales, with horizontal flips."""
    scales = (128, 192, 256, 320)
    pools = {s: torch.cat([x for _, _, x in images_at(s)]) for s in scales}
    while True:
        crops = []
        for _ in range(r.vae_batch):
            s = scales[int(torch.randint(len(scales), (1,), generator=g))]
            pool = pools[s]
            img = pool[int(torch.randint(pool.shape[0], (1,), generator=g))]
            top, left = (int(torch.randint(s - r.vae_crop + 1, (1,), generator=g)) for _ in range(2))
            crop = img[:, top : top + r.vae_crop, left : left + r.vae_crop]
            if bool(torch.rand(1, generator=g) < 0.5):
                crop = crop.flip(-1)
            crops.append(crop)
        yield torch.stack(crops)


def train_vae(vae, r: Recipe) -> dict[str, float]:
    """Stage 1; returns the PSNR of the demo photo's round trip at 256² (latent = posterior mean)."""
    g = torch.Generator().manual_seed(r.seed)
    opt = torch.optim.Adam(vae.parameters(), lr=r.vae_lr)
    batches = vae_batches(r, g)
    vae.train()
    start = time.perf_counter()
    for step in range(r.vae_steps):
        cosine_lr(opt, r.vae_lr, step, r.vae_steps)
        x = next(batches)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        y = vae.decode(z).sample
        loss = F.mse_loss(y, x) + 0.1 * F.l1_loss(y, x) + r.kl_weight * post.kl().mean() / z[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == r.vae_steps - 1:
            log.info("vae %5d/%d  loss %.4f  (%.0f s)", step, r.vae_steps, loss.item(),
                     time.perf_counter() - start)
    vae.eval()
    return {"vae_seconds": time.perf_counter() - start, **vae_quality(vae)}


@torch.no_grad()
def vae_quality(vae) -> dict[str, float]:
    """PSNR (dB) of the demo photo's VAE round trip at 256², and the worst over all images."""
    worst = math.inf
    demo = math.nan
    for name, kind, x in images_at(256):
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        p = psnr(y, x)
        worst = min(worst, p)
        if name == "gnochi_mirror" and kind == "photo":
            demo = p
    return {"vae_psnr_demo_photo": demo, "vae_psnr_worst": worst}


@torch.no_grad()
def calibrate_latents(vae) -> float:
    """Rescale the encoder's mean (and the decoder's input to match) so that mean·0.18215 has
    unit standard deviation over the training images; returns the factor applied."""
    means = torch.cat([vae.encode(x).latent_dist.mean.flatten() for _, _, x in images_at(256)])
    gain = 1.0 / (float(means.std()) * SD1_SCALING)
    c = vae.config.latent_channels
    vae.quant_conv.weight[:c].mul_(gain)
    vae.quant_conv.bias[:c].mul_(gain)
    vae.quant_conv.bias[c:].add_(2 * math.log(gain))  # the posterior's std scales with its mean
    vae.post_quant_conv.weight.div_(gain)
    return gain


@torch.no_grad()
def uncond_pool(vae, size: int, n: int, g: torch.Generator) -> Tensor:
    """``n`` latents [n, 4, size/8, size/8] for the unconditional branch: random crops, at
    random scales and flips, of the photos in every look and of the unlabelled images."""
    sources = [(name, kind) for name in [p.name for p in PHOTOS] for kind in LOOKS]
    sources += [(name, "photo") for name in UNLABELLED]
    scales = [size * k // 8 for k in (8, 10, 12, 14)]
    cache: dict[tuple[str, int], Tensor] = {}
    crops = []
    for _ in range(n):
        name, kind = sources[int(torch.randint(len(sources), (1,), generator=g))]
        s = scales[int(torch.randint(len(scales), (1,), generator=g))]
        if (name, s) not in cache:
            cache[(name, s)] = from_array(photo_rgb(name), s)
        top, left = (int(torch.randint(s - size + 1, (1,), generator=g)) for _ in range(2))
        crop = look(cache[(name, s)][..., top : top + size, left : left + size], kind)
        crops.append(crop.flip(-1) if bool(torch.rand(1, generator=g) < 0.5) else crop)
    x = torch.cat(crops)
    return torch.cat([vae.encode(b).latent_dist.mean for b in x.split(16)]) * SD1_SCALING


def train_unet(unet, vae, text_encoder, tokenizer, r: Recipe) -> dict[str, float]:
    """Stage 2: ε-prediction on the latents of every (photo, look) with its captions at the
    sizes of ``unet_batches``, one size per step in turn. A share ``drop_caption`` of each batch
    trains the unconditional branch (empty caption): on the batch's own photos, or on
    :func:`uncond_pool` when the recipe names one. Either way a model of six photos learns to
    tell them apart from the noisy latent alone, so ε_∅ stays closer to ε_c than in a real
    model and guidance moves its reconstructions less (README, "The demo and its model")."""
    g = torch.Generator().manual_seed(r.seed + 1)
    alphas = scaled_linear_alphas_cumprod().float()

    @torch.no_grad()
    def embed(text: str) -> Tensor:
        ids = tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
        return text_encoder(ids)[0]

    data = {}
    with torch.no_grad():
        for size, _ in r.unet_batches:
            z, ctx = [], []
            for name, kind, x in images_at(size):
                z0 = vae.encode(x).latent_dist.mean * SD1_SCALING
                photo = next(p for p in PHOTOS if p.name == name)
                for text in captions(photo, kind):
                    z.append(z0)
                    ctx.append(embed(text))
            data[size] = (torch.cat(z), torch.cat(ctx))
    pools = {size: uncond_pool(vae, size, n, g) for size, n in r.uncond_pool}
    null = embed("")
    opt = torch.optim.AdamW(unet.parameters(), lr=r.unet_lr, weight_decay=0.0)
    unet.train()
    start = time.perf_counter()
    for step in range(r.unet_steps):
        cosine_lr(opt, r.unet_lr, step, r.unet_steps)
        size, batch = r.unet_batches[step % len(r.unet_batches)]
        z_all, ctx_all = data[size]
        idx = torch.randint(z_all.shape[0], (batch,), generator=g)
        z0, ctx = z_all[idx].clone(), ctx_all[idx].clone()
        n_uncond = round(batch * r.drop_caption)
        if size in pools:
            pool = pools[size]
            z0[:n_uncond] = pool[torch.randint(pool.shape[0], (n_uncond,), generator=g)]
        ctx[:n_uncond] = null
        t = torch.randint(0, 1000, (batch,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        loss = F.mse_loss(unet(zt, t, encoder_hidden_states=ctx).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        if step % 250 == 0 or step == r.unet_steps - 1:
            log.info("unet %5d/%d  loss %.4f  (%.0f s)", step, r.unet_steps, loss.item(),
                     time.perf_counter() - start)
    unet.eval()
    return {"unet_seconds": time.perf_counter() - start, "unet_final_loss": loss.item()}


def vae_stage(r: Recipe, workdir: Path | None):
    """A trained, calibrated VAE and its info: from ``workdir`` when this recipe's VAE stage was
    run there before (same code, same recipe), else trained now (and kept there)."""
    key = hashlib.sha256(json.dumps([r.vae_part(), VAE_CONFIG], sort_keys=True).encode()).hexdigest()
    cached = None if workdir is None else Path(workdir) / f"vae-{key[:16]}.pt"
    if cached is not None and cached.is_file():
        saved = torch.load(cached, weights_only=True)
        vae = build_vae()
        vae.load_state_dict(saved["state"])
        log.info("VAE stage from %s", cached)
        return vae.eval(), json.loads(saved["info"])
    torch.manual_seed(r.seed)
    vae = build_vae()
    info = train_vae(vae, r)
    info["latent_gain"] = calibrate_latents(vae)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state": vae.state_dict(), "info": json.dumps(info)}, cached)
    return vae, info


def train(r: Recipe, out: str | Path, workdir: Path | None = None) -> dict:
    """Both stages; writes the fp16 safetensors asset to ``out`` and returns its info."""
    from safetensors.torch import save_file

    from ..tokenizer import sd1_clip_tokenizer

    text_state = text_encoder_state(TEXT_SEED)
    info: dict = {"recipe": asdict(r), "torch": torch.__version__, "text_seed": TEXT_SEED,
                  "text_sha256": state_sha256(text_state)}
    vae, vae_info = vae_stage(r, workdir)
    info |= vae_info
    vae.requires_grad_(False)
    torch.manual_seed(r.seed + 1)
    unet = build_unet()
    info |= train_unet(unet, vae, build_text_encoder(text_state), sd1_clip_tokenizer().tokenizer, r)
    state = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    state |= {f"vae.{k}": v for k, v in vae.state_dict().items()}
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    save_file(state, str(tmp), metadata={"format": FORMAT, "info": json.dumps(info)})
    tmp.replace(p)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.train_demo",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = Recipe()
    ap.add_argument("--out", default=str(DEMO_FILE), help="where to write the model")
    ap.add_argument("--vae-steps", type=int, default=d.vae_steps, help="VAE training steps")
    ap.add_argument("--unet-steps", type=int, default=d.unet_steps, help="UNet training steps")
    ap.add_argument("--seed", type=int, default=d.seed, help="seed of init, crops, noise")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "nti_demo_train"),
                    help="keeps the VAE stage, reused by a later run with the same recipe")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    recipe = Recipe(vae_steps=a.vae_steps, unet_steps=a.unet_steps, seed=a.seed)
    info = train(recipe, a.out, Path(a.workdir))
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
