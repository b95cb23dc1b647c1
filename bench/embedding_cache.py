"""Embedding cache: training with a frozen pretrained text encoder, with and without the cache, side by side.

    .venv/bin/python bench/embedding_cache.py [--data data/avt_digits] [--epochs 4]
        [--out bench/results/embedding_cache.json] [key=value ...]

The config is jobs/configs/avt_digits_pretrained.yaml (text only, MiniLM from `make pretrained`) with the
encoder frozen (model.encoders.text.freeze=true, optim.encoder_lr=null so the projection learns at optim.lr).
Four runs on one embedded Ray cluster, in a fresh storage folder (so the first cached run builds the cache):

  uncached train.embedding_cache=off: MiniLM runs forward on every batch of every epoch
  cached   train.embedding_cache=auto: embeds train and val once (Ray Data actor pool), then trains the head
  reuse    the same config again (another run name, 1 epoch): must find the cache and build nothing
  rebuild  data.text.max_length 4 longer (1 epoch): a new key, so the cache is built again

Epoch time is the train pass of an epoch (train rows / samples per second, from the run's history); the
cache build time is reported apart. Val accuracy is the last epoch's. Prints a table and writes JSON.
Targets: uncached / cached epoch time >= 5, |val accuracy difference| <= 1 point.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mmfusion.cli import setup_logging
from mmfusion.config import load_config
from mmfusion.train.trainer import run_training

log = logging.getLogger("bench")
CONFIG = "jobs/configs/avt_digits_pretrained.yaml"


def run(name: str, data: str, storage: str, epochs: int, overrides: list[str]) -> dict[str, Any]:
    cfg = load_config(CONFIG, [f"data.path={data}", f"train.storage_path={storage}", f"train.run_name={name}",
                               "model.encoders.text.freeze=true", "optim.encoder_lr=null",
                               f"train.epochs={epochs}", "train.early_stopping_patience=null", *overrides])
    t0 = time.perf_counter()
    result = run_training(cfg)
    wall = time.perf_counter() - t0
    m = result.metrics
    history = m["history"]
    epoch_s = [m["train_rows"] / h["samples_per_s"] for h in history]  # the train pass of each epoch
    cache = m.get("embedding_cache") or {}
    return {"run": name, "embedding_cache": cfg.train.embedding_cache,
            "max_length": cfg.data.text.max_length, "epochs": len(history),
            "epoch_s": [round(s, 3) for s in epoch_s], "median_epoch_s": round(statistics.median(epoch_s), 3),
            "val_accuracy": history[-1]["val_accuracy"], "artifact_val_accuracy":
                m["evaluation"]["val"]["accuracy"],  # the whole model on raw val rows (export_run)
            "cache_key": cache.get("key"), "cache_reused": cache.get("reused"),
            "cache_build_s": round(sum((cache.get("build_s") or {}).values()), 1) if cache else None,
            "run_wall_s": round(wall, 1)}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| run | cache | max_length | median epoch s | val acc | cache key | reused | build s | run s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reused = "-" if r["cache_reused"] is None else ("yes" if all(r["cache_reused"].values()) else "no")
        build = "-" if r["cache_build_s"] is None else r["cache_build_s"]
        lines.append(f"| {r['run']} | {r['embedding_cache']} | {r['max_length']} | "
                     f"{r['median_epoch_s']:.3f} | {r['val_accuracy']:.4f} | {r['cache_key'] or '-'} | "
                     f"{reused} | {build} | {r['run_wall_s']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/avt_digits")
    p.add_argument("--epochs", type=int, default=4, help="epochs of the off and cached runs")
    p.add_argument("--out", default="bench/results/embedding_cache.json")
    p.add_argument("--storage", default="runs", help="a fresh folder is made inside it for this bench")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    setup_logging()
    Path(args.storage).mkdir(parents=True, exist_ok=True)
    storage = str(Path(tempfile.mkdtemp(prefix="bench-embedding-cache-", dir=args.storage)).absolute())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    longer = load_config(CONFIG, args.overrides).data.text.max_length + 4  # any other length is a new key
    plan = [("uncached", args.epochs, ["train.embedding_cache=off"]),  # (run, epochs, overrides)
            ("cached", args.epochs, ["train.embedding_cache=auto"]),
            ("reuse", 1, ["train.embedding_cache=auto"]),  # these two check the cache, not accuracy
            ("rebuild", 1, ["train.embedding_cache=auto", f"data.text.max_length={longer}"])]
    rows: list[dict[str, Any]] = []
    for name, epochs, overrides in plan:
        log.info("run %d/%d: %s", len(rows) + 1, len(plan), name)
        rows.append(run(name, args.data, storage, epochs, [*overrides, *args.overrides]))
        out.write_text(json.dumps({"config": CONFIG, "data": args.data, "storage": storage, "rows": rows},
                                  indent=1))
    off, cached, reuse, rebuild = rows
    summary = {
        "epoch_speedup": round(off["median_epoch_s"] / cached["median_epoch_s"], 1),
        "val_accuracy_diff_points": round(100 * (cached["val_accuracy"] - off["val_accuracy"]), 2),
        "cache_build_s": cached["cache_build_s"],
        "reuse_built_nothing": all((reuse["cache_reused"] or {}).values()) and reuse["cache_key"] == cached[
            "cache_key"],
        "max_length_rebuilt": rebuild["cache_key"] != cached["cache_key"]
                              and not any((rebuild["cache_reused"] or {}).values()),
    }
    summary["targets_met"] = (summary["epoch_speedup"] >= 5 and abs(summary["val_accuracy_diff_points"]) <= 1
                              and summary["reuse_built_nothing"] and summary["max_length_rebuilt"])
    out.write_text(json.dumps({"config": CONFIG, "data": args.data, "storage": storage, "rows": rows,
                               **summary}, indent=1))
    sys.stdout.write(table(rows) + "\n\n" + json.dumps(summary) + "\n")
    return 0 if summary["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
