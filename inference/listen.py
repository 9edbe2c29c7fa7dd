"""Binding the server's TCP socket: one recipe for the server and for the doctor's port check,
so that the check finds the port free exactly when the server could take it."""

from __future__ import annotations

import socket


def bind_tcp(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port, not yet listening; OSError when it cannot be bound.

    SO_REUSEADDR, so that a port left in TIME_WAIT by a previous server counts as free.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it keep-alive responses wait ~40 ms on the client's delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock
