"""Text only on AVT-Digits: the packaged pretrained MiniLM against the from-scratch byte BiLSTM, side by side
in one run, on the same splits, for several seeds.

    .venv/bin/python bench/pretrained_text.py [--seeds 0,1,2] [--data data/avt_digits]
        [--out bench/results/pretrained_text.json] [--minilm key=value ...] [--bilstm key=value ...]
        [--variant NAME ENCODER key=value ... [--variant ...]] [--variants bilstm,minilm,NAME,...]

Rows (each trained with `seed=S`, then evaluated on the test split in-process):
  bilstm  jobs/configs/avt_digits.yaml data.modalities=[text]  (the base config's from-scratch text encoder)
  minilm  jobs/configs/avt_digits_pretrained.yaml               (MiniLM from `make pretrained`, as configured)
  bilstm_aug10, minilm_no_aug  each with the other setting of data.text.augment_typo_rate (0.1 / 0)
  minilm_wordpieces  MiniLM reading its own word pieces (data.text.split_characters off, encoder lr 2e-4: the
                     pretrained config as it shipped before reading characters)
Extra overrides apply to one encoder (`--minilm train.epochs=2`). `--variant NAME ENCODER OVERRIDES...` adds a
row named NAME: ENCODER's config (bilstm or minilm) with those overrides (`--variant minilm_lr4 minilm
optim.encoder_lr.text=4e-4`); `--variants` picks the rows to run (default: bilstm, minilm,
bilstm_aug10, minilm_no_aug, minilm_wordpieces and every --variant given). Test accuracy is broken down by
the test row's language and by whether its word has typos (AVT-Digits' _provenance/test.parquet: the test
languages are unseen in training). Prints a table; writes JSON after every run (keeping the rows of other
seeds already in it, so the seeds may run one at a time). The summary: mean and spread per variant, and the
per-seed difference of each variant from bilstm.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from mmfusion.cli import setup_logging
from mmfusion.config import load_config
from mmfusion.evaluate.predict import predict_to_parquet
from mmfusion.evaluate.report import evaluate_artifact
from mmfusion.train.trainer import run_training

log = logging.getLogger("bench")
ENCODERS = {"bilstm": ("jobs/configs/avt_digits.yaml", ["data.modalities=[text]"]),
            "minilm": ("jobs/configs/avt_digits_pretrained.yaml", [])}
# the shipped configs' other side of the train-time typo augmentation (avt_digits_pretrained.yaml has it, the
# base config does not): each encoder is measured with and without it
AUGMENT_VARIANTS = {"bilstm_aug10": ("bilstm", ["data.text.augment_typo_rate=0.1"]),
                    "minilm_no_aug": ("minilm", ["data.text.augment_typo_rate=0"]),
                    # MiniLM on its own word pieces, as the config shipped before data.text.split_characters
                    "minilm_wordpieces": ("minilm", ["data.text.split_characters=false",
                                                     "data.text.max_length=12",
                                                     "optim.encoder_lr.text=2e-4"])}


def breakdown(pred_path: Path, data: str) -> dict[str, Any]:
    """Test accuracy per language and for words with / without typos, from predict's Parquet and the data's
    labels and provenance (empty when the data has no _provenance/test.parquet)."""
    prov_path = Path(data) / "_provenance" / "test.parquet"
    pred = pq.read_table(pred_path, columns=["id", "label"]).to_pylist()
    truth = {r["id"]: str(r["label"]) for r in
             pq.read_table(Path(data) / "test.parquet", columns=["id", "label"]).to_pylist()}
    prov = {r["id"]: r for r in pq.read_table(prov_path).to_pylist()} if prov_path.is_file() else {}
    groups: dict[str, list[bool]] = defaultdict(list)
    for r in pred:
        ok = r["label"] == truth[r["id"]]
        groups["all"].append(ok)
        p = prov.get(r["id"])
        if p is not None:
            groups[f"lang:{p['text_language']}"].append(ok)
            groups["typos" if p["text_typos"] else "no typos"].append(ok)
    return {g: {"rows": len(v), "accuracy": sum(v) / len(v)} for g, v in sorted(groups.items())}


def source_version() -> str:
    """The commit the bench ran from, `+dirty` when the working tree had changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def run_one(variant: str, name: str, seed: int, data: str, storage: str, extra: list[str]) -> dict[str, Any]:
    config, overrides = ENCODERS[name]
    run_name = f"pretrained-text-{variant}-seed{seed}"
    cfg = load_config(config, [f"data.path={data}", f"train.storage_path={storage}", f"seed={seed}",
                               f"train.run_name={run_name}", *overrides, *extra])
    old = Path(storage) / run_name
    if old.exists():  # a run of that name would resume from its checkpoints: measure a fresh one
        log.info("removing the earlier run %s", old)
        shutil.rmtree(old)
    t0 = time.perf_counter()
    run = run_training(cfg)
    train_s = time.perf_counter() - t0
    ev = evaluate_artifact(run.artifact, data=data, split="test", local=True)
    pred_path = Path(run.artifact) / "test_predictions.parquet"
    pred = predict_to_parquet(run.artifact, data, pred_path, split="test", local=True)
    history = run.metrics["history"]
    return {"variant": variant, "encoder": name, "seed": seed, "config": config,
            "overrides": [*overrides, *extra], "source": source_version(),
            "test_accuracy": ev.report["accuracy"], "test_macro_f1": ev.report["macro_f1"],
            f"best_{cfg.train.metric}": run.metrics.get(f"best_{cfg.train.metric}"),
            "epochs": run.metrics["epochs_run"], "train_seconds": round(train_s, 1),
            "epoch_seconds": [round(run.metrics["train_rows"] / h["samples_per_s"], 1) for h in history],
            "breakdown": breakdown(pred.out, data), "artifact": str(run.artifact)}


def variant_of(row: dict[str, Any]) -> str:
    return row.get("variant", row["encoder"])  # rows written before variants existed: the encoder's name


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant: test accuracy over the seeds (mean, sd, min, max, per seed) and the best val accuracy's
    mean; then each variant's per-seed difference from bilstm (the shipped from-scratch config), or from the
    variant a row names as its "baseline"."""
    out: dict[str, Any] = {}
    variants = list(dict.fromkeys(variant_of(r) for r in rows))
    for v in variants:
        mine = sorted((r for r in rows if variant_of(r) == v), key=lambda r: r["seed"])
        accs = [r["test_accuracy"] for r in mine]
        vals = [r["best_val_accuracy"] for r in mine if r.get("best_val_accuracy") is not None]
        out[v] = {"encoder": mine[0]["encoder"], "overrides": mine[0]["overrides"], "seeds": len(accs),
                  "mean": statistics.mean(accs), "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                  "min": min(accs), "max": max(accs),
                  "per_seed": {str(r["seed"]): r["test_accuracy"] for r in mine},
                  "val_mean": statistics.mean(vals) if vals else None}
    by_seed = {(variant_of(r), r["seed"]): r["test_accuracy"] for r in rows}
    # a row kept from an earlier checkout names the BiLSTM rows measured beside it ("baseline")
    baseline = {variant_of(r): r.get("baseline", "bilstm") for r in rows}
    for v in variants:
        base = baseline[v]
        if v == base or base not in variants:
            continue
        seeds = sorted(s for (w, s) in by_seed if w == v and (base, s) in by_seed)
        diffs = [by_seed[v, s] - by_seed[base, s] for s in seeds]
        if diffs:
            out[f"{v}_minus_{base}"] = {"seeds": seeds, "per_seed": diffs, "mean": statistics.mean(diffs),
                                        f"seeds_{v}_better": sum(d > 0 for d in diffs)}
    return out


def table(rows: list[dict[str, Any]]) -> str:
    groups = sorted({g for r in rows for g in r["breakdown"] if g != "all"})
    lines = ["| variant | seed | test acc | macro-F1 | " + " | ".join(g.removeprefix("lang:") for g in groups)
             + " | epochs | train s |", "|---" * (len(groups) + 6) + "|"]
    for r in rows:
        cells = [f"{r['breakdown'][g]['accuracy']:.2f}" if g in r["breakdown"] else "-" for g in groups]
        head = f"| {variant_of(r)} | {r['seed']} | {r['test_accuracy']:.3f} | {r['test_macro_f1']:.3f} | "
        lines.append(head + " | ".join(cells) + f" | {r['epochs']} | {r['train_seconds']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--data", default="data/avt_digits")
    p.add_argument("--out", default="bench/results/pretrained_text.json")
    p.add_argument("--storage", default="runs/bench-pretrained-text")
    p.add_argument("--encoders", default=None, help="deprecated name of --variants")
    p.add_argument("--variants", default=None,
                   help="rows to run, comma-separated (default: all defined)")
    p.add_argument("--variant", nargs="+", action="append", default=[], metavar="NAME ENCODER KEY=VALUE",
                   help="a named row: ENCODER's config (bilstm or minilm) with these overrides")
    p.add_argument("--minilm", nargs="*", default=[], help="overrides for the MiniLM runs only")
    p.add_argument("--bilstm", nargs="*", default=[], help="overrides for the BiLSTM runs only")
    args = p.parse_args(argv)
    per_encoder = {"bilstm": args.bilstm, "minilm": args.minilm}
    defined: dict[str, tuple[str, list[str]]] = {e: (e, per_encoder[e]) for e in ENCODERS}
    defined |= {k: (e, [*o, *per_encoder[e]]) for k, (e, o) in AUGMENT_VARIANTS.items()}
    for spec in args.variant:
        if len(spec) < 2 or spec[1] not in ENCODERS or spec[0] in ENCODERS or spec[0] in AUGMENT_VARIANTS:
            p.error(f"--variant {' '.join(spec)}: expected NAME ENCODER [KEY=VALUE ...], ENCODER one of "
                    f"{', '.join(ENCODERS)}, NAME not one of them")
        defined[spec[0]] = (spec[1], spec[2:])
    chosen = args.variants or args.encoders or ",".join(defined)
    names = [v for v in chosen.split(",") if v]
    unknown = [v for v in names if v not in defined]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; defined: {', '.join(defined)}")
    setup_logging()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    rows: list[dict[str, Any]] = []
    if out.is_file():  # rows of other seeds or variants measured before (one locked run per seed) are kept
        rows = [r for r in json.loads(out.read_text())["rows"] if r["seed"] not in seeds or variant_of(r)
                not in names]
    for seed in seeds:
        for name in names:
            encoder, extra = defined[name]
            log.info("%s (%s %s), seed %d", name, encoder, " ".join(extra), seed)
            rows.append(run_one(name, encoder, seed, args.data, args.storage, extra))
            doc = {"data": args.data, "rows": rows, "summary": summarize(rows)}
            out.write_text(json.dumps(doc, indent=1))
    sys.stdout.write(table(rows) + "\n\n" + json.dumps(summarize(rows), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
