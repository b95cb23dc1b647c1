"""Request guards of the ingress that need no body: Ray's control headers, the Host allow-list, the Origin
check (no CORS by default). Pure Python, like schemas.py; docs/security.md says which layer enforces what.
"""

from __future__ import annotations

from collections.abc import Sequence

from mmfusion.serving.schemas import RequestError

# Ray Serve's proxy reads these from the client: a timeout of 0 disables the server's request timeout, and
# `?1` keeps the work running after the client leaves. Only an operator may set them (docs/security.md).
RAY_CONTROL_HEADERS = ("x-request-timeout-seconds", "x-request-disconnect-disabled")


def check_client_headers(names: Sequence[str]) -> None:
    """400 for a request that carries one of Ray's control headers (the proxy already read it; the ingress
    refuses the request before doing any work, so a client cannot lift the server's limits)."""
    for name in names:
        if name.lower() in RAY_CONTROL_HEADERS:
            raise RequestError(400, name.lower(), "this header is reserved for the operator; remove it")


def _hostname(netloc: str) -> str:
    """'Example.com:8000' -> 'example.com', '[::1]:80' -> '::1'."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1:].split("]", 1)[0]
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


def check_host(host: str | None, allowed: Sequence[str] | None) -> None:
    """403 unless the Host header names an allowed host (None: any). Stops DNS rebinding to a local server."""
    if allowed is None:
        return
    if not host or _hostname(host) not in {h.lower() for h in allowed}:
        raise RequestError(403, "host", f"Host {host!r} is not served here (allowed_hosts)")


def check_origin(origin: str | None, host: str | None, allowed: Sequence[str]) -> None:
    """403 for a browser request from another site: an Origin header that is neither this server's own
    (scheme://Host, e.g. the /docs page) nor in `allowed` ("*" allows any). No Origin (curl, SDKs): fine."""
    if origin is None or "*" in allowed or origin.rstrip("/") in {o.rstrip("/") for o in allowed}:
        return
    netloc = origin.split("://", 1)[1] if "://" in origin else ""
    if host and netloc.lower() == host.strip().lower():
        return
    raise RequestError(403, "origin", f"cross-origin request from {origin!r} refused (allowed_origins)")
