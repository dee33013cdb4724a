"""The attention-map view: per-step layer means kept by the store, averaged over steps and sizes,
one labelled map per word, the LocalBlend mask of the edit, and the inversion's own maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from core_support import PHOTOS, demo_model, photo_image

from nti_core import ddim_invert, make_grid, negative_prompt_inversion, p2p_sample
from nti_core.alignment import tokenize
from nti_core.attention.maps import (
    AttentionMaps,
    average_maps,
    size_of,
    step_range,
    word_maps,
)
from nti_core.attention.plan import P2PSpec
from nti_core.images import heatmap_grid
from nti_core.tokenizer import from_hf

SOURCE = PHOTOS["gnochi_mirror"]
TARGET = "a negative of a cat sitting next to a mirror"
STEPS = 6


@pytest.fixture(scope="module")
def edit_run():
    m = demo_model()
    x = photo_image("gnochi_mirror", 128)
    c = m.encode_prompt(SOURCE)
    traj = ddim_invert(m.denoiser, m.encode_image(x), c, make_grid(m.alphas_cumprod, STEPS), SOURCE,
                       record_maps=True)
    tok = from_hf(m.tokenizer)
    ctrl = P2PSpec(SOURCE, (TARGET,), blend_words=("cat",)).build(tok, STEPS, keep_step_maps=True)
    z = p2p_sample(m.denoiser, traj, negative_prompt_inversion(traj),
                   torch.cat([c, m.encode_prompt(TARGET)]), controller=ctrl)
    am = AttentionMaps.from_store(ctrl.store, (SOURCE, TARGET), STEPS, (16, 16),
                                  ctrl.local_blend.last_mask)
    return m, x, traj, ctrl, z, am, tok


def test_step_means_average_to_the_stores_own_average(edit_run):
    _, _, _, ctrl, _, am, _ = edit_run
    assert am.sizes == [(2, 2), (4, 4), (8, 8), (16, 16)]  # every size ≤ 32², latent 16
    for slot in (0, 1):
        for hw in am.sizes:
            want = ctrl.store.average(hw, slot).mean(0)  # per layer over calls, then layers
            got = average_maps(am, slot, [hw], range(STEPS))
            assert torch.allclose(got, want, atol=1e-6), (slot, hw)
    # a step range averages only those steps
    late = average_maps(am, 1, [(4, 4)], range(3, 6))
    want = torch.stack([ctrl.store.step_mean(i, (4, 4), 1) for i in range(3, 6)]).mean(0)
    assert torch.allclose(late, want, atol=1e-7)
    # sizes together: each upsampled to the largest, then averaged
    both = average_maps(am, 0, [(4, 4), (8, 8)], range(STEPS))
    assert both.shape == (8, 8, 77)


def test_one_labelled_map_per_word(edit_run):
    m, x, _, _, _, am, tok = edit_run
    avg = average_maps(am, 1, size_of("1/4", am.latent_hw), range(STEPS))
    maps, words = word_maps(avg, tokenize(tok, TARGET))
    assert words == TARGET.split() and maps.shape == (len(words), 4, 4)
    t = tokenize(tok, TARGET)
    a, b = t.spans[2]  # "negative"
    assert torch.allclose(maps[2], avg[..., a:b].sum(-1))
    grid = heatmap_grid(x, maps, words, "title", tile=64, columns=4)
    # 9 words in rows of 4: 3 rows of 64 px tiles with labels, a title line above
    assert grid.dtype == np.uint8 and grid.shape[2] == 3
    assert grid.shape[1] == 4 * (64 + 6) + 6 and grid.shape[0] > 3 * (64 + 6)
    with pytest.raises(ValueError, match="2 maps but 3 labels"):
        heatmap_grid(x, maps[:2], words[:3])


def test_mask_is_localblends(edit_run):
    _, _, _, ctrl, z, am, _ = edit_run
    assert torch.equal(am.mask, ctrl.local_blend.last_mask.float())
    inside = am.mask[1:2].bool().expand(1, 4, -1, -1)
    # outside the mask the edit equals the reconstruction (LocalBlend's promise)
    assert torch.equal(z[1:2][~inside], z[:1][~inside])


def test_inversion_maps_view(edit_run):
    _, _, traj, _, _, _, _ = edit_run
    am = AttentionMaps.from_trajectory(traj)
    assert am.sizes == [(4, 4)] and am.prompts == (SOURCE,) and am.mask is None
    avg = average_maps(am, 0, None, range(STEPS))
    assert torch.allclose(avg.reshape(16, 77), traj.maps.mean((0, 1, 2)), atol=1e-6)
    # the noisiest step's view is the map of z*_{N−1}
    first = average_maps(am, 0, None, range(0, 1))
    assert torch.allclose(first.reshape(16, 77), traj.maps[STEPS - 1].mean((0, 1)), atol=1e-6)


def test_bad_choices_say_what_is_expected(edit_run):
    _, _, traj, _, _, am, _ = edit_run
    with pytest.raises(ValueError, match="row 2 is not in this run"):
        average_maps(am, 2, None, range(STEPS))
    with pytest.raises(ValueError, match=r"no maps of size \(32, 32\)"):
        average_maps(am, 0, [(32, 32)], range(STEPS))
    with pytest.raises(ValueError, match="map size must be one of"):
        size_of("1/3", (16, 16))
    with pytest.raises(ValueError, match=r"step_start \(0.8\) is after step_end"):
        step_range(STEPS, 0.8, 0.2)
    assert step_range(STEPS, 1.0, 1.0) == range(5, 6)  # at least one step
    plain = ddim_invert(demo_model().denoiser, traj.z_0, traj.embedding, traj.grid, SOURCE)
    with pytest.raises(ValueError, match="record_maps"):
        AttentionMaps.from_trajectory(plain)
