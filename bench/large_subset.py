"""A row subset of a sharded dataset (the large AVT-Digits variant), for benchmarks with a time budget.

    from large_subset import subset
    path = subset("data/avt_digits_large", {"train": 20_000, "val": 2_000}, tmp_dir)

Each requested split keeps its first N rows: whole Parquet shards are symlinked, the remainder of the last one
is written as a slice (same row-group size). Splits not requested are left out. Rows, encoding and media bytes
are the variant's own; only the count changes.
"""

from __future__ import annotations

from pathlib import Path

ROW_GROUP_ROWS = 500  # as the AVT-Digits builder writes them (the unit of parallel reading)


def subset(data: str | Path, rows: dict[str, int], out: str | Path) -> str:
    """The folder `out` with the first rows[split] rows of each split of `data` (<split>/part-*.parquet)."""
    import pyarrow.parquet as pq

    data, out = Path(data).resolve(), Path(out)
    for split, n in rows.items():
        shards = sorted((data / split).glob("*.parquet"))
        if not shards:
            raise SystemExit(f"{data / split} has no Parquet shards: build the large variant first "
                             "(make data/avt_digits_large/data_card.json)")
        (out / split).mkdir(parents=True, exist_ok=True)
        left = n
        for shard in shards:
            if left <= 0:
                break
            have = pq.ParquetFile(shard).metadata.num_rows
            if have <= left:
                (out / split / shard.name).symlink_to(shard)
            else:
                pq.write_table(pq.read_table(shard).slice(0, left), out / split / shard.name,
                               row_group_size=ROW_GROUP_ROWS)
            left -= min(have, left)
        if left > 0:
            raise SystemExit(f"{data / split} has {n - left} rows, fewer than the {n} asked for")
    return str(out)
