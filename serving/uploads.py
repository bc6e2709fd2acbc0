"""What a classification request carries: its images and `top_k`, read with bounded memory.

Two ways to send an image to `POST /classify`:
- multipart (`curl -F image=@cat.png [-F top_k=5]`): exactly one file field `image`;
- the raw image as the body (`curl --data-binary @cat.png -H 'Content-Type: image/png'`, or
  `application/octet-stream`): no multipart parsing, no temporary file; `top_k` in the query.
`POST /classify_batch` takes multipart with one or more file fields `images`.

Every byte of a body is counted twice over: against the per-request limit
(`CIFAR_MAX_UPLOAD_BYTES`, 413; a declared Content-Length over it is refused before anything is
read) and against the worker's budget of bytes held for requests in flight
(`CIFAR_MAX_INFLIGHT_BYTES`, 503 with Retry-After: the client should try again in a moment).
The budget is charged as bytes arrive, not by what a client declares, so idle connections that
announce big bodies hold nothing. Bodies are parsed as they stream in: the parts are the only
copy.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from python_multipart.multipart import MultipartParser, parse_options_header

DEFAULT_MAX_INFLIGHT_BYTES = 64 * 1024 * 1024
MAX_TOP_K = 10
RAW_TYPES = ("application/octet-stream",)  # and every image/*


class BadRequest(Exception):
    """A request we answer with a 4xx/5xx JSON body `{"error": message, "reason": reason}`."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        reason: str = "bad_request",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.reason, self.headers = status, reason, headers or {}


class Budget:
    """Bytes of request bodies this worker holds at once (one event loop: no lock needed)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self, n: int) -> None:
        if self.used + n > self.limit:
            raise BadRequest(
                f"the server is holding {self.used} bytes of uploads for other requests and "
                f"this one would pass its budget of {self.limit} bytes; retry in a moment",
                status=503,
                reason="busy",
                headers={"Retry-After": "1"},
            )
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n


DEFAULT_MAX_UPLOAD_BYTES = 16 * 1024 * 1024


def _bytes_setting(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a whole number of bytes") from None
    if value < 1:
        raise ValueError(f"{name}={raw!r} must be at least 1")
    return value


def max_upload_bytes() -> int:
    """$CIFAR_MAX_UPLOAD_BYTES: the largest request body (default 16 MiB)."""
    return _bytes_setting("CIFAR_MAX_UPLOAD_BYTES", DEFAULT_MAX_UPLOAD_BYTES)


def max_inflight_bytes() -> int:
    """$CIFAR_MAX_INFLIGHT_BYTES: body bytes one worker holds at once (default 64 MiB); at
    least one largest body, or that body could never be accepted."""
    value = _bytes_setting("CIFAR_MAX_INFLIGHT_BYTES", DEFAULT_MAX_INFLIGHT_BYTES)
    if value < max_upload_bytes():
        raise ValueError(
            f"CIFAR_MAX_INFLIGHT_BYTES={value} is below CIFAR_MAX_UPLOAD_BYTES="
            f"{max_upload_bytes()}: a body of the allowed size could never be taken"
        )
    return value


@dataclass
class Part:
    name: str
    filename: str | None
    content_type: str
    data: bytearray = field(default_factory=bytearray)


@dataclass
class Upload:
    """A parsed request: the image files in order, with their form names, and top_k."""

    images: list[bytes | bytearray]
    top_k: int
    held: int  # bytes reserved in the budget; give them back when the request is done


def parse_top_k(raw: str | bytes | None, default: int = 3) -> int:
    if raw is None:
        return default
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    value = text.strip()
    # ASCII digits only (str.isdigit also takes '²'), and short: int() of 5,000 digits raises.
    if (
        not (value.isascii() and value.isdigit() and len(value) <= 2)
        or not 1 <= int(value) <= MAX_TOP_K
    ):
        shown = value if len(value) <= 20 else value[:20] + "..."
        raise BadRequest(
            f"top_k must be a whole number from 1 to {MAX_TOP_K}, got {shown!r}", reason="bad_top_k"
        )
    return int(value)


class _FormCollector:
    """Callbacks for python-multipart's streaming parser: parts as they arrive, with limits."""

    def __init__(self, max_parts: int):
        self.parts: list[Part] = []
        self.max_parts = max_parts
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._current: Part | None = None
        self.complete = False  # the closing boundary was seen

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._begin,
            "on_part_data": self._data,
            "on_header_field": lambda b, s, e: self._header_field.extend(b[s:e]),
            "on_header_value": lambda b, s, e: self._header_value.extend(b[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_done,
            "on_end": self._end,
        }

    def _end(self) -> None:
        self.complete = True

    def _begin(self) -> None:
        if len(self.parts) >= self.max_parts:
            raise BadRequest(
                f"more than {self.max_parts} form fields in one request",
                status=413,
                reason="too_many_fields",
            )
        self._headers = {}

    def _header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _headers_done(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if disposition != b"form-data" or b"name" not in options:
            raise BadRequest(
                "a multipart part has no Content-Disposition: form-data; name=...",
                reason="bad_multipart",
            )
        filename = options.get(b"filename")
        self._current = Part(
            options[b"name"].decode("utf-8", "replace"),
            None if filename is None else filename.decode("utf-8", "replace"),
            self._headers.get(b"content-type", b"").decode("latin-1"),
        )
        self.parts.append(self._current)

    def _data(self, data: bytes, start: int, end: int) -> None:
        assert self._current is not None  # the parser begins a part before its data
        self._current.data.extend(data[start:end])


async def read_upload(
    headers: dict[str, str],
    query: str,
    stream: AsyncIterator[bytes],
    *,
    file_field: str,
    many: bool,
    max_files: int,
    max_bytes: int,
    budget: Budget,
) -> Upload:
    """Read and check one request for `/classify` (`many=False`) or `/classify_batch`."""
    ctype, options = parse_options_header(headers.get("content-type", ""))
    query_top_k = _query_top_k(query)
    raw = _check_type(ctype.decode("latin-1").lower(), many, file_field)
    _check_length(headers.get("content-length"), max_bytes)
    held = [0]  # bytes taken from the budget so far (given back if the request fails)
    try:
        collector = None if raw else _FormCollector(max_parts=max_files + 16)
        parser = None if collector is None else _multipart_parser(options, collector)
        body = await _receive(stream, parser, max_bytes, budget, held)
        if collector is None:
            return Upload([bytes(body)], parse_top_k(query_top_k), held[0])
        if not collector.complete:
            raise BadRequest(
                "the multipart body ends before its closing boundary (truncated upload)",
                reason="bad_multipart",
            )
        images, top_k = _form_fields(collector.parts, file_field, many, max_files, query_top_k)
        return Upload(list[bytes | bytearray](images), top_k, held[0])
    except BaseException:
        budget.give(held[0])
        raise


def _query_top_k(query: str) -> str | None:
    """The query string's top_k (the only parameter it may carry), unparsed."""
    query_args = parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(query_args) - {"top_k"})
    if unknown:
        raise BadRequest(
            f"unknown query parameter(s) {', '.join(unknown)}; only top_k", reason="unknown_field"
        )
    if len(query_args.get("top_k", [])) > 1:
        raise BadRequest("top_k given more than once", reason="bad_top_k")
    return query_args.get("top_k", [None])[0]


def _check_type(ctype: str, many: bool, file_field: str) -> bool:
    """Whether the body is a raw image (else multipart); 415 for any other content type."""
    raw = ctype.startswith("image/") or ctype in RAW_TYPES
    if not raw and ctype != "multipart/form-data":
        how = (
            f"multipart/form-data (curl -F {file_field}=@cat.png)"
            if many
            else "multipart/form-data (curl -F image=@cat.png) or the raw image with Content-Type "
            "image/* or application/octet-stream"
        )
        raise BadRequest(
            f"Content-Type {ctype or '(none)'!r} is not accepted; send {how}",
            status=415,
            reason="unsupported_content_type",
        )
    if raw and many:
        raise BadRequest(
            "/classify_batch takes multipart/form-data with one `images` field per "
            "file; a raw body is one image: POST it to /classify",
            status=415,
            reason="unsupported_content_type",
        )
    return raw


def _check_length(declared: str | None, max_bytes: int) -> None:
    """A declared Content-Length must be a number within the limit (413 over it)."""
    if declared is None:
        return
    if not (declared.isascii() and declared.isdigit()):
        raise BadRequest(f"invalid Content-Length header {declared[:40]!r}")
    if int(declared) > max_bytes:
        raise BadRequest(
            f"request body of {declared} bytes is over the limit of {max_bytes} "
            f"bytes ({max_bytes / 2**20:.1f} MiB); send a smaller image",
            status=413,
            reason="body_too_large",
        )


def _multipart_parser(options: dict[bytes, bytes], collector: _FormCollector) -> MultipartParser:
    boundary = options.get(b"boundary")
    if not boundary:
        raise BadRequest("multipart/form-data without a boundary", reason="bad_multipart")
    try:
        return MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]  # a dict of the callbacks it names
    except Exception as exc:  # noqa: BLE001 - e.g. a boundary over 256 characters
        raise BadRequest(f"malformed multipart header: {exc}", reason="bad_multipart") from None


async def _receive(
    stream: AsyncIterator[bytes],
    parser: MultipartParser | None,
    max_bytes: int,
    budget: Budget,
    held: list[int],
) -> bytearray:
    """Read the body chunk by chunk, each taken from the budget (counted in `held[0]`): into
    the multipart parser, or (raw) into the bytes returned; 413 past `max_bytes`."""
    body, received = bytearray(), 0
    async for chunk in stream:
        received += len(chunk)
        if received > max_bytes:
            raise BadRequest(
                f"request body of more than {max_bytes} bytes is over the limit "
                f"({max_bytes / 2**20:.1f} MiB); send a smaller image",
                status=413,
                reason="body_too_large",
            )
        budget.take(len(chunk))  # what arrived, not what was announced
        held[0] += len(chunk)
        if parser is None:
            body.extend(chunk)
            continue
        try:
            parser.write(chunk)
        except BadRequest:
            raise
        except Exception as exc:  # noqa: BLE001 - python-multipart's own errors
            raise BadRequest(f"malformed multipart body: {exc}", reason="bad_multipart") from None
    if parser is not None:
        try:
            parser.finalize()
        except Exception as exc:  # noqa: BLE001
            raise BadRequest(f"malformed multipart body: {exc}", reason="bad_multipart") from None
    return body


def _form_fields(
    parts: list[Part], file_field: str, many: bool, max_files: int, query_top_k: str | None
) -> tuple[list[bytearray], int]:
    """The multipart fields by the endpoint's rules: only `file_field` files and `top_k`."""
    unknown = sorted({p.name for p in parts} - {file_field, "top_k"})
    if unknown:
        raise BadRequest(
            f"unknown form field(s) {', '.join(map(repr, unknown))}: send the image "
            f"as the file field {file_field!r}" + ("" if many else " (and optionally top_k)"),
            reason="unknown_field",
        )
    files = [p for p in parts if p.name == file_field]
    for p in files:
        if p.filename is None:
            raise BadRequest(
                f"field {file_field!r} must be a file upload (curl -F "
                f"{file_field}=@cat.png), got a text value; this service does not "
                "download URLs",
                reason="not_a_file",
            )
    if not files:
        raise BadRequest(
            f"no file in field {file_field!r}: send curl -F {file_field}=@cat.png",
            reason="missing_image",
        )
    if not many and len(files) > 1:
        raise BadRequest(
            f"{len(files)} images in one /classify request: it classifies exactly "
            "one; send several to /classify_batch (-F images=@a.png -F "
            "images=@b.png)",
            reason="too_many_images",
        )
    if len(files) > max_files:
        raise BadRequest(
            f"{len(files)} images in one request, over the limit of {max_files}",
            status=413,
            reason="too_many_images",
        )
    top_ks = [p for p in parts if p.name == "top_k"]
    if len(top_ks) > 1 or (top_ks and query_top_k is not None):
        raise BadRequest("top_k given more than once", reason="bad_top_k")
    if top_ks and top_ks[0].filename is not None:
        raise BadRequest("top_k must be a form value, not a file", reason="bad_top_k")
    top_k = parse_top_k(bytes(top_ks[0].data) if top_ks else query_top_k)
    return [p.data for p in files], top_k
