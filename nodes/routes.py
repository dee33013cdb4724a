"""The pack's HTTP route on ComfyUI's server: ``POST /nti_photo_edit/plan_view``, Attention Edit
Plan's token view (web/nti_token_view.js) — the plan's fields in, ``nti_core.plan_view`` out,
tokenised with the family's CLIP tokenizer. A malformed request gets 400 ``{"error": …}``.

Registered on import, once, on ``PromptServer.instance`` (``main.py`` creates it before loading
custom nodes and adds its routes after); outside a server (in-process tests) nothing happens.
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

from ..nti_core.plan_view import MAX_BODY, respond
from .common import family_tokenizer

ROUTE = "/nti_photo_edit/plan_view"


async def read_body(request: web.Request, limit: int = MAX_BODY) -> bytes:
    """The request body, or its first ``limit`` + 1 bytes when it is longer."""
    data = bytearray()
    while len(data) <= limit:
        chunk = await request.content.read(limit + 1 - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


async def plan_view(request: web.Request) -> web.Response:
    body = await read_body(request)
    status, answer = await asyncio.to_thread(respond, body, family_tokenizer)
    return web.json_response(answer, status=status)


def register() -> bool:
    """Add the route to the running ComfyUI's server (once); False outside one."""
    server = getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)
    if server is None:
        return False
    if not any(getattr(r, "path", None) == ROUTE for r in server.routes):
        server.routes.post(ROUTE)(plan_view)
    return True


register()
