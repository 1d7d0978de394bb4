"""Clients that connect and then say (almost) nothing, for the proxy's connection timers.

Usage: silent_clients.py HOST PORT COUNT {silent|half-tls} DEADLINE_S

Opens COUNT TCP connections to HOST:PORT. `silent` sends nothing; `half-tls` sends the first
part of a TLS ClientHello (a record header announcing 512 bytes and 16 of them) and then
nothing. Prints `ready N` once N connections are open, then waits up to DEADLINE_S seconds for
the server to close them, and prints `closed N MAX_S`: how many the server closed and the latest
close, in seconds after `ready`. Runs in its own process so its sockets do not count against the
test process's file limit.
"""

import selectors
import socket
import sys
import time

HALF_CLIENT_HELLO = bytes([0x16, 0x03, 0x01, 0x02, 0x00]) + bytes(
    [0x01, 0x00, 0x01, 0xFC, 0x03, 0x03] + [0x42] * 10
)


def main() -> None:
    host, port, count, kind, deadline_s = (
        sys.argv[1],
        int(sys.argv[2]),
        int(sys.argv[3]),
        sys.argv[4],
        float(sys.argv[5]),
    )
    selector = selectors.DefaultSelector()
    sockets = []
    for _ in range(count):
        sock = socket.create_connection((host, port))
        if kind == "half-tls":
            sock.sendall(HALF_CLIENT_HELLO)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        sockets.append(sock)
    ready_at = time.monotonic()
    print(f"ready {len(sockets)}", flush=True)

    closed = 0
    latest = 0.0
    open_count = len(sockets)
    while open_count and time.monotonic() - ready_at < deadline_s:
        for key, _ in selector.select(timeout=0.2):
            sock = key.fileobj
            try:
                data = sock.recv(4096)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            if data:
                # An alert or an HTTP error is fine; what counts is the close that follows.
                continue
            selector.unregister(sock)
            sock.close()
            open_count -= 1
            closed += 1
            latest = time.monotonic() - ready_at
    print(f"closed {closed} {latest:.3f}", flush=True)


if __name__ == "__main__":
    main()
