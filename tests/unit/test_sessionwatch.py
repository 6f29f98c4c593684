"""SessionWatch on real sockets of this process, with a clock the test moves.

The watcher finds connections through /proc/self/fd, so these sockets are
real: a listener, the connections it accepted (what libmilter would hold)
and the client ends, which must be left alone.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from relaymilter.endpoint import SocketSpec
from relaymilter.recorder import Recorder
from relaymilter.sessionwatch import SessionWatch


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Counted(Recorder):
    def __init__(self) -> None:
        self.closed = 0

    def milter_session_closed(self) -> None:
        self.closed += 1


class Listener:
    """A listening socket and the pairs (accepted, client) made on it."""

    def __init__(self, family: int, address: object) -> None:
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind(address)
        self.sock.listen(8)
        self.pairs: list[tuple[socket.socket, socket.socket]] = []

    def connect(self) -> tuple[socket.socket, socket.socket]:
        client = socket.socket(self.sock.family, socket.SOCK_STREAM)
        client.connect(self.sock.getsockname())
        client.settimeout(2)
        accepted, _ = self.sock.accept()
        self.pairs.append((accepted, client))
        return accepted, client

    def close(self) -> None:
        for accepted, client in self.pairs:
            accepted.close()
            client.close()
        self.sock.close()


def shut(client: socket.socket) -> bool:
    """Was the other end of client shut down? (recv sees the end at once)"""
    client.settimeout(0.2)
    try:
        return client.recv(1) == b""
    except TimeoutError:
        return False


@pytest.fixture
def unix_listener(tmp_path: Path) -> Iterator[Listener]:
    listener = Listener(socket.AF_UNIX, str(tmp_path / "milter.sock"))
    yield listener
    listener.close()


def watch_for(listener: Listener, limit: float = 60) -> tuple[SessionWatch, Clock, Counted]:
    clock, counted = Clock(), Counted()
    address = listener.sock.getsockname()
    spec = SocketSpec("unix", path=address) if listener.sock.family == socket.AF_UNIX \
        else SocketSpec("inet", host=address[0], port=address[1])
    return SessionWatch(spec, limit, counted, clock), clock, counted


def test_a_connection_is_shut_down_once_it_has_lasted_the_limit(unix_listener):
    watch, clock, counted = watch_for(unix_listener, limit=60)
    _, client = unix_listener.connect()
    assert watch.sweep() == 0
    clock.now += 59
    assert watch.sweep() == 0 and not shut(client)
    clock.now += 1
    assert watch.sweep() == 1
    assert shut(client)
    assert counted.closed == 1
    assert watch.sweep() == 0       # libmilter has not closed its end yet: not again


def test_age_counts_from_when_the_connection_was_first_seen(unix_listener):
    watch, clock, _ = watch_for(unix_listener, limit=60)
    _, old = unix_listener.connect()
    watch.sweep()
    clock.now += 40
    _, new = unix_listener.connect()
    watch.sweep()
    clock.now += 20
    assert watch.sweep() == 1
    assert shut(old) and not shut(new)


def test_the_listener_and_other_sockets_are_never_touched(unix_listener, tmp_path):
    watch, clock, counted = watch_for(unix_listener, limit=60)
    other = Listener(socket.AF_UNIX, str(tmp_path / "other.sock"))
    try:
        _, other_client = other.connect()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        watch.sweep()
        clock.now += 3600
        assert watch.sweep() == 0 and counted.closed == 0
        assert not shut(other_client)
        unix_listener.sock.settimeout(0.2)
        _, client = unix_listener.connect()     # the listener still accepts
        assert not shut(client)
        udp.close()
    finally:
        other.close()


def test_a_reused_descriptor_is_a_new_connection(unix_listener):
    watch, clock, _ = watch_for(unix_listener, limit=60)
    number = 900        # both connections are moved to this descriptor number in turn

    def accepted_at_number() -> socket.socket:
        accepted, client = unix_listener.connect()
        os.dup2(accepted.fileno(), number)
        accepted.close()
        return client

    accepted_at_number()
    watch.sweep()
    clock.now += 50
    os.close(number)
    client = accepted_at_number()
    watch.sweep()
    clock.now += 50
    assert watch.sweep() == 0 and not shut(client)
    os.close(number)


def test_inet_connections_are_known_by_the_listening_port():
    listener = Listener(socket.AF_INET, ("127.0.0.1", 0))
    outgoing_listener = Listener(socket.AF_INET, ("127.0.0.1", 0))
    try:
        watch, clock, _ = watch_for(listener, limit=60)
        accepted, client = listener.connect()
        # This process's own outgoing connection elsewhere: an ephemeral port.
        _, mine = outgoing_listener.connect()
        watch.sweep()
        clock.now += 60
        assert watch.sweep() == 1
        assert shut(client)
        assert not shut(mine)
    finally:
        listener.close()
        outgoing_listener.close()
