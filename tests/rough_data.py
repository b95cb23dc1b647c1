"""A small dataset with the rough edges real data has: RGBA PNGs of odd sizes whose transparent pixels hide a
colour, grayscale and palette images, 44.1 kHz stereo OGG and 22.05 kHz mono WAV clips of 0.3-4 s, captions in
Latin and Cyrillic, rows without text or audio, and imbalanced classes. Written as a JSONL manifest with
relative media paths, the way users bring data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CLASSES = {"bird": 0.6, "dog": 0.3, "cat": 0.1}  # imbalanced: 6:3:1
COLOURS = {"bird": (220, 40, 40), "dog": (40, 160, 40), "cat": (40, 40, 220)}
PITCH = {"bird": 880.0, "dog": 220.0, "cat": 440.0}
WORDS = {"bird": ("a red bird", "красная птица"), "dog": ("a green dog", "зелёная собака"),
         "cat": ("a blue cat", "синяя кошка")}


def write_rough_dataset(root: Path, n: int = 60, seed: int = 0) -> Path:
    """-> root/manifest.jsonl with a split column (train 70%, val 15%, test 15%)."""
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "clips").mkdir(exist_ok=True)
    names = list(CLASSES)
    labels = rng.choice(names, size=n, p=list(CLASSES.values()))
    rows = []
    for i, label in enumerate(labels):
        w, h = int(rng.integers(40, 200)), int(rng.integers(40, 200))
        rgba = np.zeros((h, w, 4), dtype=np.uint8)
        rgba[..., :3] = (255, 0, 255)  # magenta stored under transparent pixels: must not leak into inputs
        cy, cx, r = h // 2, w // 2, min(h, w) // 3
        yy, xx = np.ogrid[:h, :w]
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        rgba[disc, :3] = COLOURS[label]
        rgba[disc, 3] = 255
        img = Image.fromarray(rgba, "RGBA")
        if i % 7 == 3:
            img = img.convert("L")
        elif i % 7 == 5:
            img = img.convert("RGB").quantize(16)  # palette
        img.save(root / "img" / f"{i:04d}.png")
        seconds = float(rng.uniform(0.3, 4.0))
        if i % 2:
            rate, ext = 44100, "ogg"
            t = np.arange(int(seconds * rate)) / rate
            tone = 0.3 * np.sin(2 * np.pi * PITCH[label] * t)
            wave = np.stack([tone, 0.5 * tone], axis=1).astype(np.float32)  # stereo
            sf.write(root / "clips" / f"{i:04d}.ogg", wave, rate, format="OGG", subtype="VORBIS")
        else:
            rate, ext = 22050, "wav"
            t = np.arange(int(seconds * rate)) / rate
            sf.write(root / "clips" / f"{i:04d}.wav", (0.3 * np.sin(2 * np.pi * PITCH[label] * t)), rate)
        split = "train" if i < 0.7 * n else ("val" if i < 0.85 * n else "test")
        rows.append({"id": f"r{i:04d}", "image": f"img/{i:04d}.png",
                     "text": None if i % 11 == 4 else WORDS[label][i % 2],
                     "audio": None if i % 13 == 6 else f"clips/{i:04d}.{ext}", "label": label,
                     "split": split})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return manifest
