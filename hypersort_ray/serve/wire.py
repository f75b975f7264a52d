"""What an error looks like on the wire: one JSON shape, a request id, nothing internal (no Ray, no torch).

Every 4xx/5xx the endpoint sends -- from a route, a middleware, or Ray's proxy (rewritten by
:class:`~hypersort_ray.serve.middleware.ProxyGuardMiddleware`) -- is::

    {"status": 413, "error": "payload_too_large", "detail": "<what was wrong and what is accepted>",
     "request_id": "<id>"}

``detail`` names the problem for the client; exception text, file paths and library versions never go
there (:func:`scrub` removes paths from any message as a last line of defence). The server log gets the
details under the same ``request_id``.

Example:
    >>> import json
    >>> json.loads(error_body(404, "unknown style '9'", "abc"))["error"]
    'not_found'
    >>> scrub("cannot read /srv/models/run-3/config.yaml")
    'cannot read <path>'
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable
from http import HTTPStatus

__all__ = ["REQUEST_ID_HEADER", "error_body", "error_code", "new_request_id", "request_id_from_headers", "scrub"]

REQUEST_ID_HEADER = b"x-request-id"
# Serve's own ids are UUIDs; anything else a client might smuggle in (log lines, markup) is replaced.
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Absolute POSIX paths with at least two components, Windows drive paths, file:// URIs.
_PATH = re.compile(r"(file://)?(?<![\w.])(/[\w.@+-]+){2,}/?|[A-Za-z]:\\[^\s'\"]+")
MAX_DETAIL_CHARS = 600


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_from_headers(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The request id Serve's proxy assigned (``x-request-id``), or a fresh one when absent or odd."""
    for key, value in headers:
        if key.lower() == REQUEST_ID_HEADER:
            text = value.decode("latin-1")
            if _SAFE_ID.match(text):
                return text
            break
    return new_request_id()


# RFC 9110 names where Python's HTTPStatus keeps older phrases.
_CODES = {413: "payload_too_large", 499: "client_closed_request"}


def error_code(status: int) -> str:
    """``payload_too_large`` for 413: HTTP's reason phrase in snake case."""
    if status in _CODES:
        return _CODES[status]
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


def scrub(text: str) -> str:
    """A client-safe message: paths replaced by ``<path>``, one line, bounded length."""
    text = _PATH.sub("<path>", str(text)).replace("\r", " ").replace("\n", " ")
    return text[:MAX_DETAIL_CHARS]


def error_body(status: int, detail: str, request_id: str) -> bytes:
    """The JSON bytes of the one error shape."""
    return json.dumps(
        {"status": int(status), "error": error_code(status), "detail": scrub(detail), "request_id": request_id}
    ).encode()
