"""Request bodies over APP_MAX_BODY_BYTES are refused with 413 in the shared error shape.

The app's bodies are a username or a list of ids, a few hundred bytes; without a limit a client
could make the server buffer and parse any amount. A pure ASGI middleware, so the body is
counted while it streams in (a missing or lying Content-Length changes nothing) and the route
receives it unchanged when it fits.
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared_contracts.api_errors import error_body


class BodySizeLimit:
    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self.refuse(scope, receive, send, f"body is {int(declared)} bytes")
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # the client left: let the app see the disconnect
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self.refuse(scope, receive, send, "body exceeds the limit")
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def refuse(self, scope: Scope, receive: Receive, send: Send, what: str) -> None:
        message = f"{what}; the limit is {self.max_bytes} bytes"
        body = error_body("payload_too_large", message, [])
        await JSONResponse(body, status_code=413)(scope, receive, send)
