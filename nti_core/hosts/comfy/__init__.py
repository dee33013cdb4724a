"""The ComfyUI host: the ``Denoiser`` protocol on a ComfyUI MODEL (``ModelPatcher``) of the SD 1.x,
SD 2.x or SDXL family (ε- or v-prediction; ``family.detect``).

The only module of nti_core that touches ComfyUI; ``comfy`` is imported inside the functions that
need it, so importing this module works without ComfyUI. Checked against ComfyUI 0.3.64.

How a call runs (``ComfyDenoiser.eps``):
- a clone of the MODEL carries an attention *replace* hook on attn1 and attn2 of every transformer
  block found in the UNet (key (block, number, depth)) and one ``attn2_patch``; the input MODEL is
  never modified;
- the latent z (z_t convention, already in the model's scale) becomes ComfyUI's σ-space x = z/√ᾱ_t with
  σ = ``model_sampling.sigmas[t]``; ``apply_model(x, σ, c_crossattn=context, transformer_options)``
  (SDXL: and y = [pooled | size embeddings]) returns x̂₀ — whatever the model predicts — and
  ε = (x − x̂₀)/σ;
- the rows are sent as chunks (``cond_or_uncond``: 0 = cond, 1 = uncond, each chunk the whole latent
  batch of that call); the hook rebuilds ``Rows`` from them, so a batch and its cond/uncond halves
  run as separate calls see the same labels;
- the per-call state (controller, σ→step table, value input) travels in ``transformer_options``
  under ``STATE_KEY``; without a controller the hook runs ComfyUI's own attention kernel.

Notation: ᾱ_t = 1/(1+σ_t²); ε = predicted noise; x̂₀ = ComfyUI's "denoised".

Modules: ``denoiser`` (ComfyDenoiser, the σ adapter), ``hooks`` (attention replace hooks and the
value patch), ``rows`` (chunks ↔ Rows), ``grad`` (autograd through inference-mode weights),
``family`` (which models are accepted), ``patches`` (what else the MODEL carries: run with the
edit — other packs' hooks, CFG functions through ``ComfyDenoiser.guide`` — or refused).
"""

from .denoiser import ComfyDenoiser, check_interrupt
from .family import check_pair, clip_family, detect
from .grad import (
    Checkpointed,
    WeightAlias,
    add_checkpointing,
    autograd,
    effective_unet_weights,
    model_compute_dtype,
    normal_alias,
    prepare_for_grad,
)
from .hooks import (
    STATE_KEY,
    BlockKey,
    CallState,
    make_replace,
    patch_model,
    step_from_sigmas,
    transformer_keys,
    value_patch,
)
from .rows import chunks_of_rows, plan_calls, rows_from_chunks

__all__ = [
    "STATE_KEY", "BlockKey", "CallState", "Checkpointed", "ComfyDenoiser", "WeightAlias",
    "add_checkpointing", "autograd", "check_interrupt", "model_compute_dtype", "normal_alias",
    "check_pair", "clip_family", "detect", "chunks_of_rows", "effective_unet_weights", "make_replace", "patch_model",
    "plan_calls", "prepare_for_grad", "rows_from_chunks", "step_from_sigmas", "transformer_keys",
    "value_patch",
]
