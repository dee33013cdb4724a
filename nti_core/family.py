"""Model families: what the engine needs to know about an SD-style UNet model instead of SD 1.x
constants. Host-neutral; each host detects the family of the model it was given
(``hosts.comfy.family.detect`` from a ComfyUI MODEL, ``hosts.diffusers.models`` from a folder).

Supported: the latent-diffusion UNets with CLIP text cross-attention — SD 1.x, SD 2.x and SDXL,
each with ε- or v-prediction on the discrete 1000-step schedule (zero-terminal-SNR included).
Everything else (Flux, SD3, video, cascade, refiner, inpainting, EDM / flow-matching schedules)
is refused with :data:`SUPPORTED` in the message.

The text conditioning of one prompt is one tensor, its *embedding* [1, 77 (+1), D]:
- the 77 token states the UNet's cross-attention reads (D = ``context_dim``);
- for families with a pooled text vector (SDXL: 1280 wide, from the second encoder), one more row
  holding it, zero-padded to D (:meth:`Family.pack`). The host splits it off before the UNet
  (:meth:`Family.unpack`) and builds the UNet's vector conditioning from it and the image size.
So ∅, the source and the target rows, the files and the null-text optimisation all handle one
tensor per prompt: null-text inversion of SDXL optimises the unconditional token states *and* the
unconditional pooled vector (the whole unconditional text conditioning); the size conditioning is
not part of it and is the same for every row.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

TOKENS = 77  # positions every CLIP text encoder of these families reads
SUPPORTED = ("SD 1.x, SD 2.x and SDXL UNet checkpoints (ε- or v-prediction, discrete 1000-step "
             "schedule, zero-terminal-SNR included)")
PREDICTIONS = ("eps", "v")


@dataclass(frozen=True)
class Family:
    """One model family, as the engine reads it.

    ``encoders``: ComfyUI's tokenizer keys of the text encoders, in the order their states are
    concatenated (SDXL: CLIP-L 768 then OpenCLIP-G 1280 = 2048). ``map_factors``: the latent
    downsampling factors that have cross-attention in the standard architecture (SD 1.x / 2.x:
    1, 2, 4, 8; SDXL: 2, 4 — no attention at full resolution). ``transformer_blocks``: how many
    BasicTransformerBlocks the standard architecture has (16 / 16 / 70). ``prediction``: "eps"
    or "v"; ``zero_snr``: the schedule was rescaled to zero terminal SNR. ``tokenizer``: the
    name of the vocabulary its text encoders read (``nti_core.tokenizer.TOKENIZERS``).
    """

    key: str
    name: str
    context_dim: int
    pooled_dim: int
    encoders: tuple[str, ...]
    latent_scale: float
    map_factors: tuple[int, ...]
    transformer_blocks: int
    latent_channels: int = 4
    prediction: str = "eps"
    zero_snr: bool = False
    tokenizer: str = "clip-bpe"

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")

    def with_schedule(self, prediction: str, zero_snr: bool = False) -> Family:
        """The same family with the model's prediction type and schedule."""
        return replace(self, prediction=prediction, zero_snr=zero_snr)

    @property
    def label(self) -> str:
        """e.g. "SDXL (v-prediction, zero-terminal-SNR)"."""
        parts = ["v-prediction" if self.prediction == "v" else "ε-prediction"]
        if self.zero_snr:
            parts.append("zero-terminal-SNR")
        return f"{self.name} ({', '.join(parts)})"

    @property
    def embedding_rows(self) -> int:
        """Rows of one prompt's embedding: 77 token states (+1 pooled row)."""
        return TOKENS + (1 if self.pooled_dim else 0)

    def pack(self, context: Tensor, pooled: Tensor | None = None) -> Tensor:
        """Token states [B, 77, D] (+ pooled [B, P]) → one embedding [B, 77 (+1), D]."""
        if context.ndim != 3 or context.shape[1:] != (TOKENS, self.context_dim):
            raise ValueError(f"{self.name} text states must be [B, {TOKENS}, {self.context_dim}], "
                             f"got {tuple(context.shape)}: is the CLIP from another family?")
        if not self.pooled_dim:
            if pooled is not None:
                raise ValueError(f"{self.name} has no pooled text vector")
            return context
        if pooled is None or pooled.shape != (context.shape[0], self.pooled_dim):
            got = None if pooled is None else tuple(pooled.shape)
            raise ValueError(f"{self.name} needs a pooled text vector [B, {self.pooled_dim}], "
                             f"got {got}")
        row = torch.zeros(context.shape[0], 1, self.context_dim, dtype=context.dtype,
                          device=context.device)
        row[:, 0, : self.pooled_dim] = pooled.to(row)
        return torch.cat([context, row], dim=1)

    def unpack(self, embedding: Tensor) -> tuple[Tensor, Tensor | None]:
        """One embedding [B, 77 (+1), D] → (token states [B, 77, D], pooled [B, P] or None).
        Slices: gradients reach the embedding (the padding gets none)."""
        self.check(embedding)
        if not self.pooled_dim:
            return embedding, None
        return embedding[:, :TOKENS], embedding[:, TOKENS, : self.pooled_dim]

    def check(self, embedding: Tensor, what: str = "embedding") -> None:
        """Refuse an embedding that is not this family's [B, 77 (+1), D]."""
        want = (self.embedding_rows, self.context_dim)
        if embedding.ndim != 3 or tuple(embedding.shape[1:]) != want:
            raise ValueError(
                f"the {what} is {tuple(embedding.shape)}, but a {self.name} model needs "
                f"[B, {want[0]}, {want[1]}]: was it made with a model of another family?"
            )


SD1 = Family("sd1", "SD 1.x", 768, 0, ("l",), 0.18215, (1, 2, 4, 8), 16)
SD2 = Family("sd2", "SD 2.x", 1024, 0, ("h",), 0.18215, (1, 2, 4, 8), 16)
SDXL = Family("sdxl", "SDXL", 2048, 1280, ("l", "g"), 0.13025, (2, 4), 70)
FAMILIES = {f.key: f for f in (SD1, SD2, SDXL)}


def by_width(context_dim: int, pooled: bool) -> Family:
    """The family whose text context is ``context_dim`` wide (and has a pooled vector or not)."""
    for f in FAMILIES.values():
        if f.context_dim == context_dim and bool(f.pooled_dim) == pooled:
            return f
    raise ValueError(f"a UNet with {context_dim}-wide text context"
                     f"{' and a vector input' if pooled else ''} is not a supported family; "
                     f"this pack supports {SUPPORTED}")


def for_embedding(embedding: Tensor) -> Family:
    """The family of a stored embedding [B, 77 (+1), D] (files, typed values)."""
    if embedding.ndim != 3:
        raise ValueError(f"an embedding must be [B, tokens, width], got {tuple(embedding.shape)}")
    return by_width(int(embedding.shape[2]), int(embedding.shape[1]) == TOKENS + 1)
