"""`mmfusion init DATA`: a starter experiment YAML derived from what the data holds.

    profile = profile_dataset(DATA)                # mmfusion.data.profile: sizes, rates, lengths, balance
    text = starter_config(profile)                 # YAML; every chosen value commented with its statistic

The choices are plain rules, written out below so that a user can see why a value is what it is. The result
validates as an ExperimentConfig and trains without edits; it is a start, not a search (see `mmfusion tune`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import yaml

from mmfusion.data.profile import DatasetProfile, percentile, pixel_stats, round_up
from mmfusion.errors import DataError

log = logging.getLogger(__name__)

MIN_PRESENT = 0.05  # a modality present in fewer rows than this is left out of the model
MAX_IMAGE_SIDE = 64  # from-scratch CNNs on a CPU: larger inputs cost time, rarely accuracy, on small data
MAX_AUDIO_SECONDS = 10.0
MAX_TEXT_TOKENS = 256
IMBALANCE_FOR_WEIGHTS = 3.0  # largest/smallest class above this: weight the loss by inverse frequency
Line = tuple[int, str, Any, str]  # (indent level, key, value or None for a section, comment)


def starter_config(p: DatasetProfile, data_path: str | None = None) -> str:
    """The experiment YAML for the profiled dataset, as text with a comment on every derived value."""
    mods = [m for m in p.columns if p.share(m) >= MIN_PRESENT]
    if not mods:
        raise DataError(f"{p.path}: no image, text or audio field is filled in at least {MIN_PRESENT:.0%} of "
                        "the rows; nothing to train on")
    dropped = [m for m in p.columns if m not in mods]
    lines: list[Line] = [
        (0, "seed", 0, "one seed for model init, shuffling and modality dropout"),
        (0, "data", None, ""),
        (1, "path", data_path or p.path, f"{sum(p.rows.values())} rows: "
         + ", ".join(f"{s} {n}" for s, n in p.rows.items())),
        (1, "modalities", mods, "present in " + ", ".join(f"{m} {p.share(m):.0%}" for m in p.columns)
         + (f" of rows; {', '.join(dropped)} below {MIN_PRESENT:.0%} is left out" if dropped
            else " of rows")),
    ]
    if "val" not in p.rows:
        lines.append((1, "val_fraction", 0.1, "no val split in the data: hold out 10% of train, by id"))
    lines += _image(p) if "image" in mods else []
    lines += _text(p) if "text" in mods else []
    lines += _audio(p) if "audio" in mods else []
    lines += _model(p, mods)
    lines += _optim(p)
    lines += _train(p)
    return _render(lines, p)


def _image(p: DatasetProfile) -> list[Line]:
    im = p.image
    short = im.short_side
    size = int(min(MAX_IMAGE_SIDE, max(16, round(short / 4) * 4)))
    channels = 1 if im.grayscale else 3
    mean, std = pixel_stats(im, size, channels)
    mode_note = ", ".join(f"{k} {v}" for k, v in im.modes.most_common(3))
    out: list[Line] = [
        (1, "image", None, ""),
        (2, "size", size, f"median short side {short:.0f} px (range {min(im.widths + im.heights)}-"
         f"{max(im.widths + im.heights)}); capped at {MAX_IMAGE_SIDE} for a from-scratch CNN"),
        (2, "channels", channels, f"modes: {mode_note}" + ("; all grayscale" if channels == 1 else "")),
        (2, "mean", mean, f"pixel mean per channel over {len(im.samples)} decoded images"),
        (2, "std", std, "pixel std per channel, same sample: inputs become about zero-mean, unit-variance"),
    ]
    if im.alpha:
        out.insert(3, (2, "background", [255, 255, 255] if channels == 3 else [255],
                       f"{im.alpha / im.count:.0%} of images have alpha: "
                       "transparent pixels become this colour"))
    return out


def _text(p: DatasetProfile) -> list[Line]:
    tx = p.text
    p95 = percentile(tx.utf8_bytes, 95)
    max_len = int(min(MAX_TEXT_TOKENS, max(8, round_up(p95 + 1, 8))))
    scripts = ", ".join(f"{k} {v / tx.count:.0%}" for k, v in tx.scripts.most_common(3))
    return [
        (1, "text", None, ""),
        (2, "tokenizer", "builtin", f"UTF-8 bytes: any script, no download (scripts: {scripts})"),
        (2, "max_length", max_len, f"95th percentile text {p95:.0f} UTF-8 bytes, +1 for the start token"),
    ]


def _audio(p: DatasetProfile) -> list[Line]:
    au = p.audio
    median_rate = percentile(list(au.rates.elements()), 50)
    rate = 16000 if median_rate >= 16000 else 8000
    p95 = percentile(au.seconds, 95)
    seconds = float(min(MAX_AUDIO_SECONDS, max(0.5, round_up(p95, 0.5))))
    n_fft, hop, n_mels = (512, 160, 64) if rate == 16000 else (256, 80, 40)
    rates = ", ".join(f"{k} Hz {v / au.count:.0%}" for k, v in au.rates.most_common(3))
    chans = ", ".join(f"{k} ch {v / au.count:.0%}" for k, v in au.channels.most_common(2))
    return [
        (1, "audio", None, ""),
        (2, "sample_rate", rate, f"clips at {rates} ({chans}; mixed down to mono)"),
        (2, "features", "logmel", "log-mel, standardized with statistics of the train split"),
        (2, "n_mels", n_mels, f"mel bands for {rate // 1000} kHz speech"),
        (2, "n_fft", n_fft, f"{n_fft / rate * 1000:.0f} ms windows"),
        (2, "hop_length", hop, f"{hop / rate * 1000:.0f} ms hop"),
        (2, "max_seconds", seconds, f"95th percentile clip length {p95:.2f} s (max {max(au.seconds):.2f} s)"),
    ]


def _model(p: DatasetProfile, mods: list[str]) -> list[Line]:
    lines: list[Line] = [(0, "model", None, ""), (1, "encoders", None, "")]
    if "image" in mods:
        deep = p.image.short_side > 32
        channels = [16, 32, 64] if deep else [32, 64]
        lines.append((2, "image", {"name": "cnn", "channels": channels, "dim": 128},
                      "three narrow conv blocks above 32 px (FLOPs grow with pixels), two below"))
    if "text" in mods:
        lines.append((2, "text", {"name": "lstm", "embed_dim": 64, "hidden": 128, "dim": 128},
                      "a byte-level BiLSTM: robust to spelling and script"))
    if "audio" in mods:
        lines.append((2, "audio", {"name": "cnn", "channels": [16, 32, 64], "dim": 128},
                      "a narrow CNN over log-mel frames: a CPU trains it in minutes"))
    lines += [(1, "fusion", {"name": "concat", "dim": 128, "hidden": 256, "dropout": 0.2},
               "concat + MLP: the strong, cheap baseline; try gated or attention with `mmfusion tune`")]
    if len(mods) > 1:
        missing = {m: 1 - p.share(m) for m in mods}
        lines.append((1, "modality_dropout", {m: 0.1 for m in mods},
                      "hide each modality from 10% of rows so the head copes when one is absent "
                      "(missing now: "
                      + ", ".join(f"{m} {v:.0%}" for m, v in missing.items()) + ")"))
    return lines


def _optim(p: DatasetProfile) -> list[Line]:
    balanced = p.imbalance > IMBALANCE_FOR_WEIGHTS
    return [
        (0, "optim", None, ""),
        (1, "name", "adamw", ""),
        (1, "lr", 1.0e-3, "AdamW's usual start for small encoders trained from scratch"),
        (1, "weight_decay", 1.0e-4, ""),
        (1, "scheduler", "cosine", "decays to zero by the last epoch"),
        (1, "warmup_epochs", 1.0, "a gentle first epoch for freshly initialised encoders"),
        (1, "class_weights", "balanced" if balanced else "none",
         f"largest/smallest class {p.imbalance:.1f}x (majority {p.majority_share:.1%})"
         + (f": above {IMBALANCE_FOR_WEIGHTS:g}x, weight rare classes up" if balanced
            else ": balanced enough")),
        (1, "label_smoothing", 0.1 if balanced else 0.0, "softer targets help with few, noisy rare-class rows"
         if balanced else "none needed"),
        (1, "grad_clip", 1.0, "guards the LSTM against exploding gradients"),
    ]


def _train(p: DatasetProfile) -> list[Line]:
    train_rows = p.rows.get("train", sum(p.rows.values()))
    epochs = int(min(30, max(10, math.ceil(40_000 / max(train_rows, 1)))))
    balanced = p.imbalance > IMBALANCE_FOR_WEIGHTS
    metric = "val_macro_f1" if balanced else "val_accuracy"
    return [
        (0, "train", None, ""),
        (1, "epochs", epochs, f"{train_rows} train rows: about {epochs * train_rows:,} samples seen in all"),
        (1, "batch_size", 64, "per worker"),
        (1, "num_workers", 1, "DDP ranks; raise on a cluster (and set use_gpu)"),
        (1, "cpus_per_worker", 1.0, "CPUs Ray reserves per worker; its torch threads fill idle cores"),
        (1, "storage_path", "runs", "run folders (checkpoints, artifact); s3:// or NFS on many nodes"),
        (1, "early_stopping_patience", 5, "stop after 5 epochs without a better val metric"),
        (1, "metric", metric, "macro-F1 counts every class equally: accuracy flatters a majority-class model"
         if balanced else "classes are balanced enough for accuracy"),
        (1, "mode", "max", ""),
    ]


def _render(lines: list[Line], p: DatasetProfile) -> str:
    out = [f"# Starter config written by `mmfusion init` from {p.scanned} {p.scanned_split} rows of "
           f"{p.path}.",
           "# Each value's comment names the statistic that chose it. Train it with:",
           "#   mmfusion train THIS_FILE", ""]
    for indent, key, value, comment in lines:
        head = "  " * indent + f"{key}:"
        if value is not None:
            head += " " + yaml.safe_dump(value, default_flow_style=True, width=1000, sort_keys=False,
                                         allow_unicode=True).strip().removesuffix("...").strip()
        out.append(f"{head:<34} # {comment}" if comment else head)
    return "\n".join(out) + "\n"


def write_starter_config(data: str, out: str | Path, label_column: str = "label",
                         force: bool = False) -> Path:
    """Profile `data`, write the starter YAML to `out`, and check that it validates."""
    from mmfusion.config import load_config
    from mmfusion.data.profile import profile_dataset
    from mmfusion.errors import ConfigError

    out = Path(out)
    if out.exists() and not force:
        raise ConfigError(f"{out} exists; pass --force to overwrite it")
    text = starter_config(profile_dataset(data, label_column), data_path=data)
    if label_column != "label":
        text = text.replace("\n  modalities:", f"\n  label_column: {label_column}\n  modalities:", 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    load_config(tmp)  # a config that does not validate is a bug here, not the user's problem
    tmp.replace(out)
    return out
