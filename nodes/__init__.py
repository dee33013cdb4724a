"""The pack's ComfyUI nodes (V3 schema): one module per node, custom types in ``types``."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import routes  # noqa: F401  (registers the token view's route on ComfyUI's server)
from .attention_maps import NTIAttentionMaps
from .ddim_invert import NTIDDIMInvert
from .edit_plan import NTIAttentionEditPlan
from .load_inversion import NTILoadInversion
from .null_text import NTINullTextOptimize
from .p2p_sample import NTIP2PSample
from .p2p_sweep import NTIP2PSweep
from .save_inversion import NTISaveInversion
from .style_invert import NTIStyleInvert

NODES: list[type[io.ComfyNode]] = [
    NTIDDIMInvert,
    NTINullTextOptimize,
    NTIStyleInvert,
    NTIAttentionEditPlan,
    NTIP2PSample,
    NTIP2PSweep,
    NTISaveInversion,
    NTILoadInversion,
    NTIAttentionMaps,
]


class NTIExtension(ComfyExtension):
    """Hands ComfyUI the node list."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
