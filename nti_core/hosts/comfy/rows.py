"""ComfyUI's batch layout ↔ the controller's ``Rows``: chunks (``cond_or_uncond``) of whole latent
batches, and the UNet calls a batch of labelled rows needs."""

from __future__ import annotations

import torch

from ...denoiser import Rows


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
