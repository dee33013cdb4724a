"""Single-file SD 1.x checkpoints (original LDM/CompVis key layout) → a diffusers config folder.

``StableDiffusionPipeline.from_single_file(path, config=folder, local_files_only=True)`` needs a
diffusers-format folder with the pipeline's and each component's config; diffusers would otherwise
download one from the Hub. :func:`write_sd1_config` writes that folder offline, with the UNet, VAE
and text-encoder configs *inferred from the tensor shapes* in the checkpoint's safetensors header
(no weights are read), so SD 1.5 itself and smaller SD1-shaped models both load.

Keys read: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE, AutoencoderKL) and
``cond_stage_model.transformer.text_model.*`` (CLIP text encoder).

Shapes cannot tell everything. Fixed by SD 1.x convention unless the file says otherwise:
8 attention heads in the UNet, 32 groups in every GroupNorm (hard-coded in the original LDM
code), CLIP heads of 64 channels, quick-GELU, ε-prediction with the scaled-linear β schedule
0.00085…0.012. A v-prediction SD 1.x fine-tune cannot be told from its weights and is loaded as
ε-prediction, unless it says so: a ``v_pred`` sentinel tensor or ``modelspec.prediction_type``
metadata of ``v`` is refused with a clear error. A file whose layout departs from these
conventions can declare the values in its safetensors metadata under :data:`CONFIG_METADATA_KEY`,
as a JSON object such as ``{"unet": {"norm_num_groups": 16}, "vae": {"norm_num_groups": 16}}``
(only the keys in :data:`OVERRIDABLE` are accepted).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
CONFIG_METADATA_KEY = "nti_core.sd1_config"
OVERRIDABLE: dict[str, frozenset[str]] = {
    "unet": frozenset({"norm_num_groups", "attention_head_dim", "sample_size"}),
    "vae": frozenset({"norm_num_groups", "scaling_factor", "sample_size"}),
    "text_encoder": frozenset({"num_attention_heads", "hidden_act"}),
}
SD1_HEADS = 8  # UNet attention heads at every level (diffusers calls it attention_head_dim)
SD1_GROUPS = 32  # GroupNorm groups, hard-coded in the LDM UNet and VAE
CLIP_HEAD_DIM = 64
SD1_SCALING = 0.18215
SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

Shapes = dict[str, tuple[int, ...]]
V_PREDICTION_KEYS = ("v_pred", "edm_vpred.sigma_max")  # sentinel tensors (ComfyUI/Forge convention)

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """Not a loadable single-file SD 1.x checkpoint; the message says why, in one line."""


@dataclass
class SD1Configs:
    """Diffusers configs of the three models of one checkpoint (plain JSON-able dicts)."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------- reading


def read_header(path: str | Path) -> tuple[Shapes, dict[str, str]]:
    """Tensor shapes and string metadata of a ``.safetensors`` file, without reading weights."""
    from safetensors import safe_open

    p = Path(path)
    if p.suffix == ".ckpt":
        raise CheckpointError(
            f"{p.name}: pickled .ckpt checkpoints are not loaded (unpickling can run code); "
            "convert it to .safetensors or use a diffusers folder"
        )
    if p.suffix != ".safetensors":
        raise CheckpointError(f"{p.name}: expected a .safetensors checkpoint, got '{p.suffix}'")
    try:
        with safe_open(str(p), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
            metadata = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types, OSError, …
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"cannot read {p.name} as safetensors: {reason}") from e
    if not shapes:
        raise CheckpointError(f"{p.name} holds no tensors")
    return shapes, metadata


def _sub(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> Shapes:
    """The entries under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def _indices(shapes: Mapping[str, Any], prefix: str) -> list[int]:
    """Sorted integers n of the keys ``prefix + "n." + …``."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in shapes if (m := pattern.match(k))})


def _has_prefix(shapes: Mapping[str, Any], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def _need(shapes: Mapping[str, tuple[int, ...]], key: str, part: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"not an SD 1.x {part} layout: missing {key}")
    return shapes[key]


def _consecutive(indices: list[int], what: str) -> None:
    if indices != list(range(len(indices))):
        raise CheckpointError(f"not an SD 1.x layout: {what} are numbered {indices[:8]}…")


# ---------------------------------------------------------------------------------- family


CONVERT_HINT = ("convert it to a diffusers folder (diffusers' scripts/convert_original_stable_"
                "diffusion_to_diffusers.py, or the pipeline's from_single_file(…).save_pretrained"
                "(folder) where its config can be fetched) and pass the folder: single files are "
                "read for SD 1.x only")


def single_file_family(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The family name, "SD 2.x" or "SDXL", when the header shows one of them (their text
    encoders' keys, or the UNet's cross-attention key width 1024 / 2048), else None."""
    if _has_prefix(shapes, "conditioner.embedders."):
        return "SDXL"
    if _has_prefix(shapes, "cond_stage_model.model."):
        return "SD 2.x"
    widths = {s[1] for k, s in shapes.items()
              if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight") and len(s) == 2}
    return "SDXL" if 2048 in widths else "SD 2.x" if 1024 in widths else None


def check_sd1_family(shapes: Mapping[str, tuple[int, ...]], name: str) -> None:
    """Raise :class:`CheckpointError` naming the model family when the keys are not SD 1.x's."""
    family = single_file_family(shapes)
    if family == "SDXL":
        raise CheckpointError(f"{name} is a single-file SDXL checkpoint (conditioner.embedders.* "
                              f"or 2048-wide cross-attention): {CONVERT_HINT}")
    if family == "SD 2.x":
        raise CheckpointError(f"{name} is a single-file SD 2.x checkpoint (OpenCLIP text encoder "
                              f"cond_stage_model.model.* or 1024-wide cross-attention): "
                              f"{CONVERT_HINT}")
    for marker, other in (("joint_blocks.", "SD3"), ("double_blocks.", "Flux")):
        if _has_prefix(shapes, UNET_PREFIX + marker):
            raise CheckpointError(f"{name} is a {other} checkpoint; this pack supports SD 1.x, "
                                  "SD 2.x and SDXL UNets only")
    if not _has_prefix(shapes, UNET_PREFIX + "input_blocks."):
        first = ", ".join(sorted(shapes)[:3])
        raise CheckpointError(f"{name} is not a single-file SD 1.x checkpoint: no "
                              f"{UNET_PREFIX}input_blocks.* UNet (first keys: {first})")
    if _has_prefix(shapes, UNET_PREFIX + "label_emb."):
        raise CheckpointError(f"{name} has a class-conditioned UNet (label_emb, SDXL-style): "
                              f"{CONVERT_HINT}")


def check_epsilon_prediction(shapes: Mapping[str, Any], metadata: Mapping[str, str], name: str
                             ) -> None:
    """Refuse files that declare v-prediction (undeclared v-prediction cannot be detected)."""
    declared = str(metadata.get("modelspec.prediction_type", "")).lower()
    sentinel = next((k for k in V_PREDICTION_KEYS if k in shapes), None)
    if sentinel or declared.startswith("v"):
        how = f"tensor {sentinel}" if sentinel else f"modelspec.prediction_type={declared}"
        raise CheckpointError(f"{name} is a v-prediction model ({how}); only ε-prediction "
                              "SD 1.x models are supported")


# ---------------------------------------------------------------------------------- UNet


def _unet_levels(u: Shapes) -> list[list[int]]:
    """Input-block numbers of the ResBlocks of each level (split at the downsamplers)."""
    blocks = _indices(u, "input_blocks.")
    _consecutive(blocks, "UNet input blocks")
    levels: list[list[int]] = [[]]
    for n in blocks[1:]:
        if f"input_blocks.{n}.0.op.weight" in u:
            levels.append([])
        elif f"input_blocks.{n}.0.in_layers.2.weight" in u:
            levels[-1].append(n)
        else:
            raise CheckpointError(f"not an SD 1.x UNet layout: input block {n} is neither a "
                                  "ResBlock nor a downsampler")
    return levels


def _depth(u: Shapes, block: str) -> int:
    """Transformer blocks in the SpatialTransformer ``block`` (e.g. ``input_blocks.1.1``)."""
    return len(_indices(u, f"{block}.transformer_blocks."))


def _down_attention(u: Shapes, levels: list[list[int]]) -> tuple[list[bool], list[int]]:
    """Per level: whether its blocks have cross-attention, and the transformer depths seen."""
    has_attn, depths = [], []
    for level in levels:
        flags = {f"input_blocks.{n}.1.proj_in.weight" in u for n in level}
        if len(flags) != 1:
            raise CheckpointError("not an SD 1.x UNet layout: attention on only some blocks "
                                  "of a level")
        has_attn.append(flags.pop())
        depths += [_depth(u, f"input_blocks.{n}.1") for n in level if has_attn[-1]]
    return has_attn, depths


def _up_attention(u: Shapes, n_levels: int, per_level: int) -> list[bool]:
    """Per up level (deepest first): whether its blocks have cross-attention."""
    blocks = _indices(u, "output_blocks.")
    _consecutive(blocks, "UNet output blocks")
    if len(blocks) != n_levels * per_level:
        raise CheckpointError(f"not an SD 1.x UNet layout: {len(blocks)} output blocks for "
                              f"{n_levels} levels of {per_level - 1} ResBlocks")
    flags = []
    for level in range(n_levels):
        ns = range(level * per_level, (level + 1) * per_level)
        seen = {f"output_blocks.{n}.1.proj_in.weight" in u for n in ns}
        if len(seen) != 1:
            raise CheckpointError("not an SD 1.x UNet layout: attention on only some up blocks")
        flags.append(seen.pop())
    return flags


def _first_attention(u: Shapes, levels: list[list[int]], has_attn: list[bool]) -> str:
    for level, attn in zip(levels, has_attn):
        if attn:
            return f"input_blocks.{level[0]}.1"
    return "middle_block.1"


def infer_unet_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """diffusers ``UNet2DConditionModel`` config of the LDM UNet (``model.diffusion_model.*``)."""
    u = _sub(shapes, UNET_PREFIX)
    conv_in = _need(u, "input_blocks.0.0.weight", "UNet")
    levels = _unet_levels(u)
    per_level = {len(level) for level in levels}
    if len(per_level) != 1 or 0 in per_level:
        counts = [len(x) for x in levels]
        raise CheckpointError(f"not an SD 1.x UNet layout: ResBlocks per level {counts}")
    layers = per_level.pop()
    channels = [_need(u, f"input_blocks.{lv[0]}.0.out_layers.3.weight", "UNet")[0] for lv in levels]
    has_attn, depths = _down_attention(u, levels)
    if _up_attention(u, len(levels), layers + 1) != has_attn[::-1]:
        raise CheckpointError("not an SD 1.x UNet layout: up and down blocks differ in attention")
    if "middle_block.1.proj_in.weight" not in u or _indices(u, "middle_block.") != [0, 1, 2]:
        raise CheckpointError("not an SD 1.x UNet layout: the middle block is not "
                              "ResBlock–SpatialTransformer–ResBlock")
    depths.append(_depth(u, "middle_block.1"))
    if len(set(depths)) != 1:
        raise CheckpointError(f"not an SD 1.x UNet layout: transformer depths "
                              f"{sorted(set(depths))} differ between levels")
    attn = _first_attention(u, levels, has_attn)
    proj_in = _need(u, f"{attn}.proj_in.weight", "UNet")
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 64,
        "in_channels": conv_in[1],
        "out_channels": _need(u, "out.2.weight", "UNet")[0],
        "block_out_channels": channels,
        "layers_per_block": layers,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in has_attn[::-1]],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "transformer_layers_per_block": depths[0],
        "cross_attention_dim": _need(u, f"{attn}.transformer_blocks.0.attn2.to_k.weight",
                                     "UNet")[1],
        "attention_head_dim": SD1_HEADS,
        "use_linear_projection": len(proj_in) == 2,
        "norm_num_groups": SD1_GROUPS,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "center_input_sample": False,
        "upcast_attention": False,
    }


# ---------------------------------------------------------------------------------- VAE


def _vae_missing_message(name: str, v: Shapes) -> str:
    if not v:
        return (f"{name} has no VAE ({VAE_PREFIX}*): use a checkpoint with the VAE baked in, "
                "or a diffusers folder")
    return (f"the VAE in {name} is not an AutoencoderKL layout (no encoder.conv_in / "
            "encoder.down.N.block.M / quant_conv — a TAESD-style tiny VAE?); "
            "convert the model to a diffusers folder with a full VAE and load that")


def infer_vae_config(shapes: Mapping[str, tuple[int, ...]], name: str = "the checkpoint"
                     ) -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` config of the LDM VAE under ``first_stage_model.``."""
    v = _sub(shapes, VAE_PREFIX)
    required = ("encoder.conv_in.weight", "encoder.conv_out.weight", "quant_conv.weight",
                "post_quant_conv.weight", "decoder.conv_in.weight", "decoder.conv_out.weight",
                "encoder.down.0.block.0.conv1.weight")
    if any(k not in v for k in required):
        raise CheckpointError(_vae_missing_message(name, v))
    levels = _indices(v, "encoder.down.")
    _consecutive(levels, "VAE encoder levels")
    layers = {len(_indices(v, f"encoder.down.{i}.block.")) for i in levels}
    up_layers = {len(_indices(v, f"decoder.up.{i}.block.")) for i in levels}
    if _indices(v, "decoder.up.") != levels or len(layers) != 1 or up_layers != {layers.pop() + 1}:
        raise CheckpointError(_vae_missing_message(name, v) + " (encoder/decoder levels differ)")
    latent = v["decoder.conv_in.weight"][1]
    if v["encoder.conv_out.weight"][0] != 2 * latent:
        raise CheckpointError(f"the VAE in {name} is not a KL autoencoder (encoder gives "
                              f"{v['encoder.conv_out.weight'][0]} channels for {latent} latents)")
    config = {
        "_class_name": "AutoencoderKL",
        "in_channels": v["encoder.conv_in.weight"][1],
        "out_channels": v["decoder.conv_out.weight"][0],
        "block_out_channels": [v[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in levels],
        "layers_per_block": up_layers.pop() - 1,
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "latent_channels": latent,
        "act_fn": "silu",
        "norm_num_groups": SD1_GROUPS,
        "sample_size": 512,
        "scaling_factor": SD1_SCALING,
    }
    if "encoder.mid.attn_1.q.weight" not in v:
        config["mid_block_add_attention"] = False
    return config


# ---------------------------------------------------------------------------------- CLIP


def infer_text_encoder_config(shapes: Mapping[str, tuple[int, ...]], name: str = "the checkpoint"
                              ) -> dict[str, Any]:
    """transformers ``CLIPTextConfig`` fields of the text encoder under
    ``cond_stage_model.transformer.text_model.`` (heads assumed 64 channels wide)."""
    t = _sub(shapes, CLIP_PREFIX)
    if "embeddings.token_embedding.weight" not in t:
        old = _has_prefix(shapes, "cond_stage_model.transformer.embeddings.")
        hint = " (found the pre-2022 layout without text_model.)" if old else ""
        raise CheckpointError(f"{name} has no CLIP text encoder ({CLIP_PREFIX}*){hint}; "
                              "use a diffusers folder")
    vocab, hidden = t["embeddings.token_embedding.weight"]
    layers = _indices(t, "encoder.layers.")
    _consecutive(layers, "CLIP layers")
    if not layers or hidden % CLIP_HEAD_DIM:
        raise CheckpointError(f"{name}: CLIP text encoder with {len(layers)} layers of width "
                              f"{hidden} is not SD 1.x-shaped")
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _need(t, "encoder.layers.0.mlp.fc1.weight", "CLIP")[0],
        "num_hidden_layers": len(layers),
        "num_attention_heads": hidden // CLIP_HEAD_DIM,
        "max_position_embeddings": _need(t, "embeddings.position_embedding.weight", "CLIP")[0],
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": hidden,
    }


# ---------------------------------------------------------------------------------- all


def _overrides_from_metadata(metadata: Mapping[str, str], name: str) -> dict[str, dict[str, Any]]:
    text = metadata.get(CONFIG_METADATA_KEY)
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{name}: metadata {CONFIG_METADATA_KEY} is not JSON ({e})") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{name}: metadata {CONFIG_METADATA_KEY} must be a JSON object")
    return value


def _apply_overrides(configs: SD1Configs, overrides: Mapping[str, Mapping[str, Any]], source: str
                     ) -> None:
    for part, values in overrides.items():
        allowed = OVERRIDABLE.get(part)
        if allowed is None or not isinstance(values, Mapping) or not set(values) <= allowed:
            allowed_text = "; ".join(f"{k}: {', '.join(sorted(v))}" for k, v in OVERRIDABLE.items())
            raise CheckpointError(f"{source}: can only set ({allowed_text}), got {part}: {values}")
        getattr(configs, part).update(values)
        configs.notes.append(f"{part} {dict(values)} from {source}")


def _check_consistent(c: SD1Configs, name: str) -> None:
    """Cross-model checks: latents and context widths must agree."""
    unet, vae, te = c.unet, c.vae, c.text_encoder
    if not unet["in_channels"] == unet["out_channels"] == vae["latent_channels"]:
        raise CheckpointError(
            f"{name}: UNet maps {unet['in_channels']}→{unet['out_channels']} channels, VAE latents "
            f"have {vae['latent_channels']} (an inpainting or pix2pix model?); a plain SD 1.x "
            "text-to-image model is needed")
    if unet["cross_attention_dim"] != te["hidden_size"]:
        raise CheckpointError(f"{name}: UNet cross-attention width {unet['cross_attention_dim']} ≠ "
                              f"text encoder width {te['hidden_size']}")
    if unet["use_linear_projection"]:
        raise CheckpointError(f"{name}: the UNet uses linear attention projections (SD 2.x "
                              "layout); only SD 1.x is supported")


def infer_sd1_configs(shapes: Mapping[str, tuple[int, ...]],
                      metadata: Mapping[str, str] | None = None,
                      overrides: Mapping[str, Mapping[str, Any]] | None = None,
                      name: str = "the checkpoint") -> SD1Configs:
    """UNet, VAE and text-encoder configs from an LDM-layout SD 1.x state dict's shapes.

    ``metadata`` (the safetensors header's) may carry :data:`CONFIG_METADATA_KEY`; ``overrides``
    are applied last. Both may only set the non-inferable keys in :data:`OVERRIDABLE`.
    """
    check_sd1_family(shapes, name)
    check_epsilon_prediction(shapes, metadata or {}, name)
    configs = SD1Configs(infer_unet_config(shapes), infer_vae_config(shapes, name),
                         infer_text_encoder_config(shapes, name))
    _apply_overrides(configs, _overrides_from_metadata(metadata or {}, name),
                     f"{name} metadata {CONFIG_METADATA_KEY}")
    _apply_overrides(configs, overrides or {}, "overrides")
    _check_consistent(configs, name)
    return configs


# ---------------------------------------------------------------------------------- validation


def _meta_state(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    import torch

    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def _compare(part: str, expected: Mapping[str, Any], got: Mapping[str, Any], name: str,
             ignore: tuple[str, ...] = ()) -> None:
    missing = sorted(k for k in expected if k not in got and not k.endswith(ignore))
    if missing:
        raise CheckpointError(f"{name}: the {part} lacks {len(missing)} weights the inferred "
                              f"config needs, e.g. {missing[0]}")
    for k, tensor in expected.items():
        if k in got and tuple(got[k].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{name}: {part} weight {k} has shape {tuple(got[k].shape)}, "
                                  f"the inferred config needs {tuple(tensor.shape)}")


def validate_configs(shapes: Mapping[str, tuple[int, ...]], configs: SD1Configs,
                     name: str = "the checkpoint") -> None:
    """Build the three models on the meta device and check that diffusers' LDM converters give
    every weight they need, with the right shape (no memory, no weights read). diffusers loads
    with ``strict=False``: without this check a missing weight would stay random silently."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel

    ckpt = _meta_state(shapes)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs.unet)
        vae = AutoencoderKL.from_config(configs.vae)
        clip = CLIPTextModel(CLIPTextConfig(**configs.text_encoder))
    _compare("UNet", unet.state_dict(), sfu.convert_ldm_unet_checkpoint(ckpt, configs.unet), name)
    _compare("VAE", vae.state_dict(), sfu.convert_ldm_vae_checkpoint(ckpt, configs.vae), name)
    clip_sd = sfu.convert_ldm_clip_checkpoint(ckpt)
    if not hasattr(clip, "text_model"):  # transformers ≥ 5.6 flattened CLIPTextModel
        clip_sd = {k.removeprefix("text_model."): v for k, v in clip_sd.items()}
    _compare("text encoder", clip.state_dict(), clip_sd, name, ignore=("position_ids",))


# ---------------------------------------------------------------------------------- writing


def _write_json(path: Path, value: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _model_index(version: str) -> dict[str, Any]:
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": version,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "safety_checker": [None, None],
        "requires_safety_checker": False,
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def write_tokenizer(folder: Path, max_length: int) -> None:
    """Save SD 1.x's CLIP tokenizer (from ``sd1_clip_tokenizer()``) in ``folder``."""
    from ...tokenizer import sd1_clip_tokenizer

    sd1_clip_tokenizer().tokenizer.save_pretrained(str(folder))
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    config["model_max_length"] = max_length
    config.pop("local_files_only", None)
    _write_json(path, config)


def write_config_folder(config_dir: str | Path, configs: SD1Configs) -> Path:
    """The diffusers folder (model_index.json and per-component configs, no weights)."""
    import diffusers
    from transformers import CLIPTextConfig

    root = Path(config_dir)
    version = diffusers.__version__
    _write_json(root / "model_index.json", _model_index(version))
    _write_json(root / "scheduler" / "scheduler_config.json",
                {**SCHEDULER_CONFIG, "_diffusers_version": version})
    _write_json(root / "unet" / "config.json", {**configs.unet, "_diffusers_version": version})
    _write_json(root / "vae" / "config.json", {**configs.vae, "_diffusers_version": version})
    text_config = CLIPTextConfig(**configs.text_encoder)
    text_config.architectures = ["CLIPTextModel"]
    text_config.save_pretrained(str(root / "text_encoder"))
    write_tokenizer(root / "tokenizer", configs.text_encoder["max_position_embeddings"])
    return root


def write_sd1_config(config_dir: str | Path, path: str | Path,
                     overrides: Mapping[str, Mapping[str, Any]] | None = None) -> SD1Configs:
    """Write a diffusers config folder for the single-file SD 1.x checkpoint at ``path``.

    Reads only the safetensors header; raises :class:`CheckpointError` (a ``ValueError``) with a
    one-line reason when the file is unreadable, a ``.ckpt``, not SD 1.x (SDXL, SD 2.x, …), declared
    v-prediction, or lacks a full AutoencoderKL VAE or the CLIP text encoder. The scheduler is
    ε-prediction: an undeclared v-prediction fine-tune cannot be told from its weights and would
    load as ε. Returns the configs written.
    """
    p = Path(path)
    shapes, metadata = read_header(p)
    configs = infer_sd1_configs(shapes, metadata, overrides, name=p.name)
    validate_configs(shapes, configs, name=p.name)
    write_config_folder(config_dir, configs)
    u, v, t = configs.unet, configs.vae, configs.text_encoder
    log.info("%s: UNet %s×%d (attention %s), VAE %s, CLIP %d×%d; ε-prediction assumed%s", p.name,
             u["block_out_channels"], u["layers_per_block"],
             [b.startswith("CrossAttn") for b in u["down_block_types"]], v["block_out_channels"],
             t["num_hidden_layers"], t["hidden_size"],
             "".join(f"; {n}" for n in configs.notes))
    return configs
