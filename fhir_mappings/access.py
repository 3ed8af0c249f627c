"""Strict, targeted reads of FHIR R4 JSON: plain dicts and lists as `json` / `orjson` produce them.

Rule: validate what we act on, strictly; build nothing we never read. A mapping reads each field it
uses through one of these functions, which checks the field's FHIR JSON type at that moment and raises
`InvalidInput(path, message, 422)` naming the exact path
(``prefetch.observations.entry[3].resource.effectiveDateTime``) and quoting the bad value, truncated.

Every reader takes the JSON object that holds the field, the field's name, and the path of that object:
``string(obs, "valueString", path)`` checks ``obs["valueString"]`` and names ``{path}.valueString``.
Paths are only formatted when there is an error to report.

- Absent (no key, or JSON ``null``) reads as None, or as an empty list for an element that repeats.
  ``required=True`` refuses absence, for elements FHIR R4 requires (1..1) and we act on.
- A repeating element must be a JSON array even with one item (FHIR JSON); an object there is a 422.
- Primitives: string (also markdown, uri: a non-empty JSON string), code (FHIR regex), id (FHIR regex,
  1-64 characters), boolean (JSON true/false only), integer (a JSON integer, never a bool or a float;
  32-bit, with a minimum for positiveInt/unsignedInt), decimal (a JSON number, not a bool or a string,
  finite, read as ``Decimal(str(x))``), date / dateTime / instant (FHIR R4 regexes, and a real calendar
  day and clock time: 2026-02-30 and 24:00 are 422s).
- A choice element (``value[x]``) may have one of its names present, never two (`choice`).
- Fields nobody reads are never looked at: unknown fields, or a bad value in an element no rule uses.
  Not checked either: a uri's shape, a code's membership in its value set, cardinalities of elements we
  do not read.
"""

from __future__ import annotations

import math
import re
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Literal, NamedTuple, NoReturn, TypeGuard, overload

from fhir_mappings.errors import InvalidInput
from fhir_mappings.r4_types import RESOURCE_TYPES

Json = dict[str, Any]
"""A FHIR JSON object (a resource, or an element of a complex type)."""

Coding = tuple[str | None, str | None, str | None]
"""(system, code, display) of one Coding."""

INT_MIN, INT_MAX = -(2**31), 2**31 - 1
"""FHIR integer is 32-bit signed."""

_CODE = re.compile(r"[^\s]+(\s[^\s]+)*")
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
match_id = _ID.fullmatch
"""`is_id` for a value known to be a str (a match or None)."""
# The FHIR R4 regexes (datatypes.html): year 0001-9999, month, day, time with seconds, offset to 14:00.
_YEAR = r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)"
_MONTH = r"(0[1-9]|1[0-2])"
_DAY = r"(0[1-9]|[1-2][0-9]|3[0-1])"
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?"
_OFFSET = r"(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"
_DATE = re.compile(rf"{_YEAR}(-{_MONTH}(-{_DAY})?)?")
_DATE_TIME = re.compile(rf"{_YEAR}(-{_MONTH}(-{_DAY}(T{_TIME}{_OFFSET})?)?)?")
_INSTANT = re.compile(rf"{_YEAR}-{_MONTH}-{_DAY}T{_TIME}{_OFFSET}")
# The common full shapes, checked faster: the FHIR regexes with the ranges `fromisoformat` checks anyway
# (month, day of that month, hour, minute) left to it. Anything else goes through the regexes above.
_FAST_DAY = re.compile(r"(?!0000)[0-9]{4}-[0-9]{2}-[0-9]{2}")
_FAST_TIME = re.compile(
    r"(?!0000)[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-5][0-9](?:\.[0-9]+)?"
    r"(?:Z|[+-](?:(?:0[0-9]|1[0-3]):[0-5][0-9]|14:00))"
)
_VALID_CODES: set[str] = set()
"""Code strings already found valid (statuses, units, LOINC...: few distinct values), up to a bound."""
VALID_CODES = _VALID_CODES
"""For a reader that inlines `is_code`: ``v in VALID_CODES or is_code(v)`` for a str `v`."""
_VALID_CODES_MAX = 8192

STRING = "a FHIR string (non-empty JSON string)"
CODE = "a FHIR code (JSON string, no leading, trailing or repeated whitespace)"
ID = "a FHIR id (1-64 characters A-Z a-z 0-9 - .)"
BOOLEAN = "a FHIR boolean (JSON true or false)"
INTEGER = "a FHIR integer (JSON number without a fraction)"
DECIMAL = "a FHIR decimal (JSON number)"
DATE = "a FHIR date (YYYY, YYYY-MM or YYYY-MM-DD)"
DATE_TIME = "a FHIR dateTime (YYYY, YYYY-MM, YYYY-MM-DD, or YYYY-MM-DDThh:mm:ss with a UTC offset)"
INSTANT = "a FHIR instant (YYYY-MM-DDThh:mm:ss with a UTC offset)"
OBJECT = "a JSON object"
ARRAY = "a JSON array (this element repeats in FHIR R4: even one value is sent as an array)"


def shown(value: Any) -> str:
    """A bad value as quoted in an error message: strings and numbers truncated, containers by kind."""
    if isinstance(value, dict):
        return "a JSON object"
    if isinstance(value, list):
        return "a JSON array"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:60]) + "…"
    return repr(value)[:60]


def at(path: str, key: str, index: int | None = None) -> str:
    """``{path}.{key}`` or ``{path}.{key}[{index}]``."""
    return f"{path}.{key}" if index is None else f"{path}.{key}[{index}]"


def invalid(path: str, expected: str, value: Any) -> NoReturn:
    raise InvalidInput(path, f"expected {expected}, got {shown(value)}", 422)


def missing(path: str, what: str) -> NoReturn:
    raise InvalidInput(path, f"missing: FHIR R4 requires {what} here", 422)


# ------------------------------------------------------------------------------------------------
# Primitives
# ------------------------------------------------------------------------------------------------


@overload
def string(o: Json, key: str, path: str, *, required: Literal[True]) -> str: ...
@overload
def string(o: Json, key: str, path: str, *, required: bool = False) -> str | None: ...


def string(o: Json, key: str, path: str, *, required: bool = False) -> str | None:
    """string / markdown / uri: a non-empty JSON string."""
    v = o.get(key)
    if v is None:
        if required:
            missing(at(path, key), STRING)
        return None
    if type(v) is str and v:
        return v
    invalid(at(path, key), STRING, v)


def is_code(v: Any) -> TypeGuard[str]:
    """A FHIR code: a JSON string without leading, trailing or repeated whitespace."""
    if type(v) is not str:
        return False
    if v in _VALID_CODES:
        return True
    if _CODE.fullmatch(v) is None:
        return False
    if len(_VALID_CODES) < _VALID_CODES_MAX:
        _VALID_CODES.add(v)
    return True


@overload
def code(o: Json, key: str, path: str, *, required: Literal[True]) -> str: ...
@overload
def code(o: Json, key: str, path: str, *, required: bool = False) -> str | None: ...


def code(o: Json, key: str, path: str, *, required: bool = False) -> str | None:
    v = o.get(key)
    if v is None:
        if required:
            missing(at(path, key), CODE)
        return None
    if type(v) is str and (v in _VALID_CODES or is_code(v)):
        return v
    invalid(at(path, key), CODE, v)


def is_id(v: Any) -> TypeGuard[str]:
    """A FHIR id: 1-64 of A-Z a-z 0-9 - ."""
    return type(v) is str and _ID.fullmatch(v) is not None


def fhir_id(o: Json, key: str, path: str) -> str | None:
    v = o.get(key)
    if v is None:
        return None
    if is_id(v):
        return v
    invalid(at(path, key), ID, v)


def boolean(o: Json, key: str, path: str) -> bool | None:
    v = o.get(key)
    if v is None or v is True or v is False:
        return v
    invalid(at(path, key), BOOLEAN, v)


def integer(o: Json, key: str, path: str, *, minimum: int = INT_MIN) -> int | None:
    """integer (`minimum` 1 for positiveInt, 0 for unsignedInt): a JSON integer, never a bool or a float."""
    v = o.get(key)
    if v is None:
        return None
    if type(v) is not int:
        invalid(at(path, key), INTEGER, v)
    if not minimum <= v <= INT_MAX:
        invalid(at(path, key), f"a FHIR integer from {minimum} to {INT_MAX}", v)
    return v


def to_decimal(v: Any) -> Decimal | None:
    """A JSON number as Decimal (``Decimal(str(x))``, so 0.1 stays 0.1); None if it is not one."""
    t = type(v)
    if t is int:
        return Decimal(v)
    if t is float and math.isfinite(v):
        return Decimal(str(v))
    return None


def decimal(o: Json, key: str, path: str) -> Decimal | None:
    """decimal: a JSON number, not a bool (JSON true is not 1), not a string, not NaN or infinite."""
    v = o.get(key)
    if v is None:
        return None
    d = to_decimal(v)
    if d is None:
        invalid(at(path, key), DECIMAL, v)
    return d


def _fast_moment(s: str, day: bool, time: bool) -> datetime | date | None:
    """A day (if `day` allowed), or a time with seconds and an offset (if `time` allowed), when `s` has
    exactly that common shape; None to fall back to the FHIR regexes (partial dates, leap seconds,
    anything malformed)."""
    n = len(s)
    if day and n == 10:
        return date.fromisoformat(s) if _FAST_DAY.fullmatch(s) else None
    if time and n >= 20 and _FAST_TIME.fullmatch(s):
        return datetime.fromisoformat(s)
    return None


def _moment(
    v: Any, pattern: re.Pattern[str], path: str, key: str, expected: str, day: bool, time: bool
) -> datetime | date | None:
    """A FHIR date / dateTime / instant string → a date (day only), an aware datetime, or None for a
    partial date (``2026``, ``2026-11``) or a leap second (valid FHIR, but no day or clock Python can
    place). Not a string, not the FHIR shape (`pattern`), or not a real day or time (2026-02-30, 24:00):
    a 422."""
    if type(v) is not str:
        invalid(at(path, key), expected, v)
    try:
        found = _fast_moment(v, day, time)
        if found is not None:
            return found
        if not pattern.fullmatch(v):
            invalid(at(path, key), expected, v)
        n = len(v)
        if n < 10 or v[17:19] == "60":
            return None
        return date.fromisoformat(v) if n == 10 else datetime.fromisoformat(v)
    except ValueError:
        invalid(at(path, key), f"{expected}, a real calendar day and clock time", v)


def date_only(o: Json, key: str, path: str) -> date | None:
    """date (``Patient.birthDate``): a day, or None when partial (``1980``, ``1980-07``)."""
    v = o.get(key)
    if v is None:
        return None
    day = _moment(v, _DATE, path, key, DATE, True, False)
    return day if not isinstance(day, datetime) else None


def date_time(o: Json, key: str, path: str, *, required: bool = False) -> datetime | date | None:
    """dateTime: an aware datetime when it has a time (a time without a UTC offset is a 422), a date when
    it names only a day, None when partial (``2026``, ``2026-11``) or absent."""
    v = o.get(key)
    if v is None:
        if required:
            missing(at(path, key), DATE_TIME)
        return None
    # The common full time, inline (`_fast_moment`); anything else, or a ValueError, through `_moment`.
    if type(v) is str and len(v) >= 20 and _FAST_TIME.fullmatch(v) is not None:
        try:
            return datetime.fromisoformat(v)
        except ValueError:
            pass
    return _moment(v, _DATE_TIME, path, key, DATE_TIME, True, True)


def instant(o: Json, key: str, path: str) -> datetime | None:
    """instant: an aware datetime (None for a leap second)."""
    v = o.get(key)
    if v is None:
        return None
    moment = _moment(v, _INSTANT, path, key, INSTANT, False, True)
    return moment if isinstance(moment, datetime) else None


# ------------------------------------------------------------------------------------------------
# Complex types and repetition
# ------------------------------------------------------------------------------------------------


@overload
def obj(o: Json, key: str, path: str, *, required: Literal[True]) -> Json: ...
@overload
def obj(o: Json, key: str, path: str, *, required: bool = False) -> Json | None: ...


def obj(o: Json, key: str, path: str, *, required: bool = False) -> Json | None:
    """An element of a complex type (Quantity, Reference, Period...): a JSON object."""
    v = o.get(key)
    if v is None:
        if required:
            missing(at(path, key), OBJECT)
        return None
    if type(v) is dict:
        return v
    invalid(at(path, key), OBJECT, v)


def array(o: Json, key: str, path: str) -> list[Any]:
    """A repeating element: a JSON array (absent → empty). Elements are checked by whoever reads them."""
    v = o.get(key)
    if v is None:
        return []
    if type(v) is list:
        return v
    invalid(at(path, key), ARRAY, v)


def objects(o: Json, key: str, path: str) -> list[tuple[Json, str]]:
    """A repeating complex element: each item a JSON object, with its own path (``{path}.{key}[i]``)."""
    v = o.get(key)
    if v is None:
        return []
    if type(v) is not list:
        invalid(at(path, key), ARRAY, v)
    out: list[tuple[Json, str]] = []
    for i, item in enumerate(v):
        if type(item) is not dict:
            invalid(at(path, key, i), OBJECT, item)
        out.append((item, f"{path}.{key}[{i}]"))
    return out


def choice(o: Json, path: str, names: frozenset[str]) -> str | None:
    """Which one of a choice element's names (`names`: ``valueQuantity``, ``valueString``...) is
    present. FHIR allows one: two of them is a 422 (we would not know which to act on)."""
    present = names.intersection(o)
    if not present:
        return None
    if len(present) == 1:
        (k,) = present
        return k if o[k] is not None else None
    found = [k for k in o if k in present and o[k] is not None]  # in document order, for the message
    if len(found) > 1:
        raise InvalidInput(at(path, found[1]), f"{found[0]} is present too: FHIR allows one name of a choice", 422)
    return found[0] if found else None


_tuple_new = tuple.__new__


class Quantity(NamedTuple):
    """A Quantity (also Duration, SimpleQuantity) as read; `system` is not read."""

    value: Decimal | None
    comparator: str | None
    unit: str | None
    code: str | None


def quantity(o: Json, key: str, path: str) -> Quantity | None:
    q = o.get(key)
    if q is None:
        return None
    if type(q) is not dict:
        invalid(at(path, key), OBJECT, q)
    raw = q.get("value")
    value: Decimal | None = None
    if raw is not None:
        t = type(raw)
        if t is int:
            value = Decimal(raw)
        elif t is float and math.isfinite(raw):
            value = Decimal(str(raw))
        else:
            invalid(f"{path}.{key}.value", DECIMAL, raw)
    comparator, unit, code_ = q.get("comparator"), q.get("unit"), q.get("code")
    valid = _VALID_CODES
    if comparator is not None and not (type(comparator) is str and (comparator in valid or is_code(comparator))):
        invalid(f"{path}.{key}.comparator", CODE, comparator)
    if unit is not None and not (type(unit) is str and unit):
        invalid(f"{path}.{key}.unit", STRING, unit)
    if code_ is not None and not (type(code_) is str and (code_ in valid or is_code(code_))):
        invalid(f"{path}.{key}.code", CODE, code_)
    return _tuple_new(Quantity, (value, comparator, unit, code_))


def reference(o: Json, key: str, path: str) -> str | None:
    """The ``reference`` string of the Reference at `key` (None when absent or when it has none)."""
    r = o.get(key)
    if r is None:
        return None
    if type(r) is not dict:
        invalid(at(path, key), OBJECT, r)
    target = r.get("reference")
    if target is None or (type(target) is str and target):
        return target
    invalid(f"{path}.{key}.reference", STRING, target)


def references(o: Json, key: str, path: str) -> list[str]:
    """The ``reference`` strings of a repeating Reference (items without one are left out)."""
    out: list[str] = []
    for i, r in enumerate(array(o, key, path)):
        if type(r) is not dict:
            invalid(at(path, key, i), OBJECT, r)
        target = r.get("reference")
        if target is not None:
            if not (type(target) is str and target):
                invalid(f"{path}.{key}[{i}].reference", STRING, target)
            out.append(target)
    return out


class Concept:
    """A CodeableConcept as read: its codings and text (each checked once, when read)."""

    __slots__ = ("codings", "text")

    def __init__(self, codings: tuple[Coding, ...] = (), text: str | None = None) -> None:
        self.codings = codings
        self.text = text

    def codes(self, system: str) -> set[str]:
        return {c for s, c, _ in self.codings if s == system and c}

    def all_codes(self) -> set[str]:
        return {c for _, c, _ in self.codings if c}

    def label(self) -> str:
        """All human text: `text`, then each coding's display."""
        parts = [d for _, _, d in self.codings if d]
        if self.text:
            parts.insert(0, self.text)
        return " | ".join(parts)

    def __repr__(self) -> str:
        return f"Concept({self.codings!r}, {self.text!r})"


def _coding(c: Any, where: str) -> Coding:
    """One Coding; `where` is its path (only used for errors)."""
    if type(c) is not dict:
        invalid(where, OBJECT, c)
    system, value, display = c.get("system"), c.get("code"), c.get("display")
    if system is not None and not (type(system) is str and system):
        invalid(f"{where}.system", STRING, system)
    if value is not None and not is_code(value):
        invalid(f"{where}.code", CODE, value)
    if display is not None and not (type(display) is str and display):
        invalid(f"{where}.display", STRING, display)
    return system, value, display


def concept_value(v: Any, path: str, key: str, index: int | None = None) -> Concept:
    """The CodeableConcept `v` (not None), found at `path`.`key` (`[index]`); the path is formatted only
    for an error. For a reader that already holds the value (`concept` gets it)."""
    if type(v) is not dict:
        invalid(at(path, key, index), OBJECT, v)
    text = v.get("text")
    if text is not None and not (type(text) is str and text):
        invalid(at(path, key, index) + ".text", STRING, text)
    raw = v.get("coding")
    if raw is None:
        return Concept((), text)
    if type(raw) is not list:
        invalid(at(path, key, index) + ".coding", ARRAY, raw)
    valid = _VALID_CODES
    if len(raw) == 1:  # the usual single coding, without building a list
        c = raw[0]
        if type(c) is dict:
            system, value, display = c.get("system"), c.get("code"), c.get("display")
            if (
                (system is None or (type(system) is str and system))
                and (value is None or (type(value) is str and (value in valid or is_code(value))))
                and (display is None or (type(display) is str and display))
            ):
                return Concept(((system, value, display),), text)
    out: list[Coding] = []
    for c in raw:
        if type(c) is dict:
            system, value, display = c.get("system"), c.get("code"), c.get("display")
            if (
                (system is None or (type(system) is str and system))
                and (value is None or (type(value) is str and (value in valid or is_code(value))))
                and (display is None or (type(display) is str and display))
            ):
                out.append((system, value, display))
                continue
        # raises, naming the bad part (every coding before it was good and is in `out`)
        _coding(c, f"{at(path, key, index)}.coding[{len(out)}]")
    return Concept(tuple(out), text)


def coding(o: Json, key: str, path: str) -> Coding | None:
    v = o.get(key)
    return None if v is None else _coding(v, at(path, key))


@overload
def concept(o: Json, key: str, path: str, *, required: Literal[True]) -> Concept: ...
@overload
def concept(o: Json, key: str, path: str, *, required: bool = False) -> Concept | None: ...


def concept(o: Json, key: str, path: str, *, required: bool = False) -> Concept | None:
    v = o.get(key)
    if v is None:
        if required:
            missing(at(path, key), "a CodeableConcept (JSON object)")
        return None
    return concept_value(v, path, key)


def concepts(o: Json, key: str, path: str) -> list[Concept]:
    v = o.get(key)
    if v is None:
        return []
    if type(v) is not list:
        invalid(at(path, key), ARRAY, v)
    return [concept_value(c, path, key, i) for i, c in enumerate(v)]


# ------------------------------------------------------------------------------------------------
# Resources
# ------------------------------------------------------------------------------------------------


def resource_type(raw: Json, path: str) -> str:
    """`resourceType`: present (else 400, as for any malformed request) and a FHIR R4 type (else 422)."""
    rtype = raw.get("resourceType")
    if type(rtype) is not str or not rtype:
        raise InvalidInput(f"{path}.resourceType", "missing: every FHIR resource names its resourceType")
    if rtype not in RESOURCE_TYPES:
        raise InvalidInput(f"{path}.resourceType", f"unknown FHIR R4 resource type {shown(rtype)}", 422)
    return rtype


def reference_to(raw: Json) -> str:
    """``Type/id`` of a resource already checked by `resource_type` / `fhir_id` (``Type/?`` without id)."""
    return f"{raw['resourceType']}/{raw.get('id') or '?'}"
