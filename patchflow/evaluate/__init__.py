"""Evaluation of generated samples (see :mod:`patchflow.evaluate.digits` for the `digits` world)."""
from patchflow.evaluate.digits import (
    DigitClassifier,
    evaluate_samples,
    frechet_distance,
    get_classifier,
    to_classifier_input,
)

__all__ = ["DigitClassifier", "evaluate_samples", "frechet_distance", "get_classifier", "to_classifier_input"]
