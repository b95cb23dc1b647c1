"""Audio encoders: `(B, 1, F, T)` float32 log-mel or MFCC frames -> `(B, D)`.

    CnnAudioEncoder  per-clip standardization, then the conv stack (Conv-BN-ReLU-MaxPool per stage), a Linear
    HfAudioEncoder   a Hugging Face Audio Spectrogram Transformer (ASTModel) over the same features

Which Hugging Face audio models fit: our pipeline hands the model spectrogram features, not waveforms, so
raw-waveform models (wav2vec2, HuBERT, WavLM) cannot be used here. AST takes exactly what we produce,
`input_values` of shape (B, T, F) with F = `num_mel_bins`: set data.audio.n_mels (or n_mfcc) to the model's
num_mel_bins. Time is zero-padded or cut to the model's `max_length` frames. Pretrained AST checkpoints were
trained on 128 Kaldi fbank bins at 16 kHz with a 10 ms hop, normalized with mean -4.27 / std 4.57; features
made differently still work as input, but plan to fine-tune (freeze: false) rather than use them frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfusion.errors import ConfigError
from mmfusion.models.encoders import (
    ConvStack,
    FrozenBackboneMixin,
    hf_pooled,
    load_hf_model,
)

AST_MODEL_TYPE = "audio-spectrogram-transformer"


class CnnAudioEncoder(nn.Module):
    """`(B, 1, F, T) -> (B, dim)`: InstanceNorm over each clip's F x T, then `ConvStack`.

    The per-clip standardization makes the CNN indifferent to the log scale (natural log vs dB, MFCC
    ranges) and, unlike BatchNorm, mixes no statistics across rows: a missing clip never affects another.
    """

    def __init__(self, in_shape: tuple[int, int, int], channels: list[int], dim: int = 128,
                 dropout: float = 0.1) -> None:
        super().__init__()
        c, f, t = in_shape
        self.norm = nn.InstanceNorm2d(c, affine=False, track_running_stats=False)
        self.net = ConvStack(c, (f, t), channels, dim, dropout)
        self.out_dim = dim

    def forward(self, audio: Tensor) -> Tensor:  # (B, 1, F, T) -> (B, dim)
        return self.net(self.norm(audio))


class HfAudioEncoder(FrozenBackboneMixin):
    """A Hugging Face Audio Spectrogram Transformer (hub name or local folder): `(B, 1, F, T) -> (B, D)`.

    The embedding is AST's pooled output (the mean of its CLS and distillation tokens after the final
    LayerNorm), optionally projected to `dim`. See the module docstring for which features it expects.
    """

    def __init__(self, name_or_path: str, in_shape: tuple[int, int, int], freeze: bool = True,
                 dim: int | None = None, load_weights: bool = True) -> None:
        super().__init__()
        self.backbone = load_hf_model(name_or_path, pretrained=load_weights)
        cfg = self.backbone.config
        if cfg.model_type != AST_MODEL_TYPE:
            raise ConfigError(
                f"hf audio encoder {name_or_path!r} is a {cfg.model_type!r} model; only Audio Spectrogram "
                "Transformers (ASTModel) are supported: our audio features are log-mel/MFCC frames, which "
                "raw-waveform models such as wav2vec2 or HuBERT cannot take")
        _, f, _ = in_shape
        if f != cfg.num_mel_bins:
            raise ConfigError(f"audio features have {f} bins but {name_or_path!r} takes num_mel_bins="
                              f"{cfg.num_mel_bins}; set data.audio.n_mels (or n_mfcc) to {cfg.num_mel_bins}")
        self.frames = int(cfg.max_length)  # AST's position embeddings fix the number of time frames
        self.setup_head(name_or_path, dim, freeze, lambda: self._backbone(torch.zeros(2, *in_shape)))

    def _backbone(self, audio: Tensor) -> Tensor:  # (B, 1, F, T) -> (B, hidden)
        x = audio.squeeze(1).transpose(1, 2)  # (B, T, F): AST's input_values layout
        t = x.shape[1]
        if t < self.frames:
            x = F.pad(x, (0, 0, 0, self.frames - t))
        elif t > self.frames:
            x = x[:, : self.frames]
        return hf_pooled(self.backbone(input_values=x))
