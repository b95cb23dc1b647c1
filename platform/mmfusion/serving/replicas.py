"""Ray Serve model replicas: one encoder deployment per modality, the fusion deployment, and the whole-model
deployment of the `single` topology (the ingress is in deployments.py). torch is imported inside the replicas,
never at module level, so the ingress that imports this module stays light.

The decorators are bare: replicas, CPUs/GPUs, autoscaling, queue limits and batch sizes (user_config) come
from serve/*.yaml; a deployment without user_config batches with BatchConfig's defaults. Every batched
deployment counts its batch sizes (`batch_stats`, also in /v1/metadata).
"""

import asyncio
import logging
from typing import Any

from ray import serve

from mmfusion.serving.batching import BatchConfig, BatchStats
from mmfusion.serving.metrics import BatchSizes

log = logging.getLogger(__name__)

BATCH = BatchConfig()  # every batched method starts with these; a Serve config's user_config replaces them


def load_model(artifact: str, device: str, torch_threads: int | None) -> tuple[Any, Any]:
    """(Artifact, torch.device) in a model replica; torch is imported here, never in the ingress.

    device="auto" means cuda only when Serve gave this replica a GPU (ray_actor_options.num_gpus): a CPU
    replica on a GPU node must not take GPU memory nobody reserved for it.
    """
    import ray
    import torch

    from mmfusion.artifact import load_artifact
    from mmfusion.serving.engine import resolve_device

    if torch_threads:
        torch.set_num_threads(torch_threads)
    if device == "auto":
        device = "cuda" if ray.get_gpu_ids() else "cpu"
    return load_artifact(artifact), resolve_device(device)


# -------------------------------------------------------------------------------------- model replicas


class Replica:
    """What every model replica shares: batch knobs from user_config (serve/*.yaml), batch-size counters,
    a ping for readiness and a health check that runs the model on a probe input."""

    BATCHED: str  # the name of the replica's @serve.batch method
    runner: Any
    stats: BatchStats

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        cfg = BatchConfig.model_validate(user_config or {})
        batched = getattr(self, self.BATCHED)
        batched.set_max_batch_size(cfg.max_batch_size)
        batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    def batch_stats(self) -> dict[str, Any]:
        return self.stats.as_dict()

    def ping(self) -> bool:
        return True

    def check_health(self) -> None:
        self.runner.probe()



@serve.deployment
class Encoder(Replica):
    """One modality's preprocessing + encoder; bound once per modality as
    ImageEncoder/TextEncoder/AudioEncoder."""

    BATCHED = "encode"

    def __init__(self, artifact: str, modality: str, device: str = "auto",
                 torch_threads: int | None = None) -> None:
        from mmfusion.serving.engine import EncoderRunner, keep_encoder

        art, dev = load_model(artifact, device, torch_threads)
        self.runner = EncoderRunner(keep_encoder(art.model, modality), art.cfg.data, modality, dev)
        self.runner.probe()  # fail at start, not on the first request
        self.stats = BatchSizes()
        log.info("%s encoder ready on %s", modality, dev)

    @serve.batch(max_batch_size=BATCH.max_batch_size, batch_wait_timeout_s=BATCH.batch_wait_timeout_s)
    async def encode(self, values: list[bytes | str]) -> list[Any]:  # -> list[messages.Encoded]
        self.stats.add(len(values))
        return await asyncio.to_thread(self.runner, values)  # the event loop keeps queueing the next batch


@serve.deployment
class Fusion(Replica):
    """Fusion operator + classifier head over per-modality embeddings -> class probabilities."""

    BATCHED = "fuse"

    def __init__(self, artifact: str, device: str = "auto", torch_threads: int | None = None) -> None:
        from mmfusion.serving.engine import FusionRunner, keep_fusion

        art, dev = load_model(artifact, device, torch_threads)
        self.runner = FusionRunner(keep_fusion(art.model), dev)
        self.runner.probe()
        self.stats = BatchSizes()

    @serve.batch(max_batch_size=BATCH.max_batch_size, batch_wait_timeout_s=BATCH.batch_wait_timeout_s)
    async def fuse(self, items: list[dict[str, Any]]) -> list[Any]:  # {modality: (D,)} -> (K,) probabilities
        self.stats.add(len(items))
        return await asyncio.to_thread(self.runner, items)


@serve.deployment
class Model(Replica):
    """The `single` topology: preprocessing, every encoder and the fusion in one replica."""

    BATCHED = "predict"

    def __init__(self, artifact: str, device: str = "auto", torch_threads: int | None = None) -> None:
        from mmfusion.serving.engine import ModelRunner

        art, dev = load_model(artifact, device, torch_threads)
        self.runner = ModelRunner(art.model, art.cfg.data, dev)
        self.runner.probe()
        self.stats = BatchSizes()

    @serve.batch(max_batch_size=BATCH.max_batch_size, batch_wait_timeout_s=BATCH.batch_wait_timeout_s)
    async def predict(self, items: list[dict[str, bytes | str]]) -> list[Any]:  # -> list[messages.Predicted]
        self.stats.add(len(items))
        return await asyncio.to_thread(self.runner, items)
