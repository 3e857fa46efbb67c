"""Metrics (scikit-learn, plus hand-written ECE and a fast bootstrap) and report folders (matplotlib)."""

from medclf.evaluation.metrics import (binary_reliability, bootstrap_ci, classification_metrics, multilabel_metrics,
                                       reliability, selective_accuracy)
from medclf.evaluation.report import write_metrics_json, write_multilabel_report, write_report

__all__ = ["classification_metrics", "multilabel_metrics", "selective_accuracy", "reliability", "binary_reliability",
           "bootstrap_ci", "write_report", "write_multilabel_report", "write_metrics_json"]
