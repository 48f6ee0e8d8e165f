"""A worker's switch from root to ``user``/``group``, for good, without outliving the primary.

The order is fixed: supplementary groups first, then the gid, then the uid
(after which nothing can be changed back). Each step is checked afterwards, so
a worker never serves with more than it was given. Any credential change
clears ``PR_SET_PDEATHSIG``: it is set again after the switch, and the
primary's pid compared with ``getppid()`` in case it died in between.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import struct

from dispatch import _fdpass

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class PrivilegeError(RuntimeError):
    """The worker could not become, or could not prove it became, the configured user/group."""


def primary_pid(channel: socket.socket) -> int:
    """The pid of the primary, which made ``channel``: right even if it died since the fork."""
    pid, _, _ = _UCRED.unpack(channel.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid or os.getppid()


def die_with_primary(primary: int) -> bool:
    """Have the kernel SIGKILL this process when its parent dies; False if ``primary`` is gone."""
    _fdpass.set_parent_death_signal(signal.SIGKILL)
    return os.getppid() == primary


def user_name(uid: int | None) -> str | None:
    """The login name of ``uid``; None when it has no passwd entry."""
    if uid is None:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def drop_privileges(uid: int | None, gid: int | None, username: str | None) -> None:
    """Become ``uid``/``gid`` with ``username``'s supplementary groups (none without a name)."""
    if uid is None and gid is None:
        return
    if gid is None:
        raise PrivilegeError(f"uid {uid} needs a gid: it would keep this process's gid")
    groups = _supplementary_groups(username, gid)
    try:
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        if uid is not None:
            os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise PrivilegeError(f"cannot switch to {_describe(uid, gid)}: {exc.strerror}") from None
    _verify(uid, gid, groups)


def _supplementary_groups(username: str | None, gid: int) -> list[int]:
    # What initgroups() would set: the user's groups from /etc/group (or NSS) and gid.
    if username is None:
        return []
    try:
        return sorted(set(os.getgrouplist(username, gid)))
    except OSError as exc:
        raise PrivilegeError(f"cannot list the groups of user {username!r}: {exc.strerror}") from None


def _verify(uid: int | None, gid: int, groups: list[int]) -> None:
    """Trust the kernel, not the calls: read every id back, and try to become root again."""
    if uid is not None and os.getresuid() != (uid, uid, uid):
        raise PrivilegeError(f"uid is {os.getresuid()} (real, effective, saved), not {uid}")
    if os.getresgid() != (gid, gid, gid):
        raise PrivilegeError(f"gid is {os.getresgid()} (real, effective, saved), not {gid}")
    if sorted(set(os.getgroups())) != groups:
        raise PrivilegeError(f"supplementary groups are {sorted(os.getgroups())}, not {groups}")
    if uid not in (None, 0) and _can_regain_root():
        raise PrivilegeError(f"uid {uid} can become root again (capabilities kept?)")


def _can_regain_root() -> bool:
    try:
        os.setresuid(0, 0, 0)
    except PermissionError:
        return False
    return True


def _describe(uid: int | None, gid: int) -> str:
    return f"gid {gid}" if uid is None else f"uid {uid}, gid {gid}"
