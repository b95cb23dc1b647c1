"""AVT-Digits audio: espeak-ng synthesis (cached per build), clean-up, per-record noise and WAV encoding.

Every clip goes through the same clean-up (resample to 8 kHz mono, trim leading/trailing silence,
peak-normalize), whether it comes from espeak-ng (train/val) or from the real asterisk recordings (test). Each
record then gets its own seeded gain, time offset and background noise, so two records sharing a source clip
are never identical.
"""

from __future__ import annotations

import io
import logging
import subprocess
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from mmfusion.errors import DataError

log = logging.getLogger(__name__)

SAMPLE_RATE = 8000  # the held-out real recordings are telephone-band 8 kHz; everything is stored at this rate
_FRAME = 80  # 10 ms analysis frames at 8 kHz, for silence trimming
_TRIM_DB = 35.0  # frames more than 35 dB below the loudest frame count as silence
_TRIM_MARGIN = 2  # keep two frames (20 ms) of context on each side of the speech
_PEAK = 0.95  # peak level after normalization; per-record gain is applied on top


@dataclass(frozen=True, order=True)
class SynthConfig:
    """One espeak-ng voice setting; a clip is cached per (voice, rate, pitch, digit)."""

    voice: str  # espeak-ng voice, optionally with a variant: "es", "en-gb+f3"
    rate: int  # words per minute (-s)
    pitch: int  # 0-99 (-p)

    @property
    def language(self) -> str:
        return self.voice.split("+", 1)[0]


# Signal processing is done with numpy's FFT: short clips, exact band limits, and no scipy.signal import
# (which alone takes seconds).


def fft_resample(x: np.ndarray, n_out: int) -> np.ndarray:
    """Band-limited resampling of a short clip to `n_out` samples (ideal low-pass at the lower Nyquist).
    (T,) -> (n_out,)"""
    spec = np.fft.rfft(x)
    out = np.zeros(n_out // 2 + 1, dtype=spec.dtype)
    keep = min(len(spec), len(out))
    out[:keep] = spec[:keep]
    return np.fft.irfft(out, n_out) * (n_out / len(x))


def band_filter(x: np.ndarray, low_hz: float | None, high_hz: float | None,
                width_hz: float = 150.0) -> np.ndarray:
    """Zero-phase band-pass/low-pass/high-pass with raised-cosine edges `width_hz` wide. (T,) -> (T,)"""
    freqs = np.fft.rfftfreq(len(x), 1.0 / SAMPLE_RATE)
    gain = np.ones_like(freqs)
    if low_hz is not None:  # rises from 0 at low_hz - width/2 to 1 at low_hz + width/2
        gain *= 0.5 - 0.5 * np.cos(np.pi * np.clip((freqs - low_hz) / width_hz + 0.5, 0.0, 1.0))
    if high_hz is not None:
        gain *= 0.5 + 0.5 * np.cos(np.pi * np.clip((freqs - high_hz) / width_hz + 0.5, 0.0, 1.0))
    return np.fft.irfft(np.fft.rfft(x) * gain, len(x))


def to_mono_8k(x: np.ndarray, sr: int) -> np.ndarray:
    """(T,) or (T, C) float audio at `sr` -> (T',) float32 mono at 8 kHz."""
    if x.ndim == 2:
        x = x.mean(axis=1)
    if sr != SAMPLE_RATE:
        x = fft_resample(x.astype(np.float64), int(round(len(x) * SAMPLE_RATE / sr)))
    return np.asarray(x, dtype=np.float32)


def trim_and_normalize(x: np.ndarray) -> np.ndarray:
    """Cut leading/trailing silence (frame energy relative to the loudest frame), then peak-normalize.
    (T,) -> (T',)"""
    n = len(x) // _FRAME
    if n == 0 or not np.any(x):
        raise DataError("audio clip is empty or silent")
    frames = x[: n * _FRAME].reshape(n, _FRAME).astype(np.float64)
    energy_db = 10.0 * np.log10(np.mean(frames**2, axis=1) + 1e-12)  # (n,)
    loud = np.flatnonzero(energy_db > energy_db.max() - _TRIM_DB)
    start = max(int(loud[0]) - _TRIM_MARGIN, 0) * _FRAME
    stop = min((int(loud[-1]) + 1 + _TRIM_MARGIN) * _FRAME, len(x))
    y = x[start:stop].astype(np.float64)
    y -= y.mean()  # remove DC before measuring the peak
    return (y * (_PEAK / np.abs(y).max())).astype(np.float32)


def load_clip(path: Path) -> np.ndarray:
    """Read a WAV file, bring it to 8 kHz mono, trim and normalize it. -> (T,) float32"""
    try:
        x, sr = sf.read(str(path), dtype="float32", always_2d=False)
    except (RuntimeError, sf.LibsndfileError) as e:
        raise DataError(f"cannot decode audio file {path}: {e}") from e
    return trim_and_normalize(to_mono_8k(x, sr))


def _espeak_one(cfg: SynthConfig, digit: int, tmp: Path) -> np.ndarray:
    wav = tmp / f"{cfg.voice}_{cfg.rate}_{cfg.pitch}_{digit}.wav"
    # The numeral, not a spelled word: espeak-ng reads it as the digit word of the voice's own language.
    cmd = ["espeak-ng", "-v", cfg.voice, "-s", str(cfg.rate), "-p", str(cfg.pitch), "-w", str(wav),
           str(digit)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    except FileNotFoundError as e:
        raise DataError("espeak-ng is not installed (Debian package espeak-ng; `make sysdeps`)") from e
    except subprocess.CalledProcessError as e:
        raise DataError(f"espeak-ng failed for voice {cfg.voice!r}: "
                        f"{e.stderr.decode(errors='replace').strip()}") from e
    clip = load_clip(wav)
    wav.unlink()
    return clip


def synthesize(configs: Sequence[SynthConfig], workers: int = 2) -> dict[tuple[SynthConfig, int], np.ndarray]:
    """Speak digits 0-9 with every config, `workers` espeak-ng processes at a time.
    -> {(cfg, digit): (T,) clip}"""
    jobs = [(c, d) for c in configs for d in range(10)]
    with tempfile.TemporaryDirectory(prefix="avt-espeak-") as tmp, ThreadPoolExecutor(workers) as pool:
        clips = list(pool.map(lambda job: _espeak_one(job[0], job[1], Path(tmp)), jobs))
    log.info("espeak-ng: synthesized %d clips (%d voice settings x 10 digits)", len(jobs), len(configs))
    return dict(zip(jobs, clips, strict=True))


def _colored_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unit-RMS background noise of a random colour: white, or low/high-passed white. -> (n,)"""
    noise = rng.standard_normal(n)
    kind = rng.integers(3)
    if kind == 1:  # rumble / hum-like
        noise = band_filter(noise, None, rng.uniform(300, 1200))
    elif kind == 2:  # hiss
        noise = band_filter(noise, rng.uniform(1500, 3000), None)
    return noise / (np.sqrt(np.mean(noise**2)) + 1e-12)


def perturb(clip: np.ndarray, rng: np.random.Generator, snr_db: tuple[float, float],
            gain_db: tuple[float, float] = (-12.0, 0.0), speed: tuple[float, float] = (1.0, 1.0),
            max_pad_s: float = 0.15, channel_p: float = 0.0) -> np.ndarray:
    """One record's version of a clean clip: speed change, channel colouring, padding, noise, gain.
    (T,) -> (T',)

    `channel_p` is the chance of a random telephone-like band-pass (low cut 100-400 Hz, high cut 2.6-3.8 kHz),
    which teaches a model trained on clean synthetic speech to cope with real telephone recordings.
    """
    x = clip.astype(np.float64)
    if rng.random() < channel_p:
        x = band_filter(x, rng.uniform(100, 400), rng.uniform(2600, 3800))
    factor = rng.uniform(*speed)
    if abs(factor - 1.0) > 1e-3:  # speed perturbation by resampling (changes tempo and pitch together)
        x = fft_resample(x, int(round(len(x) / factor)))
    pad = rng.integers(0, int(max_pad_s * SAMPLE_RATE) + 1, size=2)
    x = np.concatenate([np.zeros(pad[0]), x, np.zeros(pad[1])])
    speech_rms = np.sqrt(np.mean(clip.astype(np.float64) ** 2))
    snr = rng.uniform(*snr_db)
    x = x + _colored_noise(rng, len(x)) * speech_rms * 10 ** (-snr / 20)
    x *= 10 ** (rng.uniform(*gain_db) / 20) * _PEAK / max(np.abs(x).max(), 1e-9)
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def encode_wav(x: np.ndarray) -> bytes:
    """(T,) float in [-1, 1] -> WAV bytes, 16-bit PCM mono 8 kHz (deterministic: no timestamps, no extra
    chunks)."""
    buf = io.BytesIO()
    sf.write(buf, x, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    return buf.getvalue()
