"""The PNGs the command line writes besides the images: per-word attention maps, the
LocalBlend masks, the sweep grid and the optimisation's loss curve."""

from __future__ import annotations

from pathlib import Path

from ..attention.plan import P2PSpec


def attention_pngs(controller, spec: P2PSpec, tokenizer, num_steps: int, images, latents,
                   out: Path) -> list[str]:
    """Per-word cross-attention of every row (all steps, maps at a quarter of the latent side)
    over its image, and the LocalBlend masks: attention_source.png, attention_edit_k.png,
    blend_mask_k.png."""
    import numpy as np
    from PIL import Image

    from ..alignment import tokenize
    from ..attention.maps import AttentionMaps, average_maps, size_of, word_maps
    from ..images import heatmap_grid

    blend = controller.local_blend
    hw = (int(latents.shape[-2]), int(latents.shape[-1]))
    prompts = (spec.source, *spec.targets)
    am = AttentionMaps.from_store(controller.store, prompts, num_steps, hw,
                                  None if blend is None else blend.last_mask)
    quarter = size_of("1/4", hw)
    sizes = quarter if quarter[0] in am.sizes else None
    written = []
    for row, prompt in enumerate(prompts):
        name = "attention_source" if row == 0 else f"attention_edit_{row}"
        maps, words = word_maps(average_maps(am, row, sizes, range(am.num_steps)),
                                tokenize(tokenizer, prompt))
        grid = heatmap_grid(images[row : row + 1], maps, words, f"'{prompt}' (all steps)")
        p = out / f"{name}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(p)
        written.append(str(p))
        if am.mask is not None and row > 0:
            m = (am.mask[row, 0].cpu().numpy() * 255).astype(np.uint8)
            mp = out / f"blend_mask_{row}.png"
            Image.fromarray(m).save(mp)
            written.append(str(mp))
    return written


def sweep_png(images, cells, out: Path) -> Path:
    """sweep.png: the cells' images [R·C, 3, H, W] in [−1, 1] (``nti_core.sweep``), labelled
    with the swept values."""
    from PIL import Image

    from ..images import labelled_grid

    p = out / "sweep.png"
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labelled_grid(images, *cells.labels(), cells.title)).save(p)
    return p


def loss_png(first: list[float], final: list[float], out: Path) -> Path:
    """loss.png: each optimised step's first and final loss (the nodes' loss curve)."""
    from PIL import Image

    from ..images import loss_plot

    p = out / "loss.png"
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(loss_plot(first, final)).save(p)
    return p
