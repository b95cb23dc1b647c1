"""GPU and CPU capacity in the shipped deployments adds up: serve/production.yaml's replicas at min and at max
against each cluster's node groups (cluster.yaml, deploy/kuberay/rayservice.yaml), and the RayJob's training
workers against its GPU group.

Ray gives a fractional-GPU replica a share of one GPU, and a whole-GPU replica that GPU alone, so GPUs are
counted by packing each replica's share onto single GPUs (first fit, largest first), not by summing shares.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from mmfusion.config import load_config

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "deploy" / "kuberay"
IMAGE_DIR = "/home/ray/mmfusion"  # the Dockerfile's WORKDIR


@dataclass(frozen=True)
class Group:
    """A node group: per-node resources and how many nodes it may have."""

    name: str
    cpus: float
    gpus: int
    min_nodes: int
    max_nodes: int


@dataclass(frozen=True)
class Replicas:
    name: str
    cpus: float
    gpus: float
    min: int
    max: int


def gpus_packed(shares: list[float]) -> int:
    """Single GPUs needed for these per-replica GPU shares (whole GPUs for shares >= 1)."""
    whole = sum(int(s) for s in shares if s >= 1)
    free: list[float] = []  # what is left on each GPU that fractional replicas use
    for s in sorted((s for s in shares if 0 < s < 1), reverse=True):
        for i, left in enumerate(free):
            if left >= s - 1e-9:
                free[i] -= s
                break
        else:
            free.append(1.0 - s)
    return whole + len(free)


def serve_replicas(serve_config: dict) -> list[Replicas]:
    out = []
    for app in serve_config["applications"]:
        for d in app["deployments"]:
            auto = d.get("autoscaling_config") or {}
            lo = auto.get("min_replicas", d.get("num_replicas", 1))
            hi = auto.get("max_replicas", d.get("num_replicas", 1))
            opts = d.get("ray_actor_options") or {}
            out.append(Replicas(d["name"], float(opts.get("num_cpus", 1)), float(opts.get("num_gpus", 0)),
                                lo, hi))
    return out


def demand(replicas: list[Replicas], at: str) -> tuple[float, int]:
    """(CPUs, packed GPUs) the replicas ask for at "min" or "max"."""
    count = {r.name: getattr(r, at) for r in replicas}
    cpus = sum(r.cpus * count[r.name] for r in replicas)
    return cpus, gpus_packed([r.gpus for r in replicas for _ in range(count[r.name])])


def supply(groups: list[Group], at: str) -> tuple[float, int]:
    nodes = {g.name: g.min_nodes if at == "min" else g.max_nodes for g in groups}
    return sum(g.cpus * nodes[g.name] for g in groups), sum(g.gpus * nodes[g.name] for g in groups)


def launcher_groups(path: Path) -> list[Group]:
    cfg = yaml.safe_load(path.read_text())
    out = []
    for name, t in cfg["available_node_types"].items():
        head = name == cfg["head_node_type"]
        res = t.get("resources") or {}
        out.append(Group(name, float(res.get("CPU", 0)), int(res.get("GPU", 0)),
                         1 if head else t.get("min_workers", 0), 1 if head else t["max_workers"]))
    return out


def kuberay_groups(spec: dict) -> list[Group]:
    def group(name: str, g: dict, lo: int, hi: int) -> Group:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        params = g.get("rayStartParams") or {}
        cpus = float(params.get("num-cpus", limits.get("cpu", 0)))  # Ray advertises num-cpus when set
        gpus = int(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
        return Group(name, cpus, gpus, lo, hi)

    head = group("head", spec["headGroupSpec"], 1, 1)
    return [head, *(group(g["groupName"], g, g["minReplicas"], g["maxReplicas"])
                    for g in spec["workerGroupSpecs"])]


def fits_one_node(r: Replicas, groups: list[Group]) -> bool:
    return any(r.cpus <= g.cpus and r.gpus <= g.gpus and g.max_nodes > 0 for g in groups)


SERVE = yaml.safe_load((REPO / "serve" / "production.yaml").read_text())
RAYSERVICE = yaml.safe_load((KUBERAY / "rayservice.yaml").read_text())
CLUSTERS = {
    "cluster.yaml": launcher_groups(REPO / "cluster.yaml"),
    "rayservice.yaml": kuberay_groups(RAYSERVICE["spec"]["rayClusterConfig"]),
}


def test_gpus_are_packed_per_gpu_not_summed():
    assert gpus_packed([1, 0.5, 0.25]) == 2  # the whole-GPU replica shares its GPU with nobody
    assert gpus_packed([0.5, 0.5, 0.25, 0.25, 0.25]) == 2
    assert gpus_packed([1] * 8 + [0.5] * 8 + [0.25] * 8) == 14  # issue 15's old production.yaml at max
    assert gpus_packed([]) == 0


@pytest.mark.parametrize("cluster", sorted(CLUSTERS))
def test_serve_production_fits_at_max_replicas(cluster):
    groups, replicas = CLUSTERS[cluster], serve_replicas(SERVE)
    assert [r.name for r in replicas if not fits_one_node(r, groups)] == []  # each replica fits some node
    (cpus, gpus), (have_cpus, have_gpus) = demand(replicas, "max"), supply(groups, "max")
    assert gpus <= have_gpus, f"{cluster}: {gpus} GPUs at max_replicas, the groups have {have_gpus}"
    assert cpus <= have_cpus, f"{cluster}: {cpus} CPUs at max_replicas, the groups have {have_cpus}"


@pytest.mark.parametrize("cluster", sorted(CLUSTERS))
def test_serve_production_minimum_can_be_placed(cluster):
    (cpus, gpus), (have_cpus, have_gpus) = demand(serve_replicas(SERVE), "min"), supply(CLUSTERS[cluster],
                                                                                      "max")
    assert gpus <= have_gpus and cpus <= have_cpus


def test_rayservice_keeps_the_serve_minimum_warm():
    """The RayService's minReplicas hold serve/production.yaml's min_replicas without scaling up: its
    comment promises no cold start (cluster.yaml's GPU workers scale to zero on purpose)."""
    assert yaml.safe_load(RAYSERVICE["spec"]["serveConfigV2"]) == {
        **SERVE, "http_options": {**SERVE["http_options"], "host": "0.0.0.0", "port": 8000}}
    (cpus, gpus), (have_cpus, have_gpus) = (demand(serve_replicas(SERVE), "min"),
                                            supply(CLUSTERS["rayservice.yaml"], "min"))
    assert gpus <= have_gpus, f"{gpus} GPUs at min_replicas, minReplicas hold {have_gpus}"
    assert cpus <= have_cpus, f"{cpus} CPUs at min_replicas, minReplicas hold {have_cpus}"


def test_rayjob_training_workers_fit_its_gpu_group():
    doc = yaml.safe_load((KUBERAY / "rayjob-train.yaml").read_text())
    argv = shlex.split(doc["spec"]["entrypoint"])
    config = REPO / Path(argv[2]).relative_to(IMAGE_DIR)
    tc = load_config(config, argv[3:]).train
    groups = kuberay_groups(doc["spec"]["rayClusterSpec"])
    gpu = tc.num_workers if tc.use_gpu else 0
    # every worker is one bundle {CPU: cpus_per_worker, GPU: 1}: count how many the groups' nodes hold
    per_node = {g.name: min(g.gpus if tc.use_gpu else 10 ** 6, int(g.cpus // tc.cpus_per_worker))
                for g in groups}
    assert sum(per_node[g.name] * g.max_nodes for g in groups) >= tc.num_workers
    assert sum(g.gpus * g.max_nodes for g in groups) >= gpu


def test_a_manifest_that_does_not_add_up_fails():
    """The checks above can fail: issue 15's shapes (a 4-GPU group, 8 x 1 + 8 x 0.5 + 8 x 0.25 GPUs)."""
    old = [Replicas("ImageEncoder", 2, 1, 1, 8), Replicas("AudioEncoder", 2, 0.5, 1, 8),
           Replicas("TextEncoder", 1, 0.25, 1, 8)]
    groups = [Group("gpu", 8, 1, 1, 4), Group("cpu", 8, 0, 1, 6)]
    assert demand(old, "max")[1] == 14 > supply(groups, "max")[1] == 4
    assert demand(old, "min")[1] == 2 > supply(groups, "min")[1] == 1
