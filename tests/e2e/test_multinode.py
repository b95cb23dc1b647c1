"""A two-node local cluster (two `ray start` processes, token auth on, one storage folder both see): a
2-worker training submitted with `mmfusion submit` puts one worker on each node and writes its checkpoints to
the shared storage path (acceptance 2 of the cluster-jobs issue)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests
from tests.e2e.ray_cluster import LocalRayCluster, make_cluster
from tests.helpers import write_tiny_yaml

pytestmark = pytest.mark.e2e
MMF = str(Path(sys.executable).parent / "mmfusion")

# Each node declares 3 logical CPUs and each Train worker asks for 2: one worker fits a node, so the two
# workers must spread, and each node keeps a CPU for Ray Data's tasks.
NODE_CPUS, WORKER_CPUS = 3, 2


@pytest.fixture(scope="module")
def two_nodes():
    c = make_cluster()
    try:
        c.start_head(num_cpus=NODE_CPUS)
        c.add_worker(num_cpus=NODE_CPUS)
        yield c
    finally:
        c.stop()


def train_worker_nodes(cluster: LocalRayCluster) -> list[str]:
    """Node ids of the Ray Train worker actors (alive or finished), from the State API."""
    r = requests.get(f"{cluster.dashboard_url}/api/v0/actors",
                     params={"filter_keys": "class_name", "filter_predicates": "=",
                             "filter_values": "RayTrainWorker", "detail": "1", "limit": "100"},
                     headers={"Authorization": f"Bearer {cluster.token}"}, timeout=30)
    r.raise_for_status()
    return [a["node_id"] for a in r.json()["data"]["result"]["result"]]


def test_two_workers_spread_over_both_nodes_and_checkpoint_to_shared_storage(two_nodes, avt_tiny, tmp_path):
    assert two_nodes.alive_nodes() == 2
    storage = tmp_path / "shared"  # the one folder every node writes to (NFS or S3 on a real cluster)
    project = tmp_path / "project"
    project.mkdir()
    write_tiny_yaml(project / "two.yaml", avt_tiny, storage, "train.num_workers=2",
                    f"train.cpus_per_worker={WORKER_CPUS}", "train.epochs=1", "train.run_name=two-nodes")
    out = subprocess.run([MMF, "submit", "--address", two_nodes.dashboard_url, "--working-dir", str(project),
                          "--", "train", "two.yaml"],
                         env=two_nodes.client_env(), cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:] + two_nodes.log_tail()

    nodes = train_worker_nodes(two_nodes)
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes  # one Train worker on each node
    run = storage / "two-nodes"
    checkpoints = sorted(c for c in run.glob("checkpoint_*") if c.is_dir())
    assert checkpoints, list(run.iterdir())
    assert all((c / "model.safetensors").is_file() and (c / "state.json").is_file() for c in checkpoints)
    assert (run / "artifact" / "model.safetensors").is_file()
