"""Evaluation of trained models: utility metrics computed from predicted probabilities."""

from dptrain.evaluate.metrics import expected_calibration_error, per_class_auroc, utility_metrics

__all__ = ["expected_calibration_error", "per_class_auroc", "utility_metrics"]
