"""CORS for the sandbox's browser-facing endpoints (FHIR gateway, token endpoint, discovery, JWKS).

Browser SMART apps call these from their own origin with ``Authorization: Bearer`` (never cookies), so any
origin may call: ``Access-Control-Allow-Origin: *`` without credentials. The routers add these headers
themselves so they work whether or not the app around them installs a CORS middleware.
"""

from __future__ import annotations

from fastapi import Response

ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
ALLOW_HEADERS = (
    "Authorization, Content-Type, Accept, If-Match, If-None-Exist, If-None-Match, If-Modified-Since, Prefer, "
    "X-Requested-With"
)
EXPOSE_HEADERS = "ETag, Location, Content-Location, Last-Modified, WWW-Authenticate"
MAX_AGE_S = "600"


def cors_headers() -> dict[str, str]:
    """Headers for an actual (non-preflight) response."""
    return {"Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": EXPOSE_HEADERS}


def preflight() -> Response:
    """The answer to an ``OPTIONS`` preflight: every method and header the sandbox accepts, from any origin."""
    return Response(
        status_code=204,
        headers={
            "Access-Control-Allow-Origin": "*",
            "Access-Control-Allow-Methods": ALLOW_METHODS,
            "Access-Control-Allow-Headers": ALLOW_HEADERS,
            "Access-Control-Max-Age": MAX_AGE_S,
        },
    )
