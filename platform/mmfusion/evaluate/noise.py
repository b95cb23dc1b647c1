"""Corruptions for robustness evaluation, applied to the raw record values (encoded image and audio bytes,
text strings) before preprocessing, so the model sees them through the same kernels as clean data.

    image_noise   Gaussian pixel noise, std in units of the pixel range (0-1), clipped, re-encoded as PNG
    image_blur    Gaussian blur, std as a fraction of the image's shorter side, re-encoded as PNG
    audio_snr     white noise at a signal-to-noise ratio in dB (the clip's mean power), re-encoded as WAV
    text_typos    each character, with this probability: deleted, replaced, doubled or swapped with the next

Every row draws its noise from its own generator, seeded by (seed, kind, level, row id), so the numbers do not
depend on how rows were batched or which actor took them. A value that cannot be decoded is left as it is
(preprocessing rejects it as it would the clean one). No torch here.
"""

from __future__ import annotations

import hashlib
import io
import math
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

TYPO_ALPHABET = string.ascii_lowercase


@dataclass(frozen=True)
class NoiseKind:
    modality: str
    levels: tuple[float, ...]  # default levels, from clean to strongest
    clean: float  # the level that leaves the data as it is
    unit: str  # the level's meaning, for tables and axis labels


NOISES: dict[str, NoiseKind] = {
    "image_noise": NoiseKind("image", (0.0, 0.1, 0.2, 0.4, 0.8), 0.0, "Gaussian noise std (pixel range 0-1)"),
    "image_blur": NoiseKind("image", (0.0, 0.02, 0.04, 0.08, 0.16), 0.0,
                            "Gaussian blur std / shorter image side"),
    "audio_snr": NoiseKind("audio", (math.inf, 20.0, 10.0, 5.0, 0.0, -5.0), math.inf,
                           "SNR in dB (white noise)"),
    "text_typos": NoiseKind("text", (0.0, 0.1, 0.2, 0.3, 0.5), 0.0, "typo rate per character"),
}


def row_rng(seed: int, kind: str, level: float, row_id: str) -> np.random.Generator:
    digest = hashlib.blake2b(f"{seed}:{kind}:{level!r}:{row_id}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def corrupt(values: Sequence[Any], ids: Sequence[Any], kind: str, level: float, seed: int = 0) -> list[Any]:
    """The values of one modality column with noise `kind` at `level`; None stays None."""
    nk = NOISES[kind]
    if level == nk.clean:
        return list(values)
    fn = _KERNELS[kind]
    out = []
    for v, i in zip(values, ids, strict=True):
        if v is None:
            out.append(None)
            continue
        try:
            out.append(fn(v, level, row_rng(seed, kind, level, str(i))))
        except Exception:  # undecodable input: the preprocessing kernel reports it, as for clean data
            out.append(v)
    return out


def _open_image(data: bytes) -> tuple[Any, np.ndarray]:
    from PIL import Image

    img = Image.open(io.BytesIO(bytes(data)))
    img.load()
    if img.mode not in ("L", "LA", "RGB", "RGBA"):
        img = img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB")
    return img, np.asarray(img, dtype=np.float32) / 255.0  # (H, W) or (H, W, C)


def _png(pixels: np.ndarray, mode: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8), mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def image_noise(data: bytes, std: float, rng: np.random.Generator) -> bytes:
    img, x = _open_image(data)
    noise = rng.standard_normal(x.shape).astype(np.float32) * std
    if img.mode in ("LA", "RGBA"):
        noise[..., -1] = 0  # alpha is not a pixel value: left alone
    return _png(x + noise, img.mode)


def image_blur(data: bytes, fraction: float, rng: np.random.Generator) -> bytes:
    from PIL import ImageFilter

    img, _ = _open_image(data)
    radius = fraction * min(img.size)  # PIL's GaussianBlur radius is the kernel's standard deviation
    buf = io.BytesIO()
    img.filter(ImageFilter.GaussianBlur(radius)).save(buf, format="PNG")
    return buf.getvalue()


def audio_snr(data: bytes, snr_db: float, rng: np.random.Generator) -> bytes:
    import soundfile as sf

    wav, sr = sf.read(io.BytesIO(bytes(data)), dtype="float32", always_2d=True)  # (n, channels)
    power = float(np.mean(np.square(wav))) if wav.size else 0.0
    if power > 0:
        std = math.sqrt(power / 10 ** (snr_db / 10))
        wav = wav + rng.standard_normal(wav.shape).astype(np.float32) * std
    buf = io.BytesIO()
    sf.write(buf, wav, sr, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def text_typos(text: str | bytes, rate: float, rng: np.random.Generator) -> str:
    s = text.decode("utf-8") if isinstance(text, (bytes, bytearray)) else str(text)
    chars = list(s)
    out: list[str] = []
    i = 0
    while i < len(chars):
        c = chars[i]
        if rng.random() >= rate:
            out.append(c)
        else:
            op = int(rng.integers(4))
            if op == 1:  # replaced
                out.append(TYPO_ALPHABET[int(rng.integers(len(TYPO_ALPHABET)))])
            elif op == 2:  # doubled
                out += [c, c]
            elif op == 3 and i + 1 < len(chars):  # swapped with the next
                out += [chars[i + 1], c]
                i += 1
            # op 0 (or a swap at the end): deleted
        i += 1
    return "".join(out) or s[:1]  # never empty: an empty text would be a missing modality, not a noisy one


_KERNELS: dict[str, Callable[[Any, float, np.random.Generator], Any]] = {
    "image_noise": image_noise, "image_blur": image_blur, "audio_snr": audio_snr, "text_typos": text_typos,
}
