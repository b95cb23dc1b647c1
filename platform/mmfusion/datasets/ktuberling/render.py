"""KTuberling sprites: one SVG element of a theme's game board -> an RGBA PNG with a transparent background.

rsvg-convert (librsvg2-bin) renders the element alone (`--export-id`) at the theme's zoom, cropped to its
visible pixels; see render_sprite for the size limits. The sprites keep their varied sizes and aspect ratios.
"""

from __future__ import annotations

import io
import logging
import math
import subprocess
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mmfusion.datasets.ktuberling.sources import RSVG_PACKAGE, Sprite
from mmfusion.errors import DataError

log = logging.getLogger(__name__)

MAX_SIDE = 400  # px: the longest side of a stored sprite
MIN_SIDE = 32  # px: smaller visible parts are rendered again at a larger zoom
MAX_CANVAS = 4096  # px: the largest render of an element's bounding box
# Zoom per theme: the boards are drawn at different scales, and an element's bounding box is often much larger
# than its visible part. At these zooms the median visible sprite is 60-120 px (ktuberling-data 22.12).
THEME_ZOOM = {"butterflies": 6.0, "default_theme": 5.0, "robot_workshop": 5.0, "train_valley": 8.0,
              "christmas": 2.0, "robin-tux": 2.0, "potato-game": 2.0, "pizzeria": 1.5, "egypt": 1.0,
              "moon": 1.0}


def _rsvg(rsvg: Path, sprite: Sprite, zoom: float, tmp: Path) -> Any:
    """Render the element at `zoom` -> PIL RGBA image of its bounding box (often with empty margins)."""
    from PIL import Image

    out = tmp / f"{sprite.theme}__{sprite.element}.png"
    cmd = [str(rsvg), f"--export-id={sprite.element}", "--zoom", f"{zoom:.4f}", "--format=png",
           "-o", str(out), str(sprite.board)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    except FileNotFoundError as e:
        raise DataError(f"{rsvg} not found: install the Debian package {RSVG_PACKAGE}") from e
    except subprocess.CalledProcessError as e:
        raise DataError(f"rsvg-convert cannot render {sprite.element!r} of {sprite.board}: "
                        f"{e.stderr.decode(errors='replace').strip()}") from e
    with Image.open(out) as im:
        im.load()
        img = im.convert("RGBA")
    out.unlink()
    return img


def render_sprite(rsvg: Path, sprite: Sprite, tmp: Path) -> bytes | None:
    """Render one sprite, cropped to its visible pixels -> PNG bytes (RGBA), or None if nothing is visible.

    A sprite whose visible part is under MIN_SIDE px at the theme's zoom is rendered again at a power-of-two
    larger zoom (vector art: sharp, and small objects stay smaller than large ones); one over MAX_SIDE is
    scaled down (premultiplied alpha, so that transparent pixels do not bleed colour into the edges)."""
    from PIL import Image

    zoom = THEME_ZOOM.get(sprite.theme, 1.0)
    img = _rsvg(rsvg, sprite, zoom, tmp)
    box = img.getchannel("A").getbbox()
    if box is None:
        return None
    side = max(box[2] - box[0], box[3] - box[1])
    if side < MIN_SIDE:
        factor = 2 ** math.ceil(math.log2(MIN_SIDE / side))
        factor = min(factor, max(1, MAX_CANVAS // max(img.size)))  # a huge empty bounding box: stop there
        if factor > 1:
            img = _rsvg(rsvg, sprite, zoom * factor, tmp)
            box = img.getchannel("A").getbbox() or (0, 0, img.width, img.height)
    img = img.crop(box)
    if max(img.size) > MAX_SIDE:
        k = MAX_SIDE / max(img.size)
        size = (max(1, round(img.width * k)), max(1, round(img.height * k)))
        img = img.convert("RGBa").resize(size, Image.Resampling.LANCZOS).convert("RGBA")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)  # no metadata, no timestamps: byte-identical for one seed
    return buf.getvalue()


def render_all(rsvg: Path, sprites: Sequence[Sprite], workers: int = 2) -> list[bytes | None]:
    """PNG bytes (None: nothing visible) per sprite, in order; `workers` rsvg-convert processes at a time."""
    from mmfusion.logs import progress

    t0 = time.perf_counter()
    out: list[bytes | None] = []
    with tempfile.TemporaryDirectory(prefix="ktuberling-render-") as d, ThreadPoolExecutor(workers) as pool:
        pngs = progress(pool.map(lambda s: render_sprite(rsvg, s, Path(d)), sprites), total=len(sprites),
                        desc="sprites", unit="sprite")
        for i, png in enumerate(pngs, 1):
            out.append(png)
            if i % 100 == 0 or i == len(sprites):
                log.info("rendered %d/%d sprites (%.0f s)", i, len(sprites), time.perf_counter() - t0)
    return out
