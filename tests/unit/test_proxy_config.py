"""deploy/nginx/mmfusion.conf: what must sit in front of Ray Serve's proxy (issue 13, docs/security.md).
The file is parsed by crossplane (nginx's own grammar: contexts and argument counts) and each hardening
directive is checked where it must be."""

from __future__ import annotations

import json
from pathlib import Path

import crossplane
import pytest

from mmfusion.serving.guards import RAY_CONTROL_HEADERS
from mmfusion.serving.schemas import DEFAULT_MAX_REQUEST_BYTES

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "deploy" / "nginx" / "mmfusion.conf"


def _walk(block: list[dict], path: tuple[str, ...] = ()):
    for d in block:
        yield path, d
        if "block" in d:
            yield from _walk(d["block"], (*path, " ".join([d["directive"], *d["args"]])))


@pytest.fixture(scope="module")
def conf() -> list[dict]:
    res = crossplane.parse(str(CONF), single=True)
    assert res["status"] == "ok", res["errors"]
    return res["config"][0]["parsed"]


def _server(conf: list[dict]) -> list[dict]:
    http = next(d for d in conf if d["directive"] == "http")["block"]
    return next(d for d in http if d["directive"] == "server")["block"]


def _location(server: list[dict], where: str) -> list[dict]:
    return next(d for d in server if d["directive"] == "location" and d["args"] == where.split())["block"]


def _args(block: list[dict], directive: str) -> list[list[str]]:
    return [d["args"] for d in block if d["directive"] == directive]


def test_the_body_limit_is_the_servers(conf):
    server = _server(conf)
    (limit,) = _args(server, "client_max_body_size")
    assert limit == ["10m"] and 10 * 1024 * 1024 == DEFAULT_MAX_REQUEST_BYTES
    assert _args(_location(server, "/"), "proxy_request_buffering") == [["on"]]


def test_every_proxied_location_strips_rays_client_headers(conf):
    proxied = [(p, d) for p, d in _walk(conf) if d["directive"] == "location"
               and any(x["directive"] == "proxy_pass" for x in d.get("block", []))]
    assert proxied
    for _, loc in proxied:
        sets = {a[0].lower(): a[1] for a in _args(loc["block"], "proxy_set_header")}
        for header in (*RAY_CONTROL_HEADERS, "serve-multiplexed-model-id", "x-session-id"):
            assert sets.get(header) == "", f"{header} is passed through"
        assert sets["x-request-id"] == "$request_id"  # never client bytes (Ray decodes it as UTF-8)
    server = _server(conf)
    assert _args(server, "underscores_in_headers") == [["off"]]
    assert _args(server, "ignore_invalid_headers") == [["on"]]


def test_proxy_errors_get_the_json_error_shape(conf):
    server = _server(conf)
    root = _location(server, "/")
    assert _args(root, "proxy_intercept_errors") == [["on"]]
    pages = {a[0]: a[1] for a in _args(root, "error_page")}
    assert set(pages) == {"408", "413", "500", "502", "503", "504"}  # mmfusion's own 4xx pass through
    assert {a[0]: a[1] for a in _args(server, "error_page")} == {"400": "/_error/400"}
    for status, uri in {**pages, "400": "/_error/400"}.items():
        loc = _location(server, f"= {uri}")
        assert _args(loc, "internal") == [[]] and _args(loc, "default_type") == [["application/json"]]
        (ret,) = _args(loc, "return")
        assert ret[0] == status
        assert json.loads(ret[1])["error"]["status"] == int(status)
        assert set(json.loads(ret[1])["error"]) == {"status", "field", "message"}
        if status in ("502", "503", "504"):
            assert ["Retry-After", "1", "always"] in _args(loc, "add_header")


def test_the_proxy_waits_longer_than_the_server(conf):
    """The proxy's read timeout must exceed Serve's request timeout, or nginx cuts requests Serve would
    still answer (with the JSON 408 of the ingress)."""
    import yaml

    root = _location(_server(conf), "/")
    (read,) = _args(root, "proxy_read_timeout")
    local = yaml.safe_load((REPO / "serve" / "local.yaml").read_text())
    production = yaml.safe_load((REPO / "serve" / "production.yaml").read_text())
    serve_timeout = max(c["http_options"]["request_timeout_s"] for c in (local, production))
    assert int(read[0].rstrip("s")) > serve_timeout
