"""Serve config files (serve/*.yaml): strict validation, and deploying one on the connected Ray cluster.

Serve's own schema (`ServeDeploySchema`) ignores unknown keys in most places, so a misspelled autoscaling
key (`target_num_ongoing_requests_per_replica`) is silently dropped. `check_serve_config` also walks every key
against the pydantic models' fields, validates the application `args` against `ServeArgs` and each batched
deployment's `user_config` against `BatchConfig`, and checks `max_ongoing_requests >= max_batch_size`.

`deploy_config` does what `serve run CONFIG` does (start Serve with the file's http_options, then hand the
config to the controller, which imports `mmfusion.serving.app:build_app` and applies the per-deployment
options), so `mmfusion serve`, the tests and `serve deploy` on a cluster share one code path.
"""

from __future__ import annotations

import copy
import logging
import time
import types
import typing
from pathlib import Path
from typing import Any, Union

from pydantic import BaseModel, ValidationError

from mmfusion.config import read_yaml
from mmfusion.errors import ConfigError, MmfusionError
from mmfusion.serving.batching import BatchConfig
from mmfusion.serving.schemas import ServeArgs

log = logging.getLogger(__name__)

APP_IMPORT_PATH = "mmfusion.serving.app:build_app"


# ------------------------------------------------------------------------------------------- validation


def unknown_keys(data: Any, model: type[BaseModel], path: str = "") -> list[str]:
    """Every key in `data` (recursively) that is not a field (or alias) of the pydantic model at its place."""
    if not isinstance(data, dict):
        return []
    fields = model.model_fields
    by_alias = {f.alias: name for name, f in fields.items() if f.alias}
    out: list[str] = []
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        name = key if key in fields else by_alias.get(key)
        if name is None:
            out.append(f"{where} (allowed here: {', '.join(fields)})")
            continue
        out += _walk(value, fields[name].annotation, where)
    return out


def _walk(value: Any, annotation: Any, path: str) -> list[str]:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _walk(value, args[0], path)
    if origin is Union or origin is types.UnionType:
        # check against the most specific option: a model beats a bare dict/list (Union[Dict, AutoscalingConfig])
        ranked = sorted((a for a in args if a is not type(None)), key=lambda a: not _has_model(a))
        return _walk(value, ranked[0], path) if ranked else []
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return unknown_keys(value, annotation, path)
    if origin in (list, tuple, set) and isinstance(value, list) and args:
        return [k for i, v in enumerate(value) for k in _walk(v, args[0], f"{path}[{i}]")]
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return [k for key, v in value.items() for k in _walk(v, args[1], f"{path}.{key}")]
    return []


def _has_model(annotation: Any) -> bool:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return any(_has_model(a) for a in typing.get_args(annotation))


def _errors(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(x) for x in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors())


def check_serve_config(raw: dict[str, Any], source: str = "<config>") -> dict[str, Any]:
    """Validate a Serve config dict (Serve's schema + every key + our args/user_config). Returns it unchanged.

    Raises:
        ConfigError: listing every problem, each with its key path.
    """
    from ray.serve.schema import ServeDeploySchema

    problems = [f"unknown key {k}" for k in unknown_keys(raw, ServeDeploySchema)]
    try:
        ServeDeploySchema.model_validate(raw)
    except ValidationError as e:
        problems.append(f"Serve schema: {_errors(e)}")
    for i, app in enumerate(raw.get("applications") or []):
        if not isinstance(app, dict):
            continue
        where = f"applications[{i}]"
        if app.get("import_path") == APP_IMPORT_PATH:
            try:
                ServeArgs.model_validate(app.get("args") or {})
            except ValidationError as e:
                problems.append(f"{where}.args: {_errors(e)}")
        for j, dep in enumerate(app.get("deployments") or []):
            if not isinstance(dep, dict) or dep.get("user_config") is None:
                continue
            dwhere = f"{where}.deployments[{j}] ({dep.get('name')})"
            try:
                batch = BatchConfig.model_validate(dep["user_config"])
            except ValidationError as e:
                problems.append(f"{dwhere}.user_config: {_errors(e)}")
                continue
            ongoing = dep.get("max_ongoing_requests", 5)  # Serve's default
            if isinstance(ongoing, int) and ongoing < batch.max_batch_size:
                problems.append(f"{dwhere}: max_ongoing_requests={ongoing} < user_config.max_batch_size="
                                f"{batch.max_batch_size}: a batch never exceeds max_ongoing_requests")
    if problems:
        raise ConfigError(f"invalid Serve config {source}:\n" + "\n".join(f"  {p}" for p in problems))
    return raw


def load_serve_config(path: str | Path) -> dict[str, Any]:
    """Read and validate a Serve config file (see check_serve_config)."""
    return check_serve_config(read_yaml(path), source=str(path))


# ----------------------------------------------------------------------------------------- deploying


def prepare_config(raw: dict[str, Any], artifact: str, host: str | None = None, port: int | None = None,
                   topology: str | None = None, api_key_env: str | None = None) -> dict[str, Any]:
    """The config `mmfusion serve ARTIFACT` deploys: its one application pointed at ARTIFACT (made absolute),
    optional host/port/topology/api_key_env overrides, and only the deployment entries this app will have
    (a config written for a three-modality split model also serves a two-modality or a single-topology one)."""
    from mmfusion.data.records import is_uri
    from mmfusion.serving.app import deployment_names
    from mmfusion.serving.artifacts import read_info

    raw = copy.deepcopy(raw)
    apps = raw.get("applications") or []
    if len(apps) != 1:
        raise ConfigError(f"`mmfusion serve` runs a config with exactly one application, this one has {len(apps)} "
                          "(deploy several with `serve deploy`)")
    app = apps[0]
    if app.get("import_path") != APP_IMPORT_PATH:
        raise ConfigError(f"applications[0].import_path must be {APP_IMPORT_PATH}, got {app.get('import_path')!r}")
    args = dict(app.get("args") or {})
    args["artifact"] = artifact if is_uri(artifact) else str(Path(artifact).expanduser().resolve())
    if topology:
        args["topology"] = topology
    if api_key_env:
        args.pop("api_key", None)
        args["api_key_env"] = api_key_env
    try:
        sargs = ServeArgs.model_validate(args)
    except ValidationError as e:
        raise ConfigError(f"applications[0].args: {_errors(e)}") from None
    app["args"] = args
    info = read_info(sargs.artifact)
    names = deployment_names(info.modalities, sargs.topology)
    kept = [d for d in app.get("deployments") or [] if d.get("name") in names]
    dropped = [d.get("name") for d in app.get("deployments") or [] if d.get("name") not in names]
    if dropped:
        log.info("this %s model (%s) has no %s deployment(s): their settings are skipped", sargs.topology,
                 ", ".join(info.modalities), ", ".join(map(str, dropped)))
    app["deployments"] = kept
    http = raw.setdefault("http_options", {})
    if host is not None:
        http["host"] = host
    if port is not None:
        http["port"] = port
    return check_serve_config(raw, source="<prepared config>")


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
    """`mmfusion serve`: deploy ARTIFACT with a Serve config on an embedded local Ray (or `address`), print the
    URL, and block until Ctrl-C or SIGTERM; then stop Serve (or, on a joined cluster, delete this app)."""
    import os
    import signal
    import sys

    from ray import serve

    from mmfusion.runtime import init_ray

    raw = prepare_config(load_serve_config(config), artifact, host, port, topology, api_key_env)
    joined = bool(address or os.environ.get("RAY_ADDRESS"))
    init_ray(address)
    app = raw["applications"][0]
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the server cleanly, like Ctrl-C
    try:
        deploy_config(raw, timeout_s)
        url = local_url(raw["http_options"], app.get("route_prefix") or "/")
        log.info("serving %s at %s (OpenAPI docs at %s/docs); Ctrl-C stops", app["args"]["artifact"], url, url)
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
