"""SD 1.x, SD 2.x and SDXL parts for the diffusers host: a user's checkpoint (a diffusers folder, or
an SD 1.x single file) or a small random-weight model of each family that needs no download (the
CLI demo and the tests).

What a folder holds is read from its JSON files before diffusers is imported (its import is slow
and chatty): ``model_index.json`` names the pipeline class, ``unet/config.json`` the text width
(SD 1.x 768, SD 2.x 1024), ``scheduler/scheduler_config.json`` the prediction type and whether
the schedule was rescaled to zero terminal SNR.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...family import SD1, SD2, SDXL, SUPPORTED, Family
from ...finite import check_finite
from ...schedule import scaled_linear_alphas_cumprod, zero_terminal_snr
from ...tokenizer import HFTokenizer, from_hf
from .denoiser import DiffusersDenoiser
from .single_file import check_sd1_family, read_header, write_sd1_config

log = logging.getLogger(__name__)

SD1_SCALING = 0.18215
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v"}  # diffusers' names → Family's
PIPELINES = {"StableDiffusionPipeline": (SD1, SD2), "StableDiffusionXLPipeline": (SDXL,)}
WEIGHTS = ("unet", "vae", "text_encoder")  # the parts with weights (SDXL: also text_encoder_2)


@dataclass
class SDModel:
    """UNet, VAE, text encoder(s) and tokenizer(s) of one SD 1.x / 2.x / XL model on one device.

    SDXL has two text encoders (``text_encoder`` CLIP-L 768 wide, ``text_encoder_2`` OpenCLIP-G
    1280 wide with a projection) and two tokenizers of the same vocabulary.
    """

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any  # a transformers CLIPTokenizer
    alphas_cumprod: Tensor
    name: str
    family: Family = SD1
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: Any = None

    def __post_init__(self) -> None:
        self._check_text_encoders()
        self.denoiser = DiffusersDenoiser(self.unet, self.alphas_cumprod, self.family)
        for m in (self.vae, self.text_encoder, self.text_encoder_2):
            if m is not None:
                m.requires_grad_(False).eval()
        self.unet.eval()
        self.latent_scale = float(self.vae.config.scaling_factor)
        if self.latent_scale != self.family.latent_scale:
            log.warning("%s: VAE scaling factor %g, not %s's %g: using the VAE's", self.name,
                        self.latent_scale, self.family.name, self.family.latent_scale)

    def _check_text_encoders(self) -> None:
        f, te, te2 = self.family, self.text_encoder, self.text_encoder_2
        if not f.pooled_dim:
            if te2 is not None or self.tokenizer_2 is not None:
                raise ValueError(f"{f.name} has one text encoder, got a second one")
            if int(te.config.hidden_size) != f.context_dim:
                raise ValueError(f"{f.name} needs a {f.context_dim}-wide text encoder, got "
                                 f"{te.config.hidden_size}")
            return
        if te2 is None or self.tokenizer_2 is None:
            raise ValueError(f"{f.name} needs two text encoders and two tokenizers")
        width = int(te.config.hidden_size) + int(te2.config.hidden_size)
        projection = getattr(te2.config, "projection_dim", None)
        if width != f.context_dim or projection != f.pooled_dim:
            raise ValueError(f"{f.name} needs text encoders of {f.context_dim} states together "
                             f"and a {f.pooled_dim}-wide projection, got {width} and {projection}")

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    def _ids(self, tokenizer: Any, text: str) -> Tensor:
        n = int(self.text_encoder.config.max_position_embeddings)
        ids = tokenizer(text, padding="max_length", max_length=n, truncation=False,
                        return_tensors="pt").input_ids
        if ids.shape[1] > n:
            raise ValueError(
                f"the prompt has {ids.shape[1]} tokens; {self.family.name} reads at most {n} "
                f"(with start and end): shorten {text[:40]!r}…"
            )
        return ids

    @torch.no_grad()
    def encode_prompt(self, text: str) -> Tensor:
        """Prompt → the family's embedding [1, 77 (+1), D] (see :mod:`nti_core.family`).

        SD 1.x / 2.x: the text encoder's last hidden state (diffusers' SD 2.x text encoder has
        23 layers: ComfyUI's penultimate layer of OpenCLIP-H with the final norm). SDXL: the
        penultimate hidden states of CLIP-L and OpenCLIP-G side by side [1, 77, 2048] and
        OpenCLIP-G's projected pooled vector [1, 1280], packed into [1, 78, 2048].

        The empty prompt "" is encoded the same way, never replaced by zeros: that is what
        ComfyUI does with an empty negative prompt, and what ∅ starts from. (diffusers' SDXL
        pipeline, with ``force_zeros_for_empty_prompt``, would use zeros for it instead.)
        """
        ids = self._ids(self.tokenizer, text).to(self.device)
        if not self.family.pooled_dim:
            return self.text_encoder(ids)[0].float()
        assert self.text_encoder_2 is not None
        ids_2 = self._ids(self.tokenizer_2, text).to(self.device)
        _check_same_ids(ids, ids_2, int(self.tokenizer.eos_token_id), text)
        states = self.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        out_2 = self.text_encoder_2(ids_2, output_hidden_states=True)
        tokens = torch.cat([states, out_2.hidden_states[-2]], dim=-1).float()
        return self.family.pack(tokens, out_2.text_embeds.float())

    def plan_tokenizer(self) -> HFTokenizer:
        """The folder's own tokenizer, as the edit plan reads it."""
        return from_hf(self.tokenizer)

    @torch.no_grad()
    def encode_image(self, x: Tensor) -> Tensor:
        """[1, 3, H, W] in [−1, 1] → z₀ = mean of the VAE posterior · the VAE's scaling factor
        (0.18215 for SD 1.x / 2.x, 0.13025 for SDXL; REFERENCE §1)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an RGB image [1, 3, H, W], got {tuple(x.shape)}")
        if x.shape[2] % 8 or x.shape[3] % 8:
            raise ValueError(f"image sides must be multiples of 8, got {x.shape[2]}×{x.shape[3]}")
        vae_dtype = next(self.vae.parameters()).dtype
        mean = self.vae.encode(x.to(self.device, vae_dtype)).latent_dist.mean
        check_finite("VAE encode", dtype=vae_dtype, **{"the photo's latent": mean})
        return mean.float() * self.latent_scale

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Latents [B, 4, h, w] → images [B, 3, 8h, 8w] in [−1, 1]."""
        vae_dtype = next(self.vae.parameters()).dtype
        x = self.vae.decode(z.to(self.device, vae_dtype) / self.latent_scale).sample
        check_finite("VAE decode", dtype=vae_dtype, **{"the decoded image": x})
        return x.float().clamp(-1, 1)


SD1Model = SDModel  # the name before SD 2.x and SDXL


def _check_same_ids(ids: Tensor, ids_2: Tensor, eos: int, text: str) -> None:
    """SDXL's two tokenizers share one vocabulary and differ only in padding: their ids must agree
    up to and including the first EOS."""
    row, row_2 = ids[0].tolist(), ids_2[0].tolist()
    end = row.index(eos) + 1 if eos in row else len(row)
    if row[:end] != row_2[:end]:
        at = next(k for k, (a, b) in enumerate(zip(row[:end], row_2[:end])) if a != b)
        raise ValueError(f"SDXL's two tokenizers disagree on {text[:40]!r} at token {at} "
                         f"({row[at]} vs {row_2[at]}): they must share one vocabulary")


# ------------------------------------------------------------------------------ loading


def _dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path} is not a JSON object")
    return value


def folder_family(folder: str | Path) -> Family:
    """The family of a diffusers folder, from its JSON files only (no diffusers import): the
    pipeline class, the UNet's text width and vector input, the scheduler's prediction type and
    zero-terminal-SNR flag. Anything else is refused, naming what was found."""
    p = Path(folder)
    index = _read_json(p / "model_index.json")
    cls = index.get("_class_name")
    if cls not in PIPELINES:
        raise ValueError(f"{p.name} holds a {cls} (model_index.json); this pack supports "
                         f"{SUPPORTED}: a StableDiffusionPipeline or StableDiffusionXLPipeline "
                         "folder")
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") + (
            ("text_encoder_2", "tokenizer_2") if cls == "StableDiffusionXLPipeline" else ()):
        entry = index.get(part)
        if not isinstance(entry, list) or entry[0] is None:
            raise ValueError(f"{p.name} ({cls}) has no {part} (an SDXL refiner has no first text "
                             f"encoder); this pack supports {SUPPORTED}")
    unet = _read_json(p / "unet" / "config.json")
    width = unet.get("cross_attention_dim")
    found = [f for f in PIPELINES[cls] if f.context_dim == width]
    if not found:
        raise ValueError(f"{p.name}: a {cls} whose UNet reads {width}-wide text states, which no "
                         f"supported family has; this pack supports {SUPPORTED}")
    family = found[0]
    if unet.get("in_channels", 4) != family.latent_channels:
        raise ValueError(f"{p.name}: the UNet takes {unet.get('in_channels')} input channels, not "
                         f"{family.latent_channels} (an inpainting or depth model); this pack "
                         f"supports {SUPPORTED}")
    if (unet.get("addition_embed_type") == "text_time") != bool(family.pooled_dim):
        raise ValueError(f"{p.name}: a {family.name} UNet with addition_embed_type "
                         f"{unet.get('addition_embed_type')!r}; this pack supports {SUPPORTED}")
    _, prediction, zero_snr = schedule_of(_read_json(p / "scheduler" / "scheduler_config.json"),
                                          p.name)
    return family.with_schedule(prediction, zero_snr)


def schedule_of(cfg: Any, name: str = "the model") -> tuple[Tensor, str, bool]:
    """A diffusers scheduler config → (ᾱ of the training schedule [T] float64, "eps" | "v",
    zero terminal SNR). The β schedule must be SD's scaled-linear one; ``rescale_betas_zero_snr``
    rescales it (in float64; ᾱ_T = 0, which the grids here never step from: see ``make_grid``).
    ``timestep_spacing`` and ``steps_offset`` are the sampler's business: the grid is chosen
    here (``--grid``)."""
    kind = cfg.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"{name} predicts {kind!r} (its scheduler's prediction_type, not one "
                         f"of {' or '.join(PREDICTION_TYPES)}); this pack supports {SUPPORTED}")
    if cfg.get("beta_schedule", "scaled_linear") != "scaled_linear" or cfg.get("trained_betas"):
        raise ValueError(f"{name}: unsupported beta schedule {cfg.get('beta_schedule')!r}: SD "
                         "1.x, 2.x and XL use scaled_linear")
    alphas = scaled_linear_alphas_cumprod(
        cfg.get("beta_start", 0.00085), cfg.get("beta_end", 0.012),
        cfg.get("num_train_timesteps", 1000),
    )
    zero_snr = bool(cfg.get("rescale_betas_zero_snr", False))
    return (zero_terminal_snr(alphas) if zero_snr else alphas), PREDICTION_TYPES[kind], zero_snr


def check_model_path(path: str | Path) -> Path:
    """The cheap checks of :func:`load_model`, without importing diffusers: the path exists and is
    a diffusers folder of a supported family (:func:`folder_family`) or a readable single-file SD
    1.x ``.safetensors`` (a ``.ckpt`` is refused; an SD 2.x or SDXL single file is refused with
    how to convert it)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no model at {p}")
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise ValueError(f"{p} is not a diffusers folder (no model_index.json)")
        check_safetensors(p, folder_family(p))
    else:
        check_sd1_family(read_header(p)[0], p.name)
    return p


def check_safetensors(folder: Path, family: Family) -> None:
    """Refuse a folder part whose weights are pickles only (``.bin``, ``.pt``): nothing is
    unpickled (the loaders pass ``use_safetensors=True`` too)."""
    for part in WEIGHTS + (("text_encoder_2",) if family.pooled_dim else ()):
        files = sorted(f.name for f in (folder / part).glob("*") if f.suffix != ".json")
        if not any(f.endswith(".safetensors") for f in files):
            raise ValueError(
                f"{folder.name}/{part} has no .safetensors weights (found {files or 'none'}): "
                "pickled weights (.bin, .pt) are not loaded, as unpickling can run code; download "
                "the model's .safetensors files, or convert the folder where you trust it "
                "(diffusers: from_pretrained(folder).save_pretrained(new_folder))")


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: str = "fp32") -> SDModel:
    """A diffusers folder of SD 1.x, SD 2.x or SDXL (model_index.json; family, prediction type and
    zero-SNR flag read from its JSON files) or a single-file SD 1.x checkpoint (.safetensors, LDM
    layout; configs inferred offline by :func:`write_sd1_config`). ``.ckpt`` pickles are refused.

    The path, the folder's JSON files and the file's header are checked before diffusers is
    imported. The UNet runs in ``dtype``; the null-text optimisation casts what it optimises to
    fp32. SDXL's VAE stays in fp32 under fp16 (it overflows in fp16: its ``force_upcast``).
    """
    p = check_model_path(path)
    torch_dtype = _dtype(dtype)
    if not p.is_dir():
        with tempfile.TemporaryDirectory() as config_dir:
            write_sd1_config(config_dir, p)
            from diffusers import StableDiffusionPipeline

            pipe = StableDiffusionPipeline.from_single_file(
                str(p), config=config_dir, torch_dtype=torch_dtype, local_files_only=True,
                safety_checker=None,  # load_safety_checker=False would fetch it from the Hub
            )
        alphas, _, _ = schedule_of(pipe.scheduler.config, p.name)
        return SDModel(pipe.unet.to(device), pipe.vae.to(device), pipe.text_encoder.to(device),
                       pipe.tokenizer, alphas, p.name)
    family = folder_family(p)
    alphas, _, _ = schedule_of(_read_json(p / "scheduler" / "scheduler_config.json"), p.name)
    if family.pooled_dim:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(
            p, torch_dtype=torch_dtype, local_files_only=True, use_safetensors=True,
            add_watermarker=False)
        vae = pipe.vae.to(device)
        if torch_dtype == torch.float16 and pipe.vae.config.get("force_upcast", False):
            vae = vae.to(torch.float32)
        model = SDModel(pipe.unet.to(device), vae, pipe.text_encoder.to(device), pipe.tokenizer,
                        alphas, p.name, family, pipe.text_encoder_2.to(device), pipe.tokenizer_2)
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            p, torch_dtype=torch_dtype, local_files_only=True, use_safetensors=True,
            safety_checker=None)
        model = SDModel(pipe.unet.to(device), pipe.vae.to(device), pipe.text_encoder.to(device),
                        pipe.tokenizer, alphas, p.name, family)
    log.debug("%s: %s", p.name, family.label)
    return model


def load_sd1(path: str | Path, device: str | torch.device = "cpu", dtype: str = "fp32") -> SDModel:
    """:func:`load_model` under its name from before SD 2.x and SDXL (any supported family)."""
    return load_model(path, device, dtype)

