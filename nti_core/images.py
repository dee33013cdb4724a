"""Photos in and out: centre-cropped square tensors in [−1, 1] (REFERENCE §1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def load_image(path: str | Path, size: int = 512) -> Tensor:
    """An RGB photo → [1, 3, size, size] in [−1, 1], centre-cropped square then resized."""
    from PIL import Image, UnidentifiedImageError

    if size % 8 != 0 or size < 64:
        raise ValueError(f"image size must be a multiple of 8 and ≥ 64, got {size}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no image at {p}")
    try:
        img = Image.open(p)
        img.load()
    except UnidentifiedImageError as e:
        raise ValueError(f"{p} is not an image PIL can read") from e
    return from_array(np.asarray(img.convert("RGB")), size)


def from_array(rgb: np.ndarray, size: int) -> Tensor:
    """uint8 [H, W, 3] → centre-cropped, resized [1, 3, size, size] in [−1, 1]."""
    from PIL import Image

    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {rgb.shape}")
    h, w = rgb.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = Image.fromarray(rgb[top : top + s, left : left + s]).resize((size, size), Image.LANCZOS)
    x = torch.from_numpy(np.asarray(crop).copy()).float() / 127.5 - 1.0
    return x.permute(2, 0, 1)[None]


def to_uint8(x: Tensor) -> np.ndarray:
    """[B, 3, H, W] in [−1, 1] → uint8 [B, H, W, 3]."""
    y = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return y.permute(0, 2, 3, 1).cpu().numpy()


def save_png(x: Tensor, path: str | Path) -> Path:
    """Save one image [1, 3, H, W] in [−1, 1] as PNG."""
    from PIL import Image

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(x)[0]).save(p)
    return p

