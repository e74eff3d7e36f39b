"""The request-size limit: a body over ``--max-request-bytes`` is a 413 before anything parses it.

A body that declares its length (Content-Length) over the limit is refused before a byte
of it is read; one that does not (chunked) is counted as it is read and refused at the
first chunk past the limit, so neither is ever held in memory whole.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmgen.server.errors import APIError

#: 16 MiB: a million-token prompt as text or token ids fits; a runaway upload does not
DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20


class RequestTooLarge(HTTPException):
    """Raised while reading a body past the limit; an HTTPException so FastAPI passes it on as it is."""

    def __init__(self, limit: int) -> None:
        super().__init__(413)
        self.error = APIError(413, f"the request body is larger than this server's limit of {limit} bytes "
                                   "(lmgen serve --max-request-bytes)", code="request_too_large")


class RequestSizeLimit:
    """ASGI middleware enforcing the limit on every HTTP request."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await RequestTooLarge(self.max_bytes).error.response()(scope, receive, send)
            return
        num_bytes = 0

        async def counted_receive() -> Message:
            nonlocal num_bytes
            message = await receive()
            if message["type"] == "http.request":
                num_bytes += len(message.get("body", b""))
                if num_bytes > self.max_bytes:
                    raise RequestTooLarge(self.max_bytes)
            return message

        await self.app(scope, counted_receive, send)


def install_size_limit(app: FastAPI, max_bytes: int) -> None:
    """Refuse bodies over `max_bytes` with an OpenAI-shaped 413."""
    app.add_middleware(RequestSizeLimit, max_bytes=max_bytes)

    @app.exception_handler(RequestTooLarge)
    async def _too_large(request: Request, exc: RequestTooLarge) -> JSONResponse:
        return exc.error.response()
