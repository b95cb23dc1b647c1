"""`mmfusion evaluate`: an artifact on a dataset split -> accuracy, macro-F1, per-class table,
confusion matrix.

Prediction takes the same path as `mmfusion predict` (mmfusion.evaluate.predict): the Predictor on a Ray Data
actor pool sized to the cluster, on the GPU when the cluster has one; `local=True` runs it in this process
instead (tests, small checks). Results are written next to the artifact: metrics.json["evaluation"][split],
confusion_matrix_<split>.png, and rejects_<split>.jsonl when rows could not be decoded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmfusion.artifact import Artifact, ArtifactInfo, read_artifact_info, update_metrics
from mmfusion.errors import DataError
from mmfusion.evaluate.metrics import classification_report, format_report
from mmfusion.evaluate.plots import plot_confusion_matrix
from mmfusion.evaluate.predict import Predictor, Tally, check_modalities, run_udf

if TYPE_CHECKING:
    from mmfusion.evaluate.inference import Device, Pool

log = logging.getLogger(__name__)

BATCH = 256


@dataclass
class Predictions:
    probs: np.ndarray  # (N, K) class probabilities
    labels: np.ndarray  # (N,) true class index, -1 when unlabelled
    ids: list[str]  # (N,) row ids, in the order of probs
    rejected: list[dict[str, Any]] = field(default_factory=list)  # rows that could not be decoded
    skipped: int = 0  # rows with none of the (kept) modalities: left out, nothing to predict from
    pool: Pool | None = None  # the Ray Data actor pool; None: in-process
    actors: int = 0  # actors that predicted rows


@dataclass
class Evaluation:
    report: dict[str, Any]
    text: str
    plot: Path
    rejects_path: Path | None = None
    predictions: Predictions | None = None  # the rows behind the report


def collect_predictions(artifact: str | Path | Artifact, data: str, split: str,
                        modalities: list[str] | None = None, address: str | None = None,
                        device: Device = "auto", local: bool = False) -> Predictions:
    """Every row of one split through the Predictor (labels indexed; an unknown label rejects its row)."""
    info = artifact if isinstance(artifact, Artifact) else read_artifact_info(artifact)
    udf_art = artifact if isinstance(artifact, Artifact) and local else str(info.path)
    tally = Tally()
    probs, labels, ids = [], [], []
    for batch in run_udf(Predictor, {"artifact": udf_art, "keep": modalities, "labelled": True}, data, split,
                         info.cfg.data.label_column, list(info.cfg.data.modalities), tally, address, device,
                         local):
        good = tally.count(batch)
        probs.append(np.asarray(batch["probs"], dtype=np.float32)[good])
        labels.append(np.asarray(batch["target"], dtype=np.int64)[good])
        ids.extend(str(i) for i in batch["id"][good])
    k = len(info.labels)
    return Predictions(np.concatenate(probs) if probs else np.zeros((0, k), np.float32),
                       np.concatenate(labels) if labels else np.zeros(0, np.int64), ids, tally.rejected,
                       tally.skipped, tally.pool, len(tally.actors - {"local"}))


def predict_split(art: Artifact, data: str, split: str, modalities: list[str] | None = None) -> Predictions:
    """In-process prediction over one split with an already loaded artifact (its model as it is)."""
    return collect_predictions(art, data, split, modalities, device="cpu", local=True)


def evaluate_artifact(artifact: str | Path, data: str | None = None, split: str = "test",
                      address: str | None = None, modalities: list[str] | None = None,
                      device: Device = "auto", local: bool = False) -> Evaluation:
    """Evaluate an artifact on one split; see the module docstring."""
    info = read_artifact_info(artifact)
    data = data or info.cfg.data.path
    check_modalities(modalities, info.modalities)
    log.info("evaluating %s on %s [%s] (%s)", info.path, data, split, "in-process" if local else "Ray Data")
    preds = collect_predictions(info.path, data, split, modalities, address, device, local)
    return write_report(info, preds, split, f"{data} [{split}]", modalities)


def evaluate_dataset(art: Artifact, ds: Any, split: str) -> Evaluation:
    """Evaluate on an already preprocessed Ray Dataset (the val split at the end of training)."""
    import torch

    from mmfusion.data.pipeline import iter_torch_batches

    probs, labels = [], []
    with torch.no_grad():
        for batch in iter_torch_batches(ds, BATCH, art.spec, device="cpu"):
            probs.append(torch.softmax(art.model(batch).float(), dim=-1).numpy())
            labels.append(batch["label"].numpy())
    k = len(art.labels)
    preds = Predictions(np.concatenate(probs) if probs else np.zeros((0, k), np.float32),
                        np.concatenate(labels) if labels else np.zeros(0, np.int64), [])
    return write_report(art, preds, split, split, None)


def write_report(art: Artifact | ArtifactInfo, preds: Predictions, split: str, source: str,
                 modalities: list[str] | None) -> Evaluation:
    """The report, its confusion-matrix plot, metrics.json["evaluation"] and the rejects file, next to the
    artifact."""
    from mmfusion.data.rejects import update_rejects

    labelled = preds.labels >= 0
    if not labelled.any():
        raise DataError(f"{source} has no labelled rows that could be decoded; nothing to evaluate")
    report = classification_report(preds.labels[labelled], preds.probs[labelled].argmax(-1), art.labels)
    report["rejected_rows"] = len(preds.rejected)
    report["skipped_rows"] = preds.skipped
    report["modalities"] = modalities or list(art.cfg.data.modalities)
    suffix = split + ("_" + "+".join(modalities) if modalities else "")
    rejects_path = update_rejects(art.path / f"rejects_{suffix}.jsonl", preds.rejected)
    plot = plot_confusion_matrix(report["confusion_matrix"], art.labels,
                                 art.path / f"confusion_matrix_{suffix}.png",
                                 title=f"{split} ({', '.join(report['modalities'])})")
    metrics = update_metrics(art.path, evaluation={**_evaluations(art.path), suffix: report})
    art.metrics.update(metrics)
    text = format_report(report, title=f"{art.path.name}: {source}, modalities {report['modalities']}")
    if preds.rejected:
        text += (f"\n{len(preds.rejected)} rows could not be decoded and were left out "
                 f"(reasons: {rejects_path})")
    if preds.skipped:
        text += f"\n{preds.skipped} rows have none of the modalities {report['modalities']} and were left out"
    if preds.pool is not None:
        text += f"\npredicted on Ray Data: {preds.pool.describe()}, {preds.actors} used"
    return Evaluation(report, text, plot, rejects_path, preds)


def _evaluations(path: Path) -> dict[str, Any]:
    from mmfusion.artifact import read_metrics

    return read_metrics(path).get("evaluation", {})
