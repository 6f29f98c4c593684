"""milter_client - the MTA side of the milter protocol, a few packets of it.

NAME
    milter_client - talk to a real milter socket the way Postfix does

SYNOPSIS
    with MilterClient.unix(path) as mta:
        mta.negotiate()
        mta.connect(b"client.example", "192.0.2.9", macros={"j": "mx.test"})
        mta.helo(b"\\xff\\xfe")
        mta.mail(b"<s@example.org>", macros={"{auth_authen}": "alice"})
        mta.rcpt(b"<u@remote.example>")    # -> ("r", b"") / ("y", b"554 ...") / ("c", b"")
        mta.abort(); mta.quit_nc()

DESCRIPTION
    A packet is a 4-byte big-endian length, a command byte and its payload.
    Every argument is bytes, written as given: the tests send what a hostile
    client could make an MTA pass on (8-bit HELO, control characters).
    Stages the milter negotiated as "no reply" (SMFIP_NR_*) are not waited
    for; the others return (response letter, payload). Written for these
    tests instead of the miltertest package: a dozen lines, no dependency.
"""

from __future__ import annotations

import socket
import struct

VERSION = 6
ALL_ACTIONS = 0x1FF             # SMFIF_* up to SETSYMLIST
ALL_PROTOCOL = 0x1FFFFF         # every SMFIP_NO*/NR* bit the milter may choose
NR_BITS = {"C": 0x1000, "H": 0x2000, "M": 0x4000, "R": 0x8000}


class MilterClient:
    """One milter connection, MTA side."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)
        self.protocol = 0

    @classmethod
    def unix(cls, path: str, timeout: float = 10.0) -> MilterClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        return cls(sock, timeout)

    # ---------------------------------------------------------- packets ---

    def send(self, command: bytes, payload: bytes = b"") -> None:
        self.sock.sendall(struct.pack("!I", len(payload) + 1) + command + payload)

    def receive(self) -> tuple[str, bytes]:
        header = self._exactly(4)
        length = struct.unpack("!I", header)[0]
        body = self._exactly(length)
        return body[:1].decode("ascii"), body[1:]

    def _exactly(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise ConnectionError("the milter closed the connection")
            data += chunk
        return data

    def closed_by_peer(self, timeout: float) -> bool:
        """True when the milter closes the connection within timeout."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    # ---------------------------------------------------------- commands ---

    def negotiate(self) -> tuple[int, int]:
        self.send(b"O", struct.pack("!III", VERSION, ALL_ACTIONS, ALL_PROTOCOL))
        letter, payload = self.receive()
        assert letter == "O", (letter, payload)
        _, actions, self.protocol = struct.unpack("!III", payload[:12])
        return actions, self.protocol

    def macros(self, stage: str, values: dict[str, str | bytes]) -> None:
        payload = stage.encode("ascii")
        for name, value in values.items():
            raw = value if isinstance(value, bytes) else value.encode("utf-8")
            payload += name.encode("ascii") + b"\0" + raw + b"\0"
        self.send(b"D", payload)

    def connect(self, hostname: bytes, address: str, port: int = 25,
                macros: dict[str, str | bytes] | None = None) -> tuple[str, bytes] | None:
        if macros:
            self.macros("C", macros)
        family = b"6" if ":" in address else b"4"
        payload = hostname + b"\0" + family + struct.pack("!H", port) + address.encode() + b"\0"
        self.send(b"C", payload)
        return self._reply("C")

    def helo(self, name: bytes, macros: dict[str, str | bytes] | None = None):
        if macros:
            self.macros("H", macros)
        self.send(b"H", name + b"\0")
        return self._reply("H")

    def mail(self, sender: bytes, macros: dict[str, str | bytes] | None = None):
        if macros:
            self.macros("M", macros)
        self.send(b"M", sender + b"\0")
        return self._reply("M")

    def rcpt(self, recipient: bytes, macros: dict[str, str | bytes] | None = None):
        if macros:
            self.macros("R", macros)
        self.send(b"R", recipient + b"\0")
        return self._reply("R")

    def abort(self) -> None:
        self.send(b"A")

    def quit_nc(self) -> None:
        """QUIT_NC: end this session, keep the connection for the next one."""
        self.send(b"K")

    def quit(self) -> None:
        self.send(b"Q")

    def _reply(self, stage: str) -> tuple[str, bytes] | None:
        if self.protocol & NR_BITS[stage]:
            return None
        return self.receive()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> MilterClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
