"""The pack's custom ComfyUI types (prefix NTI_) and the edit plan value."""

from __future__ import annotations

from dataclasses import dataclass

from comfy_api.latest import io
from torch import Tensor

from ..nti_core.attention.plan import P2PSpec

# Values travelling on these sockets: nti_core.trajectory.Trajectory (the DDIM pivot),
# nti_core.trajectory.UncondEmbeddings (per-step ∅), EditPlan below and
# nti_core.attention.maps.AttentionMaps (a run's cross-attention per step, the LocalBlend mask).
Trajectory = io.Custom("NTI_TRAJECTORY")
Uncond = io.Custom("NTI_UNCOND")
EditPlanType = io.Custom("NTI_EDIT_PLAN")
Attention = io.Custom("NTI_ATTENTION")
Values = io.Custom("NTI_VALUES")  # nti_core.trajectory.ValueEmbeddings (StyleDiffusion)


@dataclass(frozen=True)
class EditPlan:
    """A Prompt-to-Prompt edit ready to sample: the user's spec and CLIP's prompt embeddings.

    targets [K, 77, D] (SDXL [K, 78, 2048]: ``nti_core.family``; one row per target prompt);
    source_embedding [1, 77, D] is the same CLIP's encoding of ``spec.source``, compared with
    the inversion's to catch another CLIP.
    The controller is built at sampling time, when the number of steps is known.
    """

    spec: P2PSpec
    targets: Tensor
    source_embedding: Tensor

    @property
    def num_targets(self) -> int:
        return len(self.spec.targets)

    @property
    def source(self) -> str:
        return self.spec.source
