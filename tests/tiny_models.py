"""Tiny random-weight models of each family, built from diffusers' and transformers' own classes in
seconds: SD 1.x, SD 2.x and SDXL shaped pipelines (``SDModel``), a CLIP vision encoder, and a
writer of diffusers folders that the real loader reads back. For tests and benchmarks only."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from nti_core.family import SD2, SDXL, TOKENS
from nti_core.hosts.diffusers.models import PREDICTION_TYPES, SD1_SCALING, SDModel
from nti_core.schedule import scaled_linear_alphas_cumprod, zero_terminal_snr
from nti_core.tokenizer import sd1_clip_tokenizer

EPS_GAIN = 0.1  # tiny models: output scale of the random UNet (ε-prediction)
V_GAIN = 0.3  # … and of a v-prediction one (see _quiet_unet)
LATENT_GAIN = 18.5  # tiny models: brings the random VAE's photo latents to unit scale (×0.18215)


def _tiny_vae(scaling: float):
    """The tiny models' VAE (×8, 4 latent channels): latents of unit scale after ×``scaling``."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
        scaling_factor=scaling,
    )
    gain = LATENT_GAIN * (SD1_SCALING / scaling)  # exactly LATENT_GAIN for SD's 0.18215
    with torch.no_grad():
        # Photo latents of SD's VAE have about unit scale after scaling; so should the tiny VAE's.
        vae.quant_conv.weight.mul_(gain)
        vae.quant_conv.bias.mul_(gain)
        vae.post_quant_conv.weight.div_(gain)
    return vae


def _tiny_clip(width: int, projection: int = 0, layers: int = 2):
    """A small CLIP text encoder of ``width`` (heads of 64 channels, SD's vocabulary and 77
    positions), with a ``projection``-wide text projection when given (SDXL's second)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=layers, num_attention_heads=width // 64,
                            max_position_embeddings=TOKENS, vocab_size=49408,
                            hidden_act="quick_gelu" if width == 768 else "gelu",
                            projection_dim=projection or 512)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _quiet_unet(unet, prediction: str = "eps") -> None:
    """A random UNet is chaotic in z: DDIM inversion of it diverges even at guidance 1. Scaling
    its output makes the prediction a contraction, as a trained denoiser is near its data.

    A v-prediction model's ε = √ᾱ·v + √(1−ᾱ)·z is mostly its z part at high noise, a
    contraction already; there the text reaches ε only through √ᾱ·v, so v is scaled less
    (measured on the tiny models at 128², 6 steps: null-text's gain over DDIM 2× with v scaled
    like ε, 6–19× with ``V_GAIN``)."""
    gain = V_GAIN if prediction == "v" else EPS_GAIN
    with torch.no_grad():
        unet.conv_out.weight.mul_(gain)
        unet.conv_out.bias.mul_(gain)


def _alphas(zero_snr: bool) -> Tensor:
    a = scaled_linear_alphas_cumprod()
    return zero_terminal_snr(a) if zero_snr else a


def tiny_sd1(seed: int = 0, device: str | torch.device = "cpu") -> SDModel:
    """A small random-weight SD1-shaped model (4 latent channels, 768-d cross-attention, 8 heads,
    CLIP tokenizer and text encoder layout, VAE ×8 with scaling 0.18215) — seconds to build."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=1,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = _tiny_vae(SD1_SCALING)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(hidden_size=768, intermediate_size=1536, num_hidden_layers=2,
                       num_attention_heads=12, max_position_embeddings=77, vocab_size=49408)
    )
    _quiet_unet(unet)
    return SDModel(unet.to(device), vae.to(device), text_encoder.to(device),
                   sd1_clip_tokenizer().tokenizer, scaled_linear_alphas_cumprod(),
                   f"tiny-sd1(seed={seed})")


def tiny_sd2(seed: int = 0, prediction: str = "v", zero_snr: bool = False,
             device: str | torch.device = "cpu") -> SDModel:
    """A small random-weight SD2-shaped model: 1024-wide cross-attention with linear projections
    and heads of 64 channels, a 1024-wide CLIP text encoder (2 layers), SD's VAE layout."""
    from diffusers import UNet2DConditionModel

    family = SD2.with_schedule(prediction, zero_snr)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(64, 64, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=1,
        cross_attention_dim=SD2.context_dim,
        attention_head_dim=1,  # diffusers' name for the head count: one of 64 channels
        use_linear_projection=True,
        norm_num_groups=32,
    )
    vae = _tiny_vae(SD2.latent_scale)
    text_encoder = _tiny_clip(SD2.context_dim)
    _quiet_unet(unet, prediction)
    return SDModel(unet.to(device), vae.to(device), text_encoder.to(device),
                   sd1_clip_tokenizer().tokenizer, _alphas(zero_snr),
                   f"tiny-sd2(seed={seed})", family)


def tiny_sdxl(seed: int = 0, prediction: str = "eps", zero_snr: bool = False,
              device: str | torch.device = "cpu") -> SDModel:
    """A small random-weight SDXL-shaped model: no attention at full resolution, transformer depth
    2 at the lowest level and in the middle, 2048-wide cross-attention (linear projections, heads
    of 64 channels), the text_time vector input (pooled 1280 + 6 size ids × 256 = 2816), CLIP-L
    768 and OpenCLIP-G-shaped 1280 text encoders (2 layers each, one tokenizer for both), VAE
    scaling 0.13025."""
    from diffusers import UNet2DConditionModel

    family = SDXL.with_schedule(prediction, zero_snr)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=SDXL.context_dim,
        attention_head_dim=(1, 1, 2),  # head counts: 64 channels each
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=SDXL.pooled_dim + 6 * 256,
        norm_num_groups=32,
    )
    vae = _tiny_vae(SDXL.latent_scale)
    text_encoder = _tiny_clip(768)
    text_encoder_2 = _tiny_clip(1280, projection=SDXL.pooled_dim)
    _quiet_unet(unet, prediction)
    tokenizer = sd1_clip_tokenizer().tokenizer
    return SDModel(unet.to(device), vae.to(device), text_encoder.to(device), tokenizer,
                   _alphas(zero_snr), f"tiny-sdxl(seed={seed})", family,
                   text_encoder_2.to(device), tokenizer)


def save_pipeline(model: SDModel, folder: str | Path) -> Path:
    """Write ``model`` as a diffusers folder (``save_pretrained`` of a StableDiffusionPipeline or
    StableDiffusionXLPipeline; DDIM scheduler with the family's prediction type and zero-SNR flag,
    no safety checker) that :func:`load_model` reads back."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    f = model.family
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
        prediction_type={v: k for k, v in PREDICTION_TYPES.items()}[f.prediction],
        rescale_betas_zero_snr=f.zero_snr, timestep_spacing="trailing" if f.zero_snr else "leading",
    )
    parts = {"vae": model.vae, "text_encoder": model.text_encoder, "tokenizer": model.tokenizer,
             "unet": model.unet, "scheduler": scheduler}
    if f.pooled_dim:
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=model.text_encoder_2,
                                         tokenizer_2=model.tokenizer_2, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    out = Path(folder)
    pipe.save_pretrained(out)
    return out



def tiny_clip_vision(seed: int = 0, width: int = 768, layers: int = 2, image_size: int = 224,
                     patch: int = 16):
    """A random-weight CLIP vision model with ViT-B/16's token layout (197 × 768 at 224 px)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                           num_attention_heads=12 if width % 12 == 0 else 4,
                           image_size=image_size, patch_size=patch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModel(cfg)
    return model.eval().requires_grad_(False)
