"""A small HTTP client for a served model (`mmfusion request`): one prediction from files, or a whole dataset
split sent over HTTP with the accuracy measured on the answers. requests + pyarrow only (no torch, no Ray).

Retries: a 503 (queue full) is retried after its Retry-After, a few times, by urllib3's Retry.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from mmfusion.errors import DataError, MmfusionError

log = logging.getLogger(__name__)

PREDICT_PATH = "/v1/predict"


class HttpError(MmfusionError):
    """The server answered with an error status (the message carries its JSON error)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def base_url(url: str) -> str:
    """http://host:port[/prefix][/v1/predict] -> http://host:port[/prefix]."""
    url = url.rstrip("/")
    if url.endswith(PREDICT_PATH):
        url = url[: -len(PREDICT_PATH)]
    if not url.startswith(("http://", "https://")):
        raise MmfusionError(f"the server URL must start with http:// or https://, got {url!r}")
    return url


class Client:
    """Thread-safe (one requests.Session per thread)."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 60.0,
                 retries: int = 5) -> None:
        self.base = base_url(url)
        self.timeout_s = timeout_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.retry = Retry(total=retries, connect=0, read=0, status_forcelist=(503,), allowed_methods=None,
                           respect_retry_after_header=True, backoff_factor=0.2, raise_on_status=False)
        self._local = threading.local()

    @property
    def session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
            s.mount("http://", HTTPAdapter(max_retries=self.retry))
            s.mount("https://", HTTPAdapter(max_retries=self.retry))
        return s

    def _check(self, r: requests.Response) -> dict[str, Any]:
        try:
            body = r.json()
        except ValueError:
            body = {"error": {"message": r.text[:500]}}
        if r.status_code != 200:
            err = body.get("error", body) if isinstance(body, dict) else body
            raise HttpError(r.status_code, f"{err.get('field', '')}: {err.get('message', err)}"
                            if isinstance(err, dict) else str(err))
        return body

    def healthy(self) -> bool:
        try:
            return self.session.get(f"{self.base}/healthz", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if time.monotonic() > deadline:
                raise MmfusionError(f"{self.base}/healthz did not answer 200 within {timeout_s:.0f} s")
            time.sleep(1.0)

    def metadata(self) -> dict[str, Any]:
        return self._check(self.session.get(f"{self.base}/v1/metadata", headers=self.headers,
                                            timeout=self.timeout_s))

    def predict(self, image: bytes | None = None, audio: bytes | None = None, text: str | None = None,
                as_json: bool = False) -> dict[str, Any]:
        """POST one example (multipart by default, JSON + base64 with as_json). HttpError on a non-200."""
        if as_json:
            payload: dict[str, Any] = {"text": text}
            for name, data in (("image", image), ("audio", audio)):
                if data is not None:
                    payload[name] = base64.b64encode(data).decode("ascii")
            r = self.session.post(f"{self.base}{PREDICT_PATH}",
                                  json={k: v for k, v in payload.items() if v is not None},
                                  headers=self.headers, timeout=self.timeout_s)
        else:
            files: dict[str, Any] = {}
            if image is not None:
                files["image"] = ("image", image, "application/octet-stream")
            if audio is not None:
                files["audio"] = ("audio", audio, "application/octet-stream")
            if text is not None:
                files["text"] = (None, text.encode("utf-8"))  # a plain form field
            r = self.session.post(f"{self.base}{PREDICT_PATH}", files=files, headers=self.headers,
                                  timeout=self.timeout_s)
        return self._check(r)


def predict_files(url: str, image: str | None = None, audio: str | None = None, text: str | None = None,
                  api_key: str | None = None, as_json: bool = False) -> dict[str, Any]:
    """One prediction from local files (read here, by the client: the server never reads paths)."""
    def read(p: str | None) -> bytes | None:
        return Path(p).read_bytes() if p is not None else None

    if image is None and audio is None and text is None:
        raise MmfusionError("give at least one of --image, --audio, --text (or --data for a whole split)")
    return Client(url, api_key).predict(read(image), read(audio), text, as_json=as_json)


@dataclass
class HttpEvaluation:
    rows: int = 0  # rows sent (or set aside by the reader)
    answered: int = 0  # 200 answers
    correct: int = 0
    # reason -> rows (4xx answers, unreadable records)
    rejected: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    modalities: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.answered if self.answered else float("nan")

    def text(self, source: str, concurrency: int) -> str:
        lines = [f"accuracy through HTTP: {self.accuracy:.4f} ({self.correct}/{self.answered} answered rows "
                 f"of {source}, modalities {', '.join(self.modalities)})",
                 f"{self.rows} rows in {self.seconds:.1f} s: {self.rows / max(self.seconds, 1e-9):.1f} "
                 f"requests/s with {concurrency} in flight"]
        if self.rejected:
            lines.append(f"{sum(self.rejected.values())} rows rejected:")
            lines += [f"  {n} x {reason}" for reason, n in self.rejected.most_common(10)]
        return "\n".join(lines)


def _rows(data: str, split: str, label_column: str, modalities: list[str]) -> Iterator[dict[str, Any]]:
    from mmfusion.data.readers import iter_records

    for tb in iter_records(data, split, label_column, modalities=modalities):
        yield from tb.select(["id", "label", "error", *modalities]).to_pylist()


def evaluate_over_http(url: str, data: str, split: str = "test", label_column: str = "label",
                       modalities: list[str] | None = None, concurrency: int = 8, api_key: str | None = None,
                       limit: int | None = None) -> HttpEvaluation:
    """Send every record of a split to the server (the model's modalities, or `modalities`) and score
    answers."""
    client = Client(url, api_key)
    served = client.metadata()["modalities"]
    use = [m for m in served if modalities is None or m in modalities]
    if not use:
        raise DataError(f"--modalities {modalities}: the served model accepts {served}")
    result = HttpEvaluation(modalities=use)

    def one(row: dict[str, Any]) -> tuple[bool | None, str | None]:
        if row.get("error"):
            return None, f"unreadable record: {row['error']}"
        values = {m: row.get(m) for m in use}
        if all(v is None or v == "" for v in values.values()):
            return None, f"record has none of {', '.join(use)}"
        try:
            out = client.predict(values.get("image"), values.get("audio"), values.get("text"))
        except HttpError as e:
            return None, str(e)
        return out["label"] == str(row.get("label")), None

    t0 = time.monotonic()
    rows = _rows(data, split, label_column, use)
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        pending: list[Any] = []
        for i, row in enumerate(rows):
            if limit is not None and i >= limit:
                break
            pending.append(pool.submit(one, row))
            if len(pending) >= 4 * concurrency:  # bounded in flight: media bytes stay small in memory
                _collect(pending.pop(0).result(), result)
        for f in pending:
            _collect(f.result(), result)
    result.seconds = time.monotonic() - t0
    if result.rows == 0:
        raise DataError(f"{data} has no {split!r} rows")
    return result


def _collect(outcome: tuple[bool | None, str | None], result: HttpEvaluation) -> None:
    ok, reason = outcome
    result.rows += 1
    if reason is not None:
        result.rejected[reason] += 1
        return
    result.answered += 1
    result.correct += int(bool(ok))
