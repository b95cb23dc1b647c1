"""docs/cluster.md cannot rot: its walk-through names every step in order, and every `mmfusion` command in it
parses with the real CLI, with configs and overrides that validate."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from mmfusion.cli import build_parser
from mmfusion.config import load_config

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "cluster.md").read_text()
WALKTHROUGH = DOC.split("## From zero to a served model", 1)[1].split("\n## ", 1)[0]


def commands(text: str) -> list[str]:
    """Shell commands of the ```bash blocks: continuation lines joined, comments dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = re.sub(r"\s+#\s.*$", "", cmd).strip()
            if cmd and not cmd.startswith("#"):
                out.append(re.sub(r"\s+", " ", cmd))
    return out


def test_the_walkthrough_names_every_step_in_order():
    steps = ["aws s3 mb", "aws iam create-instance-profile", "ray get-auth-token --generate", "pip wheel",
             "ray up cluster.yaml", "ray dashboard cluster.yaml", "mmfusion data build",
             "mmfusion submit -- train", "mmfusion submit -- tune", "serve deploy serve/production.yaml",
             "serve status", "mmfusion request", "serve shutdown", "ray down cluster.yaml"]
    cmds = commands(WALKTHROUGH)
    positions = []
    for step in steps:
        found = [i for i, c in enumerate(cmds) if step in c]
        assert found, f"the walk-through does not run `{step}`"
        positions.append(found[0])
    assert positions == sorted(positions), [s for _, s in sorted(zip(positions, steps, strict=True))]


MMFUSION_COMMANDS = [c for c in commands(DOC) if re.match(r"(\w+=(\$\([^)]*\)|\S+) )*mmfusion ", c)]


@pytest.mark.parametrize("cmd", MMFUSION_COMMANDS, ids=[" ".join(c.split()[:4]) for c in MMFUSION_COMMANDS])
def test_every_mmfusion_command_parses(cmd):
    argv = shlex.split(cmd.replace("$BUCKET", "bucket").replace("$PWD", "/work"))
    argv = argv[argv.index("mmfusion") + 1:]  # after any VAR=value prefix
    args = build_parser().parse_args(argv)
    if argv[0] == "submit":
        assert args.job_command[0] == "--"
        sub = build_parser().parse_args(args.job_command[1:])
        if hasattr(sub, "config") and hasattr(sub, "overrides"):
            cfg = load_config(REPO / sub.config, sub.overrides)  # the config exists; every override is valid
            if "s3://" in " ".join(sub.overrides):
                assert cfg.train.storage_path.startswith("s3://") and cfg.data.path.startswith("s3://")
