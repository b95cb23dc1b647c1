"""Run a per-batch callable over a dataset's records: on Ray Data (an actor pool sized to the cluster) or
in-process. `mmfusion predict`, `mmfusion evaluate` and `mmfusion evaluate --robustness` all go through here.

    Ray Data:   from_items(read units) -> map_batches(read + load media, tasks)     # mmfusion.data.readers
                -> repartition (small blocks, so every actor gets some)
                -> map_batches(UDF class, ActorPoolStrategy(size=pool.size), num_gpus=pool.gpus_per_actor)
    in-process: iter_records -> UDF instance, batch by batch (unit tests, small checks; no Ray)

The UDF is a callable class (Predictor, RobustnessScorer): its constructor loads the artifact once per actor,
its __call__ maps a record batch (RECORD_SCHEMA columns as numpy) to a batch of results. Sizing: one actor per
CPU of the cluster (on a single-node cluster on this machine, per real core: an embedded cluster declares more
logical CPUs than the machine has); with GPUs in the cluster, the actors share them (fractional num_gpus) and
run the model on cuda, while decoding and preprocessing stay on their CPU.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from mmfusion.errors import ConfigError, MmfusionError

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
READ_CPUS = 0.5  # per read task (I/O-bound): leaves the actors their CPUs
SPARE_CPUS = 1.0  # kept beside the pool: a repartition task takes 1 CPU, else the pool starves the pipeline
MAX_BATCH = 256  # rows per UDF call
ACTOR_START_S = 600  # wait this long for the whole pool to start before any block is handed out


@dataclass(frozen=True)
class Pool:
    """The actor pool for one pass: `size` actors, each with `cpus` and `gpus` (fractional when shared)."""

    size: int
    cpus: float
    gpus: float
    device: str  # "cpu" | "cuda": where the actors run the model

    def describe(self) -> str:
        gpu = f", {self.gpus:g} GPU each (model on cuda)" if self.gpus else ", model on cpu"
        return f"{self.size} actor(s), {self.cpus:g} CPU each{gpu}"


def plan_pool(cluster_cpus: float, cluster_gpus: float, device: Device = "auto",
              real_cores: int | None = None) -> Pool:
    """One actor per CPU (capped at `real_cores` when the cluster is this machine alone); with GPUs (device
    auto or cuda) they share them. ConfigError when cuda is asked for and the cluster has no GPU."""
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and cluster_gpus <= 0:
        raise ConfigError("--device cuda: the Ray cluster has no GPU")
    size = max(1, int(cluster_cpus))
    if real_cores:
        size = min(size, real_cores)
    # the read and repartition tasks need SPARE_CPUS beside the pool, else the pool holds every CPU and the
    # blocks it waits for are never made (logical CPUs: the actors still use a core each)
    cpus = min(1.0, max(0.05, (cluster_cpus - SPARE_CPUS) / size))
    use_gpu = cluster_gpus > 0 and device != "cpu"
    gpus = round(cluster_gpus / size, 4) if use_gpu else 0.0  # Ray's resource granularity is 1e-4
    return Pool(size, round(cpus, 4), gpus, "cuda" if use_gpu else "cpu")


def local_device(device: Device = "auto") -> str:
    """The device for in-process runs: cuda when torch sees a GPU (device auto or cuda)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no GPU on this machine")
    return "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"


def cluster_pool(device: Device = "auto") -> Pool:
    """plan_pool for the connected Ray cluster."""
    import ray

    from mmfusion.runtime import usable_cpus

    res = ray.cluster_resources()
    # usable_cpus: the real cores when the cluster is this machine alone (else the cluster's CPUs)
    return plan_pool(float(res.get("CPU", 1)), float(res.get("GPU", 0)), device, int(usable_cpus()))


def batch_rows(num_rows: int, pool_size: int) -> int:
    """Rows per block and per UDF call: at most MAX_BATCH, and small enough that every actor gets at least
    two blocks (a small split would otherwise be one block for one actor)."""
    return max(1, min(MAX_BATCH, math.ceil(num_rows / (2 * pool_size))))


# ---------------------------------------------------------------------------------------- in-process


def iter_local(udf: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], data: str,
               splits: list[str] | None, label_column: str, modalities: list[str], rows: int = MAX_BATCH,
               ) -> Iterator[dict[str, np.ndarray]]:
    """The UDF over the records of `splits` (None: all), in this process."""
    from mmfusion.data.readers import iter_records

    for table in iter_records(data, splits, label_column, modalities=modalities):
        for rb in table.to_batches(rows):
            yield udf({c: rb.column(c).to_numpy(zero_copy_only=False) for c in rb.schema.names})


# ------------------------------------------------------------------------------------------ Ray Data


def iter_ray(udf_cls: type, udf_kwargs: dict[str, Any], data: str, splits: list[str] | None,
             label_column: str, modalities: list[str], num_rows: int, pool: Pool,
             ) -> Iterator[dict[str, np.ndarray]]:
    """The UDF class on a Ray Data actor pool over the records of `splits` (None: all). Ray must be
    initialized. Yields the result batches in the order they finish."""
    import ray.data
    import ray.exceptions
    from ray.data import ActorPoolStrategy

    from mmfusion.data import readers

    units = [u.as_row() for u in readers.plan_units(readers.discover(data), 1024)]
    rows = batch_rows(num_rows, pool.size)
    ds = ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
        _read_units, batch_size=1, batch_format="pyarrow", num_cpus=READ_CPUS,
        fn_kwargs={"label_column": label_column, "splits": splits, "modalities": modalities})
    ds = ds.repartition(target_num_rows_per_block=rows)  # streaming: blocks spread over the whole pool
    ds = ds.map_batches(
        udf_cls, fn_constructor_kwargs={**udf_kwargs, "device": pool.device, "num_threads": 1},
        batch_size=rows, batch_format="numpy", num_cpus=pool.cpus, num_gpus=pool.gpus,
        compute=ActorPoolStrategy(size=pool.size, max_tasks_in_flight_per_actor=2))
    ds.context.wait_for_min_actors_s = ACTOR_START_S  # all actors up before the first block is handed out
    log.info("inference on Ray Data: %d rows, %s, %d rows per batch", num_rows, pool.describe(), rows)
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)
    except ray.exceptions.GetTimeoutError:
        raise MmfusionError(f"the inference actor pool ({pool.describe()}) did not start within "
                            f"{ACTOR_START_S} s: other work holds the cluster's CPUs or GPUs") from None


def _read_units(batch: pa.Table, label_column: str, splits: list[str] | None, modalities: list[str],
                ) -> Iterator[pa.Table]:
    """Ray task: read units -> RECORD_SCHEMA tables with their media loaded."""
    from mmfusion.data import readers

    for row in batch.to_pylist():
        unit = readers.ReadUnit.from_row(row)
        for tb in readers.read_unit(unit, label_column, set(splits) if splits else None, modalities):
            if tb.num_rows:
                yield readers.resolve_media(tb)
