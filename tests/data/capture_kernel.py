"""Capture kernel answers once, for the decoder tests (run by hand, not by pytest).

    PYTHONPATH=. python tests/data/capture_kernel.py

Drives real loopback connections into known states and stores, under ``tests/data``:

* ``sock_diag/<case>.hex``: the raw reply of an exact sock_diag lookup per case, and
  ``sock_diag/dump_port.hex`` (one datagram per line) for a port-filtered dump;
* ``tcp_info/<case>.hex``: ``getsockopt(TCP_INFO)`` bytes, with ``ss -tnie`` output
  taken at the same moment as the independent decoding;
* ``proc/net/tcp`` and ``proc/net/tcp6``: the procfs tables while those sockets live
  (our lines and up to 20 others; the slot numbers keep their original values);
* ``kernel_manifest.json``: what each capture must decode to, recorded from sources
  other than our decoders (``getsockname``, ``fstat``, ``SO_COOKIE``, the state the
  script drove the socket into, ``ss``).

Requests are packed with ``tcpclose._kernel._diag`` (the encoder is checked by
its own worked examples); replies are stored untouched.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tcpclose._kernel._address import parse_four_tuple
from tcpclose._kernel._diag import (
    NETLINK_SOCK_DIAG,
    encode_dump_request,
    encode_lookup_request,
    scan_dump_chunk,
)
from tcpclose._kernel._diag import port_filter_bytecode as port_bytecode

HERE = Path(__file__).resolve().parent
SO_COOKIE = 57


def _wait(predicate: Any, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.005)


def _ss_state(local: tuple[str, int], peer: tuple[str, int]) -> str | None:
    out = subprocess.run(
        ["ss", "-tanH", "sport", "=", f":{local[1]}", "and", "dport", "=", f":{peer[1]}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout.split()
    return out[0] if out else None


class Capturer:
    def __init__(self) -> None:
        self.nl = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
        self.nl.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 2, 0))
        self.seq = 100
        self.manifest: dict[str, Any] = {
            "kernel": platform.release(),
            "byteorder": sys.byteorder,
            "sock_diag": {},
            "tcp_info": {},
            "procfs": [],
        }
        self.keep: list[socket.socket] = []

    def lookup_raw(
        self, local: tuple[Any, ...], peer: tuple[Any, ...], cookie: int | None = None
    ) -> bytes:
        self.seq += 1
        four = parse_four_tuple(local, peer)
        self.nl.send(encode_lookup_request(four, cookie=cookie, seq=self.seq))
        return self.nl.recv(8192)

    def record(
        self,
        name: str,
        local: tuple[Any, ...],
        peer: tuple[Any, ...],
        expect: dict[str, Any],
        cookie: int | None = None,
    ) -> None:
        raw = self.lookup_raw(local, peer, cookie)
        (HERE / "sock_diag").mkdir(exist_ok=True)
        (HERE / "sock_diag" / f"{name}.hex").write_text(raw.hex() + "\n")
        self.manifest["sock_diag"][name] = {
            "request_local": list(local[:2]),
            "request_peer": list(peer[:2]),
            "cookie": cookie,
            "expect": expect,
        }

    def proc_expect(self, local: tuple[Any, ...], peer: tuple[Any, ...], **expect: Any) -> None:
        self.manifest["procfs"].append(
            {"local": list(local[:2]), "peer": list(peer[:2]), "expect": expect}
        )


def cookie_of(sock: socket.socket) -> int:
    value: int = struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]
    return value


def inode_of(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def pair(
    family: int, lst: socket.socket, rcvbuf: int | None = None
) -> tuple[socket.socket, socket.socket]:
    client = socket.socket(family, socket.SOCK_STREAM)
    if rcvbuf is not None:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    client.connect(lst.getsockname()[:2])
    server, _ = lst.accept()
    return client, server


def listen(family: int, host: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6 and host == "::":
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((host, 0))
    sock.listen(16)
    return sock


def main() -> None:
    cap = Capturer()
    uid = os.getuid()
    loop4, loop6 = "127.0.0.1", "::1"
    lst4 = listen(socket.AF_INET, loop4)
    lst6 = listen(socket.AF_INET6, loop6)
    dual = listen(socket.AF_INET6, "::")
    cap.keep += [lst4, lst6, dual]

    # ESTABLISHED, IPv4 and IPv6 (server side), kept open for procfs.
    for name, fam, lst in (("estab_v4", socket.AF_INET, lst4), ("estab_v6", socket.AF_INET6, lst6)):
        c, s = pair(fam, lst)
        cap.keep += [c, s]
        cap.record(
            name,
            s.getsockname(),
            s.getpeername(),
            {
                "state": "ESTABLISHED",
                "family": int(fam),
                "local": list(s.getsockname()[:2]),
                "peer": list(s.getpeername()[:2]),
                "inode": inode_of(s),
                "uid": uid,
                "cookie": cookie_of(s),
                "timer": "OFF",
            },
        )
        cap.proc_expect(s.getsockname(), s.getpeername(), state="ESTABLISHED", inode=inode_of(s))

    # FIN_WAIT2 (orphan, after close) on the client; CLOSE_WAIT on the server.
    c, s = pair(socket.AF_INET, lst4)
    c_local, c_peer, c_cookie = c.getsockname(), c.getpeername(), cookie_of(c)
    c.close()
    _wait(lambda: _ss_state(c_local, c_peer) == "FIN-WAIT-2", "FIN-WAIT-2")
    cap.keep.append(s)
    cap.record(
        "fin_wait2_orphan_v4",
        c_local,
        c_peer,
        {
            "state": "FIN_WAIT2",
            "family": 2,
            "inode": 0,
            "uid": 0,
            "cookie": c_cookie,
            "timer": "TIMEWAIT",
        },
    )
    cap.record(
        "close_wait_v4",
        s.getsockname(),
        s.getpeername(),
        {
            "state": "CLOSE_WAIT",
            "family": 2,
            "inode": inode_of(s),
            "uid": uid,
            "cookie": cookie_of(s),
            "rqueue": 1,
            "timer": "OFF",
        },
    )
    cap.proc_expect(c_local, c_peer, state="FIN_WAIT2", inode=0, timer="TIMEWAIT")
    cap.proc_expect(s.getsockname(), s.getpeername(), state="CLOSE_WAIT", inode=inode_of(s))

    # FIN_WAIT2 after shutdown(SHUT_WR): a full socket, timer off, real inode.
    c, s = pair(socket.AF_INET6, lst6)
    c.shutdown(socket.SHUT_WR)
    _wait(lambda: _ss_state(c.getsockname(), c.getpeername()) == "FIN-WAIT-2", "FIN-WAIT-2")
    cap.keep += [c, s]
    cap.record(
        "fin_wait2_shutdown_v6",
        c.getsockname(),
        c.getpeername(),
        {
            "state": "FIN_WAIT2",
            "family": 10,
            "inode": inode_of(c),
            "uid": uid,
            "cookie": cookie_of(c),
            "timer": "OFF",
        },
    )
    cap.proc_expect(c.getsockname(), c.getpeername(), state="FIN_WAIT2", inode=inode_of(c))

    # TIME_WAIT on the client (it closed first), and the listener trap on the server
    # side, whose socket is gone while its listener lives.
    c, s = pair(socket.AF_INET, lst4)
    c_local, c_peer, c_cookie = c.getsockname(), c.getpeername(), cookie_of(c)
    s_local, s_peer, s_cookie = s.getsockname(), s.getpeername(), cookie_of(s)
    c.close()
    _wait(lambda: _ss_state(c_local, c_peer) == "FIN-WAIT-2", "FIN-WAIT-2")
    s.close()
    _wait(lambda: _ss_state(c_local, c_peer) == "TIME-WAIT", "TIME-WAIT")
    _wait(lambda: _ss_state(s_local, s_peer) is None, "server side gone")
    cap.record(
        "time_wait_v4",
        c_local,
        c_peer,
        {"state": "TIME_WAIT", "family": 2, "inode": 0, "uid": 0, "cookie": c_cookie},
    )
    cap.record(
        "listener_trap_v4",
        s_local,
        s_peer,
        {
            "state": "LISTEN",
            "family": 2,
            "local": list(lst4.getsockname()[:2]),
            "peer": ["0.0.0.0", 0],
            "inode": inode_of(lst4),
            "cookie": cookie_of(lst4),
        },
    )
    cap.record("listener_trap_cookie_v4", s_local, s_peer, {"state": "ENOENT"}, cookie=s_cookie)
    cap.proc_expect(c_local, c_peer, state="TIME_WAIT", inode=0, timer="TIMEWAIT")
    cap.proc_expect(s_local, s_peer, state="CLOSED")

    # A dual-stack listener's IPv4 connection: asked as IPv4, answered as AF_INET6
    # with mapped addresses.
    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    c.connect((loop4, dual.getsockname()[1]))
    s, _ = dual.accept()
    cap.keep += [c, s]
    plain_local = (loop4, s.getsockname()[1])
    plain_peer = (loop4, s.getpeername()[1])
    cap.record(
        "mapped_v6",
        plain_local,
        plain_peer,
        {
            "state": "ESTABLISHED",
            "family": 10,
            "local": list(s.getsockname()[:2]),
            "peer": list(s.getpeername()[:2]),
            "inode": inode_of(s),
            "cookie": cookie_of(s),
        },
    )
    cap.proc_expect(s.getsockname(), s.getpeername(), state="ESTABLISHED", inode=inode_of(s))

    # A miss.
    cap.record("enoent", (loop4, 1), (loop4, 2), {"state": "ENOENT"})

    # A dump filtered in the kernel by the IPv4 listener's port.
    port = lst4.getsockname()[1]
    dump_nl = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
    dump_nl.send(
        encode_dump_request(socket.AF_INET, 0xFFF << 1, bytecode=port_bytecode(port), seq=9)
    )
    chunks = []
    while True:
        data = dump_nl.recv(65536)
        chunks.append(data.hex())
        if scan_dump_chunk(data, 9) or len(chunks) > 50:
            break
    dump_nl.close()
    (HERE / "sock_diag" / "dump_port.hex").write_text("\n".join(chunks) + "\n")
    ss_lines = subprocess.run(
        [
            "ss",
            "-tanH",
            "state",
            "all",
            "(",
            "sport",
            "=",
            f":{port}",
            "or",
            "dport",
            "=",
            f":{port}",
            ")",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout.splitlines()
    cap.manifest["dump_port"] = {
        "port": port,
        "ss_states": sorted(line.split()[0] for line in ss_lines if line.strip()),
    }

    # tcp_info: a client with a small receive buffer (so its window scales differ),
    # after 1000 bytes sent and acknowledged.
    c, s = pair(socket.AF_INET, lst4, rcvbuf=4096)
    cap.keep += [c, s]
    c.sendall(b"x" * 1000)
    got = b""
    while len(got) < 1000:
        got += s.recv(1000 - len(got))
    _wait(
        lambda: (
            struct.unpack_from("=I", c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104), 24)[0]
            == 0
        ),
        "data acknowledged",
    )
    time.sleep(0.05)  # let the delayed ACK of the server settle before sampling
    info = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 512)
    ss_text = subprocess.run(
        ["ss", "-tniH", "sport", "=", f":{c.getsockname()[1]}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    (HERE / "tcp_info").mkdir(exist_ok=True)
    (HERE / "tcp_info" / "established_v4.hex").write_text(info.hex() + "\n")
    cap.manifest["tcp_info"]["established_v4"] = {
        "state": "ESTABLISHED",
        "bytes_sent": 1000,
        "ss": " ".join(ss_text.split()),
    }

    # The procfs tables, while every socket above is still in its state.
    proc = HERE / "proc" / "net"
    proc.mkdir(parents=True, exist_ok=True)
    ports = {f":{sock.getsockname()[1]:04X} " for sock in (lst4, lst6, dual)}
    for name in ("tcp", "tcp6"):
        lines = Path(f"/proc/net/{name}").read_text().splitlines(keepends=True)
        # Keep the header, every line of our sockets, and a few others for variety
        # (other processes' sockets are not part of the expectations).
        ours = [line for line in lines[1:] if any(p in line for p in ports)]
        others = [line for line in lines[1:] if line not in ours][:20]
        (proc / name).write_text("".join([lines[0], *ours, *others]))

    (HERE / "kernel_manifest.json").write_text(json.dumps(cap.manifest, indent=2) + "\n")
    for sock in cap.keep:
        sock.close()
    print(f"captured on Linux {cap.manifest['kernel']} into {HERE}")


if __name__ == "__main__":
    main()
