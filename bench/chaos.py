"""Chaos (issue 13). Serving: a steady HTTP load at concurrency 16 on the split topology while a random
encoder replica is SIGKILLed every 10 s; the client retries a 503 after its Retry-After. Reports the share of
requests that succeed, every final status (a 500 or a hang counts against the run), and the recovery time of
each kill (SIGKILL -> the deployment has all its replicas RUNNING again). Training (--part train): one
`mmfusion train` run on 2 workers with max_failures=1; a Train worker is SIGKILLed after the first checkpoint,
then the driver (with its local Ray) after the next one, and the same command is run again; reports the
epochs each kill cost (checkpointed epochs that were trained again, plus the epoch in progress).

    .venv/bin/python bench/chaos.py [--part serve|train|both] [--artifact artifacts/avt_digits]
        [--data data/avt_digits] [--duration 120] [--kill-every 10] [--concurrency 16] [--replicas 2]
        [--retries 10] [--out bench/results/chaos.json]

Each encoder runs --replicas replicas (serve/local.yaml otherwise), so a kill leaves the other to answer
while Serve restarts the dead one. A benchmark, not a test: it prints the figures and writes JSON
(docs/reliability.md quotes them); nothing here asserts them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import requests

from mmfusion.cli import setup_logging

log = logging.getLogger("bench.chaos")
APP = "chaos"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _items(data: str, modalities: list[str], limit: int = 200) -> list[dict[str, Any]]:
    from mmfusion.data.readers import iter_records

    rows: list[dict[str, Any]] = []
    for tb in iter_records(data, "test", modalities=modalities):
        for r in tb.to_pylist():
            if not r["error"] and all(r[m] not in (None, "") for m in modalities):
                rows.append({m: r[m] for m in modalities})
            if len(rows) >= limit:
                return rows
    return rows


def _replicas(deployment_suffix: str = "Encoder") -> list[tuple[str, int]]:
    """(deployment, pid) of every live encoder replica of the app (same machine)."""
    import ray
    from ray.util.state import list_actors

    prefix = f"ServeReplica:{APP}:"
    out = []
    for a in list_actors(address=ray.get_runtime_context().gcs_address,
                         filters=[("state", "=", "ALIVE")], limit=1000):
        name = (a.class_name or "")[len(prefix):]
        if (a.class_name or "").startswith(prefix) and name.endswith(deployment_suffix) and a.pid:
            out.append((name, int(a.pid)))
    return out


def _running(deployment: str) -> int:
    from ray import serve
    from ray.serve.schema import ReplicaState

    dep = serve.status().applications[APP].deployments[deployment]
    return dep.replica_states.get(ReplicaState.RUNNING, 0)


class Load:
    """`concurrency` threads posting test records; a 503 is retried after Retry-After (at most `retries`)."""

    def __init__(self, url: str, items: list[dict[str, Any]], concurrency: int, retries: int,
                 timeout_s: float) -> None:
        self.url, self.items, self.retries, self.timeout_s = url, items, retries, timeout_s
        self.final: Counter[str] = Counter()  # final outcome per request: "200", "503", "500", "hang", ...
        self.attempts: Counter[int] = Counter()
        self.latency: list[float] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(concurrency)]

    def _one(self, s: requests.Session, item: dict[str, Any]) -> tuple[str, int]:
        files = {m: (m, v) if m != "text" else (None, v.encode()) for m, v in item.items()}
        for attempt in range(1, self.retries + 2):
            try:
                r = s.post(f"{self.url}/v1/predict", files=files, timeout=self.timeout_s)
            except requests.Timeout:
                return "hang", attempt
            except requests.ConnectionError:
                return "connection", attempt
            if r.status_code != 503 or attempt > self.retries:
                return str(r.status_code), attempt
            time.sleep(float(r.headers.get("Retry-After", "1") or 1))
        return "503", self.retries + 1

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        with requests.Session() as s:
            while not self.stop.is_set():
                t0 = time.monotonic()
                outcome, attempts = self._one(s, rng.choice(self.items))
                with self.lock:
                    self.final[outcome] += 1
                    self.attempts[attempts] += 1
                    if outcome == "200":
                        self.latency.append(time.monotonic() - t0)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=self.timeout_s * (self.retries + 2))


def _wait_recovered(deployment: str, target: int, killed_pid: int, before: set[int], killed_at: float,
                    timeout_s: float = 180.0) -> float | None:
    """Seconds from the kill until `deployment` is whole again: the killed process is gone, a replacement
    replica process exists, and `target` replicas are RUNNING (None: not within timeout_s). Serve's status
    still counts the dead replica as RUNNING until its controller notices, hence the replacement check."""
    while time.monotonic() - killed_at < timeout_s:
        pids = {pid for name, pid in _replicas() if name == deployment}
        if killed_pid not in pids and pids - before and _running(deployment) >= target:
            return time.monotonic() - killed_at
        time.sleep(0.25)
    return None


def _session_pids(sid: int, needle: str = "") -> list[int]:
    """Live processes of a session (the command started with start_new_session and its whole local Ray:
    Ray's workers each get their own process group, but stay in the session), optionally by cmdline."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state ppid pgrp session ...
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z" and needle in cmd:
            pids.append(int(stat.parent.name))
    return pids


def _last_epoch(run_dir: Path) -> int:
    """The epoch of the latest registered checkpoint (-1: none yet)."""
    try:
        snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return int(((snap.get("latest_checkpoint_result") or {}).get("metrics") or {}).get("epoch", -1))
    except (OSError, ValueError):
        return -1


def train_chaos(data: str, epochs: int, timeout_s: float = 1800.0) -> dict[str, Any]:
    import subprocess
    import tempfile

    import yaml

    from mmfusion.config import apply_overrides, read_yaml

    root = Path(tempfile.mkdtemp(prefix="chaos_train_"))
    raw = apply_overrides(read_yaml(Path("jobs/configs/tiny.yaml")), [
        f"data.path={Path(data).resolve()}", f"train.storage_path={root / 'runs'}", "train.run_name=chaos",
        f"train.epochs={epochs}", "train.num_workers=2", "train.max_failures=1"])
    cfg = root / "chaos.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    run_dir = root / "runs" / "chaos"
    cmd = [str(Path(sys.executable).parent / "mmfusion"), "train", str(cfg)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # own group: killing it takes its local Ray along

    def wait_epoch(above: int) -> int:
        while proc.poll() is None and time.monotonic() - t0 < timeout_s:
            if (e := _last_epoch(run_dir)) > above:
                return e
            time.sleep(0.2)
        raise RuntimeError(f"no checkpoint after epoch {above} (the run exited or timed out)")

    kills = []
    done = wait_epoch(-1)
    workers = _session_pids(proc.pid, "RayTrainWorker")
    os.kill(workers[0], signal.SIGKILL)
    kills.append({"killed": "a Train worker", "checkpointed_epochs_before": done + 1})
    log.info("SIGKILL Train worker %d after epoch %d", workers[0], done)
    done = wait_epoch(done)
    for pid in _session_pids(proc.pid):  # the driver and every process of its local Ray
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    kills.append({"killed": "the driver and its local Ray", "checkpointed_epochs_before": done + 1})
    log.info("SIGKILL driver group %d after epoch %d", proc.pid, done)
    while _session_pids(proc.pid) and time.monotonic() - t0 < timeout_s:
        time.sleep(0.2)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"the re-run failed: {out.stderr[-2000:]}")
    metrics = json.loads((Path(out.stdout.strip().splitlines()[-1]) / "metrics.json").read_text())
    starts = metrics["starts"]  # the epoch each attempt started at: [0, after the worker kill, re-run]
    for k, start in zip(kills, starts[1:], strict=False):
        k["resumed_at_epoch"] = start
        k["checkpointed_epochs_trained_again"] = k["checkpointed_epochs_before"] - start
        k["epochs_lost_at_most"] = k["checkpointed_epochs_trained_again"] + 1  # + the one in progress
    return {"epochs": epochs, "attempt_starts": starts, "kills": kills,
            "epochs_completed": [h["epoch"] for h in metrics["history"]],
            "wall_s": round(time.monotonic() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["serve", "train", "both"], default="both")
    p.add_argument("--epochs", type=int, default=6, help="training part: epochs of the run")
    p.add_argument("--artifact", default="artifacts/avt_digits")
    p.add_argument("--data", default="data/avt_digits")
    p.add_argument("--config", default="serve/local.yaml")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of load with kills")
    p.add_argument("--kill-every", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--replicas", type=int, default=2, help="replicas per encoder deployment")
    p.add_argument("--retries", type=int, default=10, help="client retries of a 503")
    p.add_argument("--timeout", type=float, default=60.0, help="client timeout per attempt: a hang")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/chaos.json")
    args = p.parse_args(argv)
    setup_logging()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster
    out = Path(args.out)
    res = json.loads(out.read_text()) if out.exists() else {}
    if args.part in ("serve", "both"):
        res["serving"] = serve_chaos(args)
    if args.part in ("train", "both"):
        res["training"] = train_chaos(args.data, args.epochs)
    sys.stdout.write(json.dumps(res, indent=2) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


def serve_chaos(args: argparse.Namespace) -> dict[str, Any]:
    from ray import serve

    from mmfusion.artifact import read_artifact_info
    from mmfusion.runtime import init_ray
    from mmfusion.serving.app import encoder_name
    from mmfusion.serving.config import check_serve_config, load_serve_config, prepare_config
    from mmfusion.serving.server import deploy_config

    raw = prepare_config(load_serve_config(args.config), args.artifact)
    app = raw["applications"][0]
    app.update(name=APP, route_prefix="/")
    modalities = read_artifact_info(args.artifact).modalities
    encoders = [encoder_name(m) for m in modalities]
    for dep in app["deployments"]:
        if dep["name"] in encoders:
            dep["num_replicas"] = args.replicas
            dep["ray_actor_options"] = {**dep.get("ray_actor_options", {}), "num_cpus": 0.1}
    port = _free_port()
    raw["http_options"].update(port=port)
    init_ray()
    deploy_config(check_serve_config(raw, "chaos config"))
    url = f"http://127.0.0.1:{port}"
    items = _items(args.data, modalities)
    load = Load(url, items, args.concurrency, args.retries, args.timeout)
    rng = random.Random(args.seed)
    kills: list[dict[str, Any]] = []
    watchers: list[threading.Thread] = []
    try:
        for _ in range(16):  # warm-up
            assert requests.post(f"{url}/v1/predict", files={"text": (None, b"seven")},
                                 timeout=60).status_code == 200
        load.start()
        t_end = time.monotonic() + args.duration
        next_kill = time.monotonic() + args.kill_every
        while time.monotonic() < t_end:
            time.sleep(max(0.0, next_kill - time.monotonic()))
            next_kill += args.kill_every
            victims = _replicas()
            if not victims:
                continue
            deployment, pid = rng.choice(victims)
            before = {p for name, p in victims if name == deployment}
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            log.info("SIGKILL %s replica pid %d", deployment, pid)
            kill = {"deployment": deployment, "pid": pid,
                    "at_s": round(killed_at - (t_end - args.duration), 1), "recovery_s": None}
            kills.append(kill)

            def watch(k: dict[str, Any] = kill, b: set[int] = before, t: float = killed_at) -> None:
                r = _wait_recovered(k["deployment"], args.replicas, k["pid"], b, t)
                k["recovery_s"] = None if r is None else round(r, 2)

            watcher = threading.Thread(target=watch, daemon=True)  # the next kill does not wait for it
            watcher.start()
            watchers.append(watcher)
        load.join()
        for w in watchers:
            w.join(timeout=180)
        after = requests.post(f"{url}/v1/predict", files={"text": (None, b"seven")}, timeout=60).status_code
    finally:
        import ray

        serve.shutdown()
        ray.shutdown()  # the training part starts its own cluster: never two at once
    total = sum(load.final.values())
    recov = [k["recovery_s"] for k in kills if k["recovery_s"] is not None]
    lat = sorted(load.latency)
    res = {
        "what": "steady multipart load on the split topology while a random encoder replica is SIGKILLed "
                "every kill_every seconds; the client retries a 503 after Retry-After",
        "artifact": args.artifact, "duration_s": args.duration, "kill_every_s": args.kill_every,
        "concurrency": args.concurrency, "replicas_per_encoder": args.replicas,
        "client_retries": args.retries,
        "requests": total, "final_status": dict(load.final.most_common()),
        "success_fraction": round(load.final["200"] / total, 5) if total else None,
        "responses_500": load.final["500"], "hangs": load.final["hang"],
        "attempts_histogram": {str(k): v for k, v in sorted(load.attempts.items())},
        "kills": kills,
        "recovery_s": {"mean": round(statistics.mean(recov), 2) if recov else None,
                       "max": max(recov) if recov else None, "not_recovered": len(kills) - len(recov)},
        "latency_ms_of_successes": {"p50": round(1000 * lat[len(lat) // 2]) if lat else None,
                                    "p99": round(1000 * lat[int(0.99 * (len(lat) - 1))]) if lat else None},
        "status_after_the_run": after,
        "machine": {"cpus": os.cpu_count()},
    }
    return res


if __name__ == "__main__":
    sys.exit(main())
