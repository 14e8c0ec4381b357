"""dptrain's privacy accountant: the single source of every epsilon the project prints.

Framework-agnostic by design: imports only numpy, scipy, dp_accounting and the standard library.
"""

from .accountants import ACCOUNTANTS, DEFAULT_PLD_DISCRETIZATION
from .budget import DatasetBudget, budget_home, budget_path, reserve_run
from .calibrate import calibrate_noise_multiplier, calibrate_steps, poisson_from_epochs, steps_for_epochs
from .errors import (
    BudgetExceededError,
    InvalidParameterError,
    LedgerFormatError,
    PrivacyError,
    UnreachableTargetError,
    UnsupportedAccountantError,
)
from .events import (
    ADD_OR_REMOVE,
    REPLACE_ONE,
    SCHEMES,
    FixedSizeSampling,
    PoissonSampling,
    SamplingScheme,
    ShuffledEpochs,
    TruncatedPoissonSampling,
    event_from_dict,
    event_to_dict,
    gaussian_release_event,
    histogram_sensitivity,
    repeat_and_select,
    run_events,
)
from .ledger import PrivacyLedger, software_versions
from .statement import PrivacyStatement, ReleasedUnits

__all__ = [
    "ACCOUNTANTS", "ADD_OR_REMOVE", "DEFAULT_PLD_DISCRETIZATION", "REPLACE_ONE", "SCHEMES",
    "BudgetExceededError", "DatasetBudget", "FixedSizeSampling", "InvalidParameterError", "LedgerFormatError",
    "PoissonSampling", "PrivacyError", "PrivacyLedger", "PrivacyStatement", "ReleasedUnits", "SamplingScheme", "ShuffledEpochs",
    "TruncatedPoissonSampling", "UnreachableTargetError", "UnsupportedAccountantError",
    "budget_home", "budget_path", "calibrate_noise_multiplier", "calibrate_steps", "event_from_dict",
    "event_to_dict", "gaussian_release_event", "histogram_sensitivity", "poisson_from_epochs", "repeat_and_select",
    "reserve_run", "run_events", "software_versions", "steps_for_epochs",
]
