"""Your own mask: LocalBlend's rule z_s ← z_0 + m·(z_s − z_0) with a user's region, alone or times
the word mask — the engine on known maps and on the tiny model, the command line's ``--mask``."""

from __future__ import annotations

import pytest
import torch
from core_support import CAT_PROMPT, cat_latent, tiny_model

from nti_core import ddim_invert, make_grid, negative_prompt_inversion, p2p_sample
from nti_core.attention.controller import AttentionStore
from nti_core.attention.edits import LocalBlend, region_mask
from nti_core.attention.plan import P2PSpec
from nti_core.denoiser import Site
from nti_core.tokenizer import from_hf

STEPS = 6
SIZE = 128  # a 16×16 latent: maps at 16², 8², 4² (LocalBlend reads 4²)
TIGER = "a tiger sitting next to a mirror"


@pytest.fixture(scope="module")
def setup():
    m = tiny_model()
    z0 = cat_latent(SIZE)
    traj = ddim_invert(m.denoiser, z0, m.encode_prompt(CAT_PROMPT),
                       make_grid(m.alphas_cumprod, STEPS), CAT_PROMPT)
    ctx = torch.cat([traj.embedding, m.encode_prompt(TIGER)])
    return m, traj, negative_prompt_inversion(traj), from_hf(m.tokenizer), ctx


def left_half(size: int = SIZE) -> torch.Tensor:
    mask = torch.zeros(1, size, size)
    mask[..., : size // 2] = 1.0
    return mask


def sample(setup, spec: P2PSpec, mask: torch.Tensor | None):
    m, traj, uncond, tok, ctx = setup
    ctrl = spec.build(tok, STEPS, latent_hw=(SIZE // 8, SIZE // 8), mask=mask)
    return p2p_sample(m.denoiser, traj, uncond, ctx, controller=ctrl), ctrl


def test_region_is_the_area_average_at_the_latent(setup) -> None:
    m = torch.zeros(128, 128)
    m[:, :60] = 1.0  # latent column 7 covers image columns 56…63: half of them
    r = region_mask(m, (16, 16))
    assert r.shape == (1, 1, 16, 16)
    assert torch.equal(r[0, 0, :, :7], torch.ones(16, 7))
    assert torch.allclose(r[0, 0, :, 7], torch.full((16,), 0.5))
    assert torch.equal(r[0, 0, :, 8:], torch.zeros(16, 8))
    assert torch.equal(region_mask(r[0], (16, 16)), r)  # at the latent's size: as it is
    odd = torch.ones(1, 100, 100)  # VAE Encode crops 100² to the centre 96²: a 12² latent
    odd[..., :2] = 0.0  # the two cropped columns do not count
    assert torch.equal(region_mask(odd, (12, 12)), torch.ones(1, 1, 12, 12))


def test_outside_the_mask_the_edit_is_the_reconstruction(setup) -> None:
    m, traj, uncond, _, _ = setup
    plain = p2p_sample(m.denoiser, traj, uncond, traj.embedding)
    spec = P2PSpec(CAT_PROMPT, (TIGER,))
    free, _ = sample(setup, spec, None)
    out, ctrl = sample(setup, spec, left_half())
    assert torch.allclose(out[:1], plain, atol=1e-5)
    diff = (out[1] - out[0]).abs().amax(0)  # [16, 16]
    assert float(diff[:, 8:].max()) == 0.0  # outside: exactly the reconstruction's latent
    assert float(diff[:, :8].min()) > 0.0  # inside: changed everywhere
    # blend_start 0.2: inside the mask the edit differs from the unmasked one only through the
    # steps after ⌊0.2·6⌋ = 1 (the outside is pulled back each step), but it does differ
    assert float((out[1] - free[1]).abs()[:, :, :8].max()) > 0.0
    assert ctrl.local_blend.start_step == 1 and ctrl.local_blend.words is None


def test_mask_with_blend_words_is_their_product(setup) -> None:
    spec = P2PSpec(CAT_PROMPT, (TIGER,), blend_words=("cat", "tiger"), blend_start=0.0,
                   blend_threshold=0.95)  # random maps are near-flat: a partial word mask
    out, ctrl = sample(setup, spec, left_half())
    blend = ctrl.local_blend
    words = blend.word_mask(ctrl.store, (16, 16), blend.words, 2)  # the last step's, as used
    assert 0 < int(words[1].sum()) < words[1].numel()
    both = words[1, 0] & (torch.arange(16) < 8)[None, :]
    assert torch.equal(blend.last_mask, words.float() * blend.region)
    diff = (out[1] - out[0]).abs().amax(0)
    assert float(diff[~both].max()) == 0.0  # outside either mask: the reconstruction
    assert float(diff[both].min()) > 0.0
    assert int(both.sum()) < int(words[1, 0].sum())  # the user's half cut the word mask


def test_product_on_known_maps() -> None:
    """The word mask of tests/test_attention.py's known maps (the source's word at the top
    left, the target's at the bottom right, 16×16 latent) times a soft region."""
    length = 77
    store = AttentionStore()
    maps = torch.zeros(2, 16, length)
    maps[0, 0, 2] = 1.0
    maps[1, 15, 3] = 1.0
    store.record(Site("input", 1, 0, True), (4, 4), 0, torch.tensor([0, 1]), maps)
    words = torch.zeros(2, length)
    words[0, 2] = words[1, 3] = 1.0
    region = torch.linspace(0, 1, 16).expand(1, 1, 16, 16)  # 0 at the left, 1 at the right
    z = torch.stack([torch.zeros(4, 16, 16), torch.ones(4, 16, 16)])
    out = LocalBlend(words, 0, region=region)(0, z, store)
    expected = torch.zeros(16, 16)
    expected[:8, :8] = expected[8:, 8:] = 1.0  # the words' mask (test_attention.py)
    assert torch.allclose(out[1], (expected * region[0, 0]).expand(4, 16, 16))
    alone = LocalBlend(None, 0, region=region)(0, z, store)
    assert torch.allclose(alone[1], region[0, 0].expand(4, 16, 16))
    assert torch.equal(alone[0], z[0])
    with pytest.raises(ValueError, match="needs blend words, a mask, or both"):
        LocalBlend(None, 0)


@pytest.mark.parametrize("mask, message", [
    (torch.ones(2, 128, 128), "expected one mask, got a batch of 2"),
    (torch.ones(1, 1, 128, 128), r"expected a mask \[H, W\] or \[1, H, W\], got \(1, 1, 128, 128\)"),
    (torch.full((128, 128), 2.0), r"mask values must lie in 0…1 \(1 = may change\), got 2…2"),
    (torch.full((128, 128), float("nan")), "mask values must lie in 0…1"),
    (torch.ones(128, 96), r"the mask is 96×128 \(width×height\) but the image is 16×16 latent "
                          "cells: give the mask at the image's size or the latent's"),
    (torch.ones(136, 128), "the mask is 128×136"),  # 17 latent rows' worth: another image
    (torch.ones(8, 8), "the mask is 8×8"),
])
def test_bad_masks_are_refused_before_sampling(setup, mask, message) -> None:
    tok = setup[3]
    with pytest.raises(ValueError, match=message):
        P2PSpec(CAT_PROMPT, (TIGER,)).build(tok, STEPS, latent_hw=(16, 16), mask=mask)
    with pytest.raises(ValueError, match="needs the latent's size"):
        P2PSpec(CAT_PROMPT, (TIGER,)).build(tok, STEPS, mask=left_half())


# ------------------------------------------------------------------------------ command line


def test_cli_mask(tiny_ckpt, tmp_path, monkeypatch, capsys) -> None:
    """--mask: a white left half drawn on the photo (its size) → the edit keeps the
    reconstruction's latent outside it; a mask of another size is refused in one line. The
    photo keeps its aspect ratio (3:4 at --size 64: 48×64 px, a 6×8 latent)."""
    import json

    import numpy as np
    from core_support import CAT
    from PIL import Image

    import nti_core.app.edit as cli
    from nti_core.app import main

    with Image.open(CAT) as photo:
        w, h = photo.size
    assert (w, h) == (960, 1280)  # portrait 3:4: the left half is latent columns 0…2
    pixels = np.zeros((h, w, 4), dtype=np.uint8)  # RGBA: opaque white on the left, clear right
    pixels[:, : w // 2] = 255
    pixels[:, w // 2 :, :3] = 255  # white but transparent: opacity counts
    Image.fromarray(pixels).save(tmp_path / "left.png")
    seen = []

    def edit(*args, **kwargs):
        seen.append(real_edit(*args, **kwargs))
        return seen[-1]

    real_edit = cli.edit
    monkeypatch.setattr(cli, "edit", edit)
    out = tmp_path / "masked"
    argv = ["edit", "--model", str(tiny_ckpt), "--image", str(CAT), "--source", CAT_PROMPT,
            "--target", TIGER, "--steps", "3", "--size", "64", "--no-attention-maps",
            "--method", "negative-prompt", "--out", str(out), "--mask", str(tmp_path / "left.png")]
    assert main(argv) == 0
    (latents,) = seen
    diff = (latents[1] - latents[0]).abs().amax(0)  # [8, 6]: the whole photo
    assert diff.shape == (8, 6)
    assert float(diff[:, 3:].max()) == 0.0 and float(diff[:, :3].min()) > 0.0
    report = json.loads((out / "report.json").read_text())
    assert report["mask"]["may_change"] == 0.5
    Image.fromarray(pixels[:10, :10]).save(tmp_path / "small.png")
    capsys.readouterr()
    assert main(argv[:-1] + [str(tmp_path / "small.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: the mask small.png is 10×10 pixels but the photo is {w}×{h}: draw " \
                  "the mask on the photo's own pixels"
