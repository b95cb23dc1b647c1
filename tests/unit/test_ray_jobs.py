"""mmfusion.ray_jobs without a cluster: token lookup, address resolution, entrypoint and runtime_env building,
and the CLI's handling of `--`. The e2e tests (tests/e2e/test_submit.py) submit to a real cluster."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from mmfusion.cli import build_parser, subcommand_names
from mmfusion.errors import MmfusionError
from mmfusion.ray_jobs import (
    DEFAULT_ADDRESS,
    ClusterError,
    _in_clear,
    build_entrypoint,
    build_runtime_env,
    connect,
    find_token,
    resolve_address,
)

REPO = Path(__file__).resolve().parents[2]
COMMANDS = subcommand_names(build_parser())


def test_token_lookup_follows_rays_order(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-default-file\n")
    path = tmp_path / "token"
    path.write_text("  from-path \n")
    assert find_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(path)},
                      home).value == "from-env"
    token = find_token({"RAY_AUTH_TOKEN_PATH": str(path)}, home)
    assert token.value == "from-path" and token.source == f"RAY_AUTH_TOKEN_PATH={path}"
    assert find_token({"RAY_AUTH_TOKEN": "  "}, home).value == "from-default-file"  # blank env is no token
    assert find_token({}, tmp_path / "nobody") is None


@pytest.mark.parametrize("content, needle", [(None, "cannot be read"), ("\n", "is empty")])
def test_an_unusable_token_path_is_an_error_not_a_fallback(tmp_path, content, needle):
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ClusterError, match=needle):
        find_token({"RAY_AUTH_TOKEN_PATH": str(path)}, tmp_path)


def test_address_resolution():
    assert resolve_address("http://head:8265/", {"RAY_ADDRESS": "http://other:8265"}) == "http://head:8265"
    assert resolve_address(None, {"RAY_API_SERVER_ADDRESS": "http://api:8265"}) == "http://api:8265"
    assert resolve_address(None, {"RAY_ADDRESS": "https://head:443/"}) == "https://head:443"
    # inside a Ray job RAY_ADDRESS is the GCS address, not the Jobs API
    assert resolve_address(None, {"RAY_ADDRESS": "10.0.0.1:6379"}) == DEFAULT_ADDRESS
    assert resolve_address(None, {}) == DEFAULT_ADDRESS


def test_a_token_over_plain_http_to_another_host_is_flagged():
    assert _in_clear("http://10.0.0.5:8265") and _in_clear("http://head.example.com:8265")
    assert not _in_clear("http://127.0.0.1:8265") and not _in_clear("http://localhost:8265")
    assert not _in_clear("https://head.example.com")


def test_entrypoint_is_a_quoted_mmfusion_command():
    assert build_entrypoint(["--", "train", "my cfg.yaml", "data.modalities=[image,text]"], COMMANDS) == \
        "mmfusion train 'my cfg.yaml' 'data.modalities=[image,text]'"


@pytest.mark.parametrize("command, needle", [
    ([], "no command to submit"),
    (["--"], "no command to submit"),
    (["mmfusion", "train", "x.yaml"], "without 'mmfusion'"),
    (["trian", "x.yaml"], "cannot submit 'trian'"),
    (["submit", "--", "train"], "cannot submit 'submit'"),
    (["jobs", "list"], "cannot submit 'jobs'"),
])
def test_bad_commands_are_refused_before_contacting_a_cluster(command, needle):
    with pytest.raises(MmfusionError, match=needle):
        build_entrypoint(command, COMMANDS)


def test_runtime_env_uploads_the_working_dir_and_the_local_package(tmp_path):
    env = build_runtime_env(REPO)
    assert env["working_dir"] == str(REPO)
    assert env["py_modules"] == [str(REPO / "platform" / "mmfusion")]
    assert {".venv", "/data", "/runs"} <= set(env["excludes"])
    assert "py_modules" not in build_runtime_env(REPO, use_installed=True)
    assert "py_modules" not in build_runtime_env(tmp_path)  # not this repository: the installed mmfusion
    assert "working_dir" not in build_runtime_env(None)
    with pytest.raises(MmfusionError, match="is not a directory"):
        build_runtime_env(tmp_path / "missing")


def test_cli_keeps_everything_after_the_double_dash():
    args = build_parser().parse_args(["submit", "--address", "http://h:8265", "--no-wait", "--", "train",
                                      "c.yaml", "--address", "ray://x:10001"])
    assert args.address == "http://h:8265" and args.no_wait
    assert args.job_command == ["--", "train", "c.yaml", "--address", "ray://x:10001"]


def test_an_unreachable_cluster_is_a_clear_error(monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")  # must not override the explicit address
    with pytest.raises(ClusterError, match=f"cannot reach the Ray Jobs API at http://127.0.0.1:{port}"):
        connect(f"http://127.0.0.1:{port}")
