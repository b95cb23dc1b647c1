"""The model floor on this CPU: FLOPs/sample of the demo model against a measured fp32 GEMM rate, and the
training throughput achieved against it (a CPU MFU figure; issue 15).

    .venv/bin/python bench/model_floor.py [--config jobs/configs/avt_digits.yaml] [--threads 1] [--workers 2]
        [--train-json bench/results/train_overhead.json] [--steps 30] [--rounds 3]
        [--out bench/results/model_floor.json]

- FLOPs/sample: `mmfusion model summary`'s count (mmfusion.models.summary.count_parts: one forward of one
  sample, every modality present, text at full length; 2 x multiply-adds of matmuls and convolutions).
  Training costs about 3 x that (forward, plus gradients for inputs and for weights).
- GEMM rate: torch.matmul in fp32 on --threads threads (the training layout's threads per rank) on the model's
  own GEMM shapes at the training batch size. The shapes are recorded from one forward of a batch of
  train.batch_size (convolutions as their im2col GEMM: M = B x H_out x W_out, K = C_in x kh x kw,
  N = C_out; the LSTM's per-step gates as the (B, hidden) x (hidden, 4 hidden) GEMMs they are); each
  distinct shape is timed alone, and the model-shaped rate is the FLOP-weighted one (all the model's GEMM
  FLOPs over the time the same GEMMs take). A 1024^3 GEMM gives the peak rate for comparison.
- Floor: samples/s = workers x rate / (3 x FLOPs/sample), with `workers` ranks of --threads threads each
  (on this 2-core machine: 2 x 1, the training layout).
- Achieved: an in-process loop of training steps (one process, --threads threads, the demo model, batches
  of train.batch_size in the collated contract, AdamW, gradient clipping), and the Ray Train and torchrun
  DDP medians of --train-json (bench/train_overhead.py's result), when it is there.
MFU = achieved samples/s x 3 x FLOPs/sample / (workers x rate), against the peak and the model-shaped rate.
Timings are medians over --rounds interleaved repetitions.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.model_floor")
GEMM_OPS = {"mm", "addmm", "bmm", "convolution"}


class GemmShapes(TorchDispatchMode):
    """Records every matmul and convolution a forward runs as the (M, K, N) of the GEMM it amounts to."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: Counter[tuple[int, int, int]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = func.overloadpacket.__name__
        if name in GEMM_OPS:
            self.shapes.update(gemm_shapes(name, args))
        return func(*args, **(kwargs or {}))


def gemm_shapes(name: str, args: tuple) -> list[tuple[int, int, int]]:
    """(M, K, N) GEMMs of one mm / addmm / bmm / convolution call."""
    if name == "mm":
        (m, k), (_, n) = args[0].shape, args[1].shape
        return [(m, k, n)]
    if name == "addmm":
        (m, k), (_, n) = args[1].shape, args[2].shape
        return [(m, k, n)]
    if name == "bmm":
        (b, m, k), (_, _, n) = args[0].shape, args[1].shape
        return [(m, k, n)] * b
    x, w = args[0], args[1]  # convolution: (B, C_in, H, W), (C_out, C_in / groups, kh, kw)
    stride, padding, dilation, groups = args[3], args[4], args[5], args[8]
    out = [(size + 2 * p - d * (k - 1) - 1) // s + 1
           for size, k, s, p, d in zip(x.shape[2:], w.shape[2:], stride, padding, dilation, strict=True)]
    return [(x.shape[0] * math.prod(out), math.prod(w.shape[1:]), w.shape[0] // groups)] * groups


def time_gemm(m: int, k: int, n: int, min_s: float = 0.1) -> float:
    """Seconds per fp32 (m, k) @ (k, n): the best of 3 timed loops of at least min_s each."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    reps, dt = 1, 0.0
    while dt < min_s:  # calibrate (and warm up)
        reps = max(2 * reps, int(reps * min_s / dt) + 1) if dt else 1
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        dt = time.perf_counter() - t0
    best = dt / reps
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def train_steps(model: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int, oc) -> float:  # noqa: ANN001
    """Samples/s of `steps` training steps (forward, loss, backward, clip, AdamW) after 3 warm-up steps."""
    import torch.nn.functional as F

    from mmfusion.train.loop import build_optimizer, param_groups

    opt = build_optimizer(param_groups(model, oc.lr, oc.weight_decay, oc.encoder_lr), oc.name, oc.lr,
                          oc.weight_decay, oc.momentum)
    model.train()
    t0 = 0.0
    for i in range(steps + 3):
        if i == 3:
            t0 = time.perf_counter()
        loss = F.cross_entropy(model(batch).float(), batch["label"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), oc.grad_clip or math.inf)
        opt.step()
    return steps * batch["label"].shape[0] / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "jobs" / "configs" / "avt_digits.yaml"))
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank, as in training")
    p.add_argument("--workers", type=int, default=2, help="ranks the machine runs at once")
    p.add_argument("--train-json", default=str(REPO / "bench" / "results" / "train_overhead.json"))
    p.add_argument("--steps", type=int, default=30, help="timed in-process training steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "model_floor.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)

    from mmfusion.config import load_config
    from mmfusion.data.preprocessor import input_spec
    from mmfusion.models.model import build_model
    from mmfusion.models.summary import count_parts, example_batch, num_classes_of

    cfg = load_config(args.config, [])
    spec = input_spec(cfg.data)
    num_classes, _ = num_classes_of(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, spec, num_classes, load_weights=False)
    parts = count_parts(model, spec)
    flops = parts["total"].flops  # forward FLOPs per sample
    bs = cfg.train.batch_size

    recorder = GemmShapes()
    model.eval()
    with recorder, torch.no_grad():
        model(example_batch(spec, batch_size=bs))
    shapes = recorder.shapes
    gemm_flops = sum(2 * m * k * n * c for (m, k, n), c in shapes.items())
    log.info("forward FLOPs/sample %.2fM (summary); %d GEMM shapes, %d calls, %.2fM FLOPs/sample as GEMMs",
             flops / 1e6, len(shapes), sum(shapes.values()), gemm_flops / bs / 1e6)

    batch = example_batch(spec, batch_size=bs, seed=1)
    batch["label"] = torch.randint(0, num_classes, (bs,), generator=torch.Generator().manual_seed(1))
    raw: dict[str, list] = {"peak_gflops": [], "model_shaped_gflops": [], "in_process_samples_per_s": [],
                            "per_shape_s": []}
    for r in range(args.rounds):
        peak = 2 * 1024**3 / time_gemm(1024, 1024, 1024) / 1e9
        per_shape = {s: time_gemm(*s) for s in shapes}
        shaped = gemm_flops / sum(per_shape[s] * c for s, c in shapes.items()) / 1e9
        sps = train_steps(model, batch, args.steps, cfg.optim)
        raw["peak_gflops"].append(peak)
        raw["model_shaped_gflops"].append(shaped)
        raw["in_process_samples_per_s"].append(sps)
        raw["per_shape_s"].append({f"{m}x{k}x{n}": t for (m, k, n), t in per_shape.items()})
        log.info("round %d: peak %.1f GFLOP/s, model-shaped %.1f GFLOP/s, in-process training %.0f samples/s",
                 r, peak, shaped, sps)
    peak, shaped = (statistics.median(raw[k]) for k in ("peak_gflops", "model_shaped_gflops"))
    in_proc = statistics.median(raw["in_process_samples_per_s"])
    train_flops = 3 * flops  # per sample: forward + backward

    def floor(rate_gflops: float, ranks: int) -> float:
        return ranks * rate_gflops * 1e9 / train_flops

    achieved = {"in_process_1_rank": {"samples_per_s": in_proc, "ranks": 1}}
    train_json = Path(args.train_json)
    if train_json.exists():
        tr = json.loads(train_json.read_text())
        for side in ("ray", "torchrun"):
            achieved[f"{side}_ddp"] = {"samples_per_s": tr["median_samples_per_s"][side],
                                       "ranks": tr["config"]["workers"], "from": str(train_json.name)}
    else:
        log.warning("%s is missing: run bench/train_overhead.py for the DDP figures", train_json)
    for a in achieved.values():
        a["mfu_vs_peak"] = a["samples_per_s"] / floor(peak, a["ranks"])
        a["mfu_vs_model_shaped"] = a["samples_per_s"] / floor(shaped, a["ranks"])
    out = {
        "what": "FLOPs/sample of the demo model, a measured fp32 GEMM rate, the implied floor samples/s and "
                "the achieved training samples/s (CPU MFU)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(),
                    "note": "shared with other jobs while measuring: medians over rounds"},
        "model": {"config": str(Path(args.config).relative_to(REPO) if REPO in Path(args.config).parents
                                 else args.config),
                  "params": parts["total"].params, "forward_flops_per_sample": flops,
                  "train_flops_per_sample": train_flops,
                  "flops_by_part": {k: v.flops for k, v in parts.items()},
                  "gemm_flops_per_sample": gemm_flops / bs, "batch_size": bs,
                  "gemm_shapes": {f"{m}x{k}x{n}": c for (m, k, n), c in shapes.items()}},
        "gemm_gflops": {"peak_1024": peak, "model_shaped": shaped, "threads": args.threads},
        "floor_samples_per_s": {"per_rank_peak": floor(peak, 1), "per_rank_model_shaped": floor(shaped, 1),
                                "machine_peak": floor(peak, args.workers),
                                "machine_model_shaped": floor(shaped, args.workers), "ranks": args.workers},
        "achieved": achieved,
        "runs": raw,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"forward {flops / 1e6:.1f} MFLOP/sample, training {train_flops / 1e6:.0f} MFLOP/sample")
    print(f"fp32 GEMM, {args.threads} thread(s): peak {peak:.1f} GFLOP/s, model-shaped {shaped:.1f} GFLOP/s")
    print("| run | ranks | samples/s | floor (peak) | MFU vs peak | MFU vs model-shaped |")
    print("|---|---|---|---|---|---|")
    for name, a in achieved.items():
        print(f"| {name} | {a['ranks']} | {a['samples_per_s']:.0f} | {floor(peak, a['ranks']):.0f} | "
              f"{a['mfu_vs_peak']:.2f} | {a['mfu_vs_model_shaped']:.2f} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
