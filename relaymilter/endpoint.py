"""endpoint - where relaymilter listens or asks: socket specs and host:port, parsed once.

NAME
    endpoint - parse_socket() for libmilter socket specs, split_host_port() for IP:PORT

SYNOPSIS
    spec = parse_socket("inet6:8894@[::1]")     # SocketSpec(kind="inet6", host="::1", port=8894)
    spec.postfix                                # "inet:[::1]:8894", for main.cf
    parse_socket("unix:/run/relaymilter/milter.sock").path
    split_host_port("[::1]:9894")               # ("::1", 9894); the port is required
    split_host_port("192.0.2.53", default_port=DNS_PORT)    # ("192.0.2.53", 53)

DESCRIPTION
    Pure: nothing here opens a socket. Every place that reads one of these
    forms ([milter] socket, [policyd] socket, [metrics] listen, [dnsbl]
    nameservers, the MTA lines `check-config` prints, the policy service's
    listener) goes through these two parsers, so a form the config check
    accepts is a form the listener can open. Both raise ValueError with a
    reason that quotes what was written; config.py puts file and key in
    front of it.

    Socket specs are libmilter's: unix:/PATH (local:/PATH is libmilter's
    other spelling of it), inet:PORT@HOST with a host name or an IPv4
    address, inet6:PORT@[ADDR] (brackets optional). A unix path must be
    absolute; a port is ASCII digits, 1-65535 (int() alone would take
    fullwidth digits, which libmilter refuses only when it opens the socket).

    host:port is "IPv4:PORT" or "[IPv6]:PORT", IP addresses only: a name
    would need DNS before there is any. With default_port, the port may be
    left out, and then an IPv6 address may also be written bare ("::1"),
    as [dnsbl] nameservers allows. Surrounding white space is ignored.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

DNS_PORT = 53       # a nameserver's port when none is written

_INET_SOCKET = re.compile(r"(?P<family>inet6?):(?P<port>[0-9]+)@(?P<host>.+)\Z")
_HOST_NAME = re.compile(r"[A-Za-z0-9.-]+\Z")


@dataclass(frozen=True)
class SocketSpec:
    """A parsed socket spec: kind "unix" (path) or "inet"/"inet6" (host, port).

    host is as written, an IPv6 address without its brackets.
    """

    kind: str
    path: str | None = None
    host: str | None = None
    port: int | None = None

    @property
    def postfix(self) -> str:
        """The form Postfix's main.cf takes: unix:/PATH, inet:HOST:PORT, inet:[ADDR]:PORT."""
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.kind == "inet6" else self.host
        return f"inet:{host}:{self.port}"


def parse_socket(text: str) -> SocketSpec:
    """libmilter's socket syntax -> SocketSpec; ValueError saying what is wrong."""
    if text.startswith(("unix:", "local:")):
        path = text.split(":", 1)[1]
        if not path.startswith("/"):
            raise ValueError(f"unix socket path must be absolute, not {path!r}")
        return SocketSpec("unix", path=path)
    match = _INET_SOCKET.match(text)
    if not match:
        raise ValueError(f"{text!r} is not inet:PORT@HOST, inet6:PORT@[ADDR] or unix:/PATH")
    port = int(match["port"])           # ASCII digits: the pattern says [0-9], not \d
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range 1-65535")
    host = match["host"]
    if match["family"] == "inet6":
        bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            ipaddress.IPv6Address(bare)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
        return SocketSpec("inet6", host=bare, port=port)
    if not _HOST_NAME.match(host):
        raise ValueError(f"{host!r} is not a host name or IPv4 address")
    return SocketSpec("inet", host=host, port=port)


def split_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """"IPv4:PORT" / "[IPv6]:PORT" -> (ip, port); see the module docstring.

    Without default_port the port is required ([metrics] listen); with it,
    "IP" and a bare IPv6 address are accepted too ([dnsbl] nameservers).
    """
    entry = text.strip()
    port_text: str | None
    if entry.startswith("["):
        host, bracket, rest = entry[1:].partition("]")
        if not bracket or not (rest.startswith(":") or (not rest and default_port is not None)):
            raise ValueError(f"{text!r} is not [IPv6]:PORT")
        port_text = rest[1:] if rest else None
        version = 6
    else:
        host, colon, port_text = entry.rpartition(":")
        if not colon or ":" in host:        # no port, or a bare IPv6 address
            if default_port is None:
                raise ValueError(f"{text!r} is not IPv4:PORT or [IPv6]:PORT")
            host, port_text = entry, None
        version = 4 if port_text is not None else None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    if version is not None and address.version != version:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, [ADDR]:PORT")
    if port_text is None:
        return str(address), default_port
    if not (port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= 65535):
        raise ValueError(f"{text!r}: port {port_text!r} is not 1-65535")
    return str(address), int(port_text)
