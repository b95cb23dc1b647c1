"""`mmfusion submit` / `mmfusion jobs` as a user runs them, against a private `ray start --head` cluster on
127.0.0.1 with Ray token authentication on (acceptance 1 of the cluster-jobs issue)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from tests.e2e.ray_cluster import LocalRayCluster, make_cluster
from tests.helpers import write_tiny_yaml

pytestmark = pytest.mark.e2e
MMF = str(Path(sys.executable).parent / "mmfusion")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster():
    c = make_cluster()
    try:
        c.start_head(num_cpus=2)
        yield c
    finally:
        c.stop()


def mmfusion(cluster: LocalRayCluster, *args: str, with_token: bool = True, env: dict | None = None,
             cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    run_env = cluster.client_env(with_token) | (env or {})
    return subprocess.run([MMF, *args], env=run_env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def submitted_id(out: subprocess.CompletedProcess) -> str:
    m = re.search(r"submitted job (raysubmit_\w+)", out.stderr)
    assert m, out.stderr[-3000:]
    return m.group(1)


def job_ids(cluster: LocalRayCluster) -> list[str]:
    out = mmfusion(cluster, "jobs", "list", "--address", cluster.dashboard_url)
    assert out.returncode == 0, out.stderr
    return re.findall(r"raysubmit_\w+", out.stdout)


def test_without_the_token_the_submission_is_refused_clearly(cluster):
    before = job_ids(cluster)
    missing = mmfusion(cluster, "submit", "--address", cluster.dashboard_url, "--", "config", "show",
                       "jobs/configs/avt_digits.yaml", with_token=False)
    assert missing.returncode == 2
    assert "requires an authentication token and none was found" in missing.stderr
    wrong = mmfusion(cluster, "submit", "--address", cluster.dashboard_url, "--", "config", "show",
                     "jobs/configs/avt_digits.yaml", env={"RAY_AUTH_TOKEN": "not-the-cluster-token"})
    assert wrong.returncode == 2
    assert "rejected the authentication token from RAY_AUTH_TOKEN" in wrong.stderr
    for out in (missing, wrong):
        assert "Traceback" not in out.stderr and "raysubmit_" not in out.stderr
    assert job_ids(cluster) == before  # nothing ran


def test_a_failing_job_exits_non_zero_with_its_log_tail(cluster):
    # working dir = this repository: jobs/configs travel, platform/mmfusion goes as a py_module
    out = mmfusion(cluster, "submit", "--address", cluster.dashboard_url, "--", "train",
                   "jobs/configs/avt_digits.yaml", "train.epochz=3")
    assert out.returncode == 1, out.stderr[-3000:]
    job = submitted_id(out)
    assert f"mmfusion: job {job} FAILED" in out.stderr
    tail = out.stderr.split("--- last lines of the job's log ---", 1)[1]
    assert "train.epochz: unknown key" in tail and "Traceback" not in out.stderr
    status = mmfusion(cluster, "jobs", "status", job, "--address", cluster.dashboard_url)
    assert status.stdout.splitlines()[0] == "FAILED"


def test_submit_train_succeeds_and_its_artifact_exists(cluster, avt_tiny, tmp_path):
    project = tmp_path / "project"  # a user's working dir: only its config travels with the job
    (project / "jobs" / "configs").mkdir(parents=True)
    write_tiny_yaml(project / "jobs" / "configs" / "tiny.yaml", avt_tiny, tmp_path / "runs",
                    "train.epochs=1", "train.run_name=submitted")
    out = mmfusion(cluster, "submit", "--address", cluster.dashboard_url, "--working-dir", str(project),
                   "--", "train", "jobs/configs/tiny.yaml", cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    job = submitted_id(out)
    artifact = tmp_path / "runs" / "submitted" / "artifact"
    assert str(artifact) in out.stdout  # the job's own stdout (the artifact path), streamed back
    assert (artifact / "model.safetensors").is_file() and (artifact / "config.yaml").is_file()

    assert job in job_ids(cluster)
    status = mmfusion(cluster, "jobs", "status", job, "--address", cluster.dashboard_url)
    assert status.returncode == 0 and status.stdout.splitlines()[0] == "SUCCEEDED"
    logs = mmfusion(cluster, "jobs", "logs", job, "--address", cluster.dashboard_url)
    assert logs.returncode == 0 and "mmfusion train jobs/configs/tiny.yaml" in logs.stdout
    unknown = mmfusion(cluster, "jobs", "status", "raysubmit_doesnotexist", "--address",
                       cluster.dashboard_url)
    assert unknown.returncode == 2 and "no job raysubmit_doesnotexist" in unknown.stderr
