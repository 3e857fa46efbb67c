"""Metrics and reports (scikit-learn + matplotlib)."""

from medclf.evaluation.metrics import (bootstrap_ci, classification_metrics, multilabel_metrics, reliability,
                                       selective_accuracy)
from medclf.evaluation.report import write_report

__all__ = ["classification_metrics", "multilabel_metrics", "selective_accuracy", "reliability", "bootstrap_ci",
           "write_report"]
