"""Injection schedules, the attention store and the Prompt-to-Prompt controller on random q/k/v."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from nti_core import tokenizer as tk
from nti_core.alignment import refine_alignment, replace_mapper
from nti_core.attention.controller import AttentionStore, Identity, probs_times_v
from nti_core.attention.edits import LocalBlend, P2PController, blend_map_size
from nti_core.attention.plan import P2PSpec
from nti_core.attention.schedules import cross_injection_alpha, injection_range
from nti_core.denoiser import Rows, Site, attention_probs, sdpa

HEADS, DIM, L = 2, 4, 77
CROSS = Site("input", 7, 0, True)
SELF = Site("input", 7, 0, False)
CAT = "a cat sitting next to a mirror"


def rand(b: int, n: int, seed: int) -> Tensor:
    return torch.randn(b, n, HEADS * DIM, generator=torch.Generator().manual_seed(seed))


def call(c: object, q: Tensor, k: Tensor, v: Tensor, site: Site, hw: tuple[int, int], step: int,
         rows: Rows) -> Tensor:
    return c.attend(q, k, v, heads=HEADS, site=site, hw=hw, step=step, rows=rows)  # type: ignore


def full_alpha(n_steps: int, k: int = 1) -> Tensor:
    return torch.ones(n_steps + 1, k, L)


# ---- schedules ------------------------------------------------------------------------------
def test_cross_alpha_fraction_and_pair() -> None:
    a = cross_injection_alpha(50, 0.8, ["x"])
    assert a.shape == (51, 1, 77)
    assert bool(a[:40].eq(1).all()) and bool(a[40:].eq(0).all())  # ⌊0.8·51⌋ = 40
    b = cross_injection_alpha(50, (0.2, 0.6), ["x", "y"])
    on = b[:, 0, 0].nonzero().squeeze(1)
    assert on.tolist() == list(range(10, 30))  # ⌊0.2·51⌋ = 10, ⌊0.6·51⌋ = 30
    with pytest.raises(ValueError, match="0 ≤ start ≤ end ≤ 1"):
        cross_injection_alpha(50, (0.7, 0.2), ["x"])


def test_cross_alpha_per_word(tok: tk.TokenizerSpec) -> None:
    target = "a silver cat sitting next to a mirror"
    a = cross_injection_alpha(50, {"default_": 0.8, "silver": (0.0, 0.2)}, [target], tok)
    assert a[:10, 0, 2].eq(1).all() and a[10:, 0, 2].eq(0).all()  # silver at position 2
    assert a[:40, 0, 3].eq(1).all() and a[40:, 0, 3].eq(0).all()
    with pytest.raises(ValueError, match="'tiger' is not a word"):
        cross_injection_alpha(50, {"tiger": 0.5}, [target], tok)


def test_self_range() -> None:
    assert injection_range(50, 0.5) == (0, 25)
    assert injection_range(50, (0.2, 0.6)) == (10, 30)
    with pytest.raises(ValueError):
        injection_range(50, 1.5)


# ---- store and identity ---------------------------------------------------------------------
def test_identity_and_store_equal_sdpa() -> None:
    q, k, v = rand(4, 16, 0), rand(4, L, 1), rand(4, L, 2)
    rows = Rows.cfg(2)
    ref = sdpa(q, k, v, HEADS)
    assert torch.equal(call(Identity(), q, k, v, CROSS, (4, 4), 0, rows), ref)
    store = AttentionStore()
    out = call(store, q, k, v, CROSS, (4, 4), 0, rows)
    assert torch.allclose(out, ref, atol=1e-6)
    controller = P2PController(torch.zeros(51, 1, L), (0, 0))
    assert torch.allclose(call(controller, q, k, v, CROSS, (4, 4), 3, rows), ref, atol=1e-6)


def test_store_averages_conditional_maps_only() -> None:
    store = AttentionStore(record_steps={1}, record_hw={(4, 4)})
    rows = Rows.make([False, True], [0, 0])
    maps = []
    for step in range(3):
        q, k, v = rand(2, 16, 10 + step), rand(2, L, 20 + step), rand(2, L, 30)
        call(store, q, k, v, CROSS, (4, 4), step, rows)
        maps.append(attention_probs(q, k, HEADS)[1].mean(0))
    call(store, rand(2, 4096, 0), rand(2, L, 1), rand(2, L, 2), CROSS, (64, 64), 0, rows)
    assert store.resolutions() == [(4, 4)]  # 64×64 > 32×32 is not stored
    assert torch.allclose(store.sums((4, 4)), sum(maps).reshape(1, 4, 4, L), atol=1e-6)
    assert torch.allclose(store.average((4, 4)), (sum(maps) / 3).reshape(1, 4, 4, L), atol=1e-6)
    assert torch.allclose(store.step_maps(1, (4, 4)), maps[1].reshape(1, 4, 4, L))
    with pytest.raises(KeyError, match="recorded steps: \\[1\\]"):
        store.step_maps(0, (4, 4))


def test_store_step_maps_keep_the_graph() -> None:
    store = AttentionStore(record_steps=True, detach=False)
    q = rand(1, 16, 0).requires_grad_()
    call(store, q, rand(1, L, 1), rand(1, L, 2), CROSS, (4, 4), 0, Rows.cond(1))
    store.step_maps(0, (4, 4))[..., 1].sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


# ---- P2P controller -------------------------------------------------------------------------
def test_identical_prompts_full_injection_reproduce_source() -> None:
    c = P2PController(full_alpha(10), (0, 10), replace=torch.eye(L)[None])
    rows = Rows.cond(2)
    q, k, v = rand(2, 16, 0), rand(2, L, 1), rand(1, L, 2).expand(2, -1, -1)
    out = call(c, q, k, v, CROSS, (4, 4), 3, rows)
    assert torch.equal(out[1], out[0])
    qs, vs = rand(2, 16, 3), rand(1, 16, 4).expand(2, -1, -1)
    out = call(c, qs, qs, vs, SELF, (4, 4), 3, rows)
    assert torch.equal(out[1], out[0])


def test_replace_injects_mapped_maps_only_while_on(tok: tk.TokenizerSpec) -> None:
    m = replace_mapper(tok, CAT, "a ragamuffin sitting next to a mirror")
    alpha = cross_injection_alpha(10, 0.5, ["t"])  # steps 0…4 (⌊0.5·11⌋ = 5)
    c = P2PController(alpha, replace=m[None])
    q, k, v = rand(4, 16, 0), rand(4, L, 1), rand(4, L, 2)
    rows = Rows.cfg(2)
    p = attention_probs(q, k, HEADS)
    for step, injected in ((0, True), (4, True), (5, False), (9, False)):
        out = call(c, q, k, v, CROSS, (4, 4), step, rows)
        p_tgt = torch.einsum("hpw,wn->hpn", p[2], m) if injected else p[3]
        assert torch.allclose(out[3], probs_times_v(p_tgt[None], v[3:4])[0], atol=1e-6)
        assert torch.allclose(out[:3], sdpa(q[:3], k[:3], v[:3], HEADS), atol=1e-6)


def test_refine_keeps_new_tokens_own_attention(tok: tk.TokenizerSpec) -> None:
    mapper, a = refine_alignment(tok, CAT, "a silver cat sitting next to a mirror")
    c = P2PController(full_alpha(10), refine=(mapper[None], a[None]),
                      store=AttentionStore(), store_edited=True)
    q, k, v = rand(2, 16, 0), rand(2, L, 1), rand(2, L, 2)
    call(c, q, k, v, CROSS, (4, 4), 0, Rows.cond(2))
    p = attention_probs(q, k, HEADS).mean(1)
    edited = c.store.sums((4, 4), 1).reshape(16, L)
    assert torch.allclose(edited[:, 2], p[1, :, 2])  # "silver": the target's own map
    assert torch.allclose(edited[:, 3], p[0, :, 2])  # "cat" of the target ← "cat" of the source
    assert torch.allclose(edited[:, 9], p[0, :, 8])  # EOS ← EOS


def test_reweight_scales_only_chosen_columns(tok: tk.TokenizerSpec) -> None:
    c = P2PSpec(CAT, (CAT,), mode="reweight", reweight="cat:3", store_edited=True).build(tok, 10, keep_step_maps=True)
    q, k, v = rand(2, 16, 0), rand(2, L, 1), rand(2, L, 2)
    call(c, q, k, v, CROSS, (4, 4), 0, Rows.cond(2))
    p = attention_probs(q, k, HEADS).mean(1)
    edited = c.store.sums((4, 4), 1).reshape(16, L)
    scale = torch.ones(L)
    scale[2] = 3.0
    assert torch.allclose(edited, p[0] * scale, atol=1e-6)  # base = the source map itself
    call(c, q, k, v, CROSS, (4, 4), 9, Rows.cond(2))  # injection over (⌊0.8·11⌋ = 8): no reweight
    assert torch.allclose(c.store.sums((4, 4), 1).reshape(16, L) - edited, p[1], atol=1e-6)


def test_reweight_composes_with_replace(tok: tk.TokenizerSpec) -> None:
    target = "a dog sitting next to a mirror"
    c = P2PSpec(CAT, (target,), reweight={"dog": 0.5}, store_edited=True).build(tok, 10, keep_step_maps=True)
    q, k, v = rand(2, 16, 0), rand(2, L, 1), rand(2, L, 2)
    call(c, q, k, v, CROSS, (4, 4), 0, Rows.cond(2))
    p = attention_probs(q, k, HEADS).mean(1)
    expected = p[0].clone()
    expected[:, 2] *= 0.5
    assert torch.allclose(c.store.sums((4, 4), 1).reshape(16, L), expected, atol=1e-6)
    assert torch.allclose(c.store.sums((4, 4), 0).reshape(16, L), p[0], atol=1e-6)


def test_store_records_edited_maps_by_default_as_the_reference(tok: tk.TokenizerSpec) -> None:
    # the reference stores a view that its in-place edit then overwrites: stored target maps are
    # the edited ones (here cat → dog maps one token to one, so the edit is the source's maps)
    q, k, v = rand(2, 16, 0), rand(2, L, 1), rand(2, L, 2)
    p = attention_probs(q, k, HEADS).mean(1)
    c = P2PSpec(CAT, ("a dog sitting next to a mirror",)).build(tok, 10, keep_step_maps=True)
    call(c, q, k, v, CROSS, (4, 4), 0, Rows.cond(2))
    assert torch.allclose(c.store.sums((4, 4), 1).reshape(16, L), p[0], atol=1e-6)
    before = P2PSpec(CAT, ("a dog sitting next to a mirror",), store_edited=False).build(tok, 10, keep_step_maps=True)
    call(before, q, k, v, CROSS, (4, 4), 0, Rows.cond(2))
    assert torch.allclose(before.store.sums((4, 4), 1).reshape(16, L), p[1], atol=1e-6)
    assert not torch.allclose(p[0], p[1], atol=1e-3)


def test_self_injection_range_and_size() -> None:
    c = P2PController(torch.zeros(11, 1, L), (2, 5))
    rows = Rows.cfg(2)
    for hw in ((4, 4), (33, 32)):  # 33·32 = 1056 > 32² is never injected
        n = hw[0] * hw[1]
        q, k, v = rand(4, n, 0), rand(4, n, 1), rand(4, n, 2)
        p_src = attention_probs(q[2:3], k[2:3], HEADS)
        for step in range(7):
            out = call(c, q, k, v, SELF, hw, step, rows)
            injected = 2 <= step < 5 and n <= 1024
            tgt = probs_times_v(p_src, v[3:4])[0] if injected else sdpa(q, k, v, HEADS)[3]
            assert torch.allclose(out[3], tgt, atol=1e-6), (hw, step)
            assert torch.allclose(out[1], sdpa(q, k, v, HEADS)[1], atol=1e-6)  # uncond untouched


@pytest.mark.parametrize("limit", [32, 16])
def test_self_injection_limit(tok: tk.TokenizerSpec, limit: int) -> None:
    """32: maps up to 32×32 get the source's self-attention (null-text notebook); 16: up to
    16×16 only (P2P notebook, diffusers' Prompt2PromptPipeline)."""
    c = P2PSpec(CAT, (CAT,), mode="reweight", self_steps=1.0, self_limit=limit).build(tok, 10)
    rows = Rows.cfg(2)
    for hw in ((16, 16), (32, 32), (24, 16)):
        n = hw[0] * hw[1]
        q, k, v = rand(4, n, 0), rand(4, n, 1), rand(4, n, 2)
        out = call(c, q, k, v, SELF, hw, 3, rows)
        injected = n <= limit * limit
        p_src = attention_probs(q[2:3], k[2:3], HEADS)
        tgt = probs_times_v(p_src, v[3:4])[0] if injected else sdpa(q, k, v, HEADS)[3]
        assert torch.allclose(out[3], tgt, atol=1e-6), (limit, hw)
    assert c.store.max_pixels == 0  # no LocalBlend, no map view: nothing is stored
    with pytest.raises(ValueError, match="self-attention limit must be one of"):
        P2PSpec(CAT, (CAT,), mode="reweight", self_limit=64).build(tok, 10)


def test_p2plus_unconditional_self_injection() -> None:
    q, k, v = rand(4, 16, 0), rand(4, 16, 1), rand(4, 16, 2)
    rows = Rows.cfg(2)
    off = P2PController(torch.zeros(11, 1, L), (0, 0))
    assert torch.allclose(call(off, q, k, v, SELF, (4, 4), 0, rows), sdpa(q, k, v, HEADS),
                          atol=1e-6)
    on = P2PController(torch.zeros(11, 1, L), (0, 0), uncond_self_range=(0, 3))
    p_u = attention_probs(q[0:1], k[0:1], HEADS)
    out = call(on, q, k, v, SELF, (4, 4), 2, rows)
    assert torch.allclose(out[1], probs_times_v(p_u, v[1:2])[0], atol=1e-6)
    assert torch.allclose(out[3], sdpa(q, k, v, HEADS)[3], atol=1e-6)  # cond left alone
    out = call(on, q, k, v, SELF, (4, 4), 3, rows)
    assert torch.allclose(out, sdpa(q, k, v, HEADS), atol=1e-6)


def test_one_call_equals_two_calls(tok: tk.TokenizerSpec) -> None:
    spec = P2PSpec(CAT, ("a dog sitting next to a mirror",), reweight="dog:2",
                   uncond_self=0.5, blend_words=("cat", "dog"))
    one, two = spec.build(tok, 10), spec.build(tok, 10)
    rows = Rows.cfg(2)
    u, c = Rows.make([False, False], [0, 1]), Rows.make([True, True], [0, 1])
    for site, nk, step in ((CROSS, L, 1), (SELF, 16, 1), (CROSS, L, 9), (SELF, 16, 9)):
        q, k, v = rand(4, 16, step), rand(4, nk, 2), rand(4, nk, 3)
        a = call(one, q, k, v, site, (4, 4), step, rows)
        b = torch.cat([call(two, q[:2], k[:2], v[:2], site, (4, 4), step, u),
                       call(two, q[2:], k[2:], v[2:], site, (4, 4), step, c)])
        assert torch.equal(a, b), (site, step)
        perm = torch.tensor([3, 0, 2, 1])  # rows in any order: labels decide, not positions
        shuffled = Rows(rows.branch[perm], rows.slot[perm])
        assert torch.equal(call(two, q[perm], k[perm], v[perm], site, (4, 4), step, shuffled),
                           a[perm])
    assert torch.allclose(one.store.sums((4, 4), 1), two.store.sums((4, 4), 1) / 2, atol=1e-7)


def test_missing_source_row_is_an_error() -> None:
    c = P2PController(full_alpha(10), (0, 10))
    with pytest.raises(RuntimeError, match="source row"):
        call(c, rand(1, 16, 0), rand(1, L, 1), rand(1, L, 2), CROSS, (4, 4), 0,
             Rows.make([True], [1]))


# ---- local blend ----------------------------------------------------------------------------
def test_blend_map_size() -> None:
    assert blend_map_size((64, 64)) == (16, 16)
    assert blend_map_size((96, 64)) == (24, 16)
    assert blend_map_size((62, 60)) == (16, 15)


def _blend_store() -> AttentionStore:
    store = AttentionStore()
    maps = torch.zeros(2, 16, L)
    maps[0, 0, 2] = 1.0  # source word (token 2) at pixel (0, 0)
    maps[1, 15, 3] = 1.0  # target word (token 3) at pixel (3, 3)
    maps[0, 0, 5] = 1.0  # subtract word (token 5), source only, pixel (0, 0)
    store.record(CROSS, (4, 4), 0, torch.tensor([0, 1]), maps)
    store.record(Site("output", 3, 0, True), (4, 4), 0, torch.tensor([0, 1]), maps)
    return store


def test_local_blend_mask_from_known_maps() -> None:
    words = torch.zeros(2, L)
    words[0, 2] = words[1, 3] = 1.0
    blend = LocalBlend(words, start_step=2)
    z = torch.stack([torch.zeros(4, 16, 16), torch.ones(4, 16, 16)])
    assert torch.equal(blend(1, z, _blend_store()), z)  # before the start step
    out = blend(2, z, _blend_store())
    expected = torch.zeros(16, 16)
    expected[:8, :8] = 1.0  # max-pool 3×3 of pixel (0, 0) → (0…1, 0…1), ×4 upsampled
    expected[8:, 8:] = 1.0  # the target's own word, (2…3, 2…3)
    assert torch.equal(out[1], expected.expand(4, 16, 16))
    assert torch.equal(out[0], z[0])
    sub = torch.zeros(2, L)
    sub[0, 5] = 1.0
    out = LocalBlend(words, 0, subtract=sub)(2, z, _blend_store())
    expected[:4, :4] = 0.0  # subtract mask, no pooling: pixel (0, 0) only
    assert torch.equal(out[1], expected.expand(4, 16, 16))


def test_local_blend_through_the_controller(tok: tk.TokenizerSpec) -> None:
    spec = P2PSpec(CAT, ("a dog sitting next to a mirror",), blend_words=("cat", "dog"))
    c = spec.build(tok, 10)
    assert c.local_blend is not None and c.local_blend.start_step == 2
    assert c.local_blend.words[:, :4].tolist() == [[0, 0, 1, 0], [0, 0, 1, 0]]
    q, k, v = torch.zeros(4, 64, HEADS * DIM), torch.zeros(4, L, HEADS * DIM), rand(4, L, 2)
    q.view(4, 8, 8, -1)[:, :, :4] = 2.0  # the left half of the 8×8 map looks at token 2 …
    k[:, 2] = 2.0  # … "cat" in the source, "dog" in the target
    call(c, q, k, v, CROSS, (8, 8), 2, Rows.cfg(2))
    z = torch.randn(2, 4, 32, 32)
    out = c.after_step(2, z)
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[:, :20] = True  # columns 0…3, dilated to 0…4 by the 3×3 max-pool, ×4 upsampled
    assert torch.equal(out[1][:, ~mask], z[0][:, ~mask])  # outside the mask: the source row
    assert torch.allclose(out[1][:, mask], z[1][:, mask], atol=1e-6)
    assert torch.equal(c.after_step(1, z), z)  # before ⌊0.2·10⌋ = 2
    with pytest.raises(ValueError, match=r"quarter of the latent side \(\(4, 4\)\).*\[\(8, 8\)\]"):
        c.after_step(2, torch.randn(2, 4, 16, 16))


def test_unknown_words_are_errors(tok: tk.TokenizerSpec) -> None:
    dog = ("a dog sitting next to a mirror",)
    with pytest.raises(ValueError, match="'tiger' is not a word"):
        P2PSpec(CAT, dog, reweight="tiger:2").build(tok, 10)
    with pytest.raises(ValueError, match="blend word 'tiger' is in none of the prompts"):
        P2PSpec(CAT, dog, blend_words=("tiger",)).build(tok, 10)
    with pytest.raises(ValueError, match="subtract word 'tiger'"):
        P2PSpec(CAT, dog, blend_words=("dog",), subtract_words=("tiger",)).build(tok, 10)
    with pytest.raises(ValueError, match="use refine"):
        P2PSpec(CAT, ("a big dog sitting next to a mirror",)).build(tok, 10)
    with pytest.raises(ValueError, match="reweight alone keeps the source prompt"):
        P2PSpec(CAT, dog, mode="reweight").build(tok, 10)


def test_store_materialises_only_what_is_read(tok: tk.TokenizerSpec) -> None:
    """No LocalBlend and no map view: past the cross-injection steps every cross-attention layer
    runs the fused kernel and nothing is kept; LocalBlend with the latent size: its quarter-side
    maps only; the map view: every size up to 32²."""
    dog = ("a dog sitting next to a mirror",)
    rows = Rows.cfg(2)
    q, k, v = rand(4, 16, 0), rand(4, L, 1), rand(4, L, 2)
    bare = P2PSpec(CAT, dog).build(tok, 10)
    late = 9  # past ⌊0.8·11⌋: no cross edit
    assert torch.equal(call(bare, q, k, v, CROSS, (4, 4), late, rows), sdpa(q, k, v, HEADS))
    call(bare, q, k, v, CROSS, (4, 4), 0, rows)
    assert bare.store.resolutions() == []
    blend = P2PSpec(CAT, dog, blend_words=("cat", "dog")).build(tok, 10, latent_hw=(16, 16))
    view = P2PSpec(CAT, dog, blend_words=("cat", "dog")).build(tok, 10, keep_step_maps=True)
    for index, hw in enumerate(((8, 8), (4, 4), (2, 2))):
        n = hw[0] * hw[1]
        q, k, v = rand(4, n, 0), rand(4, L, 1), rand(4, L, 2)
        for c in (blend, view):
            call(c, q, k, v, Site("input", index, 0, True), hw, late, rows)
    assert blend.store.resolutions() == [(4, 4)]  # a quarter of 16×16
    assert view.store.resolutions() == [(2, 2), (4, 4), (8, 8)]
    assert torch.equal(blend.store.sums((4, 4), 1), view.store.sums((4, 4), 1))


@pytest.mark.parametrize("limit", [32, 16])
def test_p2plus_reaches_32x32_whatever_the_self_limit(tok: tk.TokenizerSpec, limit: int) -> None:
    """StyleDiffusion's official code injects the unconditional self-attention into maps up to
    32×32 (its replace_self_attention), also when P2P's own injection stops at 16×16."""
    c = P2PSpec(CAT, (CAT,), mode="reweight", self_steps=0.0, self_limit=limit,
                uncond_self=1.0).build(tok, 10)
    rows = Rows.cfg(2)
    for hw in ((16, 16), (32, 32), (64, 32)):
        n = hw[0] * hw[1]
        q, k, v = rand(4, n, 0), rand(4, n, 1), rand(4, n, 2)
        out = call(c, q, k, v, SELF, hw, 3, rows)
        injected = n <= 32 * 32
        p_src = attention_probs(q[0:1], k[0:1], HEADS)
        tgt = probs_times_v(p_src, v[1:2])[0] if injected else sdpa(q, k, v, HEADS)[1]
        assert torch.allclose(out[1], tgt, atol=1e-6), (limit, hw)
        assert torch.allclose(out[3], sdpa(q, k, v, HEADS)[3], atol=1e-6)  # cond: self_steps 0
