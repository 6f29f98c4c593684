"""probeforms: the relay forms relaymilter probe sends, checked against relaymilter's own reading."""

import pytest

from relaymilter.address import parse_recipient
from relaymilter.probeforms import CONTROL, control, relay_forms
from relaymilter.relay import RelayRules, relay_verdict

RULES = RelayRules.build(local_domains=["mx.local.test"], own_literals=["192.0.2.25"])
FORMS = relay_forms("example.com", "mx.local.test", server_ip="192.0.2.25",
                    server_name="mx.local.test")


def test_every_form_has_its_own_name_and_none_is_the_control():
    names = [form.name for form in FORMS]
    assert len(names) == len(set(names)) >= 30 and CONTROL not in names


@pytest.mark.parametrize("form", FORMS, ids=lambda form: form.name)
def test_every_recipient_is_one_a_closed_relay_must_refuse(form):
    # relaymilter's relay rules are the reference: each form is a relay
    # attempt, never a local recipient in disguise.
    assert not relay_verdict(parse_recipient(form.recipient), None, RULES).allowed


def test_the_control_is_a_recipient_every_server_takes():
    form = control("MX.Local.Test.", "relaytest@example.com")
    assert (form.recipient, form.sender) == ("<postmaster@mx.local.test>",
                                             "<relaytest@example.com>")
    assert relay_verdict(parse_recipient(form.recipient), None, RULES).allowed


def test_senders_and_helo_names_a_careless_server_trusts_are_tried():
    by_name = {form.name: form for form in FORMS}
    assert by_name["sender-local"].sender == "<postmaster@mx.local.test>"
    assert by_name["sender-null"].sender == "<>"
    assert by_name["sender-auth-param"].mail_parameters == "AUTH=<postmaster@mx.local.test>"
    assert by_name["helo-server-name"].helo == "mx.local.test"
    assert by_name["helo-literal"].helo == "[192.0.2.25]"
    assert by_name["percent-literal"].recipient == "<relaytest%example.com@[192.0.2.25]>"


def test_idn_twins_are_other_domains_and_utf8_ones_need_smtputf8():
    by_name = {form.name: form for form in FORMS}
    assert by_name["idn-twin-alabel"].recipient == "<relaytest@xn--exmple-4nf.com>"
    assert not by_name["idn-twin-alabel"].smtputf8
    assert by_name["idn-twin-utf8"].smtputf8 and by_name["idn-fullwidth"].smtputf8


def test_an_ipv6_server_gets_ipv6_literals():
    forms = {form.name: form for form in relay_forms("example.com", "local.test", "2001:db8::25")}
    assert forms["percent-literal"].recipient == "<relaytest%example.com@[IPv6:2001:db8::25]>"
