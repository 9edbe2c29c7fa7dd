"""Ports for the tests that start the stack (tests/test_stack.py, and test_layering.py's run on
the light install): free ones of their own, never the defaults, which another server on this
machine may hold."""

from __future__ import annotations

import random
from pathlib import Path

from vigil import stack as vigil_stack
from vigil.listen import try_bind


def is_free(port: int) -> bool:
    return try_bind("127.0.0.1", port) is None


def free_ports(names=tuple(vigil_stack.DEFAULT_PORTS)) -> dict[str, int]:
    """A free port for each part, none of them a default one, and none in the kernel's range of
    ephemeral ports (/proc/sys/net/ipv4/ip_local_port_range, 32768-60999 by default): there any
    outgoing connection on this machine may take a port as its own the moment a part lets go
    of it, and the test would find it busy after the stop."""
    try:
        low, _ = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low = 32768
    start = max(1024, min(20000, low - 2000))
    candidates = random.sample(range(start, low), 200)
    taken = set(vigil_stack.DEFAULT_PORTS.values())
    chosen = [p for p in candidates if p not in taken and is_free(p)][: len(names)]
    assert len(chosen) == len(names), "no free ports below the ephemeral range"
    return dict(zip(names, chosen, strict=True))


def port_args(ports: dict[str, int]) -> list[str]:
    return [arg for name, port in ports.items() for arg in (f"--{name}-port", str(port))]
