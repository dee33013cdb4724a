"""SD 2.x and SDXL (ε and v) through the ComfyUI host: family detection from the MODEL and the
refusal of other families, then the engine's guarantees per family on small models built from
ComfyUI's own model classes (``comfy.supported_models`` configs, ``model_base.BaseModel`` /
``model_base.SDXL``, ``ModelPatcher``) with seeded random weights — the real checkpoint loading
of these families is covered by tests/test_comfy_checkpoints.py and the HTTP tests.

Needs $COMFYUI_PATH (skipped, saying so, without it).
"""

from __future__ import annotations

from typing import Any

import comfy_support
import pytest
import torch
from core_support import cat_latent
from torch import Tensor

from nti_core.attention.plan import P2PSpec
from nti_core.denoiser import Rows
from nti_core.family import SD1, SD2, SDXL, TOKENS, Family
from nti_core.inversion import ddim_invert
from nti_core.null_text import NullTextOptions, null_text_optimize, plain_null
from nti_core.sampling import ddim_reconstruct, p2p_sample
from nti_core.schedule import make_grid

SIDE = 64  # photo side: 8×8 latents; the SDXL-shaped UNet has attention at 4×4 and 2×2
STEPS = 10
PROMPT = "a cat sitting next to a mirror"

# (family, prediction, zero-terminal-SNR)
KINDS = {
    "sd1-eps": (SD1, "eps", False),  # beside the others: the same checks, the same numbers
    "sd2-v": (SD2, "v", False),
    "sdxl-eps": (SDXL, "eps", False),
    "sdxl-v": (SDXL, "v", False),
}


def unet_config(family: Family) -> dict[str, Any]:
    """A small UNet of the family's shape: 64 channels, three levels; SD: attention at full and
    quarter resolution, SDXL: none at full resolution, depth 1 at half and 2 at quarter."""
    depth = [0, 1, 2] if family is SDXL else [1, 0, 1]
    return {
        "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 64,
        "num_res_blocks": [1, 1, 1], "channel_mult": [1, 1, 2],
        "transformer_depth": depth,
        "transformer_depth_output": [d for d in reversed(depth) for _ in range(2)],
        "transformer_depth_middle": 1, "context_dim": family.context_dim,
        "use_linear_in_transformer": family is not SD1, "adm_in_channels":
            2816 if family is SDXL else None, "num_classes": "sequential" if family is SDXL
        else None, "use_spatial_transformer": True, "legacy": False,
        "use_temporal_attention": False, "use_checkpoint": False,
    }


def comfy_model(family: Family, prediction: str = "eps", zsnr: bool = False, seed: int = 0,
                model_class: str | None = None, dtype: torch.dtype | None = None,
                inference: bool = False) -> Any:
    """A ModelPatcher over a small model of ``family`` built from ComfyUI's classes.

    ``dtype``: weights *and compute* in that dtype (no manual cast: what ComfyUI does on a GPU
    that runs it; on the CPU it would cast half weights to fp32). ``inference``: built under
    ``torch.inference_mode()``, as ComfyUI's loaders build a MODEL inside a node."""
    import comfy.model_base as mb
    import comfy.model_patcher
    import comfy.supported_models as sm

    config_class = {"sd1": sm.SD15, "sd2": sm.SD20, "sdxl": sm.SDXL}[family.key]
    config = config_class(unet_config(family))
    if zsnr:
        config.sampling_settings["zsnr"] = True
    if dtype is not None:
        config.set_inference_dtype(dtype, None)
    model_type = mb.ModelType.V_PREDICTION if prediction == "v" else mb.ModelType.EPS
    cls = getattr(mb, model_class) if model_class else (mb.SDXL if family is SDXL else mb.BaseModel)
    with torch.inference_mode(inference):
        model = cls(config, model_type=model_type)
        gen = torch.Generator().manual_seed(seed)
        sd = model.diffusion_model.state_dict()
        values = {k: comfy_support._init_tensor(k, v.shape, gen) for k, v in sd.items()}
        values["out.2.weight"] = values["out.2.weight"] * 0.1  # ε of sane size from random weights
        model.diffusion_model.load_state_dict(values)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def embedding(family: Family, seed: int, loud: int | None = None) -> Tensor:
    """A prompt embedding of the family's layout (random token states, random pooled vector);
    token ``loud`` ×1.5, so that its attention varies more across the image, as a word's would."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(1, TOKENS, family.context_dim, generator=g)
    if loud is not None:
        tokens[:, loud] *= 1.5
    pooled = torch.randn(1, family.pooled_dim, generator=g) if family.pooled_dim else None
    return family.pack(tokens, pooled)


@pytest.fixture(scope="module")
def models(comfy_root) -> dict[str, Any]:
    return {name: comfy_model(f, p, z, seed=i) for i, (name, (f, p, z)) in enumerate(KINDS.items())}


@pytest.fixture(scope="module")
def z0() -> Tensor:
    return cat_latent(SIDE)


# ============================================================== detection


@pytest.mark.parametrize("family,prediction,zsnr", [
    (SD1, "eps", False), (SD1, "v", False), (SD2, "eps", False), (SD2, "v", False),
    (SDXL, "eps", False), (SDXL, "v", False), (SDXL, "v", True),
])
def test_family_is_read_off_the_model(comfy_root, family, prediction, zsnr) -> None:
    from nti_core.hosts.comfy import detect

    found = detect(comfy_model(family, prediction, zsnr))
    assert (found.key, found.prediction, found.zero_snr) == (family.key, prediction, zsnr)
    assert found.context_dim == family.context_dim and found.pooled_dim == family.pooled_dim


def test_model_sampling_node_patch_is_honoured(comfy_root) -> None:
    """ComfyUI's ModelSamplingDiscrete node (v_prediction, zsnr) patches model_sampling: the
    family follows the patch, and ᾱ comes from the patched σ (ᾱ_999 ≈ 4.9e-8 under zsnr)."""
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    from nti_core.hosts.comfy import ComfyDenoiser

    model = comfy_model(SDXL)
    (patched,) = ModelSamplingDiscrete().patch(model, "v_prediction", True)
    den = ComfyDenoiser(patched)
    assert den.family.prediction == "v" and den.family.zero_snr
    assert float(den.alphas_cumprod[-1]) < 1e-7
    assert float(ComfyDenoiser(model).alphas_cumprod[-1]) > 1e-3


@pytest.mark.parametrize("sampling", ["x0", "lcm"])
def test_other_predictions_and_schedules_are_refused(comfy_root, sampling) -> None:
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    from nti_core.hosts.comfy import detect

    (patched,) = ModelSamplingDiscrete().patch(comfy_model(SD1), sampling, False)
    with pytest.raises(ValueError, match="this pack supports SD 1.x, SD 2.x and SDXL"):
        detect(patched)


def test_refiner_and_other_model_classes_are_refused(comfy_root) -> None:
    from nti_core.hosts.comfy import detect

    with pytest.raises(ValueError, match="SDXLRefiner.*this pack supports SD 1.x, SD 2.x and SDXL"):
        detect(comfy_model(SD2, model_class="SDXLRefiner"))


def test_flux_is_refused_with_what_is_supported(comfy_root) -> None:
    """A (tiny) Flux built from ComfyUI's own classes: not an SD-style UNet."""
    import comfy.model_base as mb
    import comfy.model_patcher
    import comfy.supported_models as sm

    config = sm.Flux({"image_model": "flux", "in_channels": 16, "out_channels": 16,
                      "vec_in_dim": 32, "context_in_dim": 32, "hidden_size": 64,
                      "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
                      "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2,
                      "qkv_bias": True, "guidance_embed": False})
    cpu = torch.device("cpu")
    flux = comfy.model_patcher.ModelPatcher(mb.Flux(config), load_device=cpu, offload_device=cpu)
    from nti_core.hosts.comfy import detect

    with pytest.raises(ValueError, match="Flux.*not an SD-style UNet.*supports SD 1.x, SD 2.x"):
        detect(flux)


def test_embedding_of_another_family_is_refused(models) -> None:
    from nti_core.hosts.comfy import ComfyDenoiser

    den = ComfyDenoiser(models["sdxl-eps"])
    z = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match=r"SDXL model needs \[B, 78, 2048\]"):
        den.eps(z, 500, embedding(SD1, 0))


# ============================================================== the engine per family


def invert(model: Any, z0: Tensor, seed: int = 1):
    from nti_core.hosts.comfy import ComfyDenoiser

    den = ComfyDenoiser(model)
    cond = embedding(den.family, seed)
    grid = make_grid(den.alphas_cumprod, STEPS)
    return den, ddim_invert(den, z0, cond, grid, PROMPT)


def mse(a: Tensor, b: Tensor) -> float:
    return float(((a - b) ** 2).mean())


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_at_guidance_one(models, z0, kind) -> None:
    den, traj = invert(models[kind], z0)
    err = mse(ddim_reconstruct(den, traj), z0)
    print(f"{kind}: DDIM round trip latent MSE {err:.2e}")
    assert err < 0.05 * float(z0.var())  # 10 steps of a random UNet: DDIM's own step error


@pytest.mark.parametrize("kind", KINDS)
def test_null_text_far_below_ddim_at_guidance_7_5(models, z0, kind) -> None:
    """And for SDXL: the pooled part of ∅ is optimised too, the padding stays exactly zero."""
    from nti_core.hosts.comfy import ComfyDenoiser, autograd

    den, traj = invert(models[kind], z0)
    null = embedding(den.family, 2)
    plain = p2p_sample(den, traj, plain_null(traj, null), traj.embedding)
    with autograd():
        grad_den = ComfyDenoiser(models[kind], for_grad=True)
        uncond = null_text_optimize(grad_den, traj, null, NullTextOptions(inner_steps=10))
    fitted = p2p_sample(den, traj, uncond, traj.embedding)
    ddim, nti = mse(plain, z0), mse(fitted, z0)
    print(f"{kind}: latent MSE at guidance 7.5: DDIM {ddim:.2e}, null-text {nti:.2e}")
    assert nti < 0.1 * ddim
    if den.family.pooled_dim:
        moved = (uncond.embeddings[:, TOKENS, :1280] - null[:, TOKENS, :1280]).abs().amax(dim=1)
        assert (moved > 1e-4).all(), "the pooled vector of ∅ was not optimised"
        assert (uncond.embeddings[:, TOKENS, 1280:] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_identical_prompts_reproduce_the_source(models, z0, kind, tok) -> None:
    den, traj = invert(models[kind], z0)
    uncond = plain_null(traj, embedding(den.family, 2))
    same = P2PSpec(PROMPT, (PROMPT,), mode="replace").build(tok, STEPS)
    rows = p2p_sample(den, traj, uncond, torch.cat([traj.embedding] * 2), controller=same)
    torch.testing.assert_close(rows[1], rows[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_localblend_keeps_the_background(models, kind, tok) -> None:
    """At 256² (32×32 latents) LocalBlend reads the 8×8 maps, a quarter of the latent side."""
    from nti_core.hosts.comfy import ComfyDenoiser

    den = ComfyDenoiser(models[kind])
    grid = make_grid(den.alphas_cumprod, 4)
    word = 2  # "cat" / "dog": BOS, "a", then the word
    traj = ddim_invert(den, cat_latent(256), embedding(den.family, 1, word), grid, PROMPT)
    spec = P2PSpec(PROMPT, ("a dog sitting next to a mirror",), mode="replace",
                   blend_words=("cat", "dog"), blend_start=0.0, blend_threshold=0.6)
    ctrl = spec.build(tok, 4, latent_hw=(32, 32))  # random weights: flatter maps, higher threshold
    edit = p2p_sample(den, traj, plain_null(traj, embedding(den.family, 2)),
                      torch.cat([traj.embedding, embedding(den.family, 3, word)]),
                      controller=ctrl)
    mask = ctrl.local_blend.last_mask  # [S, 1, h, w] at the latent size
    keep = (mask[1] == 0).expand_as(edit[1])
    print(f"{kind}: LocalBlend keeps {float(keep.float().mean()):.0%} of the latent")
    assert keep.any() and not keep.all(), "LocalBlend's mask should cover part of the image"
    torch.testing.assert_close(edit[1][keep], edit[0][keep], atol=1e-5, rtol=0)
    assert (edit[1] - edit[0]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_one_call_equals_two_calls(models, kind) -> None:
    from nti_core.hosts.comfy import ComfyDenoiser

    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=g)
    family = KINDS[kind][0]
    ctx = torch.cat([embedding(family, 5), embedding(family, 6), embedding(family, 5),
                     embedding(family, 7)])
    z4, rows = torch.cat([z, z]), Rows.cfg(2)
    one = ComfyDenoiser(models[kind]).eps(z4, 500, ctx, rows=rows)
    two = ComfyDenoiser(models[kind], separate_calls=True).eps(z4, 500, ctx, rows=rows)
    torch.testing.assert_close(one, two, atol=1e-5, rtol=1e-5)


def test_sdxl_size_conditioning_is_the_same_for_every_row(models) -> None:
    """y = [pooled | size embeddings]: the size part is the image's (8× the latent, crop 0) for
    every row of a call, and the pooled part is each row's own."""
    from nti_core.hosts.comfy import ComfyDenoiser

    den = ComfyDenoiser(models["sdxl-eps"])
    seen: list[dict] = []
    base = den.patcher.model
    original = base.encode_adm

    def spy(**kwargs):
        seen.append({k: v for k, v in kwargs.items() if k != "pooled_output"})
        y = original(**kwargs)
        seen[-1]["y"] = y
        return y

    base.encode_adm = spy
    try:
        ctx = torch.cat([embedding(SDXL, 1), embedding(SDXL, 2)])
        den.eps(torch.zeros(2, 4, 6, 10), 300, ctx, rows=Rows.cfg(1))
    finally:
        del base.encode_adm
    sizes = {(s["width"], s["height"], s["crop_w"], s["crop_h"], s["target_width"],
              s["target_height"]) for s in seen}
    assert sizes == {(80, 48, 0, 0, 80, 48)}
    y = torch.cat([s["y"] for s in seen])
    assert y.shape[1] == 2816
    torch.testing.assert_close(y[:, 1280:], y[:1, 1280:].expand(len(y), -1))
    assert (y[0, :1280] - y[-1, :1280]).abs().max() > 1e-3


# ============================================================== parity with the diffusers host


@pytest.mark.slow
@pytest.mark.parametrize("spec_name", ["SD2_V_SPEC", "SDXL_SPEC"])
def test_eps_matches_the_diffusers_host_on_the_same_checkpoint(comfy_root, spec_name) -> None:
    """The generated SD 2.x-v / SDXL checkpoint files (tests/comfy_support.py), loaded by
    ComfyUI's own detection and by diffusers: ε of both hosts agree for the same embeddings —
    ComfyUI's v→ε through its denoised output against the diffusers host's √ᾱ·v + √(1−ᾱ)·z, and
    ComfyUI's encode_adm against diffusers' time_ids (SDXL), under the edit's batch layout."""
    import os

    import comfy.sd

    from nti_core.hosts.comfy import ComfyDenoiser
    from nti_core.hosts.diffusers import DiffusersDenoiser

    spec = getattr(comfy_support, spec_name)
    cache = os.environ.get(comfy_support.CACHE_ENV)
    if not cache:
        pytest.skip(f"set ${comfy_support.CACHE_ENV}: the checkpoint is 0.9–1.8 GB")
    path = comfy_support.cached_checkpoint(cache, spec)
    model = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False,
                                                  output_clip=False)[0]
    comfy_den = ComfyDenoiser(model)
    family = comfy_den.family
    assert family.prediction == spec.prediction
    diff_den = DiffusersDenoiser(comfy_support.diffusers_unet(path, spec), comfy_den.alphas_cumprod,
                                 family)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 6, 10, generator=g)
    ctx = torch.cat([embedding(family, 11), embedding(family, 12)] * 2)
    rows = Rows.cfg(2)
    for t in (981, 500, 21):
        with torch.no_grad():
            ours = comfy_den.eps(torch.cat([z, z]), t, ctx, rows=rows)
            theirs = diff_den.eps(torch.cat([z, z]), t, ctx, rows=rows)
        err = float((ours - theirs).abs().max() / theirs.abs().max())
        assert err < 1e-4, f"t={t}: relative error {err:.2e}"


# ============================================================== the real SDXL architecture

SDXL_BASE = {  # comfy/model_detection.py's SDXL base unet config
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
    "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "context_dim": 2048, "num_head_channels": 64, "use_linear_in_transformer": True,
    "adm_in_channels": 2816, "num_classes": "sequential", "use_spatial_transformer": True,
    "legacy": False, "use_temporal_attention": False, "use_temporal_resblock": False,
    "use_checkpoint": False,
}


@pytest.mark.slow
def test_real_sdxl_architecture_at_a_tiny_latent(comfy_root, tok) -> None:
    """SDXL base's own UNet (2.6 G parameters, 10 GB in fp32 on the CPU, random weights): 70
    transformer blocks found and hooked, attention at latent/2 (depth 2) and latent/4 (depth 10)
    only, LocalBlend's quarter maps present; inversion round trip and an identical-prompt P2P
    reproduce the source at a 16×16 latent. Prints the process's peak memory."""
    import resource

    import comfy.model_base as mb
    import comfy.model_patcher
    import comfy.supported_models as sm

    from nti_core.hosts.comfy import ComfyDenoiser, transformer_keys

    with torch.no_grad():
        model = mb.SDXL(sm.SDXL(SDXL_BASE), model_type=mb.ModelType.EPS)
        gen = torch.Generator().manual_seed(0)
        for name, p in model.diffusion_model.named_parameters():
            gain = 0.1 if name.startswith("out.2") else 1.0
            p.copy_(comfy_support._init_tensor(name, p.shape, gen) * gain)
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    keys = transformer_keys(patcher)
    assert len(keys) == SDXL.transformer_blocks == 70
    assert {d for _, _, d in keys} == set(range(10))
    den = ComfyDenoiser(patcher)
    assert den.family.key == "sdxl" and len(den.sites) == 140

    z0 = cat_latent(128)  # 16×16 latents: attention maps 8×8 (latent/2) and 4×4 (latent/4)
    grid = make_grid(den.alphas_cumprod, 4)
    cond = embedding(SDXL, 1)
    traj = ddim_invert(den, z0, cond, grid, PROMPT)
    assert mse(ddim_reconstruct(den, traj), z0) < 0.05 * float(z0.var())
    same = P2PSpec(PROMPT, (PROMPT,), mode="replace").build(tok, 4, keep_step_maps=True)
    rows = p2p_sample(den, traj, plain_null(traj, embedding(SDXL, 2)), torch.cat([cond] * 2),
                      controller=same)
    torch.testing.assert_close(rows[1], rows[0], atol=1e-4, rtol=0)
    assert set(same.store.resolutions()) == {(8, 8), (4, 4)}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"real SDXL UNet at a 16×16 latent: process peak RSS {peak:.1f} GB")


@pytest.mark.parametrize("kind", ["sd2-v", "sdxl-eps"])
def test_value_context_feeds_conditional_token_values_only(models, kind) -> None:
    """StyleDiffusion's value input on SD 2.x / SDXL: conditional rows change, unconditional rows
    do not; for SDXL the value embedding's pooled row is not read (only the 77 token states)."""
    from nti_core.hosts.comfy import ComfyDenoiser

    family = KINDS[kind][0]
    den = ComfyDenoiser(models[kind])
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 8, 8, generator=g).expand(2, -1, -1, -1)
    ctx = torch.cat([embedding(family, 1), embedding(family, 2)])
    rows = Rows.make([False, True], [0, 0])
    values = torch.cat([embedding(family, 3), embedding(family, 4)])
    plain = den.eps(z, 400, ctx, rows=rows)
    valued = den.eps(z, 400, ctx, rows=rows, value_context=values)
    torch.testing.assert_close(valued[0], plain[0])
    assert (valued[1] - plain[1]).abs().max() > 1e-4
    if family.pooled_dim:
        other_pooled = values.clone()
        other_pooled[:, TOKENS] = 5.0
        torch.testing.assert_close(den.eps(z, 400, ctx, rows=rows, value_context=other_pooled),
                                   valued)
