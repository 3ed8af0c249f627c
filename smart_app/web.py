"""The SMART app's pages (server-rendered Jinja2, no JavaScript), mounted on the service under ``/smart``.

======================================  ==========================================================================
``GET /smart/launch?iss=&launch=``      EHR launch (both given) or standalone launch (no ``launch``; ``iss``
                                        optional: the first of ``IMID_REMS_SMART_ISSUERS``)
``GET /smart/callback``                 the authorization server's answer (``code`` + ``state``, or ``error``)
``GET /smart/s/{sid}/``                 where the launch leads: the view ``appContext`` names, else the patient
                                        page (a patient in context) or the worklist
``GET /smart/s/{sid}/patient``          the patient's REMS picture (prescriber)
``GET /smart/s/{sid}/worklist``         the drafted refills across patients (pharmacist), ``?status=``
``GET /smart/s/{sid}/drafts/{id}``      one draft: pre-checks, edit form, what will be written, decide, history
``POST …/drafts/{id}/edit|approve|reject``  the pharmacist's actions (forms with a CSRF token)
======================================  ==========================================================================

Decisions:

- **Launch security** (SMART App Launch 2.2): ``iss`` must be one of the configured issuers (anything else is
  refused before a single request is made to it); discovery must offer PKCE S256; ``state`` is 256 random
  bits, stored hashed with the PKCE verifier and bound to this browser's cookie, single use, 10 minutes;
  ``aud`` = ``iss``. A failed launch is a page that says what failed and what to do, with a 4xx/5xx status.
- **Sessions** live in the database (`smart_app.sessions`); the browser holds only a random cookie and the
  session id is in the URL, so several EHR tabs on different patients never mix, and any replica can answer.
  The access token is refreshed when it expires within ``IMID_REMS_SMART_REFRESH_MARGIN_S`` (one replica
  refreshes, the others wait for it), before any FHIR call is made with it.
- **Reads with the user's token.** The patient page reads the chart from the EHR with the launch's own
  token (the EHR enforces what this user may see). The worklist comes from our database; patient names on it
  are read with the service's Backend Services client (a pharmacist's launch has no patient in context).
- **Writes as the pharmacist.** An approval from the app writes the prescription with the pharmacist's own
  token (``user/MedicationRequest.crs user/Provenance.c``), so the EHR applies and logs the pharmacist's own
  rights; the periodic retry of a failed write uses the service's client (`ReviewService.approve`).
- **Frames and forms.** Pages send a CSP with ``frame-ancestors`` (``IMID_REMS_SMART_FRAME_ANCESTORS``, default
  ``'self'`` and the EHR origins), no scripts at all, ``Referrer-Policy: no-referrer`` (the URL holds the
  session id) and ``Cache-Control: no-store``. Every form carries the session's CSRF token. Over https the
  cookie is ``SameSite=None; Secure; Partitioned`` (it must reach a cross-site EHR frame); over http
  (development) ``SameSite=Lax``.
- **need_patient_banner / smart_style_url.** The patient banner is shown only when the EHR asks for it. The
  style document is fetched from the EHR's own origin only, and only plain colour / size / font values are
  kept (`smart_app.oauth.sanitize_style`), as CSS custom properties in a nonce'd ``<style>``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any, Final, Protocol
from urllib.parse import quote, urlsplit

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy import Engine

from cds_hooks import refill_store as store
from cds_hooks.backend_auth import BackendAuthError
from cds_hooks.fhir_client import FhirClient, FhirError
from cds_hooks.refill_review import Principal, ReviewError, preview, strengths_for
from cds_hooks.refill_scan import RefillScanner
from cds_hooks.refill_store import Draft
from cds_hooks.refills import describe_failure, load_chart
from cds_hooks.review_api import parse_edit
from cds_hooks.settings import Settings
from fhir_mappings.errors import InvalidInput
from fhir_mappings.medication import AUTHORIZATION_SYSTEM, RISK_CATEGORY_EXTENSION
from fhir_mappings.writes import RefillEdit
from rems.config import Config
from smart_app import sessions
from smart_app.oauth import OAuthFailure, SmartOAuth
from smart_app.picture import patient_name, patient_picture, timeline_rows, timeline_svg
from smart_app.sessions import AppSession, PendingLaunch, SessionError

log = logging.getLogger("imid_rems.smart")

BROWSER_COOKIE: Final = "imid_rems_browser"
REFRESH_LEASE_S: Final = 15.0
REFRESH_WAIT_S: Final = 5.0
MAX_FORM_BYTES: Final = 20_000
HERE = Path(__file__).parent
STATUS_LABELS: Final = {
    "pending": "To review",
    "approved": "Approved, writing",
    "write-failed": "Write failed",
    "written": "Written",
    "rejected": "Rejected",
}


class Host(Protocol):
    """What the service gives the app (`cds_hooks.app.State`)."""

    settings: Settings
    engine: Engine
    http: httpx.AsyncClient | None
    now: Callable[[], datetime]
    zone: tzinfo
    config: Config
    population: Any


class PageError(Exception):
    """Shown as the error page: a heading, the detail, and what the user can do."""

    def __init__(self, status: int, title: str, detail: str, action: str | None = None) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail
        self.action = action or "Open the app again from the EHR."


@dataclass
class View:
    """One request's session, fresh tokens included."""

    session: AppSession
    base: str
    """``/smart/s/{sid}``."""
    principal: Principal | None = None
    notes: list[str] = field(default_factory=list)


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["day"] = lambda d: d.isoformat() if d is not None else "—"
    env.filters["when"] = lambda t: t.strftime("%Y-%m-%d %H:%M") if t is not None else "—"
    return env


class SmartApp:
    def __init__(self, host: Host) -> None:
        self.host = host
        self.settings = host.settings
        self.env = _environment()
        base = (self.settings.public_base_url or "").rstrip("/")
        self.redirect_uri = f"{base}/smart/callback"
        self.secure_cookie = base.startswith("https://")
        self.issuers = self.settings.issuers()
        self._oauth: SmartOAuth | None = None

    # --- plumbing -------------------------------------------------------------------------------------

    @property
    def oauth(self) -> SmartOAuth:
        if self._oauth is None:
            if self.host.http is None:
                raise PageError(503, "The app is starting", "try again in a moment", "Reload the page.")
            self._oauth = SmartOAuth(
                self.host.http, client_id=self.settings.smart_client_id, redirect_uri=self.redirect_uri
            )
        return self._oauth

    def frame_ancestors(self) -> str:
        if self.settings.smart_frame_ancestors:
            return self.settings.smart_frame_ancestors
        origins = {f"{urlsplit(i).scheme}://{urlsplit(i).netloc}" for i in self.issuers}
        return " ".join(["'self'", *sorted(origins)])

    def headers(self, nonce: str) -> dict[str, str]:
        return {
            "Content-Security-Policy": (
                f"default-src 'none'; style-src 'self' 'nonce-{nonce}'; img-src 'self' data:; "
                f"form-action 'self'; base-uri 'none'; frame-ancestors {self.frame_ancestors()}"
            ),
            "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-store",
        }

    def render(self, template: str, status: int = 200, view: View | None = None, **ctx: Any) -> HTMLResponse:
        nonce = secrets.token_urlsafe(16)
        style = view.session.style if view else None
        html = self.env.get_template(template).render(
            view=view, nonce=nonce, ehr_style=style or {}, status_labels=STATUS_LABELS, **ctx
        )
        return HTMLResponse(html, status_code=status, headers=self.headers(nonce))

    def error_page(self, exc: PageError, view: View | None = None) -> HTMLResponse:
        return self.render("error.html", exc.status, view, error=exc)

    def set_browser_cookie(self, response: Response, value: str) -> None:
        if self.secure_cookie:
            response.set_cookie(
                BROWSER_COOKIE, value, path="/smart", httponly=True, secure=True, samesite="none", partitioned=True
            )
        else:
            response.set_cookie(BROWSER_COOKIE, value, path="/smart", httponly=True, samesite="lax")

    # --- launch ---------------------------------------------------------------------------------------

    async def launch(self, request: Request) -> Response:
        params = request.query_params
        iss, launch = params.get("iss"), params.get("launch")
        if launch is not None and not iss:
            raise PageError(400, "The launch is incomplete", "the EHR sent a launch without iss (its FHIR server)")
        if not self.settings.public_base_url:
            raise PageError(
                503,
                "The app is not set up",
                "IMID_REMS_PUBLIC_BASE_URL is not set: the app cannot tell the EHR where to send the sign-in back",
                "Ask your EHR administrator to configure the app.",
            )
        if not self.issuers:
            raise PageError(
                403,
                "The app is not set up for any EHR",
                "IMID_REMS_SMART_ISSUERS lists no FHIR server this app may be launched from",
                "Ask your EHR administrator to configure the app.",
            )
        iss = (iss or self.issuers[0]).rstrip("/")
        if iss not in self.issuers:
            raise PageError(
                403,
                "Launch refused: unknown FHIR server",
                f"the launch names {iss[:200]!r}, which is not a FHIR server this app is registered with",
                "Open the app from your EHR's own menu; if this persists, tell your EHR administrator.",
            )
        try:
            server = await self.oauth.discover(iss)
        except OAuthFailure as exc:
            raise PageError(exc.status, exc.title, str(exc), "Try again; if it persists, tell your EHR team.") from None
        scope = self.settings.smart_scope.split()
        if launch is None:
            scope = [s for s in scope if s != "launch"] + ["launch/patient"]
        pending = PendingLaunch(
            iss=iss,
            launch=launch,
            code_verifier=secrets.token_urlsafe(64),
            nonce=secrets.token_urlsafe(16),
            token_endpoint=server.token_endpoint,
            scope=" ".join(dict.fromkeys(scope)),
        )
        browser = request.cookies.get(BROWSER_COOKIE) or sessions.new_secret()
        state = sessions.new_secret()
        await asyncio.to_thread(sessions.save_launch, self.host.engine, state, browser, pending, self.host.now())
        response = RedirectResponse(self.oauth.authorize_url(server, pending, state=state), status_code=302)
        self.set_browser_cookie(response, browser)
        response.headers["Cache-Control"] = "no-store"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    async def callback(self, request: Request) -> Response:
        params = request.query_params
        state = params.get("state")
        if not state:
            raise PageError(400, "The sign-in answer is incomplete", "it carries no state")
        now = self.host.now()
        try:
            pending = await asyncio.to_thread(
                sessions.take_launch, self.host.engine, state, request.cookies.get(BROWSER_COOKIE), now
            )
        except SessionError as exc:
            raise PageError(403, "Sign-in refused", str(exc)) from None
        if params.get("error"):
            description = params.get("error_description") or ""
            raise PageError(
                403 if params["error"] == "access_denied" else 400,
                "The EHR did not authorize the app",
                f"{params['error'][:100]}{': ' + description[:300] if description else ''}",
            )
        code = params.get("code")
        if not code:
            raise PageError(400, "The sign-in answer is incomplete", "it carries neither a code nor an error")
        try:
            grant = await self.oauth.exchange(pending, code, now)
        except OAuthFailure as exc:
            raise PageError(exc.status, exc.title, str(exc)) from None
        style = await self.oauth.style(grant.smart_style_url, pending.iss) if grant.smart_style_url else None
        browser = request.cookies.get(BROWSER_COOKIE) or ""
        sid = await asyncio.to_thread(
            sessions.create_session,
            self.host.engine,
            browser=browser,
            launch=pending,
            tokens=grant.tokens,
            context={
                "patient": grant.patient,
                "encounter": grant.encounter,
                "fhir_user": grant.fhir_user,
                "need_patient_banner": grant.need_patient_banner,
                "style": style,
                "app_context": grant.app_context,
            },
            now=now,
            lifetime_s=self.settings.smart_session_lifetime_s,
        )
        log.info("SMART session started (patient in context: %s)", grant.patient is not None)
        return RedirectResponse(f"/smart/s/{sid}/", status_code=303, headers={"Cache-Control": "no-store"})

    # --- sessions -------------------------------------------------------------------------------------

    async def open(self, request: Request, sid: str) -> View:
        now = self.host.now()
        try:
            session = await asyncio.to_thread(
                sessions.load_session, self.host.engine, sid, request.cookies.get(BROWSER_COOKIE), now
            )
        except SessionError as exc:
            raise PageError(401, "Session not found", str(exc)) from None
        session = await self.fresh(session)
        return View(session, f"/smart/s/{sid}")

    async def fresh(self, session: AppSession, *, force: bool = False) -> AppSession:
        """`session` with an access token valid for at least the refresh margin (refreshing it if need be)."""
        now = self.host.now()
        margin = timedelta(seconds=self.settings.smart_refresh_margin_s)
        expires = session.tokens.access_expires_at
        if not force and expires - now > margin:
            return session
        engine = self.host.engine
        if not session.tokens.refresh_token:
            if expires > now and not force:
                return session
            await asyncio.to_thread(sessions.end_session, engine, session.id, "access expired", now)
            raise PageError(401, "Your EHR access has expired", "the EHR gave this launch no refresh token")
        if await asyncio.to_thread(sessions.claim_refresh, engine, session, now, REFRESH_LEASE_S):
            try:
                tokens = await self.oauth.refresh(session, now)
            except OAuthFailure as exc:
                if exc.refused:
                    await asyncio.to_thread(sessions.end_session, engine, session.id, f"refresh refused: {exc}", now)
                    raise PageError(401, "Your EHR access could not be renewed", str(exc)) from None
                await asyncio.to_thread(sessions.release_refresh, engine, session)
                if expires > now:
                    return session  # the EHR is briefly unreachable; the current token still works
                raise PageError(503, "Your EHR access could not be renewed", str(exc), "Reload in a moment.") from None
            await asyncio.to_thread(sessions.store_tokens, engine, session, tokens)
            renewed = await asyncio.to_thread(sessions.reload, engine, session.id)
            if renewed is None:
                raise PageError(401, "Session ended", "the session ended while its access was renewed")
            return renewed
        # Another replica is refreshing (or just did): use theirs.
        deadline = asyncio.get_running_loop().time() + REFRESH_WAIT_S
        while True:
            current = await asyncio.to_thread(sessions.reload, engine, session.id)
            if current is None:
                raise PageError(401, "Session ended", "this session has ended: launch the app again")
            if current.version != session.version:
                return current
            if expires > self.host.now() and not force:
                return session
            if asyncio.get_running_loop().time() > deadline:
                raise PageError(503, "Your EHR access is being renewed", "it took too long", "Reload in a moment.")
            await asyncio.sleep(0.1)

    def user_fhir(self, view: View) -> FhirClient:
        http = self.host.http
        assert http is not None  # noqa: S101 (open() ran after start-up)
        return FhirClient(view.session.iss, http, SessionBearer(self, view))

    async def principal(self, view: View) -> Principal:
        population = self.host.population
        if population is None:
            raise PageError(
                503,
                "The refill worklist is not available",
                "the service has no EHR connection for population work (IMID_REMS_FHIR_BASE_URL, "
                "IMID_REMS_BACKEND_CLIENT_ID, IMID_REMS_BACKEND_KEY_FILE)",
                "Ask your administrator to configure it.",
            )
        if view.principal is None:
            try:
                view.principal = await population.introspector.principal(f"Bearer {view.session.tokens.access_token}")
            except ReviewError as exc:
                raise PageError(exc.status, "Your role could not be confirmed", exc.message) from None
        return view.principal

    # --- pages ----------------------------------------------------------------------------------------

    async def home(self, view: View) -> Response:
        context = _app_context(view.session.app_context)
        target = "patient" if view.session.patient else "worklist"
        if context.get("view") == "worklist":
            target = "worklist"
            order = context.get("order")
            if isinstance(order, str) and view.session.patient:
                draft = await asyncio.to_thread(store.find_draft, self.host.engine, view.session.patient, order)
                if draft is not None:
                    return RedirectResponse(f"{view.base}/drafts/{draft.id}", status_code=303)
        elif context.get("view") == "patient" and view.session.patient:
            rule = context.get("rule")
            anchor = f"#finding-{quote(rule)}" if isinstance(rule, str) and rule else ""
            return RedirectResponse(f"{view.base}/patient{anchor}", status_code=303)
        return RedirectResponse(f"{view.base}/{target}", status_code=303)

    async def patient(self, view: View) -> Response:
        pid = view.session.patient
        if not pid:
            raise PageError(
                400,
                "No patient in context",
                "this launch was made without a patient",
                "Open the app from a patient's chart, or use the worklist.",
            )
        host = self.host
        now = host.now()
        scanner = RefillScanner(host.engine, self.user_fhir(view), zone=host.zone, config=host.config)
        try:
            charts = await scanner.fetch_charts([pid], now)
        except FhirError as exc:
            raise PageError(
                502, "The chart could not be read from the EHR", str(exc), "Reload the page; nothing was checked."
            ) from None
        chart = charts.get(pid)
        if chart is None:
            raise PageError(404, "Patient not found", "the EHR returned no Patient for this launch's patient")

        def build() -> Any:
            loaded = load_chart(chart, now=now, zone=host.zone, config=host.config)
            return patient_picture(loaded, now=now, zone=host.zone, config=host.config)

        try:
            picture = await asyncio.to_thread(build)
        except InvalidInput as exc:
            raise PageError(
                502,
                "The chart could not be read",
                describe_failure(exc),
                "Nothing was checked: correct the record in the EHR, then reload.",
            ) from None
        drafts = await asyncio.to_thread(_patient_drafts, host.engine, pid)
        focus = _app_context(view.session.app_context).get("rule")
        return self.render(
            "patient.html",
            view=view,
            picture=picture,
            drafts=drafts,
            focus=focus if isinstance(focus, str) else None,
            svgs={d.drug: timeline_svg(d.timeline) for d in picture.drugs},
            rows={d.drug: timeline_rows(d.timeline) for d in picture.drugs},
        )

    async def worklist(self, view: View, status: str) -> Response:
        principal = await self.principal(view)
        if status not in (*store.STATUSES, "all"):
            raise PageError(400, "Unknown list", f"status {status[:40]!r} is not one of {', '.join(store.STATUSES)}")
        engine = self.host.engine
        drafts = await asyncio.to_thread(
            store.worklist,
            engine,
            status=None if status == "all" else status,  # type: ignore[arg-type]
            limit=200,
        )
        counts = await asyncio.to_thread(store.counts, engine)
        names = await self.patient_names({d.patient_id for d in drafts}, view)
        return self.render(
            "worklist.html",
            view=view,
            principal=principal,
            drafts=drafts,
            counts=counts,
            current=status,
            names=names,
            today=self.host.now().astimezone(self.host.zone).date(),
        )

    async def patient_names(self, ids: set[str], view: View) -> dict[str, str]:
        """Display names of `ids`, read with the service's client; on failure, a note on the page (ids shown)."""
        population = self.host.population
        if not ids or population is None:
            return {}
        found: dict[str, str] = {}
        try:
            ordered = sorted(ids)
            for start in range(0, len(ordered), 100):
                chunk = ordered[start : start + 100]
                for r in await population.fhir.search(f"Patient?_id={','.join(chunk)}&_count={len(chunk)}"):
                    if r.get("resourceType") == "Patient" and isinstance(r.get("id"), str):
                        found[r["id"]] = patient_name(r)[:120]
        except FhirError as exc:
            view.notes.append(f"Patient names could not be read from the EHR ({exc}); patient ids are shown.")
        return found

    async def draft_page(
        self,
        view: View,
        draft_id: str,
        *,
        error: ReviewError | None = None,
        form: Mapping[str, str] | None = None,
        done: str | None = None,
    ) -> Response:
        principal = await self.principal(view)
        engine = self.host.engine
        draft = await asyncio.to_thread(store.get_draft, engine, draft_id)
        if draft is None:
            raise PageError(404, "Draft not found", f"no refill draft {draft_id[:60]!r}", "Go back to the worklist.")
        names = await self.patient_names({draft.patient_id}, view)
        audit = await asyncio.to_thread(store.audit_trail, engine, draft_id)
        to_write = None
        if draft.status == "pending":
            to_write = preview(draft, requester=principal.actor, now=self.host.now(), zone=self.host.zone)
        strengths = sorted(strengths_for(draft.drug, draft.medication_request))
        status = error.status if error else 200
        return self.render(
            "draft.html",
            status,
            view=view,
            principal=principal,
            draft=draft,
            name=names.get(draft.patient_id),
            audit=audit,
            to_write=to_write,
            to_write_json=json.dumps(to_write, indent=2, ensure_ascii=False) if to_write else None,
            summary=_summary(to_write or draft.medication_request),
            strengths=strengths,
            error=error,
            blocking_from_error=list(error.extra.get("blocking", ())) if error else [],
            form=form or _form_defaults(draft),
            done=done,
            pattern=self.settings.authorization_pattern,
        )

    async def act(self, request: Request, view: View, draft_id: str, action: str) -> Response:
        form = await _read_form(request)
        if not view.session.csrf_ok(form.get("csrf")):
            raise PageError(
                403,
                "The form could not be accepted",
                "it is missing this session's form token (CSRF)",
                "Reload the page.",
            )
        population = self.host.population
        principal = await self.principal(view)
        service = population.review
        try:
            version = _version(form)
            if action == "edit":
                edit = _edit(form)
                await service.edit(draft_id, version, edit, principal)
                done = "saved"
            elif action == "approve":
                draft = await service.approve(draft_id, version, principal, writer=self.user_fhir(view))
                done = "written" if draft.status == "written" else "approved"
            else:
                await service.reject(draft_id, version, form.get("reason", ""), principal)
                done = "rejected"
        except ReviewError as exc:
            keep = dict(form) if action == "edit" else None
            return await self.draft_page(view, draft_id, error=exc, form=keep)
        return RedirectResponse(f"{view.base}/drafts/{draft_id}?done={done}", status_code=303)


class SessionBearer:
    """The launch's user token for `FhirClient`, refreshed before it expires; after a 401 the next call
    refreshes it first."""

    def __init__(self, app: SmartApp, view: View) -> None:
        self.app, self.view, self.force = app, view, False

    async def token(self) -> str:
        try:
            self.view.session = await self.app.fresh(self.view.session, force=self.force)
        except PageError as exc:
            raise BackendAuthError(exc.detail) from None
        self.force = False
        return self.view.session.tokens.access_token

    def forget(self) -> None:
        self.force = True


def _app_context(raw: str | None) -> dict[str, Any]:
    """SMART ``appContext`` as our cards send it (a JSON object); anything else is ignored."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _patient_drafts(engine: Engine, patient_id: str) -> list[Draft]:
    return store.patient_drafts(engine, patient_id, ("pending", "write-failed", "approved"))


def _summary(resource: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The prescription in words, for the review page (the JSON follows it)."""
    med = resource.get("medicationCodeableConcept") or {}
    coding = (med.get("coding") or [{}])[0] if isinstance(med, dict) else {}
    dispense = resource.get("dispenseRequest") or {}
    quantity = (dispense.get("quantity") or {}) if isinstance(dispense, dict) else {}
    supply = (dispense.get("expectedSupplyDuration") or {}) if isinstance(dispense, dict) else {}
    dosage = (resource.get("dosageInstruction") or [{}])[0]
    auth = next(
        (
            i.get("value")
            for i in resource.get("identifier") or []
            if isinstance(i, dict) and i.get("system") == AUTHORIZATION_SYSTEM
        ),
        None,
    )
    category = "—"
    for ext in resource.get("extension") or []:
        if isinstance(ext, dict) and ext.get("url") == RISK_CATEGORY_EXTENSION:
            value = ext.get("valueCoding") or {}
            category = f"{value.get('display') or '—'} ({value.get('code') or '?'})"
    return [
        ("Medication", str(med.get("text") or coding.get("display") or "—") if isinstance(med, dict) else "—"),
        ("Status / intent", f"{resource.get('status', '—')} / {resource.get('intent', '—')}"),
        ("Directions", str(dosage.get("text") or "—") if isinstance(dosage, dict) else "—"),
        ("Quantity", f"{quantity.get('value', '—')} {quantity.get('unit') or quantity.get('code') or ''}".strip()),
        ("Days' supply", f"{supply.get('value', '—')} {supply.get('unit') or 'days'}"),
        ("Refills", str(dispense.get("numberOfRepeatsAllowed", "—")) if isinstance(dispense, dict) else "—"),
        ("Risk category", category),
        ("Authorization number", str(auth) if auth else "none (required before approval)"),
        ("Prescriber (requester)", str((resource.get("requester") or {}).get("reference") or "set at approval")),
    ]


def _form_defaults(draft: Draft) -> dict[str, str]:
    r = draft.medication_request
    dispense = r.get("dispenseRequest") or {}
    quantity = (dispense.get("quantity") or {}).get("value", "")
    supply = (dispense.get("expectedSupplyDuration") or {}).get("value", "")
    return {
        "supply_days": str(supply),
        "quantity": str(quantity),
        "dose_mg": "",
        "authorization_number": draft.authorization_number or "",
        "note": "",
    }


async def _read_form(request: Request) -> dict[str, str]:
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise PageError(413, "The form is too large", f"over {MAX_FORM_BYTES} bytes", "Go back and shorten it.")
    try:
        form = await request.form()
    except Exception:  # python-multipart's parse errors: a malformed form is the sender's fault
        raise PageError(400, "The form could not be read", "it is not a valid form submission") from None
    return {k: v for k, v in form.items() if isinstance(v, str)}


def _whole(raw: str, field: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ReviewError(422, f"expected a whole number, got {raw.strip()[:20]!r}", field=field) from None


def _version(form: Mapping[str, str]) -> int:
    version = _whole(form.get("version") or "", "version")
    if version < 1:
        raise ReviewError(422, "the draft version you reviewed (a positive integer) is required", field="version")
    return version


def _edit(form: Mapping[str, str]) -> RefillEdit:
    """The edit form as the review API's edit body (`parse_edit`: the same checks and the same field names),
    with only the fields the pharmacist changed (an unchanged field is left as it is)."""
    body: dict[str, Any] = {"version": _version(form)}

    def changed(key: str) -> str | None:
        value = (form.get(key) or "").strip()
        return value if value and value != (form.get(f"original_{key}") or "").strip() else None

    if (supply := changed("supply_days")) is not None:
        body["supplyDays"] = _whole(supply, "supplyDays")
    if (quantity := changed("quantity")) is not None:
        body["quantity"] = quantity
    if dose := (form.get("dose_mg") or "").strip():
        body["doseMg"] = dose
    if note := (form.get("note") or "").strip():
        body["note"] = note
    if (number := changed("authorization_number")) is not None:
        body["authorizationNumber"] = number
    if len(body) == 1:
        raise ReviewError(422, "nothing changed: edit a field, then save", field="(form)")
    return parse_edit(body)[1]


def router(host: Host) -> APIRouter:
    app = SmartApp(host)
    api = APIRouter(prefix="/smart")

    async def guarded(call: Callable[[], Any], view: View | None = None) -> Response:
        try:
            result: Response = await call()
            return result
        except PageError as exc:
            return app.error_page(exc, view)

    @api.get("/launch")
    async def launch(request: Request) -> Response:
        return await guarded(lambda: app.launch(request))

    @api.get("/callback")
    async def callback(request: Request) -> Response:
        return await guarded(lambda: app.callback(request))

    @api.get("/static/app.css")
    async def css() -> Response:
        return FileResponse(
            HERE / "static" / "app.css", media_type="text/css", headers={"Cache-Control": "max-age=300"}
        )

    async def with_view(request: Request, sid: str, page: Callable[[View], Any]) -> Response:
        try:
            view = await app.open(request, sid)
        except PageError as exc:
            return app.error_page(exc)
        return await guarded(lambda: page(view), view)

    @api.get("/s/{sid}/")
    async def home(sid: str, request: Request) -> Response:
        return await with_view(request, sid, app.home)

    @api.get("/s/{sid}/patient")
    async def patient(sid: str, request: Request) -> Response:
        return await with_view(request, sid, app.patient)

    @api.get("/s/{sid}/worklist")
    async def worklist(sid: str, request: Request) -> Response:
        status = request.query_params.get("status", "pending")
        return await with_view(request, sid, lambda v: app.worklist(v, status))

    @api.get("/s/{sid}/drafts/{draft_id}")
    async def draft(sid: str, draft_id: str, request: Request) -> Response:
        done = request.query_params.get("done")
        return await with_view(request, sid, lambda v: app.draft_page(v, draft_id, done=done))

    @api.post("/s/{sid}/drafts/{draft_id}/{action}")
    async def act(sid: str, draft_id: str, action: str, request: Request) -> Response:
        if action not in ("edit", "approve", "reject"):
            return app.error_page(PageError(404, "Not found", f"no action {action[:20]!r}", "Go back."))
        return await with_view(request, sid, lambda v: app.act(request, v, draft_id, action))

    return api
