"""The SMART app refuses to launch, with a page that says why, when it is not set up: no public URL (it could not
name its redirect URI) or no EHR it may be launched from. Nothing is sent anywhere."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.support.cds_server import Clock, run_cds_server


@contextmanager
def client(tmp_path: Path, **settings: Any) -> Iterator[httpx.Client]:
    """The service over real HTTP; `public_base_url` is None unless given (run_cds_server would set it)."""
    settings.setdefault("public_base_url", None)
    database = f"sqlite:///{tmp_path / 'db.sqlite'}"
    with (
        run_cds_server(Clock(), database_url=database, cds_auth="off", **settings) as server,
        httpx.Client(base_url=server.base, trust_env=False, timeout=10) as http,
    ):
        yield http


def test_no_public_url_refuses_launches(tmp_path: Path) -> None:
    with client(tmp_path, smart_issuers="https://ehr.example/fhir") as c:
        page = c.get("/smart/launch", params={"iss": "https://ehr.example/fhir", "launch": "x"})
    assert page.status_code == 503
    assert "IMID_REMS_PUBLIC_BASE_URL" in page.text and "The app is not set up" in page.text
    assert "imid_rems_browser" not in page.cookies


def test_no_issuers_refuses_every_launch(tmp_path: Path) -> None:
    with client(tmp_path, public_base_url="https://rems.example") as c:
        page = c.get("/smart/launch", params={"iss": "https://ehr.example/fhir", "launch": "x"})
        standalone = c.get("/smart/launch")
    assert page.status_code == standalone.status_code == 403
    assert "IMID_REMS_SMART_ISSUERS" in page.text
    assert "frame-ancestors 'self'" in page.headers["content-security-policy"]


def test_frame_ancestors_follow_the_issuers_or_the_setting(tmp_path: Path) -> None:
    with client(tmp_path, public_base_url="https://rems.example", smart_issuers="https://ehr.example:8443/fhir") as c:
        default = c.get("/smart/launch", params={"iss": "https://evil.example/fhir", "launch": "x"})
    with client(tmp_path, public_base_url="https://rems.example", smart_frame_ancestors="https://portal.example") as c:
        configured = c.get("/smart/launch")
    assert default.status_code == 403
    assert default.headers["content-security-policy"].endswith("frame-ancestors 'self' https://ehr.example:8443")
    assert configured.headers["content-security-policy"].endswith("frame-ancestors https://portal.example")
