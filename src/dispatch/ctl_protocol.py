"""The control socket's protocol: one JSON object per line, one request, one reply. Pure.

A request is ``{"v": 1, "cmd": "status"}`` plus the command's arguments; a reply is
``{"v": 1, "ok": true, ...}`` or ``{"v": 1, "ok": false, "error": "why"}``. ``v`` is
the protocol version: a primary refuses a version it does not speak, so an old
``dispatch ctl`` and a new primary (or the reverse, mid-upgrade) fail with a
message instead of misreading each other.
"""

from __future__ import annotations

import json
import os
from typing import Any

VERSION = 1
#: The longest request line a primary reads; a longer one is an error reply.
MAX_REQUEST = 64 * 1024
#: The longest reply a client reads (a status of many workers fits many times over).
MAX_REPLY = 16 * 1024 * 1024

COMMANDS = ("status", "reload", "scale", "stop", "upgrade", "drain", "undrain")


class ProtocolError(ValueError):
    """A request or reply that is not what this version speaks; the message says why."""


def default_path(pidfile: str) -> str:
    """The control socket beside a pidfile: ``/run/app.pid`` -> ``/run/app.ctl``."""
    root, ext = os.path.splitext(os.path.abspath(pidfile))
    return (root if ext == ".pid" else root + ext) + ".ctl"


def encode(message: dict[str, Any]) -> bytes:
    """One line of JSON, the version added."""
    return json.dumps({"v": VERSION, **message}, separators=(",", ":")).encode() + b"\n"


def request(cmd: str, **args: Any) -> bytes:
    return encode({"cmd": cmd, **args})


def error(message: str) -> bytes:
    return encode({"ok": False, "error": message})


def parse_request(line: bytes) -> dict[str, Any]:
    """The request in ``line`` (without its newline); ``ProtocolError`` says what is wrong."""
    message = _parse(line, "request")
    version = message.get("v")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version!r} is not supported; this primary speaks {VERSION}")
    cmd = message.get("cmd")
    if not isinstance(cmd, str):
        raise ProtocolError('a request needs "cmd", a string')
    return message


def parse_reply(line: bytes) -> dict[str, Any]:
    message = _parse(line, "reply")
    if message.get("v") != VERSION:
        raise ProtocolError(f"the primary speaks protocol version {message.get('v')!r}, this client {VERSION}")
    if not isinstance(message.get("ok"), bool):
        raise ProtocolError('a reply needs "ok", true or false')
    return message


def _parse(line: bytes, what: str) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(f"the {what} is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"the {what} must be a JSON object")
    return message


def parse_scale(value: object, current: int) -> int:
    """The worker count ``scale`` asks for: ``4`` (absolute), ``"+2"``, ``"-1"`` (relative)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ProtocolError('scale needs "n": a count N, "+N" or "-N"')
    text = str(value).strip()
    try:
        number = int(text)
    except ValueError:
        raise ProtocolError(f"scale: {text[:40]!r} is not N, +N or -N") from None
    target = current + number if text[:1] in "+-" else number
    if target < 1 or target > 4096:
        raise ProtocolError(f"scale: {target} workers is out of range (1 to 4096)")
    return target
