"""The sandbox EHR as one ASGI app: SMART authorization server, FHIR gateway, EHR pages.

`create_sandbox_app(config)` mounts:

- `sandbox.smart_auth` — ``/fhir/.well-known/smart-configuration``, ``/auth/authorize``, ``/auth/token``,
  ``/auth/introspect``, ``/auth/jwks``;
- `sandbox.gateway` — ``/fhir/...``: the FHIR base apps and the CDS service are given (token and scope
  checked, forwarded to the Medplum engine);
- `sandbox.ehr` — ``/`` (launcher), ``/ehr/patients/{id}`` (fires the CDS hooks, shows the cards),
  ``/.well-known/jwks.json`` (the key the sandbox signs its CDS Hooks JWTs with);
- ``/ehr/smart-style.json`` — the EHR's SMART style document (`SMART_STYLE`; ``smart_style_url`` in launches).

`default_config` registers the clients `make run` needs:

- ``imid-rems-app`` — the imid-rems SMART app (public client, PKCE): launch ``{service}/smart/launch``,
  redirect ``{service}/smart/callback``;
- ``imid-rems-backend`` — the imid-rems service's SMART Backend Services client (private_key_jwt with the
  key in ``{state_dir}/backend-client-key.pem``, generated on first run), for the pharmacist's
  population work;
- ``imid-rems-cds`` — what the EHR hands the CDS service as ``fhirAuthorization`` (read-only, per call);
- ``sandbox-ehr`` — the EHR pages' own reads.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from sandbox import ehr, gateway
from sandbox.cds_client import CdsClient
from sandbox.config import SandboxConfig, SmartClient
from sandbox.ehr_keys import EhrKey, generate_key, load_key, load_or_create_key, save_key
from sandbox.smart_auth import SmartAuthServer

APP_CLIENT_ID = "imid-rems-app"
BACKEND_CLIENT_ID = "imid-rems-backend"
BACKEND_KEY_FILE = "backend-client-key.pem"

APP_SCOPE = (
    "launch launch/patient openid fhirUser offline_access online_access "
    "patient/*.rs user/*.rs user/MedicationRequest.cu user/Provenance.c"
)
BACKEND_SCOPE = "system/*.rs system/MedicationRequest.cu system/Provenance.c"


SMART_STYLE: dict[str, Any] = {
    "color_background": "#fbfcfd",
    "color_error": "#a8071a",
    "color_highlight": "#5b2a86",
    "color_modal_backdrop": "#1f1f1f",
    "color_success": "#237a3b",
    "color_text": "#1c1c28",
    "dim_border_radius": "4px",
    "dim_font_size": "15px",
    "dim_spacing_size": "12px",
    "font_family_body": "DejaVu Sans, Helvetica, Arial, sans-serif",
    "font_family_heading": "DejaVu Sans, Helvetica, Arial, sans-serif",
}
"""The sandbox EHR's look, as a SMART style document (SMART App Launch 2.2 "Styling"): the app should look like
part of the EHR; its highlight colour (purple) is distinct from imid-rems' own default (blue) so tests can tell."""


def backend_key(state_dir: Path) -> EhrKey:
    """The imid-rems backend client's EC P-384 key, ``{state_dir}/backend-client-key.pem`` (created on first
    use). The sandbox registers its public half; the imid-rems service signs its client assertions with it."""
    path = state_dir / BACKEND_KEY_FILE
    if path.exists():
        return load_key(path)
    key = generate_key()
    save_key(key, path)
    return key


def backend_jwks(state_dir: Path) -> dict[str, Any]:
    return backend_key(state_dir).public_jwks()


def default_config(*, base_url: str, fhir_upstream: str, service_base: str, state_dir: Path | None) -> SandboxConfig:
    """The sandbox of `make run`: imid-rems at `service_base`, the FHIR engine at `fhir_upstream`."""
    clients = [
        SmartClient(
            APP_CLIENT_ID,
            redirect_uris=(f"{service_base}/smart/callback",),
            launch_url=f"{service_base}/smart/launch",
            scope=APP_SCOPE,
            name="imid-rems",
        ),
        SmartClient("imid-rems-cds", scope="user/*.rs", name="imid-rems CDS Hooks service"),
        SmartClient("sandbox-ehr", scope="system/*.rs", name="sandbox EHR"),
    ]
    if state_dir is not None:
        clients.append(
            SmartClient(
                BACKEND_CLIENT_ID,
                token_endpoint_auth_method="private_key_jwt",  # noqa: S106 (a method name)
                jwks=backend_jwks(state_dir),
                scope=BACKEND_SCOPE,
                backend=True,
                name="imid-rems refill scan",
            )
        )
    return SandboxConfig(
        smart_style_url=f"{base_url.rstrip('/')}/ehr/smart-style.json",
        base_url=base_url.rstrip("/"),
        fhir_upstream=fhir_upstream.rstrip("/"),
        cds_services_url=f"{service_base.rstrip('/')}/cds-services",
        clients=tuple(clients),
        state_dir=state_dir,
    )


def create_sandbox_app(config: SandboxConfig) -> FastAPI:
    """The sandbox EHR app for `config` (one process: grants and launches live in its memory)."""
    auth = SmartAuthServer(config)
    key = load_or_create_key(config.state_dir) if config.state_dir is not None else generate_key()
    http = httpx.AsyncClient(timeout=httpx.Timeout(30.0), trust_env=False)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await http.aclose()

    app = FastAPI(title="imid-rems sandbox EHR", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    cds = CdsClient(config.cds_services_url or "", config.base_url, key, http)
    app.include_router(auth.router())
    app.include_router(gateway.router(config, auth))
    app.include_router(ehr.router(config, cds, auth, auth.issue_token, app_client_id=APP_CLIENT_ID))

    @app.get("/ehr/smart-style.json")
    async def smart_style() -> JSONResponse:
        """The EHR's SMART style document (``smart_style_url`` in launches when `default_config` set it)."""
        return JSONResponse(SMART_STYLE, headers={"Cache-Control": "max-age=300"})

    app.state.auth = auth
    app.state.cds = cds
    return app
