"""Per-modality preprocessing: one code path for Ray Data (batches) and Ray Serve (single requests).

    image bytes -> PIL decode -> torchvision v2 resize + scale + normalize   -> float32 (C, H, W)
    text str    -> builtin UTF-8 byte vocabulary or a Hugging Face tokenizer -> int64 ids (L,), mask (L,)
    audio bytes -> soundfile decode -> mono -> torchaudio resample -> pad/crop -> log-mel or MFCC -> float32 (1, F, T)

The single-item functions (`preprocess_image`, `preprocess_text`, `preprocess_audio`) and the batch class
`Preprocessor` share the same batch kernels, so Serve sees exactly what training saw. A field that cannot be
decoded raises `DecodeError(modality, reason)` in the single-item functions; in `Preprocessor` it marks the row
with an "error" string instead, so one bad record never fails a batch. No Ray here. torch is imported at module
import; torchvision, torchaudio and transformers only when first used.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from mmfusion.config import (
    MODALITIES,
    AudioPreprocessConfig,
    DataConfig,
    ImagePreprocessConfig,
    TextPreprocessConfig,
)
from mmfusion.errors import ConfigError, DataError
from mmfusion.models.spec import InputSpec

log = logging.getLogger(__name__)

LOG_EPS = 1e-6  # log-mel floor: log(x + eps) keeps silence finite (about -13.8)
META_COLUMNS = ("id", "split", "source", "row")  # bookkeeping columns passed through Preprocessor untouched
# the error of a row that is fine but has none of the configured modalities (a single-modality run over rows
# that lack it): skipped, and not counted towards data.max_bad_fraction
EMPTY_ROW = "record: none of the configured modalities"
MAX_IMAGE_PIXELS = 64_000_000  # larger images are rejected before decoding


class DecodeError(DataError):
    """One field of one record cannot be decoded (bad bytes, empty audio, non-UTF-8 text, ...)."""

    def __init__(self, modality: str, reason: str) -> None:
        super().__init__(f"{modality}: {reason}")
        self.modality = modality
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across Ray workers
        return (DecodeError, (self.modality, self.reason))


# ---------------------------------------------------------------------------------------------- text


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int

    def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> ids int64 (N, L), mask int64 (N, L), truncated bool (N,), with L = max_length."""
        ...


class ByteTokenizer:
    """The builtin vocabulary: UTF-8 bytes. ids: 0 pad, 1 bos/cls, 2 unk (unused), byte b -> b + 3."""

    PAD, BOS, UNK, OFFSET = 0, 1, 2, 3
    vocab_size = 256 + OFFSET  # 259
    pad_id = PAD

    def __init__(self, lowercase: bool = True) -> None:
        self.lowercase = lowercase

    def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = len(texts)
        ids = np.zeros((n, max_length), dtype=np.int64)  # (N, L)
        truncated = np.zeros(n, dtype=bool)  # (N,)
        for i, t in enumerate(texts):
            raw = (t.lower() if self.lowercase else t).encode("utf-8")
            row = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) + self.OFFSET
            k = min(len(row), max_length - 1)
            truncated[i] = len(row) > k
            ids[i, 0] = self.BOS
            ids[i, 1 : k + 1] = row[:k]
        mask = (ids != self.PAD).astype(np.int64)  # (N, L)
        return ids, mask, truncated


class HfTokenizer:
    """A Hugging Face tokenizer (hub name or local folder), padded/truncated to a fixed length."""

    def __init__(self, name_or_path: str) -> None:
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"data.text.tokenizer={name_or_path!r}: cannot load a Hugging Face tokenizer ({e}); use 'builtin' "
                "or a local folder written by save_pretrained"
            ) from None
        pad = self.tok.pad_token_id
        if pad is None:  # GPT-style tokenizers: pad with EOS, the mask hides it anyway
            pad = self.tok.eos_token_id
            if pad is None:
                raise ConfigError(f"data.text.tokenizer={name_or_path!r} has neither a pad nor an eos token")
            self.tok.pad_token = self.tok.eos_token
        self.pad_id = int(pad)
        self.vocab_size = len(self.tok)

    def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        texts = list(texts)
        if not texts:
            empty = np.zeros((0, max_length), dtype=np.int64)
            return empty, empty.copy(), np.zeros(0, dtype=bool)
        enc = self.tok(texts, max_length=max_length, truncation=True, padding="max_length", return_tensors="np")
        full = self.tok(texts, truncation=False)["input_ids"]  # lengths before truncation
        truncated = np.array([len(f) > max_length for f in full], dtype=bool)
        ids = enc["input_ids"].astype(np.int64)  # (N, L)
        mask = enc["attention_mask"].astype(np.int64)  # (N, L)
        return ids, mask, truncated


def load_tokenizer(cfg: TextPreprocessConfig) -> Tokenizer:
    """`builtin` -> ByteTokenizer; anything else -> transformers.AutoTokenizer.from_pretrained(name or path)."""
    if cfg.tokenizer == "builtin":
        return ByteTokenizer(lowercase=cfg.lowercase)
    return _hf_tokenizer(cfg.tokenizer)


@functools.lru_cache(maxsize=4)
def _hf_tokenizer(name_or_path: str) -> HfTokenizer:
    return HfTokenizer(name_or_path)


def _as_text(value: Any) -> str:
    """A text field -> str, or DecodeError. bytes are decoded strictly as UTF-8."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DecodeError("text", f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at position {e.start})") from None
    if not isinstance(value, str):
        raise DecodeError("text", f"expected a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates, e.g. from surrogateescape-decoded bytes
        raise DecodeError("text", f"not valid UTF-8 (undecodable character at position {e.start})") from None
    return value


def text_batch(values: Sequence[Any], cfg: TextPreprocessConfig, tokenizer: Tokenizer,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str | None]]:
    """Tokenize a batch; None entries are skipped (zeros). -> ids (N, L), mask (N, L), truncated (N,), errors."""
    n, L = len(values), cfg.max_length
    ids = np.full((n, L), tokenizer.pad_id, dtype=np.int64)
    mask = np.zeros((n, L), dtype=np.int64)
    truncated = np.zeros(n, dtype=bool)
    errors: list[str | None] = [None] * n
    rows, texts = [], []
    for i, v in enumerate(values):
        if v is None:
            continue
        try:
            texts.append(_as_text(v))
            rows.append(i)
        except DecodeError as e:
            errors[i] = e.reason
    if rows:
        t_ids, t_mask, t_trunc = tokenizer.encode(texts, L)
        ids[rows], mask[rows], truncated[rows] = t_ids, t_mask, t_trunc
    return ids, mask, truncated, errors


def preprocess_text(text: str, cfg: TextPreprocessConfig, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray, bool]:
    """One text -> ids int64 (L,), mask int64 (L,), truncated flag (Serve tells the client). DecodeError if bad."""
    ids, mask, truncated, errors = text_batch([text], cfg, tokenizer)
    if errors[0] is not None:
        raise DecodeError("text", errors[0])
    return ids[0], mask[0], bool(truncated[0])


# --------------------------------------------------------------------------------------------- image


def _norm_stats(cfg: ImagePreprocessConfig) -> tuple[list[float], list[float]]:
    c = cfg.channels

    def expand(name: str, v: list[float]) -> list[float]:
        if len(v) == 1:
            return v * c
        if len(v) != c:
            raise ConfigError(f"data.image.{name} has {len(v)} values but data.image.channels is {c} (give 1 or {c})")
        return list(v)

    mean, std = expand("mean", cfg.mean), expand("std", cfg.std)
    if any(s <= 0 for s in std):
        raise ConfigError(f"data.image.std must be positive, got {cfg.std}")
    return mean, std


def decode_image(data: Any, channels: int) -> torch.Tensor:
    """Encoded PNG/JPEG/... bytes -> uint8 (C, H, W). DecodeError on empty, truncated or unknown bytes."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError("image", f"expected encoded image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise DecodeError("image", "empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:  # checked before decoding: no decompression bombs
                raise DecodeError("image", f"too large ({im.width}x{im.height} pixels)")
            im.load()  # decodes fully: a truncated file fails here, not later
            im = im.convert("L" if channels == 1 else "RGB")
    except Image.DecompressionBombError as e:
        raise DecodeError("image", f"too large ({e})") from None
    except UnidentifiedImageError:
        raise DecodeError("image", "not a recognised image format") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise DecodeError("image", f"undecodable ({e})") from None
    arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (C, H, W)


@functools.lru_cache(maxsize=8)
def _image_transforms(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[Any, Any]:
    from torchvision.transforms import v2

    resize = v2.Resize((size, size), antialias=True)
    to_float = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])
    return resize, to_float


def image_batch(values: Sequence[Any], cfg: ImagePreprocessConfig) -> tuple[np.ndarray, list[str | None]]:
    """Decode + resize + normalize a batch; None entries are skipped (zeros). -> float32 (N, C, H, W), errors."""
    mean, std = _norm_stats(cfg)
    resize, to_float = _image_transforms(cfg.size, tuple(mean), tuple(std))
    c, s = cfg.channels, cfg.size
    out = np.zeros((len(values), c, s, s), dtype=np.float32)
    errors: list[str | None] = [None] * len(values)
    rows, images = [], []
    for i, v in enumerate(values):
        if v is None:
            continue
        try:
            img = decode_image(v, c)  # uint8 (C, h, w)
        except DecodeError as e:
            errors[i] = e.reason
            continue
        if img.shape[1:] != (s, s):
            img = resize(img)  # uint8 (C, S, S)
        rows.append(i)
        images.append(img)
    if rows:
        out[rows] = to_float(torch.stack(images)).numpy()  # vectorised scale + normalize: (n, C, S, S)
    return out, errors


def preprocess_image(data: bytes, cfg: ImagePreprocessConfig) -> np.ndarray:
    """One encoded image -> float32 (C, H, W). DecodeError if it cannot be decoded."""
    out, errors = image_batch([data], cfg)
    if errors[0] is not None:
        raise DecodeError("image", errors[0])
    return out[0]


# --------------------------------------------------------------------------------------------- audio


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
def _feature_transform(features: str, sample_rate: int, n_fft: int, hop_length: int, n_mels: int, n_mfcc: int,
                       ) -> torch.nn.Module:
    import torchaudio.transforms as T

    mel_kwargs = {"n_fft": n_fft, "hop_length": hop_length, "n_mels": n_mels}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # empty mel filters at tiny n_fft: still finite via eps
            if features == "mfcc":
                return T.MFCC(sample_rate=sample_rate, n_mfcc=n_mfcc, melkwargs=mel_kwargs)  # dB with a floor
            return T.MelSpectrogram(sample_rate=sample_rate, **mel_kwargs)
    except ValueError as e:
        raise ConfigError(f"data.audio: {e}") from None


def _features(waves: torch.Tensor, cfg: AudioPreprocessConfig) -> torch.Tensor:
    """float32 (N, S) -> (N, F, T)."""
    tf = _feature_transform(cfg.features, cfg.sample_rate, cfg.n_fft, cfg.hop_length, cfg.n_mels, cfg.n_mfcc)
    with torch.no_grad():
        feats = tf(waves)
    if cfg.features == "logmel":
        feats = torch.log(feats + LOG_EPS)
    return feats


def audio_batch(values: Sequence[Any], cfg: AudioPreprocessConfig) -> tuple[np.ndarray, list[str | None]]:
    """Decode, resample, pad/crop, featurize; None entries skipped (zeros). -> float32 (N, 1, F, T), errors."""
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
    return out, errors


def preprocess_audio(data: bytes, cfg: AudioPreprocessConfig) -> np.ndarray:
    """One encoded clip -> float32 (1, F, T). DecodeError on empty, zero-length, undecodable or non-finite."""
    out, errors = audio_batch([data], cfg)
    if errors[0] is not None:
        raise DecodeError("audio", errors[0])
    return out[0]


# ---------------------------------------------------------------------------------------------- spec


def input_spec(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> InputSpec:
    """Shapes, vocabulary size and pad id the model is built for (see mmfusion.models.spec)."""
    mods = tuple(cfg.modalities)
    kwargs: dict[str, Any] = {}
    if "image" in mods:
        _norm_stats(cfg.image)  # a mean/std mismatch is a config error now, not in a Ray actor later
        kwargs["image_shape"] = (cfg.image.channels, cfg.image.size, cfg.image.size)
    if "text" in mods:
        tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.text)
        kwargs.update(vocab_size=int(tok.vocab_size), pad_id=int(tok.pad_id), max_text_len=cfg.text.max_length)
    if "audio" in mods:
        a = cfg.audio
        _feature_transform(a.features, a.sample_rate, a.n_fft, a.hop_length, a.n_mels, a.n_mfcc)  # validates
        kwargs["audio_shape"] = (1, audio_num_features(a), audio_num_frames(a))
    return InputSpec(modalities=mods, **kwargs)


# ------------------------------------------------------------------------------------------- batches


def label_key(value: Any) -> str | None:
    """A label value as the string stored in labels lists: 3, 3.0 and "3" all map to "3"."""
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return str(int(value))
    if isinstance(value, (np.integer, np.floating)):
        return label_key(value.item())
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _column(batch: dict[str, Any], name: str, n: int) -> list[Any]:
    col = batch.get(name)
    if col is None:
        return [None] * n
    return [None if (isinstance(v, float) and math.isnan(v)) else v for v in col]


class Preprocessor:
    """Raw record batch -> model-ready numpy batch. Callable class: Ray Data map_batches actors and Serve.

    In:  "image" bytes|None, "text" str|bytes|None, "audio" bytes|None, optional "label", "id", "error" (a reason
         found by the reader, e.g. a missing file: the row is passed through as rejected), and the bookkeeping
         columns "split", "source", "row", which are passed through.
    Out: "image" f32 (N,C,H,W), "text" i64 (N,L), "text_mask" i64 (N,L), "audio" f32 (N,1,F,T), "present" bool
         (N,M), "label" i64 (N,) (index into labels; -1 when labels is None), "id" (N,), "error" (N,) str: "" for a
         good row, else "<modality>: <reason>". Only configured modalities appear; a missing (None) or empty-text
         field is a missing modality: zeros and present=False. A row with none of them present is an error.
    """

    def __init__(self, cfg: DataConfig, labels: list[str] | None = None, num_threads: int | None = None) -> None:
        if num_threads is not None:  # Ray Data actors: one thread each, the pool provides the parallelism
            torch.set_num_threads(num_threads)
        self.cfg = cfg
        self.modalities = tuple(cfg.modalities)
        self.tokenizer = load_tokenizer(cfg.text) if "text" in self.modalities else None
        self.spec = input_spec(cfg, self.tokenizer)
        self.labels = list(labels) if labels is not None else None
        self._label_index = {lab: i for i, lab in enumerate(self.labels or [])}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = _batch_len(batch)
        errors: list[str] = [str(e) if e else "" for e in _column(batch, "error", n)]
        present = np.zeros((n, len(self.modalities)), dtype=bool)
        out: dict[str, np.ndarray] = {}
        for j, m in enumerate(self.modalities):
            values = _column(batch, m, n)
            if m == "text":
                values = [None if (isinstance(v, (str, bytes)) and len(v) == 0) else v for v in values]
            values = [None if errors[i] else v for i, v in enumerate(values)]  # skip already-rejected rows
            if m == "image":
                out["image"], errs = image_batch(values, self.cfg.image)
            elif m == "audio":
                out["audio"], errs = audio_batch(values, self.cfg.audio)
            else:
                assert self.tokenizer is not None
                out["text"], out["text_mask"], _, errs = text_batch(values, self.cfg.text, self.tokenizer)
            for i, (v, e) in enumerate(zip(values, errs, strict=True)):
                if e is not None:
                    errors[i] = errors[i] or f"{m}: {e}"
                present[i, j] = v is not None and e is None
        labels = self._labels(batch, n, errors)
        for i in range(n):
            if not errors[i] and not present[i].any():
                errors[i] = f"{EMPTY_ROW} ({', '.join(self.modalities)}) is present"
        bad = np.array([bool(e) for e in errors], dtype=bool)
        if bad.any():  # rejected rows carry no data: zeros everywhere, nothing present
            for k in ("image", "text", "text_mask", "audio"):
                if k in out:
                    out[k][bad] = 0
            present[bad] = False
            labels[bad] = -1
        out["present"] = present
        out["label"] = labels
        ids = batch.get("id")
        out["id"] = np.array([str(i) for i in range(n)] if ids is None else [str(x) for x in ids], dtype=object)
        for k in META_COLUMNS[1:]:
            if k in batch:
                out[k] = np.asarray(batch[k])
        out["error"] = np.array(errors, dtype=object)
        return out

    def _labels(self, batch: dict[str, Any], n: int, errors: list[str]) -> np.ndarray:
        out = np.full(n, -1, dtype=np.int64)  # (N,)
        if self.labels is None or "label" not in batch:
            return out
        for i, v in enumerate(_column(batch, "label", n)):
            key = label_key(v)
            if key is None:
                errors[i] = errors[i] or "label: missing"
            elif key in self._label_index:
                out[i] = self._label_index[key]
            else:
                errors[i] = errors[i] or f"label: unknown label {key!r} (not among the {len(self.labels)} training labels)"
        return out


def _batch_len(batch: dict[str, Any]) -> int:
    for v in batch.values():
        if v is not None:
            return len(v)
    return 0


__all__ = [
    "MODALITIES",
    "ByteTokenizer",
    "DecodeError",
    "HfTokenizer",
    "Preprocessor",
    "Tokenizer",
    "audio_batch",
    "decode_audio",
    "decode_image",
    "image_batch",
    "input_spec",
    "label_key",
    "load_tokenizer",
    "preprocess_audio",
    "preprocess_image",
    "preprocess_text",
    "text_batch",
]
