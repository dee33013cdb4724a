"""Non-finite values stop the run where they start, with the stage, the step, the likely cause
and the fix — never a black image several nodes later.

Each stage checks what it produced once per step (one device sync, next to the UNet pass that
dominates the step): the input latent, ε and the latent of every inversion / sampling step, the
loss of every optimisation iteration, the decoded image (CLI).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .precision import dtype_name

FP16_UNET = ("fp16 overflow in the UNet: run the model in bf16 or fp32 (ComfyUI: --bf16-unet or "
             "--fp32-unet; CLI: --dtype bf16 or fp32)")
FP16_OPTIMISATION = ("fp16 overflow in the optimisation's UNet passes: set precision to fp32 "
                     "(node input 'precision', CLI --precision fp32)")
FP16_VAE = ("the VAE overflows in fp16 (SDXL's VAE does): use an fp32 VAE — ComfyUI: start it "
            "with --fp32-vae, or load an fp16-safe VAE such as sdxl-vae-fp16-fix; CLI: --dtype "
            "fp32 or bf16")
DIVERGED = ("the values grew without bound: lower the guidance, or invert again (a NaN here "
            "with an fp32 model points at corrupt weights or inputs)")


class NonFiniteError(ValueError):
    """NaN or inf in a stage's values; the message names the stage, the step, the cause, the fix."""


def cause(dtype: torch.dtype | None, stage: str) -> str:
    """The likely cause and its fix for a non-finite value of ``stage`` computed in ``dtype``
    (stages named "… optimisation" are the optimisations, "VAE …" and "input latent" the VAE's)."""
    if stage.startswith("VAE") or stage == "input latent":
        return FP16_VAE if dtype in (torch.float16, None) else DIVERGED
    if dtype == torch.float16:
        return FP16_OPTIMISATION if stage.endswith("optimisation") else FP16_UNET
    return DIVERGED


def check_finite(stage: str, *, step: int | None = None, dtype: torch.dtype | None = None,
                 **values: Tensor | None) -> None:
    """Raise ``NonFiniteError`` when any of ``values`` (name → tensor) holds NaN or inf.

    One sync for all of them; the message names the first non-finite one, e.g. "NaN in ε at
    step 12 of P2P sampling (fp16): fp16 overflow in the UNet: …".
    """
    present = [(k, v) for k, v in values.items() if v is not None]
    if not present:
        return
    device = present[0][1].device
    flags = torch.stack([v.detach().isfinite().all().to(device) for _, v in present])
    if bool(flags.all()):
        return
    name, bad = present[int((~flags).nonzero()[0, 0])]
    kind = "NaN" if bool(bad.detach().isnan().any()) else "inf"
    where = stage if step is None else f"step {step} of {stage}"
    computed = "" if dtype is None else f" ({dtype_name(dtype)})"
    raise NonFiniteError(f"{kind} in {name} at {where}{computed}: {cause(dtype, stage)}")
