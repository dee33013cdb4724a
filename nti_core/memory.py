"""What an optimisation pass keeps for its backward, as the hosts ask their device for it.

``bench/memory.py`` counts, with ``torch.autograd.graph.saved_tensors_hooks``, what one null-text
iteration of the full-size UNets keeps for the backward (fake tensors on a CUDA device, the
attention kernels a GPU runs: flash attention in half precision, memory-efficient attention in
fp32). Per latent pixel and per byte of the compute dtype that is nearly the same for every
family, so one measured coefficient per family scales it to any image size and dtype:

    backward bytes ≈ per_pixel[family] · h · w · bytes(dtype)       (one UNet row: ∅'s pass)

With gradient checkpointing only the layers' inputs stay, plus one layer's activations while
it is recomputed. The coefficients are measurements (``bench/memory.py`` prints them), not
bounds: the hosts use them to ask for memory and to decide checkpointing, never to refuse.
"""

from __future__ import annotations

import torch

# Elements kept for the backward per latent pixel (h·w of the latent), one UNet row, measured
# by bench/memory.py (SD 1.5 at 512², SD 2.1 at 768², SDXL at 1024²); checkpointed: the
# iteration's live peak above the weights (the layers' inputs and one layer recomputed).
SAVED_PER_PIXEL = {"sd1": 149_100, "sd2": 114_000, "sdxl": 298_000}
CHECKPOINTED_PER_PIXEL = {"sd1": 28_100, "sd2": 25_500, "sdxl": 21_000}
# Free memory must exceed the backward's estimate by this factor, else checkpointing goes on:
# the allocator's fragmentation, kernel workspaces and the pass's transients are not counted.
HEADROOM = 1.25


def backward_bytes(family: str, latent_hw: tuple[int, int], dtype: torch.dtype,
                   checkpointing: bool = False) -> int:
    """Bytes one optimisation pass keeps for its backward (see the module docstring)."""
    table = CHECKPOINTED_PER_PIXEL if checkpointing else SAVED_PER_PIXEL
    h, w = latent_hw
    return int(table[family] * h * w * dtype.itemsize)


def weight_copy_bytes(module: torch.nn.Module, compute: torch.dtype) -> int:
    """Bytes of the per-call weight copies the backward keeps when the UNet computes in another
    dtype than its weights' (ComfyUI's manual cast: precision fp32 on a half model); 0 when
    the dtypes agree (the weights themselves are kept, not copies)."""
    return sum(p.numel() * compute.itemsize for p in module.parameters() if p.dtype != compute)


def fits(need: int, free: int) -> bool:
    """Whether ``need`` bytes fit in ``free`` with ``HEADROOM`` to spare."""
    return need * HEADROOM <= free


def checkpointing_needed(family: str, latent_hw: tuple[int, int], dtype: torch.dtype,
                         device: torch.device, extra: int = 0) -> bool:
    """Whether the backward (plus ``extra`` bytes, e.g. an fp32 copy of half weights) would not
    fit in the free memory of a CUDA ``device``; False elsewhere (CPU memory is the system's,
    and no other device reports its free memory here)."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return not fits(backward_bytes(family, latent_hw, dtype) + extra, free)
