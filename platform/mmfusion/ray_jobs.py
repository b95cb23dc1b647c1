"""Ray Jobs from the command line: `mmfusion submit -- <mmfusion command>` and `mmfusion jobs ...`.

    job = submit(["train", "jobs/configs/avt_digits.yaml", "train.num_workers=4"], subcommands={"train", ...},
                 address="http://127.0.0.1:8265")      # uploads the working dir, streams the logs
    job.status                                          # "SUCCEEDED" | "FAILED" | "STOPPED" | "RUNNING" ...

A job's entrypoint is the same `mmfusion ...` command a user runs on a laptop; inside a job RAY_ADDRESS is
set, so `mmfusion train` joins the cluster instead of starting an embedded one. The runtime_env uploads the
working directory (so jobs/configs travel; .gitignore'd paths, .venv, data and runs stay home) and, when the
working directory is this repository, `platform/mmfusion` as a py_module, so the cluster runs the code that
is checked out here on top of the mmfusion installed on the nodes (which brings the pinned dependencies).

Security: clusters run with Ray token authentication (RAY_AUTH_MODE=token). The token is read like Ray reads
it, from RAY_AUTH_TOKEN, then the file named by RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token, and sent as a
Bearer header; a missing or rejected token is a clear error, not a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from mmfusion.errors import MmfusionError

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # Jobs API (dashboard), forwarded by `ray dashboard cluster.yaml`
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")  # where `ray get-auth-token --generate` writes it
# Never uploaded (gitignore-style, relative to the working dir), in addition to what .gitignore excludes.
EXCLUDES = [".git", ".venv", "/data", "/runs", "/artifacts", "/dist", "/build", "__pycache__", "*.egg-info",
            ".pytest_cache", ".ruff_cache"]
LOCAL_PACKAGE = Path("platform") / "mmfusion"  # the library inside this repository's working tree
NOT_SUBMITTABLE = {"submit", "jobs"}  # a job submitting jobs is a mistake, not a feature
LOG_TAIL_LINES = 40


class ClusterError(MmfusionError):
    """The cluster cannot be reached, refuses the token, or does not know the job."""


@dataclass(frozen=True)
class Token:
    value: str
    source: str  # where it came from, for error messages (never the token itself)


@dataclass
class JobResult:
    job_id: str
    status: str  # a ray.job_submission.JobStatus value
    message: str
    log_tail: str  # the last LOG_TAIL_LINES lines of the job's logs ("" while it runs)

    @property
    def succeeded(self) -> bool:
        return self.status == "SUCCEEDED"


# ------------------------------------------------------------------------------------ token, address


def find_token(environ: dict[str, str] | None = None, home: Path | None = None) -> Token | None:
    """The token Ray itself would use, in Ray's order; None when there is none.

    A RAY_AUTH_TOKEN_PATH that cannot be read is an error (Ray also refuses to fall back from it).
    """
    env = os.environ if environ is None else environ
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return Token(env["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN")
    if env.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path} cannot be read ({e.strerror})") from None
        if not value:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path} is empty")
        return Token(value, f"RAY_AUTH_TOKEN_PATH={path}")
    default = (home / ".ray" / "auth_token") if home else DEFAULT_TOKEN_FILE.expanduser()
    if default.is_file():
        value = default.read_text(encoding="utf-8").strip()
        if value:
            return Token(value, str(default))
    return None


def resolve_address(address: str | None, environ: dict[str, str] | None = None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS, else an http(s) RAY_ADDRESS, else the local dashboard.

    Inside a Ray job RAY_ADDRESS is the GCS address (host:6379), not the Jobs API, so only an http(s)
    RAY_ADDRESS counts. A value without a scheme is passed to Ray, which looks the dashboard up via GCS.
    """
    env = os.environ if environ is None else environ
    if address:
        return address.rstrip("/")
    if env.get("RAY_API_SERVER_ADDRESS"):
        return env["RAY_API_SERVER_ADDRESS"].rstrip("/")
    ray_address = env.get("RAY_ADDRESS", "")
    if ray_address.startswith(("http://", "https://")):
        return ray_address.rstrip("/")
    return DEFAULT_ADDRESS


@contextmanager
def _only_address(address: str) -> Iterator[None]:
    """Ray lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override an explicit address; we resolved it already."""
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _missing_token_hint(address: str) -> str:
    return (f"the Ray cluster at {address} requires an authentication token and none was found: set "
            f"RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or put the cluster's token in ~/.ray/auth_token "
            f"(on the head node: `ray get-auth-token`)")


@contextmanager
def _api_errors(address: str, token: Token | None, job_id: str | None = None) -> Iterator[None]:
    """Turn the Jobs API's failures into one-line user errors (auth, unreachable, unknown job)."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError:
        if token is None:
            raise ClusterError(_missing_token_hint(address)) from None
        raise ClusterError(f"the Ray cluster at {address} rejected the authentication token from "
                           f"{token.source}: it is not this cluster's token") from None
    except ConnectionError as e:
        raise ClusterError(f"cannot reach the Ray Jobs API at {address} ({e}); is the cluster up and its "
                           f"dashboard port forwarded (`ray dashboard cluster.yaml`)?") from None
    except ValueError as e:  # e.g. the working dir's package is over Ray's 512 MiB upload limit
        raise ClusterError(f"the Ray Jobs API at {address} refused the request: {e}") from None
    except RuntimeError as e:
        text = str(e)
        if job_id and ("404" in text or "does not exist" in text):
            raise ClusterError(f"no job {job_id} on the Ray cluster at {address}") from None
        raise ClusterError(f"the Ray Jobs API at {address} failed: {text}") from None


def connect(address: str | None = None) -> tuple[JobSubmissionClient, str, Token | None]:
    """A JobSubmissionClient for the cluster, authenticated when a token is available."""
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    token = find_token()
    _quiet_ray_client_logs()
    headers = {"Authorization": f"Bearer {token.value}"} if token else None
    if token and _in_clear(url):
        log.warning("sending the Ray token to %s over plain HTTP: anyone on the path can read it; use the "
                    "SSH tunnel of `ray dashboard cluster.yaml` (http://127.0.0.1:8265) or https", url)
    with _only_address(url), _api_errors(url, token):
        client = JobSubmissionClient(url, headers=headers)
    return client, url, token


def _in_clear(url: str) -> bool:
    """Plain HTTP to another machine (a tunnel or loopback address is fine)."""
    from urllib.parse import urlparse

    parsed = urlparse(url)
    return parsed.scheme == "http" and parsed.hostname not in ("127.0.0.1", "localhost", "::1")


def _quiet_ray_client_logs() -> None:
    """Ray's client logs every ignored file of the upload at INFO; keep them for -v only."""
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("ray").setLevel(logging.WARNING)
        # its "now ignored by default" lines too
        logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)


# ------------------------------------------------------------------------------------------- submit


def build_entrypoint(command: Sequence[str], subcommands: Collection[str]) -> str:
    """`["train", "cfg.yaml", "optim.lr=1e-3"]` -> `mmfusion train cfg.yaml optim.lr=1e-3` (shell-quoted).

    subcommands: the CLI's subcommand names (the CLI passes them: this module does not import it).
    """
    command = list(command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise MmfusionError("no command to submit: use `mmfusion submit -- train CONFIG [key=value ...]`")
    if command[0] in ("mmfusion", "python"):
        raise MmfusionError(f"give the mmfusion subcommand without {command[0]!r}: "
                            f"`mmfusion submit -- train CONFIG ...`")
    known = set(subcommands)
    if command[0] not in known or command[0] in NOT_SUBMITTABLE:
        allowed = ", ".join(sorted(known - NOT_SUBMITTABLE))
        raise MmfusionError(f"cannot submit {command[0]!r}: the command must be an mmfusion subcommand "
                            f"({allowed})")
    return shlex.join(["mmfusion", *command])


def build_runtime_env(working_dir: Path | None, use_installed: bool = False,
                      env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """working_dir (uploaded, minus EXCLUDES and .gitignore) and the repository's own package as a
    py_module."""
    runtime_env: dict[str, Any] = {"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", **(env_vars or {})}}
    if working_dir is None:
        return runtime_env
    wd = working_dir.expanduser().resolve()
    if not wd.is_dir():
        raise MmfusionError(f"--working-dir {working_dir} is not a directory")
    runtime_env |= {"working_dir": str(wd), "excludes": list(EXCLUDES)}
    package = wd / LOCAL_PACKAGE
    if not use_installed and (package / "__init__.py").is_file():
        runtime_env["py_modules"] = [str(package)]
    return runtime_env


def warn_local_paths(command: Sequence[str], working_dir: Path | None) -> None:
    """An argument naming a local file outside the working dir will not exist on a remote cluster."""
    wd = working_dir.expanduser().resolve() if working_dir else None
    for arg in command:
        value = arg.split("=", 1)[1] if "=" in arg and not arg.startswith("-") else arg
        if "://" in value or not value or value.startswith("-"):
            continue
        p = Path(value).expanduser()
        if p.is_absolute() and p.exists() and (wd is None or not p.resolve().is_relative_to(wd)):
            log.warning("%s is a local path outside the working dir: a remote cluster sees it only if it is "
                        "on shared storage (use s3://, gs:// or NFS)", value)


def submit(command: Sequence[str], *, subcommands: Collection[str], address: str | None = None,
           working_dir: Path | None = Path("."), wait: bool = True, use_installed: bool = False,
           num_cpus: float | None = None, num_gpus: float | None = None,
           out: IO[str] | None = None) -> JobResult:
    """Submit `mmfusion <command>` as a Ray Job; with wait, stream its logs to `out` until it ends."""
    entrypoint = build_entrypoint(command, subcommands)
    runtime_env = build_runtime_env(working_dir, use_installed=use_installed)
    warn_local_paths(command, working_dir)
    client, url, token = connect(address)
    with _only_address(url), _api_errors(url, token):
        job_id = client.submit_job(
            entrypoint=entrypoint, runtime_env=runtime_env,
            entrypoint_num_cpus=num_cpus, entrypoint_num_gpus=num_gpus,
            metadata={"submitted_by": "mmfusion submit", "command": entrypoint[:1000]})
    log.info("submitted job %s to %s: %s", job_id, url, entrypoint)
    if not wait:
        return JobResult(job_id, "PENDING", "", "")
    return follow(client, url, token, job_id, out or sys.stdout)


def follow(client: JobSubmissionClient, url: str, token: Token | None, job_id: str, out: IO[str],
           poll_s: float = 0.5) -> JobResult:
    """Stream a job's logs to `out` until it reaches a terminal status; Ctrl-C stops following only."""

    async def stream() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        with _api_errors(url, token, job_id):
            status = client.get_job_status(job_id)  # an unknown id or a bad token fails here, clearly
            try:
                asyncio.run(stream())
            except Exception as e:  # noqa: BLE001 - the log websocket dropped; the status below still counts
                log.warning("log stream of job %s ended early (%s); waiting for its status", job_id, e)
            status = client.get_job_status(job_id)
            while not status.is_terminal():
                time.sleep(poll_s)
                status = client.get_job_status(job_id)
            info = client.get_job_info(job_id)
            tail = "" if status.value == "SUCCEEDED" else _tail(client.get_job_logs(job_id))
    except KeyboardInterrupt:
        raise MmfusionError(f"stopped following job {job_id}; it keeps running on the cluster "
                            f"(`mmfusion jobs logs {job_id} --follow`, "
                            f"`mmfusion jobs stop {job_id}`)") from None
    # Ray appends the logs to the message; the result keeps only a tail of them
    message = (info.message or "").splitlines()[0] if info.message else ""
    return JobResult(job_id, status.value, message, tail)


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


# --------------------------------------------------------------------------------------- jobs ...


def list_jobs(address: str | None = None) -> list[JobDetails]:
    """Submitted jobs (not the drivers of interactive sessions), oldest first."""
    client, url, token = connect(address)
    with _api_errors(url, token):
        jobs = [j for j in client.list_jobs() if j.submission_id]
    return sorted(jobs, key=lambda j: j.start_time or 0)


def format_jobs(jobs: Sequence[JobDetails]) -> str:
    rows = [("JOB ID", "STATUS", "STARTED", "DURATION", "COMMAND")]
    for j in jobs:
        started = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time
                   else "-")
        end = j.end_time or (time.time() * 1000 if j.start_time else None)
        took = f"{(end - j.start_time) / 1000:.0f}s" if j.start_time and end else "-"
        rows.append((j.submission_id or "-", str(j.status), started, took, j.entrypoint))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4]
                     for r in rows)


def job_info(job_id: str, address: str | None = None) -> JobDetails:
    client, url, token = connect(address)
    with _api_errors(url, token, job_id):
        return client.get_job_info(job_id)


def job_logs(job_id: str, address: str | None = None, follow_logs: bool = False,
             out: IO[str] | None = None) -> JobResult:
    """Print a job's logs; with follow_logs, keep streaming until the job ends."""
    out = out or sys.stdout
    client, url, token = connect(address)
    if follow_logs:
        return follow(client, url, token, job_id, out)
    with _api_errors(url, token, job_id):
        out.write(client.get_job_logs(job_id))
        info = client.get_job_info(job_id)
    return JobResult(job_id, info.status.value, info.message or "", "")


def stop_job(job_id: str, address: str | None = None, wait_s: float = 30.0) -> str:
    """Ask the cluster to stop a job and wait (up to wait_s) for it to end; returns its final status."""
    client, url, token = connect(address)
    with _api_errors(url, token, job_id):
        if not client.stop_job(job_id):
            return client.get_job_status(job_id).value  # it had already ended
        deadline = time.monotonic() + wait_s
        status = client.get_job_status(job_id)
        while not status.is_terminal() and time.monotonic() < deadline:
            time.sleep(0.5)
            status = client.get_job_status(job_id)
    return status.value
