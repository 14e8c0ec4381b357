"""dptrain's privacy accountant: the single source of every epsilon the project prints.

Framework-agnostic by design: imports only numpy, scipy, dp_accounting and the standard library.
"""

from importlib import import_module

_LAZY = {  # public name -> submodule: imported on first use, so `import accounting` (and a CLI that only
    # parses arguments) does not pay for dp_accounting and scipy (~1 s)
    "ACCOUNTANTS": "accountants", "DEFAULT_PLD_DISCRETIZATION": "accountants", "DatasetBudget": "budget",
    "budget_home": "budget", "budget_path": "budget", "reserve_run": "budget", "calibrate_noise_multiplier":
    "calibrate", "calibrate_steps": "calibrate", "poisson_from_epochs": "calibrate", "steps_for_epochs":
    "calibrate", "BudgetExceededError": "errors", "InvalidParameterError": "errors", "LedgerFormatError":
    "errors", "PrivacyError": "errors", "UnreachableTargetError": "errors", "UnsupportedAccountantError":
    "errors", "ADD_OR_REMOVE": "events", "FixedSizeSampling": "events", "PoissonSampling": "events",
    "REPLACE_ONE": "events", "SCHEMES": "events", "SamplingScheme": "events", "ShuffledEpochs": "events",
    "TruncatedPoissonSampling": "events", "event_from_dict": "events", "event_to_dict": "events",
    "gaussian_release_event": "events", "histogram_sensitivity": "events", "repeat_and_select": "events",
    "run_events": "events", "PrivacyLedger": "ledger", "software_versions": "ledger", "PrivacyStatement":
    "statement", "ReleasedUnits": "statement"
}
_SUBMODULES = {"accountants", "atomic", "budget", "calibrate", "errors", "events", "ledger", "statement"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'accounting' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_LAZY, *_SUBMODULES])


__all__ = [
    "ACCOUNTANTS", "ADD_OR_REMOVE", "DEFAULT_PLD_DISCRETIZATION", "REPLACE_ONE", "SCHEMES",
    "BudgetExceededError", "DatasetBudget", "FixedSizeSampling", "InvalidParameterError", "LedgerFormatError",
    "PoissonSampling", "PrivacyError", "PrivacyLedger", "PrivacyStatement", "ReleasedUnits", "SamplingScheme", "ShuffledEpochs",
    "TruncatedPoissonSampling", "UnreachableTargetError", "UnsupportedAccountantError",
    "budget_home", "budget_path", "calibrate_noise_multiplier", "calibrate_steps", "event_from_dict",
    "event_to_dict", "gaussian_release_event", "histogram_sensitivity", "poisson_from_epochs", "repeat_and_select",
    "reserve_run", "run_events", "software_versions", "steps_for_epochs",
]
