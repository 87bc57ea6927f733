#!/usr/bin/env python3
"""Resident memory of a running relay with N idle SMTP connections open.

    idle_connections.py --port PORT --pid PID [--connections 1000]

Opens the connections from 127.0.0.1..127.0.0.4, reads each greeting, sends EHLO on each (so every
session has been through the parser), waits a moment, then prints one key=value line:
the relay's VmRSS and VmHWM before and with the connections open. Closes everything
before it exits. Raises the soft open-file limit for itself if it needs to.
"""
import argparse
import resource
import socket
import time


def rss_kib(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--source-addresses", type=int, default=4, help="127.0.0.1 .. 127.0.0.N")
    args = parser.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = args.connections + 64
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))

    before = rss_kib(args.pid)
    sockets = []
    try:
        for index in range(args.connections):
            # Spread the clients over several loopback addresses, as many devices would
            # be, so the per-IP connection limit (default 500) does not refuse them.
            source = f"127.0.0.{1 + index % args.source_addresses}"
            connection = socket.create_connection(
                ("127.0.0.1", args.port), timeout=args.timeout, source_address=(source, 0)
            )
            sockets.append(connection)
        for connection in sockets:
            greeting = connection.recv(512)
            if not greeting.startswith(b"220"):
                raise RuntimeError(f"unexpected greeting {greeting!r}")
            connection.sendall(b"EHLO idle.test\r\n")
        for connection in sockets:
            reply = b""
            while not reply.endswith(b"\r\n") or b"250 " not in reply:
                chunk = connection.recv(4096)
                if not chunk:
                    raise RuntimeError("connection closed during EHLO")
                reply += chunk
        time.sleep(1.0)
        during = rss_kib(args.pid)
        peak = rss_kib(args.pid, "VmHWM")
    finally:
        for connection in sockets:
            connection.close()
    print(
        f"connections={len(sockets)} rss_before_kib={before} rss_with_connections_kib={during} "
        f"rss_peak_kib={peak} per_connection_bytes={(during - before) * 1024 // max(1, len(sockets))}"
    )


if __name__ == "__main__":
    main()
