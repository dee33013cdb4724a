"""The diffusers host: the ``Denoiser`` protocol on a diffusers ``UNet2DConditionModel``
(``denoiser``), the loaders of a user's model (``models``: diffusers folders of SD 1.x, SD 2.x and
SDXL; ``single_file``: an SD 1.x ``.safetensors`` checkpoint), StyleDiffusion's image encoder
(``vision``) and the demo model that ships with the pack (``demo``).

The only package of nti_core that imports diffusers; the modules import it inside the functions
that need it."""

from .denoiser import DiffusersDenoiser, cast_unet, check_unet, size_ids

__all__ = ["DiffusersDenoiser", "cast_unet", "check_unet", "size_ids"]
