"""The rules: each a function of an `OrderView` returning findings.

Three families (REMS_RULES.md): the REMS program rules, the health-plan coverage rules (advisory:
never critical, phrased as coverage), and the clinical-review flags (thresholds from the protocol
file). To add a rule: write `def my_rule(v: OrderView) -> Iterable[Finding]`, give it a code in
`rems.findings.RuleCode` and `RULES`, and list it in `ALL_RULES`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import date, timedelta
from decimal import Decimal

from rems.derive import (
    OrderView,
    Reproductive,
    age_days,
    suggested_category,
    therapy_start,
)
from rems.findings import SUMMARY_MAX, Evidence, Finding, Fix, FixKind, RuleCode, Severity
from rems.model import (
    LabKind,
    LabValue,
    PregnancyState,
    PregnancyTest,
    RiskCategory,
    Sex,
    TestResult,
)
from rems.timing import earliest_instant, local_day, test_good_through

Rule = Callable[[OrderView], Iterable[Finding]]


def _finding(
    v: OrderView,
    code: RuleCode,
    severity: Severity,
    summary: str,
    detail: str,
    evidence: Iterable[Evidence] = (),
    fix: Fix | None = None,
    **data: str,
) -> Finding:
    if len(summary) > SUMMARY_MAX:  # data-driven text (e.g. an institution's indication name) ran long
        summary = summary[: SUMMARY_MAX - 1].rstrip() + "…"
    return Finding(
        code=code,
        severity=severity,
        summary=summary,
        detail=detail,
        order=v.order.reference,
        evidence=tuple(evidence),
        fix=fix,
        data=dict(data),
    )


def _d(day: date) -> str:
    return day.isoformat()


def _num(x: Decimal) -> str:
    return f"{x.normalize():f}"


def _drug(v: OrderView) -> str:
    return v.order.drug.value


def _test_evidence(t: PregnancyTest) -> Evidence:
    return Evidence(
        t.reference,
        f"pregnancy test ({t.code}) {t.result.value}: {t.result_text!r}, collected ({t.collected_from})",
        t.collected,
    )


# --------------------------------------------------------------------------------------------------
# REMS program rules
# --------------------------------------------------------------------------------------------------


def supply(v: OrderView) -> Iterable[Finding]:
    o, cap = v.order, v.config.rems.max_supply_days
    if o.supply is None:
        yield _finding(
            v,
            RuleCode.SUPPLY_UNKNOWN,
            Severity.WARNING,
            f"Days' supply of {_drug(v)} unknown: state a supply of {cap} days or less",
            f"The order does not say how many days it supplies ({o.supply_problem}). The REMS allows at "
            f"most {cap} days; the pharmacy will need the days' supply to dispense.",
            [Evidence(o.reference, "dispenseRequest")],
            Fix(FixKind.SET_SUPPLY_DAYS, f"Set supply to {cap} days", str(cap)),
        )
    elif o.supply.days > cap:
        yield _finding(
            v,
            RuleCode.SUPPLY_OVER_28_DAYS,
            Severity.CRITICAL,
            f"{_drug(v).capitalize()} supply is {_num(o.supply.days)} days: REMS allows at most {cap}",
            f"The order supplies {_num(o.supply.days)} days ({o.supply.how}). IMiD REMS prescriptions are "
            f"limited to a {cap}-day supply; the pharmacy cannot dispense this order.",
            [Evidence(o.reference, f"days' supply {_num(o.supply.days)} ({o.supply.how})")],
            Fix(FixKind.SET_SUPPLY_DAYS, f"Set supply to {cap} days", str(cap)),
            supply_days=_num(o.supply.days),
        )


def refills(v: OrderView) -> Iterable[Finding]:
    n, allowed = v.order.refills, v.config.rems.max_refills
    if n is not None and n > allowed:
        yield _finding(
            v,
            RuleCode.REFILLS_NOT_ALLOWED,
            Severity.CRITICAL,
            f"{n} refill{'s' if n != 1 else ''} on a {_drug(v)} order: REMS allows none",
            "IMiD REMS prescriptions may not carry refills: each fill needs a new prescription and a new "
            "authorization number.",
            [Evidence(v.order.reference, f"dispenseRequest.numberOfRepeatsAllowed = {n}")],
            Fix(FixKind.REMOVE_REFILLS, "Remove refills", str(allowed)),
        )


def authorization(v: OrderView) -> Iterable[Finding]:
    if not v.order.authorization_number:
        yield _finding(
            v,
            RuleCode.AUTHORIZATION_MISSING,
            Severity.CRITICAL,
            f"No REMS authorization number on the {_drug(v)} order",
            "Every IMiD prescription must carry the authorization number the REMS issues after the "
            "prescriber survey. Complete the survey and enter the number on the order "
            "(identifier or note, e.g. 'REMS Authorization #: 12345678').",
            [Evidence(v.order.reference, "no authorization identifier or note text found")],
            Fix(
                FixKind.ENTER_AUTHORIZATION,
                "Complete the REMS prescriber survey and enter the authorization number",
            ),
        )


def risk_category(v: OrderView) -> Iterable[Finding]:
    o, patient = v.order, v.case.patient
    if o.risk_category is None:
        suggestion = suggested_category(v)
        said = (
            f" The order says {o.risk_category_unrecognized!r}, which is none of the six."
            if o.risk_category_unrecognized
            else ""
        )
        hint = f" The chart supports '{suggestion.display}'." if suggestion else ""
        yield _finding(
            v,
            RuleCode.RISK_CATEGORY_MISSING,
            Severity.CRITICAL,
            f"No REMS risk category on the {_drug(v)} order",
            "Every IMiD prescription must state the patient's REMS risk category "
            f"(the Patient-Physician Agreement Form).{said}{hint}",
            [Evidence(o.reference, "no rems-risk-category extension, supportingInformation or note text")],
            Fix(
                FixKind.DOCUMENT_RISK_CATEGORY,
                "Document the patient's REMS risk category",
                suggestion.value if suggestion else None,
            ),
        )
        return
    category = o.risk_category
    reasons: list[str] = []
    evidence: list[Evidence] = []
    severity = Severity.WARNING
    src = o.risk_category_source
    evidence.append(
        Evidence(
            src.reference if src else o.reference,
            f"risk category '{category.display}' ({src.element if src else 'order'})",
        )
    )
    if patient.sex is Sex.FEMALE and not category.is_female:
        severity = Severity.CRITICAL
        reasons.append(f"a male category on a female patient (sex from {patient.sex_source})")
        evidence.append(Evidence(patient.reference, f"sex female ({patient.sex_source})"))
    elif patient.sex is Sex.MALE and category.is_female:
        reasons.append(f"a female category on a male patient (sex from {patient.sex_source})")
        evidence.append(Evidence(patient.reference, f"sex male ({patient.sex_source})"))
    if v.age is not None and v.is_adult != category.is_adult:
        reasons.append(f"{'an adult' if category.is_adult else 'a child'} category for a patient aged {v.age}")
        evidence.append(Evidence(patient.reference, f"age {v.age} on {_d(v.order_day)}"))
    if category in (RiskCategory.ADULT_FEMALE_NRP, RiskCategory.CHILD_FEMALE_NRP):
        window = v.config.rems.nrp_recent_test_days
        recent = [t for t in v.tests if 0 <= age_days(t.collected, v) <= window]
        if recent:
            severity = Severity.CRITICAL
            reasons.append(f"'cannot get pregnant' but a pregnancy test was done in the last {window} days")
            evidence.extend(_test_evidence(t) for t in recent[-3:])
        if category is RiskCategory.ADULT_FEMALE_NRP and not v.nrp_evidence:
            severity = Severity.CRITICAL
            months = v.config.rems.menopause_months
            reasons.append(
                "'cannot get pregnant' with no documented hysterectomy, bilateral oophorectomy "
                f"or natural menopause of {months}+ months"
            )
            evidence.append(Evidence("-", "no qualifying Procedure, Condition or menopause record"))
    if not reasons:
        return
    yield _finding(
        v,
        RuleCode.RISK_CATEGORY_MISMATCH,
        severity,
        f"Risk category '{category.display}' contradicts the chart"[:139],
        "The category documented on the order is what the REMS authorized, and it decides the pregnancy "
        "testing: " + "; ".join(reasons) + ". Confirm the category with the patient, correct the "
        "Patient-Physician Agreement Form if needed, and until then treat the patient by the stricter "
        "reading.",
        evidence,
        Fix(
            FixKind.DOCUMENT_RISK_CATEGORY,
            "Confirm the REMS risk category and correct the order or chart",
            (suggested_category(v) or category).value,
        ),
    )


def reproductive_status(v: OrderView) -> Iterable[Finding]:
    if v.reproductive is not Reproductive.UNKNOWN or v.case.patient.sex is Sex.MALE:
        return
    patient = v.case.patient
    who = "female" if patient.sex is Sex.FEMALE else "unknown-sex"
    age = f"aged {v.age}" if v.age is not None else "of unknown age"
    yield _finding(
        v,
        RuleCode.REPRODUCTIVE_STATUS_UNKNOWN,
        Severity.WARNING,
        f"Can this patient get pregnant? Nothing on the order or chart settles it ({who}, {age})",
        f"The order has no REMS risk category and the chart holds no hysterectomy, bilateral oophorectomy "
        f"or natural menopause of {v.config.rems.menopause_months}+ months. Until the category is "
        "documented she is treated as able to get pregnant, so the pregnancy-test rules apply.",
        [Evidence(patient.reference, f"sex {patient.sex.value} ({patient.sex_source}), {age}")],
        Fix(
            FixKind.DOCUMENT_REPRODUCTIVE_STATUS,
            "Document the REMS risk category (and any hysterectomy, oophorectomy or menopause)",
        ),
    )


def _positive(v: OrderView) -> Finding | None:
    """Newest readable test positive, or a 'pregnant' status not followed by a negative test. A test we
    could not read after a positive one does not clear it (data we could not read is never a pass)."""
    zone = v.case.clinic_zone
    could_be_pregnant = v.case.patient.sex is not Sex.MALE or (
        v.order.risk_category is not None and v.order.risk_category.is_female
    )
    if not could_be_pregnant:
        return None
    newest = next((t for t in reversed(v.tests) if t.result is not TestResult.UNREADABLE), None)
    last_negative = next((t for t in reversed(v.tests) if t.result is TestResult.NEGATIVE), None)
    if newest is not None and newest.result is TestResult.POSITIVE:
        return _finding(
            v,
            RuleCode.PREGNANCY_TEST_POSITIVE,
            Severity.CRITICAL,
            f"Positive pregnancy test on {_d(local_day(newest.collected, zone))}: {_drug(v)} is contraindicated",
            f"The newest pregnancy test is positive ({newest.result_text!r}). IMiDs cause severe birth defects: "
            "do not prescribe or dispense. Stop the drug, counsel the patient and report the pregnancy to "
            "the REMS program immediately.",
            [_test_evidence(newest)],
        )
    statuses = [s for s in v.case.chart.pregnancy_statuses if earliest_instant(s.when, zone) <= v.case.now]
    statuses.sort(key=lambda s: earliest_instant(s.when, zone))
    if statuses and statuses[-1].state is PregnancyState.PREGNANT:
        status = statuses[-1]
        if last_negative is None or earliest_instant(last_negative.collected, zone) <= earliest_instant(
            status.when, zone
        ):
            return _finding(
                v,
                RuleCode.PREGNANCY_TEST_POSITIVE,
                Severity.CRITICAL,
                f"Patient documented pregnant on {_d(local_day(status.when, zone))}: {_drug(v)} is contraindicated",
                "The newest pregnancy status says pregnant and no negative test has been taken since. "
                "IMiDs cause severe birth defects: do not prescribe or dispense, and report the pregnancy "
                "to the REMS program immediately.",
                [Evidence(status.reference, "pregnancy status (82810-3): pregnant", status.when)],
            )
    return None


def pregnancy_tests(v: OrderView) -> Iterable[Finding]:
    """Positive / initiation / missing / stale, for a patient the pregnancy rules apply to.

    One card per problem: a positive result stands alone; at initiation a missing or expired test is
    reported as `initiation-tests-incomplete` (whose detail says what the dispensing window needs), not
    again as missing or stale; an unreadable newest result is reported only when nothing else is.
    """
    positive = _positive(v)
    if positive is not None:
        yield positive
        return
    if not v.reproductive.pregnancy_tests_apply:
        return
    zone, rules = v.case.clinic_zone, v.config.rems
    negatives = [t for t in v.tests if t.result is TestResult.NEGATIVE]
    last_negative = negatives[-1] if negatives else None
    assumed = (
        ""
        if v.reproductive is Reproductive.CAN_GET_PREGNANT
        else " (no risk category documented: treated as able to get pregnant)"
    )
    fix_day = v.first_dispense_day - timedelta(days=rules.test_valid_days)
    test_fix = Fix(
        FixKind.ORDER_PREGNANCY_TEST,
        f"Order a pregnancy test collected on or after {_d(max(fix_day, v.today))}",
        _d(max(fix_day, v.today)),
    )
    reported = False
    if v.initiation:
        low, high = rules.initiation_early_test_days
        early = [t for t in negatives if low <= age_days(t.collected, v) <= high]
        hours = rules.initiation_recent_test_hours
        recent = [
            t
            for t in negatives
            if timedelta(0) <= v.case.now - earliest_instant(t.collected, zone) <= timedelta(hours=hours)
        ]
        if not early or not recent:
            missing = []
            if not early:
                missing.append(f"one {low}-{high} days before")
            if not recent:
                missing.append(f"one within {hours} hours before")
            yield _finding(
                v,
                RuleCode.INITIATION_TESTS_INCOMPLETE,
                Severity.CRITICAL,
                f"First {_drug(v)} prescription: initiation pregnancy tests incomplete ({', '.join(missing)})",
                "Before the first prescription a patient who can get pregnant needs two negative pregnancy "
                f"tests: one {low}-{high} days before and one within {hours} hours before the prescription. "
                f"Missing: {' and '.join(missing)}.{assumed} No IMiD order or dispense in the last "
                f"{rules.initiation_lookback_days} days, so this counts as an initiation.",
                [_test_evidence(t) for t in negatives[-3:]] or [Evidence("-", "no negative pregnancy test on file")],
                Fix(
                    FixKind.ORDER_PREGNANCY_TEST,
                    "Order the missing initiation pregnancy test(s)",
                    _d(v.today),
                ),
            )
            reported = True
    if not reported:
        if last_negative is None:
            yield _finding(
                v,
                RuleCode.PREGNANCY_TEST_MISSING,
                Severity.CRITICAL,
                f"No negative pregnancy test on file for {_drug(v)}"
                + (": treated as able to get pregnant" if assumed else ""),
                "A patient who can get pregnant needs a negative pregnancy test no older than "
                f"{rules.test_valid_days} days when the drug is dispensed.{assumed}",
                [Evidence("-", "no negative pregnancy test result on file")],
                test_fix,
            )
            reported = True
        else:
            good_through = test_good_through(last_negative.collected, zone, rules.test_valid_days)
            if v.first_dispense_day > good_through:
                when = "today" if v.first_dispense_day == v.today else f"on {_d(v.first_dispense_day)}"
                yield _finding(
                    v,
                    RuleCode.PREGNANCY_TEST_STALE,
                    Severity.CRITICAL,
                    f"Pregnancy test of {_d(local_day(last_negative.collected, zone))} expired {_d(good_through)}: "
                    f"too old to dispense {when}",
                    f"A negative test is good for dispensing up to {rules.test_valid_days} days after it was "
                    f"taken. The newest one is good through {_d(good_through)}; the earliest this order can be "
                    f"dispensed is {_d(v.first_dispense_day)}.{assumed}",
                    [_test_evidence(last_negative)],
                    test_fix,
                    good_through=_d(good_through),
                    first_dispense_day=_d(v.first_dispense_day),
                )
                reported = True
    undated = v.case.chart.unreadable_pregnancy_tests
    if not reported and undated:
        yield _finding(
            v,
            RuleCode.PREGNANCY_TEST_MISSING,
            Severity.WARNING,
            f"A pregnancy test on file has no usable date: confirm it before dispensing {_drug(v)}",
            "A pregnancy test record could not be placed in time, so it cannot count, and it could be newer "
            "than the tests that pass. Confirm its date and result before the drug is dispensed.",
            [Evidence("-", text) for text in undated[:3]],
            test_fix,
        )
        return
    newest = v.tests[-1] if v.tests else None
    if not reported and newest is not None and newest.result is TestResult.UNREADABLE:
        yield _finding(
            v,
            RuleCode.PREGNANCY_TEST_MISSING,
            Severity.WARNING,
            f"Newest pregnancy test result could not be read: {newest.result_text!r}"[:139],
            "The newest pregnancy test has a result we could not interpret as negative or positive, so it "
            "cannot count as negative. Confirm the result before the drug is dispensed.",
            [_test_evidence(newest)],
            test_fix,
        )


def early_refill(v: OrderView) -> Iterable[Finding]:
    w, rules = v.supply_window, v.config.rems
    if w is None:
        return
    left = w.days_left(v.today, rules.max_supply_days)
    if left <= rules.dispense_when_days_left_at_most:
        return
    from_day = w.dispensable_from(rules.dispense_when_days_left_at_most)
    yield _finding(
        v,
        RuleCode.EARLY_REFILL,
        Severity.WARNING,
        f"{left} days of {_drug(v)} left: the pharmacy can dispense from {_d(from_day)}",
        f"The REMS lets a pharmacy dispense only when {rules.dispense_when_days_left_at_most} or fewer days "
        f"remain on the current supply ({w.how}, runs out {_d(w.runs_out)}). This prescription can be "
        f"dispensed from {_d(from_day)}; any pregnancy test must still be valid on that day.",
        [Evidence(w.source, w.how)],
        Fix(FixKind.DELAY_UNTIL, f"Send the prescription so it is dispensed from {_d(from_day)}", _d(from_day)),
        dispensable_from=_d(from_day),
        days_left=str(left),
    )


# --------------------------------------------------------------------------------------------------
# Coverage (health-plan policy, seed 004): advisory, never critical
# --------------------------------------------------------------------------------------------------


def dose_policy(v: OrderView) -> Iterable[Finding]:
    caps = v.config.programs[v.order.drug].dose_caps_mg
    mg = v.order.dose.mg_per_day
    if not caps or mg is None:
        return
    keys = {i.code for i in v.order.indications} or {i.code for i in v.case.chart.indications}
    if v.order.maintenance and "multiple-myeloma" in keys and "multiple-myeloma-maintenance" in caps:
        keys = (keys - {"multiple-myeloma"}) | {"multiple-myeloma-maintenance"}
    applicable = {k: caps[k] for k in keys if k in caps} or ({"other": caps["other"]} if "other" in caps else {})
    if not applicable:
        return
    # With several indications on file, the most permissive cap applies: this is an advisory flag.
    key, cap = max(applicable.items(), key=lambda kv: kv[1])
    if mg <= cap:
        return
    yield _finding(
        v,
        RuleCode.DOSE_ABOVE_POLICY_LIMIT,
        Severity.WARNING,
        f"Coverage: {_num(mg)} mg/day of {_drug(v)} is above the plan limit of {_num(cap)} mg/day ({key})",
        f"The health plan covers up to {_num(cap)} mg a day for {key.replace('-', ' ')}; a higher dose needs "
        "supporting guidelines or literature with the prior authorization request.",
        [Evidence(v.order.reference, f"dose {_num(mg)} mg/day")],
        Fix(FixKind.REVIEW, "Check the dose or attach the supporting evidence for the plan"),
    )


def concurrent_imid(v: OrderView) -> Iterable[Finding]:
    o = v.order
    others = [x for x in v.case.orders if x.reference != o.reference]
    others += [
        x
        for x in v.case.chart.imid_orders
        if x.status == "active"
        and x.drug is not o.drug
        and x.reference != o.reference
        and x.reference not in {y.reference for y in v.case.orders}
    ]
    if not others:
        return
    names = ", ".join(sorted({x.drug.value for x in others}))
    yield _finding(
        v,
        RuleCode.CONCURRENT_IMID,
        Severity.WARNING,
        f"Another IMiD ({names}) is active or ordered with this {_drug(v)}",
        "Two IMiDs together are not covered (seed 004) and add thromboembolic and myelosuppressive risk. "
        "Stop the other order if this one replaces it.",
        [Evidence(x.reference, f"{x.drug.value} order, status {x.status}") for x in others],
        Fix(FixKind.STOP_OTHER_IMID, "Discontinue the other IMiD order", others[0].reference),
    )


def age_policy(v: OrderView) -> Iterable[Finding]:
    limit = v.config.coverage.min_age_years
    if v.age is None or v.age >= limit:
        return
    yield _finding(
        v,
        RuleCode.AGE_UNDER_18,
        Severity.WARNING,
        f"Coverage: patient is {v.age}; the plan covers {_drug(v)} from age {limit}",
        f"The health plan's criteria require age {limit} or older; a prior authorization for a younger "
        "patient needs supporting evidence.",
        [Evidence(v.case.patient.reference, f"age {v.age} on {_d(v.order_day)}")],
    )


def prescriber_policy(v: OrderView) -> Iterable[Finding]:
    ref = v.order.requester or v.case.prescriber_reference
    if ref is None:
        return
    prescriber = next((p for p in v.case.chart.prescribers if p.reference == ref), None)
    if prescriber is None or not prescriber.specialties:
        return  # unknown specialty: advisory rule, nothing to say (see README "Decisions")
    allowed = set(v.config.coverage.specialist_taxonomy)
    indications = {i.code for i in v.order.indications} | {i.code for i in v.case.chart.indications}
    if "kaposi-sarcoma-hiv" in indications:
        allowed |= v.config.coverage.immunology_taxonomy
    if prescriber.specialties & allowed:
        return
    yield _finding(
        v,
        RuleCode.PRESCRIBER_NOT_SPECIALIST,
        Severity.WARNING,
        "Coverage: prescriber is not an oncologist or hematologist",
        "The health plan covers IMiDs prescribed by or in consultation with an oncologist or hematologist "
        f"(immunologist for HIV-related Kaposi sarcoma). Prescriber specialty: {prescriber.specialty_text}.",
        [Evidence(prescriber.reference, f"specialty {', '.join(sorted(prescriber.specialties))}")],
        Fix(FixKind.REVIEW, "Document the oncology/hematology consultation for the plan"),
    )


def generic_policy(v: OrderView) -> Iterable[Finding]:
    program = v.config.programs[v.order.drug]
    if not (program.generic_preferred and v.order.brand):
        return
    yield _finding(
        v,
        RuleCode.GENERIC_PREFERRED,
        Severity.INFO,
        f"Coverage: generic {_drug(v)} is preferred over the brand ordered",
        f"The health plan requires generic {_drug(v)} unless it is contraindicated, not tolerated or "
        "unavailable (shortage).",
        [Evidence(v.order.reference, f"ordered {v.order.medication_text!r}")],
        Fix(FixKind.SWITCH_TO_GENERIC, f"Order generic {_drug(v)} at the same strength", _drug(v)),
    )


# --------------------------------------------------------------------------------------------------
# Clinical review flags (protocol thresholds)
# --------------------------------------------------------------------------------------------------


def _review(v: OrderView, code: RuleCode) -> Severity:
    return Severity(v.config.review_severity.get(code.value, "warning"))


def _latest(v: OrderView, *kinds: LabKind) -> LabValue | None:
    zone = v.case.clinic_zone
    labs = [x for x in v.case.chart.labs if x.kind in kinds and earliest_instant(x.when, zone) <= v.case.now]
    return max(labs, key=lambda x: earliest_instant(x.when, zone), default=None)


def cbc(v: OrderView) -> Iterable[Finding]:
    p = v.config.protocol[v.order.drug]
    start = therapy_start(v, v.order.drug)
    weeks = (v.today - start).days // 7
    max_age = p.cbc_intensive_max_age_days if weeks < p.cbc_intensive_weeks else p.cbc_max_age_days
    phase = f"week {weeks + 1} of therapy" if weeks < p.cbc_intensive_weeks else "maintenance phase"
    latest = _latest(v, LabKind.ANC, LabKind.PLATELETS)
    if latest is not None and age_days(latest.when, v) <= max_age:
        return
    last = f"last {_d(local_day(latest.when, v.case.clinic_zone))}" if latest else "none on file"
    yield _finding(
        v,
        RuleCode.CBC_OVERDUE,
        _review(v, RuleCode.CBC_OVERDUE),
        f"CBC overdue for {_drug(v)} ({last}; protocol: every {max_age} days in {phase})",
        f"The protocol asks for a CBC at least every {max_age} days at this point of therapy ({phase}; "
        f"course started {_d(start)}).",
        [Evidence(latest.reference, f"latest count {latest.original}", latest.when)]
        if latest
        else [Evidence("-", "no ANC or platelet count on file")],
        Fix(FixKind.ORDER_CBC, "Order a CBC with differential"),
    )


def _hold(v: OrderView, kind: LabKind, code: RuleCode, threshold: Decimal | None, what: str) -> Iterable[Finding]:
    latest = _latest(v, kind)
    if threshold is None or latest is None or latest.value >= threshold:
        return
    day = _d(local_day(latest.when, v.case.clinic_zone))
    yield _finding(
        v,
        code,
        _review(v, code),
        f"{what} {_num(latest.value)} x10^9/L on {day}: below the {_drug(v)} hold threshold {_num(threshold)}",
        f"The latest {what.lower()} ({latest.original}) is below the protocol hold threshold of "
        f"{_num(threshold)} x10^9/L. Review before continuing: the protocol may call for a hold or a "
        "dose reduction.",
        [Evidence(latest.reference, f"{what.lower()} {latest.original}", latest.when)],
        Fix(FixKind.REVIEW, "Review the count against the protocol before renewing"),
    )


def neutropenia(v: OrderView) -> Iterable[Finding]:
    yield from _hold(v, LabKind.ANC, RuleCode.NEUTROPENIA, v.config.protocol[v.order.drug].anc_hold_below, "ANC")


def thrombocytopenia(v: OrderView) -> Iterable[Finding]:
    yield from _hold(
        v,
        LabKind.PLATELETS,
        RuleCode.THROMBOCYTOPENIA,
        v.config.protocol[v.order.drug].platelets_hold_below,
        "Platelets",
    )


def renal(v: OrderView) -> Iterable[Finding]:
    """Lenalidomide: Cockcroft-Gault CrCl (actual weight; female factor 0.85, also applied when sex is
    unknown, which gives the lower, stricter estimate). Without a weight or an age CrCl is not
    computed and no flag is raised. Pomalidomide: serum creatinine above the threshold."""
    p = v.config.protocol[v.order.drug]
    creat = _latest(v, LabKind.CREATININE)
    if creat is None or creat.value <= 0:
        return
    day = _d(local_day(creat.when, v.case.clinic_zone))
    if p.creatinine_review_above is not None and creat.value > p.creatinine_review_above:
        yield _finding(
            v,
            RuleCode.RENAL_DOSE_REVIEW,
            _review(v, RuleCode.RENAL_DOSE_REVIEW),
            f"Serum creatinine {_num(creat.value)} mg/dL on {day}: above {_num(p.creatinine_review_above)} "
            f"for {_drug(v)}",
            f"The protocol (seed 004) advises avoiding {_drug(v)} with a serum creatinine above "
            f"{_num(p.creatinine_review_above)} mg/dL. Review the dose and renal function.",
            [Evidence(creat.reference, f"creatinine {creat.original}", creat.when)],
            Fix(FixKind.REVIEW, "Review renal function and dose"),
        )
        return
    if p.crcl_review_below is None:
        return
    weight = _latest(v, LabKind.WEIGHT)
    if weight is None or v.age is None:
        return
    factor = Decimal("1") if v.case.patient.sex is Sex.MALE else Decimal("0.85")
    exact = Decimal(140 - v.age) * weight.value * factor / (Decimal(72) * creat.value)
    if exact >= p.crcl_review_below:
        return
    crcl = exact.quantize(Decimal("1"))
    yield _finding(
        v,
        RuleCode.RENAL_DOSE_REVIEW,
        _review(v, RuleCode.RENAL_DOSE_REVIEW),
        f"Creatinine clearance about {crcl} mL/min: below {_num(p.crcl_review_below)}, review the {_drug(v)} dose",
        f"Cockcroft-Gault estimate {crcl} mL/min (age {v.age}, weight {weight.original}, creatinine "
        f"{creat.original} on {day}). The label reduces the dose below {_num(p.crcl_review_below)} mL/min.",
        [
            Evidence(creat.reference, f"creatinine {creat.original}", creat.when),
            Evidence(weight.reference, f"weight {weight.original}", weight.when),
        ],
        Fix(FixKind.REVIEW, "Review the dose for renal function"),
        crcl=str(crcl),
    )


ANTITHROMBOTIC_IN_EFFECT = frozenset({"active", "draft"})
"""Active in the chart, or drafted alongside the IMiD (status draft in the same order session)."""


def vte(v: OrderView) -> Iterable[Finding]:
    if any(m.status in ANTITHROMBOTIC_IN_EFFECT for m in v.case.chart.antithrombotics):
        return
    yield _finding(
        v,
        RuleCode.VTE_PROPHYLAXIS_MISSING,
        _review(v, RuleCode.VTE_PROPHYLAXIS_MISSING),
        f"No anticoagulant or antiplatelet on file with {_drug(v)} (boxed warning: thromboembolism)",
        "IMiDs carry a boxed warning for venous and arterial thromboembolism; most patients take "
        "thromboprophylaxis (aspirin or an anticoagulant). None is active in the chart.",
        [Evidence("-", "no active anticoagulant or antiplatelet MedicationRequest")],
        Fix(FixKind.REVIEW, "Consider thromboprophylaxis"),
    )


REMS_RULES: tuple[Rule, ...] = (
    supply,
    refills,
    risk_category,
    reproductive_status,
    authorization,
    pregnancy_tests,
    early_refill,
)
COVERAGE_RULES: tuple[Rule, ...] = (
    dose_policy,
    concurrent_imid,
    age_policy,
    prescriber_policy,
    generic_policy,
)
CLINICAL_RULES: tuple[Rule, ...] = (cbc, neutropenia, thrombocytopenia, renal, vte)
ALL_RULES: tuple[Rule, ...] = REMS_RULES + COVERAGE_RULES + CLINICAL_RULES
