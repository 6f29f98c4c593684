"""engine.py: the order of the checks at RCPT and the DNSBL reply."""

from __future__ import annotations

import ipaddress

import pytest

from relaymilter.config import ProbesConfig, parse_config
from relaymilter.zones import ListingResult, Status, Zone, ZoneAnswer
from relaymilter.decision import Action, ClientFacts, RecipientFacts
from relaymilter.engine import Snapshot, decide_listing, decide_recipient, enforce, lookups_needed
from relaymilter.reload import build_snapshot

BL = Zone.build("bl.test", weight=2, display_name="BL")
WL = Zone.build("wl.test", weight=-3, display_name="WL")
LISTED_IP = ipaddress.ip_address("192.0.2.20")


def snapshot(**dnsbl) -> Snapshot:
    document = {"relay": {"local_domains": ["local.test"],
                          "trusted_networks": ["198.51.100.0/24"]}}
    if dnsbl:
        document["dnsbl"] = {"nameservers": ["127.0.0.1:9"], **dnsbl}
    built = build_snapshot(parse_config(document))
    if built.dnsbl is not None:
        built.dnsbl.close()     # no lookups in these tests: results are given
    return built


SNAPSHOT = snapshot(zone=[{"name": "bl.test"}])


def listing(*answers: ZoneAnswer, client=LISTED_IP, threshold=1) -> ListingResult:
    score = sum(answer.contribution for answer in answers)
    listed = score >= threshold
    top = max((a for a in answers if a.status is Status.LISTED and a.zone.weight > 0),
              key=lambda a: a.zone.weight, default=None) if listed else None
    return ListingResult(client=client, answers=answers, score=score, threshold=threshold,
                         listed=listed, reply_zone=top.zone.display_name if top else None,
                         txt=top.txt if top else None)


class Pending:
    """Stands for dnsbl.PendingListing; counts how often the verdict was read."""

    def __init__(self, result: ListingResult):
        self._result, self.reads = result, 0

    def result(self) -> ListingResult:
        self.reads += 1
        return self._result


LISTED = listing(ZoneAnswer(BL, Status.LISTED, ("127.0.0.2",), txt="see http://bl.test/x"))
NOT_LISTED = listing(ZoneAnswer(BL, Status.NOT_LISTED))


def facts(recipient="<user@local.test>", ip=LISTED_IP, auth_user=None, pending=None):
    return RecipientFacts(client=ClientFacts(address=ipaddress.ip_address(ip) if ip else None,
                                             auth_user=auth_user),
                          sender="<s@sender.test>", recipient=recipient,
                          resolved_recipient=None, listing=pending)


def test_listed_client_is_refused_with_zone_and_txt():
    decision = decide_recipient(facts(pending=Pending(LISTED)), SNAPSHOT)
    assert decision.action is Action.REJECT
    assert decision.reason.word == "dnsbl"
    assert decision.reply == ("554 5.7.1 Service unavailable; Client host [192.0.2.20] "
                              "blocked using BL; see http://bl.test/x")


def test_listing_without_txt_ends_at_the_zone_name():
    result = listing(ZoneAnswer(BL, Status.LISTED, ("127.0.0.2",)))
    assert decide_listing(result).text == \
        "Service unavailable; Client host [192.0.2.20] blocked using BL"


def test_ipv6_client_is_named_in_the_reply():
    result = listing(ZoneAnswer(BL, Status.LISTED, ("127.0.0.2",)),
                     client=ipaddress.ip_address("2001:db8::20"))
    assert "Client host [2001:db8::20] blocked using BL" in decide_listing(result).text


def test_unlisted_client_is_permitted_with_the_relay_reason():
    decision = decide_recipient(facts(pending=Pending(NOT_LISTED)), SNAPSHOT)
    assert (decision.action, decision.reason.word) == (Action.PERMIT, "local-domain")


def test_relay_attempt_is_refused_as_relay_without_reading_the_verdict():
    pending = Pending(LISTED)
    decision = decide_recipient(facts("<user@remote.test>", pending=pending), SNAPSHOT)
    assert decision.reply.endswith("<user@remote.test>: Relay access denied")
    assert pending.reads == 0


def test_bad_syntax_is_refused_before_the_verdict_is_read():
    pending = Pending(LISTED)
    assert decide_recipient(facts("<user@local.test", pending=pending), SNAPSHOT).code == 501
    assert pending.reads == 0


@pytest.mark.parametrize("recipient", ["<postmaster>", "<postmaster@local.test>",
                                       "<PostMaster@LOCAL.test>"])
def test_postmaster_stays_reachable_for_a_listed_client(recipient):
    pending = Pending(LISTED)
    assert decide_recipient(facts(recipient, pending=pending), SNAPSHOT).action is Action.PERMIT
    assert pending.reads == 0


def test_postmaster_of_a_remote_domain_is_still_a_relay_attempt():
    decision = decide_recipient(facts("<postmaster@remote.test>", pending=Pending(LISTED)),
                                SNAPSHOT)
    assert decision.reason.word == "remote-domain"


def test_authenticated_listed_client_is_permitted():
    # Roaming users send from dial-up ranges that policy lists (PBL) list.
    pending = Pending(LISTED)
    decision = decide_recipient(facts("<user@remote.test>", auth_user="alice", pending=pending),
                                SNAPSHOT)
    assert (decision.action, decision.reason.word) == (Action.PERMIT, "authenticated")
    assert pending.reads == 0


def test_allowlist_outweighing_a_listing_permits():
    result = listing(ZoneAnswer(BL, Status.LISTED, ("127.0.0.2",)),
                     ZoneAnswer(WL, Status.LISTED, ("127.0.10.2",)))
    assert decide_recipient(facts(pending=Pending(result)), SNAPSHOT).action is Action.PERMIT


@pytest.mark.parametrize("status", [Status.ZONE_ERROR, Status.TIMEOUT, Status.DNS_FAILURE,
                                    Status.DISABLED])
def test_zone_trouble_never_rejects(status):
    result = listing(ZoneAnswer(BL, status, ("127.255.255.254",) if status is Status.ZONE_ERROR
                                else ()))
    assert decide_recipient(facts(pending=Pending(result)), SNAPSHOT).action is Action.PERMIT


def test_dry_run_marks_a_dnsbl_reject():
    decision = enforce(decide_recipient(facts(pending=Pending(LISTED)), SNAPSHOT), dry_run=True)
    assert decision.dry_run and decision.code == 554


def test_percent_in_txt_is_kept_for_the_adapter_to_escape():
    result = listing(ZoneAnswer(BL, Status.LISTED, ("127.0.0.2",), txt="100% spam"))
    assert decide_listing(result).text.endswith("; 100% spam")


@pytest.mark.parametrize("ip, needed", [
    ("192.0.2.20", True),
    ("2001:db8::20", True),
    ("198.51.100.7", False),              # trusted network: never looked up
    ("::ffff:198.51.100.7", False),
    (None, False),                        # unknown address: nothing to ask
])
def test_lookups_are_started_only_for_untrusted_known_clients(ip, needed):
    client = ClientFacts(address=ipaddress.ip_address(ip) if ip else None)
    assert lookups_needed(client, SNAPSHOT) is needed


def test_no_lookups_without_zones():
    client = ClientFacts(address=LISTED_IP)
    assert lookups_needed(client, snapshot()) is False


# ------------------------------------------------- per-domain policy (store) ---

from dataclasses import replace as _replace  # noqa: E402

from relaymilter.limits import LimitCounter  # noqa: E402
from relaymilter.domainpolicy import DomainPolicy  # noqa: E402

OUR_USER_IP = "192.0.2.60"


def with_policy(**sections) -> Snapshot:
    return _replace(SNAPSHOT, domain_policy=DomainPolicy.from_document(sections))


def relay_facts(sender="<alice@cust.test>", ip=OUR_USER_IP, auth_user="alice",
                recipient="<friend@remote.test>", pending=None):
    return RecipientFacts(client=ClientFacts(address=ipaddress.ip_address(ip),
                                             auth_user=auth_user),
                          sender=sender, recipient=recipient, listing=pending)


def test_held_user_relaying_is_suspended_before_anything_else():
    snap = with_policy(holds=[{"kind": "user", "value": "alice", "reason": "phished"}])
    decision = decide_recipient(relay_facts(), snap)
    assert decision.reply == "550 5.7.1 Relaying suspended for this sender"
    assert decision.reason.word == "hold-user"


def test_held_client_network_relaying_is_suspended_even_when_trusted():
    snap = with_policy(holds=[{"kind": "client", "value": "198.51.100.0/28"}])
    decision = decide_recipient(relay_facts(ip="198.51.100.7", auth_user=None), snap)
    assert (decision.code, decision.reason.word) == (550, "hold-client")


def test_held_user_still_receives_inbound_mail():
    snap = with_policy(holds=[{"kind": "user", "value": "alice"}])
    facts = relay_facts(recipient="<bob@local.test>", pending=Pending(NOT_LISTED))
    assert decide_recipient(facts, snap).action is Action.PERMIT


def test_relay_client_relays_only_with_its_sender_domains():
    snap = with_policy(relay_clients=[{"network": "192.0.2.50", "sender_domains": ["cust.test"]}])
    ok = relay_facts(ip="192.0.2.50", auth_user=None, sender="<web@cust.test>")
    other = relay_facts(ip="192.0.2.50", auth_user=None, sender="<web@other.test>")
    assert decide_recipient(ok, snap).reason.word == "relay-client"
    assert decide_recipient(other, snap).reason.word == "relay-client-sender"
    assert decide_recipient(other, snap).code == 554


def test_user_owning_domains_must_send_as_one_of_them():
    snap = with_policy(domains=[{"domain": "cust.test", "owners": ["alice"]}])
    assert decide_recipient(relay_facts(sender="<alice@CUST.test>"), snap).action is Action.PERMIT
    decision = decide_recipient(relay_facts(sender="<alice@gmail.test>"), snap)
    assert decision.reply == ("553 5.7.1 <alice@gmail.test>: Sender address rejected: "
                              "not owned by user")
    assert decide_recipient(relay_facts(sender="<>"), snap).code == 553


def test_user_owning_nothing_is_unrestricted():
    snap = with_policy(domains=[{"domain": "cust.test", "owners": ["bob"]}])
    assert decide_recipient(relay_facts(sender="<alice@any.test>"), snap).action is Action.PERMIT


def test_global_and_scoped_allowlist_permit_a_listed_client():
    snap = with_policy(allowlist=[{"network": "192.0.2.0/24", "domain": "local.test"}])
    decision = decide_recipient(facts(pending=Pending(LISTED)), snap)
    assert (decision.action, decision.reason.word) == (Action.PERMIT, "allowlisted")
    snap = with_policy(allowlist=[{"network": "192.0.2.0/24", "domain": "other.test"}])
    assert decide_recipient(facts(pending=Pending(LISTED)), snap).reason.word == "dnsbl"
    snap = with_policy(allowlist=[{"network": str(LISTED_IP)}])
    assert decide_recipient(facts(pending=Pending(LISTED)), snap).reason.word == "allowlisted"


def test_allowlist_never_opens_relaying():
    snap = with_policy(allowlist=[{"network": str(LISTED_IP)}])
    assert decide_recipient(facts("<user@remote.test>"), snap).reason.word == "remote-domain"


def test_domain_opt_out_skips_the_dnsbl_without_waiting_for_it():
    snap = with_policy(domains=[{"domain": "local.test", "dnsbl": "off"}])
    pending = Pending(LISTED)
    assert decide_recipient(facts(pending=pending), snap).reason.word == "dnsbl-opt-out"
    assert pending.reads == 0


@pytest.mark.parametrize("threshold, action", [(3, Action.PERMIT), (2, Action.REJECT),
                                               (1, Action.REJECT)])
def test_domain_threshold_replaces_the_global_one(threshold, action):
    snap = with_policy(domains=[{"domain": "local.test", "threshold": threshold}])
    assert decide_recipient(facts(pending=Pending(LISTED)), snap).action is action


def test_domain_threshold_can_be_stricter_than_the_global_one():
    half = Zone.build("half.test", weight=1, display_name="HALF")
    result = listing(ZoneAnswer(half, Status.LISTED, ("127.0.0.2",)), threshold=2)
    assert not result.listed
    snap = with_policy(domains=[{"domain": "local.test", "threshold": 1}])
    decision = decide_recipient(facts(pending=Pending(result)), snap)
    assert decision.reply.endswith("blocked using HALF")


def test_outbound_limit_defers_over_the_count_and_asks_for_a_hold():
    snap = with_policy(limits=[{"kind": "user", "value": "alice", "per_hour": 2}])
    counter = LimitCounter(hour=3600, auto_hold_factor=2)
    decisions = [decide_recipient(relay_facts(), snap, counter) for _ in range(4)]
    assert [d.code for d in decisions] == [None, None, 450, 450]
    assert decisions[2].reply == "450 4.7.1 Sending rate limit exceeded, try again later"
    assert [d.hold_request for d in decisions] == [None, None, None, ("user", "alice")]


def test_default_client_limit_covers_trusted_networks_and_not_inbound_mail():
    snap = with_policy(limits=[{"kind": "client", "value": "", "per_hour": 1}])
    counter = LimitCounter(hour=3600)
    trusted = relay_facts(ip="198.51.100.7", auth_user=None)
    assert decide_recipient(trusted, snap, counter).action is Action.PERMIT
    assert decide_recipient(trusted, snap, counter).code == 450
    inbound = relay_facts(ip="198.51.100.7", auth_user=None, recipient="<u@local.test>")
    assert decide_recipient(inbound, snap, counter).action is Action.PERMIT


# ---------------------------------------------------------------- trust ---
# Trusted networks and SMTP AUTH may send every relay form: the MTA routes
# their mail as it always would.

from test_relay import RELAY_ATTEMPTS  # noqa: E402

RELAY_FORMS = [recipient for recipient, _ in RELAY_ATTEMPTS]


@pytest.mark.parametrize("recipient", RELAY_FORMS)
def test_trusted_network_client_may_send_every_relay_form(recipient):
    client = ClientFacts(ipaddress.ip_address("198.51.100.5"))
    decision = decide_recipient(RecipientFacts(client, "<s@x.test>", recipient), SNAPSHOT)
    assert (decision.action, decision.reason.word) == (Action.PERMIT, "trusted-network")


@pytest.mark.parametrize("recipient", RELAY_FORMS)
def test_authenticated_client_may_send_every_relay_form(recipient):
    client = ClientFacts(LISTED_IP, auth_user="alice")
    decision = decide_recipient(RecipientFacts(client, "<s@x.test>", recipient), SNAPSHOT)
    assert (decision.action, decision.reason.word) == (Action.PERMIT, "authenticated")


def test_one_outbound_count_per_user_however_the_login_is_spelt():
    snap = with_policy(limits=[{"kind": "user", "value": "Zed@Example.COM", "per_hour": 1}])
    counter = LimitCounter(hour=3600)
    first = decide_recipient(relay_facts(auth_user="zed@example.com"), snap, counter)
    second = decide_recipient(relay_facts(auth_user="ZED@example.com"), snap, counter)
    assert (first.action, second.action) == (Action.PERMIT, Action.DEFER)


# ------------------------------------------------------- relay probing ---

def probe_snapshot(**probes):
    settings = {"detect": True, "refusals": 3, "window": 600, "block_for": 3600, **probes}
    config = _replace(SNAPSHOT.config, probes=ProbesConfig(**settings))
    return _replace(SNAPSHOT, config=config)


def test_the_refusal_that_reaches_the_count_asks_to_block_the_client():
    snap, probes = probe_snapshot(), LimitCounter(hour=600, auto_hold_factor=1)
    decisions = [decide_recipient(relay_facts(ip="192.0.2.77", auth_user=None,
                                              recipient=f"<u{n}@remote.test>"), snap,
                                  probes=probes) for n in range(5)]
    assert [d.code for d in decisions] == [554] * 5
    assert [d.block_request for d in decisions] == [None, None, "192.0.2.77", None, None]


def test_trusted_and_authenticated_clients_are_never_counted_and_local_mail_is_not():
    snap, probes = probe_snapshot(refusals=2), LimitCounter(hour=600, auto_hold_factor=1)
    for _ in range(5):
        assert decide_recipient(relay_facts(), snap, probes=probes).block_request is None
        local = relay_facts(ip="192.0.2.77", auth_user=None, recipient="<u@local.test>")
        assert decide_recipient(local, snap, probes=probes).block_request is None
    off = probe_snapshot(detect=False, refusals=2)
    untrusted = relay_facts(ip="192.0.2.77", auth_user=None)
    assert all(decide_recipient(untrusted, off, probes=probes).block_request is None
               for _ in range(5))


def test_a_recipient_asked_twice_for_one_message_is_one_attempt():
    snap, probes = probe_snapshot(refusals=2), LimitCounter(hour=600, auto_hold_factor=1)
    asked = _replace(relay_facts(ip="192.0.2.77", auth_user=None), instance="4F1A2.1")
    assert [decide_recipient(asked, snap, probes=probes).block_request
            for _ in range(3)] == [None, None, None]


def test_a_blocked_client_is_refused_every_recipient_local_ones_included():
    snap = with_policy(holds=[{"kind": "client", "value": "192.0.2.77", "scope": "all",
                               "reason": "relay probing"}])
    for recipient in ("<u@local.test>", "<postmaster@local.test>", "<u@remote.test>"):
        decision = decide_recipient(relay_facts(ip="192.0.2.77", auth_user=None,
                                                recipient=recipient), snap)
        assert decision.reply == "554 5.7.1 Client host [192.0.2.77] blocked: relay probing"
        assert decision.reason.word == "blocked"
    # A hold of scope "relay" leaves local mail alone; authenticated clients are
    # never blocked (their relaying from there stays suspended, as by any hold).
    relay_only = with_policy(holds=[{"kind": "client", "value": "192.0.2.77"}])
    assert decide_recipient(relay_facts(ip="192.0.2.77", auth_user=None,
                                        recipient="<u@local.test>"), relay_only).code is None
    trusted = with_policy(holds=[{"kind": "client", "value": str(OUR_USER_IP), "scope": "all"}])
    assert decide_recipient(relay_facts(recipient="<u@local.test>"), trusted).action \
        is Action.PERMIT
    assert decide_recipient(relay_facts(), trusted).reason.word == "hold-client"
