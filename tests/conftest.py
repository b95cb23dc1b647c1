"""Shared fixtures: a tiny AVT-Digits build (once per session) and one local Ray cluster per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # tests that test auth start their own cluster
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub access in tests: HF models come from local folders

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest on one thread, and tests never fight each other (or Ray) for the 2 cores."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def avt_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few hundred AVT-Digits rows (all splits, some rows with a missing modality), built once."""
    from mmfusion.datasets.avt_digits import build_avt_digits

    return build_avt_digits(tmp_path_factory.mktemp("avt") / "avt_tiny", variant="tiny", seed=0)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray cluster for the whole session (start/stop costs seconds)."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(
        num_cpus=4,  # logical CPUs > physical cores is fine and avoids Data/Train CPU deadlocks
        object_store_memory=400 * 1024**2,
        include_dashboard=True,  # Train's placement-group cleaner (Tune + ASHA) needs the State API
        logging_level="WARNING",
        log_to_driver=True,
        namespace="mmfusion-tests",
    )
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
