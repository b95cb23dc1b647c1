"""Device check and side-by-side timing of `mmfusion predict` / `evaluate` / `evaluate --robustness` on a
Ray cluster with GPUs (run it on a GPU machine; on a CPU-only one it measures the CPU pool alone).

    python bench/predict_gpu.py --artifact artifacts/avt_digits --data data/avt_digits \
        [--reference preds_cpu.parquet] [--json bench/results/predict_gpu.json]

It starts a local Ray cluster with this machine's CPUs and GPUs (no dashboard), then:
  1. predict on the actor pool with device auto (cuda when there is a GPU) and with device cpu, side by side;
     checks the cuda pool is the one used and both give the same argmax (and the --reference file's, e.g.
     predictions made on a CPU-only machine);
  2. evaluate (same path): accuracy and the reject counts;
  3. an in-process Predictor on cuda: the model really sits on the GPU and agrees with the CPU one;
  4. robustness on the pool (table and seconds).
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

log = logging.getLogger("predict_gpu")


def _labels(path: Path) -> dict[str, str]:
    t = pq.read_table(path, columns=["id", "label"])
    return dict(zip(t["id"].to_pylist(), t["label"].to_pylist(), strict=True))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--reference", help="a predictions Parquet to compare the argmax with")
    p.add_argument("--json", default="bench/results/predict_gpu.json")
    p.add_argument("--skip-robustness", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import ray
    import torch

    from mmfusion.evaluate.predict import Predictor, predict_to_parquet
    from mmfusion.evaluate.report import evaluate_artifact
    from mmfusion.evaluate.robustness import evaluate_robustness

    gpus = torch.cuda.device_count()
    ray.init(num_cpus=os.cpu_count(), num_gpus=gpus, include_dashboard=False, logging_level="WARNING")
    out: dict = {"gpus": gpus, "cpus": os.cpu_count(), "torch": torch.__version__,
                 "device_name": torch.cuda.get_device_name(0) if gpus else None}
    tmp = Path(tempfile.mkdtemp())
    runs = {}
    for device in (["auto", "cpu"] if gpus else ["cpu"]):
        t0 = time.perf_counter()
        run = predict_to_parquet(args.artifact, args.data, tmp / f"{device}.parquet", split=args.split,
                                 device=device)
        runs[device] = run
        out[f"predict_{device}"] = {"seconds": round(time.perf_counter() - t0, 2), "rows": run.rows,
                                    "rejected": run.rejected, "skipped": run.skipped,
                                    "pool": run.pool.describe() if run.pool else None,
                                    "pool_device": run.pool.device if run.pool else None,
                                    "actors_used": run.actors}
    first = runs["auto" if gpus else "cpu"]
    got = _labels(first.out)
    if gpus:
        cpu = _labels(runs["cpu"].out)
        out["gpu_vs_cpu_argmax_agreement"] = float(np.mean([got[i] == cpu[i] for i in got]))
        out["gpu_over_cpu_speed"] = round(out["predict_cpu"]["seconds"] / out["predict_auto"]["seconds"], 3)
    if args.reference:
        ref = _labels(Path(args.reference))
        out["reference_argmax_agreement"] = float(np.mean([got[i] == ref[i] for i in got]))
        out["reference_rows_match"] = sorted(ref) == sorted(got)

    t0 = time.perf_counter()
    ev = evaluate_artifact(args.artifact, data=args.data, split=args.split)
    preds = ev.predictions
    assert preds is not None
    out["evaluate"] = {"seconds": round(time.perf_counter() - t0, 2), "accuracy": ev.report["accuracy"],
                       "rejected_rows": ev.report["rejected_rows"], "skipped_rows": ev.report["skipped_rows"],
                       "pool": preds.pool.describe() if preds.pool else None, "actors_used": preds.actors,
                       "argmax_equals_predict": [got[i] for i in preds.ids] == preds_labels(ev, preds)}

    if gpus:  # in-process on cuda: the model's weights on the GPU, the same answers as on the CPU
        from mmfusion.data.readers import read_records

        table = read_records(args.data, args.split).slice(0, 256)
        cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
        on_gpu, on_cpu = Predictor(args.artifact, device="cuda"), Predictor(args.artifact, device="cpu")
        a, b = on_gpu(cols)["probs"], on_cpu(cols)["probs"]
        out["in_process_cuda"] = {"param_device": str(next(on_gpu.art.model.parameters()).device),
                                  "max_prob_diff": float(np.abs(a - b).max()),
                                  "argmax_agreement": float(np.mean(a.argmax(1) == b.argmax(1)))}

    if not args.skip_robustness:
        t0 = time.perf_counter()
        rob = evaluate_robustness(args.artifact, data=args.data, split=args.split)
        out["robustness"] = {"seconds": round(time.perf_counter() - t0, 2), "results": rob.results}
        print(rob.table)
    ray.shutdown()
    print(json.dumps({k: v for k, v in out.items() if k != "robustness"}, indent=1))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    return out


def preds_labels(ev: Any, preds: Any) -> list[str]:
    """evaluate's predicted class names, in the order of preds.ids."""
    labels = [row["label"] for row in ev.report["per_class"]]
    return [labels[k] for k in preds.probs.argmax(axis=1)]


if __name__ == "__main__":
    main()
