"""What a dataset holds, measured: the statistics `mmfusion init` chooses preprocessing from, and that
`mmfusion data inspect` prints.

    profile = profile_dataset("my_data/manifest.jsonl")   # reads through the same readers as training
    print(format_profile(profile))

Media headers are read without decoding (image size and mode, audio rate, channels and length); pixel
statistics decode a sample of images through the training kernels at the chosen size. Rows are streamed:
at most `max_rows` of the train split (or of every split when there is no train split) are looked at.
No Ray here.
"""

from __future__ import annotations

import io
import logging
import math
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmfusion.batch import MODALITIES

log = logging.getLogger(__name__)

MAX_ROWS = 4000  # rows scanned: enough for stable percentiles, a few seconds on a laptop
PIXEL_SAMPLE = 256  # images decoded for the channel mean/std
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


@dataclass
class ImageStats:
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    modes: Counter[str] = field(default_factory=Counter)  # Pillow mode -> images
    formats: Counter[str] = field(default_factory=Counter)  # PNG, JPEG, ...
    alpha: int = 0  # images with an alpha channel or a transparent palette entry
    samples: list[bytes] = field(default_factory=list)  # encoded images kept for pixel statistics

    @property
    def count(self) -> int:
        return len(self.widths)

    @property
    def short_side(self) -> float:
        return percentile([min(w, h) for w, h in zip(self.widths, self.heights, strict=True)], 50)

    @property
    def grayscale(self) -> bool:
        return all(m in ("1", "L", "LA", "I", "I;16", "F", "La") for m in self.modes)


@dataclass
class AudioStats:
    rates: Counter[int] = field(default_factory=Counter)  # sample rate (Hz) -> clips
    channels: Counter[int] = field(default_factory=Counter)
    formats: Counter[str] = field(default_factory=Counter)  # WAV, OGG, FLAC, ...
    seconds: list[float] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.seconds)


@dataclass
class TextStats:
    chars: list[int] = field(default_factory=list)
    utf8_bytes: list[int] = field(default_factory=list)  # what the builtin tokenizer counts
    scripts: Counter[str] = field(default_factory=Counter)  # dominant Unicode script per text

    @property
    def count(self) -> int:
        return len(self.chars)


@dataclass
class DatasetProfile:
    path: str
    rows: dict[str, int]  # rows per split (all rows, from the summary)
    scanned: int  # rows looked at for the statistics below
    scanned_split: str  # "train", or "all"
    columns: list[str]  # the modalities with a column
    class_counts: dict[str, int]  # in the scanned rows
    present: dict[str, int]  # modality -> scanned rows with a non-null field
    image: ImageStats = field(default_factory=ImageStats)
    audio: AudioStats = field(default_factory=AudioStats)
    text: TextStats = field(default_factory=TextStats)
    unreadable: Counter[str] = field(default_factory=Counter)  # modality -> headers that could not be read

    def share(self, modality: str) -> float:
        return self.present.get(modality, 0) / max(self.scanned, 1)

    @property
    def majority_share(self) -> float:
        total = sum(self.class_counts.values())
        return max(self.class_counts.values()) / total if total else float("nan")

    @property
    def imbalance(self) -> float:
        """Largest class / smallest class (1.0 = balanced)."""
        counts = [c for c in self.class_counts.values() if c > 0]
        return max(counts) / min(counts) if counts else float("nan")


def profile_dataset(path: str, label_column: str = "label", max_rows: int = MAX_ROWS) -> DatasetProfile:
    """Scan a dataset (folder or manifest) through the training readers and measure every modality."""
    from mmfusion.data import readers

    summary = readers.summarize(path, label_column)
    columns = [m for m in MODALITIES if m in summary.columns]
    split = "train" if summary.rows.get("train") else None
    prof = DatasetProfile(path, dict(summary.rows), 0, split or "all", columns, {}, {})
    classes: Counter[str] = Counter()
    present: Counter[str] = Counter()
    for tb in readers.iter_records(path, split=split, label_column=label_column, modalities=columns):
        n = min(tb.num_rows, max_rows - prof.scanned)
        tb = tb.slice(0, n)
        classes.update(str(v) for v in tb["label"].to_pylist() if v is not None)
        for m in columns:
            values = tb[m].to_pylist()
            present[m] += sum(v is not None for v in values)
            for v in values:
                if v is not None:
                    _measure(prof, m, v)
        prof.scanned += n
        if prof.scanned >= max_rows:
            break
    prof.class_counts = {k: classes[k] for k in readers.sort_labels(classes)}
    prof.present = dict(present)
    return prof


def _measure(prof: DatasetProfile, modality: str, value: Any) -> None:
    try:
        if modality == "image":
            _image_header(prof.image, value)
        elif modality == "audio":
            _audio_header(prof.audio, value)
        else:
            _text_stats(prof.text, value)
    except Exception:  # noqa: BLE001 - any unreadable header: counted, the rejects file says why at train time
        prof.unreadable[modality] += 1


def _image_header(st: ImageStats, data: bytes) -> None:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:  # the header only: nothing is decoded
        st.widths.append(im.width)
        st.heights.append(im.height)
        st.modes[im.mode] += 1
        st.formats[im.format or "?"] += 1
        st.alpha += int(im.mode in ALPHA_MODES or "transparency" in im.info)
    if len(st.samples) < PIXEL_SAMPLE:
        st.samples.append(data)


def _audio_header(st: AudioStats, data: bytes) -> None:
    import soundfile as sf

    info = sf.info(io.BytesIO(data))
    st.rates[int(info.samplerate)] += 1
    st.channels[int(info.channels)] += 1
    st.formats[str(info.format)] += 1
    st.seconds.append(info.frames / info.samplerate if info.samplerate else 0.0)


def _text_stats(st: TextStats, value: Any) -> None:
    text = value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)
    st.chars.append(len(text))
    st.utf8_bytes.append(len(text.encode("utf-8")))
    st.scripts[dominant_script(text)] += 1


def dominant_script(text: str) -> str:
    """The Unicode script most letters of `text` belong to (LATIN, CYRILLIC, CJK, ...); "none" if no
    letters."""
    scripts: Counter[str] = Counter()
    for ch in text:
        if ch.isalpha():
            name = unicodedata.name(ch, "")
            scripts[name.split(" ")[0] if name else "OTHER"] += 1
    return scripts.most_common(1)[0][0] if scripts else "none"


def pixel_stats(st: ImageStats, size: int, channels: int, background: Any = None,
                ) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of pixels in [0, 1] after the training decode and resize (alpha
    composited)."""
    from mmfusion.config import ImagePreprocessConfig
    from mmfusion.data.image import image_batch

    extra = {"background": background} if background is not None else {}
    cfg = ImagePreprocessConfig(size=size, channels=channels, mean=[0.0], std=[1.0], **extra)
    pixels, errors = image_batch(st.samples, cfg)  # (N, C, S, S) in [0, 1]
    good = pixels[[e is None for e in errors]]
    if not len(good):
        return [0.5] * channels, [0.5] * channels
    mean = good.mean(axis=(0, 2, 3))
    std = np.maximum(good.std(axis=(0, 2, 3)), 1e-3)
    return [round(float(x), 4) for x in mean], [round(float(x), 4) for x in std]


# ------------------------------------------------------------------------------------------- report


def format_profile(p: DatasetProfile) -> str:
    """The statistics as the lines `mmfusion data inspect` prints."""
    lines = [f"statistics over {p.scanned} {p.scanned_split} rows"]
    if p.class_counts:
        total = sum(p.class_counts.values())
        top = max(p.class_counts, key=p.class_counts.__getitem__)
        low = min(p.class_counts, key=p.class_counts.__getitem__)
        lines.append(f"  classes  {len(p.class_counts)}; largest {top!r} {p.class_counts[top] / total:.1%}, "
                     f"smallest {low!r} {p.class_counts[low] / total:.1%} (ratio {p.imbalance:.1f})")
    lines.append("  present  " + ", ".join(f"{m} {p.share(m):.1%}" for m in p.columns))
    im, au, tx = p.image, p.audio, p.text
    if im.count:
        lines.append(f"  image    {im.count} headers; width {_range(im.widths)}, "
                     f"height {_range(im.heights)}; modes {_counts(im.modes)}; "
                     f"with alpha {im.alpha / im.count:.0%}; {_counts(im.formats)}")
    if au.count:
        lines.append(f"  audio    {au.count} clips; {_counts(au.rates, ' Hz')}; "
                     f"channels {_counts(au.channels)}; length p50 {percentile(au.seconds, 50):.2f} s, "
                     f"p95 {percentile(au.seconds, 95):.2f} s, "
                     f"max {max(au.seconds):.2f} s; {_counts(au.formats)}")
    if tx.count:
        lines.append(f"  text     {tx.count} texts; chars p50 {percentile(tx.chars, 50):.0f}, "
                     f"p95 {percentile(tx.chars, 95):.0f}; "
                     f"UTF-8 bytes p95 {percentile(tx.utf8_bytes, 95):.0f}; "
                     f"scripts {_counts(tx.scripts)}")
    if p.unreadable:
        lines.append("  unreadable headers: " + _counts(p.unreadable))
    return "\n".join(lines)


def _range(values: list[int]) -> str:
    return f"{min(values)}-{max(values)} (median {percentile(values, 50):.0f})"


def _counts(c: Counter[Any], unit: str = "") -> str:
    total = sum(c.values())
    return ", ".join(f"{k}{unit} {v / total:.0%}" for k, v in c.most_common(4)) + (
        f", +{len(c) - 4} more" if len(c) > 4 else "")


def round_up(x: float, step: float) -> float:
    return math.ceil(x / step - 1e-9) * step
