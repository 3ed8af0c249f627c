"""`imid-rems` command line.

``imid-rems evaluate REQUEST.json [--now ISO] [--tz ZONE] [--config FILE]`` prints the CDS Hooks
response the service answers for a request: ``{"cards": [...]}``. Bad input exits 2 with a message
that names the field; it never prints an empty answer for a request it could not read.

``imid-rems serve [--host 127.0.0.1] [--port 8000] [--insecure-no-auth]`` runs the CDS Hooks service (and,
when the EHR's FHIR server and our Backend Services client are configured, the periodic refill scan and the
review API).

``imid-rems refills scan [--horizon DAYS] [--now ISO]`` runs one refill scan (`cds_hooks.refill_scan`) with
the same settings and prints its report as JSON. Exit 0: complete; 3: complete, but some charts could not be
fetched or read (listed); 1: stopped early (the order listing failed; nothing was withdrawn); 2: bad
configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import ValidationError

from cds_hooks.service import evaluate_request, parse_request
from cds_hooks.services import BY_HOOK
from cds_hooks.settings import Settings, get_settings
from fhir_mappings import InvalidInput
from rems.config import ConfigError, load_config

EXIT_BAD_INPUT = 2


def _now(text: str | None) -> datetime:
    if text is None:
        return datetime.now().astimezone()
    try:
        now = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput("--now", f"not an ISO 8601 date-time: {text!r}") from None
    if now.tzinfo is None:
        raise InvalidInput("--now", f"needs a UTC offset (e.g. 2026-11-21T10:00:00-05:00): {text!r}")
    return now


def _load_json(path: Path, limit: int) -> Any:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InvalidInput(str(path), f"cannot read: {exc.strerror}") from None
    if size > limit:
        raise InvalidInput(str(path), f"{size} bytes; requests over {limit} bytes are refused", 413)
    try:
        return json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        raise InvalidInput(str(path), f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except UnicodeDecodeError:
        raise InvalidInput(str(path), "not UTF-8 text") from None


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    zone = settings.zone()
    if args.tz:
        try:
            zone = ZoneInfo(args.tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise InvalidInput("--tz", f"unknown IANA time zone {args.tz!r}") from None
    config = settings.rems_config()
    if args.config:
        config = load_config(Path(args.config).read_text(encoding="utf-8"))
    request = parse_request(_load_json(Path(args.request), settings.max_body_bytes))
    service = BY_HOOK.get(request.hook)
    if service is None:
        raise InvalidInput("hook", f"no service for hook {request.hook!r}; expected one of {sorted(BY_HOOK)}")
    response = evaluate_request(request, now=_now(args.now), zone=zone, config=config, service=service)
    sys.stdout.write(json.dumps(response.to_json(), indent=2, ensure_ascii=False) + "\n")
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn  # imported here: `evaluate` stays light

    from cds_hooks.app import create_app

    if args.insecure_no_auth:
        settings = settings.model_copy(update={"cds_auth": "off"})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request's full URL at INFO: FHIR queries carry patient ids, which stay out of the log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    app = create_app(settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=False, server_header=False)
    return 0


EXIT_STOPPED = 1
EXIT_SOME_FAILED = 3


def cmd_refills_scan(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    import httpx

    from cds_hooks.app import Population, State
    from cds_hooks.db import migrate

    if args.horizon is not None:
        settings = Settings.model_validate({**settings.model_dump(), "refill_horizon_days": args.horizon})
    if not (settings.fhir_base_url and settings.backend_client_id and settings.backend_key_file):
        sys.stderr.write(
            "imid-rems: error: set IMID_REMS_FHIR_BASE_URL, IMID_REMS_BACKEND_CLIENT_ID and "
            "IMID_REMS_BACKEND_KEY_FILE (the EHR's FHIR server and our SMART Backend Services client)\n"
        )
        return EXIT_BAD_INPUT
    now = _now(args.now)
    state = State(settings, lambda: now)
    migrate(state.engine)

    async def run() -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(settings.fhir_timeout_s)) as http:
            population = Population(settings, state, http)
            report = await population.scanner.scan(now)
            written = await population.review.retry_writes()
            return {**report.as_json(), "writesRetried": written}

    try:
        result = asyncio.run(run())
    finally:
        state.engine.dispose()
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    if result["error"]:
        return EXIT_STOPPED
    return EXIT_SOME_FAILED if result["failed"] else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imid-rems", description="IMiD REMS checks for EHRs.")
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="print the CDS Hooks response for one request file")
    ev.add_argument("request", help="CDS Hooks request JSON (hook, context, prefetch)")
    ev.add_argument("--now", help="evaluation clock, ISO 8601 with offset (default: now)")
    ev.add_argument("--tz", help="clinic IANA time zone (default: $IMID_REMS_CLINIC_TZ or the server's)")
    ev.add_argument("--config", help="institution override TOML for programs/protocol")
    ev.set_defaults(func=cmd_evaluate)
    sv = sub.add_parser("serve", help="run the CDS Hooks HTTP service")
    sv.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    sv.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="accept CDS calls without a signed JWT (local development only; logged loudly)",
    )
    sv.set_defaults(func=cmd_serve)
    refills = sub.add_parser("refills", help="pharmacist refill drafts")
    refills_sub = refills.add_subparsers(dest="refills_command", required=True)
    scan = refills_sub.add_parser("scan", help="draft the refills due now (one scan of the EHR's FHIR server)")
    scan.add_argument("--horizon", type=int, help="draft when this many days or fewer are left (default 10)")
    scan.add_argument("--now", help="the scan's clock, ISO 8601 with offset (default: now)")
    scan.set_defaults(func=cmd_refills_scan)
    sub.add_parser(
        "sandbox",
        help="the sandbox EHR (a development tool): 'imid-rems sandbox --help'",
        add_help=False,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sandbox"]:
        # The sandbox EHR is a development tool, not product code: loaded only when asked for.
        from sandbox.cli import main as sandbox_main

        return sandbox_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        settings = get_settings()
        code: int = args.func(args, settings)
        return code
    except InvalidInput as exc:
        sys.stderr.write(f"imid-rems: error: {exc.path}: {exc.message}\n")
        return EXIT_BAD_INPUT
    except (ConfigError, ValidationError, OSError) as exc:
        sys.stderr.write(f"imid-rems: error: {exc}\n")
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
