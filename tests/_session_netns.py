"""Run the whole test session in a private network namespace (when root).

Many tests count or expect TIME_WAIT entries. The kernel keeps them per network namespace,
bounded by ``net.ipv4.tcp_max_tw_buckets``; once a busy host's table is full, new TIME_WAIT
entries are silently skipped and every such count is wrong. So the test process, before it
opens any socket or starts any thread, moves into a network namespace of its own with only
a loopback interface: its own TIME_WAIT table, its own ephemeral ports, nothing from the host.
Every thread and subprocess started later (curl, ``ss``, servers) inherits it.

``unshare(CLONE_NEWNET)`` moves only the calling thread, which is why this must run first,
while the interpreter has one thread. Without root (or with ``TCPCLOSE_TEST_HOST_NETNS=1``)
the session stays in the host's namespace and :func:`time_wait_room` lets the tests that
count TIME_WAIT skip, with the reason, when the host's table is nearly full.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import sys
import threading

_CLONE_NEWNET = 0x40000000  # os.CLONE_NEWNET from Python 3.12 on
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: ifr_name, then ifr_flags in the union

OPT_OUT_ENV = "TCPCLOSE_TEST_HOST_NETNS"

#: Why the session is where it is; printed in pytest's header.
status = "not set up"
private = False


def _unshare_net() -> None:
    if sys.version_info >= (3, 12):
        os.unshare(os.CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(ctypes.c_int(_CLONE_NEWNET)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = _IFREQ.pack(b"lo", 0)
        _, flags = _IFREQ.unpack(fcntl.ioctl(s, _SIOCGIFFLAGS, request))
        fcntl.ioctl(s, _SIOCSIFFLAGS, _IFREQ.pack(b"lo", flags | _IFF_UP))


def enter_private_namespace() -> None:
    """Move this process into a new network namespace with loopback up, if we may."""
    global status, private
    if os.environ.get(OPT_OUT_ENV):
        status = f"host namespace ({OPT_OUT_ENV} is set)"
        return
    if not sys.platform.startswith("linux"):
        status = "host namespace (not Linux)"
        return
    if os.geteuid() != 0:
        status = "host namespace (not root: TIME_WAIT counts use the host's table)"
        return
    if threading.active_count() != 1:
        status = "host namespace (threads already running: unshare would move only one)"
        return
    try:
        _unshare_net()
        _loopback_up()
    except OSError as exc:
        status = f"host namespace (could not make a private one: {exc})"
        return
    private = True
    status = f"private network namespace {os.stat('/proc/self/ns/net').st_ino} (pid {os.getpid()})"


def time_wait_room() -> tuple[int, int] | None:
    """``(TIME_WAIT now, tcp_max_tw_buckets)`` of the current namespace, or None if unknown."""
    try:
        with open("/proc/net/sockstat", encoding="ascii") as f:
            text = f.read()
        with open("/proc/sys/net/ipv4/tcp_max_tw_buckets", encoding="ascii") as f:
            limit = int(f.read())
    except (OSError, ValueError):
        return None
    for line in text.splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            if "tw" in fields:
                return int(fields[fields.index("tw") + 1]), limit
    return None
