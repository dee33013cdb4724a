"""The diffusers host: ε from a ``UNet2DConditionModel`` with the controller behind attention processors.

Processors are installed with the UNet's own
``set_attn_processor`` (no reassigned ``forward``); without a controller they compute exactly what
diffusers' ``AttnProcessor2_0`` computes.

One UNet of a :class:`~nti_core.family.Family` (SD 1.x, SD 2.x, SDXL): the engine's embedding of a
prompt is unpacked here into the token states the cross-attention reads and, for SDXL, the pooled
text vector that goes with the size conditioning into ``added_cond_kwargs``; a v-prediction UNet's
output is turned into ε, so the engine sees ε of every family.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ...denoiser import Controller, Rows, Site, model_fingerprint, sdpa, value_rows
from ...family import SD1, Family
from ...precision import Precision
from ...schedule import eps_from_v

VAE_FACTOR = 8  # pixels per latent cell of the SD VAEs (SD 1.x, 2.x, XL)

_NAME = re.compile(
    r"^(?:(down|up)_blocks\.(\d+)|mid_block)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.(attn[12])"
)


def site_of(name: str, layers_per_block: int) -> Site:
    """diffusers processor name → ComfyUI's (block, number, depth) id, e.g.
    ``down_blocks.1.attentions.0.transformer_blocks.0.attn2`` → input 4 depth 0 cross (SD1.5)."""
    m = _NAME.match(name)
    if m is None:
        raise ValueError(f"not a transformer attention layer: {name}")
    kind, block, attn, depth, which = m.groups()
    if kind == "down":
        block_name, index = "input", 1 + int(block) * (layers_per_block + 1) + int(attn)
    elif kind == "up":
        block_name, index = "output", int(block) * (layers_per_block + 1) + int(attn)
    else:
        block_name, index = "middle", 0
    return Site(block_name, index, int(depth), which == "attn2")


def map_hw(latent_hw: tuple[int, int], tokens: int) -> tuple[int, int]:
    """(h, w) of the feature map with ``tokens`` positions inside a UNet fed ``latent_hw``
    (each downsample halves with ceil, as a stride-2 conv with padding 1 does)."""
    h, w = latent_hw
    while h * w > tokens:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != tokens:
        raise ValueError(f"cannot place {tokens} attention positions in a {latent_hw} latent")
    return h, w


CALL_KEY = "nti_call"  # the cross_attention_kwargs key of the per-call state


@dataclass
class _Call:
    """What the processors need to know about the UNet call under way. It travels with the call
    (``cross_attention_kwargs``), so a checkpointed block recomputed in the backward sees the
    state of its own forward, not the last call's."""

    controller: Controller | None = None
    rows: Rows | None = None
    step: int = -1
    latent_hw: tuple[int, int] = (0, 0)
    value_context: Tensor | None = None


class _Processor:
    """AttnProcessor2_0's computation with the attention itself handed to the controller."""

    def __init__(self, site: Site) -> None:
        self.site = site

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, nti_call: _Call | None = None, **kwargs):
        if (attention_mask is not None or attn.spatial_norm is not None
                or attn.group_norm is not None or attn.norm_cross is not None
                or getattr(attn, "norm_q", None) is not None):
            raise NotImplementedError(
                f"nti_core's processor supports the transformer attention of SD 1.x, SD 2.x and "
                f"SDXL UNets (no attention mask, spatial, group, cross or q/k norm); {self.site} "
                f"has one of them")
        residual = hidden_states
        c = nti_call or _Call()
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.to_q(hidden_states)
        k = attn.to_k(context)
        values = c.value_context if (self.site.cross and c.value_context is not None) else context
        v = attn.to_v(values)
        if c.controller is None:
            out = sdpa(q, k, v, attn.heads)
        else:
            assert c.rows is not None
            hw = map_hw(c.latent_hw, hidden_states.shape[1])
            out = c.controller.attend(
                q, k, v, heads=attn.heads, site=self.site, hw=hw, step=c.step, rows=c.rows
            )
        out = attn.to_out[1](attn.to_out[0](out.to(q.dtype)))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class DiffusersDenoiser:
    """Denoiser over a diffusers UNet of ``family`` (ε- or v-prediction, see ``family.prediction``).
    Installs its processors on ``unet``.

    For families with a pooled text vector (SDXL) the UNet's vector conditioning is the pooled
    vector of each row's embedding plus the size conditioning ``time_ids`` = (original h, w,
    crop top, left, target h, w) = (H, W, 0, 0, H, W) with H, W the image size in pixels (latent
    side × 8) — the same for every row, what diffusers' SDXL pipeline builds for an uncropped
    image at its own size.
    """

    def __init__(self, unet, alphas_cumprod: Tensor, family: Family = SD1) -> None:
        check_unet(unet, family)
        self.unet = unet
        self.family = family
        self._alphas = alphas_cumprod.detach().to(torch.float64).cpu()
        lpb = int(unet.config.layers_per_block)
        names = list(unet.attn_processors.keys())
        self.sites = {n: site_of(n, lpb) for n in names}
        unet.set_attn_processor({n: _Processor(s) for n, s in self.sites.items()})
        unet.requires_grad_(False)
        self._fingerprint: Tensor | None = None

    @property
    def alphas_cumprod(self) -> Tensor:
        return self._alphas

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def fingerprint(self) -> Tensor:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(list(self.unet.parameters()))
        return self._fingerprint

    @contextlib.contextmanager
    def computing(self, dtype: torch.dtype, checkpointing: bool = False) -> Iterator[None]:
        """The UNet in ``dtype`` for the block, restored on exit (a half UNet cast to fp32 and
        back is bit-identical: every half value is exact in fp32); with ``checkpointing``,
        diffusers' gradient checkpointing of its blocks (the per-call state travels with the
        call, so a block recomputed in the backward sees its own forward's controller and
        values)."""
        own = self.dtype
        if dtype != own:
            cast_unet(self.unet, dtype)
        if checkpointing:
            self.unet.enable_gradient_checkpointing()
        try:
            yield
        finally:
            if checkpointing:
                self.unet.disable_gradient_checkpointing()
            if dtype != own:
                cast_unet(self.unet, own)

    def optimising(self, precision: Precision, checkpointing: bool = False):
        """``computing`` for an optimisation at ``precision`` (resolved for this UNet's dtype)."""
        if precision.model != self.dtype:
            raise ValueError(f"the precision was resolved for a {precision.model} model, this "
                             f"UNet computes in {self.dtype}")
        return self.computing(precision.compute, checkpointing)

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
        """z [B, 4, h, w], context [B, 77 (+1), D] (the family's packed embeddings) → ε."""
        b = z.shape[0]
        if context.shape[0] != b:
            raise ValueError(f"{b} latents need {b} context rows, got {context.shape[0]}")
        if rows is None:
            rows = Rows.cond(b, device=z.device)
        if controller is not None and step is None:
            raise ValueError("a controller needs the step index")
        tokens, pooled = self.family.unpack(context)
        vctx = value_rows(rows, context, value_context)
        if vctx is not None:  # the values read only the token states
            vctx = self.family.unpack(vctx)[0].to(self.dtype)
        extra = {}
        if pooled is not None:
            extra["added_cond_kwargs"] = {"text_embeds": pooled.to(self.dtype),
                                          "time_ids": size_ids(z).to(z.device, self.dtype)}
        call = _Call(controller, rows, -1 if step is None else step,
                     (int(z.shape[2]), int(z.shape[3])), vctx)
        ts = torch.full((b,), int(t), device=z.device, dtype=torch.long)
        out = self.unet(z.to(self.dtype), ts, encoder_hidden_states=tokens.to(self.dtype),
                        cross_attention_kwargs={CALL_KEY: call}, **extra).sample
        if self.family.prediction == "v":
            return eps_from_v(out.to(z.dtype), z, float(self._alphas[int(t)]))
        return out.to(z.dtype)


def cast_unet(unet, dtype: torch.dtype) -> None:
    """``unet.to(dtype)`` without diffusers' warning about modules to keep in fp32 (its SD UNets
    have none; the warning fires for any ``to(dtype)``)."""
    quiet = logging.getLogger("diffusers.models.modeling_utils")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        unet.to(dtype)
    finally:
        quiet.setLevel(level)


def size_ids(z: Tensor) -> Tensor:
    """SDXL's size conditioning for latents z [B, 4, h, w]: [B, 6] rows (H, W, 0, 0, H, W),
    H = 8h and W = 8w in pixels (original size, crop top-left, target size; float32)."""
    hh, ww = int(z.shape[2]) * VAE_FACTOR, int(z.shape[3]) * VAE_FACTOR
    return torch.tensor([[hh, ww, 0, 0, hh, ww]], dtype=torch.float32).expand(z.shape[0], -1)


def check_unet(unet, family: Family) -> None:
    """Refuse a UNet that is not of ``family``: its cross-attention width, its vector input."""
    cfg = unet.config
    width = cfg.cross_attention_dim
    if width != family.context_dim:
        raise ValueError(f"the UNet reads {width}-wide text states, a {family.name} UNet "
                         f"{family.context_dim}-wide: is the model of another family?")
    text_time = cfg.get("addition_embed_type") == "text_time"
    if text_time != bool(family.pooled_dim):
        raise ValueError(f"the UNet {'has' if text_time else 'lacks'} the text_time vector "
                         f"input that a {family.name} UNet {'lacks' if text_time else 'has'}")
    if int(cfg.in_channels) != family.latent_channels:
        raise ValueError(f"the UNet takes {cfg.in_channels} input channels, not "
                         f"{family.latent_channels}: inpainting and depth UNets are not supported")
