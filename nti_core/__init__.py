"""nti_core: DDIM inversion, null-text optimisation and Prompt-to-Prompt editing of real photos.

Host-agnostic: the math imports torch only; ``hosts.diffusers`` and ``hosts.comfy`` adapt a host's
UNet to the ``Denoiser`` protocol. Importing this package imports no ComfyUI and no diffusers module.
"""

from .inversion import ddim_invert
from .null_text import NullTextOptions, negative_prompt_inversion, null_text_optimize, plain_null
from .sampling import p2p_sample
from .schedule import Grid, ddim_step, make_grid, scaled_linear_alphas_cumprod
from .trajectory import Trajectory, UncondEmbeddings

__all__ = [
    "Grid",
    "NullTextOptions",
    "Trajectory",
    "UncondEmbeddings",
    "ddim_invert",
    "ddim_step",
    "make_grid",
    "negative_prompt_inversion",
    "null_text_optimize",
    "p2p_sample",
    "plain_null",
    "scaled_linear_alphas_cumprod",
]
