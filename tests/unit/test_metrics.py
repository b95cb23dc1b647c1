import numpy as np
import pytest

from mmfusion.evaluate.metrics import classification_report, confusion_matrix, format_report
from mmfusion.evaluate.plots import plot_confusion_matrix, plot_training_curves


def test_confusion_matrix_and_report_match_hand_count():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 2, 2])
    cm = confusion_matrix(y_true, y_pred, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    r = classification_report(y_true, y_pred, ["a", "b", "c"])
    assert r["accuracy"] == pytest.approx(4 / 6)
    # class a: p=1, r=2/3 -> f1=0.8; b: p=0.5, r=0.5 -> 0.5; c: p=0.5, r=1 -> 2/3
    assert [row["f1"] for row in r["per_class"]] == pytest.approx([0.8, 0.5, 2 / 3])
    assert r["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert "macro-F1" in format_report(r)


def test_balanced_accuracy_exposes_a_majority_class_predictor():
    y_true = np.array([0] * 8 + [1, 2])
    r = classification_report(y_true, np.zeros(10, dtype=int), ["a", "b", "c"])
    assert r["accuracy"] == pytest.approx(0.8)
    assert r["balanced_accuracy"] == pytest.approx(1 / 3)  # recalls 1, 0, 0
    assert r["macro_f1"] == pytest.approx((2 * 0.8 / 1.8) / 3)  # class a: p=0.8, r=1
    assert "balanced accuracy 0.3333" in format_report(r)
    old = {k: v for k, v in r.items() if k != "balanced_accuracy"}  # a metrics.json from before
    assert "balanced" not in format_report(old)


def test_macro_f1_ignores_classes_absent_from_truth():
    r = classification_report(np.array([0, 0]), np.array([0, 1]), ["a", "b", "c"])
    assert r["macro_f1"] == pytest.approx(2 / 3)  # only class a counts: p=1, r=0.5


def test_plots_are_written(tmp_path):
    hist = [{"epoch": e, "train_loss": 1 / (e + 1), "val_loss": 1.2 / (e + 1), "train_accuracy": 0.5 + e / 10,
             "val_accuracy": 0.45 + e / 10} for e in range(3)]
    for p in (plot_training_curves(hist, tmp_path / "c.png"),
              plot_confusion_matrix([[3, 1], [0, 4]], ["x", "y"], tmp_path / "cm.png")):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
