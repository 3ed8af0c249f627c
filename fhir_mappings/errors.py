"""Typed input errors. The front doors map them to HTTP (400/422) or an exit code in one place."""

from __future__ import annotations


class InvalidInput(ValueError):
    """Input we cannot use. `path` names the field (``prefetch.observations.entry[3].resource.status``),
    `message` says what is wrong and quotes the bad value. `status` is the HTTP status a web front door
    should answer: 400 for a malformed request, 422 for well-formed JSON that is not valid FHIR R4."""

    def __init__(self, path: str, message: str, status: int = 400) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message
        self.status = status
