"""Full-size UNets with random weights, built from diffusers' own classes and the published
configs (no download): what the memory bench, the precision bench and the GPU check run.

The configs are those of the ``unet/config.json`` files of runwayml/stable-diffusion-v1-5,
stabilityai/stable-diffusion-2-1 and stabilityai/stable-diffusion-xl-base-1.0 (the fields that
differ from ``UNet2DConditionModel``'s defaults).
"""

from __future__ import annotations

from typing import Any

import torch

SD15: dict[str, Any] = {
    "sample_size": 64, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768, "attention_head_dim": 8,
}
SD21: dict[str, Any] = {
    **SD15, "sample_size": 96, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
}
SDXL: dict[str, Any] = {
    "sample_size": 128, "block_out_channels": (320, 640, 1280), "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
CONFIGS = {"sd1": SD15, "sd2": SD21, "sdxl": SDXL}
SIDES = {"sd1": 512, "sd2": 768, "sdxl": 1024}  # the image side each family was trained at


def random_unet(family: str, seed: int = 0, device: str | torch.device = "cpu"):
    """``UNet2DConditionModel`` of ``family`` with diffusers' own random initialisation (seeded,
    fp32, made on ``device``), its last conv scaled so that ε has unit standard deviation on a
    random 8×8 latent — the size of a trained model's ε, not a random network's (~0.3)."""
    from diffusers import UNet2DConditionModel

    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**CONFIGS[family]).eval().requires_grad_(False)
        z = torch.randn(1, 4, 8, 8)
        context = torch.randn(1, 77, CONFIGS[family]["cross_attention_dim"])
        extra = {}
        if "addition_embed_type" in CONFIGS[family]:
            extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 1280),
                                          "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        std = float(unet(z, 500, encoder_hidden_states=context, **extra).sample.std())
        unet.conv_out.weight.div_(std)
        unet.conv_out.bias.div_(std)
    return unet


def meta_unet(family: str):
    """The same architecture on the meta device: shapes only, no memory, no initialisation."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**CONFIGS[family]).eval().requires_grad_(False)
