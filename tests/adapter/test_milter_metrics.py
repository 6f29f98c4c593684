"""Adapter tests: what RelayMilter reports to the metrics recorder.

Driven by pymilter's TestCtx like test_milter_adapter.py (see its docstring
for why sessions are opened by hand): one connect, one decision, one
internal error each make exactly one count.
"""

from __future__ import annotations

import socket
from dataclasses import replace

import Milter
import pytest
from Milter import testctx

from relaymilter.cache import LookupCache
from relaymilter.config import parse_config
from relaymilter.dnsbl import DnsAnswer, DnsblChecker, query_name
from relaymilter.zones import Zone
from relaymilter.engine import Engine
from relaymilter.runtime import Runtime
from relaymilter.metrics import PrometheusRecorder
from relaymilter.milter import MacroWarnings, RelayMilter

Context = testctx.TestCtx
UNTRUSTED_IP = "192.0.2.9"
LISTED_IP = "192.0.2.20"
BL = Zone.build("bl.test", display_name="BL")


class ListingResolver:
    """bl.test lists LISTED_IP; every other question is NXDOMAIN."""

    def query(self, name, rdtype, lifetime=None):
        if name == query_name(LISTED_IP, BL.name) and rdtype == "A":
            return DnsAnswer(("127.0.0.2",), 300)
        return DnsAnswer((), 300, nxdomain=True)


class ContextFailingAtMail(Context):
    def getsymval(self, name):
        if self._stage == Milter.M_ENVFROM:
            raise RuntimeError("deliberate failure of the milter context")
        return super().getsymval(name)


@pytest.fixture
def recorder():
    return PrometheusRecorder()


@pytest.fixture
def session(monkeypatch, recorder):
    """session(reject_stage="rcpt", ctx_class=TestCtx, ip=UNTRUSTED_IP) -> TestCtx, connected."""
    monkeypatch.setattr(Context, "default_opts", [Milter.CURR_ACTS, 0x1FFFFF, 0, 0])
    checkers = []

    def open_(reject_stage: str = "rcpt", ctx_class: type = Context, ip: str = UNTRUSTED_IP):
        document = {"relay": {"local_domains": ["local.test"]}, "store": {"path": ""},
                    "dnsbl": {"reject_stage": reject_stage}}
        live = Runtime.start(parse_config(document), metrics=recorder)
        checker = DnsblChecker([BL], ListingResolver(), LookupCache(100, 60, 3600),
                               metrics=recorder)
        checkers.append(checker)
        live.snapshot = replace(live.snapshot, dnsbl=checker)
        warnings = MacroWarnings()
        monkeypatch.setattr(Milter, "factory", lambda: RelayMilter(Engine(live), warnings))
        ctx = ctx_class()
        ctx._setsymval("j", "mx.local.test")
        assert ctx._negotiate() == Milter.CONTINUE
        ctx._stage = Milter.M_CONNECT
        ctx.connect_rc = Milter.connect_callback(ctx, "client.test", socket.AF_INET, ip)
        ctx._stage = None
        return ctx

    yield open_
    for checker in checkers:
        checker.close()


def value(recorder, name, **labels):
    found = recorder.registry.get_sample_value(name, labels)
    return 0 if found is None else found


def rcpt(ctx, recipient):
    ctx._reply = None
    return ctx._envrcpt(recipient)


def test_each_connect_is_one_connection(session, recorder):
    ctx = session()
    ctx._stage = Milter.M_CONNECT
    Milter.connect_callback(ctx, "client.test", socket.AF_INET, UNTRUSTED_IP)  # after XCLIENT
    assert value(recorder, "relaymilter_connections_total") == 2


def test_each_rcpt_decision_is_counted_once_with_its_reason(session, recorder):
    ctx = session()
    ctx._envfrom("<sender@sender.test>")
    assert rcpt(ctx, "<user@remote.test>") == Milter.REJECT
    assert rcpt(ctx, "<user%remote.test@local.test>") == Milter.REJECT
    assert rcpt(ctx, "<user@local.test>") == Milter.CONTINUE
    decisions = "relaymilter_decisions_total"
    assert value(recorder, decisions, stage="rcpt", action="reject", reason="remote-domain") == 1
    assert value(recorder, decisions, stage="rcpt", action="reject", reason="percent-hack") == 1
    assert value(recorder, decisions, stage="rcpt", action="permit", reason="local-domain") == 1
    assert value(recorder, "relaymilter_dnsbl_lookups_total", zone="BL", result="not-listed") == 1


def test_listed_client_at_rcpt_counts_a_dnsbl_reject(session, recorder):
    ctx = session(ip=LISTED_IP)
    ctx._envfrom("<sender@sender.test>")
    assert rcpt(ctx, "<user@local.test>") == Milter.REJECT
    assert value(recorder, "relaymilter_decisions_total", stage="rcpt", action="reject",
                 reason="dnsbl") == 1
    assert value(recorder, "relaymilter_dnsbl_lookups_total", zone="BL", result="listed") == 1


def test_reject_at_connect_is_counted_at_stage_connect(session, recorder):
    ctx = session(reject_stage="connect", ip=LISTED_IP)
    assert ctx.connect_rc == Milter.REJECT
    assert value(recorder, "relaymilter_decisions_total", stage="connect", action="reject",
                 reason="dnsbl") == 1


def test_exception_is_counted_by_callback_and_its_answer_as_a_decision(session, recorder):
    ctx = session(ctx_class=ContextFailingAtMail)
    ctx._envfrom("<sender@sender.test>")
    assert rcpt(ctx, "<user@local.test>") == Milter.TEMPFAIL
    assert value(recorder, "relaymilter_internal_errors_total", callback="mail") == 1
    assert value(recorder, "relaymilter_internal_errors_total", callback="rcpt") == 0
    assert value(recorder, "relaymilter_decisions_total", stage="rcpt", action="defer",
                 reason="internal-error") == 1
