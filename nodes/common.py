"""What several nodes share: prompt encoding per family with checks, the CLIP tokenizer, the denoiser,
progress with interruption, device moves of the typed values, LATENT in/out.

Only ComfyUI and ``nti_core`` are imported; nothing here keeps state between runs (the
tokenizer is cached by ``nti_core.tokenizer`` and is immutable).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import comfy.model_management
import comfy.sd1_clip
import comfy.utils
import torch
from torch import Tensor

from ..nti_core.family import SD1, Family
from ..nti_core.hosts.comfy import ComfyDenoiser, check_interrupt, check_pair, clip_family
from ..nti_core.precision import PRECISIONS
from ..nti_core.progress import Progress, StepLoss, no_step_loss
from ..nti_core.tokenizer import HFTokenizer
from ..nti_core.tokenizer import family_tokenizer as tokenizer_named
from ..nti_core.trajectory import Trajectory, UncondEmbeddings
from ..nti_core.validate import check_prompt

log = logging.getLogger(__name__)

CATEGORY = "NTI Photo Edit"
LATENT_CHANNELS = 4  # SD 1.x, SD 2.x and SDXL
LOSS_EVENT = "nti_photo_edit.loss"  # one message per optimised step (web/nti_loss_curve.js)
LOSS_UI = "nti_loss"  # the whole curve in the node's UI output, kept by the frontend


def family_tokenizer(clip_or_family: Any = None) -> HFTokenizer:
    """The tokenizer a CLIP's family names (``Family.tokenizer``; SD 1.x's when None), from the
    vocabulary beside the running ComfyUI's ``comfy.sd1_clip``, which every family here reads
    (``comfy`` is a namespace package: it has no ``__file__``)."""
    if clip_or_family is None:
        family = SD1
    elif isinstance(clip_or_family, Family):
        family = clip_or_family
    else:
        family = clip_family(clip_or_family)
    folder = Path(comfy.sd1_clip.__file__).resolve().parent / "sd1_tokenizer"
    return tokenizer_named(family.tokenizer, folder)


def clip_tokens(clip: Any, text: str, tok: HFTokenizer, what: str = "prompt",
                family: Family | None = None) -> dict:
    """``clip.tokenize(text)``, refused unless every text encoder of the CLIP's family sees plain
    text at the positions the CLIP tokenizer gives (SDXL: CLIP-L and CLIP-G, same vocabulary,
    different padding — the words must sit at the same positions for both).

    Prompt-to-Prompt finds words by their token positions: ComfyUI's weighting syntax
    ``(word:1.2)`` and ``embedding:`` names shift or replace tokens, so they are refused here
    (use the edit plan's reweight instead).
    """
    family = family or clip_family(clip)
    tokens = clip.tokenize(text)
    body = tok.encode(text)
    for key in family.encoders:
        chunks = tokens[key]
        if len(chunks) != 1:
            raise ValueError(f"the {what} needs more than {tok.max_length} tokens: shorten it "
                             f"({text[:60]!r}…)")
        pairs = chunks[0]
        if any(not isinstance(p[0], int) for p in pairs):
            raise ValueError(f"the {what} uses a textual-inversion embedding: not supported "
                             "here, write plain words")
        if any(p[1] != 1.0 for p in pairs):
            raise ValueError(f"the {what} uses ComfyUI's weighting syntax '(word:1.2)': not "
                             "supported here, write plain words (and use the edit plan's "
                             f"reweight) — {text!r}")
        ids = [int(p[0]) for p in pairs]
        if ids[: len(body) + 2] != [tok.bos, *body, tok.eos]:
            raise ValueError(f"ComfyUI's CLIP ({key}) tokenises the {what} {text!r} differently "
                             "from the CLIP tokenizer, so word positions would not agree: plain "
                             "text without '(' ')' escapes is needed")
    return tokens


def encode_prompt(clip: Any, text: str, tok: HFTokenizer, what: str = "prompt") -> Tensor:
    """A checked prompt → the family's embedding [1, 77, D] (SDXL: [1, 78, 2048], the pooled
    vector as the last row; ``nti_core.family``), on ComfyUI's intermediate device."""
    text = check_prompt(text, what)
    family = clip_family(clip)
    return _embedding(family, clip, clip_tokens(clip, text, tok, what, family), what)


def encode_empty(clip: Any) -> Tensor:
    """The CLIP's embedding of "" (SDXL: token states and pooled vector, as ComfyUI encodes an
    empty negative prompt — not zeros): the null text ∅ before optimisation."""
    return _embedding(clip_family(clip), clip, clip.tokenize(""), "empty prompt")


def _embedding(family: Family, clip: Any, tokens: dict, what: str) -> Tensor:
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    if cond.ndim != 3 or cond.shape[0] != 1:
        raise ValueError(f"the {what} encodes to {tuple(cond.shape)}, expected [1, 77, "
                         f"{family.context_dim}] from a {family.name} CLIP")
    return family.pack(cond, pooled if family.pooled_dim else None)


def make_denoiser(model: Any, for_grad: bool = False, clip: Any = None,
                  precision: str = "auto", latent_hw: tuple[int, int] | None = None,
                  compute: torch.dtype | None = None) -> ComfyDenoiser:
    """The ``nti_core`` denoiser on a hooked clone of ``model`` (the input MODEL is untouched);
    with ``clip``, refuse a CLIP of another family first. ``for_grad``: for an optimisation at
    ``precision`` on latents of ``latent_hw`` (what ComfyUI is asked to free for the backward);
    ``compute``: sampling in the dtype the ∅ were optimised in."""
    den = ComfyDenoiser(model, for_grad=for_grad, precision=precision, latent_hw=latent_hw,
                        compute=compute)
    if clip is not None:
        check_pair(den.family, clip)
    return den


def queue_check(check: Callable[..., object], *values: Any) -> bool | str:
    """``validate_inputs``' answer when the prompt is queued: True when a value is linked (None
    here: the node checks it when it runs) or ``check(*values)`` passes, else the message of
    the ValueError it raised, which ComfyUI shows on the node."""
    if any(v is None for v in values):
        return True
    try:
        check(*values)
    except ValueError as e:
        return str(e)
    return True


def precision_input() -> Any:
    """The optimisation nodes' ``precision`` widget (``nti_core.precision``)."""
    from comfy_api.latest import io

    return io.Combo.Input(
        "precision", options=list(PRECISIONS), default="auto",
        tooltip="What the optimisation computes the UNet in: 'model' its own dtype (∅ and Adam "
        "stay fp32), 'fp32' always, 'auto' picks per dtype. The report says what ran.")


def finish_optimisation() -> None:
    """After an optimisation: hand the memory its backward used back to the device."""
    comfy.model_management.soft_empty_cache()


def progress_bar(total: int) -> Progress:
    """A progress callback: ComfyUI's ProgressBar plus the Cancel check, once per step."""
    bar = comfy.utils.ProgressBar(total)

    def tick(done: int = 1) -> None:
        check_interrupt()
        bar.update(done)

    return tick


def loss_messages(node_id: Any) -> StepLoss:
    """A step-loss callback sending ``LOSS_EVENT`` {node, step, total, first, final} to the
    client that queued the prompt, as ComfyUI's own messages go; sends nothing outside a server
    (``main.py`` imports ``server`` before any node runs; in-process tests have none)."""
    server = getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)
    if server is None or node_id is None:
        return no_step_loss

    def send(step: int, total: int, first: float, final: float) -> None:
        if server.client_id is not None:  # a prompt without one gets no "executed" either
            server.send_sync(LOSS_EVENT, {"node": str(node_id), "step": step, "total": total,
                                          "first": first, "final": final}, server.client_id)

    return send


def loss_ui(report: str, first: list[float], final: list[float]) -> dict:
    """An optimising node's UI output: its text report and, when it has losses, the whole
    curve under ``LOSS_UI``. UI outputs are no inputs: the node's cache key stays the same."""
    from comfy_api.latest import ui

    text = ui.PreviewText(report).as_dict()
    return {**text, LOSS_UI: [{"first": list(first), "final": list(final)}]} if first else text


def intermediate() -> torch.device:
    """Where ComfyUI keeps values between nodes (CPU unless --gpu-only)."""
    return comfy.model_management.intermediate_device()


def trajectory_to(traj: Trajectory, device: torch.device | str, maps: bool = False
                  ) -> Trajectory:
    """The trajectory's latents and embedding on ``device`` (a new object; the input is left
    alone); its attention maps too with ``maps``, else they stay where they are (between nodes:
    ComfyUI's intermediate device) — the attention loss moves one step's maps at a time,
    sampling never reads them."""
    moved = None if traj.maps is None or not maps else traj.maps.to(device)
    return dataclasses.replace(traj, latents=traj.latents.to(device),
                               embedding=traj.embedding.to(device),
                               maps=moved if maps else traj.maps)


def normal_copy(traj: Trajectory) -> Trajectory:
    """The trajectory with fresh (non-inference) tensors, usable in an autograd graph."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("normal_copy must run inside autograd()")
    return dataclasses.replace(
        traj, latents=traj.latents.clone(), embedding=traj.embedding.clone(),
        fingerprint=traj.fingerprint.clone(), maps=None if traj.maps is None else traj.maps.clone())


def uncond_to(uncond: UncondEmbeddings, device: torch.device | str) -> UncondEmbeddings:
    """The ∅ embeddings on ``device`` (a new object)."""
    return dataclasses.replace(uncond, embeddings=uncond.embeddings.to(device))


def latent_in(model: Any, latent: dict, device: torch.device) -> Tensor:
    """LATENT (raw VAE latents) of one image → z₀ [1, 4, h, w] in the model's scale (SD 1.x / 2.x
    ×0.18215, SDXL ×0.13025: ComfyUI's latent format of the MODEL)."""
    samples = latent["samples"]
    if samples.ndim != 4:
        raise ValueError(f"expected an image latent [B, 4, h, w], got shape {tuple(samples.shape)}")
    if samples.shape[0] != 1:
        raise ValueError(f"DDIM Invert takes one image, got a batch of {samples.shape[0]} latents: "
                         "pick one (e.g. with 'Latent From Batch') and invert each on its own")
    if samples.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"expected an SD-family latent with {LATENT_CHANNELS} channels, got "
                         f"{samples.shape[1]}: encode the image with the checkpoint's own VAE")
    if "noise_mask" in latent:
        log.warning("[NTI] the latent's noise mask is ignored: inversion edits the whole image")
    return model.model.process_latent_in(samples.to(device=device, dtype=torch.float32))


def rgb_image(image: Any, what: str) -> Tensor:
    """An IMAGE [B, H, W, C] → [B, H, W, 3]: RGBA loses its alpha (as ComfyUI's VAE Encode and
    CLIP vision drop it), greyscale is repeated; other layouts are refused."""
    if not isinstance(image, Tensor) or image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"{what} must be an IMAGE [B, H, W, 3] (RGB; RGBA loses its alpha, "
                         f"greyscale [B, H, W, 1] is repeated), got {shape}: convert it to RGB")
    return image[..., :3] if image.shape[-1] == 4 else image.expand(-1, -1, -1, 3)


def latent_out(model: Any, z: Tensor) -> dict:
    """z [B, 4, h, w] in the model's scale → LATENT with raw VAE latents."""
    return {"samples": model.model.process_latent_out(z).to(intermediate())}


def output_used(prompt: Any, node_id: Any, index: int) -> bool:
    """Whether output ``index`` of node ``node_id`` feeds any input in the API ``prompt``
    (ComfyUI's hidden PROMPT); True when that cannot be told (no prompt, node not in it)."""
    if not isinstance(prompt, dict) or str(node_id) not in {str(k) for k in prompt}:
        return True
    for node in prompt.values():
        inputs = node.get("inputs", {}) if isinstance(node, dict) else {}
        for value in inputs.values():
            if (isinstance(value, list) and len(value) == 2 and str(value[0]) == str(node_id)
                    and value[1] == index):
                return True
    return False
