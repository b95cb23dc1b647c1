"""Audio preprocessing: encoded bytes -> log-mel or MFCC frames. `audio_batch` is the one kernel; Ray Data
(via the Preprocessor) and Serve (the encoder replicas) both call it. torchaudio is imported when first used.

    audio bytes -> soundfile decode -> mono -> torchaudio resample -> pad/crop -> log-mel or MFCC
                -> standardized with the train split's mean/std (data.audio.stats) -> float32 (1, F, T)

The statistics are measured by the Ray Data pass of training (mmfusion.data.pipeline) and kept in the
artifact's config, so training, evaluation and serving apply the same `standardize`. A missing clip is all
zeros after standardization: the train mean, not a "loud" block of raw zeros.
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mmfusion.config import AudioPreprocessConfig, AudioStats
from mmfusion.errors import ConfigError, DecodeError

LOG_EPS = 1e-6  # log-mel floor: log(x + eps) keeps silence finite (about -13.8)
STD_FLOOR = 0.1  # smallest std used (log-mel nats, MFCC dB): a bin that never varies on train is not blown up


def audio_num_samples(cfg: AudioPreprocessConfig) -> int:
    return max(1, int(round(cfg.max_seconds * cfg.sample_rate)))


def audio_num_frames(cfg: AudioPreprocessConfig) -> int:
    return audio_num_samples(cfg) // cfg.hop_length + 1  # torchaudio's spectrograms use center=True


def audio_num_features(cfg: AudioPreprocessConfig) -> int:
    return cfg.n_mfcc if cfg.features == "mfcc" else cfg.n_mels


def decode_audio(data: Any, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Encoded WAV/FLAC/OGG bytes -> (mono float32 samples (n,), sample rate). Reads at most max_seconds."""
    import soundfile as sf

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError("audio", f"expected encoded audio bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise DecodeError("audio", "empty (0 bytes)")
    try:
        with sf.SoundFile(io.BytesIO(bytes(data))) as f:
            sr = int(f.samplerate)
            frames = f.frames
            if max_seconds is not None:
                frames = min(frames, int(math.ceil(max_seconds * sr)))
            wav = f.read(frames, dtype="float32", always_2d=True)  # (n, channels)
    except sf.LibsndfileError as e:
        raise DecodeError("audio", f"undecodable ({e.error_string})") from None
    except (RuntimeError, ValueError, TypeError, EOFError) as e:
        raise DecodeError("audio", f"undecodable ({e})") from None
    if wav.shape[0] == 0:
        raise DecodeError("audio", "zero-length audio (no samples)")
    if sr <= 0:
        raise DecodeError("audio", f"invalid sample rate {sr}")
    return wav.mean(axis=1), sr


@functools.lru_cache(maxsize=8)
def feature_transform(features: str, sample_rate: int, n_fft: int, hop_length: int, n_mels: int, n_mfcc: int,
                       ) -> torch.nn.Module:
    import torchaudio.transforms as T

    mel_kwargs = {"n_fft": n_fft, "hop_length": hop_length, "n_mels": n_mels}
    try:
        with warnings.catch_warnings():
            # empty mel filters at tiny n_fft: still finite via eps
            warnings.simplefilter("ignore", UserWarning)
            if features == "mfcc":
                return T.MFCC(sample_rate=sample_rate, n_mfcc=n_mfcc, melkwargs=mel_kwargs)  # dB with a floor
            return T.MelSpectrogram(sample_rate=sample_rate, **mel_kwargs)
    except ValueError as e:
        raise ConfigError(f"data.audio: {e}") from None


def _features(waves: torch.Tensor, cfg: AudioPreprocessConfig) -> torch.Tensor:
    """float32 (N, S) -> (N, F, T)."""
    tf = feature_transform(cfg.features, cfg.sample_rate, cfg.n_fft, cfg.hop_length, cfg.n_mels, cfg.n_mfcc)
    with torch.no_grad():
        feats = tf(waves)
    if cfg.features == "logmel":
        feats = torch.log(feats + LOG_EPS)
    return feats


def check_stats(cfg: AudioPreprocessConfig) -> None:
    """ConfigError unless data.audio.stats fit the features: F values (or 1), positive stds."""
    s = cfg.stats
    if s is None:
        return
    f = audio_num_features(cfg)
    if len(s.mean) not in (1, f) or len(s.std) != len(s.mean) or any(not v > 0 for v in s.std):
        raise ConfigError(f"data.audio.stats must hold 1 or {f} means and as many positive stds "
                          f"(got {len(s.mean)} and {len(s.std)}); training measures them: leave them unset")


def standardize(features: np.ndarray, present: np.ndarray, stats: AudioStats | None) -> np.ndarray:
    """(N, 1, F, T) raw features -> (x - mean) / std per feature bin (or globally), float32. Rows that are
    not present (missing or undecodable) are 0, the standardized mean. No stats: the features unchanged."""
    if stats is None:
        return features
    mean = np.asarray(stats.mean, np.float32).reshape(1, 1, -1, 1)  # (1, 1, F or 1, 1)
    std = np.asarray(stats.std, np.float32).reshape(1, 1, -1, 1)
    out = np.zeros_like(features)
    out[present] = (features[present] - mean) / std
    return out


def fit_stats(count: int, sums: np.ndarray, squares: np.ndarray, normalize: str) -> AudioStats:
    """AudioStats from moments over `count` frames: `sums` and `squares` (F,) are per-bin sums of x and x^2
    (float64). normalize "per_bin": F means and stds; "global": one of each."""
    if normalize == "global":
        count, sums, squares = count * len(sums), sums.sum(keepdims=True), squares.sum(keepdims=True)
    mean = sums / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return AudioStats(mean=[float(x) for x in mean], std=[float(x) for x in np.maximum(std, STD_FLOOR)])


def audio_batch(values: Sequence[Any], cfg: AudioPreprocessConfig) -> tuple[np.ndarray, list[str | None]]:
    """Decode, resample, pad/crop, featurize, standardize (data.audio.stats); None entries skipped (zeros).
    -> float32 (N, 1, F, T), errors."""
    import torchaudio.functional as AF

    n_samples = audio_num_samples(cfg)
    out = np.zeros((len(values), 1, audio_num_features(cfg), audio_num_frames(cfg)), dtype=np.float32)
    errors: list[str | None] = [None] * len(values)
    rows, waves = [], []
    for i, v in enumerate(values):
        if v is None:
            continue
        try:
            wav, sr = decode_audio(v, cfg.max_seconds)
        except DecodeError as e:
            errors[i] = e.reason
            continue
        w = torch.from_numpy(wav)
        if sr != cfg.sample_rate:
            w = AF.resample(w, sr, cfg.sample_rate)
        w = w[:n_samples]
        if w.numel() < n_samples:
            w = torch.nn.functional.pad(w, (0, n_samples - w.numel()))  # silence at the end
        rows.append(i)
        waves.append(w)
    if rows:
        feats = _features(torch.stack(waves), cfg)  # (n, F, T), one vectorised call
        finite = torch.isfinite(feats).flatten(1).all(dim=1)
        for j, i in enumerate(rows):
            if not finite[j]:
                errors[i] = "non-finite features (the decoded samples contain NaN or inf)"
            else:
                out[i, 0] = feats[j].numpy()
    present = np.array([v is not None and e is None for v, e in zip(values, errors, strict=True)], dtype=bool)
    return standardize(out, present, cfg.stats), errors


def preprocess_audio(data: bytes, cfg: AudioPreprocessConfig) -> np.ndarray:
    """One encoded clip -> float32 (1, F, T). DecodeError on empty, zero-length, undecodable or non-finite."""
    out, errors = audio_batch([data], cfg)
    if errors[0] is not None:
        raise DecodeError("audio", errors[0])
    return out[0]
