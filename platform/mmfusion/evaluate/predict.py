"""Batch prediction: an artifact over a dataset (labelled or not) -> per-row class probabilities.

`Predictor` is the one per-batch step (records -> Preprocessor -> model -> softmax) that `mmfusion predict`,
`mmfusion evaluate` and the robustness scorer share; mmfusion.evaluate.inference runs it on a Ray Data actor
pool or in-process. `predict_to_parquet` writes

    OUT.parquet            id, split, label (the predicted class), prob_<class> (one float column per class),
                           modalities (the ones the row was predicted from)
    OUT.rejects.jsonl      the rows that could not be decoded, with their reasons (mmfusion.data.rejects)

Rows with none of the model's (or of the kept) modalities are counted as skipped: there is nothing to predict
from, and nothing is wrong with them.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmfusion.batch import DTYPES, input_keys
from mmfusion.errors import DataError

if TYPE_CHECKING:
    from mmfusion.artifact import Artifact
    from mmfusion.evaluate.inference import Device, Pool

log = logging.getLogger(__name__)

PROB_PREFIX = "prob_"
OUTPUT_COLUMNS = ("id", "split", "source", "row", "target", "probs", "present", "error", "actor")


def hide(present: np.ndarray, modalities: tuple[str, ...], keep: list[str] | None) -> np.ndarray:
    """(N, M) presence mask with every modality outside `keep` marked absent (None: all kept)."""
    if not keep:
        return present
    return present & np.array([m in keep for m in modalities], dtype=bool)[None, :]


class Predictor:
    """Record batch (RECORD_SCHEMA columns) -> predictions. A callable class: one per Ray Data actor (the
    artifact is loaded once, in __init__), or one in-process.

    Out (N rows in, N rows out): "id", "split", "source", "row" (passed through), "target" i64 (true class
    index, -1 when unknown or `labelled` is off), "probs" f32 (N, K) (zeros for rows not predicted),
    "present" bool (N, M) (the modalities the row was predicted from), "error" str ("" = predicted; a reason
    = rejected; EMPTY_ROW... = skipped), "actor" str (which actor predicted it).

    Args:
        artifact: an artifact folder, or an already loaded Artifact (in-process only).
        keep: predict from these modalities only (None: all of the model's).
        labelled: index the label column with the artifact's labels; a missing or unknown label then
            rejects its row (evaluation). Off: labels are ignored (prediction on unlabelled data).
        device: "cpu" or "cuda".
        num_threads: torch threads (1 per Ray Data actor: the pool provides the parallelism).
    """

    def __init__(self, artifact: str | Path | Artifact, keep: list[str] | None = None, labelled: bool = False,
                 device: str = "cpu", num_threads: int | None = None) -> None:
        import torch

        from mmfusion.artifact import Artifact, load_artifact
        from mmfusion.data.preprocessor import Preprocessor

        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.art = artifact if isinstance(artifact, Artifact) else load_artifact(artifact, device=device)
        self.device = torch.device(device)
        self.art.model.to(self.device).eval()
        self.modalities: tuple[str, ...] = tuple(self.art.spec.modalities)
        self.keep = list(keep) if keep else None
        self.pre = Preprocessor(self.art.cfg.data, self.art.labels if labelled else None)
        self.actor = _actor_name()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from mmfusion.data.preprocessor import EMPTY_ROW

        out = self.pre(batch)
        errors = np.asarray(out["error"], dtype=object).copy()
        present = hide(np.asarray(out["present"], dtype=bool), self.modalities, self.keep)
        for i in np.flatnonzero((errors == "") & ~present.any(axis=1)):
            errors[i] = f"{EMPTY_ROW} ({', '.join(self.keep or self.modalities)}) is present"
        good = errors == ""
        return {**_meta(out), "target": np.asarray(out["label"], dtype=np.int64),
                "probs": self.probabilities(out, present, good), "present": present, "error": errors,
                "actor": np.full(len(errors), self.actor, dtype=object)}

    def probabilities(self, out: dict[str, np.ndarray], present: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Softmax (N, K) float32 for the `rows` (bool (N,)) of a preprocessed batch, with `present` as the
        presence mask; zeros elsewhere."""
        import torch

        probs = np.zeros((len(rows), len(self.art.labels)), dtype=np.float32)
        if not rows.any():
            return probs
        batch = {k: torch.from_numpy(np.ascontiguousarray(np.asarray(out[k])[rows]))
                 .to(self.device, getattr(torch, DTYPES[k])) for k in input_keys(self.modalities)[:-1]}
        batch["present"] = torch.from_numpy(np.ascontiguousarray(present[rows])).to(self.device)
        with torch.no_grad():
            logits = self.art.model(batch).float()  # (n, K)
        probs[rows] = torch.softmax(logits, dim=-1).cpu().numpy()
        return probs


def _meta(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = len(out["id"])
    none = np.full(n, None, dtype=object)
    return {"id": np.asarray(out["id"], dtype=object),
            "split": np.asarray(out["split"], dtype=object) if "split" in out else none,
            "source": np.asarray(out["source"], dtype=object) if "source" in out else none,
            "row": np.asarray(out["row"], dtype=np.int64) if "row" in out else np.full(n, -1, np.int64)}


def _actor_name() -> str:
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            actor = ray.get_runtime_context().get_actor_id()
            if actor:
                return str(actor)
    return "local"


# ------------------------------------------------------------------------------------------ the driver


@dataclass
class Tally:
    """What a pass over a dataset produced, besides the predictions."""

    rejected: list[dict[str, Any]] = field(default_factory=list)  # id, split, row, source, error
    skipped: int = 0  # rows with none of the (kept) modalities
    actors: set[str] = field(default_factory=set)  # the actors that returned results
    pool: Pool | None = None  # None: in-process

    def count(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Note a result batch's rejected and skipped rows and its actors; -> bool (N,) of predicted rows."""
        from mmfusion.data.preprocessor import EMPTY_ROW

        errors = batch["error"]
        empty = np.array([str(e).startswith(EMPTY_ROW) for e in errors], dtype=bool)
        good = np.array([e == "" for e in errors], dtype=bool)
        self.skipped += int(empty.sum())
        for i in np.flatnonzero(~good & ~empty):
            self.rejected.append({"id": batch["id"][i], "split": batch["split"][i],
                                  "row": int(batch["row"][i]), "source": batch["source"][i],
                                  "error": str(errors[i])})
        self.actors.update(str(a) for a in batch["actor"])
        return good


def run_udf(udf_cls: type, udf_kwargs: dict[str, Any], data: str, split: str | None, label_column: str,
            modalities: list[str], tally: Tally, address: str | None = None, device: Device = "auto",
            local: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """The UDF's result batches over `split` (None: every split) of `data`: on a Ray Data actor pool
    (default), or in-process with `local`."""
    from mmfusion.data.readers import summarize
    from mmfusion.evaluate import inference

    summary = summarize(data, label_column)
    if split is not None and summary.rows.get(split, 0) == 0:
        found = ", ".join(sorted(summary.rows)) or "none"
        raise DataError(f"{data} has no {split!r} split (it has: {found})")
    num_rows = summary.rows[split] if split is not None else sum(summary.rows.values())
    splits = [split] if split is not None else None
    if local:
        udf = udf_cls(**udf_kwargs, device=inference.local_device(device))
        yield from inference.iter_local(udf, data, splits, label_column, modalities)
        return
    from mmfusion.runtime import init_ray

    init_ray(address)
    tally.pool = inference.cluster_pool(device)
    yield from inference.iter_ray(udf_cls, udf_kwargs, data, splits, label_column, modalities, num_rows,
                                  tally.pool)


@dataclass
class PredictRun:
    out: Path
    rows: int  # rows predicted and written
    rejected: int  # rows that could not be decoded (listed in rejects_path)
    skipped: int  # rows with none of the (kept) modalities
    rejects_path: Path | None
    actors: int  # actors that predicted rows (0: in-process)
    pool: Pool | None

    def summary(self) -> str:
        where = f" on {self.pool.describe()} ({self.actors} used)" if self.pool else " in-process"
        lines = [f"{self.rows} rows predicted{where} -> {self.out}"]
        if self.rejected:
            lines.append(f"{self.rejected} rows could not be decoded: reasons in {self.rejects_path}")
        if self.skipped:
            lines.append(f"{self.skipped} rows have none of the model's modalities and were skipped")
        return "\n".join(lines)


def predict_to_parquet(artifact: str | Path, data: str, out: str | Path, split: str | None = None,
                       modalities: list[str] | None = None, address: str | None = None,
                       device: Device = "auto", local: bool = False) -> PredictRun:
    """`mmfusion predict`: predictions for every row of `data` (or of one split) in one Parquet file, and the
    undecodable rows in OUT's rejects file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmfusion.artifact import read_artifact_info
    from mmfusion.data.rejects import update_rejects

    info = read_artifact_info(artifact)
    check_modalities(modalities, info.modalities)
    out = Path(out).absolute()
    if out.suffix != ".parquet":
        raise DataError(f"--out must name a .parquet file, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    schema = output_schema(info.labels)
    tally = Tally()
    udf_kwargs = {"artifact": str(info.path), "keep": modalities, "labelled": False}
    tmp = out.with_name(f".{out.name}.tmp")
    rows = 0
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for batch in run_udf(Predictor, udf_kwargs, data, split, info.cfg.data.label_column,
                                 info.modalities, tally, address, device, local):
                good = tally.count(batch)
                if good.any():
                    writer.write_table(pa.Table.from_pydict(
                        to_columns(batch, good, info.labels, tuple(info.modalities)), schema=schema))
                    rows += int(good.sum())
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    rejects_path = update_rejects(out.with_name(out.stem + ".rejects.jsonl"), tally.rejected)
    run = PredictRun(out, rows, len(tally.rejected), tally.skipped, rejects_path,
                     len(tally.actors - {"local"}), tally.pool)
    log.info("%s", run.summary())
    return run


def check_modalities(modalities: list[str] | None, model: list[str]) -> None:
    unknown = [m for m in modalities or [] if m not in model]
    if unknown:
        raise DataError(f"--modalities {unknown}: the model was trained on {list(model)}")


def output_schema(labels: list[str]) -> Any:
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("split", pa.string()), ("label", pa.string()),
                      *((f"{PROB_PREFIX}{c}", pa.float32()) for c in labels),
                      ("modalities", pa.list_(pa.string()))])


def to_columns(batch: dict[str, np.ndarray], rows: np.ndarray, labels: list[str],
               modalities: tuple[str, ...]) -> dict[str, list[Any] | np.ndarray]:
    """The output columns of the predicted `rows` of a result batch."""
    probs = np.asarray(batch["probs"], dtype=np.float32)[rows]  # (n, K)
    present = np.asarray(batch["present"], dtype=bool)[rows]  # (n, M)
    cols: dict[str, list[Any] | np.ndarray] = {
        "id": [str(x) for x in batch["id"][rows]],
        "split": [None if x is None else str(x) for x in batch["split"][rows]],
        "label": [labels[k] for k in probs.argmax(axis=1)]}
    for k, c in enumerate(labels):
        cols[f"{PROB_PREFIX}{c}"] = probs[:, k]
    cols["modalities"] = [[m for m, p in zip(modalities, row, strict=True) if p] for row in present]
    return cols
