"""`mmfusion model summary CONFIG`: parameters per part and forward FLOPs per sample.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode` over one forward pass of a single sample at the
configured input sizes, every modality present and the text at its full `max_length`: 2 x the multiply-adds
of matmuls, convolutions and attention. Elementwise work (activations, norms, pooling) is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mmfusion.batch import InputSpec
from mmfusion.config import ExperimentConfig
from mmfusion.models.model import FusionModel, build_model

ASSUMED_CLASSES = 10  # when the dataset is not there to count its labels (AVT-Digits has ten)


@dataclass(frozen=True)
class PartStats:
    params: int
    trainable: int
    flops: int  # forward FLOPs per sample


def example_batch(spec: InputSpec, batch_size: int = 1, seed: int = 0) -> dict[str, Tensor]:
    """A random batch in the collated contract, every modality present, text at full length."""
    g = torch.Generator().manual_seed(seed)
    b = batch_size
    batch: dict[str, Tensor] = {}
    if "image" in spec.modalities:
        batch["image"] = torch.randn(b, *spec.image_shape, generator=g)
    if "text" in spec.modalities:
        ids = torch.randint(0, spec.vocab_size, (b, spec.max_text_len), generator=g)
        batch["text"] = torch.where(ids == spec.pad_id, (ids + 1) % spec.vocab_size, ids)  # no padding
        batch["text_mask"] = torch.ones(b, spec.max_text_len, dtype=torch.long)
    if "audio" in spec.modalities:
        batch["audio"] = torch.randn(b, *spec.audio_shape, generator=g)
    batch["present"] = torch.ones(b, len(spec.modalities), dtype=torch.bool)
    return batch


def part_names(model: FusionModel) -> list[str]:
    return [f"encoders.{m}" for m in model.modalities] + ["fusion", "head"]


def count_parts(model: FusionModel, spec: InputSpec) -> dict[str, PartStats]:
    """Parameters (all / trainable) and forward FLOPs per sample of each part, plus "total"."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
        return sdpa_flop_count(query, key, value)

    # The CPU kernel of scaled_dot_product_attention is missing from torch's FLOP registry.
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa_flops}
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter, torch.no_grad():
        model(example_batch(spec, batch_size=1))
    model.train(was_training)
    counts = counter.get_flop_counts()
    root = type(model).__name__

    def flops(prefix: str) -> int:
        return int(sum(counts.get(prefix, {}).values()))

    out: dict[str, PartStats] = {}
    for name in part_names(model):
        module = model.get_submodule(name)
        params = list(module.parameters())
        out[name] = PartStats(sum(p.numel() for p in params),
                              sum(p.numel() for p in params if p.requires_grad),
                              flops(f"{root}.{name}"))
    params = list(model.parameters())
    out["total"] = PartStats(sum(p.numel() for p in params),
                             sum(p.numel() for p in params if p.requires_grad),
                             flops("Global"))
    return out


def num_classes_of(cfg: ExperimentConfig) -> tuple[int, str]:
    """The label count of the configured dataset, read from its label column, else ASSUMED_CLASSES."""
    path = cfg.data.path
    if "://" not in path and not Path(path).exists():
        return ASSUMED_CLASSES, f"assumed: no dataset at {path}"
    from mmfusion.data import readers

    labels = readers.summarize(path, label_column=cfg.data.label_column).labels
    if not labels:
        return ASSUMED_CLASSES, f"assumed: {path} has no labels"
    return len(labels), f"from {path}"


def summarize(cfg: ExperimentConfig, num_classes: int | None = None) -> str:
    """A text table: parameters and trainable parameters per part, forward FLOPs per sample."""
    from mmfusion.data.preprocessor import input_spec

    spec = input_spec(cfg.data)
    if num_classes is None:
        num_classes, where = num_classes_of(cfg)
    else:
        where = "given"
    model = build_model(cfg.model, spec, num_classes, load_weights=False)  # architecture only: no downloads
    stats = count_parts(model, spec)

    enc = ", ".join(f"{m}={getattr(cfg.model.encoders, m).name}" for m in spec.modalities)
    inputs = []
    if "image" in spec.modalities:
        inputs.append(f"image {spec.image_shape}")
    if "text" in spec.modalities:
        inputs.append(f"text {spec.max_text_len} tokens (vocab {spec.vocab_size})")
    if "audio" in spec.modalities:
        inputs.append(f"audio {spec.audio_shape}")
    lines = [
        f"model: encoders {enc}; fusion {cfg.model.fusion.name}; {num_classes} classes ({where})",
        f"inputs per sample: {', '.join(inputs)}",
        "",
        f"{'part':<16}{'params':>14}{'trainable':>14}{'FLOPs/sample':>18}{'':>10}",
    ]
    for name, s in stats.items():
        if name == "total":
            lines.append("-" * 72)
        lines.append(f"{name:<16}{s.params:>14,}{s.trainable:>14,}{s.flops:>18,}{_human(s.flops):>10}")
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
