"""ComfyUI entry point of the NTI photo-edit pack (DDIM inversion → Null-text → Prompt-to-Prompt).

Importable without ComfyUI (pytest imports this file while collecting tests/): the nodes, which
import ``comfy_api``, are loaded only when ComfyUI is importable. ComfyUI loads the pack through
``comfy_entrypoint`` (V3 schema; the minimum ComfyUI is pyproject.toml's requires-comfyui); the frontend
files are in ./web.
"""

import importlib.util

WEB_DIRECTORY = "./web"

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import NTIExtension

    async def comfy_entrypoint() -> NTIExtension:
        """Called once by ComfyUI when it loads custom nodes."""
        return NTIExtension()

    __all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
else:
    __all__ = ["WEB_DIRECTORY"]
