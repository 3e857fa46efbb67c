"""Metrics against hand-computed values; reports write real images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medclf.errors import MedclfError
from medclf.evaluation import classification_metrics, multilabel_metrics, reliability, selective_accuracy, write_report


def test_perfect_predictions():
    y = np.array([0, 1, 1, 0, 2])
    p = np.eye(3)[y]
    m = classification_metrics(y, p, ["a", "b", "c"], n_bootstrap=50)
    assert m["accuracy"] == 1 and m["balanced_accuracy"] == 1 and m["macro_f1"] == 1
    assert m["auroc_macro"] == 1 and m["ece"] == pytest.approx(0) and m["brier"] == pytest.approx(0)
    assert m["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 1]]


def test_ece_and_brier_by_hand():
    y = np.array([0, 1, 1, 0])
    p = np.array([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.9, 0.1]])
    # top-label confidences 0.8 (right), 0.6 (wrong), 0.7 (right), 0.9 (right); 15 equal bins -> each its own bin
    ece, bins = reliability(y, p, n_bins=15)
    assert ece == pytest.approx((abs(0.8 - 1) + abs(0.6 - 0) + abs(0.7 - 1) + abs(0.9 - 1)) / 4)
    assert len(bins) == 4
    m = classification_metrics(y, p, ["n", "p"], n_bootstrap=0)
    brier = np.mean([2 * 0.2**2, 2 * 0.6**2, 2 * 0.3**2, 2 * 0.1**2])
    assert m["brier"] == pytest.approx(brier)
    assert m["accuracy"] == 0.75


def test_uninformative_probabilities_give_auroc_half():
    y = np.array([0, 1] * 10)
    m = classification_metrics(y, np.full((20, 2), 0.5), ["n", "p"], n_bootstrap=0)
    assert m["auroc_macro"] == pytest.approx(0.5)


def test_bootstrap_ci_contains_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(0)

    def width(n):
        y = rng.integers(0, 2, n)
        pos = np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1)  # informative but often wrong
        p = np.stack([1 - pos, pos], 1)
        m = classification_metrics(y, p, ["n", "p"], n_bootstrap=300)
        lo, hi = m["ci95"]["accuracy"]
        assert lo <= m["accuracy"] <= hi
        return hi - lo

    assert width(1000) < width(40)


def test_multilabel_masks_ignored_targets():
    y = np.array([[1, 0], [0, np.nan], [1, 1], [0, np.nan]])
    p = np.array([[0.9, 0.1], [0.2, 0.99], [0.8, 0.9], [0.1, 0.99]])
    m = multilabel_metrics(y, p, ["a", "b"])
    assert m["per_label"]["b"]["n"] == 2
    assert m["per_label"]["b"]["auroc"] == 1.0  # would be lower if the NaN rows (p=.99, unknown) counted as negatives


def test_selective_accuracy_rises_when_uncertainty_tracks_errors():
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.eye(2)[[0, 0, 1, 1, 1, 0]]  # last two wrong
    unc = np.array([0.1, 0.2, 0.1, 0.3, 0.9, 0.8])
    curve = selective_accuracy(y, p, unc, fractions=(1.0, 0.5))
    assert curve[0]["accuracy"] == pytest.approx(4 / 6) and curve[1]["accuracy"] == 1.0


def test_bad_input_is_refused():
    with pytest.raises(MedclfError):
        classification_metrics(np.array([]), np.zeros((0, 2)), ["a", "b"])
    with pytest.raises(MedclfError):
        classification_metrics(np.array([0, 1]), np.array([[0.5, np.nan], [0.5, 0.5]]), ["a", "b"])
    with pytest.raises(MedclfError):
        classification_metrics(np.array([0, 1]), np.ones((2, 3)) / 3, ["a", "b"])


def test_report_writes_valid_pngs(tmp_path):
    y = np.array([0, 1, 1, 0, 1, 0])
    p = np.array([[0.7, 0.3], [0.4, 0.6], [0.2, 0.8], [0.6, 0.4], [0.55, 0.45], [0.9, 0.1]])
    m = classification_metrics(y, p, ["n", "p"], n_bootstrap=20)
    files = write_report(tmp_path / "r", m, y, p, ["n", "p"], title="t")
    assert {f.name for f in files} == {"metrics.json", "roc.png", "reliability.png", "confusion.png"}
    for f in files[1:]:
        with Image.open(f) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    assert not list((tmp_path / "r").glob(".*"))  # no temp files left
