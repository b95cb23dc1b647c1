"""Small helpers shared by tests: jobs/configs/tiny.yaml on the tiny AVT-Digits build."""

from __future__ import annotations

from pathlib import Path

import yaml

from mmfusion.config import ExperimentConfig, apply_overrides, read_yaml, validate_config

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "jobs" / "configs" / "avt_digits.yaml"
TINY_CONFIG = REPO / "jobs" / "configs" / "tiny.yaml"  # a small model on AVT-Digits, 2 epochs


def tiny_raw(data: Path, storage: Path, *overrides: str) -> dict:
    raw = read_yaml(TINY_CONFIG)
    return apply_overrides(raw, [f"data.path={data}", f"train.storage_path={storage}", *overrides])


def tiny_config(data: Path, storage: Path, *overrides: str) -> ExperimentConfig:
    return validate_config(tiny_raw(data, storage, *overrides))


def write_tiny_yaml(path: Path, data: Path, storage: Path, *overrides: str) -> Path:
    path.write_text(yaml.safe_dump(tiny_raw(data, storage, *overrides), sort_keys=False))
    return path


def ckpts(run_dir: Path) -> list[Path]:
    """Ray Train checkpoint folders of a run (not checkpoint_manager_snapshot.json)."""
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
