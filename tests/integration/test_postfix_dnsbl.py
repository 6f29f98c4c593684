"""DNSBL and DNSWL end to end: SMTP client -> Postfix -> relaymilter -> rbldnsd.

XCLIENT ADDR= plays clients from TEST-NET addresses; rbldnsd on a loopback
port serves the lists, and its query log counts what reached it. The
milter's resolver is pointed at rbldnsd only: nothing leaves the machine.

Weights (threshold 2): BL lists alone (2); HALF1 and HALF2 list only
together (1 + 1); WL is an allowlist (-2); ERR answers an error code.

Each scenario that takes the front_end fixture (conftest) runs with
relaymilter as Postfix's milter and as its policy service, expecting the
same SMTP codes. The milter starts the lookups at connect, the policy
service at the first RCPT; both reuse them for the message's recipients.
"""

from __future__ import annotations

import concurrent.futures
import re
import subprocess
import time
from typing import Iterator

import pytest

from postfix_instance import PostfixInstance
from rbldnsd import Rbldnsd, RbldnsdZone
from relaymilter_process import RELAYMILTER, RelaymilterProcess, public_subdirectory
from slow_dns import SlowDnsServer
from smtp_dialog import SmtpDialog, rcpt_reply

TTL = 2
LISTED = "192.0.2.20"           # on BL, with a TXT record
HALF_LISTED = "192.0.2.21"      # on HALF1 only: score 1 < 2
DOUBLY_LISTED = "192.0.2.22"    # on HALF1 and HALF2: score 2
ALLOWED = "192.0.2.30"          # on BL and WL: score 0
ERROR_CODE = "192.0.2.40"       # ERR answers 127.255.255.254 (zone error)
CLEAN = "192.0.2.99"
LISTED_V6 = "2001:db8::20"
CLEAN_V6 = "2001:db8::99"
TRUSTED = "198.51.100.7"        # a trusted network, listed on BL all the same
# 100 clients for the concurrency test: the even ones are listed.
CROWD = [f"203.0.113.{number}" for number in range(1, 101)]

ZONES = [
    RbldnsdZone("bl.test", "ip4set", [
        ":127.0.0.2:Listed for spam, see http://bl.test/$",
        "127.0.0.2", LISTED, ALLOWED, TRUSTED, *CROWD[1::2]]),
    RbldnsdZone("bl.test", "ip6trie", [":127.0.0.2:Listed6, see http://bl.test/$", LISTED_V6]),
    RbldnsdZone("half1.test", "ip4set", [":127.0.0.2:", "127.0.0.2", HALF_LISTED, DOUBLY_LISTED]),
    RbldnsdZone("half2.test", "ip4set", [":127.0.0.2:", "127.0.0.2", DOUBLY_LISTED]),
    RbldnsdZone("wl.test", "ip4set", [":127.0.10.2:", "127.0.0.2", ALLOWED]),
    RbldnsdZone("err.test", "ip4set", ["127.0.0.2 :127.0.0.2:",
                                       f"{ERROR_CODE} :127.255.255.254:"]),
]
ZONE_CONFIG = [
    {"name": "bl.test", "display_name": "BL", "weight": 2},
    {"name": "half1.test", "display_name": "HALF1", "weight": 1},
    {"name": "half2.test", "display_name": "HALF2", "weight": 1},
    {"name": "wl.test", "display_name": "WL", "weight": -2},
    {"name": "err.test", "display_name": "ERR", "weight": 2},
]
RELAY = {"local_domains": ["local.test"], "trusted_networks": ["198.51.100.0/24"]}


def dnsbl_section(nameserver: str, **overrides) -> dict:
    return {"nameservers": [nameserver], "timeout": 2.0, "threshold": 2,
            "zone": ZONE_CONFIG, **overrides}


@pytest.fixture(scope="module")
def rbldnsd(rbldnsd_installed) -> Iterator[Rbldnsd]:
    server = Rbldnsd(ZONES, ttl=TTL)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gate(postfix_installed, rbldnsd, public_tree, front_end):
    """relaymilter (5 zones on rbldnsd, threshold 2) behind one Postfix."""
    service = RelaymilterProcess(public_subdirectory(public_tree, f"gate-{front_end}"),
                                 front_end=front_end, relay=RELAY,
                                 dnsbl=dnsbl_section(rbldnsd.nameserver),
                                 cache={"min_ttl": 0, "max_ttl": 3600})
    service.start()
    postfix = PostfixInstance(**service.postfix_kwargs())
    try:
        postfix.start()
        yield service, postfix
    finally:
        postfix.stop()
        service.kill()


def test_listed_ipv4_client_gets_554_naming_the_list_and_its_txt(gate):
    service, postfix = gate
    reply = rcpt_reply(postfix.port, "<user@local.test>", addr=LISTED)
    assert reply.code == 554
    assert reply.text == service.reply_text(
        f"5.7.1 Service unavailable; Client host [{LISTED}] blocked using BL; "
        f"Listed for spam, see http://bl.test/{LISTED}", "<user@local.test>")
    service.wait_for_log(rf"NOQUEUE: reject: RCPT from unknown\[{LISTED}\]: 554 5\.7\.1 "
                        r"Service unavailable; .* reason=dnsbl$")


def test_listed_ipv6_client_gets_554(gate):
    service, postfix = gate
    reply = rcpt_reply(postfix.port, "<user@local.test>", addr=f"IPV6:{LISTED_V6}")
    assert reply.code == 554
    assert f"Client host [{LISTED_V6}] blocked using BL; Listed6" in reply.text


@pytest.mark.parametrize("client", [CLEAN, f"IPV6:{CLEAN_V6}"])
def test_unlisted_client_passes(gate, client):
    service, postfix = gate
    assert rcpt_reply(postfix.port, "<user@local.test>", addr=client).code == 250


def test_allowlist_outweighs_a_listing(gate):
    service, postfix = gate
    assert rcpt_reply(postfix.port, "<user@local.test>", addr=ALLOWED).code == 250


def test_error_code_answer_does_not_reject_and_is_logged(gate):
    service, postfix = gate
    assert rcpt_reply(postfix.port, "<user@local.test>", addr=ERROR_CODE).code == 250
    service.wait_for_log(r"dnsbl ERR: .*127\.255\.255\.254")


def test_threshold_needs_both_half_weight_lists(gate):
    service, postfix = gate
    assert rcpt_reply(postfix.port, "<user@local.test>", addr=HALF_LISTED).code == 250
    reply = rcpt_reply(postfix.port, "<user@local.test>", addr=DOUBLY_LISTED)
    assert reply.code == 554 and "blocked using HALF1" in reply.text


@pytest.mark.parametrize("recipient", ["<postmaster>", "<postmaster@local.test>"])
def test_postmaster_stays_reachable_for_a_listed_client(gate, recipient):
    service, postfix = gate
    assert rcpt_reply(postfix.port, recipient, addr=LISTED).code == 250


def test_trusted_and_authenticated_clients_are_not_refused_for_a_listing(gate):
    service, postfix = gate
    assert rcpt_reply(postfix.port, "<user@local.test>", addr=TRUSTED).code == 250
    assert rcpt_reply(postfix.port, "<user@remote.test>", addr=LISTED, login="alice").code == 250


def test_listed_client_relay_attempt_is_refused_as_relay(gate):
    service, postfix = gate
    reply = rcpt_reply(postfix.port, "<user@remote.test>", addr=LISTED)
    assert reply.code == 554 and reply.text.endswith("Relay access denied")


def test_one_listed_session_refuses_every_local_recipient(gate):
    service, postfix = gate
    with SmtpDialog(postfix.port) as smtp:
        smtp.ehlo()
        smtp.xclient(addr=LISTED)
        smtp.mail_from("<sender@sender.test>")
        assert [smtp.rcpt_to(f"<user{n}@local.test>").code for n in range(3)] == [554] * 3
        assert smtp.rcpt_to("<postmaster@local.test>").code == 250


def test_twenty_connections_from_one_address_cost_one_query_per_zone(gate, rbldnsd):
    service, postfix = gate
    # One address per front end: the other front end's module run asked too.
    client = "192.0.2.77" if service.front_end == "milter" else "192.0.2.78"
    names = [f"{client.split('.')[3]}.2.0.192.{zone['name']}" for zone in ZONE_CONFIG]
    before = {name: rbldnsd.query_count(name=name, qtype="A") for name in names}
    assert before == {name: 0 for name in names}
    for _ in range(20):
        assert rcpt_reply(postfix.port, "<user@local.test>", addr=client).code == 250
    assert {name: rbldnsd.query_count(name=name, qtype="A") for name in names} == \
        {name: 1 for name in names}
    time.sleep(TTL + 0.2)      # NXDOMAIN carries the SOA's negative TTL: 2 s
    for _ in range(5):
        assert rcpt_reply(postfix.port, "<user@local.test>", addr=client).code == 250
    assert {name: rbldnsd.query_count(name=name, qtype="A") for name in names} == \
        {name: 2 for name in names}


def test_hundred_concurrent_connections_from_hundred_addresses(gate):
    service, postfix = gate

    def verdict(address: str) -> tuple[str, int]:
        return address, rcpt_reply(postfix.port, "<user@local.test>", addr=address).code

    with concurrent.futures.ThreadPoolExecutor(max_workers=100) as pool:
        results = dict(pool.map(verdict, CROWD))
    expected = {address: 554 if index % 2 else 250 for index, address in enumerate(CROWD)}
    assert results == expected
    assert "Traceback" not in service.log_text()


def test_lookup_command_prints_each_zone_and_the_verdict(gate):
    service, postfix = gate
    output = subprocess.run([RELAYMILTER, "lookup", LISTED, "-c", str(service.config_path)],
                            capture_output=True, text=True, timeout=30)
    assert output.returncode == 2, output.stderr        # listed
    lines = output.stdout.splitlines()
    assert lines[0] == (f"{LISTED}: LISTED, blocked using BL; Listed for spam, see "
                        f"http://bl.test/{LISTED} (score 2, threshold 2)")
    bl = next(line for line in lines if line.split()[0] == "BL")
    assert re.search(r"BL\s+2\s+listed\s+127\.0\.0\.2\s+2\s+dns\s+\"Listed for spam", bl)
    err = next(line for line in lines if line.split()[0] == "ERR")
    assert re.search(r"ERR\s+2\s+not-listed\s+NXDOMAIN\s+2\s+dns$", err)


# ------------------------------------------------------ faults and stages ---

def _timed_rcpt(port: int, address: str) -> tuple[int, float]:
    """RCPT reply code and seconds from XCLIENT (the milter's connect) to it."""
    with SmtpDialog(port) as smtp:
        smtp.ehlo()
        started = time.monotonic()
        assert smtp.xclient(addr=address).code == 220
        smtp.mail_from("<sender@sender.test>")
        code = smtp.rcpt_to("<user@local.test>").code
        return code, time.monotonic() - started


@pytest.mark.parametrize("fault", ["nameserver-down", "answers-late", "servfail"])
def test_dns_fault_lets_mail_through_within_the_timeout(postfix_factory, public_tree, fault,
                                                        front_end):
    timeout = 1.0
    if fault == "nameserver-down":
        server, nameserver = None, "127.0.0.1:9"     # discard port: nothing answers
    else:
        server = SlowDnsServer(delay=3.0 if fault == "answers-late" else 0.0,
                               rcode="SERVFAIL" if fault == "servfail" else "NOERROR")
        server.start()
        nameserver = server.nameserver
    try:
        service = RelaymilterProcess(
            public_subdirectory(public_tree, f"fault-{fault}-{front_end}"),
            front_end=front_end, relay=RELAY,
            dnsbl={"nameservers": [nameserver], "timeout": timeout,
                   "zone": [{"name": "bl.test", "display_name": "BL"}]})
        with service:
            postfix = postfix_factory(**service.postfix_kwargs())
            code, seconds = _timed_rcpt(postfix.port, "192.0.2.55")
            assert code == 250
            assert seconds < timeout + 0.5
            service.wait_for_log(r"dnsbl BL: .*counted as not listed")
    finally:
        if server is not None:
            server.stop()


def test_zone_that_lists_the_world_is_disabled_by_the_health_check(postfix_factory, public_tree,
                                                                   rbldnsd_installed, front_end):
    world = Rbldnsd([RbldnsdZone("world.test", "ip4trie", ["0.0.0.0/0"])], ttl=TTL)
    with world:
        service = RelaymilterProcess(
            public_subdirectory(public_tree, f"world-{front_end}"), front_end=front_end,
            relay=RELAY, dnsbl={"nameservers": [world.nameserver],
                                "zone": [{"name": "world.test", "display_name": "WORLD"}]})
        with service:
            service.wait_for_log(r"error: dnsbl WORLD: .*disabled", timeout=10)
            postfix = postfix_factory(**service.postfix_kwargs())
            assert rcpt_reply(postfix.port, "<user@local.test>", addr=CLEAN).code == 250


# Milter only: Postfix asks a policy service at RCPT, never at connect (policyd
# ignores reject_stage = "connect": it refuses at RCPT, postmaster exempt).
def test_reject_stage_connect_refuses_the_whole_connection(postfix_factory, public_tree, rbldnsd):
    milter = RelaymilterProcess(public_subdirectory(public_tree, "connect-stage"), relay=RELAY,
                                dnsbl=dnsbl_section(rbldnsd.nameserver, reject_stage="connect"))
    with milter:
        postfix = postfix_factory(**milter.postfix_kwargs())
        with SmtpDialog(postfix.port) as smtp:
            smtp.ehlo()
            smtp.xclient(addr=LISTED)
            replies = [smtp.mail_from("<sender@sender.test>"),
                       smtp.rcpt_to("<postmaster@local.test>")]
        assert all(500 <= reply.code < 600 for reply in replies), replies
        assert any(f"Client host [{LISTED}] blocked using BL" in reply.text for reply in replies)
        milter.wait_for_log(rf"NOQUEUE: reject: CONNECT from unknown\[{LISTED}\]: 554 5\.7\.1")
        assert rcpt_reply(postfix.port, "<user@local.test>", addr=CLEAN).code == 250


def test_dry_run_logs_would_reject_for_a_listed_client(postfix_factory, public_tree, rbldnsd,
                                                      front_end):
    service = RelaymilterProcess(public_subdirectory(public_tree, f"dry-{front_end}"),
                                 front_end=front_end, relay=RELAY, decisions={"dry_run": True},
                                 dnsbl=dnsbl_section(rbldnsd.nameserver))
    with service:
        postfix = postfix_factory(**service.postfix_kwargs())
        assert rcpt_reply(postfix.port, "<user@local.test>", addr=LISTED).code == 250
        service.wait_for_log(rf"NOQUEUE: would reject: RCPT from unknown\[{LISTED}\]: "
                             r"554 5\.7\.1 Service unavailable; .*reason=dnsbl$")
