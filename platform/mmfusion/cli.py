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

from mmfusion.errors import MmfusionError

log = logging.getLogger("mmfusion")


def _config_show(args: argparse.Namespace) -> int:
    from mmfusion.config import dump_config, load_config

    sys.stdout.write(dump_config(load_config(args.config, args.overrides)))
    return 0


def _data_build(args: argparse.Namespace) -> int:
    from mmfusion.data.avt_digits import build_avt_digits

    out = build_avt_digits(Path(args.out), variant=args.variant, seed=args.seed)
    log.info("dataset written to %s", out)
    return 0


def _data_inspect(args: argparse.Namespace) -> int:
    from mmfusion.data.inspect import inspect_dataset

    sys.stdout.write(inspect_dataset(args.path, label_column=args.label_column) + "\n")
    return 0


def _model_summary(args: argparse.Namespace) -> int:
    from mmfusion.config import load_config
    from mmfusion.models.summary import summarize

    sys.stdout.write(summarize(load_config(args.config, args.overrides)) + "\n")
    return 0


def _train(args: argparse.Namespace) -> int:
    from mmfusion.config import load_config
    from mmfusion.train.trainer import run_training

    run = run_training(load_config(args.config, args.overrides), address=args.address)
    sys.stdout.write(f"{run.artifact}\n")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from mmfusion.evaluate.report import evaluate_artifact

    result = evaluate_artifact(args.artifact, data=args.data, split=args.split, address=args.address,
                               modalities=args.modalities)
    sys.stdout.write(result.text + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmfusion", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(parent: argparse._SubParsersAction, name: str, fn: Callable[[argparse.Namespace], int],
            help: str) -> argparse.ArgumentParser:
        sp = parent.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        return sp

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("config", help="experiment YAML, e.g. jobs/configs/avt_digits.yaml")
        sp.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=3e-4")

    config = sub.add_parser("config", help="show the resolved experiment config").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND")
    with_config(cmd(config, "show", _config_show, "print the config after overrides and defaults"))

    data = sub.add_parser("data", help="build and inspect datasets").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND")
    b = cmd(data, "build", _data_build, "build a built-in dataset (offline, deterministic)")
    b.add_argument("name", choices=["avt-digits"])
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--variant", choices=["small", "large"], default="small")
    b.add_argument("--seed", type=int, default=0)
    i = cmd(data, "inspect", _data_inspect, "counts per split, class and modality, and rejects")
    i.add_argument("path", help="dataset folder or manifest (Parquet/JSONL/CSV)")
    i.add_argument("--label-column", default="label")

    model = sub.add_parser("model", help="model utilities").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND")
    with_config(cmd(model, "summary", _model_summary, "parameters per part and forward FLOPs per sample"))

    t = cmd(sub, "train", _train, "train with Ray Train (resumes a run of the same config); prints the artifact path")
    with_config(t)
    t.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local cluster)")

    e = cmd(sub, "evaluate", _evaluate, "accuracy, macro-F1, per-class table and confusion matrix of an artifact")
    e.add_argument("artifact", help="artifact folder written by `mmfusion train`")
    e.add_argument("--data", help="dataset folder or manifest (default: the artifact's data.path)")
    e.add_argument("--split", default="test", help="split to evaluate (default: test)")
    e.add_argument("--modalities", nargs="+", choices=["image", "text", "audio"],
                   help="hide the other modalities (robustness to a missing modality)")
    e.add_argument("--address", help="Ray cluster address for large inputs (default: local, no Ray for small)")
    return p


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


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
