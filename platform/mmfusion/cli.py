"""`mmfusion` command line: one entry point, subcommands import their (heavy) modules lazily.

Errors a user can fix (MmfusionError, a missing file) are printed as one clear message and exit with 2;
set MMFUSION_DEBUG=1 to see the traceback as well.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mmfusion.batch import MODALITIES
from mmfusion.errors import MmfusionError

if TYPE_CHECKING:
    from mmfusion.ray_jobs import JobResult

log = logging.getLogger("mmfusion")


def _config_show(args: argparse.Namespace) -> int:
    from mmfusion.config import dump_config, load_config

    sys.stdout.write(dump_config(load_config(args.config, args.overrides)))
    return 0


def _data_build(args: argparse.Namespace) -> int:
    if args.name == "ktuberling":
        from mmfusion.datasets.ktuberling import build_ktuberling

        out = build_ktuberling(Path(args.out), seed=args.seed, variant=args.variant)
    else:
        from mmfusion.datasets.avt_digits import build_avt_digits

        out = build_avt_digits(Path(args.out), variant=args.variant, seed=args.seed)
    log.info("dataset written to %s", out)
    return 0


def _data_inspect(args: argparse.Namespace) -> int:
    from mmfusion.data.inspect import inspect_dataset

    sys.stdout.write(inspect_dataset(args.path, label_column=args.label_column) + "\n")
    return 0


def _init(args: argparse.Namespace) -> int:
    from mmfusion.starter_config import write_starter_config

    out = write_starter_config(args.data, args.out, label_column=args.label_column, force=args.force)
    sys.stdout.write(out.read_text(encoding="utf-8"))
    log.info("starter config written to %s; train it with: mmfusion train %s", out, out)
    return 0


def _model_summary(args: argparse.Namespace) -> int:
    from mmfusion.config import load_config
    from mmfusion.models.summary import summarize

    sys.stdout.write(summarize(load_config(args.config, args.overrides)) + "\n")
    return 0


def _train(args: argparse.Namespace) -> int:
    from mmfusion.config import load_config
    from mmfusion.train.trainer import run_training

    run = run_training(load_config(args.config, args.overrides), address=args.address)  # tracking finished
    sys.stdout.write(f"{run.location or run.artifact}\n")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    if args.robustness:
        from mmfusion.evaluate.robustness import evaluate_robustness

        if args.modalities:
            raise MmfusionError("--robustness scores every subset of the modalities: drop --modalities")
        rob = evaluate_robustness(args.artifact, data=args.data, split=args.split, address=args.address,
                                  device=args.device, seed=args.seed, noises=args.noise)
        sys.stdout.write(f"{rob.table}\n\n{rob.json_path}\n{rob.plot}\n")
        return 0
    from mmfusion.evaluate.report import evaluate_artifact

    result = evaluate_artifact(args.artifact, data=args.data, split=args.split, address=args.address,
                               modalities=args.modalities, device=args.device)
    sys.stdout.write(result.text + "\n")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from mmfusion.evaluate.predict import predict_to_parquet

    run = predict_to_parquet(args.artifact, args.data, args.out, split=args.split, modalities=args.modalities,
                             address=args.address, device=args.device)
    sys.stdout.write(run.summary() + "\n")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from mmfusion.serving.server import run_server

    run_server(args.config, args.artifact, host=args.host, port=args.port, topology=args.topology,
               api_key_env=args.api_key_env, address=args.address, timeout_s=args.timeout)
    return 0


def _request(args: argparse.Namespace) -> int:
    import json

    from mmfusion.serving import client

    api_key = args.api_key or os.environ.get("MMFUSION_API_KEY")
    c = client.Client(args.url, api_key)
    if args.wait:
        c.wait_healthy(args.wait)
    if args.health:
        if not c.healthy():
            raise MmfusionError(f"{c.base}/healthz is not answering 200")
        sys.stdout.write("ok\n")
        return 0
    if args.data:
        ev = client.evaluate_over_http(args.url, args.data, split=args.split, modalities=args.modalities,
                                       concurrency=args.concurrency, api_key=api_key, limit=args.limit)
        sys.stdout.write(ev.text(f"{args.data} [{args.split}]", args.concurrency) + "\n")
        return 0
    out = client.predict_files(args.url, image=args.image, audio=args.audio, text=args.text, api_key=api_key,
                               as_json=args.json)
    sys.stdout.write(json.dumps(out, indent=1) + "\n")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from mmfusion.config import load_config
    from mmfusion.tune.runner import run_tune

    run = run_tune(load_config(args.config, args.overrides), address=args.address)
    sys.stdout.write(f"{run.table}\n\ntrials: {run.csv}\ncurves: {run.plot}\n"
                     f"best artifact:\n{run.location or run.artifact}\n")
    return 0


def _runs(args: argparse.Namespace) -> int:
    from mmfusion import runs

    if args.sub == "list":
        sys.stdout.write(runs.format_list(runs.find_runs(args.storage)) + "\n")
    elif args.sub == "show":
        sys.stdout.write(runs.format_show(runs.load_run(args.storage, args.run)) + "\n")
    else:
        sys.stdout.write(runs.format_compare([runs.load_run(args.storage, r) for r in args.runs]) + "\n")
    return 0


def _submit(args: argparse.Namespace) -> int:
    from mmfusion.ray_jobs import submit

    command = args.job_command[1:] if args.job_command[:1] == ["--"] else args.job_command
    job = submit(command, subcommands=subcommand_names(build_parser()), address=args.address,
                 working_dir=Path(args.working_dir), wait=not args.no_wait, use_installed=args.use_installed,
                 num_cpus=args.num_cpus, num_gpus=args.num_gpus)
    if args.no_wait:
        sys.stdout.write(f"{job.job_id}\n")
        return 0
    return _job_outcome(job)


def _job_outcome(job: JobResult) -> int:
    if job.succeeded:
        log.info("job %s succeeded", job.job_id)
        return 0
    tail = f"\n--- last lines of the job's log ---\n{job.log_tail}" if job.log_tail else ""
    sys.stderr.write(f"mmfusion: job {job.job_id} {job.status}: {job.message}{tail}\n")
    return 1


def _jobs(args: argparse.Namespace) -> int:
    from mmfusion import ray_jobs

    if args.sub == "list":
        sys.stdout.write(ray_jobs.format_jobs(ray_jobs.list_jobs(args.address)) + "\n")
    elif args.sub == "status":
        info = ray_jobs.job_info(args.job_id, args.address)
        sys.stdout.write(f"{info.status}\n" + (f"{info.message}\n" if info.message else ""))
    elif args.sub == "logs":
        job = ray_jobs.job_logs(args.job_id, args.address, follow_logs=args.follow)
        return _job_outcome(job) if args.follow else 0
    elif args.sub == "stop":
        sys.stdout.write(f"{ray_jobs.stop_job(args.job_id, args.address)}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmfusion", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging and all of Ray's output (by default only its signs of real problems)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(parent: argparse._SubParsersAction, name: str, fn: Callable[[argparse.Namespace], int],
            help: str) -> argparse.ArgumentParser:
        sp = parent.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        return sp

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("config", help="experiment YAML, e.g. jobs/configs/avt_digits.yaml")
        sp.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. optim.lr=3e-4")

    config = sub.add_parser("config", help="show the resolved experiment config").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND")
    with_config(cmd(config, "show", _config_show, "print the config after overrides and defaults"))

    data = sub.add_parser("data", help="build and inspect datasets").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND")
    b = cmd(data, "build", _data_build, "build a built-in dataset (offline, deterministic)")
    b.add_argument("name", choices=["avt-digits", "ktuberling"])
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--variant", choices=["tiny", "small", "large"], default="small",
                   help="size: tiny (tests), small (the default), large (avt-digits only: benchmarks)")
    b.add_argument("--seed", type=int, default=0)
    i = cmd(data, "inspect", _data_inspect, "counts per split, class and modality, and rejects")
    i.add_argument("path", help="dataset folder or manifest (Parquet/JSONL/CSV)")
    i.add_argument("--label-column", default="label")

    it = cmd(sub, "init", _init, "write a starter experiment YAML derived from a dataset's statistics")
    it.add_argument("data", help="dataset folder or manifest (Parquet/JSONL/CSV)")
    it.add_argument("--out", default="experiment.yaml",
                    help="config file to write (default: experiment.yaml)")
    it.add_argument("--label-column", default="label")
    it.add_argument("--force", action="store_true", help="overwrite --out if it exists")

    model = sub.add_parser("model", help="model utilities").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND")
    with_config(cmd(model, "summary", _model_summary, "parameters per part and forward FLOPs per sample"))

    t = cmd(sub, "train", _train, "train with Ray Train (resumes a run of the same config); "
            "prints the artifact path")
    with_config(t)
    t.add_argument("--address",
                   help="Ray cluster address (default: RAY_ADDRESS, else an embedded local cluster)")

    tn = cmd(sub, "tune", _tune, "hyperparameter search with Ray Tune (the config's tune: section); "
             "re-running resumes")
    with_config(tn)
    tn.add_argument("--address",
                    help="Ray cluster address (default: RAY_ADDRESS, else an embedded local cluster)")

    e = cmd(sub, "evaluate", _evaluate, "accuracy, macro-F1, per-class table and confusion matrix "
            "of an artifact")
    e.add_argument("artifact", help="artifact folder written by `mmfusion train`")
    e.add_argument("--data", help="dataset folder or manifest (default: the artifact's data.path)")
    e.add_argument("--split", default="test", help="split to evaluate (default: test)")
    e.add_argument("--modalities", nargs="+", choices=MODALITIES,
                   help="hide the other modalities (robustness to a missing modality)")
    e.add_argument("--robustness", action="store_true", help="accuracy for every subset of the modalities "
                   "and under growing noise on each: a table, robustness.json and .png next to the artifact")
    e.add_argument("--noise", nargs="+", metavar="KIND", help="with --robustness: only these kinds "
                   "(image_noise image_blur audio_snr text_typos; default: all of the model's)")
    e.add_argument("--seed", type=int, default=0, help="with --robustness: the noise seed (default 0)")

    pr = cmd(sub, "predict", _predict, "batch prediction on Ray Data (labelled or unlabelled data): Parquet "
             "with id, label, one probability column per class and the modalities used")
    pr.add_argument("artifact", help="artifact folder written by `mmfusion train`")
    pr.add_argument("--data", required=True, help="dataset folder or manifest (Parquet/JSONL/CSV)")
    pr.add_argument("--out", required=True, help="Parquet file; undecodable rows go to OUT.rejects.jsonl")
    pr.add_argument("--split", help="only this split (default: every row)")
    pr.add_argument("--modalities", nargs="+", choices=MODALITIES, help="predict from these modalities only")
    for sp in (e, pr):
        sp.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the model runs (default auto: cuda when the Ray cluster has GPUs)")
        sp.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded one)")

    sv = cmd(sub, "serve", _serve, "serve an artifact over HTTP with Ray Serve until interrupted "
             "(Ctrl-C)")
    sv.add_argument("artifact",
                    help="artifact folder written by `mmfusion train` (or an s3://, gs:// URI)")
    sv.add_argument("--config", default="serve/local.yaml",
                    help="Serve config file (default: serve/local.yaml)")
    sv.add_argument("--host", help="bind address (default: the config's http_options.host)")
    sv.add_argument("--port", type=int, help="port (default: the config's http_options.port)")
    sv.add_argument("--topology", choices=["split", "single", "monolith"],
                    help="override the config's args.topology")
    sv.add_argument("--api-key-env", help="require the API key held in this environment variable")
    sv.add_argument("--address",
                    help="Ray cluster address (default: RAY_ADDRESS, else an embedded local cluster)")
    sv.add_argument("--timeout", type=float, default=300.0,
                    help="seconds to wait for the deployment (default 300)")

    rq = cmd(sub, "request", _request, "send one prediction request to a served model, "
             "or a whole dataset split (prints the accuracy measured through HTTP)")
    rq.add_argument("url", help="server URL, e.g. http://127.0.0.1:8000")
    rq.add_argument("--image", help="image file to send")
    rq.add_argument("--audio", help="audio file to send")
    rq.add_argument("--text", help="text to send")
    rq.add_argument("--json", action="store_true", help="send JSON with base64 media instead of multipart")
    rq.add_argument("--data",
                    help="send every record of a dataset split instead (dataset folder or manifest)")
    rq.add_argument("--split", default="test", help="split for --data (default: test)")
    rq.add_argument("--modalities", nargs="+", choices=MODALITIES,
                    help="with --data: send only these modalities")
    rq.add_argument("--concurrency", type=int, default=8, help="requests in flight with --data (default: 8)")
    rq.add_argument("--limit", type=int, help="with --data: at most this many records")
    rq.add_argument("--api-key", help="API key (default: the MMFUSION_API_KEY environment variable)")
    rq.add_argument("--wait", type=float, default=0.0, help="first wait up to this many seconds for /healthz")
    rq.add_argument("--health", action="store_true", help="only check /healthz (exit status 0 when healthy)")

    rn = sub.add_parser("runs", help="list, show and compare training runs and Tune experiments on disk"
                        ).add_subparsers(dest="sub", required=True, metavar="SUBCOMMAND")
    storage_help = "the runs' folder, train.storage_path (default: runs)"
    r = cmd(rn, "list", _runs, "runs and Tune experiments: status, epochs, best metric, fusion")
    r.add_argument("--storage", default="runs", help=storage_help)
    r = cmd(rn, "show", _runs, "one run: best metric, per-epoch metrics (a Tune experiment: its trials)")
    r.add_argument("run", metavar="RUN", help="run name, EXPERIMENT/trial-ID, or a run folder")
    r.add_argument("--storage", default="runs", help=storage_help)
    r = cmd(rn, "compare", _runs, "runs side by side: best metrics and the config keys that differ")
    r.add_argument("runs", nargs="+", metavar="RUN", help="run names, EXPERIMENT/trial-ID, or run folders")
    r.add_argument("--storage", default="runs", help=storage_help)

    address_help = ("Ray Jobs API (dashboard) URL, e.g. http://127.0.0.1:8265 "
                    "(default: RAY_API_SERVER_ADDRESS, else an http RAY_ADDRESS, else http://127.0.0.1:8265)")
    s = cmd(sub, "submit", _submit, "run an mmfusion command on a Ray cluster as a Ray Job: "
            "mmfusion submit [options] -- train CONFIG [key=value ...]")
    s.add_argument("--address", help=address_help)
    s.add_argument("--working-dir", default=".", help="uploaded as the job's working directory (default: .)")
    s.add_argument("--no-wait", action="store_true",
                   help="print the job id and return without streaming logs")
    s.add_argument("--use-installed", action="store_true",
                   help="run the mmfusion installed on the cluster instead of uploading platform/mmfusion")
    s.add_argument("--num-cpus", type=float, help="CPUs reserved for the job's driver (default: 0)")
    s.add_argument("--num-gpus", type=float, help="GPUs reserved for the job's driver (default: 0)")
    s.add_argument("job_command", nargs=argparse.REMAINDER, metavar="COMMAND",
                   help="-- then the mmfusion subcommand and its arguments")

    jobs = sub.add_parser("jobs", help="list, inspect, follow and stop Ray Jobs").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND")
    jl = cmd(jobs, "list", _jobs, "submitted jobs with their status")
    jl.add_argument("--address", help=address_help)
    for name, help_text in (("status", "a job's status and message"), ("logs", "a job's logs"),
                            ("stop", "stop a job and wait for it to end")):
        j = cmd(jobs, name, _jobs, help_text)
        j.add_argument("job_id", metavar="ID", help="the job id printed by `mmfusion submit`")
        j.add_argument("--address", help=address_help)
        if name == "logs":
            j.add_argument("-f", "--follow", action="store_true", help="stream until the job ends")
    return p


def subcommand_names(parser: argparse.ArgumentParser) -> set[str]:
    """The top-level subcommands (`train`, `tune`, ...): what `mmfusion submit` may send to a cluster."""
    for action in parser._actions:  # argparse keeps subcommands on its one _SubParsersAction
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def setup_logging(verbose: bool = False) -> None:
    from mmfusion.logs import configure_logging

    configure_logging(verbose)  # mmfusion's lines; Ray's chatter only with --verbose


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.fn(args) or 0)
    except MmfusionError as e:
        _fail(str(e))
    except FileNotFoundError as e:
        _fail(f"file not found: {e.filename or e}")
    except KeyboardInterrupt:
        _fail("interrupted")
    return 2


def _fail(msg: str) -> None:
    if os.environ.get("MMFUSION_DEBUG"):
        log.exception("error")
    sys.stderr.write(f"mmfusion: error: {msg}\n")


if __name__ == "__main__":
    sys.exit(main())
