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


def random_unet(family: str, seed: int = 0, device: str | torch.device = "cpu",
                text_gain: float = 0.1, eps_std: float = 0.1):
    """``UNet2DConditionModel`` of ``family`` with diffusers' own random initialisation (seeded,
    fp32, made on ``device``), scaled so that inversion means what it means for a trained model:
    the cross-attention outputs × ``text_gain``, so that the prompt moves ε by ~2 % (random:
    ~20 %, which guidance 7.5 turns into swings no optimisation follows; the demo model: 2 % at
    t = 981, 11 % at t = 501), and the last conv so that ε has standard deviation ``eps_std``
    on a random 8×8 latent — at 0.1 DDIM's round trip is as exact as a trained model's (latent
    MSE 0.03 at 6 steps, the demo model's 0.04), at 1.0 it is not (6.5: a random network is no
    denoiser, its ε jumps between steps).
    """
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
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.to_out[0].weight.mul_(text_gain)
                module.to_out[0].bias.mul_(text_gain)
        std = float(unet(z, 500, encoder_hidden_states=context, **extra).sample.std())
        unet.conv_out.weight.mul_(eps_std / std)
        unet.conv_out.bias.mul_(eps_std / std)
    return unet


def meta_unet(family: str):
    """The same architecture on the meta device: shapes only, no memory, no initialisation."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**CONFIGS[family]).eval().requires_grad_(False)
