"""Training throughput by workers x torch threads on this machine: 1 x 1, 1 x 2 and 2 x 1 (issue 15).

    .venv/bin/python bench/train_threads.py [--data data/avt_digits] [--epochs 3] [--rounds 3]
        [--train-rows 1200] [--val-rows 200] [--out bench/results/train_threads.json]

The AVT-Digits preprocessed splits are built once (materialized, data.cache=memory), then the three layouts
train one after another, round after round (ABC ABC ABC), each a real `build_trainer(...).fit()` on one
embedded Ray cluster with the demo config (jobs/configs/avt_digits.yaml, batch 64 per worker). The figure is
each run's steady-state samples/s: the median over its epochs after the first (which includes worker start-up
and the first pass over the shard); the layout's figure is the median over rounds. --train-rows keeps the
first rows of the train split only, so that a round fits a busy machine (samples/s does not depend on it).
Interleaving spreads the load other processes put on the machine over all layouts alike; the medians and
every raw value are written.
Ratios are against 1 x 1 measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {"1x1": (1, 1), "1x2": (1, 2), "2x1": (2, 1)}  # name -> (workers, torch threads per worker)
log = logging.getLogger("bench.train_threads")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REPO / "data" / "avt_digits"))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--train-rows", type=int, default=1200, help="0: the whole train split")
    p.add_argument("--val-rows", type=int, default=200, help="0: the whole val split")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "train_threads.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from mmfusion.config import load_config
    from mmfusion.data.pipeline import build_datasets
    from mmfusion.runtime import init_ray
    from mmfusion.train.trainer import build_trainer, data_info

    cfg = load_config(REPO / "jobs" / "configs" / "avt_digits.yaml",
                      [f"data.path={args.data}", f"train.epochs={args.epochs}", "data.cache=memory",
                       "train.early_stopping_patience=null"])
    init_ray()
    bundle = build_datasets(cfg.data, splits=("train", "val"), seed=cfg.seed)
    train, val = bundle.train, bundle.val
    if args.train_rows:
        train = train.limit(args.train_rows).materialize()
    if args.val_rows:
        val = val.limit(args.val_rows).materialize()
    info = {**data_info(bundle), "train_rows": train.count()}
    raw: dict[str, list[dict]] = {name: [] for name in LAYOUTS}
    with tempfile.TemporaryDirectory() as storage:
        for r in range(args.rounds):
            for name, (workers, threads) in LAYOUTS.items():
                run = cfg.model_copy(deep=True)
                run.train.num_workers, run.train.num_threads = workers, threads
                run.train.cpus_per_worker = 1.0
                t0 = time.perf_counter()
                result = build_trainer(run, {"train": train, "val": val}, info,
                                       f"threads-{name}-{r}", storage, embedded=True).fit()
                wall = time.perf_counter() - t0
                per_epoch = [h["samples_per_s"] for h in _history(result)]
                steady = statistics.median(per_epoch[1:] or per_epoch)
                raw[name].append({"round": r, "samples_per_s_per_epoch": per_epoch, "steady": steady,
                                  "wall_s": wall})
                log.info("round %d %s: %.0f samples/s steady (epochs %s), %.0f s wall", r, name, steady,
                         [round(x) for x in per_epoch], wall)
    medians = {name: statistics.median(x["steady"] for x in runs) for name, runs in raw.items()}
    out = {
        "what": "steady-state training samples/s (median over epochs after the first, then over rounds) of "
                "the AVT-Digits demo config, by Ray Train workers x torch threads per worker",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "note": "shared with other jobs while measuring: layouts interleaved, medians reported"},
        "data": {"path": args.data, "train_rows": info["train_rows"], "val_rows": val.count(),
                 "cache": bundle.cache},
        "config": {"epochs": args.epochs, "rounds": args.rounds, "cpus_per_worker": 1.0,
                   "batch_size_per_worker": cfg.train.batch_size},
        "median_samples_per_s": medians,
        "ratio_to_1x1": {name: medians[name] / medians["1x1"] for name in LAYOUTS},
        "runs": raw,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print("| workers x threads | samples/s (median) | vs 1 x 1 |")
    print("|---|---|---|")
    for name in LAYOUTS:
        print(f"| {name.replace('x', ' x ')} | {medians[name]:.0f} | {out['ratio_to_1x1'][name]:.2f} |")
    print(f"wrote {args.out}")


def _history(result) -> list[dict]:
    """The epoch metrics of a finished run (the latest checkpoint's loop state holds them all)."""
    from mmfusion.train.checkpoint import load_loop_state

    with result.checkpoint.as_directory() as d:
        return load_loop_state(Path(d)).history


if __name__ == "__main__":
    main()
