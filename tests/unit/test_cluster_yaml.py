"""cluster.yaml: valid for Ray's own cluster-launcher validator (offline), broken copies fail, and it says
what the design says (CPU head with no work, autoscaling GPU and CPU workers, pinned image and package,
token auth on every node, private dashboard)."""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from mmfusion.cluster import validate_cluster_config
from mmfusion.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def pins() -> dict[str, str]:
    """name -> exact version pinned in pyproject.toml, plus the project's own version."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    out = {"mmfusion": project["version"]}
    for dep in project["dependencies"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^;\s]+)", dep.strip())
        if m:
            out[m.group(1)] = m.group(3)
    return out


def test_ray_validator_accepts_it(cluster):
    prepared = validate_cluster_config(cluster)
    assert prepared["provider"]["type"] == "aws"


@pytest.mark.parametrize("breakage, needle", [
    (lambda c: c["available_node_types"]["gpu_worker"].update(gpus=1), "'gpus' was unexpected"),
    (lambda c: c.update(workers=3), "'workers' was unexpected"),
    (lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=5, max_workers=2),
     "gpu_worker: min_workers=5 is above max_workers=2"),
    (lambda c: c.update(max_workers=1) or c["available_node_types"]["cpu_worker"].update(min_workers=2),
     "max_workers"),
    (lambda c: c.update(head_node_type="nope"), "head_node_type"),
    (lambda c: c.update(worker_start_ray_commands=["ray stop", "ray start --address=$RAY_HEAD_IP:6379"]),
     "without RAY_AUTH_MODE=token"),
])
def test_a_broken_copy_fails(cluster, breakage, needle):
    broken = copy.deepcopy(cluster)
    breakage(broken)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        validate_cluster_config(broken)


def test_node_types_cpu_head_gpu_and_cpu_workers(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # no work scheduled on the head
    gpu, cpu = types["gpu_worker"], types["cpu_worker"]
    assert gpu["min_workers"] == 0 < gpu["max_workers"] and gpu["resources"].get("GPU", 0) >= 1
    assert cpu["min_workers"] == 0 < cpu["max_workers"] and "GPU" not in cpu["resources"]
    assert cluster["max_workers"] >= gpu["max_workers"] + cpu["max_workers"]
    for worker in (gpu, cpu):  # multi-node runs write to S3: the workers need the instance profile for it
        assert worker["node_config"]["IamInstanceProfile"]["Name"]


def test_images_and_packages_match_the_pins(cluster, pins):
    ray, py = pins["ray"], "py311"  # requires-python: 3.11
    docker = cluster["docker"]
    images = [docker["image"], docker["head_image"], docker["worker_image"],
              *(t.get("docker", {}).get("worker_image") for t in cluster["available_node_types"].values())]
    for image in filter(None, images):
        assert re.fullmatch(rf"rayproject/ray:{re.escape(ray)}-{py}-(cpu|gpu)", image), image
    setup = "\n".join(cluster["setup_commands"])
    for name in ("torch", "torchvision", "torchaudio", "mmfusion"):
        assert f'"{name}=={pins[name]}"' in setup, name
    assert f"ray[data,train,tune,serve]=={ray}" in setup


def test_token_auth_on_every_node_and_dashboard_private(cluster):
    starts = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in ray_starts)
    # every shell on a node (job drivers, `ray attach`, `serve deploy` on the head) talks token auth too
    assert any("echo 'export RAY_AUTH_MODE=token' >> ~/.bashrc" in c for c in cluster["setup_commands"])
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the token reaches every node
    head = next(c for c in ray_starts if "--head" in c)
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in " ".join(starts)


def test_workers_get_the_serving_api_key_the_serve_config_names(cluster):
    serve = yaml.safe_load((REPO / "serve" / "production.yaml").read_text())
    names = {a["args"]["api_key_env"] for a in serve["applications"] if a.get("args", {}).get("api_key_env")}
    assert names, "serve/production.yaml should protect the HTTP endpoint with an API key"
    worker_start = next(c for c in cluster["worker_start_ray_commands"] if "ray start" in c)
    for name in names:  # the key file travels to every node; the worker's Ray (and its replicas) exports it
        assert f'{name}="$(cat ~/.mmfusion/api_key)"' in worker_start
    assert cluster["file_mounts"]["~/.mmfusion/api_key"] == "~/.mmfusion/api_key"
