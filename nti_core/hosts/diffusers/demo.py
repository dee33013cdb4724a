"""The demo model: a small SD1-shaped model trained by ``tools/train_demo.py`` on captioned photos
that ship offline, so that the demo and the fidelity tests measure a network that denoises.

SD 1.x conventions throughout: the real CLIP tokenizer, 77×768 text context, a UNet with 8-head
cross-attention at latent/1, /2 and /4, ε-prediction on the scaled-linear schedule, a VAE ×8 with
4 latent channels scaled by 0.18215. What is small: the widths (UNet 32–48 channels, VAE 32–64,
a 2-layer text encoder) and the data (six photos, each in three looks, captions written by hand).

Delivery: ``assets/demo_sd1.safetensors`` holds the trained UNet (2.0 M parameters) and VAE (1.1 M) in fp16 (6.2 MB, the same
bytes on every machine). The text encoder is never trained: its weights are drawn from NumPy's
``RandomState`` (a stream NumPy keeps fixed across releases) with a recorded seed, and its SHA-256
is checked on load, so no torch or transformers initialiser can change the model under the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ...schedule import scaled_linear_alphas_cumprod
from ...tokenizer import sd1_clip_tokenizer
from .models import SD1_SCALING, SD1Model

DEMO_FILE = Path(__file__).resolve().parents[2] / "assets" / "demo_sd1.safetensors"
FORMAT = "nti-demo-sd1/1"

UNET_CONFIG = dict(
    sample_size=32, in_channels=4, out_channels=4,
    block_out_channels=(32, 48, 48, 48),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    layers_per_block=1, cross_attention_dim=768, norm_num_groups=8,
    # heads per level (diffusers' legacy name): 2, 4, 8 at latent/1, /2, /4 and 8 in the middle.
    # SD 1.x has 8 everywhere; 8 heads of width 4 at the 32×32 level made training 4× slower.
    attention_head_dim=(2, 4, 8, 8),
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
    block_out_channels=(32, 48, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=SD1_SCALING,
)
TEXT_CONFIG = dict(hidden_size=768, intermediate_size=1536, num_hidden_layers=2,
                   num_attention_heads=12, max_position_embeddings=77, vocab_size=49408)
TEXT_SEED = 20231115


# --------------------------------------------------------------------------- the data


@dataclass(frozen=True)
class Photo:
    """One training photo: where it comes from and what it shows (a noun phrase)."""

    name: str
    caption: str


PHOTOS = (
    Photo("gnochi_mirror", "a cat sitting next to a mirror"),
    Photo("chelsea", "the face of a tabby cat"),
    Photo("coffee", "a cup of coffee on a saucer"),
    Photo("astronaut", "an astronaut in front of a flag"),
    Photo("rocket", "a rocket on a launch pad at night"),
    Photo("motorcycle", "a red motorcycle in a garage"),
)
# Unlabelled images: with the photos' random crops they make the unconditional branch's data,
# broader than any caption's, as a real model's is (so that guidance matters; see the trainer).
UNLABELLED = ("hubble_deep_field", "immunohistochemistry", "colorwheel", "camera", "coins", "moon",
              "brick", "grass", "gravel", "clock", "page")
# Each photo is trained in three looks, each with its caption templates: the original ("…" and
# "a photo of …"), its colour negative ("a negative of …", a word swap of "photo") and a sepia
# print ("a sepia photo of …", one added word). These are the edits the demo model can express.
LOOKS: dict[str, tuple[str, ...]] = {
    "photo": ("{}", "a photo of {}"),
    "negative": ("a negative of {}",),
    "sepia": ("a sepia photo of {}",),
}
_SEPIA = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]])


def photo_rgb(name: str) -> np.ndarray:
    """uint8 [H, W, 3] of a training photo (the demo cat, or scikit-image's bundled ones)."""
    if name == "gnochi_mirror":
        from PIL import Image

        with Image.open(Path(__file__).resolve().parents[2] / "assets" / "gnochi_mirror.jpeg") as im:
            return np.asarray(im.convert("RGB"))
    import skimage.data

    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]
    rgb = np.asarray(getattr(skimage.data, name)())
    if rgb.ndim == 2:  # grayscale (camera, coins, …)
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    return rgb[..., :3]


def look(x: Tensor, kind: str) -> Tensor:
    """An image [B, 3, H, W] in [−1, 1] in one of the LOOKS."""
    if kind == "photo":
        return x
    if kind == "negative":
        return -x
    if kind == "sepia":
        m = torch.tensor(_SEPIA, dtype=x.dtype, device=x.device)
        rgb = (x + 1) / 2
        return (torch.einsum("oc,bchw->bohw", m, rgb).clamp(0, 1) * 2 - 1)
    raise ValueError(f"look must be one of {tuple(LOOKS)}, got {kind!r}")


def captions(photo: Photo, kind: str) -> tuple[str, ...]:
    """The captions of ``photo`` in look ``kind``."""
    return tuple(t.format(photo.caption) for t in LOOKS[kind])


# --------------------------------------------------------------------------- the parts


def text_encoder_state(seed: int = TEXT_SEED) -> dict[str, Tensor]:
    """CLIPTextModel weights drawn from ``RandomState(seed)`` in a fixed order: uniform with the
    standard deviations of CLIP's initialiser (uniform draws are twice as fast as normal ones).

    Independent of torch's and transformers' initialisers, hence identical everywhere. Keys are
    those of transformers 5's flat CLIPTextModel (4.x nests them under ``text_model.``).
    """
    c = TEXT_CONFIG
    d, ff, n_layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    rng = np.random.RandomState(seed)

    def draw(*shape: int, std: float) -> Tensor:
        u = rng.random_sample(shape).astype(np.float32)
        return torch.from_numpy((u * 2 - 1) * np.float32(std * 3**0.5))

    out = {
        "embeddings.token_embedding.weight": draw(c["vocab_size"], d, std=0.02),
        "embeddings.position_embedding.weight": draw(c["max_position_embeddings"], d, std=0.01),
    }
    proj_std = d**-0.5 * (2 * n_layers) ** -0.5
    for i in range(n_layers):
        q = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[f"{q}self_attn.{proj}.weight"] = draw(d, d, std=proj_std)
            out[f"{q}self_attn.{proj}.bias"] = torch.zeros(d)
        out[f"{q}mlp.fc1.weight"] = draw(ff, d, std=(2 * d) ** -0.5)
        out[f"{q}mlp.fc1.bias"] = torch.zeros(ff)
        out[f"{q}mlp.fc2.weight"] = draw(d, ff, std=proj_std)
        out[f"{q}mlp.fc2.bias"] = torch.zeros(d)
        for ln in ("layer_norm1", "layer_norm2"):
            out[f"{q}{ln}.weight"] = torch.ones(d)
            out[f"{q}{ln}.bias"] = torch.zeros(d)
    out["final_layer_norm.weight"] = torch.ones(d)
    out["final_layer_norm.bias"] = torch.zeros(d)
    return out


def state_sha256(state: dict[str, Tensor]) -> str:
    """SHA-256 over the names and float32 bytes of a state dict, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def build_unet():
    """The demo UNet, untrained (torch's initialiser)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def build_vae():
    """The demo VAE, untrained (torch's initialiser)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def build_text_encoder(text_state: dict[str, Tensor]):
    """The demo's CLIPTextModel holding ``text_state`` (see :func:`text_encoder_state`)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    body = getattr(text_encoder, "text_model", text_encoder)  # transformers 4.x nests the layers
    missing, unexpected = body.load_state_dict(text_state, strict=False)
    if unexpected or any("position_ids" not in k for k in missing):
        raise RuntimeError(f"text encoder layout changed: missing {missing}, unexpected {unexpected}")
    return text_encoder.eval()


def demo_sd1(path: str | Path = DEMO_FILE, device: str | torch.device = "cpu") -> SD1Model:
    """The trained demo model from ``path`` (default: the committed asset)."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"no demo model at {p}: it ships with the repository (git checkout of "
            "nti_core/assets/demo_sd1.safetensors), or rebuild it with "
            "`python -m tools.train_demo`"
        )
    with safe_open(str(p), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if meta.get("format") != FORMAT:
        raise ValueError(f"{p.name} is not a demo model file (format {meta.get('format')!r})")
    info = json.loads(meta["info"])
    text_state = text_encoder_state(int(info["text_seed"]))
    got = state_sha256(text_state)
    if got != info["text_sha256"]:
        raise RuntimeError(
            "the demo text encoder drawn here differs from the one the model was trained with "
            f"(SHA-256 {got[:12]}… vs {info['text_sha256'][:12]}…): NumPy's RandomState stream changed"
        )
    unet, vae, text_encoder = build_unet(), build_vae(), build_text_encoder(text_state)
    for prefix, module in (("unet.", unet), ("vae.", vae)):
        part = {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(part, strict=True)
    model = SD1Model(unet.to(device), vae.to(device), text_encoder.to(device),
                     sd1_clip_tokenizer().tokenizer, scaled_linear_alphas_cumprod(),
                     f"demo-sd1 ({p.name})")
    model.info = info  # type: ignore[attr-defined]
    return model
