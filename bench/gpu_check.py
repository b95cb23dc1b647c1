"""GPU correctness check for a machine with a CUDA GPU: one prepared run, one JSON report.

What it shows, each step through the real entry points (`mmfusion train` / `mmfusion evaluate` on an
embedded Ray cluster):
1. resume placement: `train.checkpoint.resume` onto cuda puts AdamW's moments on the GPU and the next step
   runs; the old order (optimizer state loaded before the move) is run too and its failure recorded;
2. bf16 DDP training on the GPU (Ray Train, NCCL backend) killed with SIGKILL after its first checkpoint and
   re-run with the same command: the run resumes at the next epoch on the GPU and finishes;
3. fp16 training (float16 autocast + GradScaler) finishes with finite losses;
4. evaluation of the bf16 artifact on the test split.

    python bench/gpu_check.py --data DATA_DIR --out REPORT_DIR [--epochs 6]

Without a GPU it runs the same steps on the CPU (use_gpu=false) as a dry run of the script itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("gpu_check")
REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "import sys; from mmfusion.cli import main; sys.exit(main())"]


def resume_placement(device: torch.device) -> dict[str, Any]:
    """Checkpoint a tiny AdamW run on the CPU, resume it onto `device` both ways, take one step each."""
    from mmfusion.train.checkpoint import LoopState, resume, save_checkpoint
    from mmfusion.train.loop import build_optimizer, build_scheduler

    def fresh() -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        o = build_optimizer(m.parameters(), "adamw", 1e-3, 0.01)
        return m, o, build_scheduler(o, "cosine", 100)

    def step(m: nn.Module, o: torch.optim.Optimizer) -> None:
        x = torch.randn(8, 16, device=device)
        m(x).sum().backward()
        o.step()

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        m, o, s = fresh()
        m(torch.randn(8, 16)).sum().backward()
        o.step()
        save_checkpoint(Path(d), m.state_dict(), {"optimizer": o.state_dict(), "scheduler": s.state_dict()},
                        LoopState(epoch=0))
        m, o, s = fresh()
        m, _ = resume(Path(d), m, o, s, None, place=lambda mod: mod.to(device))
        out["moments_devices"] = sorted({str(t.device) for st in o.state.values() for k, t in st.items()
                                         if k != "step"})
        step(m, o)
        out["step_after_resume"] = "ok"
        m, o, s = fresh()  # the order before the fix: optimizer state first, then the move
        o.load_state_dict(torch.load(Path(d) / "optim.pt", weights_only=True)["optimizer"])
        m.to(device)
        out["old_order_moments_devices"] = sorted({str(t.device) for st in o.state.values()
                                                   for k, t in st.items() if k != "step"})
        try:
            step(m, o)
            out["old_order_step"] = "ok"
        except RuntimeError as e:
            out["old_order_step"] = f"RuntimeError: {str(e).splitlines()[0][:200]}"
    return out


def write_config(path: Path, data: Path, runs: Path, use_gpu: bool, precision: str, epochs: int,
                 name: str) -> Path:
    base = REPO / "jobs" / "configs" / "avt_digits.yaml"
    path.write_text(
        f"base: {base}\n"
        f"data: {{path: {data}}}\n"
        f"train: {{use_gpu: {str(use_gpu).lower()}, num_workers: 1, precision: {precision},\n"
        f"        epochs: {epochs},\n"
        f"        storage_path: {runs}, run_name: {name}, artifact_dir: {runs / (name + '_artifact')},\n"
        f"        early_stopping_patience: null}}\n")
    return path


def run(cmd: list[str], log_file: Path, timeout: float = 900) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    log_file.write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
    return p.returncode, p.stdout, time.perf_counter() - t0


def killed_then_resumed(cfg: Path, run_dir: Path, logs: Path) -> dict[str, Any]:
    """Start training, SIGKILL its process group once a checkpoint is registered, run the same command."""
    t0 = time.perf_counter()
    with open(logs / "train_killed.log", "w") as f:
        proc = subprocess.Popen([*CLI, "train", str(cfg)], stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        snapshot = run_dir / "checkpoint_manager_snapshot.json"
        while proc.poll() is None and not snapshot.exists() and time.perf_counter() - t0 < 600:
            time.sleep(0.2)
        killed = proc.poll() is None
        if killed:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(3)  # the killed local Ray's processes go with their group
    rc, stdout, seconds = run([*CLI, "train", str(cfg)], logs / "train_resumed.log")
    out: dict[str, Any] = {"killed_after_first_checkpoint": killed, "resumed_rc": rc,
                           "resumed_seconds": round(seconds, 1)}
    if rc == 0:
        artifact = Path(stdout.strip().splitlines()[-1])
        metrics = json.loads((artifact / "metrics.json").read_text())
        out.update(artifact=str(artifact), starts=metrics.get("starts"),
                   epochs=[h["epoch"] for h in metrics["history"]],
                   val_accuracy=[round(h["val_accuracy"], 4) for h in metrics["history"]],
                   train_loss=[round(h["train_loss"], 4) for h in metrics["history"]],
                   samples_per_s=[round(h["samples_per_s"]) for h in metrics["history"]],
                   learned=metrics.get("learned"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=6)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    report: dict[str, Any] = {"torch": torch.__version__, "cuda": gpu,
                              "device": torch.cuda.get_device_name(0) if gpu else "cpu",
                              "bf16_supported": gpu and torch.cuda.is_bf16_supported()}
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    runs = work / "runs"

    def save() -> None:
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))

    log.info("1/4 resume placement on %s", device)
    report["resume_placement"] = resume_placement(device)
    save()
    log.info("2/4 bf16 training, killed after its first checkpoint, then resumed")
    cfg = write_config(work / "bf16.yaml", args.data.resolve(), runs, gpu, "bf16" if gpu else "fp32",
                       args.epochs, "gpu_bf16")
    report["bf16_kill_resume"] = killed_then_resumed(cfg, runs / "gpu_bf16", args.out)
    save()
    log.info("3/4 fp16 training with a GradScaler")
    cfg16 = write_config(work / "fp16.yaml", args.data.resolve(), runs, gpu, "fp16" if gpu else "fp32",
                         max(2, args.epochs // 2), "gpu_fp16")
    rc, stdout, seconds = run([*CLI, "train", str(cfg16)], args.out / "train_fp16.log")
    fp16: dict[str, Any] = {"rc": rc, "seconds": round(seconds, 1)}
    if rc == 0:
        m = json.loads((Path(stdout.strip().splitlines()[-1]) / "metrics.json").read_text())
        fp16.update(train_loss=[round(h["train_loss"], 4) for h in m["history"]],
                    val_accuracy=[round(h["val_accuracy"], 4) for h in m["history"]],
                    learned=m.get("learned"))
    report["fp16"] = fp16
    save()
    artifact = report["bf16_kill_resume"].get("artifact")
    if artifact:
        log.info("4/4 evaluate the bf16 artifact on test")
        rc, stdout, seconds = run([*CLI, "evaluate", artifact, "--data", str(args.data.resolve()), "--split",
                                   "test"], args.out / "evaluate.log")
        report["evaluate"] = {"rc": rc, "seconds": round(seconds, 1), "stdout_tail": stdout[-1500:]}
    save()
    log.info("report: %s", args.out / "gpu_check.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
