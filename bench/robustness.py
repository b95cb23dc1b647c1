"""Fusion operators under missing modalities and noise: each operator trained side by side on the same data,
then scored by `mmfusion evaluate --robustness`'s protocol (mmfusion.evaluate.robustness) on the same rows.

    .venv/bin/python bench/robustness.py [--datasets avt_digits,ktuberling]
        [--fusions concat,attention,gated,low_rank,tensor,late] [--train-rows 1200] [--val-rows 200]
        [--test-rows 400] [--epochs avt_digits=4,ktuberling=6] [--out bench/results/robustness.json]
        [key=value ...]

Datasets and their configs: avt_digits (data/avt_digits, jobs/configs/avt_digits.yaml) and ktuberling
(data/ktuberling, the config `mmfusion init` writes from the data, unedited, as bench/fusion_vs_single.py
--config init). To fit a few minutes per dataset on 2 CPU cores, each split is a fixed random subset (seed 0)
of its rows, written once to a folder beside the results, and every operator trains for the same few epochs
(the config's early stopping stays on); all other settings are the config's. Per operator: accuracy with every
subset of the modalities, and the curve of accuracy against each noise kind's levels (image Gaussian noise and
blur, audio SNR, text typo rate), all on the test rows that have every modality, with noise seed 0.

Writes JSON after every operator and one PNG (beside the JSON): a row of panels per dataset, the first panel
the modality subsets, then one per noise kind, a curve per operator. Prints a table per dataset.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from mmfusion.cli import setup_logging
from mmfusion.config import load_config
from mmfusion.errors import TrainingDivergedError
from mmfusion.evaluate.robustness import evaluate_robustness
from mmfusion.train.trainer import run_training

log = logging.getLogger("bench")
DATASETS = {"avt_digits": ("data/avt_digits", "jobs/configs/avt_digits.yaml"),  # name -> (data, config)
            "ktuberling": ("data/ktuberling", "init")}
FUSIONS = "concat,attention,gated,low_rank,tensor,late"
SPLITS = ("train", "val", "test")


def subset(data: str, out: Path, rows: dict[str, int], seed: int = 0) -> Path:
    """A copy of `data`'s train/val/test Parquet files with at most rows[split] rows each, drawn at random
    (seed) and kept in file order. Written once: an existing folder with the same sizes is reused."""
    stamp = out / "rows.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == rows:
        return out
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        table = pq.read_table(Path(data) / f"{split}.parquet")
        n = min(rows[split], table.num_rows)
        idx = np.sort(np.random.default_rng(seed).choice(table.num_rows, size=n, replace=False))
        pq.write_table(table.take(idx), out / f"{split}.parquet")
    stamp.write_text(json.dumps(rows))
    return out


def run_operator(config: str, data: str, storage: str, fusion: str, epochs: int,
                 overrides: list[str]) -> dict[str, Any]:
    cfg = load_config(config, [f"data.path={data}", f"train.storage_path={storage}",
                               f"model.fusion.name={fusion}", f"train.epochs={epochs}", *overrides])
    t0 = time.perf_counter()
    try:
        run = run_training(cfg)
    except TrainingDivergedError as e:
        return {"status": "diverged", "error": str(e), "train_seconds": round(time.perf_counter() - t0, 1)}
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rob = evaluate_robustness(run.artifact, data=data, split="test", local=True, seed=0)
    return {"status": "ok" if run.metrics.get("learned", True) else "never beat the majority class",
            "epochs": run.metrics["epochs_run"], f"best_{cfg.train.metric}": run.metrics.get(
                f"best_{cfg.train.metric}"), "train_seconds": round(train_s, 1),
            "robustness_seconds": round(time.perf_counter() - t0, 1), "artifact": str(run.artifact),
            "robustness": rob.results}


def summary(r: dict[str, Any]) -> dict[str, float]:
    """all modalities, the mean over single-modality subsets, and each noise kind's mean over its noisy
    levels (the clean point left out)."""
    rob = r["robustness"]
    subsets = {"+".join(s["modalities"]): s["accuracy"] for s in rob["subsets"]}
    singles = [s["accuracy"] for s in rob["subsets"] if len(s["modalities"]) == 1]
    out = {"all": subsets["+".join(rob["modalities"])], "single_mean": float(np.mean(singles))}
    for kind, curve in rob["noise"].items():
        noisy = [p["accuracy"] for p in curve["points"] if p["level"] is not None]
        out[f"{kind}_mean"] = float(np.mean(noisy))
    return out


def table(name: str, operators: dict[str, Any]) -> str:
    ok = {f: summary(r) for f, r in operators.items() if r["status"] != "diverged"}
    cols = list(next(iter(ok.values()), {}))
    lines = [f"{name}: test accuracy (noise columns: mean over the noisy levels)",
             "| fusion | " + " | ".join(cols) + " | epochs | train s |", "|---" * (len(cols) + 3) + "|"]
    for f, r in operators.items():
        cells = [f"{ok[f][c]:.3f}" for c in cols] if f in ok else ["diverged"] * len(cols)
        lines.append(f"| {f} | " + " | ".join(cells) + f" | {r.get('epochs', '-')} | {r['train_seconds']} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = {d: v for d, v in results["datasets"].items() if any(
        r["status"] != "diverged" for r in v["operators"].values())}
    kinds = max((list(next(r for r in v["operators"].values() if r["status"] != "diverged")["robustness"]
                      ["noise"]) for v in datasets.values()), key=len, default=[])
    size = (4 * (1 + len(kinds)), 3.6 * len(datasets))
    fig, axes = plt.subplots(len(datasets), 1 + len(kinds), figsize=size, squeeze=False)
    for row, (name, v) in zip(axes, datasets.items(), strict=True):
        for fusion, r in v["operators"].items():
            if r["status"] == "diverged":
                continue
            rob = r["robustness"]
            names = ["+".join(s["modalities"]) for s in rob["subsets"]]
            row[0].plot(range(len(names)), [s["accuracy"] for s in rob["subsets"]], "-o", ms=3, label=fusion)
            row[0].set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
            for ax, kind in zip(row[1:], kinds, strict=True):
                curve = rob["noise"].get(kind)
                if curve is None:
                    continue
                pts = curve["points"]
                ax.plot(range(len(pts)), [p["accuracy"] for p in pts], "-o", ms=3, label=fusion)
                ax.set_xticks(range(len(pts)), ["clean" if p["level"] is None else f"{p['level']:g}"
                                                for p in pts])
                ax.set(xlabel=curve["unit"], title=f"{name}: {kind}")
        row[0].set(title=f"{name}: modalities seen", ylabel="test accuracy")
        row[0].legend(fontsize=7)
        for ax in row:
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--fusions", default=FUSIONS)
    p.add_argument("--train-rows", type=int, default=1200)
    p.add_argument("--val-rows", type=int, default=200)
    p.add_argument("--test-rows", type=int, default=400)
    p.add_argument("--epochs", default="avt_digits=4,ktuberling=6", help="dataset=epochs, comma-separated")
    p.add_argument("--out", default="bench/results/robustness.json")
    p.add_argument("--storage", default="runs/bench-robustness")
    p.add_argument("overrides", nargs="*", help="config overrides for every run (key=value)")
    args = p.parse_args(argv)
    setup_logging()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    epochs = {k: int(v) for k, v in (item.split("=", 1) for item in args.epochs.split(",") if item)}
    rows = {"train": args.train_rows, "val": args.val_rows, "test": args.test_rows}
    results: dict[str, Any] = {"datasets": {}}
    if out.is_file():  # datasets (and operators) measured before, e.g. one dataset per locked run, are kept
        results["datasets"] = json.loads(out.read_text()).get("datasets", {})
    for name in [d for d in args.datasets.split(",") if d]:
        if name not in DATASETS:
            p.error(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
        source, config = DATASETS[name]
        data = str(subset(source, Path(args.storage) / "data" / name, rows))
        if config == "init":
            from mmfusion.starter_config import write_starter_config

            config = str(write_starter_config(source, Path(args.storage) / f"{name}.config.yaml", force=True))
        entry = {"data": source, "subset": data, "rows": rows, "config": config,
                 "epochs": epochs.get(name, 4), "overrides": args.overrides, "operators": {}}
        before = results["datasets"].get(name, {})
        if all(before.get(k) == entry[k] for k in ("rows", "epochs", "overrides")):  # same setup: keep the
            entry["operators"] = before.get("operators", {})  # other operators (run some with --fusions)
        results["datasets"][name] = entry
        for fusion in [f for f in args.fusions.split(",") if f]:
            log.info("%s: %s fusion", name, fusion)
            entry["operators"][fusion] = run_operator(config, data, args.storage, fusion, entry["epochs"],
                                                      args.overrides)
            out.write_text(json.dumps(results, indent=1))
        sys.stdout.write(table(name, entry["operators"]) + "\n\n")
    plot(results, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
