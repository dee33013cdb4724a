"""``ComfyDenoiser``: the ``Denoiser`` protocol over a ComfyUI MODEL — z ↔ σ-space, ε from
ComfyUI's denoised output (whatever the model predicts: ε or v), the family's text conditioning
(SDXL: pooled vector + size conditioning), rows sent as ComfyUI's chunks, the per-call state for
the hooks."""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import torch
from torch import Tensor

from ...denoiser import Controller, Rows, Site, model_fingerprint, value_rows
from ...memory import backward_bytes, fits, weight_copy_bytes
from ...precision import Precision, dtype_name, resolve
from .family import detect
from .grad import (
    WeightAlias,
    add_checkpointing,
    effective_unet_weights,
    has_inference_weights,
    model_compute_dtype,
    prepare_for_grad,
    usable,
)
from .hooks import STATE_KEY, CallState, patch_model, transformer_keys
from .patches import cfg_eps, check_patches, comfy_conds, has_cfg_functions, transformer_options
from .rows import plan_calls

log = logging.getLogger(__name__)


def check_interrupt() -> None:
    """Raise ComfyUI's InterruptProcessingException when the user pressed Cancel."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


class ComfyDenoiser:
    """``Denoiser`` over a ComfyUI MODEL of a supported family (``family``: SD 1.x, SD 2.x, SDXL;
    ε or v); see ``nti_core.hosts.comfy``.

    Contexts are the family's embeddings (``Family.pack``): for SDXL the pooled row is split off
    and, with the size conditioning of the latent's own size (original = target = 8× the latent,
    crop 0, as ComfyUI's CLIPTextEncode sets it), becomes the UNet's vector input ``y`` — the
    same size conditioning for every row.

    ``for_grad`` prepares a clone whose forward can be differentiated although ComfyUI built the
    weights under inference mode, for an optimisation at ``precision`` (auto / fp32 / model,
    ``nti_core.precision``; resolved against the MODEL's compute dtype in ``self.precision``):
    at the model's dtype the backward keeps views of the loaded weights, not copies; at fp32 on
    a half model ComfyUI casts each weight per call and the backward keeps those fp32 copies.
    ``latent_hw`` (the latent's size) lets the load ask ComfyUI for the memory the backward
    needs (``nti_core.memory``), so that it offloads other models first, and decide
    ``checkpointing`` (None: on when that memory is not free on the device; True / False
    force it): gradient checkpointing of every ResBlock and transformer block — the same
    result, activations recomputed in the backward instead of kept. Build the graph inside
    ``autograd()``. ``separate_calls`` runs every chunk (branch) in its own UNet call; without
    it, a call that records no gradient does so when the batch does not fit in free memory
    (ComfyUI's own rule, ``_batch_fits``). ``attention_dtypes`` collects the dtypes of the queries
    the attention hooks received (what the UNet really computed in). ``compute`` makes a
    sampling denoiser compute in another dtype than the MODEL (ComfyUI casts per layer): the
    dtype the ∅ it samples with were optimised in (``precision.sampling_dtype``).
    """

    def __init__(self, model: Any, *, for_grad: bool = False, separate_calls: bool = False,
                 precision: str = "auto", latent_hw: tuple[int, int] | None = None,
                 checkpointing: bool | None = None, compute: torch.dtype | None = None):
        self.family = detect(model)
        check_patches(model)
        self.source = model
        self.for_grad = for_grad
        self.separate_calls = separate_calls
        self.keys = transformer_keys(model)
        self.sites = tuple(Site(b, i, d, cross) for b, i, d in self.keys for cross in (False, True))
        self.patcher = patch_model(model)
        self.precision: Precision = resolve(precision, model_compute_dtype(model))
        self.checkpointing = False
        self.memory_required = 0
        self.attention_dtypes: set[torch.dtype] = set()
        if compute is not None and compute != model_compute_dtype(model):
            self.patcher.set_model_compute_dtype(compute)  # sampling with ∅ made in ``compute``
        if for_grad:
            prepare_for_grad(self.patcher, self.precision.compute)
            if latent_hw is not None:
                self._plan_memory(tuple(latent_hw), checkpointing)
            elif checkpointing:
                add_checkpointing(self.patcher)
                self.checkpointing = True
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
        """The UNet's compute dtype (ComfyUI's manual-cast dtype if set, else the weights'; for
        an optimisation, its precision's)."""
        return model_compute_dtype(self.patcher)

    def _plan_memory(self, latent_hw: tuple[int, int], checkpointing: bool | None) -> None:
        """Memory the backward needs, asked of ComfyUI when loading; checkpointing when it is
        not free (after ComfyUI has offloaded what it can) or when forced."""
        import comfy.model_management as mm

        compute = self.precision.compute
        copies = weight_copy_bytes(self.patcher.model.diffusion_model, compute)
        full = backward_bytes(self.family.key, latent_hw, compute) + copies
        if checkpointing is None:
            self.memory_required = full
            self.load()
            device = self.device
            checkpointing = device.type != "cpu" and not fits(full, mm.get_free_memory(device))
            if checkpointing:
                log.info("[NTI] gradient checkpointing on: the backward needs %.1f GB, %.1f GB "
                         "free", full / 1e9, mm.get_free_memory(device) / 1e9)
        if checkpointing:
            add_checkpointing(self.patcher)
            full = backward_bytes(self.family.key, latent_hw, compute, checkpointing=True) + copies
        self.checkpointing, self.memory_required = bool(checkpointing), full

    def seen(self) -> str:
        """The dtypes the attention hooks have received queries in, e.g. "bf16"."""
        return ", ".join(sorted(dtype_name(d) for d in self.attention_dtypes)) or "none yet"

    def describe(self) -> str:
        """The optimisation's precision, what the attention hooks saw and checkpointing, for
        the node reports."""
        return (f"{self.precision.describe()}\nattention inputs seen by the hooks: "
                f"{self.seen()}; gradient checkpointing {'on' if self.checkpointing else 'off'}")

    def sigma(self, t: int) -> float:
        """σ_t exactly as ``model_sampling.sigmas[t]`` holds it (float32 value)."""
        if not 0 <= int(t) < len(self._sigmas):
            raise ValueError(f"timestep must be in 0…{len(self._sigmas) - 1}, got {t}")
        return float(self._sigmas[int(t)])

    def load(self) -> None:
        """Load the hooked clone with ComfyUI's model management (cheap when already loaded)."""
        import comfy.model_management

        comfy.model_management.load_models_gpu([self.patcher],
                                               memory_required=self.memory_required)
        if self.for_grad:
            self._check_wrappers()

    def _check_wrappers(self) -> None:
        for module in self.patcher.model.diffusion_model.modules():
            if getattr(module, "weight", None) is not None and hasattr(module, "weight_function"):
                if not any(isinstance(f, WeightAlias) for f in module.weight_function):
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
        """z [B, 4, h, w] (z_t, model scale), context [B, 77 (+1), D] → ε [B, 4, h, w] in z's
        dtype/device.

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
        self.load()
        record = self._records_grad(z, context, value_context)
        calls = plan_calls(rows, self.separate_calls or not (record or self._batch_fits(z)))
        scope = torch.inference_mode(False) if record else contextlib.nullcontext()
        with scope:
            z, context, value_context = (usable(x, record) for x in (z, context, value_context))
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

    def _batch_fits(self, z: Tensor) -> bool:
        """ComfyUI's own rule for batching cond and uncond (``samplers._calc_cond_batch``): one
        UNet call when the model's memory estimate for the whole batch × 1.5 is free on the
        device; else one call per branch, as ComfyUI's samplers do under memory pressure."""
        import comfy.model_management as mm

        need = self.patcher.model.memory_required(list(z.shape)) * 1.5
        free = mm.get_free_memory(self.device)
        if need < free:
            return True
        log.debug("[NTI] cond and uncond in separate UNet calls: %.2f GB needed, %.2f GB free",
                  need / 1e9, free / 1e9)
        return False

    def _check_inputs(
        self, z: Tensor, context: Tensor, value_context: Tensor | None,
        step: int | None, controller: Controller | None,
    ) -> None:
        if z.ndim != 4 or context.ndim != 3 or context.shape[0] != z.shape[0]:
            raise ValueError(
                f"expected z [B, 4, h, w] and context [B, L, D] with the same B, got "
                f"{tuple(z.shape)} and {tuple(context.shape)}"
            )
        self.family.check(context, "text embedding")
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
        if not self.for_grad and has_inference_weights(self.patcher):
            raise RuntimeError(
                "gradients through this model need ComfyDenoiser(model, for_grad=True): its "
                "weights were made under torch.inference_mode()"
            )
        return True

    def _eps_call(
        self, z: Tensor, t: int, context: Tensor, values: Tensor | None,
        cond_or_uncond: list[int], step: int | None, controller: Controller | None,
    ) -> Tensor:
        """One ``apply_model`` call on a batch made of ``cond_or_uncond`` chunks; Cancel is
        checked before it, so a run stops within one UNet call."""
        check_interrupt()
        device = self.device
        sig = self.sigma(t)
        sigma = torch.full((z.shape[0],), sig, dtype=torch.float32, device=device)
        x = z.to(device=device, dtype=torch.float32) * math.sqrt(1.0 + sig * sig)  # z/√ᾱ_t
        context, pooled = self.family.unpack(context.to(device))
        if values is not None:
            values = self.family.unpack(values)[0]
        call = CallState(controller=controller, value=values)
        if step is not None:
            call.step_sigmas = torch.tensor([sig], dtype=torch.float64)
            call.step_ids = (int(step),)
        chunk = z.shape[0] // len(cond_or_uncond)
        options = transformer_options(self.patcher)
        options.update(cond_or_uncond=list(cond_or_uncond), sigmas=sigma[:chunk], **{STATE_KEY: call})
        extra = {} if pooled is None else {"y": self._vector(pooled, z.shape[-2:])}
        denoised = self._apply_model(x, sigma, context, options, cond_or_uncond, extra)
        self.attention_dtypes |= call.seen
        return (x - denoised) / sigma.view(-1, 1, 1, 1)

    def guide(
        self, z: Tensor, t: int, eps_u: Tensor, eps_c: Tensor, w: float, *,
        cond: Tensor, uncond: Tensor,
    ) -> Tensor | None:
        """Guided ε by the MODEL's CFG functions (RescaleCFG, PAG, APG, …) as ComfyUI's
        samplers apply them (``patches.cfg_eps``); None when it carries none (then the engine's
        plain ε_∅ + w(ε_c − ε_∅) applies). z, ε_∅, ε_c [B, 4, h, w]; cond, uncond: the rows'
        contexts [B, L, D], made ComfyUI conds for the functions that run the UNet again."""
        if not has_cfg_functions(self.source):
            return None
        check_interrupt()  # some functions run the UNet again (PAG's perturbed pass)
        self.load()
        return cfg_eps(self.source, self.patcher, z, self.sigma(t), eps_u, eps_c, w,
                       self._conds(cond, z.shape[-2:]), self._conds(uncond, z.shape[-2:]))

    def _conds(self, contexts: Tensor, latent_hw: torch.Size) -> list[dict[str, Any]]:
        context, pooled = self.family.unpack(contexts.to(self.device))
        return comfy_conds(context, None if pooled is None else self._vector(pooled, latent_hw))

    def _vector(self, pooled: Tensor, latent_hw: torch.Size) -> Tensor:
        """SDXL's vector input y = [pooled | size embeddings]: ComfyUI's ``encode_adm`` with the
        image's own size as original and target size, crop (0, 0) — the same for every row."""
        h, w = (int(n) * 8 for n in latent_hw)
        y = self.patcher.model.encode_adm(pooled_output=pooled, width=w, height=h, crop_w=0,
                                          crop_h=0, target_width=w, target_height=h)
        return y.to(pooled.device)

    def _apply_model(
        self, x: Tensor, sigma: Tensor, context: Tensor, options: dict[str, Any],
        cond_or_uncond: list[int], extra: dict[str, Tensor],
    ) -> Tensor:
        """``apply_model`` (through the MODEL's unet function wrapper if one is set) → x̂₀."""
        base = self.patcher.model
        kwargs = {"c_crossattn": context, "transformer_options": options, **extra}
        wrapper = self.patcher.model_options.get("model_function_wrapper")
        if wrapper is not None:
            args = {"input": x, "timestep": sigma, "c": kwargs, "cond_or_uncond": cond_or_uncond}
            return wrapper(base.apply_model, args)
        return base.apply_model(x, sigma, **kwargs)
