"""Photos in and out: centre-cropped square tensors in [−1, 1] (REFERENCE §1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def load_image(path: str | Path, size: int = 512) -> Tensor:
    """An RGB photo → [1, 3, size, size] in [−1, 1], centre-cropped square then resized."""
    if size % 8 != 0 or size < 64:
        raise ValueError(f"image size must be a multiple of 8 and ≥ 64, got {size}")
    return from_array(np.asarray(open_image(path).convert("RGB")), size)


def open_image(path: str | Path, what: str = "image"):
    """The PIL image at ``path``, loaded; FileNotFoundError / ValueError saying what is wrong."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no {what} at {p}")
    try:
        img = Image.open(p)
        img.load()
    except UnidentifiedImageError as e:
        raise ValueError(f"{p} is not an image PIL can read") from e
    return img


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


def load_mask(path: str | Path, photo: str | Path, size: int = 512) -> Tensor:
    """A mask image drawn on ``photo`` (its size; white = may change, brightness × opacity)
    → [1, size, size] in 0…1, centre-cropped and resized (area-averaged) as ``load_image``
    crops the photo."""
    from PIL import Image

    p = Path(path)
    img = open_image(p, "mask image")
    with Image.open(photo) as ph:
        if img.size != ph.size:
            raise ValueError(f"the mask {p.name} is {img.size[0]}×{img.size[1]} pixels but the "
                             f"photo is {ph.size[0]}×{ph.size[1]}: draw the mask on the photo's "
                             "own pixels")
    m = np.asarray(img.convert("L"), dtype=np.float32) / 255
    if "A" in img.getbands():
        m = m * np.asarray(img.getchannel("A"), dtype=np.float32) / 255
    h, w = m.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = torch.from_numpy(m[top : top + s, left : left + s].copy())[None, None]
    mode = "area" if s >= size else "bilinear"
    return torch.nn.functional.interpolate(crop, size=(size, size), mode=mode)[0].clamp(0, 1)


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



def psnr(a: Tensor, b: Tensor) -> float:
    """PSNR in dB between images in [−1, 1] (as 8-bit viewers see them: clamped to [0, 1])."""
    x = ((a.detach().float() + 1) / 2).clamp(0, 1)
    y = ((b.detach().float() + 1) / 2).clamp(0, 1)
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * float(np.log10(1.0 / mse))


def wrap_text(text: str, font, width: float) -> list[str]:
    """Split ``text`` into lines (on "\n", then between words) no wider than ``width``."""
    out: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split(" "):
            trial = f"{line} {word}" if line else word
            if line and font.getlength(trial) > width:
                out.append(line)
                line = word
            else:
                line = trial
        out.append(line)
    return out


def contact_sheet(tiles: list[tuple[Tensor, str]], path: str | Path, columns: int,
                  title: str = "", tile: int = 256) -> Path:
    """One PNG: images [1, 3, H, W] in [−1, 1], each shown at ``tile`` px with its caption below
    (wrapped to the tile's width), ``columns`` per row, an optional title on top."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=max(11, tile // 18))
    line = int(font.size * 1.3)
    captions = [wrap_text(c, font, tile) for _, c in tiles]
    pad = 8
    heading = wrap_text(title, font, columns * (tile + pad) - pad) if title else []
    top = len(heading) * line + (pad if heading else 0)
    rows = -(-len(tiles) // columns)
    cell_w, cell_h = tile + pad, tile + pad + max(map(len, captions)) * line + pad
    sheet = Image.new("RGB", (columns * cell_w + pad, top + rows * cell_h + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for k, text in enumerate(heading):
        draw.text((pad, pad + k * line), text, fill="black", font=font)
    for n, ((x, _), lines) in enumerate(zip(tiles, captions, strict=True)):
        r, c = divmod(n, columns)
        left, upper = pad + c * cell_w, top + pad + r * cell_h
        img = Image.fromarray(to_uint8(x)[0]).resize((tile, tile), Image.LANCZOS)
        sheet.paste(img, (left, upper))
        for k, text in enumerate(lines):
            draw.text((left, upper + tile + 4 + k * line), text, fill="black", font=font)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(p)
    return p


def labelled_grid(tiles: Tensor, rows: list[str], columns: list[str], title: str = "",
                  tile: int = 256, font=None) -> np.ndarray:
    """Images [R·C, 3, H, W] in [−1, 1], row-major, as one grid: each column's label above it,
    each row's label left of it (empty labels take no room), an optional title on top, in
    ``font`` (PIL's default at tile/16 when None) → RGB uint8 [·, ·, 3]."""
    from PIL import Image, ImageDraw, ImageFont

    if tiles.shape[0] != len(rows) * len(columns):
        raise ValueError(f"{tiles.shape[0]} images for {len(rows)} rows × {len(columns)} columns")
    font = font or ImageFont.load_default(size=max(11, tile // 16))
    line, pad = int(font.size * 1.3), 8
    side = [wrap_text(r, font, tile * 0.6) for r in rows] if any(rows) else []
    left = int(max(font.getlength(s) for r in side for s in r)) + 2 * pad if side else pad
    heads = [wrap_text(c, font, tile) if c else [] for c in columns]
    width = left + len(columns) * (tile + pad)
    heading = wrap_text(title, font, width - 2 * pad) if title else []
    top = pad + len(heading) * line + max(map(len, heads)) * line + pad
    sheet = Image.new("RGB", (width, top + len(rows) * (tile + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, text in enumerate(heading):
        draw.text((pad, pad + k * line), text, fill="black", font=font)
    for c, lines in enumerate(heads):
        for k, text in enumerate(lines):
            draw.text((left + c * (tile + pad), top - pad - (len(lines) - k) * line), text,
                      fill="black", font=font)
    for r, lines in enumerate(side):
        for k, text in enumerate(lines):
            draw.text((pad, top + r * (tile + pad) + (tile - len(lines) * line) // 2 + k * line),
                      text, fill="black", font=font)
    for n, img in enumerate(to_uint8(tiles)):
        r, c = divmod(n, len(columns))
        sheet.paste(Image.fromarray(img).resize((tile, tile), Image.LANCZOS),
                    (left + c * (tile + pad), top + r * (tile + pad)))
    return np.array(sheet)


def loss_plot(first: list[float], final: list[float], title: str = "",
              size: tuple[int, int] = (480, 200)) -> np.ndarray:
    """Each optimised step's first (light) and final (dark) loss on a log axis, as the nodes'
    loss curve draws them → RGB uint8 [H, W, 3]."""
    from PIL import Image, ImageDraw, ImageFont

    if not first or len(first) != len(final):
        raise ValueError(f"expected as many first as final losses (one per step, at least one), "
                         f"got {len(first)} and {len(final)}")
    values = np.log10(np.clip(np.array([*first, *final], dtype=np.float64), 1e-12, None))
    lo, hi = np.floor(values.min()), np.ceil(values.max())
    hi = hi if hi > lo else lo + 1
    font = ImageFont.load_default(size=12)
    width, height = size
    left, right, top, bottom = 48, 12, 24, 24
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 4), title or f"loss per step (log): first light, final dark, {len(first)} "
              "steps", fill="black", font=font)
    draw.rectangle((left, top, width - right, height - bottom), outline=(160, 160, 160))
    draw.text((4, top - 6), f"1e{hi:.0f}", fill="black", font=font)
    draw.text((4, height - bottom - 8), f"1e{lo:.0f}", fill="black", font=font)
    draw.text((left, height - bottom + 4), "1", fill="black", font=font)
    draw.text((width - right - 24, height - bottom + 4), str(len(first)), fill="black", font=font)

    def points(losses: list[float]) -> list[tuple[float, float]]:
        n = max(len(losses) - 1, 1)
        y = np.log10(np.clip(np.array(losses, dtype=np.float64), 1e-12, None))
        return [(left + (width - left - right) * i / n,
                 top + (height - top - bottom) * (hi - v) / (hi - lo)) for i, v in enumerate(y)]

    for losses, colour in ((first, (150, 190, 240)), (final, (20, 60, 160))):
        xy = points(losses)
        draw.line(xy, fill=colour, width=2) if len(xy) > 1 else draw.point(xy, fill=colour)
    return np.array(img)


# Anchors of a perceptual dark-blue → yellow colour map (close to matplotlib's "viridis").
_COLOURS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
                    dtype=np.float32)


def colourise(m: np.ndarray) -> np.ndarray:
    """[h, w] in [0, 1] → RGB uint8 [h, w, 3] on the colour map above."""
    x = np.clip(m, 0.0, 1.0) * (len(_COLOURS) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_COLOURS) - 2)
    f = (x - lo)[..., None]
    return (_COLOURS[lo] * (1 - f) + _COLOURS[lo + 1] * f).round().astype(np.uint8)


def heatmap_grid(photo: Tensor, maps: Tensor, labels: list[str], title: str = "",
                 tile: int = 192, columns: int = 8, opacity: float = 0.6) -> np.ndarray:
    """Each map [n, h, w] (normalised by its own maximum, as P2P's ``show_cross_attention``)
    coloured and laid over the photo [1, 3, H, W] in [−1, 1], its label below; ``columns`` per
    row, an optional title on top → RGB uint8 [rows·…, …, 3]."""
    from PIL import Image, ImageDraw, ImageFont

    if maps.shape[0] != len(labels):
        raise ValueError(f"{maps.shape[0]} maps but {len(labels)} labels")
    base = Image.fromarray(to_uint8(photo)[0]).resize((tile, tile), Image.LANCZOS)
    grey = np.asarray(base.convert("L").convert("RGB"), dtype=np.float32)
    font = ImageFont.load_default(size=max(11, tile // 14))
    line, pad = int(font.size * 1.3), 6
    cols = max(1, min(columns, len(labels)))
    rows = -(-len(labels) // cols)
    heading = wrap_text(title, font, cols * (tile + pad) - pad) if title else []
    top = len(heading) * line + (pad if heading else 0)
    cell_w, cell_h = tile + pad, tile + line + 2 * pad
    sheet = Image.new("RGB", (cols * cell_w + pad, top + rows * cell_h + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for k, text in enumerate(heading):
        draw.text((pad, pad + k * line), text, fill="black", font=font)
    m = maps.detach().float()
    m = torch.nn.functional.interpolate(m[:, None], size=(tile, tile), mode="bilinear",
                                        align_corners=False)[:, 0]
    m = m / m.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    for n, (heat, label) in enumerate(zip(m.cpu().numpy(), labels, strict=True)):
        r, c = divmod(n, cols)
        left, upper = pad + c * cell_w, top + pad + r * cell_h
        mixed = (1 - opacity) * grey + opacity * colourise(heat).astype(np.float32)
        sheet.paste(Image.fromarray(mixed.round().astype(np.uint8)), (left, upper))
        text = label if font.getlength(label) <= tile else wrap_text(label, font, tile)[0] + "…"
        draw.text((left + (tile - font.getlength(text)) / 2, upper + tile + 3), text,
                  fill="black", font=font)
    return np.array(sheet)  # a writable copy (torch.from_numpy needs one)
