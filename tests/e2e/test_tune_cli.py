"""`mmfusion tune` interrupted after its first trial, then re-run: finished trials are not repeated.

Two trials are enough (one finished before the kill, one cut short by it); each trial costs about 20 s, mostly
Ray Train start-up."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tests.helpers import ckpts as _ckpts
from tests.helpers import tiny_raw

pytestmark = pytest.mark.e2e
MMF = str(Path(sys.executable).parent / "mmfusion")


def test_interrupted_search_resumes_without_repeating_finished_trials(avt_tiny, tmp_path):
    raw = tiny_raw(avt_tiny, tmp_path / "runs", "train.epochs=2")
    raw["tune"] = {"space": {"model.fusion.name": {"grid": ["concat", "gated"]}}, "scheduler": "none",
                   "num_samples": 1, "max_concurrent_trials": 1, "name": "resume"}
    cfg = tmp_path / "tune.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    train_dir = tmp_path / "runs" / "resume" / "train"
    proc = subprocess.Popen([MMF, "tune", str(cfg)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 400
    first = None
    while time.time() < deadline and proc.poll() is None:
        trials = sorted(train_dir.glob("trial-*")) if train_dir.exists() else []
        if len(trials) >= 2:  # one trial at a time: a second Train run means the first trial finished
            first = trials[0]
            break
        time.sleep(0.5)
    assert first is not None, "the first trial did not finish in time"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.name for p in _ckpts(first)}
    state = json.loads((max(_ckpts(first)) / "state.json").read_text())
    assert state["epoch"] == 1  # the first trial had finished both epochs

    out = subprocess.run([MMF, "tune", str(cfg)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    with (tmp_path / "runs" / "resume" / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["model.fusion.name"] for r in rows) == ["concat", "gated"]
    assert {p.name for p in _ckpts(first)} == finished  # the finished trial did not train again
    assert Path(out.stdout.strip().splitlines()[-1]).joinpath("model.safetensors").is_file()
