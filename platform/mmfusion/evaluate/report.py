"""`mmfusion evaluate`: an artifact on a dataset split -> accuracy, macro-F1, per-class table,
confusion matrix.

Small inputs are read and predicted in-process (no Ray); large ones, or any run given a Ray address, go
through the Ray Data pipeline (build_datasets) and are predicted batch by batch. Results are written next to
the artifact: metrics.json["evaluation"][split] and confusion_matrix_<split>.png.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmfusion.artifact import Artifact, load_artifact, update_metrics
from mmfusion.errors import DataError
from mmfusion.evaluate.metrics import classification_report, format_report
from mmfusion.evaluate.plots import plot_confusion_matrix

log = logging.getLogger(__name__)

LOCAL_MAX_ROWS = 20_000  # above this many rows, evaluation runs on Ray Data
BATCH = 256


@dataclass
class Predictions:
    probs: np.ndarray  # (N, K) class probabilities
    labels: np.ndarray  # (N,) true class index, -1 when unlabelled
    ids: list[str]
    rejected: list[dict[str, Any]] = field(default_factory=list)  # rows that could not be decoded
    skipped: int = 0  # rows with none of the (kept) modalities: left out, nothing to predict from


@dataclass
class Evaluation:
    report: dict[str, Any]
    text: str
    plot: Path


def hide_modalities(batch: dict[str, torch.Tensor], modalities: tuple[str, ...], keep: list[str] | None,
                    ) -> dict[str, torch.Tensor]:
    """Mark every modality outside `keep` as absent (robustness to a missing modality)."""
    if not keep:
        return batch
    present = batch["present"].clone()
    for j, m in enumerate(modalities):
        if m not in keep:
            present[:, j] = False
    return {**batch, "present": present}


@torch.no_grad()
def _predict_batches(art: Artifact, batches, keep: list[str] | None,
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> probs (N, K), labels (N,), and which of the incoming rows were predicted (rows with every
    modality hidden are skipped)."""
    probs, labels, kept = [], [], []
    for batch in batches:
        batch = hide_modalities(batch, art.spec.modalities, keep)
        # a row with every modality hidden has nothing to predict from
        keep_rows = batch["present"].any(dim=1)
        kept.append(keep_rows.numpy())
        logits = art.model({k: v[keep_rows] for k, v in batch.items()}).float()
        probs.append(torch.softmax(logits, dim=-1).numpy())
        labels.append(batch["label"][keep_rows].numpy())
    k = len(art.labels)
    return (np.concatenate(probs) if probs else np.zeros((0, k), np.float32),
            np.concatenate(labels) if labels else np.zeros(0, np.int64),
            np.concatenate(kept) if kept else np.zeros(0, bool))


def predict_split(art: Artifact, data: str, split: str, modalities: list[str] | None = None) -> Predictions:
    """In-process prediction over one split (no Ray): read records, preprocess, collate, predict."""
    from mmfusion.data.pipeline import MMCollate
    from mmfusion.data.preprocessor import EMPTY_ROW, Preprocessor
    from mmfusion.data.readers import iter_records

    data_cfg = art.cfg.data.model_copy(update={"path": data})
    pre = Preprocessor(data_cfg, art.labels)
    collate = MMCollate(art.spec)
    ids: list[str] = []
    rejected: list[dict[str, Any]] = []
    skipped = [0]  # rows with none of the model's modalities: nothing to predict from

    def batches():
        for table in iter_records(data, split, data_cfg.label_column, modalities=data_cfg.modalities):
            for rb in table.to_batches(BATCH):
                cols = {c: rb.column(c).to_numpy(zero_copy_only=False) for c in rb.schema.names}
                out = pre(cols)
                good = out["error"] == ""
                for i in np.flatnonzero(~good):
                    if not str(out["error"][i]).startswith(EMPTY_ROW):
                        rejected.append({"id": str(out["id"][i]), "reason": str(out["error"][i])})
                    else:
                        skipped[0] += 1
                if good.any():
                    ids.extend(str(x) for x in out["id"][good])
                    yield collate({k: v[good] for k, v in out.items() if k in MMCollate.DTYPES})

    probs, labels, kept = _predict_batches(art, batches(), modalities)
    return Predictions(probs, labels, [i for i, k in zip(ids, kept, strict=True) if k], rejected,
                       skipped=skipped[0] + int((~kept).sum()))


def predict_split_ray(art: Artifact, data: str, split: str, modalities: list[str] | None = None,
                      address: str | None = None) -> Predictions:
    """The same, with reading and preprocessing on Ray Data (large inputs, or a cluster)."""
    from mmfusion.data.pipeline import build_datasets, iter_torch_batches
    from mmfusion.runtime import init_ray

    init_ray(address)
    data_cfg = art.cfg.data.model_copy(update={"path": data, "max_bad_fraction": 1.0})
    bundle = build_datasets(data_cfg, splits=(split,), seed=art.cfg.seed, labels=art.labels)
    ds = getattr(bundle, split)
    probs, labels, _ = _predict_batches(art, iter_torch_batches(ds, BATCH, art.spec, device="cpu"),
                                        modalities)
    rejected = [{"reason": f"{bundle.num_rejected} rows rejected, see {bundle.rejects_path}"}] \
        if bundle.num_rejected else []
    return Predictions(probs, labels, [], rejected)


def evaluate_artifact(artifact: str | Path, data: str | None = None, split: str = "test",
                      address: str | None = None, modalities: list[str] | None = None) -> Evaluation:
    from mmfusion.data.readers import summarize

    art = load_artifact(artifact)
    data = data or art.cfg.data.path
    unknown = [m for m in modalities or [] if m not in art.spec.modalities]
    if unknown:
        raise DataError(f"--modalities {unknown}: the model was trained on {list(art.spec.modalities)}")
    rows = summarize(data, art.cfg.data.label_column).rows
    if split not in rows:
        raise DataError(f"{data} has no {split!r} split (it has: {', '.join(sorted(rows)) or 'none'})")
    use_ray = bool(address) or rows[split] > LOCAL_MAX_ROWS
    log.info("evaluating %s on %s [%s] (%d rows, %s)", art.path, data, split, rows[split],
             "Ray Data" if use_ray else "in-process")
    preds = (predict_split_ray(art, data, split, modalities, address) if use_ray
             else predict_split(art, data, split, modalities))
    return write_report(art, preds, split, f"{data} [{split}]", modalities)


def evaluate_dataset(art: Artifact, ds: Any, split: str) -> Evaluation:
    """Evaluate on an already preprocessed Ray Dataset (the val split at the end of training)."""
    from mmfusion.data.pipeline import iter_torch_batches

    probs, labels, _ = _predict_batches(art, iter_torch_batches(ds, BATCH, art.spec, device="cpu"), None)
    return write_report(art, Predictions(probs, labels, []), split, split, None)


def write_report(art: Artifact, preds: Predictions, split: str, source: str,
                 modalities: list[str] | None) -> Evaluation:
    labelled = preds.labels >= 0
    if not labelled.any():
        raise DataError(f"{source} has no labelled rows that could be decoded; nothing to evaluate")
    report = classification_report(preds.labels[labelled], preds.probs[labelled].argmax(-1), art.labels)
    report["rejected_rows"] = len(preds.rejected)
    report["skipped_rows"] = preds.skipped
    report["modalities"] = modalities or list(art.spec.modalities)
    suffix = split + ("_" + "+".join(modalities) if modalities else "")
    plot = plot_confusion_matrix(report["confusion_matrix"], art.labels,
                                 art.path / f"confusion_matrix_{suffix}.png",
                                 title=f"{split} ({', '.join(report['modalities'])})")
    metrics = update_metrics(art.path, evaluation={**_evaluations(art.path), suffix: report})
    art.metrics.update(metrics)
    text = format_report(report, title=f"{art.path.name}: {source}, modalities {report['modalities']}")
    if preds.rejected:
        text += f"\n{len(preds.rejected)} rows could not be decoded and were left out"
    if preds.skipped:
        text += f"\n{preds.skipped} rows have none of the modalities {report['modalities']} and were left out"
    return Evaluation(report, text, plot)


def _evaluations(path: Path) -> dict[str, Any]:
    from mmfusion.artifact import read_metrics

    return read_metrics(path).get("evaluation", {})
