"""Self-describing model artifacts: a folder that rebuilds model and preprocessing without pickle.

    ARTIFACT/
      model.safetensors   weights (safetensors: no code execution on load)
      config.yaml         the resolved experiment config (rebuilds model and preprocessing)
      labels.json         class names, index order = logits order
      metrics.json        training history, best epoch, evaluation results
      *.png               training curves, confusion matrices

Training, evaluation, batch prediction and serving all load artifacts through `load_artifact`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mmfusion.config import ExperimentConfig, validate_config
from mmfusion.errors import ArtifactError, ConfigError

if TYPE_CHECKING:
    import torch

    from mmfusion.models.spec import InputSpec

log = logging.getLogger(__name__)

WEIGHTS, CONFIG, LABELS, METRICS = "model.safetensors", "config.yaml", "labels.json", "metrics.json"
REQUIRED = (WEIGHTS, CONFIG, LABELS)


def save_artifact(out: str | Path, state_dict: dict[str, torch.Tensor], cfg: ExperimentConfig,
                  labels: list[str], metrics: dict[str, Any] | None = None) -> Path:
    """Write an artifact folder atomically (temp folder, then rename); existing plots/metrics are replaced."""
    from safetensors.torch import save_file

    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".artifact-", dir=out.parent))
    try:
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "mmfusion": "1"})
        (tmp / CONFIG).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        (tmp / LABELS).write_text(json.dumps([str(x) for x in labels], indent=1))
        (tmp / METRICS).write_text(json.dumps(metrics or {}, indent=1, default=float))
        if out.exists():
            for extra in out.iterdir():  # keep plots and reports made by evaluate
                if extra.name not in REQUIRED + (METRICS,) and not (tmp / extra.name).exists():
                    shutil.move(str(extra), tmp / extra.name)
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_metrics(path: str | Path) -> dict[str, Any]:
    p = Path(path) / METRICS
    return json.loads(p.read_text()) if p.exists() else {}


def update_metrics(path: str | Path, **entries: Any) -> dict[str, Any]:
    m = read_metrics(path)
    m.update(entries)
    (Path(path) / METRICS).write_text(json.dumps(m, indent=1, default=float))
    return m


@dataclass
class Artifact:
    path: Path
    cfg: ExperimentConfig
    labels: list[str]
    spec: InputSpec
    model: torch.nn.Module  # eval mode, CPU
    metrics: dict[str, Any]


def check_artifact(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise ArtifactError(f"artifact folder not found: {p}")
    missing = [f for f in REQUIRED if not (p / f).is_file()]
    if missing:
        raise ArtifactError(f"{p} is not an mmfusion artifact: missing {', '.join(missing)}")
    return p


def load_artifact(path: str | Path, device: str = "cpu") -> Artifact:
    """Rebuild the model from config.yaml and load the safetensors weights (strict: every key must match)."""
    from safetensors.torch import load_file

    from mmfusion.data.preprocess import input_spec
    from mmfusion.models.model import build_model

    if is_remote(str(path)):  # s3://, gs://: copied once into the node's cache
        from mmfusion.serving.artifacts import localize

        path = localize(str(path))
    p = check_artifact(path)
    try:
        cfg = validate_config(yaml.safe_load((p / CONFIG).read_text()), source=str(p / CONFIG))
    except (ConfigError, yaml.YAMLError) as e:
        raise ArtifactError(f"{p / CONFIG}: {e}") from None
    labels = json.loads((p / LABELS).read_text())
    spec = input_spec(cfg.data)
    # load_weights=False: no pretrained download or file read, the artifact's weights replace them anyway
    model = build_model(cfg.model, spec, num_classes=len(labels), load_weights=False)
    try:
        state = load_file(str(p / WEIGHTS), device=device)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ArtifactError(f"{p / WEIGHTS} cannot be read: {e}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"{p / WEIGHTS} does not match the model in config.yaml: {e}") from None
    model.to(device).eval()
    return Artifact(p.absolute(), cfg, labels, spec, model, read_metrics(p))


def is_remote(location: str) -> bool:
    """s3://, gs://, ... (file:// and plain paths are local)."""
    from urllib.parse import urlparse

    scheme = urlparse(str(location)).scheme
    return len(scheme) > 1 and scheme != "file"


def staging_dir(location: str) -> Path:
    """Where to write files bound for `location`: the folder itself when local, else a local cache folder
    (published with `publish`). Multi-node runs keep their storage on s3:// or gs://."""
    if not is_remote(location):
        return Path(str(location).removeprefix("file://")).expanduser().absolute()
    import hashlib

    key = hashlib.sha256(location.encode()).hexdigest()[:16]
    return Path.home() / ".cache" / "mmfusion" / "staging" / f"{Path(location.rstrip('/')).name}-{key}"


def publish(local: Path, location: str) -> str:
    """Copy a staged folder to a remote `location` (pyarrow filesystems); a no-op for local locations."""
    if not is_remote(location):
        return str(local)
    import pyarrow.fs as pafs

    from mmfusion.data.records import filesystem

    fs, inner = filesystem(location)
    fs.create_dir(inner, recursive=True)
    pafs.copy_files(str(local), inner, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    log.info("published %s to %s", local, location)
    return location
