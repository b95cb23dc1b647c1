"""Builders of the built-in real datasets (`mmfusion data build NAME`): each writes the record contract
(mmfusion.data) as Parquet splits plus a data card, deterministically from a seed, from registry packages
only."""
