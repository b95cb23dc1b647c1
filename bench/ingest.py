"""Ingest: the Ray Data pipeline against a torch DataLoader, and how long training waits on data (issue 15).

    .venv/bin/python bench/ingest.py [--data data/avt_digits_large] [--part all|throughput|waits]
        [--rows 8000] [--rounds 2] [--train-rows 8000] [--val-rows 800] [--epochs 2] [--mock-epochs 1]
        [--mock-rows 8000] [--modes memory,none|auto] [--out bench/results/ingest.json]

Both parts run on a row subset of the large AVT-Digits variant (bench/large_subset.py: its first shards, the
rows and media unchanged), so that each fits a 10-minute run on 2 cores; the data.cache mode that `auto`
picks is computed for the whole variant (plan.choose_cache against this cluster's object store) and used.

throughput  files -> decoded, preprocessed, collated torch batches of 64 (the batch training sees), rows/s at
            the consumer, side by side, rounds interleaved (Ray, DataLoader, Ray, ...):
            ray         build_datasets(data.cache=none) once, then each round one pass over its train
                        stream with iter_torch_batches (read tasks, a Preprocessor actor pool sized to the
                        machine's cores, MMCollate): exactly what a streaming epoch reads;
            dataloader  torch DataLoader, 2 worker processes, each reading its share of the same Parquet
                        row groups (mmfusion.data.readers) and running the same Preprocessor (1 torch thread,
                        uint8 images, 128-row calls) and MMCollate: the same functions, no Ray.
            Each round includes its start-up (actor pool / worker processes); time to the first batch is
            reported apart.
waits       the default config (jobs/configs/avt_digits.yaml: 1 worker, batch 64) trained by Ray Train on the
            subset, data.cache memory and none, `--epochs` epochs each. The loop times every next() on the
            batch iterator (train.loop: data_wait_s, the first batch's wait apart) against the epoch's train
            time. The no-wait reference: the same loop in-process over the same train batches collated once
            into a Python list (an in-memory mock), at the torch threads each Ray run used.
            wait fraction = data_wait_s / epoch train seconds; steady = without the first batch (pipeline
            start-up, paid once per epoch).
            --modes auto runs only the mode auto picks on the whole variant: with --train-rows 200000
            --val-rows 20000 --epochs 1 that is a full-size epoch of the default config (about 25 minutes
            here; figures: bench/results/ingest_full_epoch.json). The mock then holds the first --mock-rows
            rows of the stream (its samples/s does not depend on the row count).
Target (acceptance 2): wait fraction <= 0.05 with the default config (the mode auto picks on the large
variant).
Prints tables, writes JSON with every raw value and the medians.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from large_subset import subset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "jobs" / "configs" / "avt_digits.yaml"
BATCH = 64  # the default config's train.batch_size
log = logging.getLogger("bench.ingest")


class RecordStream(torch.utils.data.IterableDataset):
    """The DataLoader arm: read units -> records -> Preprocessor -> MMCollate; each worker its share of
    the units."""

    def __init__(self, units: list[dict], cfg: Any, labels: list[str], spec: Any,
                 preprocess_rows: int) -> None:
        self.units, self.cfg, self.labels, self.spec, self.rows = units, cfg, labels, spec, preprocess_rows

    def __iter__(self):
        from mmfusion.data import readers
        from mmfusion.data.pipeline import MMCollate
        from mmfusion.data.preprocessor import Preprocessor

        info = torch.utils.data.get_worker_info()
        wid, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        pre = Preprocessor(self.cfg, self.labels, num_threads=1, uint8_images=True)
        collate = MMCollate(self.spec)
        for row in self.units[wid::workers]:
            unit = readers.ReadUnit.from_row(row)
            for tb in readers.read_unit(unit, self.cfg.label_column, {"train"}, list(self.cfg.modalities)):
                tb = readers.resolve_media(tb)
                for start in range(0, tb.num_rows, self.rows):
                    part = tb.slice(start, self.rows)
                    out = pre({c: part[c].to_numpy(zero_copy_only=False) for c in part.column_names})
                    good = out["error"] == ""  # as the pipeline: rejected rows never reach training
                    for a in range(0, int(good.sum()), BATCH):
                        yield collate({k: v[good][a:a + BATCH] for k, v in out.items()})


def timed_pass(batches) -> dict[str, float]:
    t0 = time.perf_counter()
    rows, first = 0, None
    for b in batches:
        first = first if first is not None else time.perf_counter() - t0
        rows += int(b["label"].shape[0])
    seconds = time.perf_counter() - t0
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds, "first_batch_s": first or 0.0}


def throughput(data: str, rounds: int) -> dict[str, Any]:
    from mmfusion.config import load_config
    from mmfusion.data import readers
    from mmfusion.data.pipeline import PREPROCESS_BATCH, build_datasets, iter_torch_batches
    from mmfusion.runtime import usable_cpus

    cfg = load_config(CONFIG, [f"data.path={data}", "data.cache=none"])
    bundle = build_datasets(cfg.data, splits=("train",), seed=cfg.seed)  # the stream; its row pass once
    summary = readers.summarize(data, cfg.data.label_column)
    units = [u.as_row() for u in readers.plan_units([f for f in summary.files if f.split == "train"])]
    stream = RecordStream(units, cfg.data, bundle.labels, bundle.spec, PREPROCESS_BATCH)
    raw: dict[str, list[dict]] = {"ray": [], "dataloader": []}
    for r in range(rounds):
        raw["ray"].append({"round": r, **timed_pass(iter_torch_batches(bundle.train, BATCH, bundle.spec))})
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2,
                                             multiprocessing_context="spawn")
        raw["dataloader"].append({"round": r, **timed_pass(loader)})
        log.info("round %d: ray %.0f rows/s, dataloader %.0f rows/s", r, raw["ray"][-1]["rows_per_s"],
                 raw["dataloader"][-1]["rows_per_s"])
    med = {k: statistics.median(x["rows_per_s"] for x in v) for k, v in raw.items()}
    first = {k: statistics.median(x["first_batch_s"] for x in v) for k, v in raw.items()}
    return {"rows_per_pass": bundle.train_rows, "preprocess_actors_max": int(usable_cpus()),
            "dataloader_workers": 2, "median_rows_per_s": med,
            "ray_over_dataloader": med["ray"] / med["dataloader"],
            "median_first_batch_s": first, "runs": raw}


def waits(data: str, epochs: int, full_rows: int, mock_epochs_n: int, modes: list[str],
          mock_rows: int) -> dict[str, Any]:
    import ray

    from mmfusion.config import load_config
    from mmfusion.data import plan
    from mmfusion.data.pipeline import build_datasets, iter_torch_batches
    from mmfusion.data.preprocessor import input_spec
    from mmfusion.train.trainer import _streams, build_trainer, data_info, worker_threads

    out: dict[str, Any] = {}
    base = [f"data.path={data}", f"train.epochs={epochs}", "train.early_stopping_patience=null"]
    cfg = load_config(CONFIG, base)
    spec_bytes = plan.estimated_row_bytes(input_spec(cfg.data))
    store = float(ray.cluster_resources().get("object_store_memory", 0))
    auto, why = plan.choose_cache("auto", full_rows * spec_bytes, store)
    out["auto_on_large"] = {"mode": auto, "why": why, "rows": full_rows, "row_bytes": spec_bytes}
    log.info("on the whole large variant (%d train+val rows): %s", full_rows, why)
    modes = [auto if m == "auto" else m for m in modes]
    runs: dict[str, Any] = {}
    mock_batches: list[dict[str, torch.Tensor]] | None = None
    with tempfile.TemporaryDirectory() as storage:
        for mode in modes:
            run = load_config(CONFIG, [*base, f"data.cache={mode}"])
            t0 = time.perf_counter()
            bundle = build_datasets(run.data, ("train", "val"), seed=run.seed,
                                    train_cpus=run.train.num_workers * run.train.cpus_per_worker)
            build_s = time.perf_counter() - t0
            datasets = {"train": bundle.train, "val": bundle.val}
            tc = run.train
            threads = worker_threads(tc.num_workers, tc.cpus_per_worker, True, _streams(datasets))
            if mock_batches is None:  # the same tensors (at most mock_rows of them), collated once
                rows = bundle.train if bundle.train_rows <= mock_rows else bundle.train.limit(mock_rows)
                mock_batches = list(iter_torch_batches(rows, BATCH, bundle.spec, shuffle_seed=run.seed))
                mock_info = (run, bundle.spec, bundle.labels)
            t0 = time.perf_counter()
            result = build_trainer(run, datasets, data_info(bundle), f"ingest-{mode}", storage,
                                   embedded=True).fit()
            history = _history(result)
            runs[mode] = {"cache": bundle.cache, "torch_threads": threads, "build_s": build_s,
                          "fit_wall_s": time.perf_counter() - t0, "train_rows": bundle.train_rows,
                          "epochs": [_wait_row(h, bundle.train_rows) for h in history]}
            log.info("%s: %s", mode, runs[mode]["epochs"])
        ray.shutdown()
    assert mock_batches is not None
    run, spec, labels = mock_info
    mocks = {}
    for threads in sorted({r["torch_threads"] for r in runs.values()}):
        mocks[threads] = mock_epochs(run, spec, labels, mock_batches, threads, mock_epochs_n)
        log.info("mock, %d thread(s): %s", threads, mocks[threads])
    for r in runs.values():
        ref = statistics.median(e["samples_per_s"] for e in mocks[r["torch_threads"]])
        r["mock_samples_per_s"] = ref
        for e in r["epochs"]:
            e["vs_mock"] = e["samples_per_s"] / ref
    out["runs"], out["mock"] = runs, {str(k): v for k, v in mocks.items()}
    out["mock_rows"] = sum(int(b["label"].shape[0]) for b in mock_batches)
    if auto in runs:  # the default config on the large variant
        default = runs[auto]["epochs"]
        out["acceptance2"] = {"mode": auto, "train_rows": runs[auto]["train_rows"],
                              "max_wait_fraction": max(e["wait_fraction"] for e in default),
                              "max_steady_wait_fraction": max(e["steady_wait_fraction"] for e in default)}
        out["acceptance2"]["holds"] = out["acceptance2"]["max_wait_fraction"] <= 0.05
    return out


def _wait_row(h: dict[str, Any], rows: int) -> dict[str, float]:
    seconds = rows / h["samples_per_s"]
    wait, first = h["data_wait_s"], h["data_first_wait_s"]
    return {"epoch": h["epoch"], "samples_per_s": h["samples_per_s"], "train_s": seconds, "data_wait_s": wait,
            "first_batch_wait_s": first, "wait_fraction": wait / seconds,
            "steady_wait_fraction": (wait - first) / max(seconds - first, 1e-9)}


def mock_epochs(cfg: Any, spec: Any, labels: list[str], batches: list[dict], threads: int,
                epochs: int) -> list[dict[str, float]]:
    """The worker's loop (train.loop.train_one_epoch) in-process over pre-collated batches: no data wait."""
    from mmfusion.models.model import build_model
    from mmfusion.train.loop import build_optimizer, build_scheduler, param_groups, train_one_epoch

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    oc = cfg.optim
    model = build_model(cfg.model, spec, num_classes=len(labels))
    optimizer = build_optimizer(param_groups(model, oc.lr, oc.weight_decay, oc.encoder_lr), oc.name, oc.lr,
                                oc.weight_decay, oc.momentum)
    scheduler = build_scheduler(optimizer, oc.scheduler, len(batches) * epochs)
    out = []
    for epoch in range(epochs):
        st = train_one_epoch(model, batches, optimizer, scheduler, torch.device("cpu"), cfg.train.precision,
                             oc.grad_clip, epoch=epoch, num_classes=len(labels))
        out.append({"epoch": epoch, "samples_per_s": st.samples_per_s, "train_s": st.seconds,
                    "data_wait_s": st.data_wait_s, "wait_fraction": st.data_wait_s / st.seconds})
    return out


def _history(result) -> list[dict]:
    from mmfusion.train.checkpoint import load_loop_state

    with result.checkpoint.as_directory() as d:
        return load_loop_state(Path(d)).history


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REPO / "data" / "avt_digits_large"))
    p.add_argument("--part", choices=["all", "throughput", "waits"], default="all")
    p.add_argument("--rows", type=int, default=8_000, help="train rows per throughput pass")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--train-rows", type=int, default=8_000, help="train rows of the waits part")
    p.add_argument("--val-rows", type=int, default=800)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--mock-epochs", type=int, default=1, help="in-memory mock epochs per thread count")
    p.add_argument("--mock-rows", type=int, default=8_000, help="train rows the in-memory mock holds")
    p.add_argument("--modes", default="memory,none",
                   help="data.cache modes of the waits part; auto: only the mode auto picks on the whole "
                        "variant (a full-size run)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "ingest.json"))
    args = p.parse_args()
    bad = sorted(set(args.modes.split(",")) - {"memory", "none", "auto"})
    if bad:
        p.error(f"--modes: unknown mode(s) {', '.join(bad)}; choose from memory, none, auto")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from mmfusion.data import readers
    from mmfusion.runtime import init_ray

    full = readers.summarize(args.data).rows
    out_path = Path(args.out)
    result = json.loads(out_path.read_text()) if out_path.exists() else {}  # one part re-run keeps the other
    result.update({
        "what": "Ray Data pipeline vs torch DataLoader (2 workers) rows/s, files -> collated torch batches; "
                "fraction of train step time blocked on the batch iterator, default config, memory and none, "
                "against an in-memory mock",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "note": "2 cores shared with other agents' editors and unit tests; heavy jobs "
                            "serialized"},
        "data": {"path": args.data, "large_variant_rows": full},
    })
    init_ray()
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("all", "throughput"):
            sub = subset(args.data, {"train": args.rows}, Path(tmp) / "throughput")
            result["throughput"] = {"subset_train_rows": args.rows, "rounds": args.rounds,
                                    **throughput(sub, args.rounds)}
        if args.part in ("all", "waits"):
            sub = subset(args.data, {"train": args.train_rows, "val": args.val_rows}, Path(tmp) / "waits")
            result["waits"] = {"subset_rows": {"train": args.train_rows, "val": args.val_rows},
                               "epochs": args.epochs,
                               "mock_epochs": args.mock_epochs,
                               **waits(sub, args.epochs, full.get("train", 0) + full.get("val", 0),
                                       args.mock_epochs, args.modes.split(","), args.mock_rows)}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    report(result)
    print(f"wrote {out_path}")


def report(r: dict[str, Any]) -> None:
    if "throughput" in r:
        t = r["throughput"]
        print("| arm | rows/s (median) | first batch s | vs DataLoader |")
        print("|---|---|---|---|")
        for k in ("ray", "dataloader"):
            print(f"| {k} | {t['median_rows_per_s'][k]:.0f} | {t['median_first_batch_s'][k]:.1f} | "
                  f"{t['median_rows_per_s'][k] / t['median_rows_per_s']['dataloader']:.2f} |")
    if "waits" in r:
        print("| data.cache | threads | epoch | samples/s | vs mock | wait s | wait fraction | steady |")
        print("|---|---|---|---|---|---|---|---|")
        for mode, run in r["waits"]["runs"].items():
            for e in run["epochs"]:
                print(f"| {mode} | {run['torch_threads']} | {e['epoch'] + 1} | {e['samples_per_s']:.0f} | "
                      f"{e['vs_mock']:.2f} | {e['data_wait_s']:.1f} | {e['wait_fraction']:.3f} | "
                      f"{e['steady_wait_fraction']:.3f} |")
        print(f"acceptance 2 ({r['waits']['acceptance2']['mode']}): {r['waits']['acceptance2']}")


if __name__ == "__main__":
    main()
