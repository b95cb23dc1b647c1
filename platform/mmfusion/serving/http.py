"""Reading a request body on the ingress: the size limit while streaming, and a multipart parser that keeps
text fields as bytes, so that non-UTF-8 text is a 400 (Starlette's parser would decode it as latin-1)."""

from __future__ import annotations

from typing import Any

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from mmfusion.serving.schemas import FormPart, RequestError, check_length


class StrictMultiPartParser(MultiPartParser):
    """Starlette's parser, except that a plain (non-file) field's value stays bytes: inputs_from_parts decodes
    it as UTF-8 or answers 400. (Starlette falls back to latin-1, which turned bad bytes into a 200.)"""

    def on_part_end(self) -> None:
        part: Any = self._current_part
        if part.file is None:
            self.items.append((part.field_name, bytes(part.data)))  # type: ignore[arg-type]
        else:
            super().on_part_end()


async def read_body(request: Request, limit: int) -> bytes:
    """The body, at most `limit` bytes (413 above it, also when the client sends no Content-Length)."""
    check_length(request.headers.get("content-length"), limit)
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise RequestError(413, "body", f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def multipart_parts(request: Request, body: bytes, limit: int) -> list[FormPart]:
    async def replay():  # the body was already read (and size-checked) above
        yield body

    parser = StrictMultiPartParser(request.headers, replay(), max_files=8, max_fields=8, max_part_size=limit)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise RequestError(400, "body", f"malformed multipart body ({e.message})") from None
    except Exception as e:  # python-multipart's own parse errors
        raise RequestError(400, "body", f"malformed multipart body ({type(e).__name__}: {e})") from None
    parts = []
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                parts.append(FormPart(name, await value.read(), True))
            else:
                parts.append(FormPart(name, value, False))
    finally:
        await form.close()
    return parts
