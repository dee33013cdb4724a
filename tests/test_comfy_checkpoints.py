"""The generated SD 2.x (v and ε) and SDXL checkpoints (tests/comfy_support.py) against ComfyUI's
own detection and a diffusers reference UNet holding the same weights.

Needs $COMFYUI_PATH (skipped, saying so, without it), except the spec checks at the top. The files
are cached in $NTI_TEST_CACHE when set (SD2 ~0.9 GB each, SDXL ~1.8 GB: CLIP-G alone is 1.4 GB);
the first run builds them (about 30 s each).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import comfy_support as cs
import pytest
import torch

# ============================================================== specs (no ComfyUI needed)


def test_sd1_cache_names_did_not_change() -> None:
    # The SD1 files in $NTI_TEST_CACHE are named by these keys: the new spec fields must not
    # change them (key() leaves fields at their default out).
    assert cs.TinySpec().key(cs.DEFAULT_SEED) == "448c112e7820"
    assert cs.HTTP_SPEC.key(cs.DEFAULT_SEED) == "81056a8676f9"
    assert cs.TinySpec().tag() == "sd15" and cs.checkpoint_name() == cs.DEFAULT_NAME


def test_family_specs_have_distinct_names() -> None:
    specs = [cs.TinySpec(), cs.SD2_V_SPEC, cs.SD2_EPS_SPEC, cs.SDXL_SPEC, cs.SDXL_V_SPEC,
             cs.sdxl_spec("v", zero_snr=True)]
    tags = [s.tag() for s in specs]
    assert tags == ["sd15", "sd2_v", "sd2", "sdxl", "sdxl_v", "sdxl_v_zsnr"]
    assert len({s.key(cs.DEFAULT_SEED) for s in specs}) == len(specs)
    assert cs.SD2_V_SPEC.output_block_depth(11) == 1  # where ComfyUI looks for v
    assert cs.SDXL_SPEC.transformer_depth() == list(cs.SDXL_TRANSFORMER_DEPTH)


@pytest.mark.parametrize("bad", [
    lambda: cs.sdxl_spec(level_depth=(0, 2, 4)),  # detection would say SSD-1B-like, not SDXL
    lambda: cs.sdxl_spec(context_dim=1024),
    lambda: cs.sdxl_spec("eps", zero_snr=True),  # ComfyUI reads ztsnr only next to v_pred
    lambda: cs.sd2_spec(level_depth=(0, 0, 1)),  # no transformer in output_blocks.11
    lambda: cs.sd2_spec(num_head_channels=-1, num_heads=5),
    lambda: cs.TinySpec(prediction="v"),  # ComfyUI's SD15 is ε only
    lambda: cs.TinySpec(family="sd3"),
])
def test_invalid_specs_are_refused(bad: Any) -> None:
    with pytest.raises(ValueError):
        bad()


def test_diffusers_config_for_sdxl() -> None:
    cfg = cs.SDXL_SPEC.diffusers_config()
    assert cfg["addition_embed_type"] == "text_time" and cfg["addition_time_embed_dim"] == 256
    assert cfg["projection_class_embeddings_input_dim"] == 2816
    assert cfg["attention_head_dim"] == (5, 5, 5) and cfg["use_linear_projection"] is True
    assert cfg["transformer_layers_per_block"] == (1, 2, 10)
    assert cfg["down_block_types"] == ("DownBlock2D", "CrossAttnDownBlock2D",
                                       "CrossAttnDownBlock2D")
    assert cfg["up_block_types"] == ("UpBlock2D",) * 3
    # diffusers would build a 10-deep mid block there: build_diffusers_unet swaps in depth 1
    assert cs.SDXL_SPEC.diffusers_mid_depth() == 10 and cs.SDXL_SPEC.middle_depth == 1


# ============================================================== the checkpoints in ComfyUI

H, W = 16, 24  # latent size; non-square, so a swapped (h, w) in SDXL's size conditioning shows

CASES: dict[str, dict[str, Any]] = {
    "sd2_v": {"spec": cs.SD2_V_SPEC, "config": "SD20", "model": "BaseModel", "type": "V_PREDICTION",
              "tokens": {"h"}, "cond": 1024, "pooled": 1024},
    "sd2_eps": {"spec": cs.SD2_EPS_SPEC, "config": "SD20", "model": "BaseModel", "type": "EPS",
                "tokens": {"h"}, "cond": 1024, "pooled": 1024},
    "sdxl": {"spec": cs.SDXL_SPEC, "config": "SDXL", "model": "SDXL", "type": "EPS",
             "tokens": {"l", "g"}, "cond": 2048, "pooled": 1280},
}


@pytest.fixture(scope="session")
def checkpoint_folder(comfy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = os.environ.get(cs.CACHE_ENV)
    return Path(cache) if cache else tmp_path_factory.mktemp("nti_family_checkpoints")


@pytest.fixture(scope="module", params=list(CASES))
def case(request: pytest.FixtureRequest, checkpoint_folder: Path) -> Any:
    """One family at a time (module scope: the previous one is released before the next loads)."""
    path = cs.cached_checkpoint(checkpoint_folder, CASES[request.param]["spec"], cs.DEFAULT_SEED)
    model, clip, _ = cs.load_comfy_checkpoint(path)
    info = {**CASES[request.param], "path": path, "patcher": model, "clip": clip}
    yield info
    info.clear()


def test_detected_as_the_family(case: dict[str, Any]) -> None:
    import comfy.model_base
    import comfy.supported_models

    model = case["patcher"].model
    assert type(model.model_config) is getattr(comfy.supported_models, case["config"])
    assert type(model) is getattr(comfy.model_base, case["model"])
    assert model.model_type == getattr(comfy.model_base.ModelType, case["type"])
    config = model.model_config.unet_config
    assert config["context_dim"] == case["spec"].context_dim
    for key, value in case["spec"].comfy_unet_config().items():
        if key not in ("image_size", "use_checkpoint"):
            assert config[key] == value, key
    size = case["path"].stat().st_size
    assert size < (1900 if case["spec"].family == "sdxl" else 950) * 2**20


def test_clip_tokens_and_conditioning(case: dict[str, Any]) -> None:
    clip = case["clip"]
    tokens = clip.tokenize("a cat")
    assert set(tokens) == case["tokens"]
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    assert cond.shape == (1, 77, case["cond"]) and pooled.shape == (1, case["pooled"])
    assert torch.isfinite(cond).all() and torch.isfinite(pooled).all()
    for x in (cond, pooled):  # random weights, but unit-ish scale (not 1e3, not 1e-3)
        assert 0.2 < x.float().std().item() < 5 and x.abs().max().item() < 50


def test_raw_output_matches_diffusers(case: dict[str, Any]) -> None:
    pytest.importorskip("diffusers", reason="the diffusers reference UNet needs diffusers")
    spec = case["spec"]
    model = case["patcher"].model
    unet = cs.diffusers_unet(case["path"], spec)
    assert sum(p.numel() for p in unet.parameters()) == sum(
        p.numel() for p in model.diffusion_model.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, H, W, generator=g)
    context = torch.randn(2, 77, spec.context_dim, generator=g)
    t = torch.tensor([500.0, 20.0])
    comfy_kw: dict[str, Any] = {}
    diffusers_kw: dict[str, Any] = {}
    if spec.family == "sdxl":
        # ComfyUI's encode_adm embeds [height, width, crop_h, crop_w, target_height,
        # target_width]: the order of diffusers' time_ids (original_size, crop top-left,
        # target_size, each (h, w)).
        pooled = torch.randn(2, 1280, generator=g)
        h, w = 8 * H, 8 * W
        comfy_kw["y"] = model.encode_adm(pooled_output=pooled, width=w, height=h, crop_w=0,
                                         crop_h=0, target_width=w, target_height=h)
        assert comfy_kw["y"].shape == (2, 2816)
        diffusers_kw["added_cond_kwargs"] = {
            "text_embeds": pooled, "time_ids": torch.tensor([[h, w, 0, 0, h, w]] * 2, dtype=torch.float32)}
    with torch.no_grad():
        ours = model.diffusion_model(x, t, context, **comfy_kw)
        ref = unet(x, t, encoder_hidden_states=context, **diffusers_kw).sample
    assert ours.shape == ref.shape == x.shape and torch.isfinite(ref).all()
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-4, rel
    if spec.family == "sdxl":  # the order matters: (w, h) instead of (h, w) is far off
        diffusers_kw["added_cond_kwargs"]["time_ids"] = torch.tensor([[w, h, 0, 0, w, h]] * 2,
                                                                 dtype=torch.float32)
        with torch.no_grad():
            swapped = unet(x, t, encoder_hidden_states=context, **diffusers_kw).sample
        assert ((ours - swapped).abs().max() / ref.abs().max()).item() > 100 * max(rel, 1e-7)


# ============================================================== prediction markers


def _unet_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(cs.UNET_PREFIX)}


def test_sd2_variants_differ_only_in_the_marker_bias(checkpoint_folder: Path) -> None:
    v = _unet_tensors(cs.cached_checkpoint(checkpoint_folder, cs.SD2_V_SPEC))
    eps = _unet_tensors(cs.cached_checkpoint(checkpoint_folder, cs.SD2_EPS_SPEC))
    key = cs.UNET_PREFIX + cs.SD2_V_KEY
    assert v.keys() == eps.keys()
    assert torch.std(v[key].float(), unbiased=False) > 0.09 > torch.std(eps[key].float(),
                                                                          unbiased=False)
    assert [k for k in v if not torch.equal(v[k], eps[k])] == [key]


def test_sdxl_v_and_zsnr_from_marker_keys(checkpoint_folder: Path) -> None:
    """The v files are the ε file plus the marker keys (checked on the UNet part, which is where
    build_state_dict puts them); ComfyUI reads them as in load_checkpoint_guess_config (same
    state-dict entry point), with the UNet tensors only, to skip CLIP-G."""
    import comfy.model_base
    import comfy.sd

    eps = _unet_tensors(cs.cached_checkpoint(checkpoint_folder, cs.SDXL_SPEC))
    built = cs.build_state_dict(cs.SDXL_V_SPEC, cs.DEFAULT_SEED, parts=("unet",))
    assert set(built) == set(eps) | {cs.SDXL_V_MARKER}
    for key in list(eps)[:: max(1, len(eps) // 40)]:
        assert torch.equal(built[key], eps[key]), key
    del built

    zsnr = cs.sdxl_spec("v", zero_snr=True)
    for spec, kind, is_zsnr in ((cs.SDXL_SPEC, "EPS", False),
                                (cs.SDXL_V_SPEC, "V_PREDICTION", False),
                                (zsnr, "V_PREDICTION", True)):
        sd = {**eps, **cs.marker_keys(spec)}
        model = comfy.sd.load_state_dict_guess_config(sd, output_vae=False, output_clip=False)[0]
        assert type(model.model) is comfy.model_base.SDXL
        assert model.model.model_type == getattr(comfy.model_base.ModelType, kind), spec.tag()
        sampling = model.get_model_object("model_sampling")
        assert bool(sampling.zsnr) is is_zsnr
        assert bool(sampling.sigma_max > 1000) is is_zsnr  # zero terminal SNR: sigma_max ≈ 4519
        del model, sd


def test_output_side_attention_variant(comfy_root: Path, tmp_path: Path) -> None:
    """Output depth is free for detection; where it differs from the input side, diffusers
    needs per-block depths (reverse_transformer_layers_per_block). UNet-only file: no CLIP."""
    pytest.importorskip("diffusers", reason="the diffusers reference UNet needs diffusers")
    import comfy.model_base
    import comfy.sd
    from safetensors.torch import save_file

    spec = cs.sdxl_spec(output_depth=(0, 1, 1))
    assert "reverse_transformer_layers_per_block" in spec.diffusers_config()
    path = tmp_path / "unet.safetensors"
    save_file(cs.build_state_dict(spec, parts=("unet",)), str(path))
    patcher = comfy.sd.load_state_dict_guess_config(
        _unet_tensors(path), output_vae=False, output_clip=False)[0]
    model = patcher.model
    assert type(model) is comfy.model_base.SDXL
    assert model.model_config.unet_config["transformer_depth_output"] == [0] * 3 + [1] * 6
    unet = cs.diffusers_unet(path, spec)
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 2048, generator=g)
    pooled = torch.randn(1, 1280, generator=g)
    y = model.encode_adm(pooled_output=pooled, width=64, height=64, crop_w=0, crop_h=0,
                         target_width=64, target_height=64)
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]])
    with torch.no_grad():
        ours = model.diffusion_model(x, torch.tensor([300.0]), context, y=y)
        ref = unet(x, torch.tensor([300.0]), encoder_hidden_states=context,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-4
