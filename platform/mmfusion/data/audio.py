"""Audio preprocessing: encoded bytes -> log-mel or MFCC frames. `audio_batch` is the one kernel; Ray Data
(via the Preprocessor) and Serve (the encoder replicas) both call it. torchaudio is imported when first used.

    audio bytes -> soundfile decode -> mono -> torchaudio resample -> pad/crop -> log-mel or MFCC
                -> standardized with the train split's mean/std (data.audio.stats) -> float32 (1, F, T)

Every decode has a budget fixed before a sample is read (docs/security.md): the container format
(AUDIO_FORMATS), the declared sample rate (MIN_SAMPLE_RATE..MAX_SAMPLE_RATE), the channel count
(MAX_CHANNELS) and the duration (max_seconds). Resampling cost is bounded too: torchaudio's sinc kernel has
new x (orig + 2 width) taps for the gcd-reduced rates, so a rate such as 10,001 Hz -> 8 kHz would build an
80-million-tap float64 kernel (1.3 GB). Above RESAMPLE_KERNEL_BUDGET taps the ratio is replaced by its best
rational approximation with terms <= RESAMPLE_MAX_TERMS (a rate error below 0.1%). Any failure while decoding
or resampling is a DecodeError naming the reason, never another exception.

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
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from mmfusion.config import AudioPreprocessConfig, AudioStats
from mmfusion.errors import ConfigError, DecodeError

MIN_SAMPLE_RATE = 1_000  # Hz; declared rates outside [MIN, MAX] are rejected before decoding
MAX_SAMPLE_RATE = 192_000
MAX_CHANNELS = 8  # more channels are rejected before decoding (they are averaged to mono anyway)
AUDIO_FORMATS = ("WAV", "WAVEX", "RF64", "FLAC", "OGG", "MP3", "AIFF")  # libsndfile's names; others rejected
RESAMPLE_KERNEL_BUDGET = 1 << 20  # sinc kernel taps (8 MiB in float64); above it the ratio is approximated
RESAMPLE_MAX_TERMS = 1000  # numerator and denominator of an approximated resampling ratio
LOG_EPS = 1e-6  # log-mel floor: log(x + eps) keeps silence finite (about -13.8)
STD_FLOOR = 0.1  # smallest std used (log-mel nats, MFCC dB): a bin that never varies on train is not blown up


def audio_num_samples(cfg: AudioPreprocessConfig) -> int:
    return max(1, int(round(cfg.max_seconds * cfg.sample_rate)))


def audio_num_frames(cfg: AudioPreprocessConfig) -> int:
    return audio_num_samples(cfg) // cfg.hop_length + 1  # torchaudio's spectrograms use center=True


def audio_num_features(cfg: AudioPreprocessConfig) -> int:
    return cfg.n_mfcc if cfg.features == "mfcc" else cfg.n_mels


def decode_audio(data: Any, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Encoded WAV/FLAC/OGG bytes -> (mono float32 samples (n,), sample rate). Reads at most max_seconds.

    The format, sample rate and channel count are checked from the header before any sample is decoded.
    DecodeError on empty, unknown, out-of-budget or undecodable bytes; never another exception."""
    import soundfile as sf

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError("audio", f"expected encoded audio bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise DecodeError("audio", "empty (0 bytes)")
    try:
        with sf.SoundFile(io.BytesIO(bytes(data))) as f:
            sr, fmt, channels = int(f.samplerate), str(f.format), int(f.channels)
            _check_header(fmt, sr, channels)
            frames = f.frames
            if max_seconds is not None:
                frames = min(frames, int(math.ceil(max_seconds * sr)))
            wav = f.read(frames, dtype="float32", always_2d=True)  # (n, channels)
    except DecodeError:
        raise
    except sf.LibsndfileError as e:
        raise DecodeError("audio", f"undecodable ({e.error_string})") from None
    except MemoryError:
        raise DecodeError("audio", "undecodable (out of memory while decoding)") from None
    except Exception as e:  # soundfile/libsndfile raise RuntimeError, ValueError, TypeError, EOFError, ...
        raise DecodeError("audio", f"undecodable ({type(e).__name__}: {e})") from None
    if wav.shape[0] == 0:
        raise DecodeError("audio", "zero-length audio (no samples)")
    return wav.mean(axis=1), sr


def _check_header(fmt: str, sr: int, channels: int) -> None:
    """DecodeError unless the header's format, sample rate and channel count are within the decode budget."""
    if fmt not in AUDIO_FORMATS:
        raise DecodeError("audio", f"unsupported audio format {fmt}; send one of {', '.join(AUDIO_FORMATS)}")
    if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
        raise DecodeError("audio", f"sample rate {sr} Hz is outside the accepted range "
                                   f"{MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz")
    if not 1 <= channels <= MAX_CHANNELS:
        raise DecodeError("audio", f"{channels} channels; at most {MAX_CHANNELS} are accepted")


def _kernel_taps(orig: int, new: int) -> int:
    """Size of torchaudio's sinc resampling kernel for gcd-reduced rates (lowpass_filter_width 6, rolloff
    0.99, its defaults): new x (orig + 2 width)."""
    width = math.ceil(6 * orig / (0.99 * min(orig, new)))
    return new * (orig + 2 * width)


def resample_ratio(sr: int, target: int) -> tuple[int, int]:
    """(orig, new) to hand torchaudio's resample for sr -> target: the gcd-reduced rates when their kernel
    fits RESAMPLE_KERNEL_BUDGET, else the closest ratio whose terms are <= RESAMPLE_MAX_TERMS."""
    g = math.gcd(sr, target)
    orig, new = sr // g, target // g
    if _kernel_taps(orig, new) <= RESAMPLE_KERNEL_BUDGET:
        return orig, new
    ratio = Fraction(target, sr)
    if ratio <= 1:
        approx = ratio.limit_denominator(RESAMPLE_MAX_TERMS)
    else:
        approx = 1 / (1 / ratio).limit_denominator(RESAMPLE_MAX_TERMS)
    return max(1, approx.denominator), max(1, approx.numerator)


def resample(wave: torch.Tensor, sr: int, target: int) -> torch.Tensor:
    """float32 (n,) at sr -> (m,) at target with a bounded kernel (resample_ratio). DecodeError on failure."""
    import torchaudio.functional as AF

    if sr == target:
        return wave
    orig, new = resample_ratio(sr, target)
    try:
        return AF.resample(wave, orig, new)
    except MemoryError:
        raise DecodeError("audio", f"cannot resample from {sr} Hz (out of memory)") from None
    except Exception as e:
        raise DecodeError("audio", f"cannot resample from {sr} Hz ({type(e).__name__}: {e})") from None


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


def audio_moments(batch: dict[str, np.ndarray], column: int) -> dict[str, np.ndarray]:
    """Ray Data task over preprocessed rows ("audio" (n, 1, F, T), "present" (n, M); audio is modality
    `column`): the frame count and per-bin sums of x and x^2 over the present clips, float64 -> one row, whose
    totals over the batches `fit_stats` takes."""
    x = np.asarray(batch["audio"])[np.asarray(batch["present"])[:, column], 0].astype(np.float64)  # (k, F, T)
    return {"count": np.array([x.shape[0] * x.shape[2]]), "sums": x.sum(axis=(0, 2))[None],
            "squares": np.square(x).sum(axis=(0, 2))[None]}


def apply_stats(batch: dict[str, np.ndarray], stats: AudioStats, column: int) -> dict[str, np.ndarray]:
    """Ray Data task: `standardize` a batch of preprocessed rows' "audio" (modality `column` of "present")."""
    batch["audio"] = standardize(np.asarray(batch["audio"]), np.asarray(batch["present"])[:, column], stats)
    return batch


def audio_batch(values: Sequence[Any], cfg: AudioPreprocessConfig) -> tuple[np.ndarray, list[str | None]]:
    """Decode, resample, pad/crop, featurize, standardize (data.audio.stats); None entries skipped (zeros).
    -> float32 (N, 1, F, T), errors."""
    n_samples = audio_num_samples(cfg)
    out = np.zeros((len(values), 1, audio_num_features(cfg), audio_num_frames(cfg)), dtype=np.float32)
    errors: list[str | None] = [None] * len(values)
    rows, waves = [], []
    for i, v in enumerate(values):
        if v is None:
            continue
        try:
            wav, sr = decode_audio(v, cfg.max_seconds)
            w = resample(torch.from_numpy(wav), sr, cfg.sample_rate)
        except DecodeError as e:
            errors[i] = e.reason
            continue
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
