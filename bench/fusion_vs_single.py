"""Fused model vs single-modality models on AVT-Digits' test split, trained side by side in one run.

    .venv/bin/python bench/fusion_vs_single.py [--config jobs/configs/avt_digits.yaml]
        [--data data/avt_digits] [--out bench/results/fusion_vs_single.json] [key=value ...]

Each row is the same experiment config with `data.modalities` overridden; all are trained on one embedded Ray
cluster and evaluated on the test split. Prints a Markdown table (the README's) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from mmfusion.cli import setup_logging
from mmfusion.config import load_config
from mmfusion.evaluate.report import evaluate_artifact
from mmfusion.train.trainer import run_training

log = logging.getLogger("bench")
ROWS = [["image", "text", "audio"], ["image"], ["text"], ["audio"]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="jobs/configs/avt_digits.yaml")
    p.add_argument("--data", default="data/avt_digits")
    p.add_argument("--out", default="bench/results/fusion_vs_single.json")
    p.add_argument("--storage", default="runs/bench")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    setup_logging()
    results = []
    for mods in ROWS:
        cfg = load_config(args.config, [f"data.path={args.data}", f"train.storage_path={args.storage}",
                                        f"data.modalities=[{','.join(mods)}]", *args.overrides])
        t0 = time.perf_counter()
        run = run_training(cfg)
        seconds = time.perf_counter() - t0
        ev = evaluate_artifact(run.artifact, data=args.data, split="test")
        results.append({"modalities": mods, "test_accuracy": ev.report["accuracy"],
                        "test_macro_f1": ev.report["macro_f1"],
                        "val_accuracy": run.metrics.get("best_val_accuracy"),
                        "epochs": run.metrics["epochs_run"], "train_seconds": round(seconds, 1),
                        "artifact": str(run.artifact)})
        log.info("%s: test accuracy %.4f", "+".join(mods), ev.report["accuracy"])
    best_single = max(r["test_accuracy"] for r in results[1:])
    fused = results[0]["test_accuracy"]
    lines = ["| modalities | test accuracy | test macro-F1 | epochs | train s |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {' + '.join(r['modalities'])} | {r['test_accuracy']:.3f} | "
                     f"{r['test_macro_f1']:.3f} | {r['epochs']} | {r['train_seconds']} |")
    lines.append(f"\nfused - best single = {100 * (fused - best_single):+.1f} points")
    sys.stdout.write("\n".join(lines) + "\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": results, "fused_minus_best_single": fused - best_single}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
