"""The IMiD REMS domain: programs, risk categories, schedules, rules and findings.

Pure: imports only the standard library (a test walks the imports). `fhir_mappings` builds a `Case`
from FHIR; `evaluate(case)` returns `Finding`s; the front doors turn findings into cards or drafts.
"""

from rems.config import Config, ConfigError, default_config, load_config
from rems.engine import evaluate
from rems.findings import RULES, Evidence, Finding, Fix, FixKind, RuleCode, Severity
from rems.model import Case, Chart, Drug, ImidOrder, PatientFacts, RiskCategory, Sex

__all__ = [
    "RULES",
    "Case",
    "Chart",
    "Config",
    "ConfigError",
    "Drug",
    "Evidence",
    "Finding",
    "Fix",
    "FixKind",
    "ImidOrder",
    "PatientFacts",
    "RiskCategory",
    "RuleCode",
    "Severity",
    "Sex",
    "default_config",
    "evaluate",
    "load_config",
]
