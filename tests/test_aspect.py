"""Photos as users have them: any aspect ratio and size ComfyUI's VAE Encode gives (multiples of
8, not of 64), RGBA / greyscale / palette / 16-bit / EXIF-rotated files, batches refused — the
engine on the tiny diffusers models, the sheets, the CLI's loader and ``--size`` / ``--crop``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from core_support import CAT, CAT_PROMPT, tiny_model
from PIL import Image

from nti_core import (
    NullTextOptions,
    ddim_invert,
    make_grid,
    negative_prompt_inversion,
    null_text_optimize,
    p2p_sample,
    plain_null,
)
from nti_core.alignment import tokenize
from nti_core.attention.edits import blend_map_size, region_mask
from nti_core.attention.maps import (
    AttentionMaps,
    average_maps,
    mask_at,
    photo_window,
    size_of,
    word_maps,
)
from nti_core.attention.plan import P2PSpec
from nti_core.images import (
    contact_sheet,
    fit_size,
    from_array,
    heatmap_grid,
    labelled_grid,
    load_image,
    load_mask,
    tile_box,
)
from nti_core.tokenizer import from_hf

TIGER = "a tiger sitting next to a mirror"
STEPS = 4
SIZES = [(8, 12), (12, 8), (10, 14)]  # latents of 64×96, 96×64 and 80×112 px images (h, w)


def cat_at(h: int, w: int) -> torch.Tensor:
    """The cat photo resized to exactly h×w px, [1, 3, h, w] in [−1, 1]."""
    with Image.open(CAT) as im:
        rgb = np.asarray(im.convert("RGB").resize((w, h), Image.LANCZOS))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


def left_half(h: int, w: int) -> torch.Tensor:
    mask = torch.zeros(1, h, w)
    mask[..., : w // 2] = 1.0
    return mask


# ------------------------------------------------------------------------------ the engine


@pytest.mark.parametrize("latent_hw", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_aspect_engine_inversion_null_text_localblend_maps_and_mask(latent_hw) -> None:
    """At a portrait, a landscape and a non-multiple-of-64 size: the pivot and its recorded maps
    at a quarter of each side (ceil, as the UNet's strided convs), null-text below plain DDIM,
    LocalBlend words × a mask keeping the reconstruction outside both, every map size of the view
    and its grid at the photo's aspect ratio. Measured (latent MSE, null-text / DDIM at 7.5, 4
    steps, 3 iterations): 8×12 0.0174 / 0.0358, 12×8 0.0206 / 0.0474, 10×14 0.017 / 0.0331."""
    m, tok = tiny_model(), from_hf(tiny_model().tokenizer)
    h, w = latent_hw
    x = cat_at(8 * h, 8 * w)
    z0 = m.encode_image(x)
    assert z0.shape == (1, 4, h, w)
    quarter = blend_map_size((h, w))
    assert quarter == tuple(math.ceil(math.ceil(n / 2) / 2) for n in (h, w))
    c = m.encode_prompt(CAT_PROMPT)
    traj = ddim_invert(m.denoiser, z0, c, make_grid(m.alphas_cumprod, STEPS), CAT_PROMPT,
                       record_maps=True)
    # one down and two up layers at the quarter size, 8 heads, one map per step
    assert tuple(traj.maps.shape) == (STEPS, 3, 8, quarter[0] * quarter[1], 77)
    uncond = null_text_optimize(m.denoiser, traj, m.encode_prompt(""),
                                NullTextOptions(inner_steps=3))
    nti = float(F.mse_loss(p2p_sample(m.denoiser, traj, uncond, c), z0))
    ddim = float(F.mse_loss(p2p_sample(m.denoiser, traj, plain_null(traj, m.encode_prompt("")),
                                       c), z0))
    print(f"\n{h}×{w} latent: reconstruction MSE null-text {nti:.3g}, DDIM {ddim:.3g}")
    assert nti < ddim / 1.5, (nti, ddim)

    region = left_half(8 * h, 8 * w)
    spec = P2PSpec(CAT_PROMPT, (TIGER,), blend_words=("cat", "tiger"), blend_start=0.0,
                   blend_threshold=0.9)
    ctrl = spec.build(tok, STEPS, keep_step_maps=True, latent_hw=(h, w), mask=region)
    z = p2p_sample(m.denoiser, traj, uncond, torch.cat([c, m.encode_prompt(TIGER)]),
                   controller=ctrl)
    blend = ctrl.local_blend
    words = blend.word_mask(ctrl.store, (h, w), blend.words, 2)
    both = words[1, 0] & (torch.arange(w) < w // 2)[None, :]
    assert blend.last_mask.shape == (2, 1, h, w) and int(both.sum()) > 0
    assert torch.equal(blend.last_mask, words.float() * region_mask(region, (h, w)))
    diff = (z[1] - z[0]).abs().amax(0)
    assert float(diff[~both].max()) == 0.0 and float(diff[both].min()) > 0.0

    am = AttentionMaps.from_store(ctrl.store, (CAT_PROMPT, TIGER), STEPS, (h, w),
                                  blend.last_mask)
    assert quarter in am.sizes and (h, w) in am.sizes
    for choice in ("all", "1/2", "1/4", "1/8"):
        avg = average_maps(am, 1, size_of(choice, (h, w)), range(STEPS))
        want = (h, w) if choice == "all" else size_of(choice, (h, w))[0]
        assert avg.shape == (*want, 77), choice
    maps, labels = word_maps(average_maps(am, 1, [quarter], range(STEPS)), tokenize(tok, TIGER))
    grid = heatmap_grid(x, maps, labels, tile=64, columns=4)
    tw, th = tile_box((8 * h, 8 * w), 64)
    assert (tw, th) == ((64, round(64 * h / w)) if w >= h else (round(64 * w / h), 64))
    assert grid.shape[1] == 4 * (tw + 6) + 6  # 7 words in rows of 4: tiles at the aspect ratio
    assert AttentionMaps.from_trajectory(traj).sizes == [quarter]


def test_aspect_sdxl_needs_no_multiple_of_64() -> None:
    """SDXL's UNet (two downsamplings) at a 9×5 latent (72×40 px): inverted and edited with
    LocalBlend words and a mask, the background stays the source's; its size conditioning is
    (72, 40)."""
    from tiny_models import tiny_sdxl

    from nti_core.hosts.diffusers.denoiser import size_ids

    m = tiny_sdxl()
    z0 = m.encode_image(cat_at(72, 40))
    assert z0.shape == (1, 4, 9, 5) and size_ids(z0)[0].tolist() == [72, 40, 0, 0, 72, 40]
    c = m.encode_prompt(CAT_PROMPT)
    traj = ddim_invert(m.denoiser, z0, c, make_grid(m.alphas_cumprod, 3), CAT_PROMPT)
    ctrl = P2PSpec(CAT_PROMPT, (TIGER,), blend_words=("cat", "tiger"), blend_start=0.0,
                   blend_threshold=0.9).build(m.plan_tokenizer(), 3, latent_hw=(9, 5),
                                              mask=left_half(72, 40))
    z = p2p_sample(m.denoiser, traj, negative_prompt_inversion(traj),
                   torch.cat([c, m.encode_prompt(TIGER)]), controller=ctrl)
    assert ctrl.store.resolutions() == [blend_map_size((9, 5))] == [(3, 2)]
    keep = ~ctrl.local_blend.last_mask[1, 0].bool()
    assert 0 < int(keep.sum()) < 45
    assert float((z[1] - z[0]).abs().amax(0)[keep].max()) == 0.0


def test_aspect_mask_and_map_view_follow_vae_encodes_crop() -> None:
    """A 100×70 px image (width 70) becomes a 12×8 latent of its centre 96×64 px: a mask at the
    image's size counts only that centre; the map view draws that centre and gives LocalBlend's
    mask back at 100×70, its edge repeated into the cropped rows; a transposed image is refused."""
    assert photo_window((100, 70), (12, 8)) == (slice(2, 98), slice(3, 67))
    mask = torch.zeros(1, 100, 70)
    mask[:, 2:98, 3:35] = 1.0  # the left half of the centre 96×64
    assert torch.equal(region_mask(mask, (12, 8)), left_half(12, 8)[None])
    with pytest.raises(ValueError, match=r"the mask is 100×70 \(width×height\) but the image is "
                                         r"8×12 latent cells"):
        region_mask(mask.transpose(1, 2), (12, 8))
    blend = torch.zeros(1, 1, 12, 8)
    blend[..., 0, :4] = 1.0  # the top row's left half
    out = mask_at(blend, (100, 70), (12, 8))
    assert out.shape == (1, 100, 70)
    assert torch.equal(out[0, :10, :35], torch.ones(10, 35))  # cropped rows 0–1 + latent row 0
    assert float(out[0, 10:].max()) == 0.0 and float(out[0, :10, 35:].max()) == 0.0
    assert torch.equal(mask_at(None, (100, 70), (12, 8)), torch.ones(1, 100, 70))
    with pytest.raises(ValueError, match=r"the image is 100×70 pixels \(width×height\) but the "
                                         r"maps are of a 8×12 latent: connect the image that "
                                         "VAE Encode encoded"):
        photo_window((70, 100), (12, 8))


def test_aspect_batch_of_latents_is_refused_by_the_engine() -> None:
    m = tiny_model()
    z0 = torch.zeros(3, 4, 8, 12)
    with pytest.raises(ValueError, match="the photo's latent z0 must hold 1 image"):
        ddim_invert(m.denoiser, z0, m.encode_prompt(CAT_PROMPT),
                    make_grid(m.alphas_cumprod, 2), CAT_PROMPT)
    with pytest.raises(ValueError, match="expected one mask, got a batch of 2"):
        region_mask(torch.ones(2, 64, 96), (8, 12))


# ------------------------------------------------------------------------------ the sheets


def test_aspect_sheets_keep_the_photo_shape(tmp_path) -> None:
    """Contact sheet, sweep grid and map view: portrait tiles are portrait, square ones square."""
    tall = torch.zeros(1, 3, 96, 64)
    assert tile_box((96, 64), 256) == (171, 256) and tile_box((64, 96), 256) == (256, 171)
    assert tile_box((64, 64), 256) == (256, 256)
    grid = labelled_grid(tall.expand(4, -1, -1, -1), ["", ""], ["", ""], tile=96)
    assert grid.shape[:2] == (16 + 2 * (96 + 8), 8 + 2 * (64 + 8))  # no labels: pads only
    with Image.open(contact_sheet([(tall, "a"), (tall, "b")], tmp_path / "s.png", 2,
                                  tile=96)) as sheet:
        assert sheet.width == 2 * (64 + 8) + 8
    square = heatmap_grid(torch.zeros(1, 3, 64, 64), torch.rand(2, 4, 4), ["a", "b"], tile=64)
    portrait = heatmap_grid(tall, torch.rand(2, 6, 4), ["a", "b"], tile=64)
    assert square.shape[0] == portrait.shape[0] and square.shape[1] - portrait.shape[1] == 2 * 21


# ------------------------------------------------------------------------------ the loader


@pytest.mark.parametrize("wh, size, crop, out", [
    ((960, 1280), 64, False, (48, 64)),  # 3:4 portrait: the longer side is --size
    ((1280, 960), 512, False, (512, 384)),
    ((150, 100), 96, False, (96, 64)),  # 3:2
    ((1000, 1000), 96, False, (96, 96)),
    ((640, 427), 512, False, (512, 344)),  # 341.6 → the nearest multiple of 8
    ((150, 100), 96, True, (96, 96)),  # --crop: the centre square
])
def test_aspect_fit_size(wh, size, crop, out) -> None:
    assert fit_size(*wh, size, crop) == out


def test_aspect_fit_size_refuses_a_sliver() -> None:
    assert fit_size(2000, 20, 512, False) == (512, 8)  # 5.1 px: the nearest multiple of 8
    with pytest.raises(ValueError, match=r"the photo is 5000×20 pixels: at --size 512 its "
                                         r"shorter side would be 2.0 px, which rounds to no "
                                         "multiple of 8; raise --size or use --crop"):
        fit_size(5000, 20, 512, False)


def photo_rgb(w: int = 60, h: int = 40) -> np.ndarray:
    """A smooth colourful test picture, uint8 [h, w, 3]."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (w + h - 2)],
                    -1).astype(np.uint8)


def test_aspect_loader_reads_every_mode_as_users_have_them(tmp_path) -> None:
    """RGBA drops its alpha (the colour under it stays, as ComfyUI's Load Image), LA / L /
    palette / 16-bit greyscale become grey RGB (16-bit scaled, not clipped to white), an
    EXIF-rotated JPEG is turned upright; each keeps its aspect ratio."""
    rgb = photo_rgb()
    want = load_image_from(rgb, tmp_path / "rgb.png")
    assert want.shape == (1, 3, 64, 96)
    rgba = np.concatenate([rgb, np.zeros((40, 60, 1), np.uint8)], -1)  # fully transparent
    assert torch.equal(load_image_from(rgba, tmp_path / "rgba.png"), want)
    grey = rgb.mean(-1).round().astype(np.uint8)
    grey_rgb = load_image_from(np.repeat(grey[..., None], 3, -1), tmp_path / "grey_rgb.png")
    assert torch.equal(load_image_from(grey, tmp_path / "l.png"), grey_rgb)
    la = np.stack([grey, np.full_like(grey, 128)], -1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert torch.equal(load_image(tmp_path / "la.png", 96, crop=False), grey_rgb)
    palette = Image.fromarray(rgb).quantize(colors=64)
    palette.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert torch.equal(load_image(tmp_path / "p.png", 96, crop=False),
                       load_image_from(np.asarray(palette.convert("RGB")), tmp_path / "p_rgb.png"))
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert torch.equal(load_image(tmp_path / "g16.png", 96, crop=False), grey_rgb)
    # EXIF orientation 6: the stored pixels are the photo turned 90° anticlockwise (40 wide,
    # 60 tall); viewers turn them back clockwise, and so does the loader
    stored = np.ascontiguousarray(np.rot90(rgb))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    Image.fromarray(rgb).save(tmp_path / "upright.jpg", quality=95)
    rotated = load_image(tmp_path / "rotated.jpg", 96, crop=False)
    assert rotated.shape == (1, 3, 64, 96)
    upright = load_image(tmp_path / "upright.jpg", 96, crop=False)
    assert float((rotated - upright).abs().mean()) < 0.03  # JPEG noise only
    # the mask is drawn on the photo as shown (upright, 60×40)
    Image.fromarray(np.full((40, 60), 255, np.uint8)).save(tmp_path / "mask.png")
    mask = load_mask(tmp_path / "mask.png", tmp_path / "rotated.jpg", 96, crop=False)
    assert mask.shape == (1, 64, 96) and float(mask.min()) == 1.0
    assert load_mask(tmp_path / "mask.png", tmp_path / "rotated.jpg", 96).shape == (1, 96, 96)
    Image.fromarray(grey).save(tmp_path / "m8.png")  # a 16-bit mask reads as its 8-bit twin
    assert torch.equal(load_mask(tmp_path / "g16.png", tmp_path / "upright.jpg", 96, crop=False),
                       load_mask(tmp_path / "m8.png", tmp_path / "upright.jpg", 96, crop=False))


def load_image_from(pixels: np.ndarray, path) -> torch.Tensor:
    Image.fromarray(pixels).save(path)
    return load_image(path, 96, crop=False)


def test_aspect_from_array_keeps_the_old_square_crop() -> None:
    """crop=True (the demo's and the benchmarks' convention, the CLI's --crop) is the centre
    square as before."""
    rgb = photo_rgb(90, 60)
    square = from_array(rgb, 64)
    centre = from_array(np.ascontiguousarray(rgb[:, 15:75]), 64, crop=False)
    assert square.shape == (1, 3, 64, 64) and torch.equal(square, centre)


# ------------------------------------------------------------------------------ the CLI


def test_aspect_cli_keeps_a_3_2_photo_3_2_and_crop_makes_a_square(tiny_ckpt, tmp_path) -> None:
    from nti_core.app import main

    with Image.open(CAT) as im:
        im.convert("RGB").crop((0, 320, 960, 960)).save(tmp_path / "wide.png")  # 960×640, 3:2
    base = ["edit", "--model", str(tiny_ckpt), "--image", str(tmp_path / "wide.png"),
            "--source", CAT_PROMPT, "--target", TIGER, "--blend-words", "cat, tiger",
            "--steps", "2", "--size", "96", "--method", "negative-prompt"]
    for extra, size in (([], (96, 64)), (["--crop"], (96, 96))):
        out = tmp_path / ("crop" if extra else "whole")
        assert main([*base, *extra, "--out", str(out)]) == 0
        report = json.loads((out / "report.json").read_text())
        assert (report["image"]["width"], report["image"]["height"]) == size
        assert report["image"]["crop"] == bool(extra)
        for name in ("reconstruction.png", "edit_1.png", "blend_mask_1.png"):
            with Image.open(out / name) as im:
                want = size if name != "blend_mask_1.png" else (size[0] // 8, size[1] // 8)
                assert im.size == want, (name, extra)
        with Image.open(out / "contact_sheet.png") as sheet:  # 3 tiles, longer side 256
            tile_w = 256 if size[0] >= size[1] else round(256 * size[0] / size[1])
            assert sheet.width == 3 * (tile_w + 8) + 8
