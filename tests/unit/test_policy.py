"""policy.py: the order of the checks at RCPT and the DNSBL reply."""

from __future__ import annotations

import ipaddress

import pytest

from relaymilter.config import parse_config
from relaymilter.dnsbl import ListingResult, Status, Zone, ZoneAnswer
from relaymilter.live import Snapshot, build_snapshot
from relaymilter.policy import (Action, ClientFacts, RecipientFacts, decide_listing,
                                decide_recipient, enforce, lookups_needed)

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
    assert decision.reason == "dnsbl"
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
    assert (decision.action, decision.reason) == (Action.PERMIT, "local-domain")


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
    assert decision.reason == "remote-domain"


def test_authenticated_listed_client_is_permitted():
    # Roaming users send from dial-up ranges that policy lists (PBL) list.
    pending = Pending(LISTED)
    decision = decide_recipient(facts("<user@remote.test>", auth_user="alice", pending=pending),
                                SNAPSHOT)
    assert (decision.action, decision.reason) == (Action.PERMIT, "authenticated")
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
