"""Attention controllers that read maps: the pass-through and the cross-attention store.

A controller sees projected q/k/v and the labels of each row (branch, slot); it never counts
calls nor assumes [uncond | cond] halves. Rows of each branch are always processed as their own
sub-batch, so a batch gives the same result whether both branches arrive in one call or two.
Maps are softmax(QKᵀ/√d) averaged over heads (P2P's ``AttentionStore``, Hertz et al. 2022).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from ..denoiser import Rows, Site, attention_probs, merge_heads, sdpa, split_heads

MAX_MAP_PIXELS = 32 * 32  # the reference stores / injects only for query maps up to 32×32

Branch = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # (q, k, v, row_index) → out


def probs_times_v(p: Tensor, v: Tensor) -> Tensor:
    """Attention output from probabilities: p [B, h, Nq, Nk], v [B, Nk, h·d] → [B, Nq, h·d]."""
    return merge_heads(torch.matmul(p, split_heads(v, p.shape[1]).to(p.dtype))).to(v.dtype)


def by_branch(q: Tensor, k: Tensor, v: Tensor, rows: Rows, uncond: Branch, cond: Branch) -> Tensor:
    """Run ``uncond`` on the unconditional rows and ``cond`` on the conditional rows, reassembled.

    Each function gets its sub-batch and the indices of those rows in the call.
    """
    if len(rows) != q.shape[0]:
        raise ValueError(f"rows label {len(rows)} rows but q has batch {q.shape[0]}")
    branch = rows.branch.to(q.device)
    if bool(branch.all()):
        return cond(q, k, v, torch.arange(q.shape[0], device=q.device))
    if not bool(branch.any()):
        return uncond(q, k, v, torch.arange(q.shape[0], device=q.device))
    iu, ic = (~branch).nonzero().squeeze(1), branch.nonzero().squeeze(1)
    out_u = uncond(q[iu], k[iu], v[iu], iu)
    out_c = cond(q[ic], k[ic], v[ic], ic)
    order = torch.cat([iu, ic]).argsort()
    return torch.cat([out_u, out_c])[order]


class Identity:
    """No edit, nothing read: plain scaled-dot-product attention."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, heads: int, site: Site,
               hw: tuple[int, int], step: int, rows: Rows) -> Tensor:
        return sdpa(q, k, v, heads)

    def after_step(self, step: int, latents: Tensor) -> Tensor:
        return latents


class AttentionStore:
    """Stores conditional cross-attention maps (mean over heads) of query maps ≤ ``max_pixels``.

    ``sizes`` limits the store to those query sizes (LocalBlend reads one); ``max_pixels = 0``
    stores nothing, so every layer the edit leaves alone runs the fused kernel.
    Keeps, per (site, slot), the sum over calls of the [Nq, Nk] map and the number of calls
    (``average`` = sum / count, ``sums`` = the reference's ``attention_store``); optionally the
    maps of chosen steps (latest call wins) for StyleDiffusion's attention loss; and with
    ``step_means`` the per-step mean over layers of each size (what the attention-map view
    averages over a step range: [h·w, L] per step, size and slot). Sums are detached; step maps
    keep the graph when ``detach=False``.
    """

    def __init__(
        self,
        max_pixels: int = MAX_MAP_PIXELS,
        record_steps: Iterable[int] | bool = False,
        record_hw: Iterable[tuple[int, int]] | None = None,
        detach: bool = True,
        step_means: bool = False,
        sizes: Iterable[tuple[int, int]] | None = None,
    ) -> None:
        self.max_pixels = max_pixels
        self.sizes = None if sizes is None else {(int(h), int(w)) for h, w in sizes}
        self.record_steps = record_steps if isinstance(record_steps, bool) else set(record_steps)
        self.record_hw = None if record_hw is None else {tuple(hw) for hw in record_hw}
        self.detach = detach
        self.step_means = step_means
        self.reset()

    def reset(self) -> None:
        """Forget every stored map."""
        self._sum: dict[tuple[Site, int], Tensor] = {}
        self._count: dict[tuple[Site, int], int] = {}
        self._hw: dict[Site, tuple[int, int]] = {}
        self._steps: dict[int, dict[tuple[Site, int], Tensor]] = {}
        self._step_sum: dict[tuple[int, tuple[int, int], int], Tensor] = {}
        self._step_n: dict[tuple[int, tuple[int, int], int], int] = {}

    def wants(self, site: Site, hw: tuple[int, int]) -> bool:
        """Whether maps of this layer are stored (cross-attention with Nq ≤ max_pixels, of one of
        ``sizes`` when given)."""
        return (site.cross and hw[0] * hw[1] <= self.max_pixels
                and (self.sizes is None or tuple(hw) in self.sizes))

    def _step_wanted(self, step: int, hw: tuple[int, int]) -> bool:
        steps = self.record_steps
        on = steps if isinstance(steps, bool) else step in steps
        return on and (self.record_hw is None or tuple(hw) in self.record_hw)

    def record(self, site: Site, hw: tuple[int, int], step: int, slots: Tensor, maps: Tensor) -> None:
        """Add maps [n, Nq, Nk] (head-averaged) of the conditional rows with these ``slots`` [n]."""
        self._hw[site] = (int(hw[0]), int(hw[1]))
        keep_step = self._step_wanted(step, hw)
        for slot, m in zip(slots.tolist(), maps, strict=True):
            key = (site, int(slot))
            d = m.detach().float()
            self._sum[key] = self._sum[key] + d if key in self._sum else d.clone()
            self._count[key] = self._count.get(key, 0) + 1
            if keep_step:
                self._steps.setdefault(step, {})[key] = d if self.detach else m.float()
            if self.step_means:
                k = (step, self._hw[site], int(slot))
                self._step_sum[k] = self._step_sum[k] + d if k in self._step_sum else d.clone()
                self._step_n[k] = self._step_n.get(k, 0) + 1

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, heads: int, site: Site,
               hw: tuple[int, int], step: int, rows: Rows) -> Tensor:
        """Attention output [B, Nq, h·d]; conditional cross maps of small layers are recorded."""
        if not self.wants(site, hw) or not bool(rows.branch.any()):
            return sdpa(q, k, v, heads)
        slots = rows.slot.to(q.device)

        def cond(q: Tensor, k: Tensor, v: Tensor, idx: Tensor) -> Tensor:
            p = attention_probs(q, k, heads)
            self.record(site, hw, step, slots[idx], p.mean(1))
            return probs_times_v(p, v)

        return by_branch(q, k, v, rows, lambda q, k, v, _: sdpa(q, k, v, heads), cond)

    def after_step(self, step: int, latents: Tensor) -> Tensor:
        return latents

    # ---- reading -------------------------------------------------------------------------
    def resolutions(self) -> list[tuple[int, int]]:
        """Query-map sizes (h, w) with stored maps."""
        return sorted(set(self._hw.values()))

    def sites(self, hw: tuple[int, int], slot: int = 0) -> list[Site]:
        """Sites with maps of this size for this slot, in the order they were first seen."""
        return [s for (s, sl) in self._sum if sl == slot and self._hw[s] == tuple(hw)]

    def _need(self, hw: tuple[int, int], slot: int) -> list[Site]:
        sites = self.sites(hw, slot)
        if not sites:
            raise KeyError(f"no stored cross-attention maps of size {tuple(hw)} for slot {slot}; "
                           f"stored sizes: {self.resolutions()}")
        return sites

    def sums(self, hw: tuple[int, int], slot: int = 0) -> Tensor:
        """Sum over calls of each layer's map: [layers, h, w, Nk]."""
        maps = [self._sum[(s, slot)] for s in self._need(hw, slot)]
        return torch.stack(maps).reshape(len(maps), hw[0], hw[1], -1)

    def average(self, hw: tuple[int, int], slot: int = 0) -> Tensor:
        """Per-layer map averaged over calls (steps): [layers, h, w, Nk]."""
        sites = self._need(hw, slot)
        maps = [self._sum[(s, slot)] / self._count[(s, slot)] for s in sites]
        return torch.stack(maps).reshape(len(maps), hw[0], hw[1], -1)

    def step_mean(self, step: int, hw: tuple[int, int], slot: int = 0) -> Tensor | None:
        """Mean over the layers of size ``hw`` of the maps at ``step``: [h, w, L] (None when
        none were recorded; needs ``step_means``)."""
        k = (step, tuple(hw), slot)
        if k not in self._step_sum:
            return None
        return (self._step_sum[k] / self._step_n[k]).reshape(hw[0], hw[1], -1)

    def recorded_steps(self) -> list[int]:
        return sorted(self._steps)

    def step_maps(self, step: int, hw: tuple[int, int], slot: int = 0) -> Tensor:
        """The maps recorded at ``step``: [layers, h, w, Nk] (graph kept when detach=False)."""
        got = self._steps.get(step, {})
        maps = [m for (s, sl), m in got.items() if sl == slot and self._hw[s] == tuple(hw)]
        if not maps:
            raise KeyError(f"no maps of size {tuple(hw)} recorded at step {step} for slot {slot}; "
                           f"recorded steps: {self.recorded_steps()}")
        return torch.stack(maps).reshape(len(maps), hw[0], hw[1], -1)


class MapRecorder:
    """Per-head cross-attention maps of one query size, per step, for one row (StyleDiffusion's
    ``ddim_inv_attn`` and its attention loss, REFERENCE §6).

    Records softmax(QKᵀ/√d) [heads, Nq, L] of the row with slot 0 in ``branch`` (True =
    conditional) at every cross-attention layer of the down and up blocks whose query map is
    ``hw`` (the official code reads ``down_cross`` and ``up_cross`` only, never the middle
    block); every other call runs the fused kernel. ``detach=False`` keeps the graph (the loss
    differentiates through it).
    """

    def __init__(self, hw: tuple[int, int], branch: bool = True, detach: bool = True) -> None:
        self.hw = (int(hw[0]), int(hw[1]))
        self.branch, self.detach = branch, detach
        self.maps: dict[int, dict[Site, Tensor]] = {}

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, heads: int, site: Site,
               hw: tuple[int, int], step: int, rows: Rows) -> Tensor:
        if not site.cross or site.block == "middle" or tuple(hw) != self.hw:
            return sdpa(q, k, v, heads)  # every other layer: no row lookup, fused kernel
        mine = ((rows.branch == self.branch) & (rows.slot == 0)).nonzero()
        if mine.numel() == 0:
            return sdpa(q, k, v, heads)
        if mine.numel() != 1:
            raise RuntimeError(f"one row of slot 0 per branch expected, got rows {rows}")
        r = int(mine[0, 0])
        p = attention_probs(q[r : r + 1], k[r : r + 1], heads)  # [1, h, Nq, L]
        self.maps.setdefault(step, {})[site] = p[0].detach() if self.detach else p[0]
        parts = [sdpa(q[:r], k[:r], v[:r], heads)] if r > 0 else []
        parts.append(probs_times_v(p, v[r : r + 1]))
        if r + 1 < q.shape[0]:
            parts.append(sdpa(q[r + 1 :], k[r + 1 :], v[r + 1 :], heads))
        return torch.cat(parts)

    def after_step(self, step: int, latents: Tensor) -> Tensor:
        return latents

    def step_maps(self, step: int) -> Tensor:
        """The maps of ``step``: [layers, heads, Nq, L], layers in call order."""
        got = self.maps.get(step)
        if not got:
            raise KeyError(f"no cross-attention maps of size {self.hw} recorded at step {step} "
                           f"(recorded steps: {sorted(self.maps)})")
        heads = {m.shape[0] for m in got.values()}
        if len(heads) != 1:
            raise ValueError(f"layers at {self.hw} have different head counts {sorted(heads)}")
        return torch.stack(list(got.values()))
