"""HTTP/1.x for the health endpoint, sans I/O: request heads in, responses out.

Only what a probe or a scraper needs: the request line of one head (no
headers are looked at, no body is read) and complete ``Connection: close``
responses. The sockets live in :mod:`dispatch.health.server`.
"""

from __future__ import annotations

import http
import re

#: The one content type of every plain-text answer.
TEXT = "text/plain; charset=utf-8"

_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"(?:https?://[^/\s]*)?(/[\x21-\x7e]*)")
_VERSION = re.compile(rb"HTTP/(\d)\.(\d)")

Headers = tuple[tuple[str, str], ...]


class HTTPError(Exception):
    """A request that gets an error answer: ``status`` and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def head_end(data: bytes | bytearray) -> int:
    """Length of the request head (through the blank line) in ``data``, or -1."""
    crlf = data.find(b"\r\n\r\n")
    lf = data.find(b"\n\n")
    ends = [i + 4 for i in (crlf,) if i >= 0] + [i + 2 for i in (lf,) if i >= 0]
    return min(ends) if ends else -1


def parse_request_line(head: bytes) -> tuple[str, str]:
    """``(method, path)`` from a request head; raises ``HTTPError`` (400/505).

    The query string is dropped; an absolute-form target keeps only its path.
    """
    line = head.lstrip(b"\r\n").split(b"\n", 1)[0].rstrip(b"\r")
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HTTPError(400, "malformed request line")
    method, target, version = parts
    match = _TARGET.fullmatch(target)
    if not _METHOD.fullmatch(method) or match is None:
        raise HTTPError(400, "malformed request line")
    major = _VERSION.fullmatch(version)
    if major is None:
        raise HTTPError(400, "malformed request line")
    if major.group(1) != b"1":
        raise HTTPError(505, "only HTTP/1.x is served here")
    path = match.group(1).split(b"?", 1)[0].split(b"#", 1)[0]
    return method.decode("ascii"), path.decode("ascii")


def render(status: int, body: bytes, content_type: str = TEXT, headers: Headers = (),
           head_only: bool = False) -> bytes:
    """A complete ``Connection: close`` response."""
    lines = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers),
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


def text(status: int, message: str, headers: Headers = ()) -> bytes:
    """A plain-text response of one line."""
    return render(status, (message + "\n").encode(), headers=headers)


def strip_body(response: bytes) -> bytes:
    """The head of ``response``: what ``HEAD`` gets, ``Content-Length`` included."""
    return response[: response.index(b"\r\n\r\n") + 4]
