"""Classification metrics on numpy arrays: accuracy, balanced accuracy, macro-F1, per-class table, confusion
matrix.

Balanced accuracy (mean per-class recall) and macro-F1 average over the classes that occur in y_true, so a
model that predicts only the majority class scores 1/K balanced accuracy whatever the class shares.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) counts; rows = true class, columns = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def per_class(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 and support per class (each (K,)) from a (K, K) confusion matrix."""
    k = cm.shape[0]
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k),
                   where=(precision + recall) > 0)
    return precision, recall, f1, support


def macro_f1(cm: np.ndarray) -> float:
    """Mean F1 over the classes that occur (rows with support); nan for an empty matrix."""
    _, _, f1, support = per_class(np.asarray(cm))
    present = support > 0
    return float(f1[present].mean()) if present.any() else float("nan")


def balanced_accuracy(cm: np.ndarray) -> float:
    """Mean recall over the classes that occur; nan for an empty matrix."""
    _, recall, _, support = per_class(np.asarray(cm))
    present = support > 0
    return float(recall[present].mean()) if present.any() else float("nan")


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict[str, Any]:
    k = len(labels)
    cm = confusion_matrix(y_true, y_pred, k)
    precision, recall, f1, support = per_class(cm)
    n = int(cm.sum())
    return {
        "num_samples": n,
        "accuracy": float(np.trace(cm) / n) if n else float("nan"),
        "balanced_accuracy": balanced_accuracy(cm),
        "macro_f1": macro_f1(cm),
        "per_class": [
            {"label": labels[i], "precision": float(precision[i]), "recall": float(recall[i]),
             "f1": float(f1[i]), "support": int(support[i])}
            for i in range(k)
        ],
        "confusion_matrix": cm.tolist(),
    }


def format_report(report: dict[str, Any], title: str = "") -> str:
    lines = [title] if title else []
    balanced = report.get("balanced_accuracy")  # absent in metrics.json files written before it existed
    lines.append(f"samples {report['num_samples']}   accuracy {report['accuracy']:.4f}   "
                 + (f"balanced accuracy {balanced:.4f}   " if balanced is not None else "")
                 + f"macro-F1 {report['macro_f1']:.4f}")
    lines.append(f"{'class':>10} {'precision':>10} {'recall':>8} {'f1':>8} {'support':>8}")
    for row in report["per_class"]:
        lines.append(f"{row['label']:>10} {row['precision']:>10.4f} {row['recall']:>8.4f} {row['f1']:>8.4f} "
                     f"{row['support']:>8d}")
    return "\n".join(lines)
