"""vigil.netproc on literal /proc trees (socket tables, fd links, stat lines, children files),
and once on this machine's real /proc."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vigil import netproc
from vigil.listen import try_bind
from vigil.netproc import (
    ListeningSocket,
    children,
    cmdline,
    descendants,
    find_engine_processes,
    listening_inodes,
    listening_inodes_of_pid_netns,
    pids_holding,
)
from vigil.procfs import parse_stat

# The layout of /proc/net/tcp{,6} as a 6.x kernel writes it (copied from a real machine).
TCP_HEADER = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout"
    " inode                                                     "
)
TCP6_HEADER = (
    "  sl  local_address                         remote_address                        st"
    " tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode"
)
V6_ANY = "0" * 32


def _deny_fds(monkeypatch, proc: Path, pid: int) -> None:
    """/proc/<pid>/fd reads as another user's process: permission denied."""
    listdir = os.listdir

    def guarded_listdir(path):
        if Path(path) == proc / str(pid) / "fd":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return listdir(path)

    monkeypatch.setattr(netproc.os, "listdir", guarded_listdir)


def tcp_line(n: int, local: str, remote: str, state: str, inode: int, uid: int = 0) -> str:
    return (
        f"{n:4d}: {local} {remote} {state} 00000000:00000000 00:00000000 00000000 {uid:5d}"
        f"        0 {inode} 1 00000000fe80061a 100 0 0 10 0                      "
    )


def stat_line(pid: int, ppid: int, comm: str = "python", state: str = "S") -> str:
    # Fields 3..52: state, ppid, pgrp, session, tty, tpgid, flags, minflt, cminflt, majflt,
    # cmajflt, utime, stime, cutime, cstime, priority, nice, num_threads, itrealvalue,
    # starttime, vsize, rss, ...
    fields = [state, str(ppid), str(pid), str(pid), "0", "-1", "4194304"]
    fields += ["0"] * 4 + ["100", "20"] + ["0"] * 4 + ["4", "0", str(1000 + pid), "0", "50"]
    fields += ["0"] * 30
    return f"{pid} ({comm}) " + " ".join(fields) + "\n"


def write_tables(root: Path, tcp: list[str], tcp6: list[str] | None = None) -> None:
    (root / "net").mkdir(parents=True, exist_ok=True)
    (root / "net" / "tcp").write_text("\n".join([TCP_HEADER, *tcp]) + "\n")
    if tcp6 is not None:
        (root / "net" / "tcp6").write_text("\n".join([TCP6_HEADER, *tcp6]) + "\n")


def add_process(
    proc: Path,
    pid: int,
    ppid: int,
    sockets: tuple[int, ...] = (),
    *,
    comm: str = "python",
    kids: dict[int, list[int]] | None = None,
) -> Path:
    """A process with fds 0-2 on a pipe and the sockets after; ``kids``: the children file of
    each thread (None: a kernel without CONFIG_PROC_CHILDREN, so no file at all)."""
    root = proc / str(pid)
    (root / "fd").mkdir(parents=True)
    (root / "stat").write_text(stat_line(pid, ppid, comm))
    for fd in range(3):
        os.symlink("pipe:[4242]", root / "fd" / str(fd))
    for fd, inode in enumerate(sockets, start=3):
        os.symlink(f"socket:[{inode}]", root / "fd" / str(fd))
    for tid, tid_kids in (kids or {pid: []}).items():
        (root / "task" / str(tid)).mkdir(parents=True)
        if kids is not None:
            (root / "task" / str(tid) / "children").write_text(
                "".join(f"{kid} " for kid in tid_kids)
            )
    return root


def test_stat_gives_the_parent_pid_and_the_command_name():
    stat = parse_stat(stat_line(77, 12, comm="python (worker) x").encode(), 77)
    assert stat.ppid == 12 and stat.comm == "python (worker) x" and stat.threads == 4
    assert parse_stat(stat_line(2, 0, comm="kthreadd").encode(), 2).ppid == 0


def test_an_ipv4_listener_and_what_is_not_one(tmp_path: Path):
    proc = tmp_path / "proc"
    write_tables(
        proc,
        [
            tcp_line(0, "0100007F:1F40", "00000000:0000", "0A", 93975, uid=1000),
            tcp_line(1, "00000000:07E8", "00000000:0000", "0A", 1127),  # another port
            # An established connection to the port, and one not yet accepted (inode 0).
            tcp_line(2, "0100007F:1F40", "0100007F:9760", "01", 93976),
            tcp_line(3, "0100007F:1F40", "0100007F:9762", "01", 0),
            tcp_line(4, "0302010A:1F40", "00000000:0000", "0A", 93980),  # 10.1.2.3
        ],
    )  # no tcp6: a kernel without IPv6
    assert listening_inodes(8000, proc) == [
        ListeningSocket(inode=93975, address="127.0.0.1", port=8000, family=4, uid=1000),
        ListeningSocket(inode=93980, address="10.1.2.3", port=8000, family=4, uid=0),
    ]
    assert [s.address for s in listening_inodes(2024, proc)] == ["0.0.0.0"]  # noqa: S104
    assert listening_inodes(8001, proc) == []
    assert listening_inodes(8000, proc)[0].endpoint == "127.0.0.1:8000"


def test_ipv6_listeners_loopback_any_and_ipv4_mapped(tmp_path: Path):
    proc = tmp_path / "proc"
    write_tables(
        proc,
        [],
        [
            tcp_line(0, "00000000000000000000000001000000:1F40", f"{V6_ANY}:0000", "0A", 501),
            tcp_line(1, f"{V6_ANY}:1F40", f"{V6_ANY}:0000", "0A", 502),
            tcp_line(2, "0000000000000000FFFF00000100007F:1F40", f"{V6_ANY}:0000", "0A", 503),
            # 2001:db8::1, and a connection to ::1:8000.
            tcp_line(3, "B80D0120000000000000000001000000:1F40", f"{V6_ANY}:0000", "0A", 504),
            tcp_line(
                4,
                "00000000000000000000000001000000:1F40",
                "00000000000000000000000001000000:A3B5",
                "01",
                505,
            ),
        ],
    )
    found = listening_inodes(8000, proc)
    assert [(s.inode, s.address, s.family) for s in found] == [
        (501, "::1", 6),
        (502, "::", 6),
        (503, "::ffff:127.0.0.1", 6),
        (504, "2001:db8::1", 6),
    ]
    assert found[0].endpoint == "[::1]:8000"


def test_malformed_lines_are_skipped(tmp_path: Path):
    proc = tmp_path / "proc"
    good = tcp_line(5, "0100007F:1F40", "00000000:0000", "0A", 700)
    write_tables(
        proc,
        [
            "",
            "   0: 0100007F:1F40 00000000:0000 0A",  # cut short
            tcp_line(1, "0100007G:1F40", "00000000:0000", "0A", 701),  # not hex
            tcp_line(2, "0100007F1F40", "00000000:0000", "0A", 702),  # no port
            tcp_line(3, "0100007F:1F40", "00000000:0000", "0A", 706).replace(" 706 ", " x "),
            tcp_line(4, "00000000000000000000000001000000:1F40", "0:0", "0A", 703),  # v6 in v4
            "garbage \x00\xff line with enough words to pass the count check a b c",
            good,
        ],
        ["   0: 0000:1F40 0:0 0A 0:0 0:0 0 0 0 704"],  # an IPv6 address too short
    )
    assert [s.inode for s in listening_inodes(8000, proc)] == [700]


def test_listeners_of_another_network_namespace(tmp_path: Path):
    """/proc/net/tcp is the reader's namespace; /proc/<pid>/net/tcp that of process <pid>."""
    proc = tmp_path / "proc"
    write_tables(proc, [tcp_line(0, "0100007F:1F40", "00000000:0000", "0A", 800)])
    host = add_process(proc, 1, 0)
    write_tables(host, [tcp_line(0, "00000000:1F40", "00000000:0000", "0A", 900)], [])
    assert [s.inode for s in listening_inodes(8000, proc)] == [800]
    assert [s.inode for s in listening_inodes_of_pid_netns(1, 8000, proc)] == [900]
    assert listening_inodes_of_pid_netns(4321, 8000, proc) == []  # gone


def test_pids_holding_skips_processes_gone_between_listing_and_reading(tmp_path: Path):
    proc = tmp_path / "proc"
    add_process(proc, 10, 1, (800,))
    add_process(proc, 11, 1, (801,))
    add_process(proc, 12, 1, (800, 802))
    # 13 was listed but its fd directory is gone; 14's fd is a dangling reference.
    (proc / "13").mkdir()
    (proc / "14").mkdir()
    os.symlink(proc / "nowhere", proc / "14" / "fd")
    (proc / "self").mkdir()  # not a pid
    holders = pids_holding([800], proc)
    assert holders.pids == (10, 12) and holders.denied == () and holders.failed == ()
    assert pids_holding([800, 801], proc).pids == (10, 11, 12)
    assert pids_holding([ListeningSocket(801, "::", 8000, 6, 0)], proc).pids == (11,)
    assert pids_holding([], proc).pids == ()


def test_pids_holding_counts_the_processes_it_may_not_read(tmp_path: Path, monkeypatch):
    """As root, chmod 000 blocks nothing: the kernel's EACCES is played by os.listdir."""
    proc = tmp_path / "proc"
    add_process(proc, 10, 1, (800,))
    add_process(proc, 20, 1, (800,))
    add_process(proc, 30, 1, (800,))
    (proc / "40").mkdir()
    (proc / "40" / "fd").write_text("")  # not a directory: an error other than permission
    listdir, readlink = os.listdir, os.readlink

    def guarded_listdir(path):
        if Path(path) == proc / "20" / "fd":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return listdir(path)

    def guarded_readlink(path):
        if Path(path).parent == proc / "30" / "fd":
            raise PermissionError(errno.EPERM, "Operation not permitted", str(path))
        if Path(path) == proc / "10" / "fd" / "1":
            raise FileNotFoundError(errno.ENOENT, "closed since", str(path))
        return readlink(path)

    monkeypatch.setattr(netproc.os, "listdir", guarded_listdir)
    monkeypatch.setattr(netproc.os, "readlink", guarded_readlink)
    holders = pids_holding([800], proc)
    assert holders.pids == (10,) and holders.denied == (20, 30) and holders.failed == (40,)


def test_descendants_from_the_children_files_of_every_thread(tmp_path: Path):
    proc = tmp_path / "proc"
    # 100 forked 101 from its main thread and 102 from thread 105; 102 forked 103.
    add_process(proc, 100, 1, kids={100: [101], 105: [102]})
    add_process(proc, 101, 100, kids={101: []})
    add_process(proc, 102, 100, kids={102: [103]})
    add_process(proc, 103, 102, kids={103: [104]})  # 104 is gone: no directory
    add_process(proc, 200, 1, kids={200: []})
    # A stale ppid that the children files contradict: they are what is read.
    (proc / "200" / "stat").write_text(stat_line(200, 100))
    assert children(100, proc) == [101, 102]
    assert descendants(100, proc) == [101, 102, 103, 104]
    assert descendants(103, proc) == [104]
    assert descendants(200, proc) == [] and children(999, proc) == []


def test_descendants_from_the_parent_pids_without_children_files(tmp_path: Path):
    proc = tmp_path / "proc"
    add_process(proc, 100, 1, comm="vllm (api) server")
    add_process(proc, 101, 100, comm="VLLM::EngineCor")
    add_process(proc, 102, 101, comm="VLLM::Worker_TP")
    add_process(proc, 103, 101, comm="VLLM::Worker_TP")
    add_process(proc, 104, 1)
    (proc / "105").mkdir()  # gone: no stat
    (proc / "106").mkdir()
    (proc / "106" / "stat").write_text("106 no parenthesis\n")
    (proc / "107").mkdir()
    (proc / "107" / "stat").write_text("107 (python) Z 100\n")  # being torn down
    assert children(100, proc) == [101]
    assert children(101, proc) == [102, 103]
    assert descendants(100, proc) == [101, 102, 103]
    assert descendants(999, proc) == [] and children(999, proc) == []


def test_cmdline(tmp_path: Path):
    proc = tmp_path / "proc"
    for pid, raw in (
        (1, b"vllm\0serve\0/models/glm\0--port\x008000\0"),
        (2, b""),  # a kernel thread or a zombie
        (3, b"VLLM::EngineCore" + b"\0" * 40),  # a rewritten title padded with NULs
        (4, b"python\0-c\0print('\xff')\0"),
    ):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "cmdline").write_bytes(raw)
    assert cmdline(1, proc) == ["vllm", "serve", "/models/glm", "--port", "8000"]
    assert cmdline(2, proc) == []
    assert cmdline(3, proc) == ["VLLM::EngineCore"]
    assert cmdline(4, proc) == ["python", "-c", "print('\ufffd')"]
    assert cmdline(5, proc) is None


def vllm_tree(proc: Path, kids: bool) -> None:
    """A vLLM-like server on 0.0.0.0:8000 and [::]:8000: the API server 300 (its pid wrapped
    after its workers' were allotted) shares its sockets with two uvicorn-like workers, 120 and
    301, and forked EngineCore 302, which forked workers 303 and 304."""
    write_tables(
        proc,
        [
            tcp_line(0, "00000000:1F40", "00000000:0000", "0A", 5001),
            tcp_line(1, "0100007F:1F41", "00000000:0000", "0A", 5003),  # another server
            tcp_line(2, "0100007F:1F40", "0100007F:D0C2", "01", 5004),  # a client
        ],
        [tcp_line(0, f"{V6_ANY}:1F40", f"{V6_ANY}:0000", "0A", 5002)],
    )

    def k(*pids: int) -> dict[int, list[int]] | None:
        return None if not kids else {pids[0]: list(pids[1:])}

    add_process(proc, 1, 0, comm="init", kids=k(1, 300, 50, 60))
    add_process(proc, 50, 1, (5003,), kids=k(50))
    add_process(proc, 60, 1, (5004,), kids=k(60))  # the client
    add_process(proc, 300, 1, (5001, 5002), comm="vllm", kids=k(300, 120, 301, 302))
    add_process(proc, 120, 300, (5001, 5002), kids=k(120))
    add_process(proc, 301, 300, (5002,), kids=k(301))
    add_process(proc, 302, 300, comm="VLLM::EngineCor", kids=k(302, 303, 304))
    add_process(proc, 303, 302, kids=k(303))
    add_process(proc, 304, 302, kids=k(304))


@pytest.mark.parametrize("kids", [True, False], ids=["children-files", "ppid-scan"])
def test_find_engine_processes_chooses_the_parent_of_the_listeners(tmp_path: Path, kids: bool):
    proc = tmp_path / "proc"
    vllm_tree(proc, kids)
    found = find_engine_processes(8000, proc)
    assert found.problem is None and found.denied == 0
    assert [s.endpoint for s in found.sockets] == ["0.0.0.0:8000", "[::]:8000"]
    assert found.listeners == (120, 300, 301) and found.pid == 300
    assert found.pids == [300, 120, 301, 302, 303, 304]
    assert found.processes[0].comm == "vllm" and found.processes[3].comm == "VLLM::EngineCor"
    assert found.processes[3].ppid == 300 and found.processes[4].ppid == 302
    assert find_engine_processes(8001, proc).pid == 50


def test_unrelated_listeners_choose_the_lowest_pid(tmp_path: Path):
    """Two servers sharing the port through SO_REUSEPORT, neither the other's parent."""
    proc = tmp_path / "proc"
    write_tables(
        proc,
        [
            tcp_line(0, "00000000:1F40", "00000000:0000", "0A", 7001),
            tcp_line(1, "00000000:1F40", "00000000:0000", "0A", 7002),
        ],
    )
    add_process(proc, 1, 0)
    add_process(proc, 70, 1, (7002,))
    add_process(proc, 40, 1, (7001,))
    add_process(proc, 41, 40)
    found = find_engine_processes(8000, proc)
    assert found.listeners == (40, 70) and found.pid == 40 and found.pids == [40, 41]


def test_find_engine_processes_says_what_went_wrong(tmp_path: Path, monkeypatch):
    proc = tmp_path / "proc"
    write_tables(proc, [tcp_line(0, "0100007F:1F40", "00000000:0000", "0A", 6001)], [])
    add_process(proc, 1, 0)
    nothing = find_engine_processes(9000, proc)
    assert nothing.pid is None and nothing.processes == ()
    assert "nothing listens on TCP port 9000" in nothing.problem
    assert "network namespace" in nothing.problem
    # The socket's holder is in a pid namespace we do not see.
    hidden = find_engine_processes(8000, proc)
    assert hidden.pid is None and "127.0.0.1:8000" in hidden.problem
    assert "pid: host" in hidden.problem
    # The holder's fds are another user's.
    add_process(proc, 77, 1, (6001,))
    _deny_fds(monkeypatch, proc, 77)
    denied = find_engine_processes(8000, proc)
    assert denied.pid is None and denied.denied == 1
    assert "permission denied" in denied.problem and "CAP_SYS_PTRACE" in denied.problem
    monkeypatch.undo()
    assert find_engine_processes(8000, proc).pid == 77
    # Another network namespace, through a process in it.
    netns = add_process(proc, 5, 1)
    write_tables(netns, [tcp_line(0, "00000000:2328", "00000000:0000", "0A", 6001)])
    assert find_engine_processes(9000, proc, netns_pid=5).pid == 77
    assert "pid 5" in find_engine_processes(8000, proc, netns_pid=5).problem


def test_on_the_real_proc_of_this_machine():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        found = find_engine_processes(port)
        assert found.problem is None, found.problem
        assert found.pid == os.getpid() and found.pids[0] == os.getpid()
        assert [s.endpoint for s in found.sockets] == [f"127.0.0.1:{port}"]
        assert found.processes[0].comm and found.processes[0].ppid == os.getppid()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in children(os.getpid())
        assert child.pid in descendants(os.getpid())
        assert child.pid in descendants(os.getppid())
        deadline = time.monotonic() + 10
        while (args := cmdline(child.pid)) != [sys.executable, "-c", "import time; time.sleep(30)"]:
            assert time.monotonic() < deadline, args  # still exec'ing
            time.sleep(0.05)
    finally:
        child.kill()
        child.wait()
    assert child.pid not in descendants(os.getpid())


# -- Who holds a port -------------------------------------------------------------------------


def test_listener_of_names_the_chosen_listener_with_its_whole_command_line(tmp_path: Path):
    proc = tmp_path / "proc"
    vllm_tree(proc, kids=True)
    long_model = "/models/" + "glm-4.5-air-" * 20
    (proc / "300" / "cmdline").write_bytes(
        b"\0".join([b"vllm", b"serve", long_model.encode(), b"--port", b"8000"]) + b"\0"
    )
    assert netproc.listener_of(8000, "127.0.0.1", proc) == (
        f"pid 300 (vllm serve {long_model} --port 8000)"
    )
    # 127.0.0.1:8001 is the other server's.
    (proc / "50" / "cmdline").write_bytes(b"python\0-c\0import x\nx.serve()\0")
    assert netproc.listener_of(8001, None, proc) == "pid 50 (python -c 'import x\\nx.serve()')"
    assert netproc.listener_of(9999, None, proc) is None


def test_listener_of_prefers_the_socket_in_the_way_of_the_host(tmp_path: Path):
    """Port 8000 held on 127.0.0.1 by pid 40 and on 10.0.0.5 by pid 70: binding 127.0.0.1
    fails because of pid 40; binding 0.0.0.0 because of either."""
    proc = tmp_path / "proc"
    write_tables(
        proc,
        [
            tcp_line(0, "0500000A:1F40", "00000000:0000", "0A", 7002),  # 10.0.0.5
            tcp_line(1, "0100007F:1F40", "00000000:0000", "0A", 7001),  # 127.0.0.1
        ],
    )
    add_process(proc, 1, 0)
    for pid, inode in ((40, 7001), (70, 7002)):
        add_process(proc, pid, 1, (inode,))
        (proc / str(pid) / "cmdline").write_bytes(f"server{pid}\0".encode())
    assert netproc.listener_of(8000, "127.0.0.1", proc) == "pid 40 (server40)"
    assert netproc.listener_of(8000, "10.0.0.5", proc) == "pid 70 (server70)"
    assert netproc.listener_of(8000, "0.0.0.0", proc) == "pid 40 (server40)"  # noqa: S104


def test_listener_of_says_when_the_holder_cannot_be_seen(tmp_path: Path, monkeypatch):
    proc = tmp_path / "proc"
    write_tables(proc, [tcp_line(0, "0100007F:1F40", "00000000:0000", "0A", 6001)])
    add_process(proc, 1, 0)
    assert netproc.listener_of(8000, "127.0.0.1", proc) == "a process outside this pid namespace"
    add_process(proc, 77, 1, (6001,))
    _deny_fds(monkeypatch, proc, 77)
    assert "run as root" in netproc.listener_of(8000, "127.0.0.1", proc)
    monkeypatch.undo()
    (proc / "77" / "cmdline").write_bytes(b"")  # a zombie: its name instead
    assert netproc.listener_of(8000, "127.0.0.1", proc) == "pid 77 ([python])"


def test_a_busy_port_and_its_listener_on_this_machine():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        error = try_bind("127.0.0.1", port)
        assert error is not None and error.errno == errno.EADDRINUSE
        assert netproc.listener_of(port, "127.0.0.1") == (
            f"pid {os.getpid()} ({netproc.one_line(cmdline(os.getpid()))})"
        )
    assert try_bind("127.0.0.1", port) is None
    assert try_bind("192.0.2.1", 0).errno == errno.EADDRNOTAVAIL  # not this machine's


@pytest.mark.parametrize("host", ["[::1]", "127.0.0.1:80", "localhost:8000", "[::1]:80"])
def test_a_host_with_brackets_or_a_port_is_told_to_drop_them(host: str):
    from vigil.listen import bind_error, bind_tcp

    with pytest.raises(OSError) as caught:
        bind_tcp(host, 0)
    message = bind_error(host, 8123, caught.value, busy="")
    assert "without brackets or port" in message and "--port" in message
    assert "[[" not in message and "does not resolve" not in message


def test_tcp_queues_of_a_connection_on_this_machine():
    """Bytes the server has not read wait in its socket's rx_queue until it reads them."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        with client, accepted:
            ours, theirs = client.getsockname(), accepted.getsockname()
            assert netproc.tcp_queues(theirs, ours) == (0, 0)
            client.sendall(b"x" * 1000)
            deadline = time.monotonic() + 10
            while netproc.tcp_queues(theirs, ours) != (0, 1000) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert netproc.tcp_queues(theirs, ours) == (0, 1000)
            assert accepted.recv(2000)
            assert netproc.tcp_queues(theirs, ours)[1] < 1000
    assert netproc.tcp_queues(("127.0.0.1", 1), ("127.0.0.1", 2)) is None
