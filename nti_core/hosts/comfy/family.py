"""Which ComfyUI models this host runs: the ``Family`` of a MODEL (and of a CLIP), or a clear
refusal. Read off the objects ComfyUI built, never off names:

- the UNet must be ComfyUI's ``UNetModel`` (Flux, SD3, video and other DiT models are not);
- the model class says SDXL (``model_base.SDXL``) or plain SD (``BaseModel``: SD 1.x by a 768-wide
  text context, SD 2.x by 1024); refiner, unCLIP, upscaler, cascade, inpainting are refused;
- the prediction type and the schedule come from the *patched* ``model_sampling`` object, so a
  ``ModelSamplingDiscrete`` node that switches a model to v-prediction or zero-terminal-SNR is
  honoured: ε- or v-prediction on a discrete 1000-step schedule, nothing else (no EDM, flow, x0,
  LCM's 50-step distilled schedule).
"""

from __future__ import annotations

from typing import Any

from ...family import SD1, SD2, SDXL, SUPPORTED, Family, by_width
from .hooks import transformer_keys


def refuse(what: str) -> ValueError:
    return ValueError(f"{what}; this pack supports {SUPPORTED}")


def detect(model: Any) -> Family:
    """The family of a ComfyUI MODEL (``ModelPatcher``), with its prediction type and schedule."""
    import comfy.model_base as mb
    import comfy.model_sampling as ms
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    base = model.model
    unet = model.get_model_object("diffusion_model")
    kind = type(base).__name__
    if not isinstance(unet, UNetModel):
        raise refuse(f"this MODEL is a {kind} ({type(unet).__name__}), not an SD-style UNet")
    if base.concat_keys or unet.in_channels != 4:
        raise refuse(f"this {kind} takes extra image inputs ({unet.in_channels} input channels: "
                     "an inpainting or instruct model)")
    sdxl = type(base) is mb.SDXL
    if not sdxl and (type(base) is not mb.BaseModel or base.adm_channels):
        raise refuse(f"this MODEL is a {kind} (refiner, unCLIP, upscaler, video or cascade model)")
    family = by_width(_context_dim(unet), pooled=sdxl)
    sampling = model.get_model_object("model_sampling")
    if not isinstance(sampling, ms.ModelSamplingDiscrete) or isinstance(
        sampling, (ms.ModelSamplingDiscreteEDM, ms.StableCascadeSampling)
    ):
        raise refuse(f"needs a discrete 1000-step schedule, got {type(sampling).__name__}")
    if len(sampling.sigmas) != 1000:
        raise refuse(f"needs the 1000-step training schedule, got {len(sampling.sigmas)} steps "
                     "(a distilled schedule such as LCM's)")
    if isinstance(sampling, (ms.EDM, ms.X0)) or not isinstance(sampling, ms.EPS):
        kinds = [c.__name__ for c in type(sampling).__mro__ if c.__module__ == ms.__name__]
        raise refuse(f"needs ε- or v-prediction, got {type(sampling).__name__} ({kinds})")
    prediction = "v" if isinstance(sampling, ms.V_PREDICTION) else "eps"
    transformer_keys(model)
    return family.with_schedule(prediction, bool(getattr(sampling, "zsnr", False)))


def _context_dim(unet: Any) -> int:
    """Width of the text context the UNet's cross-attention reads (its first attn2.to_k input)."""
    for name, module in unet.named_modules():
        if name.endswith("attn2.to_k"):
            return int(module.in_features)
    raise ValueError("the UNet has no cross-attention: nothing to edit with text")


def clip_family(clip: Any) -> Family:
    """The family a ComfyUI CLIP encodes for, from its tokenizers: {"l"} SD 1.x, {"h"} SD 2.x,
    {"l", "g"} SDXL; anything else (SDXL refiner's "g" alone, T5, …) is refused."""
    keys = sorted(clip.tokenize("a").keys())
    for family in (SD1, SD2, SDXL):
        if keys == sorted(family.encoders):
            return family
    raise refuse(f"the CLIP has text encoders {keys}, which no supported family uses")


def check_pair(family: Family, clip: Any) -> None:
    """Refuse a CLIP of another family than the MODEL's (e.g. an SD 1.x CLIP with SDXL)."""
    other = clip_family(clip)
    if other.key != family.key:
        raise ValueError(f"the CLIP is {other.name}'s but the MODEL is {family.name}: load the "
                         "CLIP of the same checkpoint")
