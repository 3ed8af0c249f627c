"""The CDS Hooks 2.0 HTTP service (FastAPI): discovery, one endpoint per service, feedback.

- ``GET /cds-services`` lists `cds_hooks.services.SERVICES` (the same declarations route the calls).
- ``POST /cds-services/{id}`` runs the hook: bad input is 400 / 413 / 422 with the field named; data we
  could neither get prefetched nor fetch is 412; a crash is a logged 500, never an empty 200.
- ``POST /cds-services/{id}/feedback`` stores the outcome with the card's rule code.
- Every call needs a CDS client's signed JWT (`cds_hooks.auth`) unless auth is switched off for
  local development, which is logged loudly at start and on every call.

Hot-path choices (measured in `tests/bench_http.py`): the body is read once and parsed with orjson;
FHIR resources stay plain dicts with targeted checks (`fhir_mappings`); the rules run inline (no thread
hop); nothing is fetched for a non-IMiD order; the answer is serialised with orjson.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.middleware.cors import CORSMiddleware

from cds_hooks import auth
from cds_hooks import feedback as fb
from cds_hooks.backend_auth import BackendAuth, credentials_from_pem
from cds_hooks.db import make_engine, migrate
from cds_hooks.fhir_client import FhirClient
from cds_hooks.http_json import error_response, json_response, read_json
from cds_hooks.models import CdsResponse
from cds_hooks.prefetch import FhirSource, check_fhir_server, fetch_missing, fetch_referenced, missing_keys
from cds_hooks.refill_review import Introspector, ReviewError, ReviewService
from cds_hooks.refill_scan import RefillScanner, ScanOptions
from cds_hooks.review_api import error_response as review_error_response
from cds_hooks.review_api import router as review_router
from cds_hooks.service import check_request_drafts, drafts_of, evaluate_request, may_skip, parse_context, parse_request
from cds_hooks.services import BY_ID, SERVICES, CdsService
from cds_hooks.settings import Settings, get_settings
from fhir_mappings import InvalidInput
from smart_app.web import router as smart_router

log = logging.getLogger("imid_rems.service")


class Authenticator:
    """The trusted CDS clients, their keys and the replay cache: `check` turns an Authorization header
    into the calling client's ``iss``, or a 401 that says what is wrong."""

    def __init__(self, settings: Settings, engine: Any, http: httpx.AsyncClient) -> None:
        self.clients = auth.load_clients(settings.cds_clients)
        if not self.clients:
            raise auth.ClientConfigError(
                "IMID_REMS_CDS_CLIENTS lists no CDS client: nobody could call the service. Configure one, or "
                "switch auth off for local development (IMID_REMS_CDS_AUTH=off / --insecure-no-auth)."
            )
        if not settings.public_base_url:
            raise auth.ClientConfigError(
                "IMID_REMS_PUBLIC_BASE_URL is required when auth is on: the JWT aud is checked against this "
                "service's own URL, never against the Host header a caller sends."
            )
        self.keys = auth.JwksStore(self.clients, http=http)
        self.replay = auth.ReplayCache(engine)

    async def check(self, authorization: str | None, audience: str) -> str:
        try:
            token = auth.bearer_token(authorization)
            claims = await auth.verify(
                token, audience=audience, clients=self.clients, keys=self.keys, replay=self.replay
            )
        except auth.JwksUnavailable as exc:
            raise InvalidInput("Authorization", str(exc), 503) from None
        except auth.AuthError as exc:
            raise InvalidInput("Authorization", str(exc), 401) from None
        return claims.iss


def build_authenticator(settings: Settings, engine: Any, http: httpx.AsyncClient) -> Authenticator | None:
    return None if settings.cds_auth == "off" else Authenticator(settings, engine, http)


class State:
    """What one app instance holds: settings, database engine, HTTP client, authenticator. Nothing here
    is per-user or per-session, so replicas behind a load balancer are interchangeable."""

    def __init__(self, settings: Settings, now: Callable[[], datetime]) -> None:
        self.settings = settings
        self.now = now
        self.zone = settings.zone()
        self.config = settings.rems_config()
        self.engine = make_engine(settings.database_url)
        self.smart = settings.smart_launch_url
        self.http: httpx.AsyncClient | None = None
        self.auth: Authenticator | None = None
        self.population: Population | None = None
        self._warned_at = 0.0

    def warn_unauthenticated(self, path: str) -> None:
        """With auth off, say so again at most once a minute (every call would drown the log)."""
        moment = time.monotonic()
        if moment - self._warned_at >= 60:
            self._warned_at = moment
            log.warning("unauthenticated CDS calls are being answered (auth is off), e.g. %s", path)


RETRY_SOON_S = 30.0


class Population:
    """The population side, when the EHR's FHIR server and our Backend Services client are configured: the
    refill scan (periodic), the review API's service and its token introspection."""

    def __init__(self, settings: Settings, state: State, http: httpx.AsyncClient) -> None:
        assert settings.fhir_base_url and settings.backend_client_id and settings.backend_key_file  # noqa: S101
        creds = credentials_from_pem(
            settings.backend_key_file.read_bytes(), client_id=settings.backend_client_id, scope=settings.backend_scope
        )
        self.state = state
        self.backend = BackendAuth(settings.fhir_base_url, creds, http)
        self.fhir = FhirClient(settings.fhir_base_url, http, self.backend)
        self.scanner = RefillScanner(
            state.engine,
            self.fhir,
            zone=state.zone,
            config=state.config,
            options=ScanOptions(
                horizon_days=settings.refill_horizon_days,
                page_size=settings.refill_scan_page_size,
                batch_size=settings.refill_scan_batch_size,
                concurrency=settings.refill_scan_concurrency,
            ),
        )
        self.review = ReviewService(
            state.engine,
            self.fhir,
            self.scanner,
            zone=state.zone,
            config=state.config,
            authorization_pattern=settings.authorization_pattern,
            now=state.now,
        )
        self.introspector = Introspector(self.fhir, self.backend, http, ttl_s=settings.api_token_cache_s)

    async def run_once(self) -> bool:
        """One scan and a retry of unwritten approvals; False when the scan could not list the orders."""
        report = await self.scanner.scan(self.state.now())
        await self.review.retry_writes()
        return report.error is None

    async def periodic(self, interval_s: float) -> None:
        """Scan now, then every `interval_s`. A run that could not reach the EHR is retried sooner (30 s, or
        the interval if shorter); a crash is logged and the schedule goes on."""
        while True:
            started = time.monotonic()
            wait = interval_s
            try:
                if not await self.run_once():
                    wait = min(interval_s, RETRY_SOON_S)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("refill scan failed; next run in %.0f s", RETRY_SOON_S)
                wait = min(interval_s, RETRY_SOON_S)
            await asyncio.sleep(max(1.0, wait - (time.monotonic() - started)))


def build_population(settings: Settings, state: State, http: httpx.AsyncClient) -> Population | None:
    if not (settings.fhir_base_url and settings.backend_client_id and settings.backend_key_file):
        log.info("refill scan and review API off: IMID_REMS_FHIR_BASE_URL / BACKEND_CLIENT_ID / BACKEND_KEY_FILE unset")
        return None
    return Population(settings, state, http)


def create_app(settings: Settings | None = None, *, now: Callable[[], datetime] | None = None) -> FastAPI:
    """The ASGI app. `now` replaces the clock (tests evaluate scenarios at their own date)."""
    settings = settings or get_settings()
    state = State(settings, now or (lambda: datetime.now(UTC)))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        migrate(state.engine)
        timeout = httpx.Timeout(settings.fhir_timeout_s)
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=20)
        async with httpx.AsyncClient(timeout=timeout, limits=limits, follow_redirects=False) as client:
            state.http = client
            state.auth = build_authenticator(settings, state.engine, client)
            state.population = build_population(settings, state, client)
            job = None
            if state.population is not None and settings.refill_scan_interval_s > 0:
                job = asyncio.create_task(state.population.periodic(settings.refill_scan_interval_s))
            if state.auth is None:
                log.warning(
                    "CDS Hooks authentication is OFF (IMID_REMS_CDS_AUTH=off / --insecure-no-auth): any caller "
                    "can call every service. Local development only."
                )
            # Everything loaded at start (code lists, config, models) is long-lived: move it out of the
            # GC's young generations so collections during requests stay short (p99).
            gc.collect()
            gc.freeze()
            try:
                yield
            finally:
                if job is not None:
                    job.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await job
        state.engine.dispose()

    app = FastAPI(
        title="imid-rems CDS Hooks service",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.imid = state
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    app.add_middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type"],
        max_age=600,
    )

    public_base = (settings.public_base_url or "").rstrip("/")

    async def authenticate(request: Request) -> str | None:
        """The calling client's ``iss`` (None when auth is off). Raises InvalidInput(401)."""
        if state.auth is None:
            state.warn_unauthenticated(request.url.path)
            return None
        audience = f"{public_base}{request.url.path}"
        iss: str = await state.auth.check(request.headers.get("authorization"), audience)
        return iss

    @app.exception_handler(ReviewError)
    async def _review(_: Request, exc: ReviewError) -> Response:
        return review_error_response(exc)

    app.include_router(
        review_router(
            lambda: state.population.review if state.population else None,
            lambda: state.population.introspector if state.population else None,
            now=state.now,
        )
    )

    app.include_router(smart_router(state))

    @app.exception_handler(InvalidInput)
    async def _invalid(_: Request, exc: InvalidInput) -> Response:
        response = error_response(exc)
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
        return response

    @app.get("/cds-services")
    async def discovery(request: Request) -> Response:
        await authenticate(request)
        return json_response({"services": [s.discovery() for s in SERVICES]})

    @app.post("/cds-services/{service_id}")
    async def call(service_id: str, request: Request) -> Response:
        await authenticate(request)
        service = _service(service_id)
        raw = await read_json(request, settings.max_body_bytes)
        hook_request = parse_request(raw)
        try:
            return json_response((await run_hook(state, service, hook_request)).to_json())
        except InvalidInput:
            raise
        except Exception:
            log.exception("hook failed: service=%s hookInstance=%s", service.id, hook_request.hookInstance)
            return json_response({"error": {"status": 500, "message": "internal error; nothing was checked"}}, 500)

    @app.post("/cds-services/{service_id}/feedback")
    async def feedback(service_id: str, request: Request) -> Response:
        client_iss = await authenticate(request)
        service = _service(service_id)
        raw = await read_json(request, settings.max_body_bytes)
        items = fb.parse_feedback(raw, service.id, client_iss, state.now())
        stored = fb.store(state.engine, items)
        return json_response({"stored": stored})

    return app


def _service(service_id: str) -> CdsService:
    service = BY_ID.get(service_id)
    if service is None:
        raise InvalidInput("(url)", f"no CDS service {service_id!r}; see GET /cds-services", 404)
    return service


async def run_hook(state: State, service: CdsService, hook_request: Any) -> CdsResponse:
    """Validate, fetch what is missing (in parallel), evaluate, answer."""
    context = parse_context(hook_request, service.hook)
    if may_skip(hook_request, context):
        # Not an IMiD order: validated, answered at once, and the FHIR server is never called.
        return _evaluate(state, service, hook_request, context)
    drafts, _ = drafts_of(hook_request, context)
    prefetch = dict(hook_request.prefetch or {})
    missing = missing_keys(service.prefetch, prefetch)
    # CDS Hooks grants FHIR access with fhirServer *and* fhirAuthorization; a bare fhirServer is not
    # an invitation to query it anonymously.
    http = state.http
    if hook_request.fhirServer and hook_request.fhirAuthorization is not None and http is not None:
        source = FhirSource(check_fhir_server(hook_request.fhirServer), hook_request.fhirAuthorization.access_token)
        check_request_drafts(hook_request, context)  # a malformed order is 400/422 before anything is fetched
        if missing:
            prefetch.update(await fetch_missing(http, source, service.prefetch, missing, hook_request.context))
        extra = await fetch_referenced(http, source, drafts, prefetch)
        if extra is not None:
            prefetch["_referenced"] = extra
    complete = hook_request.model_copy(update={"prefetch": prefetch})
    return _evaluate(state, service, complete, context)


def _evaluate(state: State, service: CdsService, hook_request: Any, context: BaseModel) -> CdsResponse:
    return evaluate_request(
        hook_request,
        now=state.now(),
        zone=state.zone,
        config=state.config,
        service=service,
        smart_launch_url=state.smart,
        context=context,
    )
