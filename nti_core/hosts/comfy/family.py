"""Which ComfyUI models this host runs (SD 1.x-shaped, ε-prediction, discrete schedule)."""

from __future__ import annotations

from typing import Any

from .hooks import transformer_keys


def check_sd1(model: Any) -> None:
    """Refuse what this host cannot run: it needs an ε-prediction discrete-schedule UNet."""
    import comfy.model_base
    import comfy.model_sampling

    base = model.model
    if base.model_type != comfy.model_base.ModelType.EPS:
        raise ValueError(f"needs an ε-prediction (SD 1.x) model, got {base.model_type.name}")
    if base.adm_channels or base.concat_keys:
        raise ValueError(
            "needs a plain SD 1.x text-to-image UNet: this one also takes "
            + ("pooled/size conditioning (SDXL-style)" if base.adm_channels else "inpainting inputs")
        )
    sampling = model.get_model_object("model_sampling")
    if not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete):
        raise ValueError(f"needs a discrete 1000-step schedule, got {type(sampling).__name__}")
    transformer_keys(model)
