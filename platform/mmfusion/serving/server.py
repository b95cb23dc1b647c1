"""Running a Serve config on the connected Ray cluster: `mmfusion serve`, the tests and the benchmarks.

`deploy_config` does what `serve run CONFIG` does (start Serve with the file's http_options, then hand the
config to the controller, which imports `mmfusion.serving.app:build_app` and applies the per-deployment
options), so `mmfusion serve`, the tests and `serve deploy` on a cluster share one code path. The config is
validated and prepared first by mmfusion.serving.config.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from mmfusion.errors import MmfusionError
from mmfusion.serving.config import load_serve_config, prepare_config

log = logging.getLogger(__name__)

# Ray Serve's own runtime switches, read by every Ray process when it starts: user code and the router on each
# process's event loop instead of a thread hop per request, handle results over gRPC instead of the object
# store, Serve's logs in files only. `mmfusion serve` sets them for the local cluster it starts (a variable
# already set keeps its value); bench/serve_ladder.py measures them against Serve's defaults ("fast").
FAST_SERVE_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                  "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
                  "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
                  "RAY_SERVE_LOG_TO_STDERR": "0"}


def use_fast_serve_env() -> dict[str, str]:
    """Set FAST_SERVE_ENV in this process's environment where unset, before Ray starts (its processes inherit
    it). -> the settings now in effect. A cluster joined with --address keeps the settings it started with."""
    import os

    for k, v in FAST_SERVE_ENV.items():
        os.environ.setdefault(k, v)
    return {k: os.environ[k] for k in FAST_SERVE_ENV}


def deploy_config(raw: dict[str, Any], timeout_s: float = 300.0) -> None:
    """Start Serve on the connected Ray cluster (http_options of the config) and deploy its applications,
    then wait until every one is RUNNING. Serve's config deploys are declarative: applications deployed from
    an earlier config but absent from this one are removed.

    Raises:
        MmfusionError: an application failed to deploy (the message carries Serve's reason) or timed out.
    """
    # `serve run CONFIG` does the same; the public API deploys Application objects, not config files
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(raw)
    client = serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location)
    client.deploy_apps(schema, _blocking=False)
    wait_running([a.name for a in schema.applications], timeout_s)


def local_url(http_options: dict[str, Any], route_prefix: str = "/") -> str:
    host = http_options.get("host", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{host}:{http_options.get('port', 8000)}{route_prefix.rstrip('/')}"


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_server(config: str | Path, artifact: str, host: str | None = None, port: int | None = None,
               topology: str | None = None, api_key_env: str | None = None, address: str | None = None,
               timeout_s: float = 300.0) -> None:
    """`mmfusion serve`: deploy ARTIFACT with a Serve config on an embedded local Ray (or `address`), print
    the URL, and block until Ctrl-C or SIGTERM; then stop Serve (or, on a joined cluster, delete this app)."""
    import os
    import signal
    import sys

    from ray import serve

    from mmfusion.runtime import init_ray

    raw = prepare_config(load_serve_config(config), artifact, host, port, topology, api_key_env)
    joined = bool(address or os.environ.get("RAY_ADDRESS"))
    if not joined:
        log.info("Serve runtime settings: %s", use_fast_serve_env())
    init_ray(address)
    app = raw["applications"][0]
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the server cleanly, like Ctrl-C
    try:
        deploy_config(raw, timeout_s)
        url = local_url(raw["http_options"], app.get("route_prefix") or "/")
        log.info("serving %s at %s (OpenAPI docs at %s/docs); Ctrl-C stops", app["args"]["artifact"], url,
                 url)
        sys.stdout.write(url + "\n")
        sys.stdout.flush()
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping the server")
    finally:
        signal.signal(signal.SIGTERM, previous)
        try:
            if joined:
                serve.delete(app["name"])
            else:
                serve.shutdown()
        except Exception as e:  # shutting down after a failed start must not hide the start's error
            log.warning("stopping Serve: %s", e)


def wait_running(names: list[str], timeout_s: float = 300.0, poll_s: float = 0.5) -> None:
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    deadline = time.monotonic() + timeout_s
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        apps = serve.status().applications
        status = {n: apps[n] for n in names if n in apps}
        failed = {n: a for n, a in status.items() if a.status in (ApplicationStatus.DEPLOY_FAILED,
                                                                     ApplicationStatus.UNHEALTHY)}
        if failed:
            msgs = "\n".join(f"  {n}: {a.status.value}: {_reason(a)}" for n, a in failed.items())
            raise MmfusionError(f"Serve application(s) failed to deploy:\n{msgs}")
        if len(status) == len(names) and all(a.status == ApplicationStatus.RUNNING for a in status.values()):
            return
        time.sleep(poll_s)
    states = ", ".join(f"{n}: {a.status.value}" for n, a in status.items()) or "not started"
    raise MmfusionError(f"Serve application(s) not running after {timeout_s:.0f} s ({states})")


def _reason(app: Any) -> str:
    """The most useful line of a failed application's message (Serve puts a traceback there)."""
    msg = app.message or ""
    for dep in app.deployments.values():
        if dep.message:
            msg = msg or dep.message
    lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors[-1] if errors else (lines[-1] if lines else "unknown reason"))[:1000]
