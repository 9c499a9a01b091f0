"""A cheap bulk-TCP source and sink, so that a TCP proxy, not the load generator, is the limit.

    python bench/bulk.py serve --port P            # the far end; serves any number of tests
    python bench/bulk.py run --port P --seconds 10 --direction up|down   # prints one JSON line

Why not iperf3 only: on loopback the receiving side does most of the work (its copy to user
space). With the proxy on one core and iperf3's client and server sharing the other, the
load core saturates around 2 GB/s and HAProxy idles at ~65 % CPU, so the comparison measures
the load generator. Here the receiving side ``splice``\\ s the socket into a pipe and the pipe
into /dev/null (pages move, no copy), and the sender writes one 1 MiB buffer over and over;
on the same core that moves ~3.5 GB/s, leaving headroom for the proxy to be the bottleneck.

Protocol of one test (all through the proxy, one connection):

    client -> server: MAGIC (8 bytes), direction (1 byte: U or D), 3 bytes of padding,
                      duration in milliseconds (uint32, big-endian)
    up:   client sends data for the duration, then shuts down its write side; the server
          counts until EOF and answers the count (uint64); the client's clock stops when
          the count arrives, so bytes still in the proxy's buffers are counted and timed.
    down: the server sends data for the duration, then shuts down its write side; the
          client counts until EOF.

Connections that close before sending a whole header (port probes, TCP health checks) are
dropped quietly. Standard library only; Linux for splice (falls back to recv_into).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import socket
import struct
import sys
import threading
import time

MAGIC = b"PMBULK1\n"
HEADER = struct.Struct("!8sc3xI")
COUNT = struct.Struct("!Q")
CHUNK = 1 << 20
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """Exactly n bytes (never more, so nothing after them is consumed), or None at EOF."""
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            return None
        buf += part
    return bytes(buf)


def drain(sock: socket.socket) -> int:
    """Read until EOF, throwing the bytes away as cheaply as the kernel allows; return the count."""
    total = 0
    if hasattr(os, "splice"):
        r, w = os.pipe()
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            with contextlib.suppress(OSError):
                fcntl.fcntl(w, F_SETPIPE_SZ, CHUNK)
            fd = sock.fileno()
            while True:
                n = os.splice(fd, w, CHUNK)
                if n == 0:
                    return total
                total += n
                while n:
                    n -= os.splice(r, null, n)
        finally:
            os.close(r)
            os.close(w)
            os.close(null)
    buf = bytearray(CHUNK)
    while True:
        n = sock.recv_into(buf)
        if n == 0:
            return total
        total += n


def pour(sock: socket.socket, seconds: float) -> int:
    """Send one buffer over and over for ``seconds``; return the count sent."""
    data = memoryview(b"\x5a" * CHUNK)
    total = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.sendall(data)
        total += CHUNK
    return total


def serve_one(conn: socket.socket) -> None:
    with conn:
        try:
            header = recv_exact(conn, HEADER.size)
            if header is None:
                return
            magic, direction, millis = HEADER.unpack(header)
            if magic != MAGIC:
                return
            if direction == b"U":
                conn.sendall(COUNT.pack(drain(conn)))
            elif direction == b"D":
                pour(conn, millis / 1000)
                conn.shutdown(socket.SHUT_WR)
                drain(conn)  # until the client closes
        except OSError:
            return


def serve(host: str, port: int) -> None:
    with socket.create_server((host, port), backlog=128) as server:
        print(f"bulk: serving on {host}:{port}", flush=True)
        while True:
            conn, _ = server.accept()
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()


def run(host: str, port: int, seconds: float, direction: str) -> dict[str, object]:
    with socket.create_connection((host, port), timeout=5) as sock:
        # Bounded: a stalled proxy ends the test with an error instead of hanging it. The
        # socket stays in blocking mode (splice needs that) with kernel-level timeouts.
        sock.settimeout(None)
        limit = struct.pack("ll", int(seconds + 15), 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(HEADER.pack(MAGIC, b"U" if direction == "up" else b"D", round(seconds * 1000)))
        start = time.monotonic()
        if direction == "up":
            sent = pour(sock, seconds)
            sock.shutdown(socket.SHUT_WR)
            reply = recv_exact(sock, COUNT.size)
            elapsed = time.monotonic() - start
            if reply is None:
                raise ConnectionError(f"the connection closed before the server's count ({sent} bytes sent)")
            (received,) = COUNT.unpack(reply)
            if received != sent:
                raise ConnectionError(f"sent {sent} bytes but the server received {received}")
        else:
            received = drain(sock)
            elapsed = time.monotonic() - start
    return {
        "tool": "bulk",
        "direction": direction,
        "bytes": received,
        "seconds": round(elapsed, 4),
        "bytes_per_second": received / elapsed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve")
    p_serve.add_argument("--host", default="127.0.0.1")
    p_serve.add_argument("--port", type=int, required=True)
    p_run = sub.add_parser("run")
    p_run.add_argument("--host", default="127.0.0.1")
    p_run.add_argument("--port", type=int, required=True)
    p_run.add_argument("--seconds", type=float, default=10.0)
    p_run.add_argument("--direction", choices=["up", "down"], default="up")
    args = parser.parse_args()
    if args.command == "serve":
        try:
            serve(args.host, args.port)
        except KeyboardInterrupt:
            pass
        return 0
    try:
        result = run(args.host, args.port, args.seconds, args.direction)
    except OSError as exc:
        print(json.dumps({"tool": "bulk", "error": f"{type(exc).__name__}: {exc}"}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
