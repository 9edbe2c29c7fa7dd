"""The processes behind a TCP port, found through /proc: how the exporter finds a foreign
engine (a vLLM server, say) from the port it serves on.

Three steps, each usable alone:

1. ``listening_inodes``: the LISTEN sockets on the port, from ``/proc/net/tcp`` and
   ``/proc/net/tcp6``; each socket is known by its inode.
2. ``pids_holding``: the processes holding one of those sockets, from the ``socket:[<inode>]``
   links under ``/proc/<pid>/fd``. Reading another user's fd directory needs root or
   CAP_SYS_PTRACE: the pids that could not be read are counted, not hidden.
3. ``descendants``: the process tree under the listener (vLLM's API server forks an EngineCore
   process, which forks the workers), from ``/proc/<pid>/task/<tid>/children`` or, on a kernel
   without CONFIG_PROC_CHILDREN, from the parent pid (field 4) of every ``/proc/<pid>/stat``.

``find_engine_processes`` does all three. ``listener_of`` says in one phrase who listens on a
port (the doctor's port check, the stack's start when a port is busy).

Network namespaces: ``/proc/net`` is a link to ``/proc/self/net``, so ``/proc/net/tcp`` lists
the sockets of the *reader's* network namespace. An exporter in a container with ``pid: host``
sees the host's processes but still has its own network: an engine on the host network, or in
another container, is not in its ``/proc/net/tcp``. ``/proc/<pid>/net/tcp`` lists the sockets of
the network namespace of process <pid>: pass the pid of any process in the engine's namespace
(``1`` for the host's with ``pid: host``) as ``netns_pid``. Socket inodes are unique across
namespaces, so the fd scan of step 2 is the same either way. Conversely, the processes holding a
socket are only found where the reader's pid namespace shows them (compose: ``pid: host``).

Every function takes ``proc`` (default ``/proc``), so tests run on literal trees of files.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import shlex
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vigil.procfs import PROC, ProcStat, ProcUnreadable, parse_stat, read_stat

__all__ = [
    "PROC",
    "EngineProcesses",
    "ListeningSocket",
    "SocketHolders",
    "children",
    "cmdline",
    "descendants",
    "find_engine_processes",
    "listener_of",
    "listening_inodes",
    "listening_inodes_of_pid_netns",
    "one_line",
    "pids_holding",
    "tcp_queues",
]

TCP_LISTEN = 0x0A  # the ``st`` column: TCP_LISTEN in include/net/tcp_states.h
_TABLES = (("tcp", 4), ("tcp6", 6))
_GONE = (FileNotFoundError, ProcessLookupError)
_DENIED = (errno.EACCES, errno.EPERM)


@dataclass(frozen=True)
class ListeningSocket:
    inode: int
    address: str  # the local address: "0.0.0.0", "127.0.0.1", "::", "::1", "::ffff:127.0.0.1"
    port: int
    family: int  # 4 (from net/tcp) or 6 (from net/tcp6)
    uid: int  # the owner's uid, in the reader's user namespace

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:8000`` or ``[::1]:8000``."""
        return (
            f"[{self.address}]:{self.port}" if self.family == 6 else f"{self.address}:{self.port}"
        )


@dataclass(frozen=True)
class SocketHolders:
    pids: tuple[int, ...]  # sorted
    # Pids whose fd directory could not be read: permission (run as root or with
    # CAP_SYS_PTRACE), or another error (out of file descriptors). A process that is gone is in
    # neither.
    denied: tuple[int, ...] = ()
    failed: tuple[int, ...] = ()


@dataclass(frozen=True)
class EngineProcesses:
    port: int
    sockets: tuple[ListeningSocket, ...]  # the LISTEN sockets on the port
    listeners: tuple[int, ...]  # every pid holding one of them, sorted
    pid: int | None  # the chosen listener: the ancestor of the others, else the lowest pid
    # The chosen listener first, then its descendants by pid; those gone while being read are
    # left out.
    processes: tuple[ProcStat, ...] = ()
    denied: int = 0  # processes whose fds could not be read for want of permission
    problem: str | None = None  # why nothing (or not everything) was found

    @property
    def pids(self) -> list[int]:
        return [stat.pid for stat in self.processes]


# -- 1. Sockets -------------------------------------------------------------------------------


def _ipv4(hex_ip: str) -> str:
    # The kernel prints the 32-bit address, in network order in memory, as a host-order integer:
    # 0100007F on a little-endian machine is 127.0.0.1.
    return str(ipaddress.IPv4Address(int(hex_ip, 16).to_bytes(4, sys.byteorder)))


def _ipv6(hex_ip: str) -> str:
    # Four 32-bit words, each printed as a host-order integer.
    raw = b"".join(int(hex_ip[i : i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, 32, 8))
    address = ipaddress.IPv6Address(raw)
    if address.ipv4_mapped is not None:  # one spelling whatever the Python version
        return f"::ffff:{address.ipv4_mapped}"
    return str(address)


def tcp_queues(
    local: tuple[str, int], remote: tuple[str, int], proc: Path = PROC
) -> tuple[int, int] | None:
    """``(tx_queue, rx_queue)`` of the IPv4 TCP connection ``local`` -> ``remote`` in this
    network namespace: bytes sent and not yet acknowledged, bytes received and not yet read by
    the process that holds it (so a body has reached a server once its rx_queue drains); None
    when there is no such connection."""
    wanted = (local[0], local[1], remote[0], remote[1])
    try:
        lines = (proc / "net" / "tcp").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 5:
            continue
        (local_ip, local_port), (remote_ip, remote_port) = (
            field.partition(":")[::2] for field in fields[1:3]
        )
        try:
            seen = (_ipv4(local_ip), int(local_port, 16), _ipv4(remote_ip), int(remote_port, 16))
        except ValueError:
            continue
        if seen == wanted:
            tx, _, rx = fields[4].partition(":")
            return int(tx, 16), int(rx, 16)
    return None


def _parse_line(line: str, family: int) -> ListeningSocket | None:
    """The socket of one table line when it is a LISTEN socket; None for anything else."""
    fields = line.split()
    # sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
    if len(fields) < 10 or not fields[0].endswith(":"):
        return None
    try:
        if int(fields[3], 16) != TCP_LISTEN:
            return None
        hex_ip, _, hex_port = fields[1].partition(":")
        if len(hex_ip) != (8 if family == 4 else 32) or len(hex_port) != 4:
            return None
        address = _ipv4(hex_ip) if family == 4 else _ipv6(hex_ip)
        inode = int(fields[9])
        uid = int(fields[7])
        port = int(hex_port, 16)
    except ValueError:
        return None
    if inode == 0:  # a socket being torn down: no process holds it
        return None
    return ListeningSocket(inode=inode, address=address, port=port, family=family, uid=uid)


def _listeners(net: Path, port: int) -> tuple[list[ListeningSocket], list[str]]:
    """The LISTEN sockets on ``port`` in the tables under ``net``, and the tables that could not
    be read for a reason other than being absent (net/tcp6 is absent without IPv6)."""
    found: list[ListeningSocket] = []
    unreadable: list[str] = []
    seen: set[int] = set()
    for name, family in _TABLES:
        try:
            text = (net / name).read_bytes().decode("ascii", "replace")
        except _GONE:
            continue
        except OSError as exc:
            unreadable.append(f"{net / name}: {exc.strerror or exc}")
            continue
        for line in text.splitlines()[1:]:  # the first line is the header
            sock = _parse_line(line, family)
            if sock is not None and sock.port == port and sock.inode not in seen:
                seen.add(sock.inode)
                found.append(sock)
    return found, unreadable


def listening_inodes(port: int, proc: Path = PROC) -> list[ListeningSocket]:
    """The LISTEN sockets on ``port``, any local address, IPv4 and IPv6, in the network
    namespace of the reader (``/proc/net`` is ``/proc/self/net``). Malformed lines are skipped;
    an absent or unreadable table reads as empty."""
    return _listeners(proc / "net", port)[0]


def listening_inodes_of_pid_netns(pid: int, port: int, proc: Path = PROC) -> list[ListeningSocket]:
    """As ``listening_inodes``, in the network namespace of process ``pid``: for an engine in
    another namespace than the reader's. Empty when the process is gone."""
    return _listeners(proc / str(pid) / "net", port)[0]


# -- 2. Holders -------------------------------------------------------------------------------


def _pids(proc: Path) -> list[int]:
    try:
        return sorted(int(entry) for entry in os.listdir(proc) if entry.isdigit())
    except OSError:
        return []


def pids_holding(inodes: Iterable[int | ListeningSocket], proc: Path = PROC) -> SocketHolders:
    """The processes with a file descriptor on one of the sockets ``inodes`` (ints, or
    ListeningSockets). Processes gone while being read are skipped; those whose fd directory
    could not be read are counted in ``denied`` or ``failed``."""
    # The target of an fd link on a socket.
    wanted = {f"socket:[{getattr(inode, 'inode', inode)}]" for inode in inodes}
    holding: list[int] = []
    denied: list[int] = []
    failed: list[int] = []
    if not wanted:
        return SocketHolders(pids=())
    for pid in _pids(proc):
        fd_dir = proc / str(pid) / "fd"
        try:
            fds = os.listdir(fd_dir)
        except _GONE:
            continue
        except OSError as exc:
            (denied if exc.errno in _DENIED else failed).append(pid)
            continue
        for fd in fds:
            try:
                target = os.readlink(fd_dir / fd)
            except _GONE:  # the fd was closed (or the process ended) since the listing
                continue
            except OSError as exc:
                (denied if exc.errno in _DENIED else failed).append(pid)
                break
            if target in wanted:
                holding.append(pid)
                break
    return SocketHolders(pids=tuple(holding), denied=tuple(denied), failed=tuple(failed))


# -- 3. Process trees -------------------------------------------------------------------------


def _read_stat_quietly(pid: int, proc: Path) -> ProcStat | None:
    try:
        return read_stat(pid, proc)
    except (ProcUnreadable, ValueError, IndexError):  # unreadable, or not a stat line
        return None


def _children_files(pid: int, proc: Path) -> list[int] | None:
    """The children of every thread of ``pid`` (a thread that forks is the child's parent),
    from ``task/<tid>/children``; None where the kernel has no such file."""
    task = proc / str(pid) / "task"
    try:
        tids = os.listdir(task)
    except OSError:
        return None
    kids: set[int] = set()
    read_any = False
    for tid in tids:
        try:
            text = (task / tid / "children").read_text()
        except OSError:
            continue
        read_any = True
        kids.update(int(word) for word in text.split() if word.isdigit())
    return sorted(kids) if read_any else None


def _parents(proc: Path) -> dict[int, list[int]]:
    """Every process's children, from the parent pid in each ``/proc/<pid>/stat``."""
    tree: dict[int, list[int]] = {}
    for pid in _pids(proc):
        try:
            raw = (proc / str(pid) / "stat").read_bytes()
            stat = parse_stat(raw, pid)
        except (OSError, ValueError, IndexError):  # gone, unreadable or not a stat line
            continue
        if stat is not None and stat.ppid:
            tree.setdefault(stat.ppid, []).append(pid)
    return tree


def children(pid: int, proc: Path = PROC) -> list[int]:
    """The pids of the process's children, sorted; empty when it has none or is gone."""
    kids = _children_files(pid, proc)
    if kids is not None:
        return kids
    if not (proc / str(pid)).exists():
        return []
    return sorted(_parents(proc).get(pid, []))


def descendants(pid: int, proc: Path = PROC) -> list[int]:
    """The pids of the process's children, their children and so on, sorted (``pid`` itself
    not among them). One scan of /proc where the kernel has no children files."""
    kids = _children_files(pid, proc)
    if kids is None:
        tree = _parents(proc)
        kids = tree.get(pid, [])

        def children_of(parent: int) -> list[int]:
            return tree.get(parent, [])
    else:

        def children_of(parent: int) -> list[int]:
            return _children_files(parent, proc) or []  # None: gone since

    found: set[int] = set()
    queue = list(kids)
    while queue:
        kid = queue.pop()
        if kid == pid or kid in found:  # a reused pid must not loop
            continue
        found.add(kid)
        queue.extend(children_of(kid))
    return sorted(found)


def cmdline(pid: int, proc: Path = PROC) -> list[str] | None:
    """The process's arguments; empty for a kernel thread or a zombie; None when it is gone or
    cannot be read. Trailing NULs are dropped (a process that rewrites its title, as vLLM's
    do, pads with them), so a last argument that is empty is lost."""
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    raw = raw.rstrip(b"\0")
    return [arg.decode("utf-8", "replace") for arg in raw.split(b"\0")] if raw else []


# -- All three --------------------------------------------------------------------------------


def _count(processes: int) -> str:
    return f"{processes} process" if processes == 1 else f"{processes} processes"


def _ancestors(pid: int, proc: Path) -> set[int]:
    found: set[int] = set()
    stat = _read_stat_quietly(pid, proc)
    while stat is not None and stat.ppid > 0 and stat.ppid not in found and stat.ppid != pid:
        found.add(stat.ppid)
        stat = _read_stat_quietly(stat.ppid, proc)
    return found


def _choose(listeners: tuple[int, ...], proc: Path) -> int:
    """The listener that is an ancestor of the most other listeners (uvicorn's or gunicorn's
    workers share their parent's socket), the lowest pid among equals."""
    if len(listeners) == 1:
        return listeners[0]
    lineage = {pid: _ancestors(pid, proc) for pid in listeners}
    return min(
        listeners,
        key=lambda pid: (-sum(pid in lineage[other] for other in listeners), pid),
    )


def find_engine_processes(
    port: int, proc: Path = PROC, *, netns_pid: int | None = None
) -> EngineProcesses:
    """The process listening on ``port`` and its descendants. ``netns_pid``: read the sockets
    of that process's network namespace instead of the reader's (see the module's docstring)."""
    net = proc / "net" if netns_pid is None else proc / str(netns_pid) / "net"
    sockets, unreadable = _listeners(net, port)
    where = "this network namespace" if netns_pid is None else f"the network of pid {netns_pid}"
    if not sockets:
        if unreadable and len(unreadable) == len(_TABLES):
            problem = "cannot read the socket tables: " + "; ".join(unreadable)
        else:
            problem = (
                f"nothing listens on TCP port {port} in {where} ({net}/tcp, tcp6); an engine in"
                " another container or on the host network is in another network namespace"
            )
        return EngineProcesses(port=port, sockets=(), listeners=(), pid=None, problem=problem)
    holders = pids_holding([sock.inode for sock in sockets], proc)
    denied = len(holders.denied)
    if not holders.pids:
        endpoints = ", ".join(sock.endpoint for sock in sockets)
        if denied:
            problem = (
                f"{endpoints} listens but the fds of {_count(denied)} could not be read"
                " (permission denied): run the exporter as root or with CAP_SYS_PTRACE"
            )
        else:
            problem = (
                f"{endpoints} listens but no visible process holds it: the engine is in"
                " another pid namespace (run the exporter with pid: host)"
            )
            if holders.failed:
                problem += f"; the fds of {_count(len(holders.failed))} could not be read"
        return EngineProcesses(
            port=port,
            sockets=tuple(sockets),
            listeners=(),
            pid=None,
            denied=denied,
            problem=problem,
        )
    root = _choose(holders.pids, proc)
    stats = [
        stat
        for pid in [root, *descendants(root, proc)]
        if (stat := _read_stat_quietly(pid, proc)) is not None
    ]
    problem = None
    if not stats or stats[0].pid != root:
        problem = f"the process {root} listening on port {port} ended while being read"
    return EngineProcesses(
        port=port,
        sockets=tuple(sockets),
        listeners=holders.pids,
        pid=root,
        processes=tuple(stats),
        denied=denied,
        problem=problem,
    )


# -- Who holds a port -------------------------------------------------------------------------


def _covers(sock: ListeningSocket, host: str) -> bool:
    """Whether a listener on ``sock`` stands in the way of binding ``host`` on the same port."""
    wildcard = ("0.0.0.0", "::", "::ffff:0.0.0.0")  # noqa: S104 - compared, not bound
    return sock.address in wildcard or host in wildcard or sock.address in (host, f"::ffff:{host}")


def listener_of(port: int, host: str | None = None, proc: Path = PROC) -> str | None:
    """``pid N (its whole command line)`` of the process listening on TCP ``port`` (those whose
    address conflicts with ``host`` first, when given), when /proc tells; None when nothing
    listens on it (a socket bound without listening, or one of another network namespace)."""
    sockets = listening_inodes(port, proc)
    if host is not None:
        sockets = [sock for sock in sockets if _covers(sock, host)] or sockets
    if not sockets:
        return None
    holders = pids_holding(sockets, proc)
    if not holders.pids:
        if holders.denied:
            return "a process whose file descriptors this user may not read (run as root to see it)"
        return "a process outside this pid namespace"
    pid = _choose(holders.pids, proc)
    args = cmdline(pid, proc)
    if args is None:
        return f"pid {pid} (ended since)"
    if not args:  # a kernel thread or a zombie: its name instead
        stat = _read_stat_quietly(pid, proc)
        return f"pid {pid} ([{stat.comm if stat else '?'}])"
    return f"pid {pid} ({one_line(args)})"


def one_line(args: list[str]) -> str:
    """A command line on one line: arguments quoted where a shell needs it (shlex.join), line
    breaks and tabs written as \\n, \\r and \\t."""
    return shlex.join(args).translate({10: "\\n", 13: "\\r", 9: "\\t"})
