"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with the
status OpenAI uses for the same mistake, so SDKs raise the exception they would raise
against api.openai.com (``BadRequestError`` for 400, ``AuthenticationError`` for 401...)."""

from __future__ import annotations

import json
import re

from starlette.responses import JSONResponse

#: status -> OpenAI's error ``type`` for it.
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_exceeded", 500: "server_error",
               503: "server_error"}


class ApiError(Exception):
    """A request the server refuses (or can't answer), said as OpenAI would say it."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers  # e.g. a 429's Retry-After

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def sse_error(status: int, message: str, code: str | None = None) -> bytes:
    """An error told inside a stream whose 200 has gone out (the openai SDK raises it)."""
    return f"data: {json.dumps(error_body(status, message, code=code))}\n\n".encode()


_PARAM_AT_START = re.compile(r"^([a-z_]+) must\b")


def param_of(message: str) -> str | None:
    """The parameter an engine message is about ("temperature must be ..."), if it says."""
    m = _PARAM_AT_START.match(message)
    return m.group(1) if m else None


def _split_loc(loc) -> tuple[str | None, str | None]:
    """A pydantic error's location as (the parameter, the union member it was tried as):
    ``("body", "stop", "list[str]", 0)`` -> ``("stop", "list[str]")``."""
    names = []
    for part in loc:
        if part == "body":
            continue
        if isinstance(part, str) and ("[" in part or part in _TYPE_TAGS):
            return ".".join(names) or None, part
        names.append(str(part))
    return ".".join(names) or None, None


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "TextPart"}


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One sentence (and the parameter) for pydantic's/FastAPI's validation errors."""
    first = errors[0]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return ("the request body is not valid JSON: send a JSON object (Content-Type: application/json).",
                None)
    param, tag = _split_loc(first.get("loc", ()))
    if kind == "missing" and param is None:
        return "the request has no body: send a JSON object.", None
    where = f"'{param}'" if param else "the request body"
    if tag is not None:  # a union (stop: a string or a list of them): say what it may be
        tags = []
        for e in errors:
            p, t = _split_loc(e.get("loc", ()))
            if p == param and t is not None and t not in tags:
                tags.append(t)
        return f"{where} is not valid: it should be {' or '.join(tags)}.", param
    msg = first.get("msg", "is not valid")
    extra = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{where}: {msg}{extra}.", param
