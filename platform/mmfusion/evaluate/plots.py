"""Plots written next to the numbers: training curves and confusion matrices (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(history: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    plt = _pyplot()
    epochs = [h["epoch"] + 1 for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("train_loss", "-o"), ("val_loss", "-s")):
        ax_loss.plot(epochs, [h[key] for h in history], style, label=key.replace("_", " "))
    for key, style in (("train_accuracy", "-o"), ("val_accuracy", "-s")):
        ax_acc.plot(epochs, [h[key] for h in history], style, label=key.replace("_", " "))
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion_matrix(cm: np.ndarray | list[list[int]], labels: list[str], path: Path,
                          title: str = "") -> Path:
    plt = _pyplot()
    cm = np.asarray(cm)
    k = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * k, 1.0 + 0.5 * k))
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), labels, rotation=45 if max(map(len, labels)) > 3 else 0)
    ax.set_yticks(range(k), labels)
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_robustness(results: dict[str, Any], path: Path, title: str = "") -> Path:
    """A bar per modality subset and a curve per noise kind (accuracy against the noise level, clean first),
    from the document mmfusion.evaluate.robustness writes."""
    plt = _pyplot()
    curves = results["noise"]
    fig, axes = plt.subplots(1, 1 + len(curves), figsize=(4.2 * (1 + len(curves)), 3.8), squeeze=False)
    ax = axes[0][0]
    names = ["+".join(s["modalities"]) for s in results["subsets"]]
    ax.barh(range(len(names)), [s["accuracy"] for s in results["subsets"]], color="tab:blue")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set(xlabel="accuracy", xlim=(0, 1.02), title="modalities seen")
    for ax, (kind, curve) in zip(axes[0][1:], curves.items(), strict=True):
        points = curve["points"]
        labels = ["clean" if p["level"] is None else f"{p['level']:g}" for p in points]
        ax.plot(range(len(points)), [p["accuracy"] for p in points], "-o")
        ax.set_xticks(range(len(points)), labels)
        ax.set(xlabel=curve["unit"], ylabel="accuracy", ylim=(0, 1.02), title=kind)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    fig.suptitle(title or "robustness")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
