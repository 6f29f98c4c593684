"""policyd.PolicyServer on a unix socket: many requests per connection, bad input."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time

import pytest

from relaymilter.config import parse_config
from relaymilter.engine import Engine
from relaymilter.runtime import Runtime
from relaymilter import policyd
from relaymilter.policyd import PolicyServer
from relaymilter.socketclaim import SocketBusy, claim_socket


@pytest.fixture
def server(tmp_path):
    config = parse_config({"relay": {"local_domains": ["local.test"],
                                     "trusted_networks": ["198.51.100.0/24"]},
                           "store": {"path": ""}})
    live = Runtime.start(config)
    policy_server = PolicyServer(Engine(live), f"unix:{tmp_path}/policyd.sock", 0o600)
    thread = threading.Thread(target=policy_server.serve_forever, daemon=True)
    thread.start()
    yield policy_server
    policy_server.shutdown()
    thread.join(5)
    live.stop()


class Client:
    def __init__(self, path):
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.socket.connect(path)
        self.stream = self.socket.makefile("rwb")

    def ask(self, raw: bytes) -> list[bytes]:
        self.stream.write(raw)
        self.stream.flush()
        lines = []
        while True:
            line = self.stream.readline()
            if line in (b"\n", b""):
                return lines
            lines.append(line.rstrip(b"\n"))


def rcpt(recipient: str, client: str = "192.0.2.9", **more: str) -> bytes:
    attributes = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
                  "client_address": client, "sender": "s@sender.test",
                  "recipient": recipient, **more}
    return "".join(f"{key}={value}\n" for key, value in attributes.items()).encode() + b"\n"


def test_one_connection_answers_many_requests(server):
    client = Client(server.address)
    assert client.ask(rcpt("user@local.test")) == [b"action=DUNNO"]
    assert client.ask(rcpt("user@remote.test")) == [b"action=554 5.7.1 Relay access denied"]
    assert client.ask(rcpt("user@remote.test", client="198.51.100.7")) == [b"action=OK"]
    assert client.ask(rcpt("user@remote.test", sasl_username="alice")) == [b"action=OK"]


def test_non_utf8_recipient_is_bad_syntax(server):
    client = Client(server.address)
    raw = rcpt("PLACEHOLDER").replace(b"PLACEHOLDER", b"us\xffer@local.test")
    assert client.ask(raw) == [b"action=501 5.1.3 Bad recipient address syntax"]


def test_other_protocol_states_are_not_decided(server):
    client = Client(server.address)
    assert client.ask(rcpt("user@remote.test", protocol_state="DATA")) == [b"action=DUNNO"]
    assert client.ask(b"request=other\n\n") == [b"action=DUNNO"]


def test_malformed_request_is_deferred_and_the_connection_closed(server):
    client = Client(server.address)
    assert client.ask(b"garbage\n\n") == [b"action=DEFER_IF_PERMIT Malformed policy request"]
    assert client.stream.readline() == b""          # closed by the server
    assert Client(server.address).ask(rcpt("user@local.test")) == [b"action=DUNNO"]


def test_concurrent_connections_each_get_their_answers(server):
    answers = []

    def work(number: int) -> None:
        client = Client(server.address)
        got = [client.ask(rcpt(f"u{number}@remote.test")) for _ in range(20)]
        answers.append(all(line[0].startswith(b"action=554") for line in got))

    threads = [threading.Thread(target=work, args=(number,)) for number in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert answers == [True] * 20


def test_socket_mode_is_applied(server):
    assert stat.S_IMODE(os.stat(server.address).st_mode) == 0o600


# ------------------------------------------------ the socket, claimed ---

def test_a_second_server_on_a_live_unix_socket_is_refused_and_leaves_it(server):
    inode = os.stat(server.address).st_ino
    with pytest.raises(SocketBusy, match=f"cannot listen on unix:{server.address}: another "):
        PolicyServer(server.engine, f"unix:{server.address}")
    assert os.stat(server.address).st_ino == inode
    assert Client(server.address).ask(rcpt("user@local.test")) == [b"action=DUNNO"]


def test_a_stale_unix_socket_file_is_removed(tmp_path):
    path = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    claim_socket(f"unix:{path}")
    assert not path.exists()


def test_a_file_that_is_not_a_socket_is_never_removed(tmp_path):
    path = tmp_path / "precious"
    path.write_text("data\n")
    with pytest.raises(SocketBusy, match="exists and is not a socket"):
        claim_socket(f"unix:{path}")
    assert path.read_text() == "data\n"


def test_a_tcp_address_in_use_is_refused_naming_it():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SocketBusy, match=f"cannot listen on inet:{port}@127.0.0.1: the "
                                             "address is in use"):
            claim_socket(f"inet:{port}@127.0.0.1")
    claim_socket(f"inet:{port}@127.0.0.1")      # free again


# -------------------------------------------------- connection limits ---

def test_the_listen_backlog_takes_a_burst_of_connects():
    assert policyd.BACKLOG >= 128     # socketserver's own was 5


def test_an_idle_connection_is_closed(tmp_path, server):
    quick = PolicyServer(server.engine, f"unix:{tmp_path}/quick.sock", 0o600, idle_timeout=0.3)
    thread = threading.Thread(target=quick.serve_forever, daemon=True)
    thread.start()
    try:
        client = Client(quick.address)
        assert client.ask(rcpt("user@local.test")) == [b"action=DUNNO"]
        assert client.stream.readline() == b""
    finally:
        quick.shutdown()
        thread.join(5)


def test_a_client_that_never_reads_its_answers_is_no_longer_read(server):
    # Pipelined requests, answers never read: once the answers back up, the
    # service stops reading, so what it holds for this client stays bounded.
    one = b"request=smtpd_access_policy\nprotocol_state=END-OF-MESSAGE\n\n"
    stream = memoryview(one * 200_000)      # about 12 MB
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(server.address)
    client.setblocking(False)
    sent, blocked_since = 0, None
    while sent < len(stream):
        try:
            sent += client.send(stream[sent:sent + 65536])
            blocked_since = None
        except BlockingIOError:
            blocked_since = blocked_since or time.monotonic()
            if time.monotonic() - blocked_since > 1.0:     # nobody reads any more
                break
            time.sleep(0.01)
    assert sent < len(stream)           # the service stopped reading
    # Reading the answers lets it go on: every complete request is answered.
    client.setblocking(True)
    client.settimeout(10)
    expected = sent // len(one)
    answers = b""
    while answers.count(b"action=DUNNO\n\n") < expected:
        chunk = client.recv(1 << 20)
        assert chunk
        answers += chunk
    client.close()
