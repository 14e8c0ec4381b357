"""Errors raised by the accountant. Each message names the field, the value and the fix."""

from __future__ import annotations

import math

# Ranges the accountant evaluates in bounded time and memory (the CLI and the recipe schema check them up front).
MAX_STEPS = 10**7  # the PLD accountant's arrays grow with the steps; calibrate_steps searches up to here too
MIN_NOISE_MULTIPLIER = 0.3  # one PLD evaluation takes time ~ 1/sigma^2 (2 s at 0.3, 13 s at 0.1, hours at 0.01);
#                             below 0.3 a single full-batch step already costs epsilon ~ 19 at delta 1e-5
MAX_NOISE_MULTIPLIER = 1e4  # calibration searches up to here; larger values overflow the accountant
MAX_TARGET_EPSILON = 100.0  # a larger (finite) target bounds nothing useful (e^100 ~ 1e43) and overflows exp()
MAX_EVALUATED_EPSILON = 1e4  # PLD memory grows with epsilon: runs whose RDP bound exceeds this are not evaluated


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


def check_positive_int(n: int, field: str, minimum: int = 1, maximum: int | None = None, why: str = "") -> int:
    expected = f"an integer >= {minimum}" if maximum is None else f"an integer from {minimum} to {maximum}"
    if isinstance(n, bool) or not isinstance(n, (int,)) and not (isinstance(n, float) and n.is_integer()):
        raise InvalidParameterError(field, n, expected, why)
    if int(n) < minimum or (maximum is not None and int(n) > maximum):
        raise InvalidParameterError(field, n, expected, why)
    return int(n)


def check_steps(steps: int, field: str = "steps") -> int:
    """Steps of a run the accountant evaluates: an integer from 1 to ``MAX_STEPS``."""
    return check_positive_int(steps, field, 1, MAX_STEPS,
                              f"the PLD accountant's memory grows with the steps; at most {MAX_STEPS:.0e} are evaluated")


def check_noise_range(sigma: float, field: str = "noise_multiplier", allow_zero: bool = True) -> float:
    """A noise multiplier the accountant evaluates in bounded time: 0 (no noise: epsilon is infinite) or
    ``MIN_NOISE_MULTIPLIER`` .. ``MAX_NOISE_MULTIPLIER``."""
    ok = isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and math.isfinite(sigma) and (
        (allow_zero and sigma == 0) or MIN_NOISE_MULTIPLIER <= sigma <= MAX_NOISE_MULTIPLIER)
    if not ok:
        zero = "0 (no noise) or " if allow_zero else ""
        raise InvalidParameterError(
            field, sigma, f"{zero}a number from {MIN_NOISE_MULTIPLIER:g} to {MAX_NOISE_MULTIPLIER:g}",
            f"below {MIN_NOISE_MULTIPLIER:g} one step alone costs a huge epsilon and the accountant's time grows as "
            "1/sigma^2; typical DP-SGD values are 0.5 to 5")
    return float(sigma)


def check_target_epsilon(epsilon: float, field: str = "target_epsilon") -> float:
    """A calibration target: finite, > 0 and at most ``MAX_TARGET_EPSILON``."""
    eps = check_epsilon(epsilon, field)
    if eps > MAX_TARGET_EPSILON:
        raise InvalidParameterError(
            field, epsilon, f"a number > 0 and at most {MAX_TARGET_EPSILON:g}",
            "a larger epsilon bounds nothing useful (e^100 ~ 1e43); use inf for a non-private baseline")
    return eps
