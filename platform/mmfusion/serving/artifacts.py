"""Where serving replicas get the artifact from, and the light metadata the ingress needs (no torch).

`localize(location)`: a local folder is used as it is; a URI (s3://, gs://, file://, ...) is copied once per
node into a cache folder through pyarrow filesystems, so every replica loads the same bytes with
`mmfusion.artifact.load_artifact` (safetensors + YAML + JSON: nothing is unpickled).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mmfusion.artifact import CONFIG, LABELS, METRICS, REQUIRED, check_artifact, read_metrics
from mmfusion.config import ExperimentConfig, validate_config
from mmfusion.errors import ArtifactError, ConfigError

log = logging.getLogger(__name__)

CACHE_ENV = "MMFUSION_ARTIFACT_CACHE"  # where URI artifacts are copied (default: ~/.cache/mmfusion/artifacts)


def _cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mmfusion" / "artifacts")


def localize(location: str) -> Path:
    """A local artifact folder for `location` (a path, or a URI copied into the node's cache)."""
    from mmfusion.data.records import filesystem, is_uri

    if not is_uri(location) or location.startswith("file://"):
        local = location[len("file://"):] if location.startswith("file://") else location
        return check_artifact(Path(local).expanduser())
    key = hashlib.sha256(location.encode()).hexdigest()[:16]
    dest = _cache_root() / f"{Path(location.rstrip('/')).name}-{key}"
    if all((dest / f).is_file() for f in REQUIRED):
        return dest
    fs, inner = filesystem(location)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=dest.parent))
    try:
        for name in (*REQUIRED, METRICS):
            try:
                with fs.open_input_stream(f"{inner.rstrip('/')}/{name}") as src:
                    (tmp / name).write_bytes(src.read())
            except FileNotFoundError:
                if name in REQUIRED:
                    raise ArtifactError(f"{location} is not an mmfusion artifact: missing {name}") from None
        try:
            os.replace(tmp, dest)  # atomic: concurrent replicas on one node never see half a copy
        except OSError:  # another replica won the race
            pass
    except OSError as e:
        raise ArtifactError(f"cannot copy the artifact {location}: {e}") from None
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    log.info("artifact %s copied to %s", location, dest)
    return check_artifact(dest)


@dataclass(frozen=True)
class ArtifactInfo:
    """What the ingress needs to validate requests and describe the model, read without building it."""

    path: Path
    cfg: ExperimentConfig
    labels: list[str]
    metrics: dict[str, Any]

    @property
    def modalities(self) -> list[str]:
        return list(self.cfg.data.modalities)

    def input_limits(self) -> dict[str, dict[str, Any]]:
        d = self.cfg.data
        limits: dict[str, dict[str, Any]] = {}
        if "image" in self.modalities:
            limits["image"] = {"size": d.image.size, "channels": d.image.channels,
                               "note": "any size: resized to size x size"}
        if "text" in self.modalities:
            limits["text"] = {"max_tokens": d.text.max_length, "tokenizer": d.text.tokenizer,
                              "note": "longer texts are truncated (reported in 'truncated')"}
        if "audio" in self.modalities:
            limits["audio"] = {"sample_rate": d.audio.sample_rate, "max_seconds": d.audio.max_seconds,
                               "note": "resampled; longer clips are cut (reported in 'truncated')"}
        return limits

    def evaluation(self) -> dict[str, Any]:
        """{split: {accuracy, macro_f1, num_samples}} from metrics.json, when the artifact was evaluated."""
        out = {}
        for split, rep in (self.metrics.get("evaluation") or {}).items():
            if isinstance(rep, dict):
                out[split] = {k: rep[k] for k in ("accuracy", "macro_f1", "num_samples") if k in rep}
        return out


def read_info(location: str) -> ArtifactInfo:
    path = localize(location)
    try:
        cfg = validate_config(yaml.safe_load((path / CONFIG).read_text()), source=str(path / CONFIG))
        labels = json.loads((path / LABELS).read_text())
    except (ConfigError, yaml.YAMLError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: {e}") from None
    if not isinstance(labels, list) or len(labels) < 2:
        raise ArtifactError(f"{path / LABELS} must list at least two class names")
    return ArtifactInfo(path, cfg, [str(x) for x in labels], read_metrics(path))
