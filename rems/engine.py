"""`evaluate(case) -> list[Finding]`: every rule, for every IMiD order under review."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from rems.config import Config, default_config
from rems.derive import view_order
from rems.findings import Finding, Severity
from rems.model import Case
from rems.rules import ALL_RULES, Rule

_SEVERITY_ORDER = {Severity.CRITICAL: 0, Severity.WARNING: 1, Severity.INFO: 2}


def evaluate(
    case: Case,
    config: Config | None = None,
    rules: Sequence[Rule] = ALL_RULES,
    only: Collection[str] | None = None,
) -> list[Finding]:
    """All findings for the case's orders, most severe first (stable within a severity: catalogue
    order, then order by order). `only` limits which orders are judged (order-select judges the
    orders just selected); the other orders of the case still count as context (a second IMiD in the
    same draft is still a concurrent IMiD)."""
    cfg = config or default_config()
    findings: list[Finding] = []
    for order in case.orders:
        if only is not None and order.reference not in only:
            continue
        view = view_order(case, cfg, order)
        for rule in rules:
            findings.extend(rule(view))
    findings.sort(key=lambda f: _SEVERITY_ORDER[f.severity])
    return findings
