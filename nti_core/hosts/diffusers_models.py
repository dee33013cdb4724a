"""SD 1.x parts for the diffusers host: a user's checkpoint (folder or single file) or a small
random-weight SD1-shaped model that needs no download (the CLI demo and the tests)."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..schedule import scaled_linear_alphas_cumprod
from ..tokenizer import sd1_clip_tokenizer
from .diffusers import DiffusersDenoiser
from .sd1_single_file import read_header, write_sd1_config

log = logging.getLogger(__name__)

SD1_SCALING = 0.18215
EPS_GAIN = 0.1  # tiny_sd1: output scale of the random UNet
LATENT_GAIN = 18.5  # tiny_sd1: brings the random VAE's photo latents to unit scale


@dataclass
class SD1Model:
    """UNet, VAE, text encoder and tokenizer of one SD 1.x model on one device."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object  # a transformers CLIPTokenizer
    alphas_cumprod: Tensor
    name: str

    def __post_init__(self) -> None:
        self.denoiser = DiffusersDenoiser(self.unet, self.alphas_cumprod)
        for m in (self.vae, self.text_encoder):
            m.requires_grad_(False).eval()
        self.unet.eval()

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @torch.no_grad()
    def encode_prompt(self, text: str) -> Tensor:
        """Prompt → [1, 77, 768] (last hidden state of the CLIP text encoder)."""
        n = int(self.text_encoder.config.max_position_embeddings)
        ids = self.tokenizer(text, padding="max_length", max_length=n, truncation=False,
                             return_tensors="pt").input_ids
        if ids.shape[1] > n:
            raise ValueError(
                f"the prompt has {ids.shape[1]} tokens; SD 1.x reads at most {n} "
                f"(with start and end): shorten {text[:40]!r}…"
            )
        return self.text_encoder(ids.to(self.device))[0].float()

    @torch.no_grad()
    def encode_image(self, x: Tensor) -> Tensor:
        """[1, 3, H, W] in [−1, 1] → z₀ = mean of the VAE posterior · 0.18215 (REFERENCE §1)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an RGB image [1, 3, H, W], got {tuple(x.shape)}")
        if x.shape[2] % 8 or x.shape[3] % 8:
            raise ValueError(f"image sides must be multiples of 8, got {x.shape[2]}×{x.shape[3]}")
        vae_dtype = next(self.vae.parameters()).dtype
        mean = self.vae.encode(x.to(self.device, vae_dtype)).latent_dist.mean
        return mean.float() * SD1_SCALING

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Latents [B, 4, h, w] → images [B, 3, 8h, 8w] in [−1, 1]."""
        vae_dtype = next(self.vae.parameters()).dtype
        return self.vae.decode(z.to(self.device, vae_dtype) / SD1_SCALING).sample.float().clamp(-1, 1)


def tiny_sd1(seed: int = 0, device: str | torch.device = "cpu") -> SD1Model:
    """A small random-weight SD1-shaped model (4 latent channels, 768-d cross-attention, 8 heads,
    CLIP tokenizer and text encoder layout, VAE ×8 with scaling 0.18215) — seconds to build."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
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
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
        scaling_factor=SD1_SCALING,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(hidden_size=768, intermediate_size=1536, num_hidden_layers=2,
                       num_attention_heads=12, max_position_embeddings=77, vocab_size=49408)
    )
    with torch.no_grad():
        # A random UNet is chaotic in z: DDIM inversion of it diverges even at guidance 1. Scaling
        # its output makes ε a contraction, as a trained denoiser is near its data.
        unet.conv_out.weight.mul_(EPS_GAIN)
        unet.conv_out.bias.mul_(EPS_GAIN)
        # Photo latents of SD's VAE have about unit scale after ×0.18215; so should the tiny VAE's.
        vae.quant_conv.weight.mul_(LATENT_GAIN)
        vae.quant_conv.bias.mul_(LATENT_GAIN)
        vae.post_quant_conv.weight.div_(LATENT_GAIN)
    model = SD1Model(unet.to(device), vae.to(device), text_encoder.to(device),
                     sd1_clip_tokenizer().tokenizer, scaled_linear_alphas_cumprod(), f"tiny-sd1(seed={seed})")
    return model


def _dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def check_model_path(path: str | Path) -> Path:
    """The cheap checks of :func:`load_sd1`, without importing diffusers: the path exists and is
    a diffusers folder or a readable single-file ``.safetensors`` (a ``.ckpt`` is refused)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no model at {p}")
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise ValueError(f"{p} is not a diffusers folder (no model_index.json)")
    else:
        read_header(p)
    return p


def load_sd1(path: str | Path, device: str | torch.device = "cpu", dtype: str = "fp32") -> SD1Model:
    """A diffusers folder (model_index.json) or a single-file SD 1.x checkpoint (.safetensors, LDM
    layout; configs inferred offline by :func:`write_sd1_config`). ``.ckpt`` pickles are refused.

    The path and the file's header are checked before diffusers is imported (its import is slow
    and chatty). The UNet runs in ``dtype``; the null-text optimisation casts what it optimises
    to fp32.
    """
    p = check_model_path(path)
    torch_dtype = _dtype(dtype)
    if p.is_dir():
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            p, torch_dtype=torch_dtype, local_files_only=True, safety_checker=None
        )
    else:
        with tempfile.TemporaryDirectory() as config_dir:
            write_sd1_config(config_dir, p)
            from diffusers import StableDiffusionPipeline

            pipe = StableDiffusionPipeline.from_single_file(
                str(p), config=config_dir, torch_dtype=torch_dtype, local_files_only=True,
                safety_checker=None,  # load_safety_checker=False would fetch it from the Hub
            )
    return SD1Model(pipe.unet.to(device), pipe.vae.to(device), pipe.text_encoder.to(device),
                    pipe.tokenizer, _training_alphas(pipe.scheduler.config), p.name)


def _training_alphas(cfg) -> Tensor:
    """ᾱ of the model's training schedule in float64 (schedulers keep float32); ε-prediction only."""
    if cfg.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"this model predicts {cfg['prediction_type']!r}; nti_core supports "
                         "SD 1.x ε-prediction models only")
    if cfg.get("beta_schedule", "scaled_linear") != "scaled_linear" or cfg.get("trained_betas"):
        raise ValueError(f"unsupported beta schedule {cfg.get('beta_schedule')!r}: SD 1.x uses "
                         "scaled_linear")
    return scaled_linear_alphas_cumprod(
        cfg.get("beta_start", 0.00085), cfg.get("beta_end", 0.012),
        cfg.get("num_train_timesteps", 1000),
    )
