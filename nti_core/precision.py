"""The precision policy: which dtype each stage computes in and what always stays fp32.

| stage                          | the UNet computes in                 | fp32, always                      |
|--------------------------------|--------------------------------------|-----------------------------------|
| DDIM inversion                 | the model's dtype                    | the trajectory z*_0…T, DDIM steps |
| null-text / StyleDiffusion     | ``Precision.compute``, forward *and* | ∅, the mapping networks, Adam     |
|   optimisation                 | backward (see ``resolve``)           | state, the loss, z̄                |
| P2P sampling                   | the dtype the ∅ / values were        | latents, the CFG sum, LocalBlend  |
|                                |   optimised in (``sampling_dtype``)  |                                   |
| DDIM reconstruction            | the model's dtype                    | latents                           |
| attention maps read or edited  | softmax in fp32, P·V in the compute dtype                                |
| VAE                            | the host's VAE dtype (SDXL's fp16 VAE overflows: fp32, see ``finite``)   |

"The model's dtype" is what the host computes in: ComfyUI's compute dtype of the MODEL (its
manual-cast dtype when it casts, else the weights' dtype), the CLI's ``--dtype``. Only the
optimisation has a choice, ``precision``:

- ``model``: forward and backward at the model's dtype (mixed precision: the optimised tensors,
  their gradients, Adam and the loss stay fp32; the UNet's activations and its backward are
  half). fp16 gradients of a latent MSE of ~1e-5 underflow, so fp16 runs with dynamic loss
  scaling (``LossScaler``); bf16 has fp32's exponent range and needs none.
- ``fp32``: the optimisation's UNet passes — and the sampling with its ∅ — in fp32 whatever
  the model's dtype (the reference code's choice: "fp16 optimisation fails"); costs fp32 copies
  of the weights and twice the activation memory.
- ``auto`` (the default): ``model`` where its reconstruction error was measured within 1.5× of
  fp32's, else ``fp32`` — ``AUTO`` holds the decision per dtype (fp16: model; bf16: fp32),
  ``docs/precision.md`` the measurements behind it.

Sampling with ∅ (or values) computes in the dtype they were optimised in (``sampling_dtype``):
∅ fits the rounding of the UNet it was optimised through, and ∅ optimised in fp32 sampled
through a bf16 UNet was measured worse than either dtype alone.

The resolved choice says in words what it is and why (``Precision.describe``): the node reports
and the CLI's report.json show it, so no choice is ever changed silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

PRECISIONS = ("auto", "fp32", "model")
HALF = (torch.float16, torch.bfloat16)
NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
         torch.float64: "fp64"}

# What ``auto`` picks for a half-precision model, measured on the CPU in real bf16 and fp16
# compute (bench/precision.py, docs/precision.md): ``model`` where every optimising method's
# reconstruction error stayed within 1.5× of fp32's, else ``fp32``.
AUTO: dict[torch.dtype, str] = {torch.float16: "model", torch.bfloat16: "fp32"}
AUTO_WHY = {
    torch.float16: "fp16's reconstruction error was measured within 1.5× of fp32's "
                   "(1.01–1.05×, docs/precision.md)",
    torch.bfloat16: "bf16's reconstruction error was measured at 2.3–3.3× of fp32's on the "
                    "demo model (its 8-bit mantissa, amplified by guidance; docs/precision.md): "
                    "'model' halves the memory at that cost",
}


def dtype_name(dtype: torch.dtype) -> str:
    return NAMES.get(dtype, str(dtype).removeprefix("torch."))


@dataclass(frozen=True)
class Precision:
    """The optimisation's precision, resolved for one model.

    ``model``: the dtype the model computes in; ``compute``: the dtype of the optimisation's
    UNet forward and backward; ``requested``: what the user chose; ``why``: the reason in words.
    """

    requested: str
    model: torch.dtype
    compute: torch.dtype
    why: str

    @property
    def loss_scaling(self) -> bool:
        """fp16 gradients need dynamic loss scaling (bf16 and fp32 do not)."""
        return self.compute == torch.float16

    @property
    def changed(self) -> bool:
        """Whether the optimisation computes in another dtype than the model."""
        return self.compute != self.model

    def describe(self) -> str:
        """One line for the reports: what runs in which dtype, and why."""
        head = f"precision {self.requested}"
        if self.requested == "auto":
            head += f" → {'fp32' if self.changed else 'model'}"
        body = (f"UNet forward and backward in {dtype_name(self.compute)}"
                + (" with dynamic loss scaling" if self.loss_scaling else "")
                + f" (the model computes in {dtype_name(self.model)})")
        return f"{head}: {body}; ∅/values, Adam and the loss in fp32 — {self.why}"


def resolve(requested: str, model: torch.dtype) -> Precision:
    """The optimisation's precision for a model that computes in ``model``."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    if model in (torch.float32, torch.float64):
        return Precision(requested, model, model,
                         f"the model computes in {dtype_name(model)} already")
    if model not in HALF:  # fp8 and the like: no optimisation runs in them
        return Precision(requested, model, torch.float32,
                         f"{dtype_name(model)} is no dtype to optimise in: fp32")
    if requested == "fp32":
        return Precision(requested, model, torch.float32, "as asked")
    if requested == "model":
        return Precision(requested, model, model, "as asked")
    return Precision(requested, model, model if AUTO[model] == "model" else torch.float32,
                     AUTO_WHY[model])


def dtype_key(dtype: torch.dtype | None) -> str:
    """How a dtype is recorded with ∅ and values (``UncondEmbeddings.compute``): "float32"…"""
    return "" if dtype is None else str(dtype).removeprefix("torch.")


def sampling_dtype(model: torch.dtype, *optimised: Any) -> torch.dtype:
    """The dtype sampling with ∅ (and values) computes in, given the ∅ / values themselves (their
    ``compute``; None: absent) or their ``compute`` strings: the optimisation's, whatever the
    model's — ∅ fits the rounding of the UNet it was optimised through, and sampling it through
    another costs more than either dtype alone (measured, docs/precision.md); the model's when
    nothing was optimised ("")."""
    kinds = {c if isinstance(c, str) else c.compute for c in optimised if c is not None} - {""}
    if len(kinds) > 1:
        raise ValueError(f"∅ and the values were optimised in different dtypes {sorted(kinds)}: "
                         "optimise both with the same precision")
    if not kinds:
        return model
    dtype = getattr(torch, kinds.pop(), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown optimisation dtype {optimised!r}")
    return dtype


def all_fp32() -> Precision:
    """What the engine does when no precision is given: an fp32 model, fp32 optimisation."""
    return resolve("auto", torch.float32)


@dataclass
class LossScaler:
    """Dynamic loss scaling for fp16 gradients (what ``torch.amp.GradScaler`` does, written out
    so the optimisation can report it): backward of loss·S; gradients unscaled before the
    optimiser step; a step whose gradients overflowed is skipped and S halved; S doubles after
    ``growth_interval`` good steps. ``enabled=False`` is a plain backward.
    """

    enabled: bool = True
    scale: float = 2.0**16
    growth_interval: int = 200
    skipped: int = 0
    _good: int = field(default=0, repr=False)

    def backward(self, loss: Tensor, params: list[Tensor]) -> bool:
        """Backward of ``loss``; True when the parameters' gradients are finite and unscaled
        (then step the optimiser), False when the step must be skipped."""
        if not self.enabled:
            loss.backward()
            return True
        (loss * self.scale).backward()
        grads = [p.grad for p in params if p.grad is not None]
        finite = bool(torch.stack([g.isfinite().all() for g in grads]).all()) if grads else True
        if not finite:
            self.scale /= 2.0
            self.skipped += 1
            self._good = 0
            for p in params:
                p.grad = None
            return False
        for g in grads:
            g.div_(self.scale)
        self._good += 1
        if self._good >= self.growth_interval:
            self.scale *= 2.0
            self._good = 0
        return True
