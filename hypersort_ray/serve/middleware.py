"""ASGI middleware: the guards that run before any parser buffers a body (no Ray imports).

Two places need them:

* **The replica** (:class:`RequestGuardMiddleware`, inside the FastAPI app): Host allow-list, Origin check
  and CORS, bearer token, then the body-size cap -- all before the multipart parser reads a byte. FastAPI
  parses a multipart body completely (spooling the file) before the endpoint runs, so a check inside the
  endpoint comes too late.
* **Ray Serve's proxy** (:class:`ProxyGuardMiddleware`, installed through Serve's proxy callback
  ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=hypersort_ray.serve.middleware:proxy_middlewares``): the
  proxy gives a request a replica slot before its body has arrived, and reads the body into its own
  queue, so a cap in the replica protects neither the proxy's memory nor the replica's slots. The proxy
  guard answers 413 on ``Content-Length`` before reading the body and stops a streamed body at the first
  byte over the cap; it reads every body completely before the proxy sees the request
  (:class:`UploadPolicy`: an upload that is too slow gets 408, a proxy holding too many bytes of uploads
  answers 503), so a slow client never holds a replica slot. It also strips the
  ``x-request-*`` headers with which any client could steer the proxy (``x-request-timeout-seconds: 0``
  switches the request timeout off, ``x-request-disconnect-disabled`` keeps work running after the client
  left, ``x-request-id`` picks the id written to the logs), and rewrites the proxy's own plain-text errors
  (408, 503, 500) into the endpoint's one JSON error shape.

Every refusal uses :func:`hypersort_ray.serve.wire.error_body` with the request's id.

Example:
    >>> from starlette.applications import Starlette
    >>> app = BodySizeLimitMiddleware(Starlette(), limit_bytes=lambda: 1024)
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from python_multipart.multipart import parse_options_header
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hypersort_ray.config import ServeSettings
from hypersort_ray.serve.validation import bearer_token_ok
from hypersort_ray.serve.wire import error_body, new_request_id, request_id_from_headers

__all__ = [
    "PROXY_CALLBACK",
    "PROXY_BUFFER_ENV",
    "PROXY_MAX_BODY_ENV",
    "PROXY_UPLOAD_MIN_RATE_ENV",
    "PROXY_UPLOAD_TIMEOUT_ENV",
    "BodySizeLimitMiddleware",
    "GuardSettings",
    "ProxyGuardMiddleware",
    "RequestGuardMiddleware",
    "UploadPolicy",
    "proxy_middlewares",
    "relative_path",
    "send_error",
]

logger = logging.getLogger("ray.serve.hypersort")  # Serve's log files, in the proxy as in replicas

#: The value of ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` that installs :class:`ProxyGuardMiddleware`.
PROXY_CALLBACK = "hypersort_ray.serve.middleware:proxy_middlewares"
#: Environment variable (on the nodes running Serve proxies) with the proxy's body cap in MiB.
PROXY_MAX_BODY_ENV = "HYPERSORT_PROXY_MAX_BODY_MB"
#: Environment variables with the proxy's upload rule (:class:`UploadPolicy`) and its buffer cap in MiB.
PROXY_UPLOAD_TIMEOUT_ENV = "HYPERSORT_PROXY_UPLOAD_TIMEOUT_S"
PROXY_UPLOAD_MIN_RATE_ENV = "HYPERSORT_PROXY_UPLOAD_MIN_RATE_KIB"
PROXY_BUFFER_ENV = "HYPERSORT_PROXY_BUFFER_MB"
# The proxy's fallbacks when its environment lacks a setting: ServeSettings' defaults, one source.
_SERVE_DEFAULTS = {name: info.default for name, info in ServeSettings.model_fields.items()}
DEFAULT_PROXY_MAX_BODY_MB = float(_SERVE_DEFAULTS["max_body_mb"])
# Headers Ray Serve's proxy reads as instructions (timeout, disconnect policy, request id).
_CONTROL_PREFIX = b"x-request-"
_EXPOSED = "X-Style, X-Styles, X-Latent, X-Foreground-Voxels, X-Model-Version, X-Inference-Ms, X-Request-ID"


class _BodyTooLarge(Exception):
    pass


class _TooManyParts(_BodyTooLarge):
    """A multipart body with more delimiters than any upload to this endpoint needs."""


#: Multipart delimiters a body may hold. An upload is a file and a few fields (style, latent); each
#: delimiter costs the form parser a slow path, so a body made of them (20 MiB of ``\r\n--B`` + one
#: byte) costs the replica's event loop tens of times what a plain body of that size does.
MAX_MULTIPART_PARTS = 64


def _too_large_detail(limit: int) -> str:
    return f"request body exceeds the limit of {limit / 2**20:.4g} MiB (max_body_mb)"


def _too_many_parts_detail() -> str:
    return (f"the multipart body holds more than {MAX_MULTIPART_PARTS} parts; this endpoint takes one file "
            "and at most a few form fields")


def _multipart_delimiter(scope: Scope) -> bytes | None:
    """``\r\n--BOUNDARY`` of a multipart request (None for other content types or no boundary)."""
    value = _header(scope, b"content-type")
    if not value or not value.lower().startswith(b"multipart/"):
        return None
    _, params = parse_options_header(value)
    boundary = params.get(b"boundary")
    return b"\r\n--" + boundary if boundary else None


class _DelimiterCounter:
    """Counts ``delimiter`` in a body that arrives in chunks (matches across chunk edges included)."""

    def __init__(self, delimiter: bytes):
        self.delimiter = delimiter
        self.count = 0
        self._tail = b""

    def feed(self, chunk: bytes) -> int:
        data = self._tail + chunk
        self.count += data.count(self.delimiter)
        # keep what could start a match that the next chunk completes (never a whole match)
        self._tail = data[-(len(self.delimiter) - 1):] if len(self.delimiter) > 1 else b""
        return self.count


async def send_error(
    send: Send,
    status: int,
    detail: str,
    request_id: str,
    headers: Iterable[tuple[bytes, bytes]] = (),
    *,
    id_header: bool = False,
) -> None:
    """Send the one JSON error shape (closing the connection: the body may not have been read).

    ``id_header``: add ``x-request-id`` (only in front of Serve's proxy, which adds it to everything else).
    """
    body = error_body(status, detail, request_id)
    own = [(b"x-request-id", request_id.encode())] if id_header else []
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                *own,
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value
    return None


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _request_id(scope: Scope) -> str:
    state = scope.get("state")
    if isinstance(state, dict) and state.get("request_id"):
        return str(state["request_id"])
    return request_id_from_headers(scope.get("headers", []))


class BodySizeLimitMiddleware:
    """Answer 413 (the JSON error shape) when a request body exceeds ``limit_bytes()``, and 400 when a
    multipart body holds more than :data:`MAX_MULTIPART_PARTS` delimiters.

    * a ``Content-Length`` above the limit is answered at once, without reading the body;
    * a body without a length (chunked) is counted while it streams; at the first byte over the limit the
      parser is stopped and the client gets 413 instead of whatever the parser made of the cut-off body;
    * multipart delimiters are counted as the body streams (a C-speed ``bytes.count`` per chunk), so the
      form parser never meets a body built to make it slow.

    Args:
        app: the wrapped ASGI app.
        limit_bytes: returns the current limit in bytes, or None for no limit (looked up per request, so a
            Serve replica can supply the value it was deployed with).
    """

    def __init__(self, app: ASGIApp, limit_bytes: Callable[[], int | None]):
        self.app = app
        self.limit_bytes = limit_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_bytes()
        if limit is None:
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await send_error(send, 413, _too_large_detail(limit), request_id)
            return

        received = 0
        refusal: tuple[int, str] | None = None  # (status, detail) once the body is refused
        started = False
        delimiter = _multipart_delimiter(scope)
        parts = _DelimiterCounter(delimiter) if delimiter else None

        async def limited_receive() -> Message:
            nonlocal received, refusal
            if refusal is not None:
                raise _BodyTooLarge
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > limit:
                    refusal = (413, _too_large_detail(limit))
                    raise _BodyTooLarge
                if parts is not None and parts.feed(chunk) > MAX_MULTIPART_PARTS + 1:
                    refusal = (400, _too_many_parts_detail())
                    raise _TooManyParts
            return message

        async def answer() -> None:
            if not started and refusal is not None:
                await send_error(send, refusal[0], refusal[1], request_id)

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refusal is not None:
                # The parser turned our signal into its own error response: replace it by ours.
                if message["type"] == "http.response.start" and not started:
                    await answer()
                    started = True
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            await answer()
        except BaseExceptionGroup as group:  # anyio task groups wrap it
            match, rest = group.split(_BodyTooLarge)
            if match is None or rest is not None:
                raise
            await answer()


@dataclass(frozen=True)
class GuardSettings:
    """What :class:`RequestGuardMiddleware` enforces.

    Attributes:
        max_body_bytes: body cap in bytes (None: none).
        token: the bearer token (None: no auth unless ``token_sha256`` is set).
        token_sha256: SHA-256 of the token, when the replica got only the digest.
        allowed_hosts: host names the ``Host`` header may carry (``*``: any; ``*.example.org``: a domain).
            Empty: any.
        allowed_origins: origins (``https://viewer.example.org``) allowed to call cross-origin; ``*``: any.
            Same-origin requests (Origin's host = Host) are always allowed.
    """

    max_body_bytes: int | None
    token: str | None
    token_sha256: bytes | None = None
    allowed_hosts: tuple[str, ...] = field(default=())
    allowed_origins: tuple[str, ...] = field(default=())

    @property
    def auth_on(self) -> bool:
        return bool(self.token or self.token_sha256)


_BRACKETED = re.compile(r"^\[([0-9a-f:.]+)\](?::[0-9]{1,5})?$")


def _hostname(value: str) -> str | None:
    """``[::1]:8000`` → ``::1``, ``Example.org:80`` → ``example.org``, ``::1`` → ``::1``; None for a
    bracketed host with anything but a port after it (``[::1]evil.example``)."""
    v = value.strip().lower()
    if v.startswith("["):
        match = _BRACKETED.match(v)
        return match.group(1) if match else None
    if v.count(":") == 1:
        return v.rsplit(":", 1)[0]
    return v


def host_allowed(host_header: str | None, allowed: Collection[str]) -> bool:
    """Whether a ``Host`` header names one of ``allowed`` (port ignored; ``*`` and ``*.domain`` patterns)."""
    if not allowed or "*" in allowed:
        return True
    if not host_header:
        return False
    host = _hostname(host_header)
    if not host:
        return False
    for pattern in allowed:
        p = pattern.strip().lower()
        if p.startswith("*.") and host.endswith(p[1:]):
            return True
        if _hostname(p) == host:
            return True
    return False


def _origin_host(origin: str) -> str:
    return origin.split("://", 1)[-1].rstrip("/").lower()


class RequestGuardMiddleware:
    """Host allow-list (400), Origin check (403), bearer token (401), content type (415), body cap (413).

    All of it before any body byte is parsed. The request id (Serve's ``x-request-id``) is put in
    ``scope["state"]["request_id"]`` for the routes and error handlers.

    Args:
        app: the wrapped ASGI app.
        settings: returns the current :class:`GuardSettings` (looked up per request); None disables all.
        open_paths: paths (relative to the app's root path) that need no token, e.g. ``/healthz``.
        multipart_prefixes: path prefixes whose POSTs must be ``multipart/form-data`` (415 otherwise, before
            any parser guesses at the body).
    """

    def __init__(
        self,
        app: ASGIApp,
        settings: Callable[[], GuardSettings | None],
        open_paths: Collection[str] = (),
        multipart_prefixes: Collection[str] = (),
    ):
        self.app = app
        self.settings = settings
        self.open_paths = frozenset(open_paths)
        self.multipart_prefixes = tuple(multipart_prefixes)
        self.limited = BodySizeLimitMiddleware(app, limit_bytes=self._limit)

    def _limit(self) -> int | None:
        current = self.settings()
        return current.max_body_bytes if current else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from_headers(scope.get("headers", []))
        state = scope.setdefault("state", {})
        if isinstance(state, dict):
            state["request_id"] = request_id
        current = self.settings()
        if current is None:
            await self.limited(scope, receive, send)
            return
        host = _header(scope, b"host")
        if not host_allowed(host.decode("latin-1") if host else None, current.allowed_hosts):
            await send_error(
                send, 400, f"this server does not answer for that Host; it accepts {', '.join(current.allowed_hosts)} "
                "(allowed_hosts)", request_id,
            )
            return
        origin_raw = _header(scope, b"origin")
        origin = origin_raw.decode("latin-1") if origin_raw else None
        cors: list[tuple[bytes, bytes]] = []
        if origin is not None:
            same = host is not None and _origin_host(origin) == host.decode("latin-1").lower()
            cross_ok = "*" in current.allowed_origins or origin in current.allowed_origins
            if not same and not cross_ok:
                await send_error(
                    send, 403, "cross-origin requests are not allowed from this origin (allowed_origins)", request_id
                )
                return
            if not same:
                cors = [
                    (b"access-control-allow-origin", origin.encode("latin-1")),
                    (b"vary", b"Origin"),
                    (b"access-control-expose-headers", _EXPOSED.encode()),
                ]
                if scope.get("method") == "OPTIONS" and _header(scope, b"access-control-request-method"):
                    await _preflight(send, cors)
                    return
        if current.auth_on and relative_path(scope) not in self.open_paths:
            authorization = _header(scope, b"authorization")
            header_text = authorization.decode("latin-1") if authorization else None
            if not bearer_token_ok(header_text, current.token, current.token_sha256):
                await send_error(
                    send, 401, "missing or invalid bearer token (Authorization: Bearer <token>)", request_id,
                    headers=[(b"www-authenticate", b"Bearer"), *cors],
                )
                return
        if scope.get("method") == "POST" and relative_path(scope).startswith(self.multipart_prefixes):
            content_type = (_header(scope, b"content-type") or b"").split(b";")[0].strip().lower()
            if content_type != b"multipart/form-data":
                await send_error(
                    send, 415, "send multipart/form-data with a `file` part (the NIfTI) and optional fields",
                    request_id, headers=cors,
                )
                return
        await self.limited(scope, receive, _with_headers(send, cors) if cors else send)


async def _preflight(send: Send, cors: list[tuple[bytes, bytes]]) -> None:
    """Answer a CORS preflight from an allowed origin."""
    await send(
        {
            "type": "http.response.start",
            "status": 204,
            "headers": [
                *cors,
                (b"access-control-allow-methods", b"GET, POST"),
                (b"access-control-allow-headers", b"authorization, content-type"),
                (b"access-control-max-age", b"600"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b""})


def _with_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return wrapped


def relative_path(scope: Scope) -> str:
    """The request path below the app's mount point (Serve sets ``root_path`` to the route prefix)."""
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return "/" + path.lstrip("/")


# ------------------------------------------------------------------------------------------- proxy
_PROXY_MESSAGES = {
    404: "no such route",
    408: "the request did not finish within the server's request timeout (request_timeout_s)",
    500: "internal server error",
    502: "the replica serving this request failed",
    503: "the server is busy (max_queued_requests reached) or has no healthy replica; retry later",
    504: "the request did not finish in time",
}


def _is_json(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    for key, value in headers:
        if key.lower() == b"content-type":
            return value.split(b";")[0].strip().lower() == b"application/json"
    return False


@dataclass(frozen=True)
class UploadPolicy:
    """How long Serve's proxy waits for an upload, and how many upload bytes it holds at once.

    An upload may take ``timeout_s`` plus one second per ``min_rate_bytes_s`` bytes received (Apache's
    ``mod_reqtimeout`` rule): a client that sends at least that rate always finishes, one that trickles
    is cut off with 408 after ``timeout_s`` and a little more. ``buffer_bytes`` caps the bytes of all
    bodies held by one proxy process together (503 above); None: no cap.
    """

    timeout_s: float = float(_SERVE_DEFAULTS["upload_timeout_s"])
    min_rate_bytes_s: float = float(_SERVE_DEFAULTS["upload_min_rate_kib"]) * 1024
    buffer_bytes: int | None = int(_SERVE_DEFAULTS["proxy_buffer_mb"] * 2**20)

    def allowance_s(self, received: int) -> float:
        extra = received / self.min_rate_bytes_s if self.min_rate_bytes_s > 0 else 0.0
        return self.timeout_s + extra


class _BufferPool:
    """Body bytes held by one proxy process. Serve's proxy runs one event loop: no lock is needed."""

    def __init__(self, capacity: int | None):
        self.capacity = capacity
        self.used = 0

    def take(self, n: int) -> bool:
        if self.capacity is not None and self.used + n > self.capacity:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


class _Refused(Exception):
    def __init__(self, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or []


class ProxyGuardMiddleware:
    """The guard in front of Ray Serve's proxy (see the module docstring).

    Every request's body is read completely here before the proxy sees the request, so the proxy only
    hands complete uploads to a replica: a client that uploads slowly holds a little of the proxy's
    memory, never one of a replica's ``max_ongoing_requests`` / ``max_queued_requests`` slots.

    Args:
        app: the proxy's ASGI app (Serve wraps it with its request-id middleware first).
        max_body_bytes: body cap in bytes (None: no cap).
        upload: the upload time rule and the proxy's buffer cap (:class:`UploadPolicy`).
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int | None = None, upload: UploadPolicy | None = None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.upload = upload or UploadPolicy()
        self.pool = _BufferPool(self.upload.buffer_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope.get("headers", []) if not k.lower().startswith(_CONTROL_PREFIX)]
        scope = {**scope, "headers": headers}
        if scope["type"] != "http" or str(scope.get("path", "")).startswith("/-/"):
            await self.app(scope, receive, send)  # Serve's own /-/healthz and /-/routes: left as they are
            return
        limit = self.max_body_bytes
        declared = _content_length(scope)
        if limit is not None and declared is not None and declared > limit:
            await send_error(send, 413, _too_large_detail(limit), new_request_id(), id_header=True)
            return
        chunks: deque[bytes] = deque()
        try:
            try:
                complete = await self._read_body(receive, chunks)
            except _Refused as refused:
                request_id = new_request_id()
                logger.info("%s %s %s: %d %s", request_id, scope.get("method"), scope.get("path"),
                            refused.status, refused.detail)
                await send_error(send, refused.status, refused.detail, request_id, headers=refused.headers,
                                 id_header=True)
                return
            if complete:
                await _ProxyExchange(self.app, scope, self._replay(chunks, receive), send).run()
        finally:
            self.pool.give(sum(len(c) for c in chunks))
            chunks.clear()

    def _replay(self, chunks: deque[bytes], receive: Receive) -> Receive:
        """A ``receive`` that hands the buffered body to the proxy in its original pieces (each leaves the
        buffer's count as it goes), then the client's own messages (its disconnect, when it comes)."""
        first = True

        async def replayed() -> Message:
            nonlocal first
            if chunks or first:
                first = False
                body = chunks.popleft() if chunks else b""
                self.pool.give(len(body))
                return {"type": "http.request", "body": body, "more_body": bool(chunks)}
            return await receive()

        return replayed

    async def _read_body(self, receive: Receive, chunks: deque[bytes]) -> bool:
        """Read the whole body into ``chunks`` (False: the client left). Raises _Refused (408/413/503)."""
        loop = asyncio.get_running_loop()
        start, received, limit = loop.time(), 0, self.max_body_bytes
        while True:
            remaining = start + self.upload.allowance_s(received) - loop.time()
            try:
                if remaining <= 0:
                    raise TimeoutError
                message = await asyncio.wait_for(receive(), remaining)
            except TimeoutError:
                raise _Refused(408, _slow_upload_detail(self.upload, received)) from None
            if message["type"] == "http.disconnect":
                return False
            chunk = message.get("body", b"")
            if chunk:
                if limit is not None and received + len(chunk) > limit:
                    raise _Refused(413, _too_large_detail(limit))
                if not self.pool.take(len(chunk)):
                    logger.warning("proxy upload buffer full (%d of %s bytes held)", self.pool.used,
                                   self.pool.capacity)
                    raise _Refused(503, "the server is receiving more uploads than it can hold at once "
                                   "(proxy_buffer_mb); retry later", [(b"retry-after", b"5")])
                chunks.append(chunk)
                received += len(chunk)
            if not message.get("more_body", False):
                return True


def _slow_upload_detail(policy: UploadPolicy, received: int) -> str:
    rate = f" plus 1 s per {policy.min_rate_bytes_s / 1024:g} KiB received" if policy.min_rate_bytes_s > 0 else ""
    return (f"the upload did not arrive in time ({received} bytes in {policy.allowance_s(received):.3g} s; "
            f"an upload gets {policy.timeout_s:g} s{rate}: upload_timeout_s, upload_min_rate_kib)")


class _ProxyExchange:
    """One request through the proxy: rewrites the proxy's plain-text errors into the JSON shape."""

    def __init__(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send):
        self.app, self.scope, self.receive, self.send = app, scope, receive, send
        self.rewriting = False

    async def run(self) -> None:
        await self.app(self.scope, self.receive, self._send)

    async def _send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            status = int(message.get("status", 200))
            headers = list(message.get("headers", []))
            if status >= 400 and not _is_json(headers):
                self.rewriting = True
                request_id = request_id_from_headers(headers)
                detail = _PROXY_MESSAGES.get(status, "request failed")
                extra = [(k, v) for k, v in headers if k.lower() in (b"retry-after", b"www-authenticate")]
                await send_error(self.send, status, detail, request_id, headers=extra, id_header=True)
                return
        elif kind == "http.response.body" and self.rewriting:
            return  # the proxy's plain-text body: already replaced
        await self.send(message)


def _env_number(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    try:
        value = float(text) if text else default
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        logger.warning("%s=%r is not a number >= 0; using %g", name, text, default)
        return default
    return value


def proxy_middlewares() -> list[Any]:
    """Serve's proxy callback: ``[ProxyGuardMiddleware]`` set from the environment.

    ``HYPERSORT_PROXY_MAX_BODY_MB`` (the body cap, 0: none), ``HYPERSORT_PROXY_UPLOAD_TIMEOUT_S`` and
    ``HYPERSORT_PROXY_UPLOAD_MIN_RATE_KIB`` (:class:`UploadPolicy`), ``HYPERSORT_PROXY_BUFFER_MB`` (0: no
    cap). Set ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` to :data:`PROXY_CALLBACK` in the environment of
    the processes that start Serve's proxies (``hypersort serve`` does it for the Ray it starts; on a
    cluster, the nodes' environment).
    """
    from starlette.middleware import Middleware

    mb = _env_number(PROXY_MAX_BODY_ENV, DEFAULT_PROXY_MAX_BODY_MB)
    default = UploadPolicy()
    timeout = _env_number(PROXY_UPLOAD_TIMEOUT_ENV, default.timeout_s) or default.timeout_s
    rate_kib = _env_number(PROXY_UPLOAD_MIN_RATE_ENV, default.min_rate_bytes_s / 1024)
    buffer_mb = _env_number(PROXY_BUFFER_ENV, (default.buffer_bytes or 0) / 2**20)
    upload = UploadPolicy(timeout_s=timeout, min_rate_bytes_s=rate_kib * 1024,
                          buffer_bytes=int(buffer_mb * 2**20) if buffer_mb > 0 else None)
    limit = int(mb * 2**20) if mb > 0 else None
    return [Middleware(ProxyGuardMiddleware, max_body_bytes=limit, upload=upload)]
