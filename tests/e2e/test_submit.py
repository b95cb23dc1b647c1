"""`mmfusion submit` / `mmfusion jobs` as a user runs them, against a private two-node cluster (two `ray
start` processes on 127.0.0.1, token authentication on, one storage folder both see): acceptance 1 of the
cluster-jobs issue (submit, job status and logs, failures and a missing token reported clearly) and acceptance
2 (a 2-worker training puts one worker on each node and writes its checkpoints to the shared storage path).

One cluster and one submitted training serve every test here: a node costs seconds to start, a submitted
training half a minute."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from tests.e2e.ray_cluster import LocalRayCluster, make_cluster
from tests.helpers import write_tiny_yaml

pytestmark = pytest.mark.e2e
MMF = str(Path(sys.executable).parent / "mmfusion")
REPO = Path(__file__).resolve().parents[2]

# Each node declares 3 logical CPUs and each Train worker asks for 2: one worker fits a node, so the two
# workers must spread, and each node keeps a CPU for Ray Data's tasks.
NODE_CPUS, WORKER_CPUS = 3, 2


@pytest.fixture(scope="module")
def cluster():
    c = make_cluster()
    try:
        c.start_head(num_cpus=NODE_CPUS)
        c.add_worker(num_cpus=NODE_CPUS)
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


@dataclass
class Submitted:
    out: subprocess.CompletedProcess  # `mmfusion submit`'s own output
    storage: Path  # the run's train.storage_path, the folder every node writes to
    run_name: str


@pytest.fixture(scope="module")
def submitted_train(cluster, avt_tiny, tmp_path_factory) -> Submitted:
    """A 2-worker, 1-epoch training submitted from a user's working dir: only its config travels with the
    job (working dir = the project folder)."""
    tmp = tmp_path_factory.mktemp("submit")
    storage = tmp / "shared"  # the one folder every node writes to (NFS or S3 on a real cluster)
    project = tmp / "project"
    (project / "jobs" / "configs").mkdir(parents=True)
    write_tiny_yaml(project / "jobs" / "configs" / "tiny.yaml", avt_tiny, storage, "train.num_workers=2",
                    f"train.cpus_per_worker={WORKER_CPUS}", "train.epochs=1", "train.run_name=two-nodes")
    out = mmfusion(cluster, "submit", "--address", cluster.dashboard_url, "--working-dir", str(project),
                   "--", "train", "jobs/configs/tiny.yaml", cwd=tmp, timeout=600)
    return Submitted(out, storage, "two-nodes")


def test_submit_train_succeeds_and_its_artifact_exists(cluster, submitted_train):
    out = submitted_train.out
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:] + cluster.log_tail()
    job = submitted_id(out)
    artifact = submitted_train.storage / submitted_train.run_name / "artifact"
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


def train_worker_nodes(cluster: LocalRayCluster) -> list[str]:
    """Node ids of the Ray Train worker actors (alive or finished), from the State API."""
    r = requests.get(f"{cluster.dashboard_url}/api/v0/actors",
                     params={"filter_keys": "class_name", "filter_predicates": "=",
                             "filter_values": "RayTrainWorker", "detail": "1", "limit": "100"},
                     headers={"Authorization": f"Bearer {cluster.token}"}, timeout=30)
    r.raise_for_status()
    return [a["node_id"] for a in r.json()["data"]["result"]["result"]]


def test_two_workers_spread_over_both_nodes_and_checkpoint_to_shared_storage(cluster, submitted_train):
    assert cluster.alive_nodes() == 2
    out = submitted_train.out
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:] + cluster.log_tail()

    nodes = train_worker_nodes(cluster)  # the only training on this cluster: the other jobs fail before it
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes  # one Train worker on each node
    run = submitted_train.storage / submitted_train.run_name
    checkpoints = sorted(c for c in run.glob("checkpoint_*") if c.is_dir())
    assert checkpoints, list(run.iterdir())
    assert all((c / "model.safetensors").is_file() and (c / "state.json").is_file() for c in checkpoints)
    assert (run / "artifact" / "model.safetensors").is_file()
