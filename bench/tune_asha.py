"""Tune: ASHA against full random search, in epochs spent to come within 1 point of the best (issue 15).

    .venv/bin/python bench/tune_asha.py [--data data/avt_digits] [--seeds 0 1 2] [--trials 8] [--epochs 6]
        [--train-rows 600] [--val-rows 300] [--out bench/results/tune_asha.json]

Both searches use the space of jobs/configs/tune_avt_digits.yaml (fusion operator, lr, fused width) on the
AVT-Digits demo config, the same number of trials and the same max epochs, and Ray Tune's random search with
the same random_state, so for one seed both draw the same trial configs (checked and written: same_configs).
  random  every trial runs all --epochs epochs (tune.scheduler=none)
  asha    Ray Tune's ASHAScheduler as `mmfusion tune` builds it (time_attr training_iteration, max_t = epochs,
          grace_period 1, reduction_factor 2), stopping trials that fall behind at each rung
Two trials run at a time (1 CPU each). Each trial trains in its Tune trial actor with mmfusion's model and
loop (build_model, train_one_epoch, evaluate, the cosine schedule over max epochs, 1 torch thread, the seed's
model seed) over the first --train-rows / --val-rows preprocessed rows, built once; not a TorchTrainer per
trial, whose start-up would cost more than the epochs here (the figure is epochs, not seconds).

Per seed: target = the best final val accuracy (a trial's last reported epoch) over both searches, minus
1 point; for each search, the epochs spent (sum over trials of the epochs reported so far, in report order)
when some trial first reports val accuracy >= target, and its total epochs. Medians over seeds; a JSON and a
PNG of best-so-far val accuracy against cumulative epochs, one curve per search and seed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.tune_asha")
TOLERANCE = 0.01  # "within 1 point" of val accuracy


def trial_fn(config: dict[str, Any], base: dict[str, Any], arrays: dict[str, Any],
             info: dict[str, Any]) -> None:
    """One trial: the base config plus the sampled values, trained epoch by epoch, val accuracy reported."""
    import numpy as np
    import torch
    from ray import tune

    from mmfusion.batch import InputSpec
    from mmfusion.data.pipeline import MMCollate
    from mmfusion.models.model import build_model
    from mmfusion.train.loop import build_optimizer, build_scheduler, evaluate, param_groups, train_one_epoch
    from mmfusion.tune.space import trial_config

    cfg = trial_config(base, config["values"])
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    spec = InputSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in info["spec"].items()})
    collate = MMCollate(spec)
    k = len(info["labels"])
    model = build_model(cfg.model, spec, num_classes=k)
    oc, bs = cfg.optim, cfg.train.batch_size
    optimizer = build_optimizer(param_groups(model, oc.lr, oc.weight_decay, oc.encoder_lr), oc.name, oc.lr,
                                oc.weight_decay, oc.momentum)
    train, val = arrays["train"], arrays["val"]
    n = len(train["label"])
    steps = math.ceil(n / bs)
    scheduler = build_scheduler(optimizer, oc.scheduler, steps * cfg.train.epochs,
                                warmup_steps=int(oc.warmup_epochs * steps))
    device = torch.device("cpu")

    def batches(data: dict[str, np.ndarray], order: np.ndarray) -> Any:
        for i in range(0, len(order), bs):
            idx = order[i:i + bs]
            yield collate({key: v[idx] for key, v in data.items()})

    for epoch in range(cfg.train.epochs):
        order = np.random.default_rng(cfg.seed + epoch).permutation(n)
        train_one_epoch(model, batches(train, order), optimizer, scheduler, device, "fp32", oc.grad_clip,
                        epoch=epoch, num_classes=k)
        va = evaluate(model, batches(val, np.arange(len(val["label"]))), device, "fp32", num_classes=k)
        tune.report({"val_accuracy": va.accuracy, "epoch": epoch + 1, "reported_at": time.time()})


def run_search(method: str, seed: int, args: argparse.Namespace, base: dict[str, Any], space: dict[str, Any],
               arrays: Any, info: dict[str, Any], storage: str) -> list[dict[str, Any]]:
    """One search; returns its trials: {"config", "curve" (val accuracy per epoch), "reported_at"}."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=args.epochs, grace_period=1,
                               reduction_factor=2) if method == "asha" else None)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trial_fn, base={**base, "seed": seed}, arrays=arrays,
                                                 info=info), {"CPU": 1}),
        param_space={"values": space},
        tune_config=tune.TuneConfig(metric="val_accuracy", mode="max", num_samples=args.trials,
                                    max_concurrent_trials=2, scheduler=scheduler,
                                    search_alg=BasicVariantGenerator(random_state=seed)),
        run_config=tune.RunConfig(name=f"{method}-{seed}", storage_path=storage, verbose=0))
    grid = tuner.fit()
    trials = []
    for r in grid:
        df = r.metrics_dataframe
        if r.error or df is None:
            raise RuntimeError(f"{method} seed {seed}: a trial failed: {r.error}")
        trials.append({"config": r.config["values"], "curve": df["val_accuracy"].tolist(),
                       "reported_at": df["reported_at"].tolist()})
    return trials


def epochs_to(trials: list[dict[str, Any]], target: float) -> tuple[int | None, list[tuple[int, float]]]:
    """(epochs spent when a report first reaches `target` (None: never), best-so-far after each report),
    every trial's reports taken in the order they were made."""
    reports = sorted((t, acc) for tr in trials for t, acc in zip(tr["reported_at"], tr["curve"], strict=True))
    best, reached, curve = 0.0, None, []
    for i, (_, acc) in enumerate(reports, start=1):
        best = max(best, acc)
        curve.append((i, best))
        if reached is None and acc >= target - 1e-9:
            reached = i
    return reached, curve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REPO / "data" / "avt_digits"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--train-rows", type=int, default=600)
    p.add_argument("--val-rows", type=int, default=300)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "tune_asha.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    import ray

    from mmfusion.config import load_config
    from mmfusion.data.pipeline import build_datasets
    from mmfusion.runtime import init_ray
    from mmfusion.train.trainer import data_info
    from mmfusion.tune.space import to_ray, validate_space

    t_start = time.perf_counter()
    cfg = load_config(REPO / "jobs" / "configs" / "tune_avt_digits.yaml",
                      [f"data.path={args.data}", f"train.epochs={args.epochs}", "data.cache=memory"])
    base = cfg.model_dump(mode="json", exclude_unset=True)
    assert cfg.tune is not None
    parsed = validate_space(base, cfg.tune.space, "random")
    init_ray()
    bundle = build_datasets(cfg.data, splits=("train", "val"), seed=cfg.seed)
    arrays = {"train": bundle.train.take_batch(args.train_rows, batch_format="numpy"),
              "val": bundle.val.take_batch(args.val_rows, batch_format="numpy")}
    info = data_info(bundle)
    log.info("data ready in %.0f s: %d train, %d val rows", time.perf_counter() - t_start,
             len(arrays["train"]["label"]), len(arrays["val"]["label"]))

    seeds: list[dict[str, Any]] = []
    plot_curves: dict[str, list[tuple[int, float]]] = {}
    with tempfile.TemporaryDirectory() as storage:
        for seed in args.seeds:
            runs = {}
            for method in ("random", "asha"):
                t0 = time.perf_counter()
                runs[method] = run_search(method, seed, args, base, to_ray(parsed), arrays, info,
                                          storage)
                log.info("seed %d %s: %d trials, %d epochs, %.0f s", seed, method, len(runs[method]),
                         sum(len(t["curve"]) for t in runs[method]), time.perf_counter() - t0)
            best = max(t["curve"][-1] for trials in runs.values() for t in trials)
            row: dict[str, Any] = {"seed": seed, "best_final_val_accuracy": best, "target": best - TOLERANCE,
                                   "same_configs": _configs(runs["random"]) == _configs(runs["asha"])}
            for method, trials in runs.items():
                reached, curve = epochs_to(trials, best - TOLERANCE)
                plot_curves[f"{method} seed {seed}"] = curve
                row[method] = {"epochs_to_target": reached,
                               "total_epochs": sum(len(t["curve"]) for t in trials),
                               "best_val_accuracy": max(a for t in trials for a in t["curve"]),
                               "trials": [{"config": t["config"], "val_accuracy": t["curve"]}
                                          for t in trials]}
            seeds.append(row)
    ray.shutdown()

    medians = summary(seeds)
    out = {
        "what": "epochs spent (sum over trials, in report order) until some trial's val accuracy is within 1 "
                "point of the best final val accuracy either search found, and total epochs: ASHA against "
                "full random search, same space, trials, max epochs and sampled configs",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "data": {"path": args.data, "train_rows": len(arrays["train"]["label"]),
                 "val_rows": len(arrays["val"]["label"])},
        "config": {"base": "jobs/configs/tune_avt_digits.yaml", "space": cfg.tune.space,
                   "trials": args.trials,
                   "max_epochs": args.epochs, "asha": {"grace_period": 1, "reduction_factor": 2},
                   "max_concurrent_trials": 2, "seeds": args.seeds},
        "median": medians,
        "ratio_asha_to_random": ratios(medians),
        "wall_s": time.perf_counter() - t_start,
        "seeds": seeds,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    png = Path(args.out).with_suffix(".png")
    _plot(plot_curves, seeds, png)
    print("| seed | best final val acc | random: epochs to target / total | asha: epochs to target / total |")
    print("|---|---|---|---|")
    for s in seeds:
        print(f"| {s['seed']} | {s['best_final_val_accuracy']:.3f} | "
              f"{s['random']['epochs_to_target']} / {s['random']['total_epochs']} | "
              f"{s['asha']['epochs_to_target']} / {s['asha']['total_epochs']} |")
    print("| median (a seed that never got there counts as the most) | | "
          f"{medians['random']['epochs_to_target']} / {medians['random']['total_epochs']} | "
          f"{medians['asha']['epochs_to_target']} / {medians['asha']['total_epochs']} |")
    print(f"wrote {args.out} and {png}")


def summary(seeds: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Medians over seeds per search. A search that never came within 1 point (epochs_to_target None) counts
    as needing more epochs than any that did: the median is None only when most seeds never got there."""
    out: dict[str, dict[str, Any]] = {}
    for m in ("random", "asha"):
        to = [s[m]["epochs_to_target"] for s in seeds]
        mid = statistics.median([math.inf if v is None else v for v in to])
        out[m] = {"epochs_to_target": None if mid == math.inf else mid,
                  "total_epochs": statistics.median(s[m]["total_epochs"] for s in seeds),
                  "seeds_reaching_target": sum(v is not None for v in to), "seeds": len(seeds)}
    return out


def ratios(medians: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    a, r = medians["asha"], medians["random"]
    return {k: a[k] / r[k] if a[k] is not None and r[k] else None
            for k in ("epochs_to_target", "total_epochs")}


def _configs(trials: list[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps(t["config"], sort_keys=True) for t in trials)


def _plot(curves: dict[str, list[tuple[int, float]]], seeds: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = {"random": "tab:blue", "asha": "tab:orange"}
    styles = ["-", "--", ":", "-."]
    for i, s in enumerate(seeds):
        for method in ("random", "asha"):
            pts = curves[f"{method} seed {s['seed']}"]
            ax.step([x for x, _ in pts], [y for _, y in pts], where="post", color=colors[method],
                    ls=styles[i % len(styles)], label=f"{method}, seed {s['seed']}")
        ax.axhline(s["target"], color="grey", lw=0.6, ls=styles[i % len(styles)])
    ax.set(xlabel="cumulative epochs (all trials)", ylabel="best val accuracy so far",
           title="ASHA vs random search (grey: best final - 1 point, per seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
