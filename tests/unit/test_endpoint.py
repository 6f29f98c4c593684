"""endpoint.py: every socket spec and host:port form, accepted or refused, and Postfix's forms."""

import re

import pytest

from relaymilter.endpoint import DNS_PORT, SocketSpec, parse_socket, split_host_port

# ----------------------------------------------------------- socket specs ---


@pytest.mark.parametrize("text, spec", [
    ("inet:8894@127.0.0.1", SocketSpec("inet", host="127.0.0.1", port=8894)),
    ("inet:1@localhost", SocketSpec("inet", host="localhost", port=1)),
    ("inet:65535@mail.example", SocketSpec("inet", host="mail.example", port=65535)),
    ("inet6:8894@[::1]", SocketSpec("inet6", host="::1", port=8894)),
    ("inet6:8894@::1", SocketSpec("inet6", host="::1", port=8894)),
    ("inet6:8895@[2001:db8::25]", SocketSpec("inet6", host="2001:db8::25", port=8895)),
    ("unix:/run/relaymilter/sock", SocketSpec("unix", path="/run/relaymilter/sock")),
    ("local:/run/relaymilter/sock", SocketSpec("unix", path="/run/relaymilter/sock")),
    ("unix:/run/relay milter/odd.sock", SocketSpec("unix", path="/run/relay milter/odd.sock")),
], ids=str)
def test_parse_socket_accepts(text, spec):
    assert parse_socket(text) == spec


@pytest.mark.parametrize("text, reason", [
    ("inet:@127.0.0.1", "is not inet:PORT@HOST, inet6:PORT@[ADDR] or unix:/PATH"),
    ("inet:127.0.0.1", "is not inet:PORT@HOST"),
    ("inet:8894@", "is not inet:PORT@HOST"),
    ("tcp:8894@127.0.0.1", "is not inet:PORT@HOST"),
    ("8894@127.0.0.1", "is not inet:PORT@HOST"),
    ("", "is not inet:PORT@HOST"),
    ("inet:\uff18\uff18\uff19\uff14@127.0.0.1", "is not inet:PORT@HOST"),  # fullwidth digits
    ("inet:0@127.0.0.1", "port 0 out of range 1-65535"),
    ("inet:70000@127.0.0.1", "port 70000 out of range 1-65535"),
    ("unix:run/relaymilter.sock", "unix socket path must be absolute, not 'run/relaymilter.sock'"),
    ("local:relaymilter.sock", "unix socket path must be absolute"),
    ("unix:", "unix socket path must be absolute, not ''"),
    ("inet6:8894@127.0.0.1", "'127.0.0.1' is not an IPv6 address"),
    ("inet6:8894@[mail.example]", "'[mail.example]' is not an IPv6 address"),
    ("inet6:8894@[::1", "'[::1' is not an IPv6 address"),
    ("inet:8894@bad host", "'bad host' is not a host name or IPv4 address"),
    ("inet:8894@[::1]", "is not a host name or IPv4 address"),
], ids=str)
def test_parse_socket_refuses(text, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        parse_socket(text)


@pytest.mark.parametrize("text, postfix", [
    ("inet:8894@127.0.0.1", "inet:127.0.0.1:8894"),
    ("inet:8894@localhost", "inet:localhost:8894"),
    ("inet6:8894@[::1]", "inet:[::1]:8894"),
    ("inet6:8894@::1", "inet:[::1]:8894"),          # main.cf needs the brackets
    ("unix:/run/relaymilter/sock", "unix:/run/relaymilter/sock"),
    ("local:/run/relaymilter/sock", "unix:/run/relaymilter/sock"),
], ids=str)
def test_postfix_form(text, postfix):
    assert parse_socket(text).postfix == postfix


# -------------------------------------------------------------- host:port ---

@pytest.mark.parametrize("text, address", [
    ("127.0.0.1:9894", ("127.0.0.1", 9894)),
    ("0.0.0.0:80", ("0.0.0.0", 80)),
    ("[::1]:9894", ("::1", 9894)),
    ("[2001:DB8::1]:65535", ("2001:db8::1", 65535)),       # the address as it is compared
    (" 127.0.0.1:9894 ", ("127.0.0.1", 9894)),
])
def test_host_and_port(text, address):
    assert split_host_port(text) == address
    assert split_host_port(text, default_port=DNS_PORT) == address


@pytest.mark.parametrize("text, reason", [
    ("9894", "'9894' is not IPv4:PORT or [IPv6]:PORT"),
    ("127.0.0.1", "is not IPv4:PORT or [IPv6]:PORT"),
    ("::1", "is not IPv4:PORT or [IPv6]:PORT"),
    ("::1:9894", "is not IPv4:PORT or [IPv6]:PORT"),
    ("[::1]", "'[::1]' is not [IPv6]:PORT"),
    ("[::1", "is not [IPv6]:PORT"),
    ("[::1]9894", "is not [IPv6]:PORT"),
    ("localhost:9894", "'localhost:9894': 'localhost' is not an IP address"),
    ("[127.0.0.1]:9894", "write an IPv6 address in brackets, [ADDR]:PORT"),
    ("127.0.0.1:0", "'127.0.0.1:0': port '0' is not 1-65535"),
    ("127.0.0.1:65536", "port '65536' is not 1-65535"),
    ("127.0.0.1:http", "port 'http' is not 1-65535"),
    ("127.0.0.1:", "port '' is not 1-65535"),
    ("127.0.0.1:\uff18\uff10", "is not 1-65535"),               # fullwidth digits
], ids=str)
def test_port_required_refuses(text, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        split_host_port(text)


@pytest.mark.parametrize("text, expected", [
    ("192.0.2.1", ("192.0.2.1", 53)),
    ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    ("::1", ("::1", 53)),
    ("2001:db8::53", ("2001:db8::53", 53)),
    ("[::1]:5353", ("::1", 5353)),
    ("[2001:db8::53]", ("2001:db8::53", 53)),
])
def test_port_defaulted(text, expected):
    assert split_host_port(text, default_port=DNS_PORT) == expected


@pytest.mark.parametrize("text, reason", [
    ("ns.example", "'ns.example': 'ns.example' is not an IP address"),
    ("127.0.0.1:0", "port '0' is not 1-65535"),
    ("127.0.0.1:65536", "port '65536' is not 1-65535"),
    ("127.0.0.1:x", "port 'x' is not 1-65535"),
    ("[::1", "'[::1' is not [IPv6]:PORT"),
    ("[::1]5353", "is not [IPv6]:PORT"),
    ("[::1]:", "port '' is not 1-65535"),
    ("", "'' is not an IP address"),
], ids=str)
def test_port_defaulted_refuses(text, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        split_host_port(text, default_port=DNS_PORT)
