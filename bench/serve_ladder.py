"""The serving ladder (issue 15): the in-process floor, the load generator's own ceiling, then the monolith,
single and split topologies over HTTP at several concurrencies, with dynamic batching on (as configured, and
with batch_wait_timeout_s 0) and off, under Serve's default and "fast" runtime settings, all in one run.

    .venv/bin/python bench/serve_ladder.py [--artifact artifacts/avt_digits] [--data data/avt_digits]
        [--config serve/local.yaml] [--requests 200] [--concurrency 1 4 16]
        [--out bench/results/serve_ladder.json]

Rungs, measured side by side on the same machine:
- floor: decode + preprocess + forward through the serving engine's ModelRunner in this process, in batches of
  the size the server forms at each concurrency (min(concurrency, max_batch_size)), with the torch threads the
  Model replica gets; also at batch 1, whose ratio to the batched floor bounds what batching can give;
- client ceiling: the same async client (aiohttp, pre-encoded multipart bodies) against a no-op aiohttp app
  in a separate process on 127.0.0.1: if the server rungs come near it, the client is the cap;
- Serve no-ops: a no-op ingress (proxy -> replica) and a no-op ingress -> no-op backend (proxy -> replica ->
  replica): Serve's own ceiling for one and two hops, without model work;
- monolith (proxy -> one replica with the model), single (proxy -> Ingress -> Model) and split topologies,
  each deployed alone from the Serve config as `mmfusion serve` deploys it (prepare_config), at each
  concurrency, batching "on" (the config's user_config), "wait0" (the same max_batch_size,
  batch_wait_timeout_s 0: a batch takes what is queued, never waits) and "off" (max_batch_size 1); the modes
  are user_config updates (no restart). Each cell reports throughput, p50/p99 latency and the mean batch size
  the replicas formed during it; ratios are against the floor at the same concurrency.
Writes JSON and a PNG (throughput against concurrency). A benchmark: nothing here asserts timings.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import logging
import multiprocessing as mp
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from mmfusion.cli import setup_logging
from mmfusion.serving.server import FAST_SERVE_ENV

log = logging.getLogger("bench")
TOPOLOGIES = ("monolith", "single", "split")
BATCH_MODES = ("on", "wait0", "off")
# Ray Serve's own runtime switches (read from the environment by every Ray process at start): "default" is
# Serve as shipped; "fast" keeps user code and the router on each process's event loop (no thread hop per
# request), passes handle results over gRPC instead of the object store, and keeps Serve's logs in files
# (`mmfusion serve`'s default since this benchmark: mmfusion.serving.server.FAST_SERVE_ENV)
SERVE_ENV: dict[str, dict[str, str]] = {"default": {}, "fast": dict(FAST_SERVE_ENV)}
BATCHED = {"monolith": ["Monolith"], "single": ["Model"],
           "split": ["ImageEncoder", "TextEncoder", "AudioEncoder", "Fusion"]}


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


def _multipart(item: dict[str, Any]) -> tuple[bytes, str]:
    """One request body as the client library sends it (files image/audio, field text), encoded once."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in item.items():
        if name == "text":
            head = 'Content-Disposition: form-data; name="text"\r\n\r\n'
            data = value.encode("utf-8")
        else:
            head = (f'Content-Disposition: form-data; name="{name}"; filename="{name}"\r\n'
                    "Content-Type: application/octet-stream\r\n\r\n")
            data = value
        parts.append(f"--{boundary}\r\n{head}".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


# ------------------------------------------------------------------------------------------- the client


async def _load(url: str, bodies: list[tuple[bytes, str]], n: int, concurrency: int,
                warmup: int) -> dict[str, Any]:
    """`concurrency` workers on one aiohttp session, each sending the next body as soon as its previous answer
    came back (closed loop). -> throughput and latency percentiles over the n measured requests."""
    import aiohttp

    lat: list[float] = []
    errors: dict[str, int] = {}
    counter = iter(range(warmup + n))
    start = [0.0]

    async def worker(session: aiohttp.ClientSession) -> None:
        for i in counter:
            if i == warmup:
                start[0] = time.perf_counter()
            body, ctype = bodies[i % len(bodies)]
            t0 = time.perf_counter()
            async with session.post(url, data=body, headers={"Content-Type": ctype}) as r:
                await r.read()
                status = r.status
            if i >= warmup:
                lat.append(time.perf_counter() - t0)
                if status != 200:
                    errors[str(status)] = errors.get(str(status), 0) + 1

    conn = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    wall = time.perf_counter() - start[0]
    lat.sort()
    return {"rps": round(len(lat) / wall, 1), "p50_ms": round(1000 * lat[len(lat) // 2], 1),
            "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1),
            "requests": len(lat), "errors": errors}


def _noop_server(port: int) -> None:
    """A bare aiohttp app that reads the body and answers a fixed JSON (the client's ceiling)."""
    from aiohttp import web

    answer = json.dumps({"label": "0", "index": 0, "probabilities": {}, "modalities": []}).encode()

    async def predict(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=answer, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/predict", predict)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _client_ceiling(bodies: list[tuple[bytes, str]], n: int, concurrency: list[int]) -> dict[str, Any]:
    port = _free_port()
    proc = mp.get_context("spawn").Process(target=_noop_server, args=(port,), daemon=True)
    proc.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        url = f"http://127.0.0.1:{port}/v1/predict"
        return {str(c): asyncio.run(_load(url, bodies, n, c, warmup=2 * c)) for c in concurrency}
    finally:
        proc.terminate()
        proc.join(5)


# -------------------------------------------------------------------------------------------- the floor


def _floor(artifact: str, items: list[dict[str, Any]], batch_sizes: list[int], threads: int,
           n: int) -> dict[str, Any]:
    """Rows/s of ModelRunner (decode + preprocess + encoders + fusion) in this process, per batch size."""
    import torch

    from mmfusion.artifact import load_artifact
    from mmfusion.serving.engine import ModelRunner

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        art = load_artifact(artifact)
        runner = ModelRunner(art.model, art.cfg.data, torch.device("cpu"))
        out: dict[str, Any] = {}
        for bs in sorted(set(batch_sizes)):
            rows = [items[i % len(items)] for i in range(max(n, bs))]
            runner(rows[:bs])  # warm-up
            t0 = time.perf_counter()
            for i in range(0, len(rows), bs):
                runner(rows[i:i + bs])
            out[str(bs)] = round(len(rows) / (time.perf_counter() - t0), 1)
        return out
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------- the server


def _serve_config(config: str, artifact: str, port: int, batching: str = "on",
                  topologies: tuple[str, ...] = TOPOLOGIES) -> dict[str, Any]:
    """The topologies as applications of one Serve config (each fitted as `mmfusion serve` fits it; the
    benchmark deploys one at a time: their CPU reservations are each sized for the whole machine).
    batching "wait0": batch_wait_timeout_s 0 on every batched deployment; "off": max_batch_size 1 too."""
    from mmfusion.serving.batching import BatchConfig
    from mmfusion.serving.config import check_serve_config, load_serve_config, prepare_config

    base = load_serve_config(config)
    apps = []
    for topo in topologies:
        app = prepare_config(base, artifact, topology=topo)["applications"][0]
        app.update(name=topo, route_prefix=f"/{topo}")
        have = {d["name"]: d for d in app["deployments"]}
        for name in BATCHED[topo]:
            dep = have.get(name)
            if dep is None:
                dep = {"name": name}
                app["deployments"].append(dep)
            knobs = BatchConfig.model_validate(dep.get("user_config") or {})
            if batching == "wait0":
                dep["user_config"] = {"max_batch_size": knobs.max_batch_size, "batch_wait_timeout_s": 0.0}
            elif batching == "off":
                dep["user_config"] = {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}
        apps.append(app)
    raw = copy.deepcopy(base)
    raw["http_options"] = {**raw.get("http_options", {}), "host": "127.0.0.1", "port": port}
    raw["applications"] = apps
    return check_serve_config(raw, "bench config")


def _batch_rows(stats: dict[str, Any]) -> tuple[int, int]:
    return (sum(s["batches"] for s in stats.values()), sum(s["rows"] for s in stats.values()))


def _metadata(url: str) -> dict[str, Any]:
    import requests

    return requests.get(f"{url}/v1/metadata", timeout=30).json()["batching"]


def _model_batch_size(config: str, artifact: str) -> int:
    from mmfusion.serving.batching import BatchConfig

    cfg = _serve_config(config, artifact, 8000)
    single = next(a for a in cfg["applications"] if a["name"] == "single")
    model = next(d for d in single["deployments"] if d["name"] == "Model")
    return BatchConfig.model_validate(model.get("user_config") or {}).max_batch_size


def _model_threads(config: str, artifact: str) -> int:
    cfg = _serve_config(config, artifact, 8000)
    return int(cfg["applications"][0]["args"].get("torch_threads") or (os.cpu_count() or 1))


def _noop_apps() -> dict[str, Any]:
    """Serve's own ceiling on this machine: a no-op ingress that reads the body and answers a constant
    ("noop": proxy -> one replica), and the same in front of a no-op backend ("noop_hop": proxy -> replica ->
    replica, the single topology's shape without any model work)."""
    from ray import serve
    from starlette.requests import Request

    answer = {"label": "0", "index": 0, "probabilities": {}, "modalities": []}

    @serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.1})
    class Backend:
        async def __call__(self, values: dict[str, Any]) -> dict[str, Any]:
            return answer

    @serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.1})
    class Front:
        def __init__(self, backend: Any = None) -> None:
            self.backend = backend

        async def __call__(self, request: Request) -> dict[str, Any]:
            body = await request.body()
            if self.backend is None:
                return answer
            return await self.backend.remote({"n": len(body)})

    return {"noop": Front.bind(), "noop_hop": Front.bind(Backend.bind())}


def _serve_rungs(args: argparse.Namespace, profile: str, bodies: list[tuple[bytes, str]],
                 floor: dict[str, Any]) -> dict[str, Any]:
    """The topologies x batch modes x concurrency on a fresh embedded cluster started with the Serve
    environment `profile` (SERVE_ENV), which every Ray process inherits. Each topology runs alone (a config
    deploy replaces the previous topology's application)."""
    import ray
    from ray import serve

    from mmfusion.runtime import init_ray
    from mmfusion.serving.server import deploy_config

    saved = {k: os.environ.get(k) for k in SERVE_ENV[profile]}
    os.environ.update(SERVE_ENV[profile])
    port = _free_port()
    cells: dict[str, Any] = {t: {b: {} for b in BATCH_MODES} for t in TOPOLOGIES}
    noop: dict[str, Any] = {}
    cells["serve_noop"] = noop
    init_ray()
    try:
        deploy_config(_serve_config(args.config, args.artifact, port, topologies=TOPOLOGIES[:1]))
        for name, app in _noop_apps().items():  # imperative apps: later config deploys leave them alone
            serve.run(app, name=name, route_prefix=f"/{name}")
            noop[name] = {str(c): asyncio.run(_load(f"http://127.0.0.1:{port}/{name}", bodies, args.requests,
                                                    c, warmup=2 * c)) for c in args.concurrency}
            serve.delete(name)
            log.info("[%s] Serve %s: %s req/s", profile, name, {c: r["rps"] for c, r in noop[name].items()})
        for topo in TOPOLOGIES:
            for batching in BATCH_MODES:
                deploy_config(_serve_config(args.config, args.artifact, port, batching, (topo,)))
                url = f"http://127.0.0.1:{port}/{topo}"
                if batching == BATCH_MODES[0]:  # lazy initialisation of a freshly deployed topology
                    asyncio.run(_load(f"{url}/v1/predict", bodies, 32, 8, warmup=0))
                for c in args.concurrency:
                    b0, r0 = _batch_rows(_metadata(url))
                    cell = asyncio.run(_load(f"{url}/v1/predict", bodies, args.requests, c, warmup=2 * c))
                    b1, r1 = _batch_rows(_metadata(url))
                    cell["mean_batch"] = round((r1 - r0) / max(1, b1 - b0), 2)
                    cell["over_floor"] = round(cell["rps"] / floor["rps"][str(c)], 3)
                    cells[topo][batching][str(c)] = cell
                    log.info("[%s] %s batching %s c=%d: %.1f req/s p50 %.0f ms p99 %.0f ms, mean batch %.2f",
                             profile, topo, batching, c, cell["rps"], cell["p50_ms"], cell["p99_ms"],
                             cell["mean_batch"])
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return cells


def _plot(result: dict[str, Any], path: Path) -> None:
    """Throughput against concurrency, one panel per Serve environment; the floor and the client's ceiling
    as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = result["concurrency"]
    envs = list(result["cells_by_env"])
    fig, axes = plt.subplots(1, len(envs), figsize=(6.5 * len(envs), 4.5), sharey=True, squeeze=False)
    for ax, env in zip(axes[0], envs, strict=True):
        cells = result["cells_by_env"][env]
        for topo, color in zip(TOPOLOGIES, ("tab:green", "tab:blue", "tab:orange"), strict=True):
            for batching, style in zip(BATCH_MODES, ("-o", ":^", "--s"), strict=True):
                ys = [cells[topo][batching][str(c)]["rps"] for c in conc]
                ax.plot(conc, ys, style, color=color, label=f"{topo}, batching {batching}")
        ax.plot(conc, [result["floor"]["rps"][str(c)] for c in conc], "k-", lw=2, label="in-process floor")
        ax.plot(conc, [result["client_ceiling"][str(c)]["rps"] for c in conc], ":", color="gray",
                label="client vs no-op server")
        for name, row in cells["serve_noop"].items():
            ax.plot(conc, [row[str(c)]["rps"] for c in conc], "-.",
                    color="silver" if name == "noop" else "tan", label=f"Serve {name} (no model)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.set_xlabel("concurrent requests")
        ax.set_title(f"Serve env: {env}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("requests/s")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Serving ladder on {result['cpus']} CPUs: throughput vs concurrency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", default="artifacts/avt_digits")
    p.add_argument("--data", default="data/avt_digits")
    p.add_argument("--split", default="test")
    p.add_argument("--config", default="serve/local.yaml")
    p.add_argument("--requests", type=int, default=200, help="measured requests per cell")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--serve-env", nargs="+", choices=sorted(SERVE_ENV), default=["default", "fast"],
                   help="Ray Serve runtime settings to measure the server rungs under, each on a fresh "
                        "cluster; the last one is the headline")
    p.add_argument("--out", default="bench/results/serve_ladder.json")
    args = p.parse_args(argv)
    setup_logging()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster
    t_start = time.perf_counter()

    from mmfusion.artifact import read_artifact_info

    modalities = read_artifact_info(args.artifact).modalities
    items = _records(args.data, args.split, modalities, 1000)
    bodies = [_multipart(it) for it in items]
    max_batch = _model_batch_size(args.config, args.artifact)
    threads = _model_threads(args.config, args.artifact)
    sizes = {str(c): min(c, max_batch) for c in args.concurrency}
    log.info("%d test records; floor with %d torch thread(s), batch sizes %s", len(items), threads, sizes)
    floor_bs = _floor(args.artifact, items, [1, *sizes.values()], threads, args.requests)
    floor = {"torch_threads": threads, "batch_size": sizes, "rps_by_batch": floor_bs,
             "rps": {c: floor_bs[str(bs)] for c, bs in sizes.items()}}
    log.info("floor rows/s by batch size: %s", floor_bs)
    ceiling = _client_ceiling(bodies, 4 * args.requests, args.concurrency)
    log.info("client ceiling (no-op server): %s", {c: r["rps"] for c, r in ceiling.items()})

    cells: dict[str, dict[str, Any]] = {}
    for profile in args.serve_env:
        cells[profile] = _serve_rungs(args, profile, bodies, floor)
    main_profile = args.serve_env[-1]
    top = str(max(args.concurrency))
    summary = {"serve_env": main_profile, **_summary(cells[main_profile], floor, floor_bs, ceiling, top)}
    result = {"artifact": str(Path(args.artifact).resolve()), "config": args.config,
              "cpus": os.cpu_count(), "requests_per_cell": args.requests, "concurrency": args.concurrency,
              "floor": floor, "client_ceiling": ceiling, "serve_env": {p: SERVE_ENV[p] for p in cells},
              "cells_by_env": cells, "cells": cells[main_profile], "summary": summary,
              "summary_by_env": {p: _summary(c, floor, floor_bs, ceiling, top) for p, c in cells.items()},
              "wall_s": round(time.perf_counter() - t_start, 1)}
    text = "\n\n".join(_table(c, floor, ceiling, args.concurrency, p) for p, c in cells.items())
    sys.stdout.write(text + "\n" + json.dumps(result["summary_by_env"], indent=1) + "\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    _plot(result, out.with_suffix(".png"))
    log.info("wrote %s and %s (%.0f s)", out, out.with_suffix(".png"), result["wall_s"])
    return 0


def _summary(cells: dict[str, Any], floor: dict[str, Any], floor_bs: dict[str, float],
             ceiling: dict[str, Any], top: str) -> dict[str, Any]:
    """Ratios at the highest concurrency ("on": batching as configured)."""
    def rps(topo: str, mode: str = "on") -> float:
        return cells[topo][mode][top]["rps"]

    noop = cells["serve_noop"]
    return {
        **{f"{t}_over_floor_at_max_concurrency": cells[t]["on"][top]["over_floor"] for t in TOPOLOGIES},
        "best_mode_over_floor_at_max_concurrency": {
            t: dict(zip(("over_floor", "batching"),
                        max((cells[t][b][top]["over_floor"], b) for b in BATCH_MODES), strict=True))
            for t in TOPOLOGIES},
        "batching_on_over_off_at_max_concurrency": {
            t: round(rps(t) / rps(t, "off"), 2) for t in TOPOLOGIES},
        "batching_wait0_over_off_at_max_concurrency": {
            t: round(rps(t, "wait0") / rps(t, "off"), 2) for t in TOPOLOGIES},
        "batching_wait0_over_on_at_max_concurrency": {
            t: round(rps(t, "wait0") / rps(t), 2) for t in TOPOLOGIES},
        "mean_batch_at_max_concurrency": {
            t: {b: cells[t][b][top]["mean_batch"] for b in BATCH_MODES} for t in TOPOLOGIES},
        "floor_batched_over_batch1": round(floor["rps"][top] / floor_bs["1"], 2),
        "monolith_over_single_at_max_concurrency": round(rps("monolith") / rps("single"), 3),
        "split_over_single_at_max_concurrency": round(rps("split") / rps("single"), 3),
        "split_over_monolith_at_max_concurrency": round(rps("split") / rps("monolith"), 3),
        "monolith_over_serve_noop_at_max_concurrency": round(rps("monolith") / noop["noop"][top]["rps"], 3),
        "single_over_serve_noop_hop_at_max_concurrency": round(
            rps("single") / noop["noop_hop"][top]["rps"], 3),
        "serve_noop_over_floor_at_max_concurrency": round(noop["noop"][top]["rps"] / floor["rps"][top], 3),
        "serve_noop_hop_over_floor_at_max_concurrency": round(
            noop["noop_hop"][top]["rps"] / floor["rps"][top], 3),
        "server_over_client_ceiling_at_max_concurrency": round(rps("monolith") / ceiling[top]["rps"], 3),
    }


def _table(cells: dict[str, Any], floor: dict[str, Any], ceiling: dict[str, Any], conc: list[int],
           profile: str) -> str:
    head = " | ".join(f"c={c} req/s (p50/p99 ms, x floor, b)" for c in conc)
    lines = [f"Serve env {profile}:", f"| rung | batching | {head} |",
             "|---|---|" + "---|" * len(conc)]
    lines.append("| in-process floor | batch min(c, max) | " + " | ".join(
        f"{floor['rps'][str(c)]:.0f}" for c in conc) + " |")
    lines.append("| client vs no-op | - | " + " | ".join(
        f"{ceiling[str(c)]['rps']:.0f}" for c in conc) + " |")
    for name, row in cells["serve_noop"].items():
        lines.append(f"| Serve {name} | - | " + " | ".join(
            f"{row[str(c)]['rps']:.0f} ({row[str(c)]['p50_ms']:.0f}/{row[str(c)]['p99_ms']:.0f})"
            for c in conc) + " |")
    for topo in TOPOLOGIES:
        for batching in BATCH_MODES:
            row = cells[topo][batching]
            lines.append(f"| {topo} | {batching} | " + " | ".join(
                f"{row[str(c)]['rps']:.0f} ({row[str(c)]['p50_ms']:.0f}/{row[str(c)]['p99_ms']:.0f}, "
                f"{row[str(c)]['over_floor']:.2f}x, b {row[str(c)]['mean_batch']:.1f})" for c in conc) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
