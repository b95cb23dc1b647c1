"""`mmfusion runs list|show|compare`: what training runs and Tune experiments left on disk, side by side.

    runs = find_runs("runs")                   # train runs and Tune experiments under a storage path
    print(format_list(runs))
    print(format_show(load_run("runs", "avt_digits-ita-concat-1a2b3c4d")))
    print(format_compare([load_run("runs", a), load_run("runs", b)]))   # config diff + best metrics

Reads only files the runs wrote: a train run folder's artifact (config.yaml, metrics.json) or, before the
artifact exists, its latest checkpoint's state.json; a Tune experiment's trials.csv, best_artifact/ and each
trial's Train run folder (<experiment>/train/trial-ID, addressed as EXPERIMENT/trial-ID).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from mmfusion.errors import MmfusionError

ARTIFACT = "artifact"


@dataclass
class Run:
    name: str
    path: Path
    kind: str  # train | tune | trial
    status: str
    metric: str = "val_accuracy"
    best: float | None = None
    best_epoch: int | None = None  # 0-based
    epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] | None = None  # the resolved experiment config (None before the artifact exists)
    trials: list[dict[str, str]] = field(default_factory=list)  # tune: rows of trials.csv
    updated: float = 0.0


def _read_json(p: Path) -> Any:
    return json.loads(p.read_text(encoding="utf-8"))


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("checkpoint_*") if (p / "state.json").is_file())


def is_train_run(d: Path) -> bool:
    return (d / ARTIFACT / "metrics.json").is_file() or bool(_checkpoints(d)) or \
        (d / "checkpoint_manager_snapshot.json").is_file()


def is_tune_experiment(d: Path) -> bool:
    return (d / "trials.csv").is_file() or any(d.glob("experiment_state-*.json")) or (d / "train").is_dir()


def _mtime(d: Path) -> float:
    return max((p.stat().st_mtime for p in d.rglob("*") if p.is_file()), default=d.stat().st_mtime)


def load_train_run(d: Path, name: str | None = None, kind: str = "train") -> Run:
    metrics_file, config_file = d / ARTIFACT / "metrics.json", d / ARTIFACT / "config.yaml"
    run = Run(name or d.name, d, kind, status="no checkpoint", updated=_mtime(d))
    if config_file.is_file():
        run.config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
        run.metric = (run.config.get("train") or {}).get("metric", run.metric)
    if metrics_file.is_file():
        m = _read_json(metrics_file)
        run.history = m.get("history") or []
        run.best, run.best_epoch = m.get(f"best_{run.metric}"), m.get("best_epoch")
        run.epochs = int(m.get("epochs_run") or len(run.history))
        run.status = "finished (early stop)" if m.get("stopped_early") else "finished"
        return run
    ckpts = _checkpoints(d)
    if ckpts:  # running, or stopped before its artifact: re-running the same command resumes it
        state = max((_read_json(c / "state.json") for c in ckpts), key=lambda s: s.get("epoch", -1))
        run.history = state.get("history") or []
        run.best, run.best_epoch = state.get("best_metric"), state.get("best_epoch")
        run.epochs = len(run.history)
        run.status = "incomplete"
    return run


def load_tune_experiment(d: Path) -> Run:
    run = Run(d.name, d, "tune", status="incomplete", updated=_mtime(d))
    best_cfg = d / "best_artifact" / "config.yaml"
    if best_cfg.is_file():
        run.config = yaml.safe_load(best_cfg.read_text(encoding="utf-8"))
        run.metric = (run.config.get("train") or {}).get("metric", run.metric)
    if (d / "trials.csv").is_file():
        with (d / "trials.csv").open(newline="", encoding="utf-8") as f:
            run.trials = list(csv.DictReader(f))
        run.status = "finished"
    scored = [(float(t[f"best_{run.metric}"]), t) for t in run.trials if t.get(f"best_{run.metric}")]
    if scored:
        mode = (run.config or {}).get("train", {}).get("mode", "max")
        run.best, top = (max if mode == "max" else min)(scored, key=lambda s: s[0])
        run.epochs = int(top.get("epochs") or 0)
    elif (d / "train").is_dir():
        folders = sorted((d / "train").glob("trial-*"))
        run.trials = [{"trial_id": p.name.removeprefix("trial-")} for p in folders]
    return run


def load_trial(exp_dir: Path, trial_id: str) -> Run:
    """A Tune trial: its Train run folder, its config = the best trial's with this trial's sampled values."""
    exp = load_tune_experiment(exp_dir)
    run = load_train_run(exp_dir / "train" / f"trial-{trial_id}", f"{exp_dir.name}/trial-{trial_id}", "trial")
    row = next((t for t in exp.trials if t.get("trial_id") == trial_id), None)
    space = list(((exp.config or {}).get("tune") or {}).get("space") or {})
    if exp.config is not None and row is not None:
        cfg = json.loads(json.dumps(exp.config))
        for key in space:
            if key in row:
                _set(cfg, key, _parse(row[key]))
        run.config = cfg
        run.status = row.get("status") or run.status
    run.metric = exp.metric
    return run


def _parse(v: str) -> Any:
    try:
        return yaml.safe_load(v)
    except yaml.YAMLError:
        return v


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[last] = value


def find_runs(storage: str | Path) -> list[Run]:
    root = Path(storage)
    if not root.is_dir():
        raise MmfusionError(f"no run folder at {root} (train.storage_path; see --storage)")
    found = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        if is_train_run(d):
            found.append(load_train_run(d))
        elif is_tune_experiment(d):
            found.append(load_tune_experiment(d))
    return found


def load_run(storage: str | Path, ref: str) -> Run:
    """RUN: a name under `storage`, EXPERIMENT/trial-ID, or a run folder's path."""
    root = Path(storage)
    for d in (root / ref, Path(ref)):
        if d.is_dir() and is_train_run(d) and d.parent.name == "train" and d.name.startswith("trial-"):
            return load_trial(d.parent.parent, d.name.removeprefix("trial-"))
        if d.is_dir() and is_train_run(d):
            return load_train_run(d)
        if d.is_dir() and is_tune_experiment(d):
            return load_tune_experiment(d)
    exp, _, trial = ref.partition("/")
    if trial.startswith("trial-") and (root / exp / "train" / trial).is_dir():
        return load_trial(root / exp, trial.removeprefix("trial-"))
    known = ", ".join(r.name for r in find_runs(root)) if root.is_dir() else "none"
    raise MmfusionError(f"no run {ref!r} under {root} (runs: {known or 'none'})")


# ------------------------------------------------------------------------------------------- output


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [head, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _fusion(r: Run) -> str:
    return ((r.config or {}).get("model") or {}).get("fusion", {}).get("name", "-")


def format_list(runs: list[Run]) -> str:
    if not runs:
        return "no runs"
    rows = [[r.name, r.kind, r.status, str(r.epochs), f"{r.metric} {_fmt(r.best)}", _fusion(r),
             datetime.fromtimestamp(r.updated).strftime("%Y-%m-%d %H:%M")] for r in runs]
    return table(["RUN", "KIND", "STATUS", "EPOCHS", "BEST", "FUSION", "UPDATED"], rows)


def format_show(r: Run) -> str:
    out = [f"run:     {r.name} ({r.kind}, {r.status})", f"folder:  {r.path}",
           f"best:    {r.metric} {_fmt(r.best)}"
           + (f" at epoch {r.best_epoch + 1}" if r.best_epoch is not None else "")]
    if (r.path / ARTIFACT).is_dir():
        out.append(f"artifact: {r.path / ARTIFACT}")
    if (r.path / "tensorboard").is_dir():
        out.append(f"tensorboard: tensorboard --logdir {r.path / 'tensorboard'}")
    if r.history:
        keys = [k for k in r.history[0] if k not in ("epoch", "world_size")]
        rows = [[str(h.get("epoch", i) + 1), *(_fmt(h.get(k)) for k in keys)]
                for i, h in enumerate(r.history)]
        out += ["", table(["epoch", *keys], rows)]
    if r.trials:
        head = [k for k in r.trials[0] if k]
        out += ["", table(head, [[t.get(k, "") for k in head] for t in r.trials])]
    return "\n".join(out)


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# where runs differ without the model differing: names and paths of the run itself
_NOT_CONFIG = ("train.run_name", "train.artifact_dir")


def config_diff(runs: list[Run]) -> list[tuple[str, list[Any]]]:
    """Dotted keys whose values differ between the runs' configs (a key a run lacks shows as None)."""
    flats = [flat(r.config or {}) for r in runs]
    keys = sorted(set().union(*flats))
    return [(k, vals) for k in keys if k not in _NOT_CONFIG
            for vals in [[f.get(k) for f in flats]] if any(v != vals[0] for v in vals)]


def format_compare(runs: list[Run]) -> str:
    head = ["", *(r.name for r in runs)]
    summary = [["status", *(r.status for r in runs)], ["epochs", *(str(r.epochs) for r in runs)],
               *([[f"best {m}", *(_fmt(r.best) if r.metric == m else "-" for r in runs)]
                  for m in dict.fromkeys(r.metric for r in runs)]),
               ["best epoch", *(_fmt(r.best_epoch + 1 if r.best_epoch is not None else None) for r in runs)]]
    out = [table(head, summary)]
    missing = [r.name for r in runs if r.config is None]
    known = [r for r in runs if r.config is not None]
    diff = config_diff(known)
    if len(known) > 1:
        out += ["", "config differences:" if diff else "config: no differences"]
    if diff:
        rows = [[k, *(_fmt(v) for v in vals)] for k, vals in diff]
        out.append(table(["key", *(r.name for r in known)], rows))
    if missing:
        out.append(f"(no config on disk yet for {', '.join(missing)}: its artifact is written at the end)")
    return "\n".join(out)
