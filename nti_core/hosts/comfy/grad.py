"""Autograd through a ComfyUI MODEL built under ``torch.inference_mode()``: leaving inference mode,
weights autograd may keep without copying them, the optimisation's compute dtype, gradient
checkpointing of UNet layers, inputs that can be saved for backward, the weights as loaded."""

from __future__ import annotations

import contextlib
import copy
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


def normal_alias(t: Tensor) -> Tensor:
    """A normal (non-inference) tensor sharing ``t``'s memory: autograd may save it for the
    backward, which it refuses for the inference tensor itself. No copy is made."""
    if not t.is_inference():
        return t
    with torch.inference_mode(False):
        alias = torch.empty(0, dtype=t.dtype, device=t.device)
        return alias.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


class WeightAlias:
    """Weight wrapper of one module's ``weight`` or ``bias`` for the optimisation.

    A wrapper makes ComfyUI cast (copy) the weight per call, outside inference mode, and hand
    the copy to its wrappers. Where the copy has the loaded weight's dtype and device and no
    other function (a LoRA computed per call in low-VRAM mode) came before this one, it returns
    the loaded weight itself (``normal_alias``): the backward then keeps no copy of the UNet.
    Otherwise — another compute dtype (precision fp32 on a half model), another device
    (offloaded layers) — it returns ComfyUI's copy.
    """

    def __init__(self, module: torch.nn.Module, attr: str) -> None:
        self.module, self.attr = module, attr

    def __call__(self, weight: Tensor) -> Tensor:
        own = getattr(self.module, self.attr)
        functions = getattr(self.module, f"{self.attr}_function", [])
        if (own is None or not functions or functions[0] is not self
                or own.dtype != weight.dtype or own.device != weight.device):
            return weight
        return normal_alias(own)


def model_compute_dtype(patcher: Any) -> torch.dtype:
    """What ComfyUI computes the UNet in: its manual-cast dtype when it casts, else the weights'."""
    cast = patcher.get_model_object("manual_cast_dtype")
    return cast if cast is not None else patcher.model.get_dtype()


def prepare_for_grad(patcher: Any, compute: torch.dtype | None = None) -> None:
    """Make ``patcher`` usable under autograd although its weights are inference tensors.

    Adds a ``WeightAlias`` wrapper to every weight and bias of modules with ``weight_function``
    and sets the compute dtype to ``compute`` when it differs from the MODEL's (ComfyUI then
    casts each weight per call, and the backward keeps those copies). Adding wrappers gives the
    patcher a new patches_uuid, which makes the next load re-run ``ModelPatcher.load`` — the
    step that installs them.
    """
    for name, module in patcher.model.named_modules():
        if not hasattr(module, "weight_function"):
            continue
        for attr in ("weight", "bias"):
            if getattr(module, attr, None) is not None:
                patcher.add_weight_wrapper(f"{name}.{attr}", WeightAlias(module, attr))
    if compute is not None and compute != model_compute_dtype(patcher):
        patcher.set_model_compute_dtype(compute)


def add_checkpointing(patcher: Any) -> None:
    """Swap every ResBlock and transformer block of ``patcher`` for a ``Checkpointed`` one:
    object patches, applied at the next load and undone by ComfyUI when another clone loads."""
    for name, layer in checkpoint_layers(patcher):
        patcher.add_object_patch(name, Checkpointed.of(layer))


def checkpoint_layers(patcher: Any) -> list[tuple[str, torch.nn.Module]]:
    """(object-patch name, module) of every ResBlock and BasicTransformerBlock of the UNet: the
    units whose activations gradient checkpointing recomputes."""
    from comfy.ldm.modules.attention import BasicTransformerBlock
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    unet = patcher.get_model_object("diffusion_model")
    return [(f"diffusion_model.{name}", m) for name, m in unet.named_modules()
            if isinstance(m, (ResBlock, BasicTransformerBlock))]


class Checkpointed:
    """Gradient checkpointing of one layer: its activations are recomputed in the backward
    instead of kept (``torch.utils.checkpoint``, non-reentrant).

    ``of(layer)`` gives a shallow copy of the layer — the same class, parameters and children,
    so ComfyUI's type dispatch and weight patches see the layer itself — whose forward runs the
    original's under checkpointing while autograd records; the MODEL's own modules are not
    touched. ``transformer_options`` is passed as a snapshot: ComfyUI rewrites the block name
    in it as the forward moves on, and the recomputation must see the values of its own call
    (the attention hooks find their site by them).
    """

    def __init__(self, layer: torch.nn.Module) -> None:
        self.layer = layer

    @classmethod
    def of(cls, layer: torch.nn.Module) -> torch.nn.Module:
        shell = copy.copy(layer)
        shell.forward = cls(layer)  # on the copy only
        return shell

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        forward = type(self.layer).forward
        if not torch.is_grad_enabled():
            return forward(self.layer, *args, **kwargs)
        if isinstance(kwargs.get("transformer_options"), dict):
            kwargs["transformer_options"] = dict(kwargs["transformer_options"])
        return torch.utils.checkpoint.checkpoint(forward, self.layer, *args, use_reentrant=False,
                                                 **kwargs)


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


def usable(x: Tensor | None, record: bool) -> Tensor | None:
    """Inputs made under inference mode cannot be saved for backward: clone them (keeps grads)."""
    if x is None or not record or not x.is_inference():
        return x
    return x.clone()


def has_inference_weights(patcher: Any) -> bool:
    weight = next(iter(patcher.model.diffusion_model.parameters()), None)
    return weight is not None and weight.is_inference()
