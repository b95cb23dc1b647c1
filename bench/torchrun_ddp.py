"""Plain PyTorch DDP training over preprocessed rows: the floor bench/train_overhead.py holds Ray Train to.

    .venv/bin/torchrun --nproc_per_node 2 bench/torchrun_ddp.py --rows DUMP/train.npz --meta DUMP/meta.json
        [--epochs 4] [--threads 1] [--out DUMP/torchrun.json]

DUMP is what train_overhead.py wrote once: train.npz, the materialized train split's columns as preprocessed
(uint8 images, token ids, log-mel audio, labels, presence), and meta.json (the experiment config, the
InputSpec, the class count). No decoding here: the same tensors Ray Train's shards hold. Each rank builds the
same model as `mmfusion train` (mmfusion.models.build_model after torch.manual_seed(seed)), the same AdamW
parameter groups and cosine schedule (mmfusion.train.loop builders), the same loss and gradient clipping, and
collates each batch with the same MMCollate (uint8 images normalized per batch, as on Ray's workers). Rows are
split and shuffled per epoch by a DistributedSampler; batches are cut in the process, no DataLoader workers.
The epoch clock starts before the first batch is cut and stops after the epoch's counters are all-reduced,
as in mmfusion.train.loop.train_one_epoch. Rank 0 writes the per-epoch samples/s (all ranks' rows over its
epoch time), the wall time of the first step, the torch threads and the world size as JSON to --out.
"""

from __future__ import annotations

import time

LAUNCHED = time.time()  # the process's own start, before torch is imported

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from torch.utils.data import DistributedSampler  # noqa: E402

log = logging.getLogger("bench.torchrun_ddp")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", required=True, help="train.npz written by bench/train_overhead.py")
    p.add_argument("--meta", required=True, help="meta.json written by bench/train_overhead.py")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)

    from mmfusion.batch import InputSpec
    from mmfusion.config import validate_config
    from mmfusion.data.pipeline import MMCollate
    from mmfusion.models.model import build_model
    from mmfusion.train.loop import build_optimizer, build_scheduler, param_groups

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    meta = json.loads(Path(args.meta).read_text())
    cfg = validate_config(meta["experiment"], source=args.meta)
    spec = InputSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["spec"].items()})
    with np.load(args.rows) as z:
        rows = {k: z[k] for k in z.files}  # column -> (N, ...) numpy, as the object store holds them
    n = len(rows["label"])
    tc, oc = cfg.train, cfg.optim

    torch.manual_seed(cfg.seed)
    model = DistributedDataParallel(build_model(cfg.model, spec, num_classes=meta["num_classes"]))
    optimizer = build_optimizer(param_groups(model, oc.lr, oc.weight_decay, oc.encoder_lr), oc.name, oc.lr,
                                oc.weight_decay, oc.momentum)
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    steps_per_epoch = -(-len(sampler) // tc.batch_size)
    scheduler = build_scheduler(optimizer, oc.scheduler, steps_per_epoch * args.epochs,
                                warmup_steps=int(oc.warmup_epochs * steps_per_epoch))
    collate = MMCollate(spec)
    first_step_at: float | None = None
    history = []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        order = np.fromiter(iter(sampler), dtype=np.int64)
        loss_sum, hits, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.long), 0
        for start in range(0, len(order), tc.batch_size):
            idx = order[start:start + tc.batch_size]
            batch = collate({k: v[idx] for k, v in rows.items()})
            if first_step_at is None:
                first_step_at = time.time()
            labels = batch["label"]  # (B,)
            logits = model(batch)  # (B, K)
            loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if oc.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), oc.grad_clip)
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach().double() * labels.shape[0]  # no host sync per step
            hits += (logits.detach().argmax(-1) == labels).sum()
            count += labels.shape[0]
        stats = torch.stack([loss_sum, hits.double(), torch.tensor(float(count), dtype=torch.float64)])
        dist.all_reduce(stats)
        seconds = time.perf_counter() - t0
        loss_sum, correct, count = stats.tolist()
        history.append({"epoch": epoch, "samples_per_s": count / seconds, "seconds": seconds,
                        "train_loss": loss_sum / count, "train_accuracy": correct / count,
                        "samples": int(count)})
        if rank == 0:
            log.info("epoch %d/%d  train loss %.4f acc %.4f | %.0f samples/s", epoch + 1, args.epochs,
                     loss_sum / count, correct / count, count / seconds)
    if rank == 0:
        Path(args.out).write_text(json.dumps({
            "launched_at": LAUNCHED, "first_step_at": first_step_at, "world_size": world,
            "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "rows": n, "history": history}, indent=2) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
