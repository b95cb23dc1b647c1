"""`mmfusion train` / `evaluate` as a user runs them: own embedded Ray cluster per command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.helpers import write_tiny_yaml

pytestmark = pytest.mark.e2e
MMF = str(Path(sys.executable).parent / "mmfusion")


def _env() -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return env


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _wait_until_group_exited(pgid: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (alive := _group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, f"processes {alive} of the killed command are still running"


def test_driver_killed_then_same_command_resumes(avt_tiny, tmp_path):
    cfg = write_tiny_yaml(tmp_path / "exp.yaml", avt_tiny, tmp_path / "runs", "train.epochs=5",
                          "train.run_name=crashme")
    cmd = [MMF, "train", str(cfg)]
    run_dir = tmp_path / "runs" / "crashme"
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # own process group: the kill takes its local Ray with it
    deadline = time.time() + 300
    # written once the controller registered a checkpoint
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    while time.time() < deadline and proc.poll() is None and not snapshot.exists():
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _wait_until_group_exited(proc.pid)  # its local Ray (GCS, raylet, workers) is gone before the re-run
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    artifact = Path(out.stdout.strip().splitlines()[-1])
    metrics = json.loads((artifact / "metrics.json").read_text())
    # the re-run continued, it did not restart
    assert metrics["starts"][0] == 0 and metrics["starts"][-1] >= 1
    assert [h["epoch"] for h in metrics["history"]] == list(range(5))

    ev = subprocess.run([MMF, "evaluate", str(artifact), "--data", str(avt_tiny), "--split", "test"],
                        env=_env(), capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "accuracy" in ev.stdout and "macro-F1" in ev.stdout
    assert (artifact / "confusion_matrix_test.png").is_file()
    assert "test" in json.loads((artifact / "metrics.json").read_text())["evaluation"]


@pytest.mark.parametrize("override, needle", [
    ("train.epochz=3", "train.epochz: unknown key"),
    ("train.num_workers=99", "num_workers"),
])
def test_bad_config_fails_fast_without_traceback(avt_tiny, tmp_path, override, needle):
    cfg = write_tiny_yaml(tmp_path / "exp.yaml", avt_tiny, tmp_path / "runs")
    out = subprocess.run([MMF, "train", str(cfg), override], env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2
    assert needle in out.stderr and "Traceback" not in out.stderr


def test_evaluate_rejects_a_folder_that_is_not_an_artifact(tmp_path):
    out = subprocess.run([MMF, "evaluate", str(tmp_path)], env=_env(), capture_output=True, text=True)
    assert out.returncode == 2 and "not an mmfusion artifact" in out.stderr
