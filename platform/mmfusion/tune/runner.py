"""`mmfusion tune`: one Ray Tune trial = one TorchTrainer run of the base config plus sampled overrides.

    space -> validated up front -> datasets built once -> Tuner(trial_fn) with ASHA / Optuna -> results table,
    CSV, per-trial curves plot, and the best trial exported as a regular artifact at a stable path.

Re-running the same command restores the experiment (Tuner.restore): finished trials are kept, unfinished ones
continue from their last checkpoint.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmfusion.config import ExperimentConfig
from mmfusion.errors import ConfigError, MmfusionError
from mmfusion.storage import is_remote, publish_file, staging_dir
from mmfusion.train.trainer import config_digest
from mmfusion.tune.space import to_ray, trial_config, validate_space

log = logging.getLogger(__name__)


@dataclass
class TuneRun:
    name: str
    path: Path  # the Tune experiment folder
    artifact: Path  # best trial's artifact
    csv: Path
    plot: Path
    table: str
    rows: list[dict[str, Any]]
    location: str = ""  # the best artifact's location (local path or URI)
    best_id: str = ""  # the best trial's id


def experiment_name(cfg: ExperimentConfig) -> str:
    assert cfg.tune is not None
    if cfg.tune.name:
        return cfg.tune.name
    return f"tune-{Path(cfg.data.path.rstrip('/')).stem}-{config_digest(cfg)}"


def trial_fn(config: dict[str, Any], base: dict[str, Any], datasets: dict[str, Any],
             data_info: dict[str, Any], train_storage: str, embedded: bool) -> None:
    """Runs inside a Tune trial actor: build the trial's config and run one TorchTrainer."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from mmfusion.train.trainer import build_trainer

    cfg = trial_config(base, config["values"])
    name = f"trial-{tune.get_context().get_trial_id()}"  # stable: a restored trial resumes its Train run
    build_trainer(cfg, datasets, data_info, name, train_storage, embedded=embedded,
                  callbacks=[TuneReportCallback()]).fit()


def run_tune(cfg: ExperimentConfig, address: str | None = None) -> TuneRun:
    """Every trial is `cfg` (the keys the user set, so a searched encoder name swaps its whole section)
    plus the sampled values of `cfg.tune.space`."""
    import ray.tune as tune
    from ray.tune.schedulers import ASHAScheduler

    from mmfusion.data.pipeline import build_datasets
    from mmfusion.runtime import absolute_path, check_fits, env_address, init_ray
    from mmfusion.train.tracking import mlflow_uri
    from mmfusion.train.trainer import data_info

    if cfg.tune is None:
        raise ConfigError("the config has no `tune:` section (see jobs/configs/tune_avt_digits.yaml)")
    tu = cfg.tune
    base = cfg.model_dump(mode="json", exclude_unset=True)  # the keys the YAML and overrides set
    parsed = validate_space(base, tu.space, tu.search)  # before Ray starts: a typo costs nothing
    metric, mode = tu.metric or cfg.train.metric, tu.mode or cfg.train.mode
    name = experiment_name(cfg)
    storage = absolute_path(cfg.train.storage_path)
    exp_path = f"{storage.rstrip('/')}/{name}"
    embedded = not (address or env_address())

    init_ray(address)
    check_fits(cfg.train.num_workers, cfg.train.cpus_per_worker, cfg.train.use_gpu, strict=embedded)
    bundle = build_datasets(cfg.data, splits=("train", "val"), seed=cfg.seed)
    # every trial logs to the MLflow experiment named after this one, in the storage path's own store
    tracking = {"experiment": name, "mlflow_uri": mlflow_uri(cfg, storage)}
    trainable = tune.with_resources(
        tune.with_parameters(trial_fn, base=base, datasets={"train": bundle.train, "val": bundle.val},
                             data_info={**data_info(bundle), "tracking": tracking},
                             train_storage=f"{exp_path}/train",
                             embedded=embedded),
        {"CPU": tu.trial_cpus})

    if tune.Tuner.can_restore(exp_path):
        log.info("resuming tune experiment %s", exp_path)
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True)
    else:
        search_alg = None
        if tu.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search_alg = OptunaSearch(seed=cfg.seed)
        scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=cfg.train.epochs,
                                   grace_period=tu.grace_period, reduction_factor=tu.reduction_factor)
                     if tu.scheduler == "asha" else None)
        tuner = tune.Tuner(
            trainable,
            param_space={"values": to_ray(parsed)},
            tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=tu.num_samples,
                                        max_concurrent_trials=tu.max_concurrent_trials, search_alg=search_alg,
                                        scheduler=scheduler),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=1)),
        )
    log.info("tune experiment %s: %d sample(s), search=%s, scheduler=%s, metric=%s (%s)", name,
             tu.num_samples, tu.search, tu.scheduler, metric, mode)
    try:
        grid = tuner.fit()
        out = summarize(grid, cfg, base, bundle, name, exp_path, metric, mode)
    except BaseException as e:  # Ctrl-C too: the trials' MLflow runs must not stay RUNNING forever
        from mmfusion.train.tracking import end_run, end_status

        end_run(cfg, None, end_status(e), experiment=name, uri=tracking["mlflow_uri"])
        raise
    finish_trials(cfg, out.rows, exp_path, out.artifact, best_id=out.best_id, tracking=tracking)
    return out


def summarize(grid: Any, cfg: ExperimentConfig, base: dict[str, Any], bundle: Any, name: str, exp_path: str,
              metric: str, mode: str) -> TuneRun:
    import ray.train

    from mmfusion.train.trainer import export_run

    rows = []
    for r in grid:
        df = r.metrics_dataframe
        curve = df[metric].tolist() if df is not None and metric in df else []
        values = (r.config or {}).get("values", {})
        trial_id = (r.metrics or {}).get("trial_id") or Path(r.path).name
        best = (max if mode == "max" else min)(curve) if curve else None
        rows.append({"trial_id": trial_id, **values, "epochs": len(curve), f"best_{metric}": best,
                     "status": "error" if r.error else ("stopped early" if len(curve) < cfg.train.epochs
                                                        else "completed"),
                     "curve": curve})
    ok = [r for r in rows if r[f"best_{metric}"] is not None]
    if not ok:
        raise MmfusionError(f"no trial of {name} reported {metric}; see the logs in {exp_path}")
    ok.sort(key=lambda r: r[f"best_{metric}"], reverse=(mode == "max"))
    best = ok[0]
    out_dir = staging_dir(exp_path)  # the experiment folder, or a local copy published to s3:// / gs://
    csv_path = _write_csv(rows, out_dir / "trials.csv")
    plot = _plot(rows, metric, out_dir / "trials.png")

    train_dir = f"{exp_path}/train/trial-{best['trial_id']}"
    result = ray.train.Result.from_path(train_dir)
    best_cfg = trial_config(base, {k: best[k] for k in cfg.tune.space})
    best_cfg.data = cfg.data  # data.* is fixed across trials; it holds the statistics build_datasets measured
    best_cfg.train.artifact_dir = cfg.tune.artifact_dir or f"{exp_path}/best_artifact"
    run = export_run(result, best_cfg, bundle, f"trial-{best['trial_id']}", f"{exp_path}/train")
    if is_remote(exp_path):
        for f in (csv_path, plot):
            publish_file(f, f"{exp_path}/{f.name}")
    table = _table(rows, metric, mode, list(cfg.tune.space))
    return TuneRun(name, out_dir, run.artifact, csv_path, plot, table, rows, location=run.location,
                   best_id=str(best["trial_id"]))


def finish_trials(cfg: ExperimentConfig, rows: list[dict[str, Any]], exp_path: str, best_artifact: Path,
                  best_id: str, tracking: dict[str, Any]) -> None:
    """Each trial's tracking, finished on the driver: the best trial gets the exported artifact, every other
    trial its last checkpoint (see mmfusion.train.tracking.finish_run)."""
    import ray.train

    from mmfusion.train.tracking import finish_run

    if not cfg.train.tracking:
        return
    for r in rows:
        loc = f"{exp_path}/train/trial-{r['trial_id']}"
        step = max(0, int(r["epochs"]) - 1)
        kw = {"experiment": tracking["experiment"], "uri": tracking["mlflow_uri"], "step": step,
              "status": "FAILED" if r["status"] == "error" else "FINISHED"}
        if str(r["trial_id"]) == best_id:
            finish_run(cfg, loc, best_artifact, **kw)
            continue
        try:
            ckpt = ray.train.Result.from_path(loc).checkpoint
        except (OSError, RuntimeError, ValueError):
            ckpt = None
        if ckpt is None:
            finish_run(cfg, loc, None, **kw)
            continue
        with ckpt.as_directory() as d:
            finish_run(cfg, loc, None, extra=Path(d), **kw)


def _write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = [k for k in rows[0] if k != "curve"]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def _plot(rows: list[dict[str, Any]], metric: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if r["curve"]:
            ax.plot(range(1, len(r["curve"]) + 1), r["curve"], "-o", ms=3, label=str(r["trial_id"])[-8:])
    ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per trial")
    ax.grid(alpha=0.3)
    if len(rows) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _table(rows: list[dict[str, Any]], metric: str, mode: str, keys: list[str]) -> str:
    ordered = sorted(rows, key=lambda r: (r[f"best_{metric}"] is None,
                                          -(r[f"best_{metric}"] or 0) if mode == "max"
                                          else (r[f"best_{metric}"] or 0)))
    head = ["trial", *keys, "epochs", f"best {metric}", "status"]
    lines = [" | ".join(head)]
    for r in ordered:
        v = r[f"best_{metric}"]
        lines.append(" | ".join([str(r["trial_id"])[-8:], *(_fmt(r.get(k)) for k in keys), str(r["epochs"]),
                                 f"{v:.4f}" if v is not None else "-", r["status"]]))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)

