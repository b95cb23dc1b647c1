"""`mmfusion serve` and `mmfusion request` as a user (and `make demo`) runs them: the server on its own
embedded Ray cluster with the default serve/local.yaml, a test split sent over HTTP, then SIGTERM stops it
cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from tests.unit.test_serving_engine import make_artifact

from mmfusion.artifact import load_artifact
from mmfusion.data.readers import read_records
from mmfusion.evaluate.report import predict_split

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
MMF = str(Path(sys.executable).parent / "mmfusion")


def _env() -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, (f"mmfusion serve exited with {proc.returncode}:\n"
                                     f"{log.read_text()[-4000:]}")
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or too busy starting to answer
            pass
        time.sleep(1)
    pytest.fail(f"no healthy server after {timeout_s} s:\n{log.read_text()[-4000:]}")


def test_serve_then_request_a_split_then_sigterm(avt_tiny, tmp_path):
    art = make_artifact(avt_tiny, tmp_path / "artifact")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([MMF, "serve", str(art), "--port", str(port)], cwd=REPO, env=_env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(url, proc, log)

        # the whole test split over HTTP: the accuracy `make demo` prints equals the offline evaluation's
        r = subprocess.run([MMF, "request", url, "--data", str(avt_tiny), "--split", "test"], env=_env(),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        m = re.search(r"accuracy through HTTP: ([0-9.]+) \((\d+)/(\d+) answered rows", r.stdout)
        assert m, r.stdout
        offline = predict_split(load_artifact(art), str(avt_tiny), "test")
        correct = int((offline.probs.argmax(1) == offline.labels).sum())
        assert (int(m.group(2)), int(m.group(3))) == (correct, len(offline.labels)), r.stdout

        # one example from files, sent as JSON/base64
        row = next(x for x in read_records(str(avt_tiny), "test").to_pylist() if x["image"] and x["audio"])
        (tmp_path / "x.png").write_bytes(row["image"])
        (tmp_path / "x.wav").write_bytes(row["audio"])
        r = subprocess.run([MMF, "request", url, "--image", str(tmp_path / "x.png"), "--audio",
                            str(tmp_path / "x.wav"), "--text", row["text"] or "", "--json"], env=_env(),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        body = json.loads(r.stdout)
        assert abs(sum(body["probabilities"].values()) - 1) < 1e-4 and body["label"] in body["probabilities"]
        assert np.isfinite(list(body["probabilities"].values())).all()

        # a client mistake is a one-line error, exit status 2
        r = subprocess.run([MMF, "request", url, "--image", str(tmp_path / "x.wav")], env=_env(),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "HTTP 400: image:" in r.stderr and "Traceback" not in r.stderr

        proc.send_signal(signal.SIGTERM)  # what `make demo` does when it is done
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{url}/healthz", timeout=5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_serve_reports_a_bad_artifact_without_starting_ray(tmp_path):
    r = subprocess.run([MMF, "serve", str(tmp_path)], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "not an mmfusion artifact" in r.stderr and "Traceback" not in r.stderr
