"""Serving throughput and latency: the split topology (an encoder deployment per modality + fusion) against
the single one (the whole model in one deployment), side by side on one embedded Ray cluster in one run.

    .venv/bin/python bench/serve_topologies.py [--artifact artifacts/avt_digits] [--data data/avt_digits]
        [--config serve/local.yaml] [--requests 300] [--concurrency 1 8 32] [--rounds 3]
        [--out bench/results/serve_topologies.json]

Both applications come from the same Serve config (each fitted by `prepare_config`, as `mmfusion serve` does)
and serve the same artifact; the test split's records are sent over HTTP (multipart, all modalities). Rounds
alternate between the topologies so that a slow moment of the machine hits both alike; the table reports the
median round. Prints a Markdown table and writes JSON. A benchmark, not a test: nothing here asserts timings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mmfusion.cli import setup_logging
from mmfusion.serving.client import Client

log = logging.getLogger("bench")
TOPOLOGIES = ("split", "single")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(data: str, split: str, modalities: list[str], limit: int) -> list[dict[str, Any]]:
    from mmfusion.data.readers import iter_records

    rows: list[dict[str, Any]] = []
    for tb in iter_records(data, split, modalities=modalities):
        for r in tb.to_pylist():
            if not r["error"]:
                rows.append({m: r[m] for m in modalities if r[m] is not None and r[m] != ""})
            if len(rows) >= limit:
                return rows
    return rows


def _round(client: Client, items: list[dict[str, Any]], n: int, concurrency: int) -> dict[str, float]:
    def one(i: int) -> float:
        it = items[i % len(items)]
        t0 = time.perf_counter()
        client.predict(it.get("image"), it.get("audio"), it.get("text"))
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        lat = sorted(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    return {"rps": n / wall, "p50_ms": 1000 * lat[len(lat) // 2],
            "p95_ms": 1000 * lat[int(0.95 * (len(lat) - 1))]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", default="artifacts/avt_digits")
    p.add_argument("--data", default="data/avt_digits")
    p.add_argument("--split", default="test")
    p.add_argument("--config", default="serve/local.yaml")
    p.add_argument("--requests", type=int, default=300, help="requests per round")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="bench/results/serve_topologies.json")
    args = p.parse_args(argv)
    setup_logging()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster

    from ray import serve

    from mmfusion.artifact import read_artifact_info
    from mmfusion.runtime import init_ray
    from mmfusion.serving.config import check_serve_config, load_serve_config, prepare_config
    from mmfusion.serving.server import deploy_config

    base = load_serve_config(args.config)
    apps = []
    for topo in TOPOLOGIES:
        app = prepare_config(base, args.artifact, topology=topo)["applications"][0]
        app.update(name=topo, route_prefix=f"/{topo}")
        if topo == "single":  # the single deployment gets the CPUs the split ones share
            app["deployments"].append({"name": "Model", "num_replicas": 1, "max_ongoing_requests": 32,
                                       "user_config": {"max_batch_size": 32, "batch_wait_timeout_s": 0.005},
                                       "ray_actor_options": {"num_cpus": 0.9}})
        apps.append(app)
    port = _free_port()
    raw = {"proxy_location": "HeadOnly",
           "http_options": {"host": "127.0.0.1", "port": port, "request_timeout_s": 60},
           "applications": apps}
    init_ray()
    deploy_config(check_serve_config(raw, "bench config"))
    modalities = read_artifact_info(args.artifact).modalities
    items = _records(args.data, args.split, modalities, 1000)
    clients = {t: Client(f"http://127.0.0.1:{port}/{t}") for t in TOPOLOGIES}
    for c in clients.values():  # warm-up: first batches pay for lazy initialisation
        _round(c, items, 32, 8)
    results: list[dict[str, Any]] = []
    try:
        for conc in args.concurrency:
            rounds: dict[str, list[dict[str, float]]] = {t: [] for t in TOPOLOGIES}
            for _ in range(args.rounds):
                for t in TOPOLOGIES:  # interleaved: both see the same machine
                    rounds[t].append(_round(clients[t], items, args.requests, conc))
            row: dict[str, Any] = {"concurrency": conc}
            for t in TOPOLOGIES:
                med = sorted(rounds[t], key=lambda r: r["rps"])[len(rounds[t]) // 2]
                row[t] = {k: round(v, 2) for k, v in med.items()}
                row[t]["rps_rounds"] = [round(r["rps"], 2) for r in rounds[t]]
            row["split_over_single"] = round(row["split"]["rps"] / row["single"]["rps"], 3)
            results.append(row)
            log.info("concurrency %d: split %.1f req/s, single %.1f req/s", conc, row["split"]["rps"],
                     row["single"]["rps"])
        batching = {t: clients[t].metadata()["batching"] for t in TOPOLOGIES}
    finally:
        serve.shutdown()
    lines = ["| concurrency | split req/s | split p50 / p95 ms | single req/s | single p50 / p95 ms "
             "| split / single |",
             "|---|---|---|---|---|---|"]
    for r in results:
        s, g = r["split"], r["single"]
        lines.append(f"| {r['concurrency']} | {s['rps']:.1f} | {s['p50_ms']:.0f} / {s['p95_ms']:.0f} | "
                     f"{g['rps']:.1f} | {g['p50_ms']:.0f} / {g['p95_ms']:.0f} | "
                     f"{r['split_over_single']:.2f} |")
    mean_batch = {t: {k: v["mean_batch"] for k, v in b.items()} for t, b in batching.items()}
    lines.append(f"\nmean batch sizes: {json.dumps(mean_batch)}")
    sys.stdout.write("\n".join(lines) + "\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"artifact": str(Path(args.artifact).resolve()),
                               "requests_per_round": args.requests,
                               "rounds": args.rounds, "cpus": os.cpu_count(), "rows": results,
                               "summary": "per concurrency, the median round by throughput",
                               "batching": batching}, indent=1))
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
