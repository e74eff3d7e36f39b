"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the right status.

Every path a bad request can take ends here as a 4xx: pydantic validation, lmgen's
InvalidArgumentError (raised by SamplingParams and the engine), chat-template errors
and the server's own checks. Only a bug in lmgen is a 500.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import fields
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmgen.errors import InvalidArgumentError
from lmgen.loader.tokenizer import ChatTemplateError
from lmgen.params import SamplingParams

logger = logging.getLogger(__name__)

_SAMPLING_FIELDS = frozenset(f.name for f in fields(SamplingParams))
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "list", "dict"})


class APIError(Exception):
    """An error the API reports to the client as-is."""

    def __init__(self, status_code: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_invalid_argument(exc: ValueError, renames: dict[str, str] | None = None,
                          prompt_field: str = "prompt") -> APIError:
    """A 400 for lmgen's InvalidArgumentError (or a template's ValueError), naming the field.

    SamplingParams and the engine start their messages with the field's name
    ("temperature must be >= 0", "the prompt has 300 tokens..."); `renames` maps a
    SamplingParams name to the API's (e.g. logprobs -> top_logprobs for chat).
    """
    message = str(exc)
    if isinstance(exc, ChatTemplateError):
        return bad_request(message, "messages")
    words = re.findall(r"[a-z_]+", message.lower())
    param = next((w for w in words[:2] if w in _SAMPLING_FIELDS), None)
    if param is None and "prompt" in words:
        param = prompt_field
    elif param is not None:
        param = (renames or {}).get(param, param)
    code = "context_length_exceeded" if "context" in words else None
    return bad_request(message, param, code)


def _field_path(loc: tuple) -> str | None:
    """"messages.0.content" from pydantic's loc, without "body" and the tags of union members (types, and
    models, whose names are capitalized where the API's fields are snake_case)."""
    parts = [str(part) for part in loc if part != "body"
             and not (isinstance(part, str) and ("[" in part or part in _TYPE_TAGS or part.startswith("function-")
                                                 or part[:1].isupper()))]
    return ".".join(parts) or None


def _validation_error(exc: RequestValidationError) -> APIError:
    # A value that fits no member of a union fails once per member: report the deepest failure.
    error = max(exc.errors(), key=lambda e: len(_field_path(e.get("loc", ())) or ""))
    param = _field_path(error.get("loc", ()))
    kind = error.get("type", "")
    if kind == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {error.get('ctx', {}).get('error', '')}".strip())
    if kind == "missing" and param is None:
        return bad_request("the request body is missing: send a JSON object")
    if kind == "extra_forbidden":
        return bad_request(f"unknown field {param!r}: this server does not accept it", param)
    if kind == "missing":
        return bad_request(f"{param} is required", param)
    return bad_request(f"{param}: {error.get('msg', 'invalid value')}" if param else error.get("msg", "bad request"),
                       param)


def install_handlers(app: FastAPI) -> None:
    """Route every exception to an OpenAI-shaped JSON response."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(InvalidArgumentError)
    async def _invalid_argument(request: Request, exc: InvalidArgumentError) -> JSONResponse:
        return from_invalid_argument(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return APIError(exc.status_code, message, type=kind, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error",
                        code="internal_error").response()


def sse_error(error: APIError) -> str:
    """The final Server-Sent Event of a stream that failed after it began."""
    return f"data: {json.dumps(error.body())}\n\n"
