"""Export a diffusers SD1-shaped model to the original LDM/CompVis single-file layout.

The reverse of diffusers' LDM converters, i.e. the mapping of diffusers'
``scripts/convert_diffusers_to_original_stable_diffusion.py`` generalised to any number of
levels and ResBlocks per level: UNet → ``model.diffusion_model.*``, VAE → ``first_stage_model.*``
(attention linears as 1×1 convs), CLIP text encoder → ``cond_stage_model.transformer.text_model.*``.
Works on meta tensors too (shapes only), so SD 1.5-sized layouts cost no memory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"),
               ("time_emb_proj", "emb_layers.1"), ("norm2", "out_layers.0"),
               ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                 ("to_out.0", "proj_out"))
UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_FIXED = {"conv_norm_out": "norm_out"}


def _rename(key: str, prefix_from: str, prefix_to: str, pairs: tuple[tuple[str, str], ...] = ()
            ) -> str:
    """``prefix_from + rest`` → ``prefix_to + rest``, the first matching pair renamed in rest."""
    rest = key[len(prefix_from):]
    for old, new in pairs:
        if rest.startswith(old + "."):
            rest = new + rest[len(old):]
            break
    return prefix_to + rest


def _unet_map(key: str, layers: int, levels: int) -> str:
    """One diffusers UNet key → its LDM key (no prefix)."""
    parts = key.split(".")
    for old, new in UNET_FIXED.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    if parts[0] == "down_blocks":
        i = int(parts[1])
        base = 1 + i * (layers + 1)
        if parts[2] == "downsamplers":
            return _rename(key, f"down_blocks.{i}.downsamplers.0.conv",
                           f"input_blocks.{base + layers}.0.op")
        j, kind = int(parts[3]), parts[2]
        sub = 0 if kind == "resnets" else 1
        return _rename(key, f"down_blocks.{i}.{kind}.{j}.", f"input_blocks.{base + j}.{sub}.",
                       UNET_RESNET if kind == "resnets" else ())
    if parts[0] == "mid_block":
        j, kind = int(parts[2]), parts[1]
        n = 2 * j if kind == "resnets" else 1
        return _rename(key, f"mid_block.{kind}.{j}.", f"middle_block.{n}.",
                       UNET_RESNET if kind == "resnets" else ())
    if parts[0] == "up_blocks":
        i = int(parts[1])
        base = i * (layers + 1)
        if parts[2] == "upsamplers":
            raise AssertionError("handled by _unet_upsampler")
        j, kind = int(parts[3]), parts[2]
        sub = 0 if kind == "resnets" else 1
        return _rename(key, f"up_blocks.{i}.{kind}.{j}.", f"output_blocks.{base + j}.{sub}.",
                       UNET_RESNET if kind == "resnets" else ())
    raise KeyError(f"unmapped UNet key {key}")


def unet_to_ldm(unet: torch.nn.Module) -> dict[str, Tensor]:
    """diffusers ``UNet2DConditionModel`` → ``model.diffusion_model.*`` state dict."""
    layers = int(unet.config.layers_per_block)
    levels = len(unet.config.block_out_channels)
    out: dict[str, Tensor] = {}
    for key, value in unet.state_dict().items():
        if key.startswith("up_blocks.") and ".upsamplers." in key:
            i = int(key.split(".")[1])
            base = i * (layers + 1) + layers
            has_attn = hasattr(unet.up_blocks[i], "attentions")
            new = _rename(key, f"up_blocks.{i}.upsamplers.0.conv",
                          f"output_blocks.{base}.{2 if has_attn else 1}.conv")
        else:
            new = _unet_map(key, layers, levels)
        out["model.diffusion_model." + new] = value
    return out


def _vae_map(key: str, levels: int) -> str:
    """One diffusers VAE key → its LDM key (no prefix)."""
    coder, rest = key.split(".", 1) if key.startswith(("encoder.", "decoder.")) else ("", key)
    parts = rest.split(".")
    head = f"{coder}." if coder else ""
    if parts[0] in VAE_FIXED:
        return head + VAE_FIXED[parts[0]] + rest[len(parts[0]):]
    if parts[0] in ("down_blocks", "up_blocks"):
        i = int(parts[1])
        ldm_i = i if parts[0] == "down_blocks" else levels - 1 - i
        name = "down" if parts[0] == "down_blocks" else "up"
        if parts[2] == "resnets":
            return _rename(rest, f"{parts[0]}.{i}.resnets.", f"{head}{name}.{ldm_i}.block.",
                           ()).replace("conv_shortcut", "nin_shortcut")
        sampler = "downsample" if name == "down" else "upsample"
        return _rename(rest, f"{parts[0]}.{i}.{parts[2]}.0.", f"{head}{name}.{ldm_i}.{sampler}.")
    if parts[0] == "mid_block":
        j = int(parts[2])
        if parts[1] == "resnets":
            return _rename(rest, f"mid_block.resnets.{j}.", f"{head}mid.block_{j + 1}.")
        return _rename(rest, "mid_block.attentions.0.", f"{head}mid.attn_1.", VAE_ATTENTION)
    return head + rest


def vae_to_ldm(vae: torch.nn.Module) -> dict[str, Tensor]:
    """diffusers ``AutoencoderKL`` → ``first_stage_model.*`` (attention linears as 1×1 convs)."""
    levels = len(vae.config.block_out_channels)
    out: dict[str, Tensor] = {}
    for key, value in vae.state_dict().items():
        new = _vae_map(key, levels)
        if ".mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(text_encoder: torch.nn.Module, position_ids: bool = True) -> dict[str, Tensor]:
    """transformers ``CLIPTextModel`` → ``cond_stage_model.transformer.text_model.*``; with
    ``position_ids`` the int64 buffer older checkpoints carry is added, as in SD 1.5's file."""
    out: dict[str, Tensor] = {}
    for key, value in text_encoder.state_dict().items():
        rest = key.removeprefix("text_model.")
        out["cond_stage_model.transformer.text_model." + rest] = value
    if position_ids:
        n = int(text_encoder.config.max_position_embeddings)
        device = next(iter(out.values())).device
        out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(
            n, device=device)[None]
    return out


def sd1_to_ldm(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module
               ) -> dict[str, Tensor]:
    """The whole single-file state dict."""
    return {**unet_to_ldm(unet), **vae_to_ldm(vae), **clip_to_ldm(text_encoder)}


def save_ldm_checkpoint(path: str | Path, model: Any, config: Mapping[str, Any] | None = None
                        ) -> Path:
    """Save an ``SD1Model``'s weights as one LDM-layout ``.safetensors`` (contiguous copies);
    ``config`` goes into the ``nti_core.sd1_config`` metadata entry when given."""
    from safetensors.torch import save_file

    from nti_core.hosts.diffusers.single_file import CONFIG_METADATA_KEY

    state = sd1_to_ldm(model.unet, model.vae, model.text_encoder)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    metadata = {CONFIG_METADATA_KEY: json.dumps(config)} if config else None
    save_file(state, str(path), metadata=metadata)
    return Path(path)
