"""`mmfusion runs`: run folders and Tune experiments as training leaves them, read back and compared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mmfusion.cli import main
from mmfusion.errors import MmfusionError
from mmfusion.runs import config_diff, find_runs, load_run

HISTORY = [{"epoch": 0, "train_loss": 2.0, "val_accuracy": 0.5, "world_size": 1},
           {"epoch": 1, "train_loss": 1.0, "val_accuracy": 0.75, "world_size": 1}]


def _config(fusion: str, lr: float = 1e-3) -> dict:
    return {"seed": 0, "data": {"path": "data/x", "modalities": ["image", "text"]},
            "model": {"fusion": {"name": fusion, "dim": 32}}, "optim": {"lr": lr},
            "train": {"metric": "val_accuracy", "mode": "max", "run_name": None, "epochs": 2}}


def _train_run(root: Path, name: str, fusion: str, best: float) -> Path:
    d = root / name
    (d / "artifact").mkdir(parents=True)
    (d / "checkpoint_2026-01-01_00-00-00.000000").mkdir()
    (d / "checkpoint_2026-01-01_00-00-00.000000" / "state.json").write_text(json.dumps({"epoch": 1}))
    (d / "artifact" / "config.yaml").write_text(yaml.safe_dump(_config(fusion)))
    (d / "artifact" / "metrics.json").write_text(json.dumps(
        {"run_name": name, "best_epoch": 1, "best_val_accuracy": best, "epochs_run": 2, "history": HISTORY,
         "stopped_early": False}))
    return d


def _tune(root: Path) -> Path:
    exp = root / "tune-x"
    (exp / "best_artifact").mkdir(parents=True)
    cfg = _config("gated", lr=0.01) | {"tune": {"space": {"optim.lr": {"choice": [0.01, 0.001]}}}}
    (exp / "best_artifact" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (exp / "trials.csv").write_text("trial_id,optim.lr,epochs,best_val_accuracy,status\n"
                                    "aa,0.01,2,0.9,completed\nbb,0.001,1,0.4,stopped early\n")
    for t, state in (("aa", {"epoch": 1, "best_metric": 0.9, "best_epoch": 1, "history": HISTORY}),
                     ("bb", {"epoch": 0, "best_metric": 0.4, "best_epoch": 0, "history": HISTORY[:1]})):
        ck = exp / "train" / f"trial-{t}" / "checkpoint_2026-01-01_00-00-00.000000"
        ck.mkdir(parents=True)
        (ck / "state.json").write_text(json.dumps(state))
    return exp


def test_list_finds_finished_and_incomplete_runs_and_tune_experiments(tmp_path, capsys):
    _train_run(tmp_path, "a-concat", "concat", 0.75)
    _tune(tmp_path)
    ck = tmp_path / "b-running" / "checkpoint_2026-01-01_00-00-00.000000"
    ck.mkdir(parents=True)
    (ck / "state.json").write_text(json.dumps({"epoch": 0, "best_metric": 0.5, "best_epoch": 0,
                                               "history": HISTORY[:1]}))
    (tmp_path / "not-a-run").mkdir()
    runs = {r.name: r for r in find_runs(tmp_path)}
    assert set(runs) == {"a-concat", "b-running", "tune-x"}
    assert (runs["a-concat"].status, runs["a-concat"].best, runs["a-concat"].epochs) == ("finished", 0.75, 2)
    assert (runs["b-running"].status, runs["b-running"].best, runs["b-running"].config) == ("incomplete", 0.5,
                                                                                            None)
    assert (runs["tune-x"].kind, runs["tune-x"].best, len(runs["tune-x"].trials)) == ("tune", 0.9, 2)
    assert main(["runs", "list", "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "a-concat" in out and "tune-x" in out and "incomplete" in out


def test_compare_shows_the_config_diff_and_both_best_metrics(tmp_path, capsys):
    _train_run(tmp_path, "a-concat", "concat", 0.75)
    _train_run(tmp_path, "b-gated", "gated", 0.8125)
    assert config_diff([load_run(tmp_path, "a-concat"), load_run(tmp_path, "b-gated")]) == [
        ("model.fusion.name", ["concat", "gated"])]
    assert main(["runs", "compare", "a-concat", "b-gated", "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "model.fusion.name" in out and "concat" in out and "gated" in out
    assert "0.75" in out and "0.8125" in out
    assert "optim.lr" not in out  # equal keys are not listed


def test_trials_are_addressed_by_experiment_and_carry_their_sampled_values(tmp_path, capsys):
    _tune(tmp_path)
    bb = load_run(tmp_path, "tune-x/trial-bb")
    assert (bb.kind, bb.status, bb.best, bb.config["optim"]["lr"]) == ("trial", "stopped early", 0.4, 0.001)
    assert main(["runs", "compare", "tune-x/trial-aa", "tune-x/trial-bb", "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "optim.lr" in out and "0.01" in out and "0.001" in out
    assert main(["runs", "show", "tune-x", "--storage", str(tmp_path)]) == 0
    assert "stopped early" in capsys.readouterr().out


def test_show_prints_the_history_and_an_unknown_run_is_a_clear_error(tmp_path, capsys):
    _train_run(tmp_path, "a-concat", "concat", 0.75)
    assert main(["runs", "show", "a-concat", "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "val_accuracy 0.75 at epoch 2" in out and "train_loss" in out
    with pytest.raises(MmfusionError, match="no run 'nope'.*a-concat"):
        load_run(tmp_path, "nope")
    assert main(["runs", "show", "nope", "--storage", str(tmp_path)]) == 2
