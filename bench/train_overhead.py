"""Ray Train against plain torchrun DDP over the same preprocessed rows: steady-state samples/s and start-up
(issue 15, acceptance 1: ray / torchrun >= 0.97).

    .venv/bin/python bench/train_overhead.py [--data data/avt_digits] [--epochs 4] [--rounds 4]
        [--train-rows 2400] [--val-rows 200] [--workers 2] [--threads 1]
        [--out bench/results/train_overhead.json]

The AVT-Digits splits are preprocessed once (demo config jobs/configs/avt_digits.yaml, data.cache=memory) on
one embedded Ray cluster. The materialized train split (its first --train-rows rows) is then dumped once to
train.npz, exactly as the object store holds it (uint8 images, token ids, log-mel audio, labels, presence),
so that neither side decodes anything while it is timed. Then, round after round, in alternating order:
- ray: `mmfusion`'s own `build_trainer(...).fit()` (Ray Train V2, --workers gloo CPU ranks, 1 CPU and
  --threads torch threads each, batch 64 per worker, the val split evaluated and a checkpoint written each
  epoch as in `mmfusion train`); the materialized splits fit, so each worker keeps its shard in its own
  memory after the first epoch (data/local_shard.py);
- ray_stream: the same, but with Ray Data streaming each worker's shard from the object store every epoch
  (the local copy off): what the copy buys;
- torchrun: bench/torchrun_ddp.py under `.venv/bin/torchrun --standalone --nproc_per_node WORKERS` with
  OMP_NUM_THREADS and torch threads = --threads, reading train.npz: the same model (built from the same config
  after the same seed), optimizer groups, schedule, loss, gradient clipping and collate (MMCollate) on the
  same rows and batch size per rank, run at the niceness Ray gives its workers (worker_niceness, 15 by
  default), so that other load on a shared machine takes both sides' CPU alike.
The throughput figure of a run is the median of its epochs' samples/s after the first (the first includes
start-up and warm-up); each epoch's clock covers the training pass only, from the first batch request to the
all-reduced epoch counters, on both sides. Start-up is reported apart: for ray, the embedded cluster's start
(once) and, per run, fit() to the first training step; for torchrun, the launcher's start to the first step.
Interleaving spreads other load on the machine over both sides alike; raw values and medians are written.
Each Ray run's actors (Train controller, dataset manager, split coordinators, workers) are collected and
waited for before the next side starts, so that none of them runs beside it. The Ray workers tune glibc's
malloc (mmfusion/train/allocator.py: their loop runs in a thread); the torchrun ranks, whose loop runs in
the main thread, keep glibc's defaults, as a plain torchrun script does.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SIDES = ("ray", "torchrun", "ray_stream")  # ray_stream: Ray Data every epoch (no worker-local shard copy)
log = logging.getLogger("bench.train_overhead")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REPO / "data" / "avt_digits"))
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--train-rows", type=int, default=2400, help="0: the whole train split")
    p.add_argument("--val-rows", type=int, default=200, help="0: the whole val split")
    p.add_argument("--workers", type=int, default=2, help="DDP ranks on both sides")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank on both sides")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "train_overhead.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    import ray
    import torch

    from mmfusion.config import load_config
    from mmfusion.data.pipeline import build_datasets
    from mmfusion.runtime import init_ray
    from mmfusion.train.trainer import build_trainer, data_info

    cfg = load_config(REPO / "jobs" / "configs" / "avt_digits.yaml",
                      [f"data.path={args.data}", f"train.epochs={args.epochs}", "data.cache=memory",
                       "train.early_stopping_patience=null", f"train.num_workers={args.workers}",
                       f"train.num_threads={args.threads}", "train.cpus_per_worker=1.0"])
    t0 = time.perf_counter()
    init_ray()
    cluster_start_s = time.perf_counter() - t0
    niceness = ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote())  # Ray's worker_niceness
    bundle = build_datasets(cfg.data, splits=("train", "val"), seed=cfg.seed)
    train, val = bundle.train, bundle.val
    if args.train_rows:
        train = train.limit(args.train_rows).materialize()
    if args.val_rows:
        val = val.limit(args.val_rows).materialize()
    info = {**data_info(bundle), "train_rows": train.count()}
    raw: dict[str, list[dict]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp)
        rows = dump_rows(train, dump / "train.npz")
        (dump / "meta.json").write_text(json.dumps({
            "experiment": cfg.model_dump(mode="json"), "spec": asdict(bundle.spec),
            "num_classes": len(bundle.labels)}))
        log.info("dumped %d train rows (%s) to %s", rows, ", ".join(np.load(dump / "train.npz").files), dump)
        for r in range(args.rounds):
            for side in (SIDES if r % 2 == 0 else SIDES[::-1]):
                if side.startswith("ray"):
                    run = run_ray(cfg, build_trainer, {"train": train, "val": val},
                                  {**info, "local_shards": side == "ray"}, dump, side, r)
                else:
                    run = run_torchrun(dump, args.epochs, args.workers, args.threads, niceness)
                run["round"] = r
                raw[side].append(run)
                log.info("round %d %s: %.0f samples/s steady (epochs %s), start-up %.1f s, %.0f s wall", r,
                         side, run["steady"], [round(x) for x in run["samples_per_s_per_epoch"]],
                         run["startup_s"], run["wall_s"])
    ray.shutdown()

    med = {side: statistics.median(x["steady"] for x in runs) for side, runs in raw.items()}
    startup = {side: statistics.median(x["startup_s"] for x in runs) for side, runs in raw.items()}
    per_round = [a["steady"] / b["steady"] for a, b in zip(raw["ray"], raw["torchrun"], strict=True)]
    out = {
        "what": "steady-state training samples/s (median over epochs after the first, then over rounds) of "
                "the AVT-Digits demo model: mmfusion's Ray Train run against plain torchrun DDP over the "
                "same preprocessed rows; start-up apart",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
                    "note": "shared with other jobs while measuring: sides interleaved, medians reported"},
        "data": {"path": args.data, "train_rows": info["train_rows"], "val_rows": val.count(),
                 "cache": bundle.cache},
        "config": {"epochs": args.epochs, "rounds": args.rounds, "workers": args.workers,
                   "torch_threads_per_worker": {"ray": args.threads,
                                                "torchrun": raw["torchrun"][0]["torch_threads"]},
                   "cpus_per_worker": 1.0, "batch_size_per_worker": cfg.train.batch_size,
                   "backend": "gloo (CPU)", "niceness": {"ray_workers": niceness, "torchrun": niceness}},
        "median_samples_per_s": med,
        "ratio_ray_to_torchrun": med["ray"] / med["torchrun"],
        "ratio_per_round": per_round,
        # what the worker-local shard copy (data/local_shard.py) buys over Ray Data every epoch
        "ratio_ray_stream_to_torchrun": med["ray_stream"] / med["torchrun"],
        "ratio_ray_to_ray_stream": med["ray"] / med["ray_stream"],
        "startup_s": {"ray_cluster_start": cluster_start_s, "ray_fit_to_first_step": startup["ray"],
                      "ray_total": cluster_start_s + startup["ray"],
                      "torchrun_launch_to_first_step": startup["torchrun"]},
        "target": {"ratio_ray_to_torchrun": 0.97, "met": med["ray"] / med["torchrun"] >= 0.97},
        "runs": raw,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print("| side | samples/s (median) | start-up to first step (s) |")
    print("|---|---|---|")
    print(f"| Ray Train ({args.workers} x {args.threads}) | {med['ray']:.0f} | {startup['ray']:.1f} "
          f"(+ {cluster_start_s:.1f} cluster start) |")
    print(f"| Ray Train, Ray Data every epoch | {med['ray_stream']:.0f} | {startup['ray_stream']:.1f} |")
    print(f"| torchrun DDP ({args.workers} x {args.threads}) | {med['torchrun']:.0f} | "
          f"{startup['torchrun']:.1f} |")
    print(f"ray / torchrun: {out['ratio_ray_to_torchrun']:.3f} "
          f"(per round {[round(x, 3) for x in per_round]})")
    print(f"wrote {args.out}")


def dump_rows(ds, path: Path) -> int:  # noqa: ANN001
    """The dataset's numeric columns, concatenated, to an uncompressed .npz (strings such as id are left out:
    the collate step drops them). Returns the row count."""
    cols: dict[str, list[np.ndarray]] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in batch.items():
            if v.dtype.kind in "biuf":
                cols.setdefault(k, []).append(v)
    arrays = {k: np.concatenate(v) for k, v in cols.items()}
    np.savez(path, **arrays)
    return len(arrays["label"])


def run_ray(cfg, build_trainer, datasets: dict, info: dict, storage: Path, side: str,  # noqa: ANN001
            r: int) -> dict:
    from mmfusion.train.trainer import fit
    run = cfg.model_copy(deep=True)
    t0, started = time.perf_counter(), time.time()
    trainer = build_trainer(run, datasets, info, f"overhead-{side}-{r}", str(storage / "ray_runs"),
                            embedded=True)
    result = fit(trainer)  # as run_training: puts back the SIGINT handler that held the run's controller
    wall = time.perf_counter() - t0
    history = _history(result)
    per_epoch = [h["samples_per_s"] for h in history]
    out = {"samples_per_s_per_epoch": per_epoch, "steady": statistics.median(per_epoch[1:] or per_epoch),
           "startup_s": result.return_value["first_step_at"] - started, "wall_s": wall,
           "torch_threads": cfg.train.num_threads}
    del trainer, result
    out["run_actors_left"] = release_run_actors()
    return out


RUN_ACTORS = ("TrainController", "DatasetManager", "SplitCoordinator", "PlacementGroupCleaner",
              "SynchronizationActor", "PreemptionWatcher", "RayTrainWorker")


def release_run_actors(wait_s: float = 10.0) -> list[str]:
    """Collects the finished run's handles and waits until its actors are gone; returns those still alive.

    Ray Train's fit() registers a SIGINT handler (to abort its controller on Ctrl-C) that holds the
    controller's handle; left there, a finished run's Train controller, dataset manager and split
    coordinators stayed alive until the next Ray run's fit() replaced it (~3% of a core between them,
    measured), i.e. through the torchrun side in between. run_ray puts the previous handler back
    (mmfusion.train.trainer.fit); this drops what is left."""
    from ray.util.state import list_actors

    gc.collect()
    deadline, alive = time.monotonic() + wait_s, []
    while True:
        try:
            alive = sorted(a.class_name for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10000)
                           if a.class_name in RUN_ACTORS)
        except Exception as e:  # the State API is only a check here
            log.warning("cannot list actors (%s: %s)", type(e).__name__, e)
            return ["unknown"]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if alive:
        log.warning("actors of the finished Ray run still alive after %.0f s: %s", wait_s, alive)
    return alive


def run_torchrun(dump: Path, epochs: int, workers: int, threads: int, niceness: int) -> dict:
    out = dump / "torchrun.json"
    cmd = ["nice", "-n", str(niceness), str(Path(sys.executable).parent / "torchrun"), "--standalone",
           "--nproc_per_node", str(workers),
           str(REPO / "bench" / "torchrun_ddp.py"), "--rows", str(dump / "train.npz"),
           "--meta", str(dump / "meta.json"), "--epochs", str(epochs), "--threads", str(threads),
           "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("RAY_ADDRESS", None)
    t0, started = time.perf_counter(), time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    res = json.loads(out.read_text())
    per_epoch = [h["samples_per_s"] for h in res["history"]]
    return {"samples_per_s_per_epoch": per_epoch, "steady": statistics.median(per_epoch[1:] or per_epoch),
            "startup_s": res["first_step_at"] - started, "process_start_to_first_step_s":
            res["first_step_at"] - res["launched_at"], "wall_s": wall, "torch_threads": res["torch_threads"],
            "omp_num_threads": res["omp_num_threads"], "world_size": res["world_size"]}


def _history(result) -> list[dict]:  # noqa: ANN001
    """The epoch metrics of a finished run (the latest checkpoint's loop state holds them all)."""
    from mmfusion.train.checkpoint import load_loop_state

    with result.checkpoint.as_directory() as d:
        return load_loop_state(Path(d)).history


if __name__ == "__main__":
    main()
