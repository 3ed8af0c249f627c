"""JSON in and out for the service's HTTP routes: bounded body reading and error answers naming the field."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Request, Response

from fhir_mappings import InvalidInput


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


def error_response(exc: InvalidInput) -> Response:
    return json_response({"error": {"status": exc.status, "field": exc.path, "message": exc.message}}, exc.status)


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, read at most `limit` bytes (413 past it, whatever Content-Length claims)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InvalidInput("(body)", f"{declared} bytes; requests over {limit} bytes are refused", 413)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InvalidInput("(body)", f"over {limit} bytes; requests over {limit} bytes are refused", 413)
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise InvalidInput("(body)", "empty; expected a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput("(body)", f"malformed JSON: {exc}") from None
