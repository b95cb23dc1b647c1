"""`mmfusion evaluate ARTIFACT --robustness`: accuracy for every subset of the model's modalities, and under
growing noise on each modality (mmfusion.evaluate.noise), in one pass over a split.

`RobustnessScorer` extends the Predictor: each record batch is preprocessed once clean; every subset is the
clean batch with the other modalities marked absent; every noise level re-runs only the noisy modality's
kernel on corrupted raw values. It runs on the same Ray Data actor pool as `mmfusion predict` (or in-process).
All conditions are scored on the same rows: those with every one of the model's modalities present (a row
that lacks one cannot show what hiding or corrupting it costs). Written next to the artifact:
robustness.json, robustness.png (a bar per subset, a curve per noise kind) and metrics.json["robustness"].
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmfusion.batch import INPUT_KEYS
from mmfusion.errors import DataError
from mmfusion.evaluate.noise import NOISES, corrupt
from mmfusion.evaluate.predict import Predictor, Tally, _meta, hide, run_udf

if TYPE_CHECKING:
    from mmfusion.artifact import Artifact
    from mmfusion.evaluate.inference import Device

log = logging.getLogger(__name__)

JSON_NAME, PLOT_NAME = "robustness.json", "robustness.png"


@dataclass(frozen=True)
class Condition:
    """One way of scoring a row: the modalities the model sees, and optionally noise on one of them."""

    name: str  # result column: "image+text" for a subset, "audio_snr@10" for a noise level
    keep: tuple[str, ...]
    noise: str | None = None
    level: float = 0.0


def plan_conditions(modalities: list[str], noises: list[str] | None = None) -> list[Condition]:
    """Every non-empty subset of `modalities` (largest first), then every non-clean level of every noise kind
    whose modality the model has (`noises`: only these kinds)."""
    mods = tuple(modalities)
    subsets = [s for r in range(len(mods), 0, -1) for s in itertools.combinations(mods, r)]
    out = [Condition("+".join(s), s) for s in subsets]
    unknown = sorted(set(noises or []) - set(NOISES))
    if unknown:
        raise DataError(f"unknown noise kind(s) {unknown}; known: {', '.join(NOISES)}")
    for kind, nk in NOISES.items():
        if nk.modality in mods and (noises is None or kind in noises):
            out += [Condition(f"{kind}@{lv:g}", mods, kind, lv) for lv in nk.levels if lv != nk.clean]
    return out


class RobustnessScorer(Predictor):
    """Record batch -> for each condition, the predicted class of every complete row (-1 elsewhere).

    Out: "id", "split", "source", "row", "target", "error", "actor" as the Predictor's, "complete" bool (N,)
    (the rows scored), and one int64 (N,) column per condition, named by Condition.name.
    """

    def __init__(self, artifact: str | Path | Artifact, conditions: list[dict[str, Any]], seed: int = 0,
                 device: str = "cpu", num_threads: int | None = None) -> None:
        from mmfusion.data.preprocessor import Preprocessor

        super().__init__(artifact, None, labelled=True, device=device, num_threads=num_threads)
        self.conditions = [Condition(**{**c, "keep": tuple(c["keep"])}) for c in conditions]
        self.seed = seed
        cfg = self.art.cfg.data
        noisy = {NOISES[c.noise].modality for c in self.conditions if c.noise}
        # one kernel per noisy modality: a noise level re-preprocesses only the modality it corrupts
        self.single = {m: Preprocessor(cfg.model_copy(update={"modalities": [m]})) for m in noisy}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.pre(batch)
        errors = np.asarray(out["error"], dtype=object)
        present = np.asarray(out["present"], dtype=bool)
        complete = (errors == "") & present.all(axis=1)  # (N,)
        res = {**_meta(out), "target": np.asarray(out["label"], dtype=np.int64), "error": errors,
               "complete": complete, "actor": np.full(len(errors), self.actor, dtype=object)}
        for c in self.conditions:
            pred = np.full(len(errors), -1, dtype=np.int64)
            if complete.any():
                if c.noise is None:
                    probs = self.probabilities(out, hide(present, self.modalities, list(c.keep)), complete)
                else:
                    probs = self.probabilities(self._noisy(batch, out, c, complete), present, complete)
                pred[complete] = probs[complete].argmax(axis=1)
            res[c.name] = pred
        return res

    def _noisy(self, batch: dict[str, np.ndarray], out: dict[str, np.ndarray], c: Condition, rows: np.ndarray,
               ) -> dict[str, np.ndarray]:
        """The preprocessed batch with modality c's inputs of `rows` replaced by their corrupted versions."""
        assert c.noise is not None
        m = NOISES[c.noise].modality
        idx = np.flatnonzero(rows)
        values = [batch[m][i] for i in idx]
        ids = [str(out["id"][i]) for i in idx]
        column = np.empty(len(idx), dtype=object)  # (n,) bytes or str: kept 1-D whatever the values
        column[:] = corrupt(values, ids, c.noise, c.level, self.seed)
        noisy = self.single[m]({m: column})
        merged = dict(out)
        for k in INPUT_KEYS[m]:
            merged[k] = np.array(out[k], copy=True)
            merged[k][idx] = noisy[k]
        return merged


@dataclass
class Robustness:
    results: dict[str, Any]
    table: str
    json_path: Path
    plot: Path


def evaluate_robustness(artifact: str | Path, data: str | None = None, split: str = "test",
                        address: str | None = None, device: Device = "auto", local: bool = False,
                        seed: int = 0, noises: list[str] | None = None) -> Robustness:
    """Score every condition of plan_conditions over one split; write the JSON, the plot and the table."""
    from mmfusion.artifact import read_artifact_info, update_metrics
    from mmfusion.evaluate.plots import plot_robustness

    info = read_artifact_info(artifact)
    data = data or info.cfg.data.path
    conditions = plan_conditions(info.modalities, noises)
    tally = Tally()
    correct = dict.fromkeys((c.name for c in conditions), 0)
    scored = total = 0
    kwargs = {"artifact": str(info.path), "conditions": [asdict(c) for c in conditions], "seed": seed}
    log.info("robustness of %s on %s [%s]: %d conditions", info.path, data, split, len(conditions))
    for batch in run_udf(RobustnessScorer, kwargs, data, split, info.cfg.data.label_column,
                         info.modalities, tally, address, device, local):
        good = tally.count(batch)
        target = np.asarray(batch["target"])
        rows = np.asarray(batch["complete"], dtype=bool) & (target >= 0)
        total += int(good.sum())
        scored += int(rows.sum())
        for c in conditions:
            correct[c.name] += int((np.asarray(batch[c.name])[rows] == target[rows]).sum())
    if scored == 0:
        raise DataError(f"no row of {data} [{split}] has all of the model's modalities {info.modalities} "
                        "and a known label: nothing to compare the conditions on")
    acc = {name: k / scored for name, k in correct.items()}
    results = summarize(conditions, acc, info.modalities, split=split, rows=scored, decoded_rows=total,
                        rejected_rows=len(tally.rejected), skipped_rows=tally.skipped, seed=seed)
    json_path = info.path / JSON_NAME
    json_path.write_text(json.dumps(results, indent=1))
    plot = plot_robustness(results, info.path / PLOT_NAME, title=f"{info.path.name}: {split}")
    update_metrics(info.path, robustness=results)
    table = format_table(results)
    log.info("robustness of %s (%s, %d rows with every modality):\n%s", info.path.name, split, scored, table)
    return Robustness(results, table, json_path, plot)


def summarize(conditions: list[Condition], acc: dict[str, float], modalities: list[str],
              **meta: Any) -> dict[str, Any]:
    """The JSON document: {...meta, "subsets": [{modalities, accuracy}], "noise": {kind: {modality, unit,
    points: [{level, accuracy}]}}}. Every curve starts at the clean point (level null), the all-modality
    accuracy."""
    everything = "+".join(modalities)
    noise: dict[str, Any] = {}
    for c in conditions:
        if c.noise is None:
            continue
        nk = NOISES[c.noise]
        curve = noise.setdefault(c.noise, {"modality": nk.modality, "unit": nk.unit,
                                           "points": [{"level": None, "accuracy": acc[everything]}]})
        curve["points"].append({"level": c.level, "accuracy": acc[c.name]})
    return {**meta, "modalities": list(modalities),
            "subsets": [{"modalities": list(c.keep), "accuracy": acc[c.name]}
                        for c in conditions if c.noise is None],
            "noise": noise}


def format_table(results: dict[str, Any]) -> str:
    lines = [f"{'modalities':<24} {'accuracy':>8}"]
    lines += [f"{'+'.join(s['modalities']):<24} {s['accuracy']:>8.4f}" for s in results["subsets"]]
    for kind, curve in results["noise"].items():
        lines.append("")
        lines.append(f"{kind} ({curve['unit']})")
        levels = ["clean" if p["level"] is None else _level(p["level"]) for p in curve["points"]]
        lines.append("  level     " + " ".join(f"{lv:>7}" for lv in levels))
        lines.append("  accuracy  " + " ".join(f"{p['accuracy']:>7.4f}" for p in curve["points"]))
    return "\n".join(lines)


def _level(level: float) -> str:
    return "inf" if math.isinf(level) else f"{level:g}"
