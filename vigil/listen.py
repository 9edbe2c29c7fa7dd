"""Binding a TCP port, and saying why it could not be bound: one recipe for every server of the
project (the inference process, the exporter, the notifier), for the doctor's port check and for
the stack's check before it starts, so that a check finds a port free exactly when the server
could take it, and every server explains a failure the same way."""

from __future__ import annotations

import errno
import re
import socket

ANY_ADDRESS_HINT = "--host takes an address of this machine, e.g. 127.0.0.1 or 0.0.0.0"
BARE_ADDRESS_HINT = (
    "--host takes an address without brackets or port, e.g. 127.0.0.1 or ::1 (the port goes "
    "in --port)"
)
# An address in brackets (as URLs write IPv6), or one with a port (host:port, IPv4 or a name).
_NOT_BARE = re.compile(r"\[.*|.*\]|[^:]+:\d*")


def bind_tcp(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port, not yet listening; OSError when it cannot be bound.

    SO_REUSEADDR, so that a port left in TIME_WAIT by a previous server counts as free (as it
    does for Go's listeners: Prometheus, Alertmanager).
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


def try_bind(host: str, port: int) -> OSError | None:
    """Why ``host:port`` cannot be bound now (None: it can), tried and released at once."""
    try:
        bind_tcp(host, port).close()
    except OSError as exc:
        return exc
    return None


def host_port(host: str, port: int) -> str:
    """host:port as a URL writes it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def bind_error(host: str, port: int, exc: OSError, busy: str) -> str:
    """Why host:port cannot be bound, and what to do about it, in one sentence; ``busy`` is the
    server's own question for a port in use (e.g. "is another exporter using that port?")."""
    where = f"cannot listen on {host_port(host, port)}"
    if _NOT_BARE.fullmatch(host):  # [::1], 127.0.0.1:80: an IPv6 bind of a name that is none
        return f"cannot listen on {host!r} (port {port}): {BARE_ADDRESS_HINT}"
    if isinstance(exc, socket.gaierror):  # a name, not an address, and it does not resolve
        return f"{where}: the name {host!r} does not resolve ({exc.strerror}); {ANY_ADDRESS_HINT}"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{where}: this machine has no address {host}; {ANY_ADDRESS_HINT}"
    if exc.errno == errno.EADDRINUSE:
        return f"{where} ({exc.strerror}); {busy} choose another with --port"
    if exc.errno == errno.EACCES and 0 < port < 1024:
        return (
            f"{where} ({exc.strerror}): ports below 1024 need privileges (root or "
            "CAP_NET_BIND_SERVICE); choose --port 1024 or above"
        )
    return f"{where} ({exc.strerror or exc})"
