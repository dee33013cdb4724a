"""The hooks a cloned MODEL carries: attn1/attn2 *replace* functions that hand projected q/k/v to
the controller with each row's labels and the step matched from σ, and the ``attn2_patch`` that
swaps in a value input. The per-call state travels in ``transformer_options[STATE_KEY]``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ...denoiser import Controller, Site, sdpa
from .patches import displaced_hook
from .rows import rows_from_chunks

STATE_KEY = "nti_call"  # transformer_options key of the per-call state
BlockKey = tuple[str, int, int]  # ComfyUI's (block name, number, depth within the transformer)


@dataclass
class CallState:
    """What the hooks need to know about the ``apply_model`` call under way.

    ``step_sigmas``/``step_ids`` form the σ→step table; ``value`` is attn2's value input
    [B, L, D] (None = the context). Stored in transformer_options; never deep-copied.
    """

    controller: Controller | None = None
    step_sigmas: Tensor | None = None  # [S] float64, CPU
    step_ids: tuple[int, ...] = ()
    value: Tensor | None = None
    resolved: dict[str, Any] = field(default_factory=dict)
    seen: set[torch.dtype] = field(default_factory=set)  # dtypes of the q the hooks received

    def __deepcopy__(self, memo: dict) -> CallState:
        return self


def step_from_sigmas(sigmas: Tensor, table: Tensor, steps: tuple[int, ...]) -> int:
    """The step whose σ in ``table`` [S] is nearest to this call's σ (all rows share one σ)."""
    sigma = float(sigmas.reshape(-1)[0])
    i = int(torch.argmin((table - sigma).abs()))
    if abs(float(table[i]) - sigma) > 1e-4 * max(sigma, 1e-3):
        raise RuntimeError(f"σ = {sigma:.6g} matches no step of the table {table.tolist()}")
    return steps[i]


def _call_step(extra: dict[str, Any], call: CallState | None) -> int:
    """Step index from σ: the host's table (eps path) or ComfyUI's ``sample_sigmas`` (sampler)."""
    if call is not None and "step" in call.resolved:
        return call.resolved["step"]
    sigmas = extra.get("sigmas")
    if sigmas is None:
        raise RuntimeError("transformer_options carry no 'sigmas': cannot tell the step")
    if call is not None and call.step_sigmas is not None:
        step = step_from_sigmas(sigmas, call.step_sigmas, call.step_ids)
        call.resolved["step"] = step
        return step
    schedule = extra.get("sample_sigmas")
    if schedule is None:
        raise RuntimeError("a controller needs the step: no σ→step table and no sample_sigmas")
    table = schedule.detach().to("cpu", torch.float64)
    return step_from_sigmas(sigmas, table, tuple(range(len(table))))


def _hw(extra: dict[str, Any], tokens: int) -> tuple[int, int]:
    """(h, w) of the query map, from the transformer input's ``activations_shape`` [B, C, H, W]."""
    shape = extra.get("activations_shape")
    if shape is None or shape[-2] * shape[-1] != tokens:
        raise RuntimeError(f"activations_shape {shape} does not match {tokens} query positions")
    return int(shape[-2]), int(shape[-1])


def _plain_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, extra: dict[str, Any]) -> Tensor:
    """ComfyUI's optimized attention; SDPA when autograd records (not every kernel has a backward)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return sdpa(q, k, v, heads)
    from comfy.ldm.modules import attention

    return attention.optimized_attention(
        q, k, v, heads, attn_precision=extra.get("attn_precision"), transformer_options=extra
    )


def _plain_attention_fn(q: Tensor, k: Tensor, v: Tensor, extra: dict[str, Any]) -> Tensor:
    return _plain_attention(q, k, v, int(extra["n_heads"]), extra)


def make_replace(
    site: Site, bound: Controller | None = None, displaced: Callable[..., Tensor] | None = None
) -> Callable[..., Tensor]:
    """An attn1/attn2 replace function for one site: q, k, v [B, N, h·d] → [B, Nq, h·d].

    The controller comes from the call state (eps path) or, without one, from ``bound``
    (a MODEL patched for ComfyUI's own samplers; closures survive ``ModelPatcher.clone``).

    ``displaced`` is another pack's replace function at this block (IPAdapter's
    CrossAttentionPatch). Without a controller it runs instead of plain attention: its output
    is exactly what it would be without us. With one, the output is the controller's
    attention plus the hook's contribution, displaced(q, k, v) − attention(q, k, v): exact for
    hooks of IPAdapter's form (base attention + added terms), an approximation for a hook that
    changes the base attention itself.
    """

    def replace(q: Tensor, k: Tensor, v: Tensor, extra: dict[str, Any]) -> Tensor:
        call: CallState | None = extra.get(STATE_KEY)
        if call is not None:
            call.seen.add(q.dtype)
        controller = call.controller if call is not None else bound
        heads = int(extra["n_heads"])
        if controller is None:
            return (displaced or _plain_attention_fn)(q, k, v, extra)
        rows = rows_from_chunks(list(extra["cond_or_uncond"]), q.shape[0], q.device)
        out = controller.attend(
            q, k, v, heads=heads, site=site, hw=_hw(extra, q.shape[1]),
            step=_call_step(extra, call), rows=rows,
        )
        if displaced is None:
            return out
        return out + (displaced(q, k, v, extra) - _plain_attention(q, k, v, heads, extra))

    return replace


def value_patch(
    n: Tensor, context: Tensor, value: Tensor, extra: dict[str, Any]
) -> tuple[Tensor, Tensor, Tensor]:
    """``attn2_patch``: swap attn2's value input for the call's ``value`` rows (if any).

    An attn2 patch runs before the projections and may return a value input different from the
    key input; the layer's own ``to_v`` (with LoRA patches, casts, wrappers) then projects it.
    A replace function only sees projected k/v and could not project value_context itself.
    """
    call: CallState | None = extra.get(STATE_KEY)
    if call is None or call.value is None:
        return n, context, value
    if call.value.shape != context.shape:
        raise RuntimeError(
            f"value input {tuple(call.value.shape)} does not match the context {tuple(context.shape)}"
        )
    return n, context, call.value.to(device=context.device, dtype=context.dtype)


def transformer_keys(model: Any) -> list[BlockKey]:
    """(block, number, depth) of every BasicTransformerBlock of an SD-style ComfyUI UNet.

    Read off the model (SD1.5 has 16; small test UNets fewer), in forward order.
    """
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = model.get_model_object("diffusion_model")
    if not isinstance(unet, UNetModel):
        raise ValueError(f"needs an SD 1.x UNet model, got {type(unet).__name__}")
    groups = [
        ("input", list(unet.input_blocks)),
        ("middle", [unet.middle_block]),
        ("output", list(unet.output_blocks)),
    ]
    keys: list[BlockKey] = []
    for name, blocks in groups:
        for number, block in enumerate(blocks):
            found = [m for m in block.modules() if isinstance(m, SpatialTransformer)]
            if len(found) > 1:
                raise ValueError(f"{name} block {number} has {len(found)} transformers, expected 1")
            for st in found:
                keys.extend((name, number, depth) for depth in range(len(st.transformer_blocks)))
    if not keys:
        raise ValueError("the UNet has no transformer blocks: nothing to hook")
    return keys


def patch_model(model: Any, controller: Controller | None = None) -> Any:
    """A clone of ``model`` with the replace hooks on every transformer block and the value patch.

    ``controller`` is bound for use through ComfyUI's own samplers (the step then comes from
    ``sample_sigmas``); ``ComfyDenoiser`` passes its controller per call instead. Another
    pack's replace hook at a block ours take is called inside ours (``make_replace``).
    """
    patched = model.clone()
    for name, key in [(n, k) for n in ("attn1", "attn2") for k in transformer_keys(model)]:
        site = Site(key[0], key[1], key[2], name == "attn2")
        setter = patched.set_model_attn1_replace if name == "attn1" else patched.set_model_attn2_replace
        setter(make_replace(site, controller, displaced_hook(model, name, key)), *key)
    patched.set_model_attn2_patch(value_patch)
    return patched
