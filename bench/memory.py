"""Memory: peak object-store bytes and driver RSS while training, data.cache memory vs none, at two sizes.

    .venv/bin/python bench/memory.py [--data data/avt_digits_large] [--sizes 8000 16000] [--val-rows 800]
        [--epochs 1] [--out bench/results/memory.json]

Each (data.cache, size) is one fresh process (a child of this script: `--one`), so that the driver's RSS and
the object store start empty: it takes the first `size` train rows (and --val-rows val rows) of the large
AVT-Digits variant (bench/large_subset.py), starts an embedded Ray cluster, and runs what `mmfusion train`
runs with the default config (jobs/configs/avt_digits.yaml): build_datasets (the row pass, audio statistics,
and for memory the materialized splits), then Ray Train for --epochs epochs. A thread samples every 0.2 s:
    object store  the raylet's store stats (ray._private.internal_api.get_memory_info_reply, the numbers
                  `ray memory --stats-only` prints): bytes used, primary copies, spilled bytes;
    driver RSS    VmRSS of the driver process (/proc/self/status); ru_maxrss at the end as well.
Peaks are reported for the whole run and for the training phase alone, with bytes per 1,000 rows.
Target (acceptance 4): with data.cache=none the peak object-store use does not grow with the row count (the
two sizes within a constant), where with memory it grows with the rows.
Prints a table, writes JSON with every raw value.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from large_subset import subset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "jobs" / "configs" / "avt_digits.yaml"
MIB = 1024 ** 2
log = logging.getLogger("bench.memory")


class Sampler(threading.Thread):
    """Samples the object store and this process's RSS until stopped; `phase` tags the samples."""

    def __init__(self, period_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        import ray
        from ray._private import internal_api

        self.state = internal_api.get_state_from_address(ray.get_runtime_context().gcs_address)
        self.reply = internal_api.get_memory_info_reply
        self.period_s, self.phase, self.samples = period_s, "start", []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            s = self.reply(self.state, timeout_seconds=10).store_stats
            self.samples.append({"t": time.time(), "phase": self.phase,
                                 "store_used": s.object_store_bytes_used,
                                 "store_primary": s.object_store_bytes_primary_copy,
                                 "spilled_total": s.spilled_bytes_total,
                                 "fallback": s.object_store_bytes_fallback, "rss": _rss()})
            self.stopped.wait(self.period_s)

    def peaks(self, phase: str | None = None) -> dict[str, int]:
        xs = [x for x in self.samples if phase is None or x["phase"] == phase]
        return {k: max((x[k] for x in xs), default=0)
                for k in ("store_used", "store_primary", "spilled_total", "fallback", "rss")}


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def one(data: str, mode: str, train_rows: int, val_rows: int, epochs: int, out: str) -> None:
    """A child: one (data.cache, size) run, its peaks written to `out`."""
    from mmfusion.config import load_config
    from mmfusion.data.pipeline import build_datasets
    from mmfusion.runtime import init_ray
    from mmfusion.train.trainer import build_trainer, data_info

    with tempfile.TemporaryDirectory() as tmp:
        path = subset(data, {"train": train_rows, "val": val_rows}, Path(tmp) / "data")
        cfg = load_config(CONFIG, [f"data.path={path}", f"data.cache={mode}", f"train.epochs={epochs}",
                                   "train.early_stopping_patience=null"])
        init_ray()
        sampler = Sampler()
        sampler.start()
        t0 = time.perf_counter()
        sampler.phase = "build"
        bundle = build_datasets(cfg.data, ("train", "val"), seed=cfg.seed,
                                train_cpus=cfg.train.num_workers * cfg.train.cpus_per_worker)
        build_s = time.perf_counter() - t0
        sampler.phase = "train"
        build_trainer(cfg, {"train": bundle.train, "val": bundle.val}, data_info(bundle), f"memory-{mode}",
                      str(Path(tmp) / "runs"), embedded=True).fit()
        train_s = time.perf_counter() - t0 - build_s
        sampler.stopped.set()
        sampler.join()
        rows = bundle.train_rows + bundle.val_rows
        result = {"cache": bundle.cache, "train_rows": bundle.train_rows, "val_rows": bundle.val_rows,
                  "rows": rows, "epochs": epochs, "build_s": build_s, "train_s": train_s,
                  "peak": sampler.peaks(), "peak_build": sampler.peaks("build"),
                  "peak_train": sampler.peaks("train"),
                  "driver_ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "samples": len(sampler.samples), "series_mib": [
                      [round(x["t"] - sampler.samples[0]["t"], 1), x["phase"],
                       round(x["store_used"] / MIB, 1), round(x["rss"] / MIB, 1)]
                      for x in sampler.samples[::5]]}
        result["per_1000_rows"] = {k: v * 1000 / rows for k, v in result["peak"].items()}
        Path(out).write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REPO / "data" / "avt_digits_large"))
    p.add_argument("--sizes", type=int, nargs=2, default=[8_000, 16_000], help="train rows, two sizes")
    p.add_argument("--val-rows", type=int, default=800)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--modes", nargs="+", default=["memory", "none"])
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "memory.json"))
    p.add_argument("--one", nargs=3, metavar=("MODE", "TRAIN_ROWS", "JSON"), help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.one:
        mode, rows, out = args.one
        one(args.data, mode, int(rows), args.val_rows, args.epochs, out)
        return
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            for size in args.sizes:
                out = Path(tmp) / f"{mode}-{size}.json"
                cmd = [sys.executable, __file__, "--one", mode, str(size), str(out), "--data", args.data,
                       "--val-rows", str(args.val_rows), "--epochs", str(args.epochs)]
                log.info("%s", " ".join(cmd[1:]))
                subprocess.run(cmd, check=True)
                runs[f"{mode}/{size}"] = json.loads(out.read_text())
                r = runs[f"{mode}/{size}"]
                log.info("%s %d rows: peak store %.0f MiB (training %.0f), driver RSS %.0f MiB", mode,
                         r["rows"], r["peak"]["store_used"] / MIB, r["peak_train"]["store_used"] / MIB,
                         r["peak"]["rss"] / MIB)
    growth = {}
    for mode in args.modes:
        small, big = (runs[f"{mode}/{s}"] for s in args.sizes)
        growth[mode] = {"rows_ratio": big["rows"] / small["rows"],
                        "peak_store_ratio": big["peak"]["store_used"] / max(small["peak"]["store_used"], 1),
                        "peak_train_store_ratio": big["peak_train"]["store_used"]
                        / max(small["peak_train"]["store_used"], 1),
                        "peak_rss_ratio": big["peak"]["rss"] / max(small["peak"]["rss"], 1)}
    result = {
        "what": "peak object-store bytes and driver RSS while building the datasets and training 1 epoch of "
                "the default config, data.cache memory vs none, at two row counts of the large variant",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "note": "2 cores shared with other agents; heavy jobs serialized"},
        "data": {"path": args.data, "sizes_train_rows": args.sizes, "val_rows": args.val_rows},
        "growth_big_over_small": growth, "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| data.cache | rows | peak object store MiB | per 1,000 rows MiB | in training MiB "
          "| driver RSS MiB |")
    print("|---|---|---|---|---|---|")
    for r in runs.values():
        print(f"| {r['cache']} | {r['rows']} | {r['peak']['store_used'] / MIB:.0f} | "
              f"{r['per_1000_rows']['store_used'] / MIB:.1f} | {r['peak_train']['store_used'] / MIB:.0f} | "
              f"{r['peak']['rss'] / MIB:.0f} |")
    for mode, g in growth.items():
        print(f"{mode}: rows x{g['rows_ratio']:.2f} -> peak store x{g['peak_store_ratio']:.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
