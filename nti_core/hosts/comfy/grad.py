"""Autograd through a ComfyUI MODEL built under ``torch.inference_mode()``: leaving inference mode,
per-call weight copies, inputs that can be saved for backward, and the weights as loaded."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor


@contextlib.contextmanager
def autograd() -> Iterator[None]:
    """Leave ComfyUI's ``torch.inference_mode()`` and enable grad (for the null-text loop).

    Tensors made inside are normal tensors; inputs made under inference mode must be cloned
    inside before they take part in autograd (``ComfyDenoiser.eps`` clones its own inputs).
    """
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _identity(weight: Tensor) -> Tensor:
    """Weight wrapper that changes nothing but makes ComfyUI cast (copy) the weight per call."""
    return weight


def prepare_for_grad(patcher: Any) -> None:
    """Make ``patcher`` usable under autograd although its weights are inference tensors.

    Adds an identity weight wrapper to every weight and bias of modules with ``weight_function``
    (ComfyUI then copies each weight per call, outside inference mode) and sets the compute dtype
    to fp32. That call also gives the patcher a new patches_uuid, which makes the next load
    re-run ``ModelPatcher.load`` — the step that installs the wrappers.
    """
    for name, module in patcher.model.named_modules():
        if not hasattr(module, "weight_function"):
            continue
        for attr in ("weight", "bias"):
            if getattr(module, attr, None) is not None:
                patcher.add_weight_wrapper(f"{name}.{attr}", _identity)
    patcher.set_model_compute_dtype(torch.float32)


def effective_unet_weights(patcher: Any) -> list[Tensor]:
    """The diffusion model's weights as loaded, weight patches (LoRA…) included.

    Weights patched in place are read as they are; patches kept aside (low-VRAM loading) are
    computed here with ComfyUI's own ``calculate_weight``.
    """
    out = []
    for name, weight in patcher.model.diffusion_model.state_dict().items():
        key = f"diffusion_model.{name}"
        if key in patcher.patches and key not in patcher.backup:
            weight = patcher.calculate_weight(patcher.patches[key], weight.float().clone(), key)
        out.append(weight)
    return out


def _usable(x: Tensor | None, record: bool) -> Tensor | None:
    """Inputs made under inference mode cannot be saved for backward: clone them (keeps grads)."""
    if x is None or not record or not x.is_inference():
        return x
    return x.clone()


def _has_inference_weights(patcher: Any) -> bool:
    weight = next(iter(patcher.model.diffusion_model.parameters()), None)
    return weight is not None and weight.is_inference()
