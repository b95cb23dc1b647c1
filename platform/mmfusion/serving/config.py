"""Serve config files (serve/*.yaml): strict validation, and the config `mmfusion serve ARTIFACT` deploys.

Serve's own schema (`ServeDeploySchema`) ignores unknown keys in most places, so a misspelled autoscaling
key (`target_num_ongoing_requests_per_replica`) is silently dropped. `check_serve_config` also walks every key
against the pydantic models' fields, validates the application `args` against `ServeArgs` and each batched
deployment's `user_config` against `BatchConfig`, and checks `max_ongoing_requests >= max_batch_size`.

`prepare_config` points a config's one application at an artifact; mmfusion.serving.server runs it.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mmfusion.config import read_yaml, unknown_keys
from mmfusion.errors import ConfigError
from mmfusion.serving.batching import BatchConfig
from mmfusion.serving.schemas import ServeArgs

log = logging.getLogger(__name__)

APP_IMPORT_PATH = "mmfusion.serving.app:build_app"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# the Host names a server on a loopback address answers to: a web page that rebinds its own name to
# 127.0.0.1 (DNS rebinding) sends its own name as Host and gets 403
LOCAL_HOST_NAMES = ("127.0.0.1", "localhost", "::1")


# ------------------------------------------------------------------------------------------- validation


def _errors(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(x) for x in err['loc']) or '<root>'}: {err['msg']}"
                     for err in e.errors())


def check_serve_config(raw: dict[str, Any], source: str = "<config>") -> dict[str, Any]:
    """Validate a Serve config dict (Serve's schema + every key + our args/user_config). Returns it unchanged.

    Raises:
        ConfigError: listing every problem, each with its key path.
    """
    from ray.serve.schema import ServeDeploySchema

    from mmfusion.serving.app import INGRESS

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
                sargs = ServeArgs.model_validate(app.get("args") or {})
            except ValidationError as e:
                problems.append(f"{where}.args: {_errors(e)}")
            else:
                proxy_timeout = (raw.get("http_options") or {}).get("request_timeout_s")
                if isinstance(proxy_timeout, (int, float)) and sargs.request_timeout_s >= proxy_timeout > 0:
                    problems.append(f"{where}.args.request_timeout_s={sargs.request_timeout_s:g} must be "
                                    f"below http_options.request_timeout_s={proxy_timeout:g} (else "
                                    "clients get the proxy's plain-text 408 instead of the JSON one)")
        for j, dep in enumerate(app.get("deployments") or []):
            if not isinstance(dep, dict) or (dep.get("name") == INGRESS and dep.get("user_config") is None):
                continue  # every other deployment batches: with its user_config, else BatchConfig's defaults
            dwhere = f"{where}.deployments[{j}] ({dep.get('name')})"
            try:
                batch = BatchConfig.model_validate(dep.get("user_config") or {})
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
    (a config written for a three-modality split model also serves a two-modality or a single-topology
    one)."""
    from mmfusion.artifact import read_artifact_info
    from mmfusion.serving.app import deployment_names
    from mmfusion.storage import is_uri

    raw = copy.deepcopy(raw)
    apps = raw.get("applications") or []
    if len(apps) != 1:
        raise ConfigError(f"`mmfusion serve` runs a config with exactly one application, this one has "
                          f"{len(apps)} (deploy several with `serve deploy`)")
    app = apps[0]
    if app.get("import_path") != APP_IMPORT_PATH:
        raise ConfigError(f"applications[0].import_path must be {APP_IMPORT_PATH}, "
                          f"got {app.get('import_path')!r}")
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
    info = read_artifact_info(sargs.artifact)
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
    if http.get("host", "127.0.0.1") in LOOPBACK and "allowed_hosts" not in args:
        args["allowed_hosts"] = list(LOCAL_HOST_NAMES)  # a local server answers only to local names
    return check_serve_config(raw, source="<prepared config>")
