"""policy_client - a Postfix policy service client, as smtpd is one.

NAME
    policy_client - PolicyClient and request(): speak the policy protocol to a real service

SYNOPSIS
    client = PolicyClient("/path/policyd.sock")        # or ("127.0.0.1", port)
    client.ask(request("user@remote.test", client="192.0.2.9", sasl_username="alice"))
    # [b"action=554 5.7.1 ..."]

DESCRIPTION
    request() builds one RCPT-stage request (name=value lines and the
    empty line; newline="\\r\\n" for a sloppy client); PolicyClient keeps
    one connection, as smtpd does, and reads each answer up to its empty
    line.
"""

from __future__ import annotations

import socket


def request(recipient: str, client: str = "192.0.2.9", newline: str = "\n",
            sasl_username: str = "", sender: str = "s@sender.test",
            instance: str = "") -> bytes:
    attributes = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
                  "client_address": client, "sender": sender,
                  "recipient": recipient}
    if sasl_username:
        attributes["sasl_username"] = sasl_username
    if instance:
        attributes["instance"] = instance
    return "".join(f"{key}={value}{newline}" for key, value in attributes.items()).encode() \
        + newline.encode()


class PolicyClient:
    """One connection to the policy service, as smtpd holds one."""

    def __init__(self, address, timeout: float = 10.0) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.settimeout(timeout)
        self.socket.connect(address)
        self.stream = self.socket.makefile("rwb")

    def send(self, raw: bytes) -> None:
        self.stream.write(raw)
        self.stream.flush()

    def answer(self) -> list[bytes]:
        lines = []
        while True:
            line = self.stream.readline()
            if not line.strip():        # the empty line, or the end of the stream
                return lines
            lines.append(line.rstrip(b"\r\n"))

    def ask(self, raw: bytes) -> list[bytes]:
        self.send(raw)
        return self.answer()

    def close(self) -> None:
        self.stream.close()
        self.socket.close()
