"""StyleDiffusion's image encoder E on the diffusers side: a transformers ``CLIPVisionModel``.

E(x) = post_layernorm(last hidden state) over *all* tokens (class token and patches), as the
official code's patched CLIP ``VisionTransformer`` returns ``ln_post(x)`` without the projection:
ViT-B/16 at 224 px gives 197 × 768. The photo is prepared as CLIP prepares it: shorter side
resized to the model's image size (bicubic), centre crop, CLIP's mean and std.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(image: Tensor, size: int) -> Tensor:
    """[1, 3, H, W] in [−1, 1] → CLIP's input [1, 3, size, size]."""
    x = (image.float() + 1) / 2
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))),
                      mode="bicubic", align_corners=False, antialias=True)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top : top + size, left : left + size].clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def image_tokens(model, image: Tensor) -> Tensor:
    """E(x) [1, tokens, width] of a transformers CLIPVisionModel (frozen, fp32)."""
    size = int(model.config.image_size)
    device = next(model.parameters()).device
    out = model(pixel_values=clip_pixels(image, size).to(device, next(model.parameters()).dtype))
    post = getattr(model, "vision_model", model).post_layernorm  # transformers 4 nests it
    return post(out.last_hidden_state).float()


def describe(model) -> str:
    c = model.config
    return (f"CLIP vision, {c.num_hidden_layers} layers, patch {c.patch_size} at "
            f"{c.image_size} px")


def load_clip_vision(path: str | Path, device: str | torch.device = "cpu"):
    """A transformers CLIPVisionModel (or the vision half of a CLIPModel) from a folder with
    ``config.json`` and safetensors weights, e.g. openai/clip-vit-base-patch16 (the paper's E)."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ValueError(f"no image encoder at {p}: expected a transformers CLIP vision folder "
                         "(config.json + model.safetensors), e.g. openai/clip-vit-base-patch16")
    from transformers import CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(str(p), use_safetensors=True)
    return model.to(device).eval().requires_grad_(False)
