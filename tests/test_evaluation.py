"""Metrics against hand-computed values and sklearn; reports write real images and strict JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from medclf.errors import MedclfError
from medclf.evaluation import (binary_reliability, classification_metrics, multilabel_metrics, reliability,
                               selective_accuracy, write_multilabel_report, write_report)


def _softmax_data(n: int, k: int, signal: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += signal
    p = np.exp(logits)
    return y, p / p.sum(1, keepdims=True)


# ------------------------------------------------------------------------------------ single-label

def test_perfect_predictions():
    y = np.array([0, 1, 1, 0, 2])
    p = np.eye(3)[y]
    m = classification_metrics(y, p, ["a", "b", "c"], n_bootstrap=50)
    assert m["n"] == 5 and m["accuracy"] == 1 and m["balanced_accuracy"] == 1 and m["macro_f1"] == 1
    assert m["auroc_macro"] == 1 and m["auroc_per_class"] == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert m["ece"] == pytest.approx(0) and m["brier"] == pytest.approx(0) and m["nll"] == pytest.approx(0, abs=1e-9)
    assert m["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 1]]
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    assert m["ci95"]["accuracy"] == [1.0, 1.0]


def test_ece_by_hand_with_a_shared_bin():
    # 5 bins of width 0.2. top-label confidences / correct:
    #   0.9 right, 0.85 wrong -> bin (0.8, 1]: mean conf 0.875, accuracy 0.5, gap 0.375, weight 2/4
    #   0.7 right             -> bin (0.6, 0.8]: gap 0.3, weight 1/4
    #   0.55 wrong            -> bin (0.4, 0.6]: gap 0.55, weight 1/4
    y = np.array([0, 1, 1, 1])
    p = np.array([[0.9, 0.1], [0.85, 0.15], [0.3, 0.7], [0.55, 0.45]])
    ece, bins = reliability(y, p, n_bins=5)
    assert ece == pytest.approx(2 / 4 * 0.375 + 1 / 4 * 0.3 + 1 / 4 * 0.55)  # = 0.4
    assert [(b["lo"], b["hi"], b["count"]) for b in bins] == [(pytest.approx(0.4), pytest.approx(0.6), 1),
                                                               (pytest.approx(0.6), pytest.approx(0.8), 1),
                                                               (pytest.approx(0.8), pytest.approx(1.0), 2)]
    assert bins[2]["confidence"] == pytest.approx(0.875) and bins[2]["accuracy"] == 0.5
    m = classification_metrics(y, p, ["n", "p"], n_bootstrap=0, n_bins=5)
    assert m["ece"] == pytest.approx(0.4) and m["reliability"] == bins


def test_brier_and_nll_by_hand_three_classes():
    y = np.array([0, 2])
    p = np.array([[0.7, 0.2, 0.1], [0.2, 0.3, 0.5]])
    m = classification_metrics(y, p, ["a", "b", "c"], n_bootstrap=0)
    # sum_k (p_k - onehot_k)^2: (0.3^2 + 0.2^2 + 0.1^2) = 0.14 and (0.2^2 + 0.3^2 + 0.5^2) = 0.38
    assert m["brier"] == pytest.approx((0.14 + 0.38) / 2)
    assert m["nll"] == pytest.approx(-(np.log(0.7) + np.log(0.5)) / 2)
    assert m["auroc_per_class"]["b"] is None  # class b absent: undefined, not 0 or 0.5
    # a: positives {0.7} vs negatives {0.2} -> 1; c: positives {0.5} vs negatives {0.1} -> 1
    assert m["auroc_macro"] == 1.0


def test_nll_is_finite_for_a_confident_mistake():
    m = classification_metrics(np.array([0, 1]), np.array([[0.0, 1.0], [0.0, 1.0]]), ["a", "b"], n_bootstrap=0)
    assert np.isfinite(m["nll"]) and m["nll"] > 10


def test_binary_auroc_is_the_positive_class_and_matches_sklearn():
    y, p = _softmax_data(200, 2, 1.0, seed=1)
    m = classification_metrics(y, p, ["neg", "pos"], n_bootstrap=0)
    expected = roc_auc_score(y, p[:, 1])
    assert m["auroc_macro"] == pytest.approx(expected)
    assert m["auroc_per_class"]["pos"] == pytest.approx(expected)
    assert m["auroc_per_class"]["neg"] == pytest.approx(expected)  # the mirror curve, same area


def test_multiclass_macro_skips_an_absent_class():
    y, p = _softmax_data(90, 3, 1.5, seed=2)
    keep = y != 2
    y, p = y[keep], p[keep]
    m = classification_metrics(y, p, ["a", "b", "c"], n_bootstrap=100)
    assert m["auroc_per_class"]["c"] is None
    expected = np.mean([roc_auc_score(y == k, p[:, k]) for k in (0, 1)])
    assert m["auroc_macro"] == pytest.approx(expected)
    assert m["per_class"]["c"]["support"] == 0
    lo, hi = m["ci95"]["auroc_macro"]
    assert lo <= m["auroc_macro"] <= hi


@pytest.mark.parametrize("k", [2, 3])
def test_uninformative_probabilities_give_auroc_half(k):
    y = np.arange(30) % k
    m = classification_metrics(y, np.full((30, k), 1 / k), [str(i) for i in range(k)], n_bootstrap=0)
    assert m["auroc_macro"] == pytest.approx(0.5)
    assert all(v == pytest.approx(0.5) for v in m["auroc_per_class"].values())


def test_decision_rule_can_differ_from_argmax():
    y = np.array([0, 1, 1])
    p = np.array([[0.6, 0.4], [0.6, 0.4], [0.2, 0.8]])
    m = classification_metrics(y, p, ["a", "b"], n_bootstrap=0, pred=np.array([0, 1, 1]))
    assert m["accuracy"] == 1.0 and m["confusion_matrix"] == [[1, 0], [0, 2]]
    assert m["ece"] == pytest.approx(classification_metrics(y, p, ["a", "b"], n_bootstrap=0)["ece"])


def test_metrics_are_strict_json():
    y, p = _softmax_data(50, 3, 1.0, seed=3)
    m = classification_metrics(y, p, ["a", "b", "c"], n_bootstrap=20)
    assert json.loads(json.dumps(m, allow_nan=False)) == m


# ------------------------------------------------------------------------------------------ bootstrap

def test_bootstrap_ci_contains_estimate_and_shrinks_with_n():
    def ci(n):
        y, p = _softmax_data(n, 2, 1.0, seed=n)
        m = classification_metrics(y, p, ["n", "p"], n_bootstrap=300)
        for key in ("accuracy", "auroc_macro"):
            lo, hi = m["ci95"][key]
            assert lo <= m[key] <= hi, (key, m[key], lo, hi)
        return m["ci95"]

    small, large = ci(40), ci(2000)
    for key in ("accuracy", "auroc_macro"):
        assert large[key][1] - large[key][0] < (small[key][1] - small[key][0]) / 3


def test_bootstrap_is_seeded():
    y, p = _softmax_data(100, 3, 1.0, seed=4)
    a = classification_metrics(y, p, ["a", "b", "c"], n_bootstrap=100, seed=7)["ci95"]
    b = classification_metrics(y, p, ["a", "b", "c"], n_bootstrap=100, seed=7)["ci95"]
    c = classification_metrics(y, p, ["a", "b", "c"], n_bootstrap=100, seed=8)["ci95"]
    assert a == b and a != c


def test_bootstrap_auroc_equals_sklearn_on_the_same_resamples():
    """The bootstrap's hand-written weighted AUROC (ties included) against roc_auc_score per resample."""
    rng = np.random.default_rng(5)
    n, B = 60, 200
    y = rng.integers(0, 2, n)
    y[:2] = 2  # a rare class: ~13% of resamples miss it and must be skipped, not averaged over 2 classes
    p = rng.dirichlet(np.ones(3), n).round(1)  # coarse scores: many ties
    p[:, 2] = 1 - p[:, 0] - p[:, 1]
    m = classification_metrics(y, p, ["a", "b", "c"], n_bootstrap=B, seed=11)
    idx = np.random.default_rng(11).integers(0, n, size=(B, n))  # the resamples it draws (one block)
    accs, aucs = [], []
    for i in idx:
        accs.append((p[i].argmax(1) == y[i]).mean())
        per = [roc_auc_score(y[i] == k, p[i, k]) for k in range(3) if 0 < (y[i] == k).sum() < n]
        if len(per) == 3:
            aucs.append(np.mean(per))
    assert m["ci95"]["accuracy"] == pytest.approx(np.percentile(accs, [2.5, 97.5]))
    assert m["ci95"]["auroc_macro"] == pytest.approx(np.percentile(aucs, [2.5, 97.5]))
    assert m["bootstrap"] == {"resamples": B, "auroc_resamples": len(aucs), "seed": 11} and len(aucs) < B - 10


def test_bootstrap_skips_resamples_without_both_classes():
    y = np.array([1] + [0] * 19)  # one positive: many resamples miss it
    p = np.stack([1 - np.linspace(0, 1, 20), np.linspace(0, 1, 20)], 1)
    m = classification_metrics(y, p, ["n", "p"], n_bootstrap=200)
    assert 0 < m["bootstrap"]["auroc_resamples"] < 200
    assert m["ci95"]["auroc_macro"] is not None


# ---------------------------------------------------------------------------------------- multi-label

def test_multilabel_masks_ignored_targets_per_label():
    y = np.array([[1, 0], [0, np.nan], [1, 1], [0, np.nan]])
    p = np.array([[0.9, 0.1], [0.2, 0.99], [0.8, 0.9], [0.1, 0.99]])
    m = multilabel_metrics(y, p, ["a", "b"], n_bootstrap=50)
    b = m["per_label"]["b"]
    assert b["n"] == 2 and b["positives"] == 1
    # unmasked, the NaN rows (p=.99) would count as negatives ranked above the positive: AUROC 1/3
    assert b["auroc"] == 1.0 and b["accuracy"] == 1.0 and b["f1"] == 1.0
    assert b["brier"] == pytest.approx((0.1**2 + 0.1**2) / 2)
    assert m["per_label"]["a"]["n"] == 4  # masking is per label, not whole rows
    assert m["auroc_macro"] == 1.0 and m["auroc_macro_labels"] == ["a", "b"]


def test_multilabel_calibration_and_brier_by_hand():
    # positive-class calibration, 10 bins: p=.85 (y 1, 0) -> |0.85 - 0.5| = 0.35, weight 2/4;
    # p=.15 (y 0, 0) -> |0.15 - 0| = 0.15, weight 2/4
    y = np.array([[1.0], [0.0], [0.0], [0.0]])
    p = np.array([[0.85], [0.85], [0.15], [0.15]])
    m = multilabel_metrics(y, p, ["x"], n_bins=10, n_bootstrap=0)
    x = m["per_label"]["x"]
    assert x["ece"] == pytest.approx(0.5 * 0.35 + 0.5 * 0.15)
    assert x["brier"] == pytest.approx((0.15**2 + 0.85**2 + 0.15**2 + 0.15**2) / 4)
    assert x["accuracy"] == 0.75 and x["f1"] == pytest.approx(2 / 3)  # precision 1/2, recall 1
    assert binary_reliability(y[:, 0], p[:, 0], 10)[0] == pytest.approx(x["ece"])


def test_multilabel_macro_uses_labels_with_both_classes_and_has_a_ci():
    rng = np.random.default_rng(6)
    n = 300
    Y = (rng.random((n, 3)) < 0.4).astype(float)
    P = np.clip(0.35 * Y + 0.65 * rng.random((n, 3)), 0, 1)
    Y[rng.random((n, 3)) < 0.25] = np.nan
    Y[:, 2] = np.where(np.isnan(Y[:, 2]), np.nan, 1.0)  # label c: positives only -> AUROC undefined
    m = multilabel_metrics(Y, P, ["a", "b", "c"], n_bootstrap=200)
    assert m["per_label"]["c"]["auroc"] is None and m["auroc_macro_labels"] == ["a", "b"]
    expected = np.mean([roc_auc_score(Y[~np.isnan(Y[:, j]), j], P[~np.isnan(Y[:, j]), j]) for j in (0, 1)])
    assert m["auroc_macro"] == pytest.approx(expected)
    lo, hi = m["ci95"]["auroc_macro"]
    assert lo <= m["auroc_macro"] <= hi and hi - lo < 0.2
    assert json.loads(json.dumps(m, allow_nan=False)) == m


def test_multilabel_refuses_bad_targets_and_shapes():
    with pytest.raises(MedclfError, match="0, 1 or NaN"):
        multilabel_metrics(np.array([[1.0], [-1.0]]), np.array([[0.5], [0.5]]), ["x"])
    with pytest.raises(MedclfError, match="label names"):
        multilabel_metrics(np.zeros((2, 2)), np.zeros((2, 2)), ["x"])
    with pytest.raises(MedclfError):
        multilabel_metrics(np.zeros((2, 2)), np.zeros((2, 3)), ["x", "y"])
    with pytest.raises(MedclfError, match="NaN"):
        multilabel_metrics(np.zeros((2, 1)), np.array([[0.5], [np.nan]]), ["x"])
    with pytest.raises(MedclfError, match="empty"):
        multilabel_metrics(np.zeros((0, 1)), np.zeros((0, 1)), ["x"])


# ---------------------------------------------------------------------------------------------- referral

def test_selective_accuracy_rises_when_uncertainty_tracks_errors():
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.eye(2)[[0, 0, 1, 1, 1, 0]]  # last two wrong
    unc = np.array([0.1, 0.2, 0.1, 0.3, 0.9, 0.8])
    curve = selective_accuracy(y, p, unc, fractions=(1.0, 0.5))
    assert curve[0]["accuracy"] == pytest.approx(4 / 6) and curve[1]["accuracy"] == 1.0
    assert [c["n"] for c in curve] == [6, 3] and curve[1]["uncertainty_max"] == 0.2


def test_selective_accuracy_curve_on_noisy_data():
    y, p = _softmax_data(2000, 3, 1.0, seed=7)
    entropy = -(p * np.log(p)).sum(1)
    curve = selective_accuracy(y, p, entropy)
    accs = [c["accuracy"] for c in curve]
    assert accs == sorted(accs) and accs[-1] > accs[0] + 0.15
    # uncertainty unrelated to errors: no gain
    flat = selective_accuracy(y, p, np.random.default_rng(0).random(2000))
    assert abs(flat[-1]["accuracy"] - flat[0]["accuracy"]) < 0.1


def test_selective_accuracy_refuses_bad_input():
    y, p = np.array([0, 1]), np.array([[0.6, 0.4], [0.3, 0.7]])
    with pytest.raises(MedclfError, match="uncertainty"):
        selective_accuracy(y, p, np.array([0.1]))
    with pytest.raises(MedclfError, match="uncertainty"):
        selective_accuracy(y, p, np.array([0.1, np.nan]))
    with pytest.raises(MedclfError, match="fractions"):
        selective_accuracy(y, p, np.array([0.1, 0.2]), fractions=(0.0,))


# ------------------------------------------------------------------------------------------ guard rails

@pytest.mark.parametrize("y, p, names, match", [
    (np.array([], dtype=int), np.zeros((0, 2)), ["a", "b"], "no items"),
    (np.array([0, 1]), np.array([[0.5, np.nan], [0.5, 0.5]]), ["a", "b"], "NaN"),
    (np.array([0, 1]), np.ones((2, 3)) / 3, ["a", "b"], "shape"),
    (np.array([0, 1, 1]), np.full((2, 2), 0.5), ["a", "b"], "shape"),
    (np.array([0, 2]), np.full((2, 2), 0.5), ["a", "b"], r"\[0, 1\]"),
    (np.array([0, -1]), np.full((2, 2), 0.5), ["a", "b"], r"\[0, 1\]"),
    (np.array([0.0, 0.5]), np.full((2, 2), 0.5), ["a", "b"], "whole"),
    (np.array([[0], [1]]), np.full((2, 2), 0.5), ["a", "b"], "1-D"),
    (np.array([0, 1]), np.array([[2.0, -1.0], [0.5, 0.5]]), ["a", "b"], "logits"),
    (np.array([0, 1]), np.array([[0.2, 0.2], [0.5, 0.5]]), ["a", "b"], "sum to 1"),
    (np.array([0, 0]), np.ones((2, 1)), ["a"], "at least 2"),
    (np.array([0, 1]), np.full((2, 2), 0.5), ["a", "a"], "unique"),
])
def test_bad_input_is_refused(y, p, names, match):
    with pytest.raises(MedclfError, match=match):
        classification_metrics(y, p, names)


def test_bad_options_are_refused():
    y, p = np.array([0, 1]), np.full((2, 2), 0.5)
    with pytest.raises(MedclfError, match="n_bins"):
        classification_metrics(y, p, ["a", "b"], n_bins=0)
    with pytest.raises(MedclfError, match="n_bootstrap"):
        classification_metrics(y, p, ["a", "b"], n_bootstrap=-1)
    with pytest.raises(MedclfError, match="predictions"):
        classification_metrics(y, p, ["a", "b"], pred=np.array([0, 1, 1]))


# -------------------------------------------------------------------------------------------- reports

def _assert_png(path):
    assert path.stat().st_size > 5_000
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200


def test_report_writes_valid_pngs_and_strict_json(tmp_path):
    y, p = _softmax_data(120, 3, 1.0, seed=8)
    p_absent = p[y != 2]  # a class absent from the data must not break the plots
    y_absent = y[y != 2]
    names = ["healthy", "bleed", "tumour"]
    for sub, (yy, pp) in {"full": (y, p), "absent": (y_absent, p_absent)}.items():
        m = classification_metrics(yy, pp, names, n_bootstrap=20)
        m["not_a_number"] = float("nan")  # a caller's extra NaN becomes null, not invalid JSON
        files = write_report(tmp_path / sub, m, yy, pp, names, title="run on test")
        assert [f.name for f in files] == ["metrics.json", "roc.png", "reliability.png", "confusion.png"]
        loaded = json.loads((tmp_path / sub / "metrics.json").read_text())
        assert loaded["not_a_number"] is None and loaded["confusion_matrix"] == m["confusion_matrix"]
        for f in files[1:]:
            _assert_png(f)
        assert not list((tmp_path / sub).glob(".*"))  # no temp files left


def test_binary_report(tmp_path):
    y = np.array([0, 1, 1, 0, 1, 0])
    p = np.array([[0.7, 0.3], [0.4, 0.6], [0.2, 0.8], [0.6, 0.4], [0.55, 0.45], [0.9, 0.1]])
    m = classification_metrics(y, p, ["n", "p"], n_bootstrap=20)
    files = write_report(tmp_path / "r", m, y, p, ["n", "p"])
    assert {f.name for f in files} == {"metrics.json", "roc.png", "reliability.png", "confusion.png"}


def test_report_refuses_mismatched_inputs(tmp_path):
    y, p = np.array([0, 1]), np.full((2, 2), 0.5)
    m = classification_metrics(y, p, ["a", "b"], n_bootstrap=0)
    with pytest.raises(MedclfError):
        write_report(tmp_path / "r", m, np.array([0, 1, 1]), p, ["a", "b"])
    assert not (tmp_path / "r").exists()


def test_multilabel_report(tmp_path):
    rng = np.random.default_rng(9)
    Y = (rng.random((80, 3)) < 0.4).astype(float)
    P = np.clip(0.4 * Y + 0.6 * rng.random((80, 3)), 0, 1)
    Y[rng.random((80, 3)) < 0.2] = np.nan
    Y[:, 2] = np.where(np.isnan(Y[:, 2]), np.nan, 0.0)  # a label with no positives is drawn without a curve
    names = ["effusion", "edema", "nodule"]
    m = multilabel_metrics(Y, P, names, n_bootstrap=20)
    files = write_multilabel_report(tmp_path / "ml", m, Y, P, names, title="chexpert")
    assert [f.name for f in files] == ["metrics.json", "roc.png", "reliability.png"]
    assert json.loads(files[0].read_text())["per_label"]["nodule"]["auroc"] is None
    for f in files[1:]:
        _assert_png(f)
