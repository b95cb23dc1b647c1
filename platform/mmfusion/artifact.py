"""Self-describing model artifacts: a folder that rebuilds model and preprocessing without pickle.

    ARTIFACT/
      model.safetensors   weights (safetensors: no code execution on load)
      config.yaml         the resolved experiment config (rebuilds model and preprocessing)
      labels.json         class names, index order = logits order
      metrics.json        training history, best epoch, evaluation results
      *.png               training curves, confusion matrices
      pretrained/         Hugging Face parts' own files: the folder rebuilds alone (no hub, no source folder)
        <modality>/         the model config (config.json) of each `hf` encoder; its weights are in
                            model.safetensors
        tokenizer/          the tokenizer files, when data.text.tokenizer is a Hugging Face tokenizer
        sources.json        {part: the name or folder config.yaml gives}

config.yaml keeps the names the experiment gave (hub names, folders, `pkg:` references); `read_artifact_info`
points the config it returns at the bundled copies, so everything that loads the artifact uses those.

config.yaml and labels.json are parsed in one place, `read_artifact_info`, which imports no torch: the serving
ingress uses it to validate requests and describe the model. `load_artifact` adds the model (torch is imported
then); training's export, `mmfusion evaluate` and the serving replicas load it that way. (Batch prediction
over a dataset does not exist yet.)
An artifact given as a remote URI (s3://, gs://) is copied once into a node-local cache folder
(`localize_artifact`); a local path or a file:// URI is used in place.
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

from mmfusion import storage
from mmfusion.config import ExperimentConfig, validate_config
from mmfusion.errors import ArtifactError, ConfigError

if TYPE_CHECKING:
    import torch

    from mmfusion.batch import InputSpec

log = logging.getLogger(__name__)

WEIGHTS, CONFIG, LABELS, METRICS = "model.safetensors", "config.yaml", "labels.json", "metrics.json"
PRETRAINED, SOURCES, TOKENIZER = "pretrained", "sources.json", "tokenizer"
REQUIRED = (WEIGHTS, CONFIG, LABELS)
# where remote artifacts are copied (default: ~/.cache/mmfusion/artifacts)
CACHE_ENV = "MMFUSION_ARTIFACT_CACHE"


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
        bundle_pretrained(tmp / PRETRAINED, cfg)
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


def pretrained_parts(cfg: ExperimentConfig) -> dict[str, str]:
    """{part: name or folder} of the Hugging Face parts the artifact must carry: "image"/"text"/"audio" for an
    `hf` encoder, "tokenizer" for a Hugging Face tokenizer."""
    parts = {m: enc.pretrained for m in cfg.data.modalities
             if (enc := getattr(cfg.model.encoders, m)).name == "hf"}
    if "text" in cfg.data.modalities and cfg.data.text.tokenizer != "builtin":
        parts[TOKENIZER] = cfg.data.text.tokenizer
    return parts


def bundle_pretrained(dest: Path, cfg: ExperimentConfig) -> None:
    """Write each hf encoder's model config and the Hugging Face tokenizer under `dest` (the weights are in
    model.safetensors already), with sources.json naming where each came from."""
    parts = pretrained_parts(cfg)
    if not parts:
        return
    from transformers import AutoConfig

    from mmfusion.data.text import HfTokenizer
    from mmfusion.models.encoders import resolve_pretrained

    for part, source in parts.items():
        try:
            if part == TOKENIZER:
                HfTokenizer(source).tok.save_pretrained(str(dest / part))
            else:
                AutoConfig.from_pretrained(resolve_pretrained(source)).save_pretrained(str(dest / part))
        except (OSError, ValueError) as e:
            raise ArtifactError(f"cannot copy {part} files from {source!r} into the artifact: {e}") from None
    (dest / SOURCES).write_text(json.dumps(parts, indent=1))


def _use_bundled(cfg: ExperimentConfig, path: Path) -> ExperimentConfig:
    """`cfg` with every Hugging Face part pointed at its copy under path/pretrained/, where there is one."""
    folder = path / PRETRAINED
    if not (folder / SOURCES).is_file():
        return cfg  # an artifact written before parts were bundled: the names in config.yaml are used
    for part in pretrained_parts(cfg):
        local = folder / part
        if not local.is_dir():
            raise ArtifactError(f"{path} lacks {PRETRAINED}/{part}/ (listed in {PRETRAINED}/{SOURCES})")
        if part == TOKENIZER:
            cfg.data.text.tokenizer = str(local)
        else:
            getattr(cfg.model.encoders, part).pretrained = str(local)
    return cfg


def read_metrics(path: str | Path) -> dict[str, Any]:
    p = Path(path) / METRICS
    return json.loads(p.read_text()) if p.exists() else {}


def update_metrics(path: str | Path, **entries: Any) -> dict[str, Any]:
    m = read_metrics(path)
    m.update(entries)
    (Path(path) / METRICS).write_text(json.dumps(m, indent=1, default=float))
    return m


def check_artifact(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise ArtifactError(f"artifact folder not found: {p}")
    missing = [f for f in REQUIRED if not (p / f).is_file()]
    if missing:
        raise ArtifactError(f"{p} is not an mmfusion artifact: missing {', '.join(missing)}")
    return p


def localize_artifact(location: str | Path) -> Path:
    """A local artifact folder for `location`: a path or file:// URI as it is (not copied), a remote URI
    (s3://, gs://) copied once per node into the cache folder (MMFUSION_ARTIFACT_CACHE), pretrained/ included,
    so every replica loads the same bytes and needs no other folder."""
    location = str(location)
    try:
        path = storage.localize(location, REQUIRED, (METRICS,), kind="artifacts",
                                cache_root=os.environ.get(CACHE_ENV) or None)
        _localize_pretrained(location, path)  # the Hugging Face parts' files (pretrained/)
    except FileNotFoundError as e:  # a remote folder without a required file
        raise ArtifactError(f"{location} is not an mmfusion artifact: {e}") from None
    except OSError as e:
        raise ArtifactError(f"cannot copy the artifact {location}: {e}") from None
    return check_artifact(path)


def _localize_pretrained(location: str, local: Path) -> None:
    """A remote artifact's pretrained/ folder, copied once beside the files storage.localize copied."""
    if not storage.is_remote(location) or (local / PRETRAINED / SOURCES).is_file():
        return
    import pyarrow.fs as pafs

    fs, inner = storage.filesystem(location)
    src = f"{inner.rstrip('/')}/{PRETRAINED}"
    if fs.get_file_info(src).type != pafs.FileType.Directory:
        return  # no Hugging Face parts
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=local))
    try:
        pafs.copy_files(src, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        os.replace(tmp, local / PRETRAINED)
    except OSError:
        if not (local / PRETRAINED / SOURCES).is_file():  # else another process copied it first
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------ torch-free reading


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


def read_artifact_info(location: str | Path) -> ArtifactInfo:
    """Parse config.yaml and labels.json (the only place they are parsed). No torch is imported."""
    path = localize_artifact(location)
    try:
        cfg = validate_config(yaml.safe_load((path / CONFIG).read_text()), source=str(path / CONFIG))
        labels = json.loads((path / LABELS).read_text())
    except (ConfigError, yaml.YAMLError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: {e}") from None
    cfg = _use_bundled(cfg, path.absolute())
    if not isinstance(labels, list) or len(labels) < 2:
        raise ArtifactError(f"{path / LABELS} must list at least two class names")
    return ArtifactInfo(path.absolute(), cfg, [str(x) for x in labels], read_metrics(path))


# ---------------------------------------------------------------------------------------- the model


@dataclass
class Artifact:
    path: Path
    cfg: ExperimentConfig
    labels: list[str]
    spec: InputSpec
    model: torch.nn.Module  # eval mode, on the device it was loaded to
    metrics: dict[str, Any]


def load_artifact(location: str | Path, device: str = "cpu") -> Artifact:
    """Rebuild the model from config.yaml and load the safetensors weights (strict: every key must match)."""
    from safetensors.torch import load_file

    from mmfusion.data.preprocessor import input_spec
    from mmfusion.models.model import build_model

    info = read_artifact_info(location)
    p = info.path
    spec = input_spec(info.cfg.data)
    # load_weights=False: no pretrained download or file read, the artifact's weights replace them anyway
    model = build_model(info.cfg.model, spec, num_classes=len(info.labels), load_weights=False)
    try:
        state = load_file(str(p / WEIGHTS), device=device)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ArtifactError(f"{p / WEIGHTS} cannot be read: {e}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"{p / WEIGHTS} does not match the model in config.yaml: {e}") from None
    model.to(device).eval()
    return Artifact(p, info.cfg, info.labels, spec, model, info.metrics)
