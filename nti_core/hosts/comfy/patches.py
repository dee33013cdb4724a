"""What else a MODEL carries (other packs' and ComfyUI's own patches) and how each meets the edit.

A ``ModelPatcher`` can carry: weight patches (LoRA), object patches (e.g. ``model_sampling``),
``model_options`` (``transformer_options`` patches and replace hooks, ``model_function_wrapper``,
the sampler's CFG functions and a few sampler hooks), ``wrappers`` and ``callbacks`` by type, and
hook patches (LoRA hooks). Run in our path, untouched: weight and object patches (applied when
ComfyUI loads the clone), every ``transformer_options`` patch (FreeU's ``output_block_patch``,
attn patches), the unet function wrapper, and APPLY_MODEL / DIFFUSION_MODEL wrappers (handed on in
``transformer_options["wrappers"]`` as ComfyUI's sampler does). Run by ``guide``: the
``sampler_pre_cfg_function``\\ s, ``sampler_cfg_function`` and ``sampler_post_cfg_function``\\ s,
through ComfyUI's own ``sampling_function``. Another pack's attn1/attn2 replace hook on a block
ours take is called inside ours (``hooks.make_replace``). Everything else would not run in our
path and is refused by ``check_patches`` before any UNet call.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

REFUSED = "the MODEL carries patches NTI Photo Edit cannot run"
TODO = ("connect the MODEL from before the node that added them (that node works with "
        "ComfyUI's own samplers, not inside the edit)")
CFG_KEYS = ("sampler_pre_cfg_function", "sampler_cfg_function", "sampler_post_cfg_function")
RUN_OPTIONS = {"transformer_options", "model_function_wrapper", "disable_cfg1_optimization",
               *CFG_KEYS}  # model_options keys that run in our path
RUN_WRAPPERS = {"apply_model", "diffusion_model"}  # WrappersMP types our apply_model calls meet
RUN_CALLBACKS = {"on_clone", "on_load_after", "on_detach_after", "on_inject_model",
                 "on_eject_model"}  # CallbacksMP types ComfyUI fires when cloning and loading


def name_of(fn: Any) -> str:
    """``module.qualname`` of a function or callable object (its class), for messages."""
    target = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(fn))}"


def _functions(value: Any) -> str:
    items = value if isinstance(value, list) else [value]
    return ", ".join(name_of(f) for f in items if callable(f)) or type(value).__name__


def refused_patches(model: Any) -> list[str]:
    """Each patch of ``model`` that would not run in the edit's path, named with its key and
    function(s); empty when everything it carries runs."""
    found = [f"model_options['{k}'] ({_functions(v)})"
             for k, v in model.model_options.items() if k not in RUN_OPTIONS]
    for kind, table, run in (("wrapper", model.wrappers, RUN_WRAPPERS),
                             ("callback", model.callbacks, RUN_CALLBACKS)):
        found += [f"a {kind} of type '{t}' ({_functions([f for fs in keyed.values() for f in fs])})"
                  for t, keyed in table.items() if t not in run and any(keyed.values())]
    if model.hook_patches:
        found.append(f"hook patches on {len(model.hook_patches)} hook(s) (LoRA hooks)")
    return found


def check_patches(model: Any) -> None:
    """Refuse, before any work, a MODEL carrying a patch the edit would not run (named)."""
    found = refused_patches(model)
    if found:
        raise ValueError(f"{REFUSED}: {'; '.join(found)} — {TODO}")


def displaced_hook(model: Any, name: str, key: tuple[str, int, int]) -> Callable | None:
    """The other pack's ``name`` ("attn1"/"attn2") replace function ours displaces at ``key``:
    ComfyUI looks up (block, number, depth), then (block, number) — IPAdapter's key."""
    table = model.model_options.get("transformer_options", {}).get("patches_replace", {})
    hooks = table.get(name, {})
    return hooks.get(key, hooks.get(key[:2]))


def transformer_options(model: Any) -> dict[str, Any]:
    """The MODEL's ``transformer_options`` with its APPLY_MODEL / DIFFUSION_MODEL wrappers in
    ``["wrappers"]``, as ComfyUI's sampler passes them (``prepare_model_patcher``)."""
    from comfy.patcher_extension import merge_nested_dicts

    options = dict(model.model_options.get("transformer_options", {}))
    wrappers = {t: keyed for t, keyed in model.wrappers.items() if t in RUN_WRAPPERS}
    if wrappers:
        options["wrappers"] = merge_nested_dicts(options.get("wrappers", {}), wrappers)
    return options


def has_cfg_functions(model: Any) -> bool:
    """Whether the MODEL carries ComfyUI CFG functions (RescaleCFG, PAG, APG, …)."""
    return any(model.model_options.get(k) for k in CFG_KEYS)


def comfy_conds(contexts: Tensor, y: Tensor | None = None) -> list[dict[str, Any]]:
    """Rows' contexts [B, L, D] (and SDXL's vector y [B, A]) as one ComfyUI cond, the form
    ``calc_cond_batch`` takes after ``process_conds`` (row i pairs with latent i)."""
    import comfy.conds

    model_conds = {"c_crossattn": comfy.conds.CONDCrossAttn(contexts)}
    if y is not None:
        model_conds["y"] = comfy.conds.CONDRegular(y)
    return [{"model_conds": model_conds, "uuid": uuid.uuid4()}]


def cfg_eps(
    source: Any, patcher: Any, z: Tensor, sigma: float, eps_u: Tensor, eps_c: Tensor, w: float,
    cond: list[dict[str, Any]], uncond: list[dict[str, Any]],
) -> Tensor:
    """Guided ε from ε_∅, ε_c [B, 4, h, w] by the MODEL's CFG functions, applied by ComfyUI's own
    ``sampling_function`` (pre-CFG, ``cfg_function``, post-CFG) in x/denoised space at σ.

    ``source``'s model_options (the MODEL as connected, without our hooks) are what the
    functions see: the extra UNet passes some make (PAG's perturbed pass, SAG's blurred one)
    run the MODEL as ComfyUI would, without the edit's attention control. The UNet outputs are
    handed in through ``sampler_calc_cond_batch_function``, so no pass is repeated.
    """
    import comfy.samplers

    x = z.to(device=patcher.load_device, dtype=torch.float32) * math.sqrt(1.0 + sigma * sigma)
    s = torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)
    cond_pred = x - s.view(-1, 1, 1, 1) * eps_c.to(x)
    uncond_pred = x - s.view(-1, 1, 1, 1) * eps_u.to(x)
    options = {**source.model_options, "transformer_options": transformer_options(source),
               "sampler_calc_cond_batch_function": lambda args: [cond_pred, uncond_pred]}
    patcher.pre_run()  # calc_cond_batch (PAG's pass) reads the BaseModel's current patcher
    denoised = comfy.samplers.sampling_function(patcher.model, x, s, uncond, cond, w,
                                                model_options=options)
    return ((x - denoised) / s.view(-1, 1, 1, 1)).to(eps_c)
