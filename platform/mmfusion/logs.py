"""Readable logs: at the default level a command prints mmfusion's lines and Ray's signs of real problems,
not Ray's routine chatter; `mmfusion --verbose` prints everything Ray prints.

    configure_logging(verbose)        # the CLI, once: format, levels, the filters below
    filter_ray_output()               # after ray.init: the driver's copy of worker output goes through NOISE
    worker_logging(rank)              # in a Ray Train worker: mmfusion's records formatted like the driver's
    for x in progress(items, total=n, desc="shards"): ...   # a tqdm bar, only where a person watches

Ray's routine output, per epoch of a run: Ray Data's "Dataset ... execution finished" banners and
"Progress bars disabled" warnings (from the driver and each SplitCoordinator), Ray Train's controller lines
(requesting resources, worker group started), a RayDeprecationWarning that Ray Train's own DatasetManager
triggers (`exclude_resources`), core_worker's error line about Ray's own PreemptionWatcher actor (ray#53727),
and Ray's INFO-level lines (Serve's per-request lines too: mmfusion.serving.access logs each request).
Everything else, such as tracebacks, worker deaths, out-of-memory kills, other warnings and errors, still
prints.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import Any

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATEFMT = "%H:%M:%S"

NOISE = re.compile("|".join([
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(?:INFO|DEBUG)\s",  # Ray's Python INFO/DEBUG lines
    r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [ID] \d+ \d+\]",  # Ray's C++ INFO/DEBUG lines
    r"^(?:INFO|DEBUG) \d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ",  # Ray Serve's INFO lines (its access log too)
    r"Progress bars disabled\. To enable",  # Ray Data, wherever progress bars are off
    r"Dataset \S+ execution finished in",  # Ray Data's per-execution banner
    r"^(?:Starting execution of Dataset|Execution plan of Dataset|Running Dataset)",
    r"has constructor arguments in the object store and max_restarts > 0",  # ray#53727: Ray's own actors
    r"ExecutionOptions\.exclude_resources` is deprecated",  # raised by Ray Train's DatasetManager itself
    r"Palette images with Transparency expressed in bytes",  # Pillow; the image is converted anyway
    r"^Requesting resources: ",  # Ray Train controller and worker start-up
    r"^Attempting to start training worker group",
    r"^Started training worker group",
    r"^- \(ip=\S+, pid=\d+\) world_rank=",
    r"^Setting up process group for: ",
    r"Token authentication is enabled for this Ray cluster",  # ray.init's notice, not a problem
]))
# a Python warning is printed as "file:line: Category: message" then its source line (indented)
_WARNING_LINE = re.compile(r"^\S+:\d+: \w*Warning: ")

_state = {"verbose": False}


def is_verbose() -> bool:
    return _state["verbose"]


def keep(lines: Iterable[str]) -> list[str]:
    """The lines that are not NOISE (a dropped Python warning takes its indented source line with it)."""
    out: list[str] = []
    drop_source = False
    for line in lines:
        if drop_source and line.startswith((" ", "\t")):
            drop_source = False
            continue
        drop_source = False
        if NOISE.search(line):
            drop_source = bool(_WARNING_LINE.match(line))
            continue
        out.append(line)
    return out


class NoiseFilter(logging.Filter):
    """Drops Ray's records below WARNING and its NOISE records, unless --verbose."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _state["verbose"] or not record.name.startswith(("ray", "py.warnings")):
            return True
        if record.levelno < logging.WARNING and record.name.startswith("ray"):
            return False
        return not NOISE.search(record.getMessage())


def configure_logging(verbose: bool = False) -> None:
    """The CLI's logging: mmfusion at INFO (DEBUG with --verbose) on stderr; Ray's chatter filtered out."""
    _state["verbose"] = verbose
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=FORMAT, datefmt=DATEFMT,
                        stream=sys.stderr)
    if verbose:
        return
    for h in logging.getLogger().handlers:
        _add_filter(h)
    logging.captureWarnings(True)  # Python warnings become py.warnings records, filtered like Ray's
    for name in ("mlflow", "alembic", "urllib3", "matplotlib", "PIL", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="Palette images with Transparency", category=UserWarning)


def filter_ray_output() -> None:
    """After ray.init: Ray's own loggers on the driver, and the driver's copy of worker stdout/stderr,
    through NOISE (both switched off by --verbose).

    The worker output copy is Ray's `ray_print_logs` handler of its stdstream dispatcher (a private hook:
    when it is missing, output is left as Ray prints it)."""
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve"):
        for h in logging.getLogger(name).handlers:
            _add_filter(h)
    _spend_actor_args_error()
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    with dispatcher._lock:
        dispatcher.handlers = [(name, _filtered(fn) if name == "ray_print_logs" else fn)
                               for name, fn in dispatcher.handlers]


def _spend_actor_args_error() -> None:
    """The driver's own core_worker line of ray#53727, which no Python filter sees (C++ writes it straight to
    the process's stderr): Ray logs it once per process, as an ERROR, when the process creates an actor with
    constructor arguments in the object store and max_restarts > 0. Every Ray Data actor pool is such an actor
    (its operator passes its context and transform as object refs, which it holds for the pool's life, so the
    restart the line warns about works). Ray's "once" is spent here, on a throwaway actor created while
    stderr points at /dev/null for that one call; later lines of any kind print as before. Not with
    --verbose; once per process."""
    import ray

    if _state["verbose"] or _state.get("actor_args_spent") or not ray.is_initialized():
        return
    _state["actor_args_spent"] = True

    @ray.remote(num_cpus=0, max_restarts=1)
    class _ArgsProbe:
        def __init__(self, arg: Any) -> None:
            pass

    import os

    ref = ray.put(0)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            probe = _ArgsProbe.remote(ref)  # Ray writes its line synchronously, in this call
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    ray.kill(probe)


def _filtered(print_logs: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    if getattr(print_logs, "_mmfusion_filter", False):
        return print_logs

    def handle(data: dict[str, Any]) -> None:
        if _state["verbose"]:
            print_logs(data)
            return
        lines = keep(data.get("lines") or [])
        if lines:
            print_logs({**data, "lines": lines})

    handle._mmfusion_filter = True  # type: ignore[attr-defined]
    return handle


def _add_filter(handler: logging.Handler) -> None:
    if not any(isinstance(f, NoiseFilter) for f in handler.filters):
        handler.addFilter(NoiseFilter())


def bars_enabled() -> bool:
    """Progress bars only where a person watches: stdout and stderr (the bar's stream) are terminals.
    Off in log files, pipes, CI and Ray workers (whose output Ray copies line by line)."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def progress(iterable: Iterable[Any], total: int | None = None, desc: str | None = None,
             unit: str = "it") -> Iterable[Any]:
    """`iterable` through a tqdm bar on stderr when bars_enabled(), else `iterable` itself."""
    if not bars_enabled():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)


def worker_logging(rank: int) -> None:
    """mmfusion's records in a Ray worker: INFO on rank 0 (WARNING elsewhere), formatted like the driver's,
    so the streamed epoch line reads `12:00:01 INFO mmfusion.train: epoch 1/2 ...`."""
    lg = logging.getLogger("mmfusion")
    lg.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if not any(getattr(h, "_mmfusion", False) for h in lg.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter(FORMAT, DATEFMT))
        h._mmfusion = True  # type: ignore[attr-defined]
        lg.addHandler(h)
    lg.propagate = False  # not through the root handler Ray Train installs (it prints the bare message)
