"""Adapter tests: relaymilter.milter.RelayMilter driven by pymilter's TestCtx.

TestCtx stands in for libmilter's context: it records the negotiated
protocol, the macros requested per stage (getsymval() hides the others) and
the reply set with setreply(). Milter.factory is what TestCtx's negotiation
calls to create the milter, as libmilter does.

Sessions are opened with open_session() rather than TestCtx._connect():
pymilter 1.0.5's _connect() and _helo() take the NOREPLY that a no-reply
connect or HELO answers for a rejection and close the context. The helper
does the same steps (negotiate, connect with the IP as a plain string, HELO)
and hands back what the callbacks answered.
"""

from __future__ import annotations

import logging
import socket

import Milter
import pytest
from Milter import testctx

from relaymilter.config import parse_config
from relaymilter.engine import Engine
from relaymilter.runtime import Runtime
from relaymilter.milter import MacroWarnings, RelayMilter

# Not named TestCtx here, or pytest would try to collect it.
Context = testctx.TestCtx

UNTRUSTED_IP = "192.0.2.9"
RELAY_DENIED_REMOTE = ("554", "5.7.1", "<user@remote.test>: Relay access denied")
TEMPORARY_FAILURE = ("451", "4.3.0", "Temporary policy failure, try again later")


def make_live(decisions: dict | None = None, relay: dict | None = None,
              dnsbl: dict | None = None) -> Runtime:
    document = {"relay": {"local_domains": ["local.test"], **(relay or {})}}
    if decisions:
        document["decisions"] = decisions
    if dnsbl:
        document["dnsbl"] = dnsbl
    return Runtime.start(parse_config(document))


# Nothing answers on the discard port: lookups fail open at the deadline.
SILENT_ZONE = {"nameservers": ["127.0.0.1:9"], "timeout": 0.2, "zone": [{"name": "bl.test"}]}


@pytest.fixture
def install(monkeypatch):
    """install(live, warnings=None, ctx_class=TestCtx) -> a TestCtx for RelayMilter.

    Milter.factory and TestCtx.default_opts (a class-level list that
    negotiation writes into) are restored after the test.
    """
    monkeypatch.setattr(Context, "default_opts", [Milter.CURR_ACTS, 0x1FFFFF, 0, 0])

    def install_(live: Runtime, warnings: MacroWarnings | None = None,
                 ctx_class: type = Context) -> Context:
        shared = warnings if warnings is not None else MacroWarnings()
        monkeypatch.setattr(Milter, "factory", lambda: RelayMilter(Engine(live), shared))
        ctx = ctx_class()
        ctx._setsymval("j", "mx.local.test")
        return ctx

    return install_


def connect_again(ctx: Context, ip: str | None = UNTRUSTED_IP, host: str = "client.test",
                  helo: str = "client.test", family: int | None = None,
                  hostaddr=None) -> tuple[int, int]:
    """A connect and HELO on an already negotiated context (as after XCLIENT)."""
    if family is None:
        family = socket.AF_INET6 if ip and ":" in ip else socket.AF_INET
    ctx._stage = Milter.M_CONNECT
    connect_rc = Milter.connect_callback(ctx, host, family, ip if hostaddr is None else hostaddr)
    ctx._stage = Milter.M_HELO
    helo_rc = ctx.getpriv().hello(helo)
    ctx._stage = None
    return connect_rc, helo_rc


def open_session(ctx: Context, ip: str | None = UNTRUSTED_IP, **kwargs) -> tuple[int, int]:
    assert ctx._negotiate() == Milter.CONTINUE
    return connect_again(ctx, ip, **kwargs)


def mail(ctx: Context, sender: str = "<sender@sender.test>") -> int:
    return ctx._envfrom(sender)


def rcpt(ctx: Context, recipient: str) -> int:
    ctx._reply = None
    return ctx._envrcpt(recipient)


def tracebacks(caplog) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.exc_info]


class ContextFailingAt(Context):
    """A context whose macro lookup fails in one stage, `times` times."""

    def __init__(self, stage: int, times: int = 1):
        super().__init__()
        self.failing_stage, self.failures_left = stage, times

    def getsymval(self, name):
        if self._stage == self.failing_stage and self.failures_left:
            self.failures_left -= 1
            raise RuntimeError("deliberate failure of the milter context")
        return super().getsymval(name)


class SnapshotWithBrokenRules:
    """Stands in for a Snapshot whose relay rules cannot be read."""

    def __init__(self, config):
        self.config = config

    @property
    def relay_rules(self):
        raise RuntimeError("deliberately broken relay rules")


# ------------------------------------------------------------ negotiation ---

def test_connect_helo_and_mail_are_negotiated_as_no_reply(install):
    ctx = install(make_live())
    open_session(ctx)
    for bit in (Milter.P_NR_CONN, Milter.P_NR_HELO, Milter.P_NR_MAIL):
        assert ctx._protocol & bit, hex(bit)
    for bit in (Milter.P_NOCONNECT, Milter.P_NOHELO, Milter.P_NOMAIL):
        assert not ctx._protocol & bit, hex(bit)


def test_reject_stage_connect_makes_connect_a_stage_with_a_reply(install):
    live = make_live(dnsbl={**SILENT_ZONE, "reject_stage": "connect"})
    ctx = install(live)
    assert open_session(ctx) == (Milter.CONTINUE, Milter.NOREPLY)
    assert not ctx._protocol & Milter.P_NR_CONN
    live.stop()


def test_reject_stage_rcpt_keeps_connect_without_a_reply(install):
    live = make_live(dnsbl=SILENT_ZONE)
    ctx = install(live)
    open_session(ctx)
    assert ctx._protocol & Milter.P_NR_CONN
    mail(ctx)
    assert rcpt(ctx, "<user@local.test>") == Milter.CONTINUE    # DNS silent: fail open
    live.stop()


def test_headers_body_and_unknown_are_negotiated_away(install):
    ctx = install(make_live())
    open_session(ctx)
    for bit in (Milter.P_NOHDRS, Milter.P_NOEOH, Milter.P_NOBODY, Milter.P_NOUNKNOWN):
        assert ctx._protocol & bit, hex(bit)


def test_data_waits_for_a_reply_and_accepts_the_message(install):
    # ACCEPT at DATA: the MTA skips end of message for this milter.
    ctx = install(make_live())
    open_session(ctx)
    assert not ctx._protocol & (Milter.P_NODATA | Milter.P_NR_DATA)
    mail(ctx)
    assert rcpt(ctx, "<user@local.test>") == Milter.CONTINUE
    assert ctx._data() == Milter.ACCEPT


def test_rcpt_is_called_and_waits_for_a_reply(install):
    ctx = install(make_live())
    open_session(ctx)
    assert not ctx._protocol & Milter.P_NORCPT
    assert not ctx._protocol & Milter.P_NR_RCPT


def test_no_reply_stages_answer_noreply(install):
    ctx = install(make_live())
    assert open_session(ctx) == (Milter.NOREPLY, Milter.NOREPLY)
    assert mail(ctx) == Milter.NOREPLY


def test_macros_are_requested_per_stage(install):
    ctx = install(make_live())
    open_session(ctx)
    assert ctx._symlist[Milter.M_CONNECT] == {b"j", b"{daemon_name}", b"{client_addr}"}
    assert ctx._symlist[Milter.M_ENVFROM] == {b"{auth_authen}", b"{auth_type}", b"{mail_addr}"}
    assert ctx._symlist[Milter.M_ENVRCPT] == {b"{rcpt_addr}", b"i"}


# ------------------------------------------------------------ relay gate ---

def test_untrusted_client_to_remote_recipient_is_relay_denied(install):
    ctx = install(make_live())
    open_session(ctx, UNTRUSTED_IP)
    mail(ctx)
    assert rcpt(ctx, "<user@remote.test>") == Milter.REJECT
    assert ctx._reply == RELAY_DENIED_REMOTE


def test_untrusted_client_to_local_recipient_continues(install):
    ctx = install(make_live())
    open_session(ctx, UNTRUSTED_IP)
    mail(ctx)
    assert rcpt(ctx, "<user@local.test>") == Milter.CONTINUE
    assert ctx._reply is None


def test_client_in_default_trusted_networks_may_relay(install):
    ctx = install(make_live())
    open_session(ctx, "127.0.0.1")
    mail(ctx)
    assert rcpt(ctx, "<user@remote.test>") == Milter.CONTINUE
    assert ctx._reply is None


def test_v4_mapped_loopback_client_counts_as_trusted(install):
    ctx = install(make_live())
    open_session(ctx, "::ffff:127.0.0.1")
    mail(ctx)
    assert rcpt(ctx, "<user@remote.test>") == Milter.CONTINUE


def test_client_address_given_as_libmilter_tuple_is_read(install):
    ctx = install(make_live())
    open_session(ctx, UNTRUSTED_IP, hostaddr=(UNTRUSTED_IP, 40000))
    mail(ctx)
    assert rcpt(ctx, "<user@remote.test>") == Milter.REJECT
    ctx2 = install(make_live())
    open_session(ctx2, "127.0.0.1", hostaddr=("127.0.0.1", 40000))
    mail(ctx2)
    assert rcpt(ctx2, "<user@remote.test>") == Milter.CONTINUE


def test_client_of_unknown_address_family_is_not_trusted(install):
    # A port scan or health probe: Postfix says "unknown", no address.
    ctx = install(make_live())
    open_session(ctx, None, family=socket.AF_UNSPEC, host="unknown")
    mail(ctx)
    assert rcpt(ctx, "<user@remote.test>") == Milter.REJECT


def test_authenticated_client_may_relay(install):
    ctx = install(make_live())
    open_session(ctx, UNTRUSTED_IP)
    ctx._setsymval("{auth_authen}", "alice")
    mail(ctx)
    assert rcpt(ctx, "<user@remote.test>") == Milter.CONTINUE


def test_authenticated_client_is_denied_when_trust_authenticated_is_off(install):
    ctx = install(make_live(relay={"trust_authenticated": False}))
    open_session(ctx, UNTRUSTED_IP)
    ctx._setsymval("{auth_authen}", "alice")
    mail(ctx)
    assert rcpt(ctx, "<user@remote.test>") == Milter.REJECT


def test_percent_in_echoed_recipient_is_escaped_for_setreply(install):
    ctx = install(make_live())
    open_session(ctx, UNTRUSTED_IP)
    mail(ctx)
    assert rcpt(ctx, "<user%remote.test@local.test>") == Milter.REJECT
    assert ctx._reply == ("554", "5.7.1",
                          "<user%%remote.test@local.test>: Relay access denied")


@pytest.mark.parametrize("client_ip", [UNTRUSTED_IP, "127.0.0.1"])
def test_non_utf8_recipient_is_refused_as_bad_syntax(install, client_ip):
    ctx = install(make_live())
    open_session(ctx, client_ip)
    mail(ctx)
    assert rcpt(ctx, "<user\udcff@local.test>") == Milter.REJECT
    assert ctx._reply == ("501", "5.1.3", "Bad recipient address syntax")


def test_mta_resolving_local_recipient_to_remote_domain_is_relay_denied(install, caplog):
    caplog.set_level(logging.INFO, logger="relaymilter.decision")
    ctx = install(make_live())
    open_session(ctx, UNTRUSTED_IP)
    mail(ctx)
    ctx._setsymval("{rcpt_addr}", "user@remote.test")
    assert rcpt(ctx, "<user@local.test>") == Milter.REJECT
    assert ctx._reply == ("554", "5.7.1", "<user@local.test>: Relay access denied")
    lines = [r.getMessage() for r in caplog.records if r.name == "relaymilter.decision"]
    assert len(lines) == 1 and "reason=mta-resolves-remote" in lines[0]


def test_dry_run_continues_but_logs_would_reject(install, caplog):
    caplog.set_level(logging.INFO, logger="relaymilter.decision")
    ctx = install(make_live(decisions={"dry_run": True}))
    open_session(ctx, UNTRUSTED_IP)
    mail(ctx)
    assert rcpt(ctx, "<user@remote.test>") == Milter.CONTINUE
    assert ctx._reply is None
    lines = [r.getMessage() for r in caplog.records if r.name == "relaymilter.decision"]
    assert len(lines) == 1
    assert "would reject" in lines[0] and "Relay access denied" in lines[0]


def test_reject_is_logged_postfix_style_with_noqueue(install, caplog):
    caplog.set_level(logging.INFO, logger="relaymilter.decision")
    ctx = install(make_live())
    open_session(ctx, UNTRUSTED_IP, host="client.test", helo="helo.test")
    mail(ctx, "<sender@sender.test>")
    rcpt(ctx, "<user@remote.test>")
    [line] = [r.getMessage() for r in caplog.records if r.name == "relaymilter.decision"]
    assert line.startswith(f"NOQUEUE: reject: RCPT from client.test[{UNTRUSTED_IP}]: "
                           "554 5.7.1 <user@remote.test>: Relay access denied; ")
    assert "from=<sender@sender.test> to=<user@remote.test> helo=<helo.test>" in line


# --------------------------------------------------------- error boundary ---

def test_exception_in_policy_answers_tempfail_and_logs_one_traceback(install, caplog):
    live = make_live()
    ctx = install(live)
    open_session(ctx, UNTRUSTED_IP)
    mail(ctx)
    live.snapshot = SnapshotWithBrokenRules(live.snapshot.config)
    caplog.clear()
    assert rcpt(ctx, "<user@local.test>") == Milter.TEMPFAIL
    assert ctx._reply == TEMPORARY_FAILURE
    [record] = tracebacks(caplog)
    assert "deliberately broken relay rules" in str(record.exc_info[1])


def test_exception_in_policy_with_on_error_accept_continues(install):
    live = make_live(decisions={"on_error": "accept"})
    ctx = install(live)
    open_session(ctx, UNTRUSTED_IP)
    mail(ctx)
    live.snapshot = SnapshotWithBrokenRules(live.snapshot.config)
    assert rcpt(ctx, "<user@remote.test>") == Milter.CONTINUE
    assert ctx._reply is None


def test_exception_at_connect_is_answered_at_rcpt(install, caplog):
    ctx = install(make_live(), ctx_class=lambda: ContextFailingAt(Milter.M_CONNECT))
    assert open_session(ctx, UNTRUSTED_IP) == (Milter.NOREPLY, Milter.NOREPLY)
    assert mail(ctx) == Milter.NOREPLY
    assert rcpt(ctx, "<user@local.test>") == Milter.TEMPFAIL
    assert ctx._reply == TEMPORARY_FAILURE
    assert len(tracebacks(caplog)) == 1


def test_exception_at_connect_is_answered_for_every_message_of_the_session(install):
    ctx = install(make_live(), ctx_class=lambda: ContextFailingAt(Milter.M_CONNECT))
    open_session(ctx, UNTRUSTED_IP)
    for _ in range(2):
        mail(ctx)
        assert rcpt(ctx, "<user@local.test>") == Milter.TEMPFAIL


def test_exception_at_mail_is_answered_at_rcpt_of_that_message_only(install):
    ctx = install(make_live(), ctx_class=lambda: ContextFailingAt(Milter.M_ENVFROM))
    open_session(ctx, UNTRUSTED_IP)
    assert mail(ctx) == Milter.NOREPLY
    assert rcpt(ctx, "<user@local.test>") == Milter.TEMPFAIL
    mail(ctx)
    assert rcpt(ctx, "<user@local.test>") == Milter.CONTINUE


def test_exception_at_connect_with_on_error_accept_continues(install):
    ctx = install(make_live(decisions={"on_error": "accept"}),
                  ctx_class=lambda: ContextFailingAt(Milter.M_CONNECT))
    open_session(ctx, UNTRUSTED_IP)
    mail(ctx)
    assert rcpt(ctx, "<user@local.test>") == Milter.CONTINUE


# ------------------------------------------------- second connect (XCLIENT) ---

def test_second_connect_does_not_carry_over_authentication(install):
    ctx = install(make_live())
    open_session(ctx, UNTRUSTED_IP)
    ctx._setsymval("{auth_authen}", "alice")
    mail(ctx)
    assert rcpt(ctx, "<user@remote.test>") == Milter.CONTINUE
    first_milter = ctx.getpriv()

    del ctx._macros["{auth_authen}"]
    connect_again(ctx, "198.51.100.7")
    assert ctx.getpriv() is first_milter
    mail(ctx)
    assert rcpt(ctx, "<user@remote.test>") == Milter.REJECT


def test_second_connect_replaces_trusted_client_address(install):
    ctx = install(make_live())
    open_session(ctx, "127.0.0.1")
    mail(ctx)
    assert rcpt(ctx, "<user@remote.test>") == Milter.CONTINUE
    connect_again(ctx, UNTRUSTED_IP)
    mail(ctx)
    assert rcpt(ctx, "<user@remote.test>") == Milter.REJECT


def test_second_connect_clears_a_fault_of_the_first_session(install):
    ctx = install(make_live(), ctx_class=lambda: ContextFailingAt(Milter.M_CONNECT, times=1))
    open_session(ctx, UNTRUSTED_IP)
    mail(ctx)
    assert rcpt(ctx, "<user@local.test>") == Milter.TEMPFAIL
    connect_again(ctx, UNTRUSTED_IP)
    mail(ctx)
    assert rcpt(ctx, "<user@local.test>") == Milter.CONTINUE


# ------------------------------------------------------------ macro warnings ---

def _macro_warnings(caplog, macro: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "relaymilter.milter" and r.levelno == logging.WARNING
            and macro in r.getMessage()]


def test_missing_rcpt_addr_is_warned_once_per_macro_warnings(install, caplog):
    live = make_live()
    warnings = MacroWarnings()
    for _ in range(2):                      # two connections ...
        ctx = install(live, warnings)
        open_session(ctx, UNTRUSTED_IP)
        for _ in range(2):                  # ... of two messages each
            mail(ctx)
            rcpt(ctx, "<user@local.test>")
    assert len(_macro_warnings(caplog, "{rcpt_addr}")) == 1


def test_each_macro_warnings_instance_warns_on_its_own(install, caplog):
    live = make_live()
    for _ in range(2):
        ctx = install(live, MacroWarnings())
        open_session(ctx, UNTRUSTED_IP)
        mail(ctx)
        rcpt(ctx, "<user@local.test>")
    assert len(_macro_warnings(caplog, "{rcpt_addr}")) == 2


def test_present_rcpt_addr_is_not_warned_about(install, caplog):
    ctx = install(make_live())
    open_session(ctx, UNTRUSTED_IP)
    mail(ctx)
    ctx._setsymval("{rcpt_addr}", "user@local.test")
    rcpt(ctx, "<user@local.test>")
    assert _macro_warnings(caplog, "{rcpt_addr}") == []


def test_missing_j_macro_at_connect_is_warned_once(install, caplog):
    live = make_live()
    warnings = MacroWarnings()
    for _ in range(2):
        ctx = install(live, warnings)
        del ctx._macros["j"]
        open_session(ctx, UNTRUSTED_IP)
    [record] = _macro_warnings(caplog, " j ")
    assert "connect" in record.getMessage()


def test_exception_under_dry_run_continues_and_logs_the_recipient(install, caplog):
    # dry_run promises no effect on mail: faults are logged, not answered.
    caplog.set_level(logging.INFO, logger="relaymilter.decision")
    live = make_live(decisions={"dry_run": True})
    ctx = install(live)
    open_session(ctx, UNTRUSTED_IP)
    mail(ctx)
    live.snapshot = SnapshotWithBrokenRules(live.snapshot.config)
    caplog.clear()
    assert rcpt(ctx, "<user@local.test>") == Milter.CONTINUE
    assert ctx._reply is None
    lines = [r.getMessage() for r in caplog.records if "internal-error" in r.getMessage()]
    assert lines and "to=<user@local.test>" in lines[0] and "would" in lines[0]


class ContextWithUndecodableRcptAddr(Context):
    """Postfix with smtputf8_enable = no: pymilter cannot decode {rcpt_addr}."""

    def getsymval(self, name):
        if name == "{rcpt_addr}":
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return super().getsymval(name)


def test_undecodable_rcpt_addr_macro_is_bad_syntax_not_a_fault(install, caplog):
    ctx = install(make_live(), ctx_class=ContextWithUndecodableRcptAddr)
    open_session(ctx, UNTRUSTED_IP)
    mail(ctx)
    assert rcpt(ctx, "<us\udcffer@local.test>") == Milter.REJECT
    assert ctx._reply == ("501", "5.1.3", "Bad recipient address syntax")
    assert rcpt(ctx, "<user@local.test>") == Milter.REJECT      # cross-check fails closed
    assert ctx._reply[:2] == ("554", "5.7.1")
    assert not tracebacks(caplog)
