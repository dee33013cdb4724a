"""Single-file SD 1.x checkpoints: config inference from shapes, offline loading, clear errors.

The checkpoint is the tiny SD1-shaped model exported to the original LDM layout by
``ldm_export`` (no ComfyUI needed); SD 1.5's own layout is checked on meta tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers", reason="single-file loading needs diffusers")

import ldm_export  # noqa: E402
from core_support import TINY_GROUPS, tiny_model  # noqa: E402

from nti_core.hosts.diffusers.models import SD1Model, load_sd1  # noqa: E402
from nti_core.hosts.diffusers.single_file import (  # noqa: E402
    CheckpointError,
    infer_sd1_configs,
    validate_configs,
    write_sd1_config,
)
from nti_core.schedule import scaled_linear_alphas_cumprod  # noqa: E402


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.fixture(scope="module")
def loaded(tiny_ckpt: Path) -> SD1Model:
    return load_sd1(tiny_ckpt)


def _eps(model: SD1Model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 77, 768, generator=g)
    with torch.no_grad():
        return model.unet(z, torch.tensor([999, 10]), context).sample


# ---------------------------------------------------------------------------------- parity


def test_single_file_matches_original(loaded: SD1Model) -> None:
    ref = tiny_model()
    torch.testing.assert_close(_eps(loaded), _eps(ref), atol=1e-5, rtol=0)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.testing.assert_close(loaded.encode_image(image), ref.encode_image(image),
                               atol=1e-5, rtol=0)
    prompt = "a cat sitting next to a mirror"
    torch.testing.assert_close(loaded.encode_prompt(prompt), ref.encode_prompt(prompt),
                               atol=1e-5, rtol=0)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(loaded.decode(z), ref.decode(z), atol=1e-5, rtol=0)


def test_single_file_schedule_and_tokenizer(loaded: SD1Model) -> None:
    torch.testing.assert_close(loaded.alphas_cumprod, scaled_linear_alphas_cumprod(),
                               atol=0, rtol=0)  # float64, recomputed from the config
    assert loaded.tokenizer.model_max_length == 77
    assert loaded.name == "tiny_sd1.safetensors"


def test_inferred_configs_match_the_model(tiny_ckpt: Path, tmp_path: Path) -> None:
    ref = tiny_model()
    configs = write_sd1_config(tmp_path, tiny_ckpt)
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                "cross_attention_dim", "in_channels", "out_channels", "norm_num_groups"):
        assert configs.unet[key] == _as_list(ref.unet.config[key]), key
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
        assert configs.vae[key] == _as_list(ref.vae.config[key]), key
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "vocab_size"):
        assert configs.text_encoder[key] == getattr(ref.text_encoder.config, key), key
    names = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert {"model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
            "vae/config.json", "text_encoder/config.json",
            "tokenizer/tokenizer_config.json"} <= names
    assert len(configs.notes) == 2  # the two GroupNorm declarations from the file's metadata


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def test_diffusers_folder_loads(tmp_path: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from nti_core.hosts.diffusers.single_file import SCHEDULER_CONFIG

    ref = tiny_model()
    scheduler = DDIMScheduler.from_config({k: v for k, v in SCHEDULER_CONFIG.items()
                                           if not k.startswith("_")})
    pipe = StableDiffusionPipeline(vae=ref.vae, text_encoder=ref.text_encoder,
                                   tokenizer=ref.tokenizer, unet=ref.unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "tiny")
    model = load_sd1(tmp_path / "tiny")
    torch.testing.assert_close(_eps(model), _eps(ref), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.alphas_cumprod, scaled_linear_alphas_cumprod(),
                               atol=0, rtol=0)  # float64, recomputed from the config


# ---------------------------------------------------------------------------------- SD 1.5 layout


def _sd15_layout_on_meta() -> dict[str, tuple[int, ...]]:
    """Shapes of SD 1.5's single file, from the diffusers SD 1.5 configs built on meta tensors."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
            attention_head_dim=8, sample_size=64)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12))
    return _shapes(ldm_export.sd1_to_ldm(unet, vae, clip))


def test_sd15_layout_is_inferred() -> None:
    shapes = _sd15_layout_on_meta()
    configs = infer_sd1_configs(shapes, name="sd15")
    u, v, t = configs.unet, configs.vae, configs.text_encoder
    assert u["block_out_channels"] == [320, 640, 1280, 1280]
    assert u["layers_per_block"] == 2 and u["transformer_layers_per_block"] == 1
    assert u["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert u["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert (u["cross_attention_dim"], u["attention_head_dim"], u["norm_num_groups"]) == (768, 8, 32)
    assert not u["use_linear_projection"]
    assert v["block_out_channels"] == [128, 256, 512, 512] and v["layers_per_block"] == 2
    assert (v["latent_channels"], v["norm_num_groups"], v["scaling_factor"]) == (4, 32, 0.18215)
    assert (t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"]) == (768, 12, 12)
    assert (t["intermediate_size"], t["max_position_embeddings"]) == (3072, 77)
    validate_configs(shapes, configs, name="sd15")  # every weight present with the right shape


# ---------------------------------------------------------------------------------- errors


def _save(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    from safetensors.torch import save_file

    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path))
    return path


def _error(path: Path) -> str:
    with pytest.raises(ValueError) as info:
        load_sd1(path)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_suffix_and_unreadable_errors(tmp_path: Path) -> None:
    (tmp_path / "model.ckpt").write_bytes(b"not really a pickle")
    assert "pickled .ckpt" in _error(tmp_path / "model.ckpt")
    (tmp_path / "model.bin").write_bytes(b"\0" * 16)
    assert "expected a .safetensors" in _error(tmp_path / "model.bin")
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{broken}")
    message = _error(tmp_path / "broken.safetensors")
    assert "cannot read broken.safetensors as safetensors" in message


@pytest.mark.parametrize(("keys", "expected"), [
    ({"conditioner.embedders.0.transformer.text_model.embeddings.position_ids": (1, 77),
      "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "SDXL"),
    ({"cond_stage_model.model.positional_embedding": (77, 1024),
      "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "SD 2.x"),
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (4, 4)}, "SD3"),
    ({"encoder.conv_in.weight": (4, 3, 3, 3)}, "no model.diffusion_model.input_blocks"),
])
def test_other_families_are_named(tmp_path: Path, keys: dict[str, tuple[int, ...]],
                                  expected: str) -> None:
    message = _error(_save(tmp_path / "other.safetensors", keys))
    assert expected in message and "other.safetensors" in message


@pytest.fixture(scope="module")
def tiny_shapes(tiny_ckpt: Path) -> dict[str, tuple[int, ...]]:
    from nti_core.hosts.diffusers.single_file import read_header

    return read_header(tiny_ckpt)[0]


def test_vae_errors(tiny_shapes: dict[str, tuple[int, ...]]) -> None:
    no_vae = {k: v for k, v in tiny_shapes.items() if not k.startswith("first_stage_model.")}
    with pytest.raises(CheckpointError, match="has no VAE .* diffusers folder"):
        infer_sd1_configs(no_vae, name="novae")
    taesd = {**no_vae, "first_stage_model.encoder.layers.0.weight": (64, 3, 3, 3),
             "first_stage_model.decoder.layers.0.weight": (64, 4, 3, 3)}
    with pytest.raises(CheckpointError, match="not an AutoencoderKL .*TAESD.*diffusers folder"):
        infer_sd1_configs(taesd, name="taesd")


def test_unet_layout_errors(tiny_shapes: dict[str, tuple[int, ...]]) -> None:
    inpaint = {**tiny_shapes, "model.diffusion_model.input_blocks.0.0.weight": (32, 9, 3, 3)}
    with pytest.raises(CheckpointError, match="inpainting"):
        infer_sd1_configs(inpaint, name="inpaint")
    no_text = {k: v for k, v in tiny_shapes.items() if not k.startswith("cond_stage_model.")}
    with pytest.raises(CheckpointError, match="no CLIP text encoder"):
        infer_sd1_configs(no_text, name="notext")
    with pytest.raises(CheckpointError, match="can only set"):
        infer_sd1_configs(tiny_shapes, overrides={"unet": {"block_out_channels": [8]}})


def test_missing_weight_is_caught(tiny_shapes: dict[str, tuple[int, ...]]) -> None:
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"
    shapes = {k: v for k, v in tiny_shapes.items() if k != key}
    configs = infer_sd1_configs(shapes, overrides=TINY_GROUPS, name="holey")
    with pytest.raises(CheckpointError, match="UNet lacks 1 weights .*attn2.to_v.weight"):
        validate_configs(shapes, configs, name="holey")


def test_declared_v_prediction_is_refused(tiny_shapes: dict[str, tuple[int, ...]]) -> None:
    with pytest.raises(CheckpointError, match="v-prediction model .tensor v_pred"):
        infer_sd1_configs({**tiny_shapes, "v_pred": ()}, name="vpred")
    with pytest.raises(CheckpointError, match="v-prediction model .modelspec.prediction_type=v"):
        infer_sd1_configs(tiny_shapes, {"modelspec.prediction_type": "v"}, name="vpred")


# ---------------------------------------------------------------------------------- ComfyUI
# Cross-checks against a checkpoint written from ComfyUI's own LDM classes (skipped without
# $COMFYUI_PATH): its UNet, TAESD VAE and CLIP-L keys are the real single-file layout.


def test_comfy_checkpoint_unet_and_taesd(tiny_checkpoint: Path, tiny_diffusers_unet: Any,
                                         tmp_path: Path) -> None:
    import json

    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from nti_core.hosts.diffusers.single_file import (
        infer_text_encoder_config,
        infer_unet_config,
        read_header,
    )

    message = _error(tiny_checkpoint)  # its VAE is ComfyUI's TAESD, not an AutoencoderKL
    assert "not an AutoencoderKL layout" in message and "TAESD" in message
    shapes = read_header(tiny_checkpoint)[0]
    clip = infer_text_encoder_config(shapes)  # ComfyUI writes a full-size CLIP-L
    assert (clip["hidden_size"], clip["num_hidden_layers"], clip["num_attention_heads"],
            clip["intermediate_size"], clip["vocab_size"]) == (768, 12, 12, 3072, 49408)
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(infer_unet_config(shapes)))
    unet = UNet2DConditionModel.from_single_file(
        str(tiny_checkpoint), config=str(tmp_path), subfolder="unet", local_files_only=True,
        torch_dtype=torch.float32)
    z, context = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 768)
    with torch.no_grad():
        torch.testing.assert_close(unet(z, 500, context).sample,
                                   tiny_diffusers_unet(z, 500, context).sample, atol=1e-5, rtol=0)
    ours = ldm_export.unet_to_ldm(tiny_diffusers_unet)  # the export is the exact inverse
    theirs = {k: v for k, v in load_file(str(tiny_checkpoint)).items()
              if k.startswith("model.diffusion_model.")}
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key].half(), value, atol=0, rtol=0, msg=key)


def test_cli_edit_runs_on_a_single_file_checkpoint(tiny_ckpt: Path, tmp_path: Path) -> None:
    import json

    from core_support import CAT

    from nti_core.app import main

    out = tmp_path / "edit"
    argv = ["edit", "--model", str(tiny_ckpt), "--image", str(CAT),
            "--source", "a cat sitting next to a mirror",
            "--target", "a tiger sitting next to a mirror",
            "--target", "a dog sitting next to a mirror",
            "--blend-words", "cat tiger", "--steps", "3", "--size", "64", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert [Path(p).name for p in report["paths"]] == [
        "reconstruction.png", "edit_1.png", "edit_2.png", "loss.png", "attention_source.png",
        "attention_edit_1.png", "blend_mask_1.png", "attention_edit_2.png", "blend_mask_2.png"]
    assert "null-text" in report["uncond"] and report["timings"]["ddim_inversion"] > 0
    from PIL import Image

    assert Image.open(out / "edit_2.png").size == (48, 64)  # the 3:4 photo, longer side 64
    assert Image.open(out / "loss.png").size == (480, 200)  # the default method optimises


def test_cli_styled_edit(tiny_ckpt: Path, tmp_path: Path) -> None:
    """--method styled: StyleDiffusion with a transformers CLIP vision folder, P2Plus, τ_v."""
    import json

    from core_support import CAT
    from tiny_models import tiny_clip_vision

    from nti_core.app import main

    encoder = tmp_path / "clip_vision"
    tiny_clip_vision(seed=0).save_pretrained(encoder)
    out = tmp_path / "styled"
    base = ["edit", "--model", str(tiny_ckpt), "--image", str(CAT),
            "--source", "a cat sitting next to a mirror",
            "--target", "a dog sitting next to a mirror", "--steps", "3", "--size", "64",
            "--out", str(out), "--method", "styled"]
    assert main(base) == 2  # no encoder: refused before the model loads
    argv = base + ["--image-encoder", str(encoder), "--style-inner-steps", "2",
                   "--uncond-self-end", "0.5", "--value-end", "0.4"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert "StyleDiffusion (official mapping network" in report["values"]
    assert "197×768" in report["values"]
    assert report["timings"]["styled"] > 0


@pytest.mark.parametrize("method", ["direct", "null-text-fast"])
def test_cli_direct_and_fast_methods(tiny_ckpt: Path, tmp_path: Path, method: str) -> None:
    """--method direct: the reconstruction is the VAE round trip of the photo (the source row
    stays on the pivot); --method null-text-fast; --no-attention-maps writes no map PNGs."""
    import json

    import numpy as np
    from core_support import CAT
    from PIL import Image

    from nti_core.app import main
    from nti_core.hosts.diffusers.models import load_sd1
    from nti_core.images import load_image, to_uint8

    out = tmp_path / method
    argv = ["edit", "--model", str(tiny_ckpt), "--image", str(CAT),
            "--source", "a cat sitting next to a mirror",
            "--target", "a dog sitting next to a mirror", "--blend-words", "cat dog",
            "--steps", "3", "--size", "64", "--out", str(out), "--method", method,
            "--no-attention-maps"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    optimised = ["loss.png"] if method == "null-text-fast" else []  # the loss curve, as nodes draw
    assert [Path(p).name for p in report["paths"]] == ["reconstruction.png", "edit_1.png", *optimised]
    assert f"method: {method}" in report["uncond"]
    if method == "direct":
        m = load_sd1(tiny_ckpt)
        vae = to_uint8(m.decode(m.encode_image(load_image(CAT, 64, crop=False))))[0].astype(int)
        recon = np.asarray(Image.open(out / "reconstruction.png")).astype(int)
        assert np.abs(recon - vae).max() <= 1
    assert main(argv[:-3] + ["--method", "direct", "--direct"]) == 2  # --direct is for styled
