"""`mmfusion predict` and `mmfusion evaluate --robustness` as a user runs them (own embedded Ray cluster)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from tests.eval_helpers import with_bad_rows
from tests.unit.test_serving_engine import make_artifact

pytestmark = pytest.mark.e2e
MMF = str(Path(sys.executable).parent / "mmfusion")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([MMF, *args], env=env, capture_output=True, text=True, timeout=600)


def test_predict_cli_writes_parquet_and_rejects(avt_tiny, tmp_path):
    art = make_artifact(avt_tiny, tmp_path / "art")
    data = with_bad_rows(avt_tiny, tmp_path / "data", labelled=False)
    out = _run("predict", str(art), "--data", str(data), "--out", str(tmp_path / "p.parquet"))
    assert out.returncode == 0, out.stderr[-3000:]
    cores = os.cpu_count()  # the embedded cluster's pool: one actor per core, every one of them used
    assert f"rows predicted on {cores} actor(s)" in out.stdout and f"({cores} used)" in out.stdout, out.stdout
    assert "2 rows could not be decoded" in out.stdout and (tmp_path / "p.rejects.jsonl").is_file()
    rows_in = pq.read_metadata(data / "test.parquet").num_rows
    assert pq.read_metadata(tmp_path / "p.parquet").num_rows == rows_in - 3

    predict = ["predict", str(art), "--data", str(data), "--out"]
    for args, needle in (([*predict, str(tmp_path / "p.csv")], "must name a .parquet"),
                         (["evaluate", str(art), "--robustness", "--modalities", "text"], "--modalities")):
        bad = _run(*args)
        assert bad.returncode == 2 and needle in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
