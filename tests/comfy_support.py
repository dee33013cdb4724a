"""Small checkpoints for tests, built from ComfyUI's own classes (no downloads).

Each checkpoint is a real single-file ``.safetensors`` that ``comfy.sd.load_checkpoint_guess_config``
detects as its family; weights are random, deterministic given (spec, seed), stored fp16, with a
TAESD-shaped VAE:

- SD15 (``TinySpec()``, the default): a two-level UNet with ``model_channels`` 320 and
  ``context_dim`` 768 (about 37 M parameters) and a random CLIP-L (the SD1 text encoder config is
  fixed): ~325 MB, of which the CLIP-L encoder is 247 MB.
- SD20 (``SD2_V_SPEC`` / ``SD2_EPS_SPEC``, ``sd2_spec``): context 1024, linear projections, heads of
  64 channels, three 320-wide levels × 3 res blocks with attention at latent and latent/4 (112 M
  parameters), CLIP-H (354 M): ~0.9 GB. v or ε through the std of the
  ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` ComfyUI reads.
- SDXL (``SDXL_SPEC`` / ``SDXL_V_SPEC``, ``sdxl_spec``): the scaled-down SDXL, three 320-wide levels,
  input transformer depth 0, 0, 2, 2, 10, 10 (what detection matches), middle depth 1, no
  output-side attention (140 M parameters), CLIP-L + CLIP-G (818 M): ~1.8 GB. v / zero-SNR through
  the ``v_pred`` / ``ztsnr`` marker keys.

``diffusers_unet`` builds a ``UNet2DConditionModel`` holding the same UNet weights, mapped with
``comfy.utils.unet_to_diffusers``; ``cached_checkpoint`` names files by family and content key.

Shapes come from ComfyUI's modules instantiated on the ``meta`` device; the values are ours.
ComfyUI is found through the ``COMFYUI_PATH`` environment variable; nothing here imports ComfyUI
(or diffusers) before a function that needs it is called.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

COMFYUI_ENV = "COMFYUI_PATH"
CACHE_ENV = "NTI_TEST_CACHE"  # optional persistent cache directory for generated checkpoints
DEFAULT_SEED = 1234
DEFAULT_NAME = "nti_tiny_sd15.safetensors"
UNET_PREFIX = "model.diffusion_model."


# --------------------------------------------------------------------------- finding ComfyUI


def comfy_path() -> Path | None:
    """The ComfyUI checkout named by $COMFYUI_PATH, or None when unset."""
    value = os.environ.get(COMFYUI_ENV, "").strip()
    return Path(value) if value else None


def import_comfy(path: Path | None = None) -> Path:
    """Make ``comfy`` importable in this process, CPU only.

    Puts the checkout on sys.path and sets ``comfy.cli_args.args.cpu = True`` before
    ``comfy.model_management`` is imported (cli_args parses no argv unless
    ``comfy.options.enable_args_parsing()`` was called, so its ``args`` can be edited).
    """
    root = path or comfy_path()
    if root is None:
        raise RuntimeError(f"set {COMFYUI_ENV} to a ComfyUI checkout")
    if not (root / "comfy" / "model_management.py").is_file():
        raise RuntimeError(f"{COMFYUI_ENV}={root} is not a ComfyUI checkout (no comfy/)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    already = "comfy.model_management" in sys.modules
    import comfy.cli_args

    if already and not comfy.cli_args.args.cpu:
        log.warning("comfy.model_management was imported before --cpu could be set")
    comfy.cli_args.args.cpu = True
    return root


# --------------------------------------------------------------------------- the tiny model

FAMILIES = ("sd15", "sd2", "sdxl")  # ComfyUI's SD15, SD20 and SDXL (comfy/supported_models.py)
PREDICTIONS = ("eps", "v")
# What ComfyUI's detection matches per family, besides what every family here shares (4 in/out
# channels, no temporal layers). SD2 and SDXL also get num_heads -1 / num_head_channels 64 from
# ComfyUI (unet_extra_config): the spec must agree. The SD1 spec checks only the fields added
# for SD2 / SDXL, as before (its model_channels 320 / context_dim 768 are documented defaults).
FAMILY_FIELDS: dict[str, dict[str, Any]] = {
    "sd15": {"use_linear": False, "adm_in_channels": None, "num_head_channels": -1},
    "sd2": {"model_channels": 320, "context_dim": 1024, "use_linear": True, "adm_in_channels": None,
            "num_head_channels": 64, "num_heads": -1},
    "sdxl": {"model_channels": 320, "context_dim": 2048, "use_linear": True, "adm_in_channels": 2816,
             "num_head_channels": 64, "num_heads": -1},
}
SDXL_TRANSFORMER_DEPTH = (0, 0, 2, 2, 10, 10)  # SDXL detection compares the input side exactly
# SD20.model_type: V_PREDICTION when std(<this bias>) > 0.09 (unbiased=False), else EPS.
SD2_V_KEY = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_V_STD = 0.2  # the v variant's std for that bias; the ε variant keeps the usual 0.02
SDXL_V_MARKER = "v_pred"  # SDXL.model_type: V_PREDICTION when this key is in the state dict,
SDXL_ZSNR_MARKER = "ztsnr"  # and zero-terminal-SNR sampling when this one is there too


@dataclass(frozen=True)
class TinySpec:
    """A small UNet (SD1, SD2 or SDXL family): per-level transformer depth (0 = resnets only),
    per-level output-side depth (None = as the input side) and middle depth.

    Default (SD1): level 0 (full latent resolution) has attention, level 1 (half) has none, the
    middle block (half) has one transformer: transformer blocks input 1, middle 0, output 2 and 3.
    The family fields (``family`` and after) select ComfyUI's model config, text encoder and
    marker keys; see ``sd2_spec`` / ``sdxl_spec`` for valid SD2 and SDXL layouts.
    """

    channel_mult: tuple[int, ...] = (1, 1)
    num_res_blocks: int = 1
    level_depth: tuple[int, ...] = (1, 0)
    middle_depth: int = 1
    model_channels: int = 320  # SD15 detection needs 320
    context_dim: int = 768  # and 768
    num_heads: int = 8
    # Fields added for SD2 / SDXL: key() leaves them out while they hold these defaults, so the
    # SD1 specs keep their cache file names.
    family: str = "sd15"
    use_linear: bool = False  # use_linear_in_transformer
    num_head_channels: int = -1  # > 0: heads = channels // num_head_channels (num_heads -1)
    adm_in_channels: int | None = None  # SDXL: 2816 (pooled 1280 + 6 × 256 size embeddings)
    output_depth: tuple[int, ...] | None = None  # per level, for all num_res_blocks + 1 blocks
    prediction: str = "eps"  # "v": SD2 via the norm1 bias std, SDXL via the v_pred marker key
    zero_snr: bool = False  # SDXL v only: the ztsnr marker key
    out_gain: float = 1.0  # × the UNet's last conv (out.2): 0.1 gives ε of a sane size, so that
    # inversion round trips are meaningful (the fidelity numbers of the family HTTP tests)
    vae_scale: float = 1.0  # TAESD's vae_scale: the random encoder's photo latents are ~0.2 wide;
    # raw std × the family's latent scale (0.18215, SDXL 0.13025) makes them ~unit in model space

    def __post_init__(self) -> None:
        levels = len(self.channel_mult)
        if len(self.level_depth) != levels:
            raise ValueError("level_depth needs one entry per channel_mult level")
        if self.output_depth is not None and len(self.output_depth) != levels:
            raise ValueError("output_depth needs one entry per channel_mult level")
        if self.middle_depth < 1:
            raise ValueError("the middle block needs a transformer (diffusers' mid block has one)")
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        for name, value in FAMILY_FIELDS[self.family].items():
            if getattr(self, name) != value:
                raise ValueError(f"{self.family} needs {name}={value!r}, got {getattr(self, name)!r}")
        if self.family == "sd15" and self.prediction != "eps":
            raise ValueError("ComfyUI's SD15 config is always ε-prediction")
        if self.zero_snr and (self.family != "sdxl" or self.prediction != "v"):
            raise ValueError("zero_snr needs family 'sdxl' and prediction 'v' (ComfyUI reads "
                             "ztsnr only next to v_pred)")
        if self.family == "sdxl" and tuple(self.transformer_depth()) != SDXL_TRANSFORMER_DEPTH:
            raise ValueError(f"ComfyUI detects SDXL only with input transformer depth "
                             f"{list(SDXL_TRANSFORMER_DEPTH)}, got {self.transformer_depth()}")
        if self.family == "sd2" and self.output_block_depth(11) == 0:
            raise ValueError(f"SD2 needs a transformer in output_blocks.11 (ComfyUI reads "
                             f"{SD2_V_KEY} to tell v from ε)")

    # ---------------------------------------------------------------- layout

    def out_depth(self) -> tuple[int, ...]:
        """Output-side transformer depth per level."""
        return self.level_depth if self.output_depth is None else self.output_depth

    def transformer_depth(self) -> list[int]:
        """Per input res block, level 0 first (ComfyUI's ``transformer_depth``)."""
        return [d for d in self.level_depth for _ in range(self.num_res_blocks)]

    def transformer_depth_output(self) -> list[int]:
        """Per output block, level 0 first (ComfyUI's ``transformer_depth_output``)."""
        return [d for d in self.out_depth() for _ in range(self.num_res_blocks + 1)]

    def output_block_depth(self, index: int) -> int:
        """Transformer depth of ``output_blocks.<index>`` (numbered from the deepest level)."""
        level = len(self.channel_mult) - 1 - index // (self.num_res_blocks + 1)
        return self.out_depth()[level] if 0 <= level < len(self.channel_mult) else 0

    def heads(self, level: int) -> int:
        """Attention heads at a level."""
        if self.num_head_channels > 0:
            return self.model_channels * self.channel_mult[level] // self.num_head_channels
        return self.num_heads

    def tag(self) -> str:
        """Family (plus v / zsnr) for file names: sd15, sd2_v, sd2, sdxl, sdxl_v, sdxl_v_zsnr."""
        tag = self.family + ("_v" if self.prediction == "v" and self.family != "sd15" else "")
        return tag + ("_zsnr" if self.zero_snr else "")

    def comfy_unet_config(self) -> dict[str, Any]:
        """Keyword arguments of ComfyUI's ``UNetModel`` (what model_detection would report)."""
        levels = len(self.channel_mult)
        config = {
            "image_size": 32,
            "in_channels": 4,
            "out_channels": 4,
            "model_channels": self.model_channels,
            "num_res_blocks": [self.num_res_blocks] * levels,
            "channel_mult": list(self.channel_mult),
            "transformer_depth": self.transformer_depth(),
            "transformer_depth_output": self.transformer_depth_output(),
            "transformer_depth_middle": self.middle_depth,
            "context_dim": self.context_dim,
            "num_heads": self.num_heads if self.num_head_channels <= 0 else -1,
            "num_head_channels": self.num_head_channels,
            "use_spatial_transformer": True,
            "legacy": False,
            "use_linear_in_transformer": self.use_linear,
            "adm_in_channels": self.adm_in_channels,
            "use_checkpoint": False,
        }
        if self.adm_in_channels is not None:
            config["num_classes"] = "sequential"
        if self.family != "sd15":
            config["use_temporal_resblock"] = False
            config["use_temporal_attention"] = False
        return config

    def diffusers_config(self) -> dict[str, Any]:
        """``UNet2DConditionModel`` config with the same layout (build it with
        ``build_diffusers_unet``: see there for the middle block).

        diffusers' mid block takes the depth of the last level (``transformer_layers_per_block
        [-1]``, or its first entry); levels without attention are plain Down/UpBlock2D whose entry
        is ignored, so the middle depth can sit there. When the last level has attention of
        another depth (SDXL: 10 there, 1 in the middle), ``build_diffusers_unet`` swaps in a mid
        block of ``middle_depth``. Output depths that differ from the input side at a level with
        attention on both sides use diffusers' per-block tuples.
        """
        levels = range(len(self.channel_mult))
        din, dout = self.level_depth, self.out_depth()
        down = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in din]
        up = ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(dout)]
        split = any(a and b and a != b for a, b in zip(din, dout))
        reverse = None
        if split:
            layers: Any = tuple((din[i] or dout[i] or self.middle_depth,) * self.num_res_blocks
                                for i in levels)
            reverse = tuple((dout[i] or self.middle_depth,) * (self.num_res_blocks + 1)
                            for i in reversed(levels))
        else:
            layers = tuple(din[i] or dout[i] or self.middle_depth for i in levels)
        if self.num_head_channels > 0:
            heads: Any = tuple(self.heads(i) for i in levels)
        else:
            heads = self.num_heads
        config = {
            "sample_size": 32,
            "in_channels": 4,
            "out_channels": 4,
            "center_input_sample": False,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "down_block_types": tuple(down),
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "up_block_types": tuple(up),
            "block_out_channels": tuple(self.model_channels * m for m in self.channel_mult),
            "layers_per_block": self.num_res_blocks,
            "downsample_padding": 1,
            "mid_block_scale_factor": 1,
            "act_fn": "silu",
            "norm_num_groups": 32,
            "norm_eps": 1e-5,
            "cross_attention_dim": self.context_dim,
            "transformer_layers_per_block": layers,
            "attention_head_dim": heads,  # diffusers' legacy name: the number of heads
            "use_linear_projection": self.use_linear,
        }
        if reverse is not None:
            config["reverse_transformer_layers_per_block"] = reverse
        if self.adm_in_channels is not None:  # SDXL: pooled text embedding + 6 size embeddings
            config["addition_embed_type"] = "text_time"
            config["addition_time_embed_dim"] = 256
            config["projection_class_embeddings_input_dim"] = self.adm_in_channels
        return config

    def diffusers_mid_depth(self) -> int:
        """The mid block depth diffusers builds from ``diffusers_config()``."""
        last = self.diffusers_config()["transformer_layers_per_block"][-1]
        return last if isinstance(last, int) else last[0]

    def transformer_blocks(self) -> int:
        """Number of BasicTransformerBlocks (each has an attn1 and an attn2)."""
        down = sum(d * self.num_res_blocks for d in self.level_depth)
        up = sum(d * (self.num_res_blocks + 1) for d in self.out_depth())
        return down + self.middle_depth + up

    def key(self, seed: int) -> str:
        """Short content id of (spec, seed) for cache file names."""
        blob = json.dumps({"spec": _key_fields(self), "seed": seed, "v": 1}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


_SD1_FIELDS = ("channel_mult", "num_res_blocks", "level_depth", "middle_depth", "model_channels",
               "context_dim", "num_heads")  # TinySpec's fields before SD2 / SDXL


def _key_fields(spec: TinySpec) -> dict[str, Any]:
    """The spec as hashed by key(): later fields only when they differ from their default."""
    defaults = {f.name: f.default for f in fields(TinySpec)}
    return {k: v for k, v in asdict(spec).items() if k in _SD1_FIELDS or v != defaults[k]}


def sd2_spec(prediction: str = "v", **changes: Any) -> TinySpec:
    """An SD 2.x-format spec ("SD20" to ComfyUI): 320 channels, context 1024, linear proj, heads
    of 64 channels, CLIP-H. Three levels (1, 1, 1) × 3 res blocks, attention at level 0 and at
    level 2 (latent/4), middle depth 1: output_blocks.11 (level 0) has the transformer whose
    norm1 bias tells ComfyUI v from ε."""
    base: dict[str, Any] = {
        "family": "sd2", "channel_mult": (1, 1, 1), "num_res_blocks": 3, "level_depth": (1, 0, 1),
        "middle_depth": 1, "context_dim": 1024, "use_linear": True, "num_heads": -1,
        "num_head_channels": 64, "prediction": prediction, "out_gain": 0.1, "vae_scale": 0.036,
    }
    return TinySpec(**{**base, **changes})


def sdxl_spec(prediction: str = "eps", zero_snr: bool = False, **changes: Any) -> TinySpec:
    """A scaled-down SDXL ("SDXL" to ComfyUI): all three levels 320 wide, 2 res blocks each,
    input transformer depth 0, 2, 10 per level (what detection matches), no output-side
    attention and middle depth 1 (detection reads neither), context 2048, adm 2816, CLIP-L +
    CLIP-G. ``prediction="v"`` (and ``zero_snr``) add ComfyUI's marker keys."""
    base: dict[str, Any] = {
        "family": "sdxl", "channel_mult": (1, 1, 1), "num_res_blocks": 2,
        "level_depth": (0, 2, 10), "output_depth": (0, 0, 0), "middle_depth": 1,
        "context_dim": 2048, "use_linear": True, "num_heads": -1, "num_head_channels": 64,
        "adm_in_channels": 2816, "prediction": prediction, "zero_snr": zero_snr,
        "out_gain": 0.1, "vae_scale": 0.029,
    }
    return TinySpec(**{**base, **changes})


SD2_V_SPEC = sd2_spec("v")
SD2_EPS_SPEC = sd2_spec("eps")
SDXL_SPEC = sdxl_spec()
SDXL_V_SPEC = sdxl_spec("v")


def checkpoint_name(spec: TinySpec = TinySpec()) -> str:
    """A models-folder file name for the family: ``nti_tiny_sd15.safetensors`` (DEFAULT_NAME),
    ``nti_tiny_sd2_v.safetensors``, ``nti_tiny_sdxl.safetensors``, ..."""
    return f"nti_tiny_{spec.tag()}.safetensors"


def _model_config(spec: TinySpec) -> Any:
    import comfy.supported_models as sm

    return {"sd15": sm.SD15, "sd2": sm.SD20, "sdxl": sm.SDXL}[spec.family](
        spec.comfy_unet_config())


def _clip_state_dict(spec: TinySpec) -> dict[str, Tensor]:
    """The text encoder's state dict on ``meta``, keyed as ComfyUI's CLIP object holds it."""
    import comfy.sd1_clip

    if spec.family == "sd15":
        clip = comfy.sd1_clip.SDClipModel(device="meta")
        return {f"clip_l.{k}": v for k, v in clip.state_dict().items()}
    if spec.family == "sd2":
        import comfy.text_encoders.sd2_clip

        return comfy.text_encoders.sd2_clip.SD2ClipModel(device="meta").state_dict()
    import comfy.sdxl_clip

    return comfy.sdxl_clip.SDXLClipModel(device="meta").state_dict()


def _module_layout(spec: TinySpec) -> tuple[dict[str, dict[str, torch.Size]], dict[str, Tensor]]:
    """Parameter shapes per part ("unet", "clip", "vae"), keyed as in the checkpoint file, and
    the tensors the saving conversion gives real values (SDXL's CLIP-L position_ids)."""
    import comfy.ops
    import comfy.taesd.taesd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = _model_config(spec)
    unet = UNetModel(
        **spec.comfy_unet_config(), device="meta", operations=comfy.ops.disable_weight_init
    )
    vae = comfy.taesd.taesd.TAESD()
    parts = {
        "unet": config.process_unet_state_dict_for_saving(unet.state_dict()),
        "clip": config.process_clip_state_dict_for_saving(_clip_state_dict(spec)),
        "vae": config.process_vae_state_dict_for_saving(vae.state_dict()),
    }
    shapes = {name: {k: v.shape for k, v in sd.items()} for name, sd in parts.items()}
    fixed = {k: v for sd in parts.values() for k, v in sd.items()
             if not v.is_meta and not v.is_floating_point()}
    return shapes, fixed


def _module_shapes(spec: TinySpec) -> dict[str, dict[str, torch.Size]]:
    """Parameter shapes per part ("unet", "clip", "vae"), keyed as in the checkpoint file."""
    return _module_layout(spec)[0]


def _init_tensor(key: str, shape: torch.Size, gen: torch.Generator) -> Tensor:
    """Random values with sane scales: N(0, 1/fan_in) weights, unit norm scales, small biases."""
    leaf = key.rsplit(".", 1)[-1]
    if len(shape) == 0:
        return torch.tensor(0.0 if "shift" in key else 1.0)
    if "token_embedding" in key or "position_embedding" in key:
        return torch.randn(shape, generator=gen) * 0.02
    if len(shape) == 1:
        if leaf == "weight":  # GroupNorm / LayerNorm scale
            return 1.0 + 0.1 * torch.randn(shape, generator=gen)
        return 0.02 * torch.randn(shape, generator=gen)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=gen) / math.sqrt(fan_in)


_LAYER = re.compile(r"^(.*)\.(?:resblocks|layers)\.(\d+)\.")
_RESIDUAL_OUT = ("attn.out_proj.weight", "mlp.c_proj.weight", "mlp.fc2.weight")


def _residual_scales(clip_shapes: dict[str, torch.Size]) -> dict[str, float]:
    """1 / sqrt(2 × layers) for the text encoders' residual-writing weights (attention out,
    MLP out), so the residual stream stays near unit scale: SDXL takes the penultimate hidden
    state without the final LayerNorm, where plain N(0, 1/fan_in) weights give std ≈ 4 (CLIP-L)
    and ≈ 6.5 (CLIP-G). The SD1 checkpoints keep their unscaled values."""
    layers: dict[str, int] = {}
    for key in clip_shapes:
        m = _LAYER.match(key)
        if m:
            layers[m[1]] = max(layers.get(m[1], 0), int(m[2]) + 1)
    out = {}
    for key in clip_shapes:
        m = _LAYER.match(key)
        if m and key.endswith(_RESIDUAL_OUT):
            out[key] = 1.0 / math.sqrt(2 * layers[m[1]])
    return out


PARTS = ("unet", "clip", "vae")  # generation order: the UNet's values never depend on the rest


def marker_keys(spec: TinySpec) -> dict[str, Tensor]:
    """The SDXL prediction marker keys ComfyUI reads (empty tensors, as ComfyUI saves them)."""
    out: dict[str, Tensor] = {}
    if spec.family == "sdxl" and spec.prediction == "v":
        out[SDXL_V_MARKER] = torch.tensor([])
        if spec.zero_snr:
            out[SDXL_ZSNR_MARKER] = torch.tensor([])
    return out


def build_state_dict(
    spec: TinySpec = TinySpec(), seed: int = DEFAULT_SEED, parts: tuple[str, ...] = PARTS
) -> dict[str, Tensor]:
    """The checkpoint (UNet, text encoder(s), TAESD VAE), fp16, deterministic in (spec, seed).

    ``parts`` may stop early (e.g. ("unet",)): values of a part do not depend on later parts.
    Specs that differ only in ``prediction`` / ``zero_snr`` give the same values except SD2's
    output_blocks.11 norm1 bias (std 0.2 for v) and SDXL's marker keys (with the UNet part).
    """
    if tuple(parts) != PARTS[: len(parts)]:
        raise ValueError(f"parts must be a prefix of {PARTS}, got {parts}")
    shapes, fixed = _module_layout(spec)
    v_key = UNET_PREFIX + SD2_V_KEY if spec.family == "sd2" and spec.prediction == "v" else None
    residual = {} if spec.family == "sd15" else _residual_scales(shapes["clip"])
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for part in parts:
        for key in sorted(shapes[part]):
            if key in fixed:
                out[key] = fixed[key].clone().contiguous()
                continue
            value = _init_tensor(key, shapes[part][key], gen)
            if key == v_key:  # same number of draws: every other value stays as for ε
                value = value / 0.02 * SD2_V_STD
            if key in residual:
                value = value * residual[key]
            if key.startswith(UNET_PREFIX + "out.2."):
                value = value * spec.out_gain
            if key.endswith(".vae_scale"):
                value = torch.tensor(spec.vae_scale)
            out[key] = value.to(torch.float16).contiguous()
        if part == "unet":
            out.update(marker_keys(spec))
    return out


def write_checkpoint(
    path: Path, spec: TinySpec = TinySpec(), seed: int = DEFAULT_SEED
) -> Path:
    """Write the checkpoint to ``path`` atomically (a temporary file, then rename)."""
    from safetensors.torch import save_file

    start = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = build_state_dict(spec, seed)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    meta = {"nti_test_spec": json.dumps(asdict(spec)), "nti_test_seed": str(seed)}
    save_file(sd, str(tmp), metadata=meta)
    del sd
    os.replace(tmp, path)
    log.info("wrote %s (%.0f MB) in %.1f s", path, path.stat().st_size / 2**20,
             time.perf_counter() - start)
    return path


def cached_checkpoint(
    cache_dir: Path, spec: TinySpec = TinySpec(), seed: int = DEFAULT_SEED
) -> Path:
    """The checkpoint for (spec, seed) in ``cache_dir``, written on first use; the file name
    carries the family (``nti_tiny_<tag>-<key>.safetensors``, tag as ``TinySpec.tag``)."""
    path = Path(cache_dir) / f"nti_tiny_{spec.tag()}-{spec.key(seed)}.safetensors"
    if not path.is_file():
        write_checkpoint(path, spec, seed)
    return path


def install_checkpoint(
    models_dir: Path,
    source: Path,
    name: str = DEFAULT_NAME,
) -> Path:
    """Put ``source`` into ``<models_dir>/checkpoints/<name>`` (a hard link when possible).

    ``models_dir`` is a ComfyUI ``models`` folder (e.g. ``$COMFYUI_PATH/models`` or one given to
    ComfyUI with ``--base-directory``); the file then shows up in CheckpointLoaderSimple.
    """
    dest = Path(models_dir) / "checkpoints" / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        if dest.stat().st_size == source.stat().st_size:
            return dest
        dest.unlink()
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)
    return dest


# --------------------------------------------------------------------------- loading


def load_comfy_checkpoint(path: Path) -> tuple[Any, Any, Any]:
    """(MODEL, CLIP, VAE) through ``comfy.sd.load_checkpoint_guess_config``."""
    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(path), output_vae=True, output_clip=True
    )
    return model, clip, vae


def build_diffusers_unet(spec: TinySpec = TinySpec()):
    """A ``UNet2DConditionModel`` laid out as ``spec`` (random init), fp32.

    diffusers ties its mid block depth to the last level's (``diffusers_config``); when the
    spec's middle depth differs (SDXL here: 10 at the last level, 1 in the middle) the mid block
    is rebuilt with the same arguments and ``middle_depth`` transformer layers.
    """
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**spec.diffusers_config())
    if spec.diffusers_mid_depth() != spec.middle_depth:
        from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2DCrossAttn

        last = len(spec.channel_mult) - 1
        unet.mid_block = UNetMidBlock2DCrossAttn(
            in_channels=spec.model_channels * spec.channel_mult[last],
            temb_channels=spec.model_channels * 4,
            transformer_layers_per_block=spec.middle_depth,
            resnet_eps=1e-5,
            resnet_act_fn="silu",
            resnet_groups=32,
            output_scale_factor=1,
            resnet_time_scale_shift="default",
            cross_attention_dim=spec.context_dim,
            num_attention_heads=spec.heads(last),
            use_linear_projection=spec.use_linear,
            upcast_attention=False,
            attention_type="default",
        )
    return unet


def diffusers_unet(path: Path, spec: TinySpec = TinySpec(), dtype: torch.dtype = torch.float32):
    """A diffusers ``UNet2DConditionModel`` with the checkpoint's UNet weights (strict load).

    Keys are mapped with ``comfy.utils.unet_to_diffusers`` (it also maps SDXL's
    ``label_emb.0.*`` to ``add_embedding.linear_*``); only the UNet tensors are read.
    """
    import comfy.utils
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys() if k.startswith(UNET_PREFIX)}
    mapping = comfy.utils.unet_to_diffusers(spec.comfy_unet_config())
    unet = build_diffusers_unet(spec)
    wanted = set(unet.state_dict())
    weights = {}
    for dkey, ckey in mapping.items():
        if dkey in wanted and UNET_PREFIX + ckey in sd:
            weights[dkey] = sd[UNET_PREFIX + ckey]
    missing = wanted - set(weights)
    if missing:
        raise RuntimeError(f"no checkpoint weight for diffusers keys: {sorted(missing)[:8]}")
    unused = set(sd) - {UNET_PREFIX + mapping[k] for k in weights}
    if unused:
        raise RuntimeError(f"checkpoint UNet weights not mapped: {sorted(unused)[:8]}")
    unet.load_state_dict(weights, strict=True)
    return unet.to(dtype).eval().requires_grad_(False)


def describe(obj: Any) -> Any:
    """A comparable picture of nested options: containers by content, everything else by id."""
    if isinstance(obj, dict):
        return {k: describe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [describe(v) for v in obj]
    if isinstance(obj, (str, int, float, bool, type(None))):
        return obj
    return id(obj)


def patcher_state(model: Any) -> Any:
    """What cloning and patching a ModelPatcher may change: compare before and after a run."""
    return {
        "options": describe(model.model_options),
        "patches": {k: len(v) for k, v in model.patches.items()},
        "uuid": model.patches_uuid,
        "wrappers": describe(model.weight_wrapper_patches),
        "objects": describe(model.object_patches),
        "force_cast": model.force_cast_weights,
    }


def tiny_clip_vision(folder: Path, seed: int = 0, width: int = 768, layers: int = 2,
                     patch: int = 16) -> Any:
    """ComfyUI's own ClipVisionModel with ViT-B/16's token layout (197 × 768 at 224 px) but two
    layers, seeded random weights (ComfyUI's ops leave weights uninitialised)."""
    import comfy.clip_vision

    cfg = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu",
           "hidden_size": width, "image_size": 224, "intermediate_size": 2 * width,
           "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": 12,
           "num_channels": 3, "num_hidden_layers": layers, "patch_size": patch,
           "projection_dim": 512}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny_clip_vision.json"
    path.write_text(json.dumps(cfg))
    model = comfy.clip_vision.ClipVisionModel(str(path))
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.get_sd().items():
        if "norm" in k:
            sd[k] = torch.ones(v.shape) if k.endswith("weight") else torch.zeros(v.shape)
        else:
            sd[k] = torch.randn(v.shape, generator=g) * 0.02
    model.load_sd(sd)
    return model


CLIP_VISION_NAME = "clip_vision_vit_l14.safetensors"  # the styled workflow's default file name


def cached_clip_vision_vitl(cache_dir: Path, seed: int = DEFAULT_SEED) -> Path:
    """A CLIP ViT-L/14 vision file ComfyUI's CLIPVisionLoader detects (24 layers × 1024, 257
    tokens: detection goes by the real architecture), random fp16 weights, ~600 MB; cached."""
    path = Path(cache_dir) / f"nti_clip_vision_vitl-{seed}.safetensors"
    if path.is_file():
        return path
    import comfy.clip_vision
    from safetensors.torch import save_file

    config = Path(comfy.clip_vision.__file__).parent / "clip_vision_config_vitl.json"
    shapes = {k: v.shape for k, v in comfy.clip_vision.ClipVisionModel(str(config)).get_sd().items()}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        if "norm" in k:
            sd[k] = (torch.ones(shape) if k.endswith("weight") else torch.zeros(shape)).half()
        else:
            sd[k] = (torch.randn(shape, generator=g) * 0.02).half()
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp))
    os.replace(tmp, path)
    return path


def install_clip_vision(models_dir: Path, source: Path, name: str = CLIP_VISION_NAME) -> Path:
    """Put ``source`` into ``<models_dir>/clip_vision/<name>`` (CLIPVisionLoader's folder)."""
    dest = Path(models_dir) / "clip_vision" / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        try:
            os.link(source, dest)
        except OSError:
            shutil.copyfile(source, dest)
    return dest


# Three UNet levels with attention only at latent/4 (and the middle block): P2P's LocalBlend, the
# recorded maps and the attention loss read the cross-attention maps at latent/4 (16×16 for
# SD1.5 at 512²), which the default two-level tiny UNet (maps at latent and latent/2) lacks.
HTTP_SPEC = TinySpec(channel_mult=(1, 1, 1), level_depth=(0, 0, 1))
# The same with ε of a sane size (as the SD 2.x and SDXL specs have): fidelity beside them.
HTTP_SPEC_GAIN = dataclasses.replace(HTTP_SPEC, out_gain=0.1, vae_scale=0.044)
