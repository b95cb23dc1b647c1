"""Experiment configuration: pydantic models, and the one place YAML and CLI overrides are parsed.

`load_config(path, overrides)` reads one experiment YAML, applies dotted `key=value` overrides
(`model.fusion.name=gated optim.lr=3e-4 data.modalities=[image,text]`), and validates the result.
Every model forbids unknown keys, so a typo fails with the key's full path and the allowed keys.
Downstream code receives typed sub-configs (`cfg.data`, `cfg.model`), never the raw dict.
Reading files (`base:` inheritance) and applying overrides live in mmfusion.config_merge, which also says
what happens when an encoder's `name` changes.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mmfusion import config_merge
from mmfusion.batch import MODALITIES, Modality
from mmfusion.config_merge import expand_annotation as _expand
from mmfusion.config_merge import parse_override  # noqa: F401 (re-exported)
from mmfusion.errors import ConfigError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------- data


class ImagePreprocessConfig(Strict):
    size: int = Field(28, ge=8, le=1024)  # square side after resize, pixels
    channels: Literal[1, 3] = 1  # 1 = grayscale, 3 = RGB
    mean: list[float] = [0.5]  # per-channel normalization (one value is broadcast)
    std: list[float] = [0.5]
    # colour under transparent pixels (RGBA, LA, P with transparency), composited before resizing: 0-255,
    # one value (gray) or R, G, B. White: sprites, icons and scans are usually drawn for a white page.
    background: list[Annotated[int, Field(ge=0, le=255)]] = [255]


class TextPreprocessConfig(Strict):
    # "builtin" (UTF-8 byte vocabulary) or a Hugging Face tokenizer name / local path
    tokenizer: str = "builtin"
    max_length: int = Field(32, ge=1, le=4096)  # tokens; longer texts are truncated (and said so)
    lowercase: bool = True  # builtin tokenizer only
    # train-time augmentation: each train row's text gets character typos at this rate per character (deleted,
    # replaced, doubled or swapped: the text_typos of `mmfusion evaluate --robustness`), once, when the split
    # is preprocessed, seeded by (seed, row id). Val, test and serving see the text as it is. 0 = off.
    augment_typo_rate: float = Field(0.0, ge=0, le=1)
    # Hugging Face tokenizers only: every character becomes a word of its own ("zeven" -> "z e v e n",
    # whitespace dropped), so the model reads characters instead of its word pieces: for short texts whose
    # spelling carries the meaning across languages or typos (names, codes, number words), where an English
    # word-piece vocabulary cuts unseen words into unrelated pieces. Needs max_length >= characters + 2.
    split_characters: bool = False

    @model_validator(mode="after")
    def _split_characters_needs_hf(self) -> TextPreprocessConfig:
        if self.split_characters and self.tokenizer == "builtin":
            raise ValueError("split_characters applies to a Hugging Face tokenizer; the builtin tokenizer "
                             "already reads the text one UTF-8 byte at a time")
        return self


class AudioStats(Strict):
    """Feature mean and std measured on the train split by the Ray Data pass (not written by hand)."""

    mean: list[float]  # one value per feature bin (normalize: per_bin), or one value (global)
    std: list[float]


class AudioPreprocessConfig(Strict):
    sample_rate: int = Field(8000, ge=1000)  # Hz after resampling; 8 kHz keeps telephone-band speech
    features: Literal["logmel", "mfcc"] = "logmel"
    n_mels: int = Field(40, ge=4)  # mel bands (and MFCC's filterbank)
    n_mfcc: int = Field(20, ge=2)  # coefficients when features=mfcc
    n_fft: int = Field(256, ge=16)
    hop_length: int = Field(80, ge=1)  # 10 ms at 8 kHz
    max_seconds: float = Field(1.0, gt=0)  # clips are padded or cut to this length
    # standardize log-mel/MFCC with the train split's mean/std (per feature bin, one global pair, or none):
    # raw log-mel runs from about -13.8 (silence) to +5, and a missing clip (zeros) would look loud. Training
    # measures `stats` and the artifact's config.yaml keeps them, so serving applies the same transform.
    normalize: Literal["per_bin", "global", "none"] = "per_bin"
    stats: AudioStats | None = None  # filled in by training; leave unset


class DataConfig(Strict):
    path: str  # dataset root (folder with train/val/test files) or one Parquet/JSONL/CSV manifest
    modalities: list[Modality] = list(MODALITIES)  # which columns feed the model
    label_column: str = "label"
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # used only when the data has no val split
    # above this share of undecodable rows the run stops
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0)
    # where rejected rows go; default: <path>/rejects.jsonl or beside the manifest
    rejects_path: str | None = None
    read_parallelism: int = Field(-1, ge=-1)  # Ray Data read tasks; -1 = Ray's choice
    # memory: materialize the preprocessed splits in the object store once (every epoch reads tensors: small
    # data); none: stream them from the files every epoch (data larger than the object store); auto: memory
    # when the estimated preprocessed size fits the object store comfortably, else none (the log says which)
    cache: Literal["auto", "memory", "none"] = "auto"
    # local: a shuffle buffer in each worker (cheap; rows mix only within nearby blocks); global: the whole
    # train split re-shuffled every epoch (an all-to-all pass per epoch; seeded by `seed`)
    shuffle: Literal["local", "global"] = "local"
    image: ImagePreprocessConfig = ImagePreprocessConfig()
    text: TextPreprocessConfig = TextPreprocessConfig()
    audio: AudioPreprocessConfig = AudioPreprocessConfig()

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one modality is required")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate modality in {v}")
        return [m for m in MODALITIES if m in v]  # canonical order


# -------------------------------------------------------------------------------------------- model


class CnnImageEncoderConfig(Strict):
    name: Literal["cnn"] = "cnn"
    channels: list[int] = [32, 64]  # conv widths; the classic Conv(32)-Conv(64)-Flatten baseline
    dim: int = Field(128, ge=1)  # output embedding size
    dropout: float = Field(0.1, ge=0, lt=1)


class ResnetImageEncoderConfig(Strict):
    name: Literal["resnet"] = "resnet"
    arch: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"
    # None (random init), a local .pt/.safetensors file, or a torchvision weights name
    weights: str | None = None
    freeze: bool = False
    dim: int | None = None  # project to this size; None keeps the backbone's width


class HfEncoderConfig(Strict):
    name: Literal["hf"] = "hf"
    pretrained: str  # Hugging Face hub name, local folder, or pkg:PACKAGE/FOLDER (in an installed package)
    freeze: bool = True  # no gradients into the backbone; frozen encoders' embeddings are cached (train.*)
    dim: int | None = None  # project to this size; None keeps the hidden size


class RnnTextEncoderConfig(Strict):
    name: Literal["lstm"] = "lstm"
    cell: Literal["lstm", "gru"] = "lstm"
    embed_dim: int = Field(64, ge=1)
    hidden: int = Field(128, ge=1)
    layers: int = Field(1, ge=1)
    bidirectional: bool = True
    dim: int = Field(128, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)


class TransformerTextEncoderConfig(Strict):
    name: Literal["transformer"] = "transformer"
    dim: int = Field(128, ge=8)  # model width = output size
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    ffn_mult: int = Field(4, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)


class CnnAudioEncoderConfig(Strict):
    name: Literal["cnn"] = "cnn"
    channels: list[int] = [32, 64]
    dim: int = Field(128, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)


ImageEncoderConfig = Annotated[
    CnnImageEncoderConfig | ResnetImageEncoderConfig | HfEncoderConfig, Field(discriminator="name")
]
TextEncoderConfig = Annotated[
    RnnTextEncoderConfig | TransformerTextEncoderConfig | HfEncoderConfig, Field(discriminator="name")
]
AudioEncoderConfig = Annotated[CnnAudioEncoderConfig | HfEncoderConfig, Field(discriminator="name")]


class EncodersConfig(Strict):
    image: ImageEncoderConfig = CnnImageEncoderConfig()
    text: TextEncoderConfig = RnnTextEncoderConfig()
    audio: AudioEncoderConfig = CnnAudioEncoderConfig()


class FusionConfig(Strict):
    # the fusion operator
    name: Literal["concat", "attention", "gated", "tensor", "low_rank", "late"] = "concat"
    dim: int = Field(128, ge=1)  # fused representation size
    hidden: int = Field(256, ge=1)  # MLP width after fusion
    heads: int = Field(4, ge=1)  # attention fusion
    rank: int = Field(4, ge=1)  # low_rank fusion
    # tensor fusion: per-modality size before the outer product ((d+1)^M features)
    tensor_dim: int = Field(16, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)


class ModelConfig(Strict):
    encoders: EncodersConfig = EncodersConfig()  # only the modalities in data.modalities are built
    fusion: FusionConfig = FusionConfig()
    # train-time probability of hiding a modality per sample; modalities not in data.modalities are ignored
    modality_dropout: dict[Modality, Annotated[float, Field(ge=0, lt=1)]] = {}


# ----------------------------------------------------------------------------------- optim and train


class OptimConfig(Strict):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd only
    scheduler: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)  # max global grad norm; None disables
    # learning rate of the encoders; None = lr. A mapping sets it per modality ({image: 1e-3}; unlisted: lr).
    # The fusion operator and the head always use lr.
    encoder_lr: Annotated[float, Field(gt=0)] | dict[Modality, Annotated[float, Field(gt=0)]] | None = None
    # none: plain cross-entropy; balanced: class c weighs n_train / (n_classes * count_c) (imbalanced labels)
    class_weights: Literal["none", "balanced"] = "none"
    label_smoothing: float = Field(0.0, ge=0, lt=1)  # cross-entropy target smoothing (train loss only)


class TrainConfig(Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)  # per worker
    num_workers: int = Field(1, ge=1)  # Ray Train workers (DDP ranks)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)  # fractional on small machines so Ray Data keeps a CPU
    # auto = bf16 autocast on GPU, fp32 on CPU; fp16 = float16 autocast + GradScaler (GPUs without bf16)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    storage_path: str = "runs"  # run folders live here; multi-node runs need s3://, gs:// or NFS
    run_name: str | None = None  # stable name => re-running resumes; default derived from the config
    max_failures: int = Field(0, ge=0)  # worker-group restarts from the last checkpoint
    early_stopping_patience: int | None = Field(None, ge=1)  # epochs without val improvement before stopping
    metric: str = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    checkpoints_to_keep: int = Field(2, ge=1)
    artifact_dir: str | None = None  # default: <storage_path>/<run_name>/artifact
    # torch intra-op threads per worker; None = the CPUs each worker gets (all the machine's cores, shared by
    # the workers, when a local run's data is materialized: see train.trainer.worker_threads)
    num_threads: int | None = Field(None, ge=1)
    # experiment trackers rank 0 writes to: tensorboard (<run folder>/tensorboard), mlflow (train.mlflow_uri)
    tracking: list[Literal["tensorboard", "mlflow"]] = ["tensorboard"]
    mlflow_uri: str | None = None  # MLflow tracking URI (a server); default file:<storage_path>/mlruns
    # also every N optimizer steps: train_loss_step and lr_step (step = global step) beside the per-epoch
    # scalars; 0 = per epoch only
    log_every_n_steps: int = Field(50, ge=0)
    # auto: when every encoder is frozen, embed each split once (Ray Data batch inference) into
    # <storage_path>/embedding_cache/<key> and train the head on the embeddings (reused by later runs and Tune
    # trials; a new key, i.e. other weights, preprocessing or data files, builds anew). off: encode every step
    embedding_cache: Literal["auto", "off"] = "auto"
    # cache folders kept per encoder (same weights), the most recently used; older ones are deleted when a run
    # uses the cache (never one used in the last 10 minutes); None keeps them all
    embedding_cache_keep: int | None = Field(3, ge=1)

    @field_validator("embedding_cache", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML reads a bare `off` (file or key=value override) as false


class TuneConfig(Strict):
    # dotted config key -> distribution: {choice: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]},
    # {randint: [lo, hi]} (hi exclusive), {grid: [...]} (every value, times num_samples)
    space: dict[str, dict[str, Any]]
    search: Literal["random", "optuna"] = "random"  # optuna: TPE over the finished trials' results
    scheduler: Literal["asha", "none"] = "asha"  # asha stops trials that fall behind at each rung
    num_samples: int = Field(8, ge=1)  # trials (with grid: repeats of the whole grid)
    max_concurrent_trials: int = Field(1, ge=1)  # = cluster capacity // one trial's workers
    metric: str | None = None  # default: train.metric
    mode: Literal["max", "min"] | None = None  # default: train.mode
    grace_period: int = Field(1, ge=1)  # epochs every trial gets before ASHA may stop it
    reduction_factor: int = Field(2, ge=2)  # ASHA keeps the top 1/reduction_factor at each rung
    name: str | None = None  # experiment name under train.storage_path; stable => re-running resumes
    artifact_dir: str | None = None  # the best trial's artifact; default <storage>/<name>/best_artifact
    trial_cpus: float = Field(0.1, gt=0)  # the trial driver's own reservation (its workers reserve their own)


class ExperimentConfig(Strict):
    seed: int = 0
    data: DataConfig
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    tune: TuneConfig | None = None  # only `mmfusion tune` reads it



# ------------------------------------------------------------------------------------------ loading


def read_yaml(path: str | Path) -> dict[str, Any]:
    """An experiment YAML as a dict, its `base:` files merged in (see mmfusion.config_merge)."""
    return config_merge.read_yaml(path, root=ExperimentConfig)


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Dotted `key=value` overrides applied to a raw experiment dict (see mmfusion.config_merge)."""
    return config_merge.apply_overrides(raw, overrides, root=ExperimentConfig)


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                base_dir: str | Path | None = None,
                ) -> ExperimentConfig:
    """Read an experiment YAML (or start empty when path is None), apply overrides, validate.

    Relative `data.path`, `train.storage_path` and `train.artifact_dir` stay as written: they are resolved
    against the current directory by the code that opens them (the CLI makes them absolute before Ray).
    """
    raw = read_yaml(path) if path is not None else {}
    return validate_config(apply_overrides(raw, overrides), source=str(path) if path else "<overrides>")


def validate_config(raw: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"invalid config {source}:\n" + format_validation_error(e, ExperimentConfig, raw)
                          ) from None


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# ----------------------------------------------------------------------------------- error messages


def format_validation_error(err: ValidationError, root: type[BaseModel], data: Any = None) -> str:
    """One line per error, keyed by its dotted path; an unknown key lists the keys allowed at its place
    (found by walking `data`, the validated input, against `root`)."""
    allowed = dict(unknown_key_paths(data, root))
    lines = []
    for e in err.errors():
        loc = [str(x) for x in e["loc"]]
        shown = [p for p in loc if p not in _TAGS]  # drop discriminated-union tags ("cnn", "hf", ...)
        key = ".".join(shown) or "<root>"
        if e["type"] == "extra_forbidden":
            hint = f"; allowed keys here: {', '.join(allowed[key])}" if allowed.get(key) else ""
            lines.append(f"  {key}: unknown key{hint}")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            got = repr(e.get("input"))
            lines.append(f"  {key}: {e['msg']}" + (f" (got {got})" if len(got) <= 80 else ""))
    return "\n".join(lines)


# encoder `name` tags that pydantic puts in error locations
_TAGS = {"cnn", "resnet", "hf", "lstm", "transformer"}


def unknown_keys(data: Any, model: type[BaseModel]) -> list[str]:
    """Every key in `data` (recursively) that is not a field (or alias) of the pydantic model at its place,
    as "dotted.path (allowed here: a, b)". For models that ignore unknown keys, such as Ray Serve's schema."""
    return [f"{path} (allowed here: {', '.join(keys)})" for path, keys in unknown_key_paths(data, model)]


def unknown_key_paths(data: Any, model: type[BaseModel], path: str = "") -> list[tuple[str, list[str]]]:
    """The one walker over pydantic annotations: [(dotted path of an unknown key, the keys allowed there)].

    A discriminated union (the encoders' `name`) is followed into the member the data's `name` selects; any
    other union into its first pydantic model (Serve's `Union[Dict, AutoscalingConfig]` is checked as the
    model). Lists and dict values are followed into their item type.
    """
    if not isinstance(data, dict):
        return []
    fields = model.model_fields
    by_alias = {f.alias: name for name, f in fields.items() if f.alias}
    out: list[tuple[str, list[str]]] = []
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        name = key if key in fields else by_alias.get(key)
        if name is None:
            out.append((where, list(fields)))
        else:
            out += _walk(value, fields[name].annotation, where)
    return out


def _walk(value: Any, annotation: Any, path: str) -> list[tuple[str, list[str]]]:
    options = _expand(annotation)
    models = [t for t in options if isinstance(t, type) and issubclass(t, BaseModel)]
    if models:
        tag = value.get("name") if isinstance(value, dict) else None
        chosen = [m for m in models if "name" in m.model_fields
                  and tag in typing.get_args(m.model_fields["name"].annotation)]
        return unknown_key_paths(value, (chosen or models)[0], path)
    for t in options:
        origin, args = typing.get_origin(t), typing.get_args(t)
        if origin in (list, tuple, set) and isinstance(value, list) and args:
            return [k for i, v in enumerate(value) for k in _walk(v, args[0], f"{path}[{i}]")]
        if origin is dict and isinstance(value, dict) and len(args) == 2:
            return [k for key, v in value.items() for k in _walk(v, args[1], f"{path}.{key}")]
    return []
