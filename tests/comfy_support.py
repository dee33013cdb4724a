"""Small SD1.5-format checkpoints for tests, built from ComfyUI's own classes (no downloads).

The checkpoint is a real single-file ``.safetensors`` that ``comfy.sd.load_checkpoint_guess_config``
detects as SD15: a two-level UNet with ``model_channels`` 320 and ``context_dim`` 768 (about 37 M
parameters), a random CLIP-L text encoder (the SD1 text encoder config is fixed), and a
TAESD-shaped VAE. Weights are random, deterministic given the seed, stored fp16 (~325 MB; the
CLIP-L encoder alone is 247 MB). ``diffusers_unet`` builds a ``UNet2DConditionModel`` holding the
same UNet weights, mapped with ``comfy.utils.unet_to_diffusers``.

Shapes come from ComfyUI's modules instantiated on the ``meta`` device; the values are ours.
ComfyUI is found through the ``COMFYUI_PATH`` environment variable; nothing here imports ComfyUI
(or diffusers) before a function that needs it is called.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
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


@dataclass(frozen=True)
class TinySpec:
    """A small SD1-family UNet: per-level transformer depth (0 = resnets only) and middle depth.

    Default: level 0 (full latent resolution) has attention, level 1 (half) has none, the middle
    block (half) has one transformer: transformer blocks input 1, middle 0, output 2 and 3.
    """

    channel_mult: tuple[int, ...] = (1, 1)
    num_res_blocks: int = 1
    level_depth: tuple[int, ...] = (1, 0)
    middle_depth: int = 1
    model_channels: int = 320  # SD15 detection needs 320
    context_dim: int = 768  # and 768
    num_heads: int = 8

    def __post_init__(self) -> None:
        if len(self.level_depth) != len(self.channel_mult):
            raise ValueError("level_depth needs one entry per channel_mult level")
        if self.middle_depth < 1:
            raise ValueError("the middle block needs a transformer (diffusers' mid block has one)")

    def comfy_unet_config(self) -> dict[str, Any]:
        """Keyword arguments of ComfyUI's ``UNetModel`` (what model_detection would report)."""
        levels = len(self.channel_mult)
        return {
            "image_size": 32,
            "in_channels": 4,
            "out_channels": 4,
            "model_channels": self.model_channels,
            "num_res_blocks": [self.num_res_blocks] * levels,
            "channel_mult": list(self.channel_mult),
            "transformer_depth": [d for d in self.level_depth for _ in range(self.num_res_blocks)],
            "transformer_depth_output": [
                d for d in self.level_depth for _ in range(self.num_res_blocks + 1)
            ],
            "transformer_depth_middle": self.middle_depth,
            "context_dim": self.context_dim,
            "num_heads": self.num_heads,
            "num_head_channels": -1,
            "use_spatial_transformer": True,
            "legacy": False,
            "use_linear_in_transformer": False,
            "adm_in_channels": None,
            "use_checkpoint": False,
        }

    def diffusers_config(self) -> dict[str, Any]:
        """``UNet2DConditionModel`` config with the same layout.

        diffusers' mid block takes ``transformer_layers_per_block[-1]``; levels without attention
        are plain Down/UpBlock2D whose entry is ignored, so the middle depth can sit there.
        """
        down = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in self.level_depth]
        up = ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(self.level_depth)]
        if self.level_depth[-1] and self.level_depth[-1] != self.middle_depth:
            raise ValueError("diffusers ties the middle depth to the last level's depth")
        layers = [d if d else self.middle_depth for d in self.level_depth]
        layers[-1] = self.middle_depth
        return {
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
            "transformer_layers_per_block": tuple(layers),
            "attention_head_dim": self.num_heads,  # diffusers' legacy name: the number of heads
            "use_linear_projection": False,
        }

    def transformer_blocks(self) -> int:
        """Number of BasicTransformerBlocks (each has an attn1 and an attn2)."""
        down = sum(d * self.num_res_blocks for d in self.level_depth)
        up = sum(d * (self.num_res_blocks + 1) for d in self.level_depth)
        return down + self.middle_depth + up

    def key(self, seed: int) -> str:
        """Short content id of (spec, seed) for cache file names."""
        blob = json.dumps({"spec": asdict(self), "seed": seed, "v": 1}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _module_shapes(spec: TinySpec) -> dict[str, dict[str, torch.Size]]:
    """Parameter shapes per part ("unet", "clip", "vae"), keyed as in the checkpoint file."""
    import comfy.ops
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.taesd.taesd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = comfy.supported_models.SD15(spec.comfy_unet_config())
    unet = UNetModel(
        **spec.comfy_unet_config(), device="meta", operations=comfy.ops.disable_weight_init
    )
    clip = comfy.sd1_clip.SDClipModel(device="meta")
    clip_sd = {f"clip_l.{k}": v for k, v in clip.state_dict().items()}
    vae = comfy.taesd.taesd.TAESD()
    parts = {
        "unet": config.process_unet_state_dict_for_saving(unet.state_dict()),
        "clip": config.process_clip_state_dict_for_saving(clip_sd),
        "vae": config.process_vae_state_dict_for_saving(vae.state_dict()),
    }
    return {name: {k: v.shape for k, v in sd.items()} for name, sd in parts.items()}


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


PARTS = ("unet", "clip", "vae")  # generation order: the UNet's values never depend on the rest


def build_state_dict(
    spec: TinySpec = TinySpec(), seed: int = DEFAULT_SEED, parts: tuple[str, ...] = PARTS
) -> dict[str, Tensor]:
    """The checkpoint (UNet, CLIP-L, TAESD VAE), fp16, deterministic in (spec, seed).

    ``parts`` may stop early (e.g. ("unet",)): values of a part do not depend on later parts.
    """
    if tuple(parts) != PARTS[: len(parts)]:
        raise ValueError(f"parts must be a prefix of {PARTS}, got {parts}")
    shapes = _module_shapes(spec)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for part in parts:
        for key in sorted(shapes[part]):
            out[key] = _init_tensor(key, shapes[part][key], gen).to(torch.float16).contiguous()
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
    os.replace(tmp, path)
    log.info("wrote %s (%.0f MB) in %.1f s", path, path.stat().st_size / 2**20,
             time.perf_counter() - start)
    return path


def cached_checkpoint(
    cache_dir: Path, spec: TinySpec = TinySpec(), seed: int = DEFAULT_SEED
) -> Path:
    """The checkpoint for (spec, seed) in ``cache_dir``, written on first use."""
    path = Path(cache_dir) / f"nti_tiny_sd15-{spec.key(seed)}.safetensors"
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


def diffusers_unet(path: Path, spec: TinySpec = TinySpec(), dtype: torch.dtype = torch.float32):
    """A diffusers ``UNet2DConditionModel`` with the checkpoint's UNet weights (strict load)."""
    import comfy.utils
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    sd = load_file(str(path))
    mapping = comfy.utils.unet_to_diffusers(spec.comfy_unet_config())
    unet = UNet2DConditionModel(**spec.diffusers_config())
    wanted = set(unet.state_dict())
    weights = {}
    for dkey, ckey in mapping.items():
        if dkey in wanted and UNET_PREFIX + ckey in sd:
            weights[dkey] = sd[UNET_PREFIX + ckey]
    missing = wanted - set(weights)
    if missing:
        raise RuntimeError(f"no checkpoint weight for diffusers keys: {sorted(missing)[:8]}")
    unused = {k for k in sd if k.startswith(UNET_PREFIX)} - {
        UNET_PREFIX + mapping[k] for k in weights
    }
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
