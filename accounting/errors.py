"""Errors raised by the accountant. Each message names the field, the value and the fix."""

from __future__ import annotations


class PrivacyError(ValueError):
    """Base class for every error the accountant raises on purpose."""


class InvalidParameterError(PrivacyError):
    """A privacy parameter is outside its valid range."""

    def __init__(self, field: str, value: object, expected: str, fix: str = ""):
        self.field, self.value = field, value
        msg = f"{field}: expected {expected}, got {value!r}"
        super().__init__(msg + (f"; {fix}" if fix else ""))


class UnsupportedAccountantError(PrivacyError):
    """The chosen accountant cannot analyse an event (we never fall back silently)."""


class BudgetExceededError(PrivacyError):
    """A planned run would spend more than the dataset's total privacy budget."""


class UnreachableTargetError(PrivacyError):
    """A calibration target cannot be met (e.g. one step already exceeds the target epsilon)."""


class LedgerFormatError(PrivacyError):
    """A ledger or budget file is missing, truncated, tampered with or of an unknown format."""


def check_delta(delta: float, field: str = "delta") -> float:
    if not isinstance(delta, (int, float)) or not (0 < float(delta) < 1):
        raise InvalidParameterError(field, delta, "a number in (0, 1)", "typical values are 1e-5 or below 1/n")
    return float(delta)


def check_epsilon(epsilon: float, field: str = "epsilon") -> float:
    if not isinstance(epsilon, (int, float)) or not (float(epsilon) > 0) or float(epsilon) == float("inf"):
        raise InvalidParameterError(field, epsilon, "a finite number > 0", "e.g. --epsilon 1, 4 or 8")
    return float(epsilon)


def check_probability(q: float, field: str = "sampling_rate") -> float:
    if not isinstance(q, (int, float)) or not (0 < float(q) <= 1):
        raise InvalidParameterError(field, q, "a number in (0, 1]", "q = expected batch size / number of units")
    return float(q)


def check_noise(sigma: float, field: str = "noise_multiplier") -> float:
    if not isinstance(sigma, (int, float)) or not (float(sigma) >= 0) or float(sigma) == float("inf"):
        raise InvalidParameterError(field, sigma, "a finite number >= 0", "noise std divided by the clipping norm")
    return float(sigma)


def check_positive_int(n: int, field: str, minimum: int = 1) -> int:
    if isinstance(n, bool) or not isinstance(n, (int,)) and not (isinstance(n, float) and n.is_integer()):
        raise InvalidParameterError(field, n, f"an integer >= {minimum}")
    if int(n) < minimum:
        raise InvalidParameterError(field, n, f"an integer >= {minimum}")
    return int(n)
