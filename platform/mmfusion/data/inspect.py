"""`mmfusion data inspect PATH`: rows per split and class, modality presence, and rejects.

Every record is read and decoded here, without Ray (the same readers and Preprocessor the pipeline uses,
default preprocessing settings), so the rejects it reports are the rows a training run would set aside for
being undecodable. It writes them to the dataset's rejects file and prints its path.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict

import numpy as np

from mmfusion.batch import MODALITIES
from mmfusion.config import DataConfig
from mmfusion.data import readers, rejects, schema
from mmfusion.data.labels import sort_labels
from mmfusion.errors import DataError

log = logging.getLogger(__name__)

SHOW_REJECTS = 10  # rejected rows listed in the report (all of them are in the rejects file)


def inspect_dataset(path: str, label_column: str = "label") -> str:
    """Decode every row of a dataset folder or manifest and return a readable report."""
    from mmfusion.data.preprocessor import Preprocessor

    summary = readers.summarize(path, label_column)
    mods = [m for m in MODALITIES if m in summary.columns]
    if not mods:
        columns = ", ".join(sorted(summary.columns))
        raise DataError(f"{path} has no image, text or audio column (columns: {columns})")
    pre = Preprocessor(DataConfig(path=path, modalities=mods, label_column=label_column), labels=None)

    rows: Counter[str] = Counter()
    classes: dict[str, Counter[str]] = defaultdict(Counter)  # split -> label -> rows
    present: dict[str, Counter[str]] = defaultdict(Counter)  # split -> modality (and "good") -> rows
    bad: list[dict[str, object]] = []
    for tb in readers.iter_records(path, label_column=label_column, modalities=mods):
        batch = {k: np.array(tb[k].to_pylist(), dtype=object) for k in tb.column_names}
        out = pre(batch)
        splits, labels = batch["split"].tolist(), batch["label"].tolist()
        rows.update(splits)
        for s, lab in zip(splits, labels, strict=True):
            classes[s][lab if lab is not None else "(none)"] += 1
        for s, row_present, err in zip(splits, out["present"], out["error"], strict=True):
            if not err:
                present[s]["good"] += 1
                for m, p in zip(mods, row_present, strict=True):
                    present[s][m] += int(p)
        for i, err in enumerate(out["error"]):
            if err:
                bad.append({"id": batch["id"][i], "split": splits[i], "source": batch["source"][i],
                            "row": int(batch["row"][i]), "error": str(err)})
    rejects_path = rejects.update_rejects(rejects.default_rejects_path(path), bad)
    report = _report(path, label_column, summary, rows, classes, present, mods, bad, rejects_path)
    from mmfusion.data.profile import format_profile, profile_dataset

    # the statistics `mmfusion init` chooses preprocessing from (a second, header-only pass over <= 4000 rows)
    return report + "\n\n" + format_profile(profile_dataset(path, label_column))


def _report(path: str, label_column: str, summary: readers.DatasetSummary, rows: Counter[str],
            classes: dict[str, Counter[str]], present: dict[str, Counter[str]], mods: list[str],
            bad: list[dict[str, object]], rejects_path: object) -> str:
    order = {s: i for i, s in enumerate(schema.SPLITS)}
    splits = sorted(rows, key=lambda s: (order.get(s, 99), s))
    total = sum(rows.values())
    names = [f.name for f in summary.files]
    shown = ", ".join(names[:6]) + (f", ... ({len(names)} files)" if len(names) > 6 else "")
    lines = [f"dataset  {path}  ({shown})",
             f"rows     {total}" + (f"  ({', '.join(f'{s} {rows[s]}' for s in splits)})" if splits else "")]

    all_labels = {lab for c in classes.values() for lab in c}
    label_list = sort_labels(lab for lab in all_labels if lab != "(none)")
    if "(none)" in all_labels:
        label_list.append("(none)")
    if "label" not in summary.columns:
        lines += ["", f"labels   none (no {label_column!r} column)"]
    elif label_list:
        width = max(len("class"), *(len(lab) for lab in label_list))
        lines += ["", f"{len(label_list) - ('(none)' in all_labels)} classes"]
        lines.append(f"  {'class':<{width}}" + "".join(f"{s:>8}" for s in splits) + f"{'total':>8}")
        for lab in label_list:
            counts = [classes[s][lab] for s in splits]
            lines.append(f"  {lab:<{width}}" + "".join(f"{c:>8}" for c in counts) + f"{sum(counts):>8}")

    lines += ["", "modality presence (decoded fields of the rows that are not rejected)"]
    lines.append(f"  {'split':<8}{'rows':>8}{'good':>8}" + "".join(f"{m:>8}" for m in mods))
    for s in splits:
        counts = "".join(f"{present[s][m]:>8}" for m in mods)
        lines.append(f"  {s:<8}{rows[s]:>8}{present[s]['good']:>8}" + counts)
    absent = [m for m in MODALITIES if m not in mods]
    if absent:
        lines.append(f"  (no {', '.join(absent)} column)")

    lines.append("")
    if not bad:
        lines.append("rejects  0 (every row decodes)")
        return "\n".join(lines)
    by_mod = Counter(rejects.split_error(str(b["error"]))[0] for b in bad)
    lines.append(f"rejects  {len(bad)} ({len(bad) / max(total, 1):.1%}) -> {rejects_path}")
    lines.append("  by field: " + ", ".join(f"{m} {n}" for m, n in sorted(by_mod.items())))
    first = sorted(bad, key=lambda b: (str(b["source"]), int(b["row"])))  # type: ignore[call-overload]
    for b in first[:SHOW_REJECTS]:
        lines.append(f"  {b['split']:<6} {b['id']}  {b['error']}")
    if len(bad) > SHOW_REJECTS:
        lines.append(f"  ... {len(bad) - SHOW_REJECTS} more in the rejects file")
    return "\n".join(lines)
