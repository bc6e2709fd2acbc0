"""Request body size limit for the service: 413 with a JSON message, before the body is parsed.

The limit is `$CIFAR_MAX_UPLOAD_BYTES` (default 16 MiB) for the whole request body, multipart
framing included. A declared Content-Length over the limit is refused before anything is read;
a body sent without a length (chunked) is counted as it arrives and refused when it passes the
limit, so the server never buffers more than the limit.
"""

from __future__ import annotations

import json
import os
from typing import Any, Awaitable, Callable

DEFAULT_MAX_UPLOAD_BYTES = 16 * 1024 * 1024

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def max_upload_bytes() -> int:
    value = os.environ.get("CIFAR_MAX_UPLOAD_BYTES")
    if not value:
        return DEFAULT_MAX_UPLOAD_BYTES
    try:
        limit = int(value)
    except ValueError:
        raise ValueError(f"CIFAR_MAX_UPLOAD_BYTES={value!r} is not a whole number of bytes") from None
    if limit < 1:
        raise ValueError(f"CIFAR_MAX_UPLOAD_BYTES={value!r} must be at least 1")
    return limit


class BodySizeLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` with 413."""

    def __init__(self, app: Callable[..., Awaitable[None]], max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self, size: str) -> bytes:
        return json.dumps({
            "error": f"request body {size} is over the limit of {self.max_bytes} bytes "
                     f"({self.max_bytes / 2**20:.1f} MiB); send a smaller image",
            "reason": "body_too_large"}).encode()

    async def _reject(self, send: Send, body: bytes) -> None:
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                length = -1
            if length < 0:
                body = json.dumps({"error": f"invalid Content-Length header {declared!r}",
                                   "reason": "bad_request"}).encode()
                await send({"type": "http.response.start", "status": 400,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
            if length > self.max_bytes:
                await self._reject(send, self._message(f"of {length} bytes"))
                return
            await self.app(scope, receive, send)
            return

        received = 0
        rejected = False

        async def counting_receive() -> Message:
            nonlocal received, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    rejected = True
                    await self._reject(send, self._message(f"of more than {self.max_bytes} bytes"))
                    return {"type": "http.disconnect"}  # the app stops reading: client went away
            return message

        async def guarded_send(message: Message) -> None:
            if not rejected:  # the 413 has been sent: drop whatever the app answers after it
                await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not rejected:
                raise
