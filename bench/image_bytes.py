"""Object-store bytes per image: the preprocessed splits as stored now (uint8 pixels, normalized in the
collate step) against the float32 pixels stored before (issue 15).

    .venv/bin/python bench/image_bytes.py [--data data/avt_digits] [--size 28] [--channels 1]
        [--out bench/results/image_bytes.json]

Builds the train split with the Ray Data pipeline (data.cache=memory), then measures with Ray's own block
sizes (Dataset.size_bytes of the materialized blocks): the image column as stored, the same column cast to
float32 (the old layout, normalized values take the same 4 bytes), and whole rows.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _as_float32(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"image": np.asarray(batch["image"]).astype(np.float32)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REPO / "data" / "avt_digits"))
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "image_bytes.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from mmfusion.config import load_config
    from mmfusion.data.pipeline import build_datasets
    from mmfusion.runtime import init_ray

    cfg = load_config(REPO / "jobs" / "configs" / "avt_digits.yaml",
                      [f"data.path={args.data}", "data.cache=memory", f"data.image.size={args.size}",
                       f"data.image.channels={args.channels}", "data.image.mean=[0.5]",
                       "data.image.std=[0.5]"])
    init_ray()
    bundle = build_datasets(cfg.data, splits=("train",), seed=cfg.seed)
    rows = bundle.train_rows
    image = bundle.train.select_columns(["image"]).materialize()
    old = image.map_batches(_as_float32, batch_format="numpy").materialize()
    stored_dtype = str(next(iter(image.iter_batches(batch_size=1, batch_format="numpy")))["image"].dtype)
    after, before = image.size_bytes() / rows, old.size_bytes() / rows
    row_after = bundle.train.size_bytes() / rows
    out = {
        "what": "object-store bytes per preprocessed image (Ray block sizes / rows): now vs float32",
        "data": args.data, "image_shape": [args.channels, args.size, args.size], "train_rows": rows,
        "stored_dtype": stored_dtype,
        "bytes_per_image": {"now_uint8": after, "before_float32": before, "ratio": before / after},
        "bytes_per_row": {"now": row_after, "before": row_after - after + before},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"image {args.channels}x{args.size}x{args.size}: {after:.0f} B now ({stored_dtype}), "
          f"{before:.0f} B as float32 ({before / after:.2f}x); per row {row_after:.0f} B now, "
          f"{out['bytes_per_row']['before']:.0f} B before")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
