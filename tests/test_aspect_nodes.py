"""Photos as users have them, through the nodes in-process against a real ComfyUI checkout
(skipped without $COMFYUI_PATH): the shipped SD 1.x workflows' nodes at a portrait size, latents
that are not square nor multiples of 64, RGBA and greyscale IMAGEs, batches refused before work.

The model is the HTTP tests' tiny checkpoint (``quarter_sd15``): its cross-attention sits at a
quarter of the latent side, what LocalBlend, the recorded maps and the map view read."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import comfy_support
import pytest
import torch
from test_nodes import PLAN_DEFAULTS, SOURCE, load_pack, run

STEPS = 3
REPO = Path(__file__).resolve().parents[1]
SD1_WORKFLOWS = ("nti_p2p_real_image_edit", "nti_p2p_reweight_localblend",
                 "nti_styled_p2plus_attention_maps")
TARGET = "a tiger sitting next to a mirror"
BLEND = {**PLAN_DEFAULTS, "target_prompts": TARGET, "edit_kind": "replace", "reweight": "tiger:2",
         "blend_words": "cat, tiger", "blend_start": 0.0}  # the LocalBlend workflow's plan


@pytest.fixture(scope="module")
def N(comfy_root: Any) -> Any:  # noqa: N802 (the node classes, by id)
    return {cls.GET_SCHEMA().node_id: cls for cls in load_pack().nodes.NODES}


@pytest.fixture(scope="module")
def folders(comfy_root: Path, tmp_path_factory: pytest.TempPathFactory):
    import folder_paths

    base = tmp_path_factory.mktemp("aspect_folders")
    old = folder_paths.get_input_directory(), folder_paths.get_output_directory()
    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.set_output_directory(str(base / "output"))
    (base / "input").mkdir()
    try:
        yield base
    finally:
        folder_paths.set_input_directory(old[0])
        folder_paths.set_output_directory(old[1])


@pytest.fixture(scope="module")
def clip_vision(comfy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return comfy_support.tiny_clip_vision(tmp_path_factory.mktemp("aspect_clip_vision"))


def left_half(h: int, w: int) -> torch.Tensor:
    mask = torch.zeros(1, h, w)
    mask[..., : w // 2] = 1.0
    return mask


def raw_latent(h: int, w: int, batch: int = 1) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"samples": torch.randn(batch, 4, h, w, generator=g) / 0.18215}


def invert(N: Any, model: Any, clip: Any, latent: dict) -> tuple[Any, Any]:  # noqa: N803
    """DDIM Invert (record_maps) → Null-Text Optimize (the paper's, 2 iterations)."""
    traj, recon = run(N["NTIDDIMInvert"], model=model, clip=clip, latent=latent,
                      source_prompt=SOURCE, steps=STEPS, grid="reference", record_maps=True).args
    uncond, _ = run(N["NTINullTextOptimize"], model=model, clip=clip, trajectory=traj,
                    guidance=7.5, inner_steps=2, early_stop=1e-5, method="null-text").args
    return traj, uncond


def assert_blended(z: torch.Tensor, attention: Any, w: int) -> None:
    """Outside LocalBlend's mask × the left half, the edit is the reconstruction's latent."""
    allowed = attention.mask[1, 0].bool() & (torch.arange(w) < w // 2)[None, :]
    diff = (z[1] - z[0]).abs().amax(0)
    assert float(diff[~allowed].max()) == 0.0
    assert int(allowed.sum()) > 0 and float(diff[allowed].min()) > 0.0


@pytest.fixture(scope="module")
def portrait(N: Any, quarter_sd15: Any, folders: Path) -> dict[str, Any]:  # noqa: N803
    """The shipped SD 1.x workflows' nodes at 64×96 px (portrait, width 64): Load Image → Image
    Scale (lanczos, centre) → VAE Encode → DDIM Invert → Null-Text Optimize → Attention Edit
    Plan (the LocalBlend workflow's) → P2P Sample (+ a mask) → VAE Decode → Save Image, and
    Attention Maps on the photo."""
    from PIL import Image

    import nodes

    model, clip, vae = quarter_sd15
    photo = REPO / "nti_core" / "assets" / "gnochi_mirror.jpeg"
    with Image.open(photo) as im:
        im.save(folders / "input" / "portrait.jpg")
    ran = {"LoadImage", "ImageScale", "VAEEncode", "VAEDecode", "SaveImage"}
    with torch.inference_mode():
        loaded, _ = nodes.LoadImage().load_image("portrait.jpg")
        (image,) = nodes.ImageScale().upscale(loaded, "lanczos", 64, 96, "center")
        (latent,) = nodes.VAEEncode().encode(vae, image)
    traj, uncond = invert(N, model, clip, latent)
    (plan,) = run(N["NTIAttentionEditPlan"], clip=clip, **BLEND).args
    latents, attention = run(N["NTIP2PSample"], model=model, trajectory=traj, uncond=uncond,
                             plan=plan, guidance=7.5, mask=left_half(96, 64)).args
    with torch.inference_mode():
        (decoded,) = nodes.VAEDecode().decode(vae, latents)
        saved = nodes.SaveImage().save_images(decoded, "aspect/portrait")
    grid, mask = run(N["NTIAttentionMaps"], image=image, attention=attention, row=1, sizes="1/4",
                     step_start=0.0, step_end=1.0).args
    ran |= {"NTIDDIMInvert", "NTINullTextOptimize", "NTIAttentionEditPlan", "NTIP2PSample",
            "NTIAttentionMaps"}
    return {"image": image, "latent": latent, "traj": traj, "uncond": uncond, "plan": plan,
            "latents": latents, "attention": attention, "decoded": decoded, "saved": saved,
            "grid": grid, "mask": mask, "ran": ran}


def test_aspect_portrait_through_every_node(N: Any, quarter_sd15: Any, portrait: dict[str, Any],
                                            folders: Path, clip_vision: Any) -> None:
    """Every node of the shipped SD 1.x workflows (the loaders' MODEL, CLIP, VAE and CLIP_VISION
    come from fixtures) at 64×96 px: the edit keeps the portrait, LocalBlend × the mask keeps
    the reconstruction outside, the map view keeps the aspect ratio, StyleDiffusion Invert and
    P2P Sweep run on it."""
    from PIL import Image

    model, clip, vae = quarter_sd15
    p = portrait
    assert p["image"].shape == (1, 96, 64, 3) and p["latent"]["samples"].shape == (1, 4, 12, 8)
    assert tuple(p["traj"].maps.shape) == (STEPS, 3, 8, 3 * 2, 77)  # quarter maps: 3×2
    z = p["latents"]["samples"]
    assert z.shape == (2, 4, 12, 8) and p["decoded"].shape == (2, 96, 64, 3)
    assert_blended(z, p["attention"], 8)
    for entry in p["saved"]["ui"]["images"]:
        with Image.open(folders / "output" / entry["subfolder"] / entry["filename"]) as im:
            assert im.size == (64, 96)
    # the map view: 7 words in one row of portrait tiles (longer side 192 → 128×192)
    assert p["grid"].shape[2] == 7 * (128 + 6) + 6 and p["grid"].shape[1] > 192
    want = torch.nn.functional.interpolate(p["attention"].mask[1:2], size=(96, 64))[:, 0]
    assert torch.equal(p["mask"], want)
    # StyleDiffusion Invert on the portrait photo, then its values through P2P Sample
    values, unc, _ = run(N["NTIStyleInvert"], model=model, clip=clip, clip_vision=clip_vision,
                         image=p["image"], trajectory=p["traj"], guidance=7.5, inner_steps=2,
                         attention_loss=1.0, variant="official").args
    styled, _ = run(N["NTIP2PSample"], model=model, trajectory=p["traj"], uncond=unc,
                    plan=p["plan"], guidance=7.5, values=values).args
    assert styled["samples"].shape == (2, 4, 12, 8)
    grid, cells = run(N["NTIP2PSweep"], model=model, trajectory=p["traj"], uncond=p["uncond"],
                      plan=p["plan"], vae=vae, guidance=7.5, rows="cross_end=0.2,0.8",
                      columns="", mask=left_half(96, 64)).args
    assert cells["samples"].shape == (2, 4, 12, 8)
    assert grid.shape[2] < grid.shape[1]  # two portrait cells in a column: taller than wide
    ran = p["ran"] | {"NTIStyleInvert", "NTIP2PSweep"}
    for name in SD1_WORKFLOWS:
        workflow = json.loads((REPO / "workflows" / f"{name}.json").read_text())
        types = {n["type"] for n in workflow["nodes"]}
        loaders = {"CheckpointLoaderSimple", "CLIPVisionLoader", "MarkdownNote"}
        assert types - loaders <= ran, (name, types - loaders - ran)


@pytest.mark.parametrize("hw", [(8, 12), (10, 14)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_aspect_landscape_latents_through_the_nodes(N: Any, quarter_sd15: Any,
                                                    hw: tuple[int, int]) -> None:
    """Landscape latents, one not a multiple of 64 px (80×112): DDIM Invert → Null-Text
    Optimize → LocalBlend plan → P2P Sample with a mask → Attention Maps (edit and inversion)."""
    model, clip, _ = quarter_sd15
    h, w = hw
    traj, uncond = invert(N, model, clip, raw_latent(h, w))
    quarter = tuple(math.ceil(math.ceil(n / 2) / 2) for n in (h, w))  # the UNet's strided convs
    assert traj.maps.shape[3] == quarter[0] * quarter[1]
    (plan,) = run(N["NTIAttentionEditPlan"], clip=clip, **BLEND).args
    latents, attention = run(N["NTIP2PSample"], model=model, trajectory=traj, uncond=uncond,
                             plan=plan, guidance=7.5, mask=left_half(8 * h, 8 * w)).args
    assert latents["samples"].shape == (2, 4, h, w) and attention.sizes == [quarter]
    assert_blended(latents["samples"], attention, w)
    photo = torch.rand(1, 8 * h, 8 * w, 3, generator=torch.Generator().manual_seed(0))
    opts = dict(row=1, sizes="1/4", step_start=0.0, step_end=1.0)
    grid, mask = run(N["NTIAttentionMaps"], image=photo, attention=attention, **opts).args
    assert grid.shape[2] == 7 * (192 + 6) + 6 and mask.shape == (1, 8 * h, 8 * w)  # landscape
    grid, mask = run(N["NTIAttentionMaps"], image=photo, trajectory=traj,
                     **{**opts, "row": 0}).args
    assert grid.shape[2] == 7 * (192 + 6) + 6 and torch.equal(mask, torch.ones(1, 8 * h, 8 * w))
    with pytest.raises(ValueError, match=rf"the image is {8 * h}×{8 * w} pixels \(width×height\)"
                                         rf" but the maps are of a {w}×{h} latent"):
        run(N["NTIAttentionMaps"], image=photo.transpose(1, 2), attention=attention, **opts)


def test_aspect_rgba_and_greyscale_images(N: Any, portrait: dict[str, Any],
                                          clip_vision: Any) -> None:
    """RGBA loses its alpha and greyscale is repeated to RGB, in Attention Maps and in
    StyleDiffusion Invert's encoder input; other channel counts are refused."""
    from test_nodes import sub

    rgb = portrait["image"]
    rgba = torch.cat([rgb, torch.zeros_like(rgb[..., :1])], -1)  # fully transparent
    grey = rgb.mean(-1, keepdim=True)
    opts = dict(attention=portrait["attention"], row=1, sizes="1/4", step_start=0.0,
                step_end=1.0)

    def maps(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return run(N["NTIAttentionMaps"], image=image, **opts).args

    assert all(torch.equal(a, b) for a, b in zip(maps(rgba), maps(rgb), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(maps(grey), maps(grey.expand(-1, -1, -1, 3)),
                                                 strict=True))
    message = (r"Attention Maps' image must be an IMAGE \[B, H, W, 3\] \(RGB; RGBA loses its "
               r"alpha, greyscale \[B, H, W, 1\] is repeated\), got \(1, 96, 64, 2\): convert it "
               "to RGB")
    with pytest.raises(ValueError, match=message):
        maps(rgb[..., :2])
    tokens = sub("nodes.style_invert").vision_tokens
    with torch.inference_mode():
        assert torch.equal(tokens(clip_vision, rgba)[0], tokens(clip_vision, rgb)[0])
        assert torch.equal(tokens(clip_vision, grey)[0],
                           tokens(clip_vision, grey.expand(-1, -1, -1, 3))[0])
        with pytest.raises(ValueError, match="StyleDiffusion Invert's image must be an IMAGE"):
            tokens(clip_vision, rgb[..., :2])


def test_aspect_batches_are_refused_before_work(N: Any, quarter_sd15: Any,
                                                portrait: dict[str, Any],
                                                clip_vision: Any) -> None:
    """A batch of latents, of masks, of photos for the encoder: one clear refusal each. The map
    view takes one image or one per row (the decoded latents: each row drawn on its own)."""
    from test_nodes import sub

    model, clip, _ = quarter_sd15
    p = portrait
    with pytest.raises(ValueError, match=r"DDIM Invert takes one image, got a batch of 3 latents:"
                                         r" pick one \(e.g. with 'Latent From Batch'\)"):
        run(N["NTIDDIMInvert"], model=model, clip=clip, latent=raw_latent(12, 8, batch=3),
            source_prompt=SOURCE, steps=STEPS, grid="reference")
    with pytest.raises(ValueError, match=r"expected one mask, got a batch of 2: pick one"):
        run(N["NTIP2PSample"], model=model, trajectory=p["traj"], uncond=p["uncond"],
            plan=p["plan"], guidance=7.5, mask=left_half(96, 64).expand(2, -1, -1))
    with pytest.raises(ValueError, match=r"StyleDiffusion Invert takes one image \(the photo "
                                         r"that was inverted\), got a batch of 2: pick it with "
                                         "ImageFromBatch"):
        with torch.inference_mode():
            sub("nodes.style_invert").vision_tokens(clip_vision, p["decoded"])
    opts = dict(attention=p["attention"], row=1, sizes="1/4", step_start=0.0, step_end=1.0)
    per_row = run(N["NTIAttentionMaps"], image=p["decoded"], **opts).args
    alone = run(N["NTIAttentionMaps"], image=p["decoded"][1:2], **opts).args
    assert all(torch.equal(a, b) for a, b in zip(per_row, alone, strict=True))
    with pytest.raises(ValueError, match=r"Attention Maps draws on one image, got a batch of 3 "
                                         r"for a run of 2 rows: connect the photo, or the "
                                         r"decoded latents of this P2P Sample"):
        run(N["NTIAttentionMaps"], image=torch.cat([p["decoded"], p["image"]]), **opts)
