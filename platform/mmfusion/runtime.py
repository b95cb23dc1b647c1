"""Starting or joining Ray: `--address` / RAY_ADDRESS joins a cluster, otherwise an embedded local one."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from mmfusion.errors import ConfigError

log = logging.getLogger(__name__)


def env_address() -> str | None:
    """The cluster RAY_ADDRESS names (set inside a Ray Job), or None: then commands start an embedded one."""
    return os.environ.get("RAY_ADDRESS")


def absolute_path(path: str) -> str:
    """A local path made absolute (Ray workers chdir into their run folder); URIs stay as they are."""
    return path if "://" in path else str(Path(path).expanduser().absolute())


def init_ray(address: str | None = None, *, dashboard: bool = True, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start an embedded local cluster.

    The embedded cluster declares at least 4 logical CPUs: Ray Data, the Train controller and workers then
    never wait on each other on a 2-core laptop (threads still share the real cores). It runs the dashboard:
    Ray Train's placement-group cleaner polls the State API, and without it the cleaner decides the controller
    is gone after a minute or so and removes the running workers' placement group.
    """
    import ray

    from mmfusion.logs import filter_ray_output, is_verbose

    if ray.is_initialized():
        filter_ray_output()
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    level = "INFO" if is_verbose() else "WARNING"  # --verbose brings Ray's own INFO lines back
    filter_ray_output()  # Ray's driver-side loggers exist from `import ray` on
    address = address or env_address()
    if address:
        log.info("joining Ray cluster at %s", address)
        try:
            ray.init(address=address, logging_level=level, log_to_driver=True)
        except ConnectionError as e:
            raise ConfigError(f"cannot reach a Ray cluster at {address}: {e}") from None
    else:
        cpus = num_cpus or max(4, os.cpu_count() or 1)
        log.info("starting an embedded local Ray cluster (%d logical CPUs)", cpus)
        ray.init(address="local", num_cpus=cpus, include_dashboard=dashboard, logging_level=level,
                 log_to_driver=True)
    import ray.data

    filter_ray_output()  # now also the driver's copy of worker output
    ctx = ray.data.DataContext.get_current()
    # progress bars (data build, preprocessing, evaluate, predict, caches) only where a person watches
    ctx.enable_progress_bars = sys.stderr.isatty()
    ctx.print_on_execution_start = is_verbose()  # one "Starting execution" block per dataset per epoch


def usable_cpus(local: bool | None = None) -> float:
    """The CPUs that work on the cluster can really use: the cluster's logical CPUs, but no more than this
    machine's cores when the cluster is one node on this machine (an embedded cluster declares at least 4
    logical CPUs on a 2-core laptop, so that Data and Train never wait on each other: threads and actor pools
    must still be sized to the real cores). The one rule behind the Ray Data preprocessing pool, the
    predict/evaluate actor pool and the torch threads per training worker.

    Args:
        local: whether the cluster is one node on this machine (an embedded cluster: True); None asks Ray
            (one alive node, at this machine's address). Without a started Ray: this machine's cores.
    """
    cores = float(max(1, os.cpu_count() or 1))
    ray = sys.modules.get("ray")  # not started when not even imported: keep `import mmfusion` ray-free
    if ray is None or not ray.is_initialized():
        return cores
    cpus = max(1.0, float(ray.cluster_resources().get("CPU", 1)))
    if local is None:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        local = len(nodes) == 1 and nodes[0].get("NodeManagerAddress") == ray.util.get_node_ip_address()
    return min(cpus, cores) if local else cpus


def check_fits(num_workers: int, cpus_per_worker: float, use_gpu: bool, strict: bool = True) -> None:
    """Fail fast when the training workers can never fit the cluster, instead of waiting forever.

    strict=False (a joined cluster, which may autoscale) only warns: nodes may still appear.
    """
    import ray

    total = ray.cluster_resources()
    need_cpu = num_workers * cpus_per_worker
    problem = None
    if total.get("CPU", 0) + 1e-9 < need_cpu:
        problem = (
            f"train.num_workers={num_workers} x train.cpus_per_worker={cpus_per_worker} "
            f"needs {need_cpu:g} CPUs, "
            f"but the cluster has {total.get('CPU', 0):g}; lower train.num_workers or train.cpus_per_worker")
    elif use_gpu and total.get("GPU", 0) < num_workers:
        problem = (
            f"train.use_gpu=true with train.num_workers={num_workers} needs {num_workers} GPUs, "
            f"but the cluster has {total.get('GPU', 0):g}")
    if problem and strict:
        raise ConfigError(problem)
    if problem:
        log.warning("%s; waiting for the autoscaler to add nodes", problem)
