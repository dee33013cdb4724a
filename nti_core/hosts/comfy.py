"""The ComfyUI host: the ``Denoiser`` protocol on a ComfyUI MODEL (``ModelPatcher``), SD 1.x.

The only module of nti_core that touches ComfyUI; ``comfy`` is imported inside the functions that
need it, so importing this module works without ComfyUI. Checked against ComfyUI 0.3.64.

How a call runs (``ComfyDenoiser.eps``):
- a clone of the MODEL carries an attention *replace* hook on attn1 and attn2 of every transformer
  block found in the UNet (key (block, number, depth)) and one ``attn2_patch``; the input MODEL is
  never modified;
- the latent z (z_t convention, already ×0.18215) becomes ComfyUI's σ-space x = z/√ᾱ_t with
  σ = ``model_sampling.sigmas[t]``; ``apply_model(x, σ, c_crossattn=context, transformer_options)``
  returns x̂₀ and ε = (x − x̂₀)/σ;
- the rows are sent as chunks (``cond_or_uncond``: 0 = cond, 1 = uncond, each chunk the whole latent
  batch of that call); the hook rebuilds ``Rows`` from them, so a batch and its cond/uncond halves
  run as separate calls see the same labels;
- the per-call state (controller, σ→step table, value input) travels in ``transformer_options``
  under ``STATE_KEY``; without a controller the hook runs ComfyUI's own attention kernel.

Notation: ᾱ_t = 1/(1+σ_t²); ε = predicted noise; x̂₀ = ComfyUI's "denoised".
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .base import Controller, Rows, Site, model_fingerprint, sdpa, value_rows

log = logging.getLogger(__name__)

STATE_KEY = "nti_call"  # transformer_options key of the per-call state
BlockKey = tuple[str, int, int]  # ComfyUI's (block name, number, depth within the transformer)


# --------------------------------------------------------------------------- small helpers


def check_interrupt() -> None:
    """Raise ComfyUI's InterruptProcessingException when the user pressed Cancel."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


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


def rows_from_chunks(cond_or_uncond: list[int], batch: int, device: torch.device | str) -> Rows:
    """ComfyUI's chunk list (0 = cond, 1 = uncond; each chunk = the whole latent batch) → Rows.

    Row r of chunk c has branch ``cond_or_uncond[c] == 0`` and slot r (its latent's index).
    """
    n = len(cond_or_uncond)
    if n == 0 or batch % n:
        raise RuntimeError(f"a batch of {batch} rows cannot hold {n} chunks {cond_or_uncond}")
    if any(c not in (0, 1) for c in cond_or_uncond):
        raise RuntimeError(f"cond_or_uncond must hold 0 (cond) or 1 (uncond), got {cond_or_uncond}")
    size = batch // n
    branches = [c == 0 for c in cond_or_uncond for _ in range(size)]
    return Rows.make(branches, list(range(size)) * n, device)


def chunks_of_rows(rows: Rows) -> list[tuple[int, int, int]]:
    """Rows → [(start, size, cond_or_uncond)]: runs of one branch with slots 0, 1, …, size−1."""
    branch, slot = rows.branch.tolist(), rows.slot.tolist()
    chunks: list[tuple[int, int, int]] = []
    i = 0
    while i < len(branch):
        if slot[i] != 0:
            raise ValueError(
                f"rows must come in chunks of one branch with slots 0, 1, …; row {i} starts a "
                f"chunk with slot {slot[i]} (branches {branch}, slots {slot})"
            )
        j = i + 1
        while j < len(branch) and branch[j] == branch[i] and slot[j] == slot[j - 1] + 1:
            j += 1
        chunks.append((i, j - i, 0 if branch[i] else 1))
        i = j
    return chunks


def plan_calls(rows: Rows, separate: bool = False) -> list[tuple[int, int, list[int]]]:
    """UNet calls [(start, stop, cond_or_uncond)] for a batch with these rows.

    One call when every chunk has the same size (ComfyUI's batch layout), else (or when
    ``separate``) one call per chunk.
    """
    chunks = chunks_of_rows(rows)
    if not separate and len({size for _, size, _ in chunks}) == 1:
        return [(0, len(rows), [c for _, _, c in chunks])]
    return [(start, start + size, [c]) for start, size, c in chunks]


# --------------------------------------------------------------------------- the hooks


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


def make_replace(site: Site, bound: Controller | None = None) -> Callable[..., Tensor]:
    """An attn1/attn2 replace function for one site: q, k, v [B, N, h·d] → [B, Nq, h·d].

    The controller comes from the call state (eps path) or, without one, from ``bound``
    (a MODEL patched for ComfyUI's own samplers; closures survive ``ModelPatcher.clone``).
    """

    def replace(q: Tensor, k: Tensor, v: Tensor, extra: dict[str, Any]) -> Tensor:
        call: CallState | None = extra.get(STATE_KEY)
        controller = call.controller if call is not None else bound
        heads = int(extra["n_heads"])
        if controller is None:
            return _plain_attention(q, k, v, heads, extra)
        rows = rows_from_chunks(list(extra["cond_or_uncond"]), q.shape[0], q.device)
        return controller.attend(
            q, k, v, heads=heads, site=site, hw=_hw(extra, q.shape[1]),
            step=_call_step(extra, call), rows=rows,
        )

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


# --------------------------------------------------------------------------- the model


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


def patch_model(model: Any, controller: Controller | None = None) -> Any:
    """A clone of ``model`` with the replace hooks on every transformer block and the value patch.

    ``controller`` is bound for use through ComfyUI's own samplers (the step then comes from
    ``sample_sigmas``); ``ComfyDenoiser`` passes its controller per call instead.
    """
    patched = model.clone()
    replaced = patched.model_options.get("transformer_options", {}).get("patches_replace", {})
    for name, key in [(n, k) for n in ("attn1", "attn2") for k in transformer_keys(model)]:
        if key in replaced.get(name, {}):
            log.warning("[NTI] replacing another %s hook at %s (it will not run)", name, key)
        site = Site(key[0], key[1], key[2], name == "attn2")
        setter = patched.set_model_attn1_replace if name == "attn1" else patched.set_model_attn2_replace
        setter(make_replace(site, controller), key[0], key[1], key[2])
    patched.set_model_attn2_patch(value_patch)
    return patched


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


# --------------------------------------------------------------------------- the denoiser


class ComfyDenoiser:
    """``Denoiser`` over a ComfyUI MODEL (SD 1.x, ε-prediction); see the module docstring.

    ``for_grad`` prepares a clone whose forward can be differentiated although ComfyUI built the
    weights under inference mode (fp32 compute; each weight is copied per call, so the backward
    keeps one extra copy of the UNet). Build the graph inside ``autograd()``. ``separate_calls``
    runs every chunk (branch) in its own UNet call, as ComfyUI does under memory pressure.
    """

    def __init__(self, model: Any, *, for_grad: bool = False, separate_calls: bool = False):
        check_sd1(model)
        self.source = model
        self.for_grad = for_grad
        self.separate_calls = separate_calls
        self.keys = transformer_keys(model)
        self.sites = tuple(Site(b, i, d, cross) for b, i, d in self.keys for cross in (False, True))
        self.patcher = patch_model(model)
        if for_grad:
            prepare_for_grad(self.patcher)
        sampling = model.get_model_object("model_sampling")
        with torch.inference_mode(False):
            self._sigmas = sampling.sigmas.detach().to("cpu", torch.float32).clone()
            self._alphas = 1.0 / (1.0 + self._sigmas.double() ** 2)
        self._fingerprint: Tensor | None = None

    # ----------------------------------------------------------------- protocol properties

    @property
    def alphas_cumprod(self) -> Tensor:
        """ᾱ = 1/(1+σ²) from ``model_sampling.sigmas``, [1000] float64."""
        return self._alphas

    @property
    def device(self) -> torch.device:
        """Where ComfyUI runs the UNet (``ModelPatcher.load_device``)."""
        return self.patcher.load_device

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's compute dtype (ComfyUI's manual-cast dtype if set; fp32 when ``for_grad``)."""
        cast = self.patcher.get_model_object("manual_cast_dtype")
        return cast if cast is not None else self.patcher.model.get_dtype()

    def sigma(self, t: int) -> float:
        """σ_t exactly as ``model_sampling.sigmas[t]`` holds it (float32 value)."""
        if not 0 <= int(t) < len(self._sigmas):
            raise ValueError(f"timestep must be in 0…{len(self._sigmas) - 1}, got {t}")
        return float(self._sigmas[int(t)])

    def load(self) -> None:
        """Load the hooked clone with ComfyUI's model management (cheap when already loaded)."""
        import comfy.model_management

        comfy.model_management.load_models_gpu([self.patcher])
        if self.for_grad:
            self._check_wrappers()

    def _check_wrappers(self) -> None:
        for module in self.patcher.model.diffusion_model.modules():
            if getattr(module, "weight", None) is not None and hasattr(module, "weight_function"):
                if _identity not in module.weight_function:
                    raise RuntimeError("ComfyUI did not install the autograd weight wrappers")
                return

    def fingerprint(self) -> Tensor:
        """``model_fingerprint`` of the diffusion model's weights as loaded (patches count)."""
        if self._fingerprint is None:
            self.load()
            with torch.inference_mode(False):
                self._fingerprint = model_fingerprint(effective_unet_weights(self.patcher))
        return self._fingerprint

    # ----------------------------------------------------------------- ε

    def eps(
        self,
        z: Tensor,
        t: int,
        context: Tensor,
        *,
        rows: Rows | None = None,
        step: int | None = None,
        controller: Controller | None = None,
        value_context: Tensor | None = None,
    ) -> Tensor:
        """z [B, 4, h, w] (z_t, ×0.18215), context [B, L, D] → ε [B, 4, h, w] in z's dtype/device.

        ``rows`` (default: all conditional, slots 0…B−1) must come in chunks of one branch with
        slots 0, 1, …; ``value_context`` [B, L, D] feeds the values of the conditional rows'
        cross-attention. Differentiable w.r.t. context/value_context inside ``autograd()`` when
        the denoiser was built ``for_grad``.
        """
        b = z.shape[0]
        self._check_inputs(z, context, value_context, step, controller)
        rows = Rows.cond(b) if rows is None else rows
        if len(rows) != b:
            raise ValueError(f"{b} latents need {b} row labels, got {len(rows)}")
        calls = plan_calls(rows, self.separate_calls)
        self.load()
        record = self._records_grad(z, context, value_context)
        scope = torch.inference_mode(False) if record else contextlib.nullcontext()
        with scope:
            z, context, value_context = (_usable(x, record) for x in (z, context, value_context))
            values = value_rows(rows, context, value_context)
            out = [
                self._eps_call(
                    z[s:e], int(t), context[s:e], None if values is None else values[s:e],
                    cou, step, controller,
                )
                for s, e, cou in calls
            ]
            eps = torch.cat(out) if len(out) > 1 else out[0]
        return eps.to(device=z.device, dtype=z.dtype)

    def _check_inputs(
        self, z: Tensor, context: Tensor, value_context: Tensor | None,
        step: int | None, controller: Controller | None,
    ) -> None:
        if z.ndim != 4 or context.ndim != 3 or context.shape[0] != z.shape[0]:
            raise ValueError(
                f"expected z [B, 4, h, w] and context [B, L, D] with the same B, got "
                f"{tuple(z.shape)} and {tuple(context.shape)}"
            )
        if value_context is not None and value_context.shape != context.shape:
            raise ValueError(
                f"value_context {tuple(value_context.shape)} must match context "
                f"{tuple(context.shape)}"
            )
        if controller is not None and step is None:
            raise ValueError("a controller needs the step index (eps(..., step=i))")

    def _records_grad(self, *inputs: Tensor | None) -> bool:
        """Whether autograd must record this call; refuse early when it cannot work."""
        if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
            return False
        if not any(x is not None and x.requires_grad for x in inputs):
            return False
        if not self.for_grad and _has_inference_weights(self.patcher):
            raise RuntimeError(
                "gradients through this model need ComfyDenoiser(model, for_grad=True): its "
                "weights were made under torch.inference_mode()"
            )
        return True

    def _eps_call(
        self, z: Tensor, t: int, context: Tensor, values: Tensor | None,
        cond_or_uncond: list[int], step: int | None, controller: Controller | None,
    ) -> Tensor:
        """One ``apply_model`` call on a batch made of ``cond_or_uncond`` chunks."""
        device = self.device
        sig = self.sigma(t)
        sigma = torch.full((z.shape[0],), sig, dtype=torch.float32, device=device)
        x = z.to(device=device, dtype=torch.float32) * math.sqrt(1.0 + sig * sig)  # z/√ᾱ_t
        call = CallState(controller=controller, value=values)
        if step is not None:
            call.step_sigmas = torch.tensor([sig], dtype=torch.float64)
            call.step_ids = (int(step),)
        chunk = z.shape[0] // len(cond_or_uncond)
        options = dict(self.patcher.model_options.get("transformer_options", {}))
        options.update(cond_or_uncond=list(cond_or_uncond), sigmas=sigma[:chunk], **{STATE_KEY: call})
        denoised = self._apply_model(x, sigma, context.to(device), options, cond_or_uncond)
        return (x - denoised) / sigma.view(-1, 1, 1, 1)

    def _apply_model(
        self, x: Tensor, sigma: Tensor, context: Tensor, options: dict[str, Any],
        cond_or_uncond: list[int],
    ) -> Tensor:
        """``apply_model`` (through the MODEL's unet function wrapper if one is set) → x̂₀."""
        base = self.patcher.model
        kwargs = {"c_crossattn": context, "transformer_options": options}
        wrapper = self.patcher.model_options.get("model_function_wrapper")
        if wrapper is not None:
            args = {"input": x, "timestep": sigma, "c": kwargs, "cond_or_uncond": cond_or_uncond}
            return wrapper(base.apply_model, args)
        return base.apply_model(x, sigma, **kwargs)


def _usable(x: Tensor | None, record: bool) -> Tensor | None:
    """Inputs made under inference mode cannot be saved for backward: clone them (keeps grads)."""
    if x is None or not record or not x.is_inference():
        return x
    return x.clone()


def _has_inference_weights(patcher: Any) -> bool:
    weight = next(iter(patcher.model.diffusion_model.parameters()), None)
    return weight is not None and weight.is_inference()
