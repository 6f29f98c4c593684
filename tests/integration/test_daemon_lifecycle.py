"""Safe in an operator's hands (issue 12): the daemons as an admin runs them.

Each test starts `relaymilter run` or `relaymilter policyd` as a subprocess
(relaymilter_process.py) and talks to it over its real socket, or through
a real Postfix where the point is what Postfix sees:

  - a second instance on the same socket refuses to start (exit 69) and
    leaves the first one's socket alone; a stale socket file is replaced;
  - SIGHUP reloads the config (even a change the 1 s poll cannot see) and
    never stops either daemon; SIGTERM still stops them with exit 0;
  - one config runs both daemons at once, each with its own metrics
    listener; a listener that cannot bind is exit 69 naming the key;
  - the policy service answers CRLF requests, refuses a request over
    MAX_REQUEST, takes 100 simultaneous connects, closes idle connections
    and makes connections beyond max_connections wait; it holds and answers
    1000 connections at once with a few threads.
"""

from __future__ import annotations

import os
import resource
import select
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from policy_client import PolicyClient, request
from relaymilter.policyd import MAX_REQUEST
from relaymilter_process import (RELAYMILTER, RelaymilterProcess, public_subdirectory,
                                 toml_document, _free_port)
from smtp_dialog import rcpt_reply

RELAY = {"local_domains": ["aaa.test"]}
STORE = {"path": ""}
VERB = {"milter": "run", "policyd": "policyd"}


def address_of(process: RelaymilterProcess):
    return str(process.socket_path) if process.socket_path else ("127.0.0.1", process.port)


def second_instance(process: RelaymilterProcess) -> subprocess.CompletedProcess:
    return subprocess.run([RELAYMILTER, VERB[process.front_end], "-c", str(process.config_path)],
                          capture_output=True, text=True, timeout=30)


def hard_to_notice_rewrite(path: Path, old: str, new: str) -> None:
    """Change the config in place: same inode, same size, same mtime.

    The 1 s change detection compares (inode, size, mtime) and cannot see
    it: only a SIGHUP makes the daemon read it.
    """
    assert len(old) == len(new)
    before = path.stat()
    text = path.read_text(encoding="utf-8")
    assert old in text
    with open(path, "r+", encoding="utf-8") as config:
        config.write(text.replace(old, new))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == \
        (before.st_ino, before.st_size, before.st_mtime_ns)


def get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status


# --------------------------------------------- 7: a second instance ---

def test_a_second_instance_refuses_a_live_unix_socket_and_leaves_it(public_tree, front_end):
    directory = public_subdirectory(public_tree, f"second-unix-{front_end}")
    with RelaymilterProcess(directory, front_end=front_end, relay=RELAY, store=STORE) as first:
        inode = first.socket_path.stat().st_ino
        done = second_instance(first)
        assert done.returncode == 69, done.stderr
        assert f"cannot listen on {first.socket}: another process" in done.stderr
        assert "Traceback" not in done.stderr
        assert first.socket_path.stat().st_ino == inode    # the first one's socket, untouched
        assert first._connectable() and first.process.poll() is None
        if front_end == "policyd":
            client = PolicyClient(address_of(first))
            assert client.ask(request("u@aaa.test")) == [b"action=DUNNO"]
            client.close()
        assert first.stop() == 0


def test_a_second_instance_on_a_tcp_socket_in_use_exits_69(public_tree, front_end):
    directory = public_subdirectory(public_tree, f"second-tcp-{front_end}")
    with RelaymilterProcess(directory, transport="inet", front_end=front_end, relay=RELAY,
                            store=STORE) as first:
        done = second_instance(first)
        assert done.returncode == 69, done.stderr
        assert f"cannot listen on {first.socket}: the address is in use" in done.stderr
        assert "Traceback" not in done.stderr
        assert first._connectable() and first.process.poll() is None


def test_a_stale_unix_socket_file_is_replaced(public_tree, front_end):
    directory = public_subdirectory(public_tree, f"stale-{front_end}")
    process = RelaymilterProcess(directory, front_end=front_end, relay=RELAY, store=STORE)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(process.socket_path))      # a socket file nobody listens on
    stale.close()
    with process:
        assert process._connectable()


def test_a_path_that_is_not_a_socket_is_left_alone(public_tree, front_end):
    directory = public_subdirectory(public_tree, f"not-a-socket-{front_end}")
    process = RelaymilterProcess(directory, front_end=front_end, relay=RELAY, store=STORE)
    process.socket_path.write_text("not a socket\n")
    done = second_instance(process)
    assert done.returncode == 69, done.stderr
    assert "exists and is not a socket" in done.stderr
    assert process.socket_path.read_text() == "not a socket\n"


# ---------------------------------------------------- 9: SIGHUP reloads ---

def test_sighup_reloads_the_milter_and_never_stops_it(public_tree, postfix_factory):
    directory = public_subdirectory(public_tree, "hup-milter")
    with RelaymilterProcess(directory, relay=RELAY, store=STORE) as milter:
        postfix = postfix_factory(**milter.postfix_kwargs(local_domains=("aaa.test",
                                                                         "bbb.test")))
        assert rcpt_reply(postfix.port, "<u@bbb.test>", addr="192.0.2.9").code == 554
        hard_to_notice_rewrite(milter.config_path, '"aaa.test"', '"bbb.test"')
        time.sleep(1.5)         # the poll ran at least once and saw nothing
        assert rcpt_reply(postfix.port, "<u@bbb.test>", addr="192.0.2.9").code == 554
        for _ in range(3):
            milter.process.send_signal(signal.SIGHUP)
            time.sleep(0.3)
        milter.wait_for_log(r"configuration reloaded from")
        assert milter.process.poll() is None
        assert rcpt_reply(postfix.port, "<u@bbb.test>", addr="192.0.2.9").code == 250
        assert rcpt_reply(postfix.port, "<u@aaa.test>", addr="192.0.2.9").code == 554
        assert milter.stop() == 0       # SIGTERM still stops it, cleanly


def test_sighup_reloads_the_policy_service_and_never_stops_it(public_tree):
    directory = public_subdirectory(public_tree, "hup-policyd")
    with RelaymilterProcess(directory, front_end="policyd", relay=RELAY, store=STORE) as service:
        client = PolicyClient(address_of(service))
        refused = [b"action=554 5.7.1 Relay access denied"]
        assert client.ask(request("u@bbb.test")) == refused
        hard_to_notice_rewrite(service.config_path, '"aaa.test"', '"bbb.test"')
        time.sleep(1.5)
        assert client.ask(request("u@bbb.test")) == refused
        started = time.monotonic()
        service.process.send_signal(signal.SIGHUP)
        service.wait_for_log(r"configuration reloaded from")
        assert time.monotonic() - started < 1.0     # at once, not at the next poll
        for _ in range(3):
            service.process.send_signal(signal.SIGHUP)
            time.sleep(0.2)
        assert service.process.poll() is None
        assert client.ask(request("u@bbb.test")) == [b"action=DUNNO"]   # same connection
        assert client.ask(request("u@aaa.test")) == refused
        client.close()
        assert service.stop() == 0


def test_a_failed_reload_on_sighup_keeps_the_running_config(public_tree, front_end):
    directory = public_subdirectory(public_tree, f"hup-broken-{front_end}")
    with RelaymilterProcess(directory, front_end=front_end, relay=RELAY, store=STORE) as process:
        process.config_path.write_text("[relay]\nlocal_domains = 7\n", encoding="utf-8")
        process.process.send_signal(signal.SIGHUP)
        process.wait_for_log(r"reload failed, keeping the running configuration: .*"
                             r"relay\.local_domains")
        time.sleep(0.3)
        assert process.process.poll() is None and process._connectable()
        if front_end == "policyd":
            client = PolicyClient(address_of(process))
            assert client.ask(request("u@aaa.test")) == [b"action=DUNNO"]
            client.close()


# ------------------------------------- 11: one config, both daemons ---

def test_one_config_runs_both_daemons_each_with_its_own_metrics(public_tree):
    directory = public_subdirectory(public_tree, "both")
    milter_port, policyd_port = _free_port(), _free_port()
    config = directory / "relaymilter.toml"
    config.write_text(toml_document({
        "milter": {"socket": f"unix:{directory}/milter.sock"},
        "policyd": {"socket": f"unix:{directory}/policyd.sock", "socket_mode": "0666"},
        "relay": RELAY, "store": STORE,
        "metrics": {"listen": f"127.0.0.1:{milter_port}",
                    "policyd_listen": f"127.0.0.1:{policyd_port}"}}), encoding="utf-8")
    log = (directory / "both.log").open("wb")
    daemons = [subprocess.Popen([RELAYMILTER, verb, "-c", str(config)], stdout=log, stderr=log)
               for verb in ("run", "policyd")]
    try:
        deadline = time.monotonic() + 15
        while not all((directory / name).exists() for name in ("milter.sock", "policyd.sock")):
            assert all(daemon.poll() is None for daemon in daemons), \
                (directory / "both.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for port in (milter_port, policyd_port):
            assert get(f"http://127.0.0.1:{port}/metrics") == 200
            assert get(f"http://127.0.0.1:{port}/healthz") == 200
        client = PolicyClient(str(directory / "policyd.sock"))
        assert client.ask(request("u@aaa.test")) == [b"action=DUNNO"]
        client.close()
        assert all(daemon.poll() is None for daemon in daemons)
    finally:
        for daemon in daemons:
            daemon.send_signal(signal.SIGTERM)
        codes = [daemon.wait(timeout=15) for daemon in daemons]
        log.close()
    assert codes == [0, 0], (directory / "both.log").read_text()


@pytest.mark.parametrize("front_end, key", [("milter", "listen"), ("policyd", "policyd_listen")])
def test_a_metrics_listener_that_cannot_bind_is_exit_69_naming_the_key(public_tree, front_end,
                                                                        key):
    directory = public_subdirectory(public_tree, f"metrics-busy-{front_end}")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = RelaymilterProcess(directory, front_end=front_end, relay=RELAY, store=STORE,
                                     metrics={key: f"127.0.0.1:{port}"})
        done = second_instance(process)
    assert done.returncode == 69, done.stderr
    assert f"metrics.{key}: cannot serve metrics on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr and "futures" not in done.stderr


# ----------------------------------------- 12-14: the policy service ---

@pytest.fixture(scope="module")
def service(public_tree):
    directory = public_subdirectory(public_tree, "service")
    with RelaymilterProcess(directory, front_end="policyd", relay=RELAY, store=STORE,
                            policyd={"idle_timeout": 2, "max_connections": 150}) as process:
        yield process


def test_a_request_in_crlf_lines_is_answered(service):
    client = PolicyClient(address_of(service))
    assert client.ask(request("u@remote.test", newline="\r\n")) == \
        [b"action=554 5.7.1 Relay access denied"]
    assert client.ask(request("u@aaa.test", newline="\r\n")) == [b"action=DUNNO"]
    assert client.ask(request("u@aaa.test")) == [b"action=DUNNO"]     # and LF again
    client.close()


def padded(size: int) -> bytes:
    """A valid request of exactly size bytes, its empty line included."""
    base = request("u@aaa.test")
    count, rest = divmod(size - len(base), 4000)
    lengths = [4000 + rest] + [4000] * (count - 1)      # lines well under MAX_LINE
    lines = [b"x%d=" % i for i in range(len(lengths))]
    lines = [line + b"a" * (length - len(line) - 1) + b"\n"
             for line, length in zip(lines, lengths)]
    return b"".join(lines) + base


def test_a_request_over_max_request_bytes_is_refused(service):
    at_limit = padded(MAX_REQUEST)
    assert len(at_limit) == MAX_REQUEST
    client = PolicyClient(address_of(service))
    assert client.ask(at_limit) == [b"action=DUNNO"]
    over = b"x0=" + at_limit
    assert len(over) == MAX_REQUEST + 3
    assert client.ask(over) == [b"action=DEFER_IF_PERMIT Malformed policy request"]
    assert client.stream.readline() == b""      # and the connection is closed
    client.close()
    service.wait_for_log(rf"a request longer than {MAX_REQUEST} bytes")


def test_a_hundred_simultaneous_connects_all_succeed(service):
    clients, errors = [], []
    start = threading.Barrier(100)

    def connect() -> None:
        start.wait()
        try:
            clients.append(PolicyClient(address_of(service)))
        except OSError as error:
            errors.append(error)

    threads = [threading.Thread(target=connect) for _ in range(100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors and len(clients) == 100
    for client in clients:
        client.send(request("u@aaa.test"))
    assert all(client.answer() == [b"action=DUNNO"] for client in clients)
    for client in clients:
        client.close()


def test_an_idle_connection_is_closed_after_idle_timeout(service):
    client = PolicyClient(address_of(service))
    assert client.ask(request("u@aaa.test")) == [b"action=DUNNO"]
    started = time.monotonic()
    assert client.stream.readline() == b""      # closed by the service
    assert 1.5 < time.monotonic() - started < 5
    client.close()


def test_connections_beyond_max_connections_wait_for_a_free_one(public_tree):
    directory = public_subdirectory(public_tree, "limit")
    with RelaymilterProcess(directory, front_end="policyd", relay=RELAY, store=STORE,
                            policyd={"max_connections": 2}) as process:
        busy = [PolicyClient(address_of(process)) for _ in range(2)]
        for client in busy:
            assert client.ask(request("u@aaa.test")) == [b"action=DUNNO"]
        waiting = PolicyClient(address_of(process))     # the connect succeeds
        waiting.send(request("u@aaa.test"))
        readable, _, _ = select.select([waiting.socket], [], [], 1.0)
        assert not readable                             # but nobody answers yet
        process.wait_for_log(r"policy service: 2 connections open, \[policyd\] "
                             r"max_connections; new connections wait")
        busy[0].close()
        assert waiting.answer() == [b"action=DUNNO"]
        waiting.close()
        busy[1].close()


def test_a_thousand_connections_are_held_and_answered_by_a_few_threads(public_tree):
    # Both ends of 1000 connections need descriptors: raise this process's
    # soft limit (the service inherits it), as LimitNOFILE does in the units.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
    assert wanted >= 2200, f"the descriptor limit {hard} is too low for this test"
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    directory = public_subdirectory(public_tree, "thousand")
    clients = []
    try:
        with RelaymilterProcess(directory, front_end="policyd", relay=RELAY, store=STORE,
                                policyd={"max_connections": 1000}) as process:
            clients = [PolicyClient(address_of(process)) for _ in range(1000)]
            for client in clients:          # every connection has a request in flight
                client.send(request("u@aaa.test"))
            assert all(client.answer() == [b"action=DUNNO"] for client in clients)
            status = Path(f"/proc/{process.process.pid}/status").read_text()
            threads = int(status.split("Threads:")[1].split()[0])
            assert threads < 10, status     # no thread per connection
            assert "max_connections" not in process.log_text()
    finally:
        for client in clients:
            client.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
