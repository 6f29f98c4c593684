"""cli - the relaymilter command and its verbs.

NAME
    relaymilter - run the milter, check its configuration

SYNOPSIS
    relaymilter run [-c FILE] [--syslog] [--debug]
    relaymilter check-config [-c FILE]
    relaymilter lookup IP [-c FILE] [--health]
    relaymilter allowlist|relay-client|hold|limit|domain add|remove|list ...
    relaymilter policy export|import ...        (storecli.py)
    relaymilter --version

DESCRIPTION
    The config file is -c FILE, else $RELAYMILTER_CONFIG, else
    /etc/relaymilter/relaymilter.toml. Exit codes follow sysexits(3):
    0 ok, 64 usage, 69 socket unavailable (or in use by a running
    instance, or a metrics listener that cannot bind), 78 bad
    configuration, 1 other.

    `run` and `policyd` stop on SIGTERM or SIGINT (exit 0); SIGHUP reloads
    the config and the store and never stops them (see _serve).

    The verbs only parse arguments and call the modules that own the work.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import logging
import logging.handlers
import os
import signal
import socket
import sys
import threading

from relaymilter import __version__
from relaymilter.config import Config, ConfigError, config_path, load_config
from relaymilter.dnsbl import report_lines
from relaymilter.endpoint import parse_socket
from relaymilter.engine import Engine
from relaymilter.exitcodes import (EX_CONFIG, EX_LISTED, EX_NOINPUT, EX_OK, EX_TEMPFAIL,
                                   EX_UNAVAILABLE, EX_USAGE)
from relaymilter.explain import Question, exemptions, exit_status, explain, open_domain_policy
from relaymilter.explain import report_lines as explain_lines
from relaymilter.reload import NO_LOCAL_DOMAINS, build_dnsbl, build_snapshot
from relaymilter.runtime import Runtime
from relaymilter.metrics import MetricsListener, MetricsUnavailable, make_recorder
from relaymilter.recorder import Recorder
from relaymilter.openstore import open_store
from relaymilter.store import StoreError
from relaymilter.storecli import add_policy_verbs
from relaymilter.probecli import add_probe_verb
from relaymilter.topcli import add_top_verb
from relaymilter.text import one_line
from relaymilter.address import parse_ip
from relaymilter.relay import RelayRules, Trust, client_trust
from relaymilter.sessionwatch import SessionWatch
from relaymilter.socketclaim import claim_socket
from relaymilter.zones import Status

# Blocked while the daemons start their threads, which inherit the mask; see _serve.
DAEMON_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
# Each front end's metrics listener: one config serves both daemons at once.
METRICS_KEYS = {"milter": "metrics.listen", "policyd": "metrics.policyd_listen"}

log = logging.getLogger("relaymilter")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2; sysexits says 64
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


class _PostfixStyleFormatter(logging.Formatter):
    """INFO lines bare, others prefixed "warning: ", "error: " as Postfix does.

    Every message is made one line (text.one_line): client text that a log
    call forgot to escape still cannot split or forge a line. A traceback,
    formatted apart, keeps its lines.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = one_line(record.message)
        # The severity goes after "relaymilter[PID]: ", where Postfix puts it.
        if record.levelno >= logging.WARNING:
            message = f"{record.levelname.lower()}: {message}"
        if message is not record.message:
            record = logging.makeLogRecord(record.__dict__)
            record.message = message
        return super().formatMessage(record)


SYSLOG_SOCKET = "/dev/log"


class SyslogUnavailable(Exception):
    """--syslog, but no syslog daemon listens on SYSLOG_SOCKET."""


def setup_logging(use_syslog: bool, debug: bool) -> None:
    """Log to syslog (facility mail) or standard error. Raises SyslogUnavailable."""
    root = logging.getLogger()
    root.handlers.clear()
    if use_syslog:
        # SysLogHandler connects lazily and then fails on every line with a
        # traceback of its own: find out now, once.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            probe.connect(SYSLOG_SOCKET)
        except OSError as error:
            raise SyslogUnavailable(
                f"--syslog: nothing listens on {SYSLOG_SOCKET} ({error.strerror}): start a "
                "syslog daemon (rsyslog, systemd-journald), or leave --syslog out to log to "
                "standard error") from None
        finally:
            probe.close()
        handler: logging.Handler = logging.handlers.SysLogHandler(
            address=SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_MAIL)
        handler.setFormatter(_PostfixStyleFormatter(f"relaymilter[{os.getpid()}]: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_PostfixStyleFormatter(
            f"%(asctime)s relaymilter[{os.getpid()}]: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def attach_lines(milter_socket: str) -> list[str]:
    """The MTA configuration lines that connect Postfix and Sendmail to us."""
    # Sendmail takes libmilter's syntax, so it gets the socket as written.
    return [
        f"Postfix main.cf:  smtpd_milters = {parse_socket(milter_socket).postfix}",
        "                  milter_default_action = tempfail",
        f"Sendmail .mc:     INPUT_MAIL_FILTER(`relaymilter', "
        f"`S={milter_socket}, F=T, T=C:10s;S:10s;R:20s;E:5m')dnl",
    ]


def metrics_recorder(config, front_end: str = "milter") -> Recorder:
    """The recorder [metrics] asks for; ConfigError when it cannot be had."""
    try:
        return make_recorder(config.metrics, front_end)
    except MetricsUnavailable as error:
        raise ConfigError(config.path, METRICS_KEYS[front_end], str(error)) from None


def cmd_check_config(args: argparse.Namespace) -> int:
    path = config_path(args.config)
    config = load_config(path)
    metrics_recorder(config, "milter")
    metrics_recorder(config, "policyd")
    snapshot = build_snapshot(config)
    if snapshot.dnsbl is not None:
        snapshot.dnsbl.close()
    sys.stdout.write(f"# {path}: OK ({snapshot.local_domain_count} local domains, "
                     f"{len(config.dnsbl.zones)} DNSBL zones)\n")
    if snapshot.local_domain_count == 0:
        sys.stdout.write(f"# warning: {NO_LOCAL_DOMAINS}\n")
    sys.stdout.write(config.effective_toml())
    for line in attach_lines(config.milter.socket):
        sys.stdout.write(f"# {line}\n")
    return EX_OK


def cmd_lookup(args: argparse.Namespace) -> int:
    """Ask every configured zone about one address; print the answers and verdict.

    Exit 0 not listed, 2 listed, 75 not listed but a zone gave no answer.
    """
    try:
        address = parse_ip(args.address)
    except ValueError:
        sys.stderr.write(f"relaymilter: {args.address!r} is not an IP address\n")
        return EX_USAGE
    setup_logging(use_syslog=False, debug=False)
    config = load_config(config_path(args.config))
    checker = build_dnsbl(config)
    if checker is None:
        sys.stdout.write(f"{address}: no DNSBL zones configured in {config.path}\n")
        return EX_OK
    with checker:
        if args.health:
            for report in checker.check_health():
                state = "enabled" if report.enabled else "DISABLED"
                detail = f": {report.detail}" if report.detail else ""
                sys.stdout.write(f"# health {report.zone.display_name}: {report.health.value}, "
                                 f"{state}{detail}\n")
        result = checker.lookup(address)
        trust = client_trust(address, None, build_snapshot_rules(config))
    if trust is not Trust.UNTRUSTED:
        sys.stdout.write(f"# {address} is in trusted_networks: relaymilter does not look it up\n")
    sys.stdout.write("\n".join(report_lines(result)) + "\n")
    if result.listed:
        store = open_domain_policy(config)
        try:
            for entry in exemptions(store.storage, address):
                sys.stdout.write(f"# exempted from the listing by {entry}\n")
        finally:
            if store.storage is not None:
                store.storage.close()
        return EX_LISTED
    if any(answer.status in (Status.TIMEOUT, Status.DNS_FAILURE) for answer in result.answers):
        sys.stdout.write(f"# not every zone answered: {address} may be listed\n")
        return EX_TEMPFAIL
    return EX_OK


def cmd_explain(args: argparse.Namespace) -> int:
    """The decision for one transaction and every check behind it."""
    setup_logging(use_syslog=False, debug=False)
    config = load_config(config_path(args.config))
    question = Question(client=args.client, recipients=args.rcpt, helo=args.helo or "",
                        sender=args.sender, sasl_user=args.sasl_user)
    try:
        report = explain(config, question)
    except ValueError:
        sys.stderr.write(f"relaymilter: {args.client!r} is not an IP address\n")
        return EX_USAGE
    if args.json:
        sys.stdout.write(json.dumps(report, indent=1, sort_keys=True) + "\n")
    else:
        sys.stdout.write("\n".join(explain_lines(report)) + "\n")
    return exit_status(report)


def build_snapshot_rules(config) -> RelayRules:
    """Trusted networks only: enough to tell whether an address is looked up."""
    return RelayRules.build(trusted_networks=config.relay.trusted_networks)


def cmd_run(args: argparse.Namespace) -> int:
    """The milter."""
    return _serve(args, "milter")


def cmd_policyd(args: argparse.Namespace) -> int:
    """The same policy as a Postfix policy service, in [policyd] workers processes."""
    if load_config(config_path(args.config)).policyd.workers > 1:
        return _serve_workers(args)
    return _serve(args, "policyd")


def _serve_workers(args: argparse.Namespace) -> int:
    """[policyd] workers > 1: bind the socket here, then supervise the workers
    (workers.py), each a whole policy service on that socket."""
    setup_logging(args.syslog, args.debug)
    path = config_path(args.config)
    config = load_config(path)
    count = config.policyd.workers
    refusal = _per_process_limits(config)
    if refusal:
        raise ConfigError(path, "policyd.workers", f"{count} workers would each allow the "
                          f"whole outbound limit: {refusal}; set [counters] url (Redis) to "
                          "count them together, or workers = 1")
    from relaymilter import policyd, workers
    try:
        listener = policyd.open_listener(config.policyd.socket, config.policyd.mode)
    except OSError as error:
        log.error("%s", error)
        return EX_UNAVAILABLE
    spec = parse_socket(config.policyd.socket)
    return workers.supervise(count, lambda number: _serve(args, "policyd", number, listener),
                             spec.path if spec.kind == "unix" else None)



def _per_process_limits(config: Config) -> str | None:
    """Why several workers would count limits apart (None: they would not)."""
    if config.counters.url is not None or config.store.location is None:
        return None
    try:
        with open_store(config.store.location, create=False) as store:
            limits = len(store.list_limits())
    except (StoreError, OSError):
        return None         # no store yet, or unreadable: no limits to count apart
    if not limits:
        return None
    return f"the policy store holds {limits} limit{'s' if limits > 1 else ''} and " \
           "[counters] url is not set"


def _serve(args: argparse.Namespace, front_end: str, worker: int = 0,
           policy_socket: socket.socket | None = None) -> int:
    """Run one front end until SIGTERM or SIGINT; SIGHUP reloads, never stops.

    Signals: every thread started here inherits SIGTERM, SIGINT and SIGHUP
    blocked. The milter runs libmilter on a thread of its own, whose
    signal thread collects SIGTERM and SIGINT with sigwait() and stops;
    the main thread alone leaves SIGHUP unblocked and handles it (Linux
    hands a signal sent to the process to its main thread first when that
    thread does not block it), so libmilter, which would stop on SIGHUP
    too, never sees it. The policy service handles all three on the main
    thread (policyd.serve).
    """
    setup_logging(args.syslog, args.debug)       # again in a worker: its own pid
    path = config_path(args.config)
    config = load_config(path)
    recorder = metrics_recorder(config, front_end)
    socket_text = config.milter.socket if front_end == "milter" else config.policyd.socket
    signal.pthread_sigmask(signal.SIG_BLOCK, DAEMON_SIGNALS)
    if front_end == "milter":
        # libmilter opens its socket itself; the policy service claims its
        # own as it binds (policyd._listen).
        try:
            claim_socket(socket_text)
        except OSError as error:
            log.error("%s", error)
            return EX_UNAVAILABLE
    metrics_key = METRICS_KEYS[front_end]
    metrics_address = config.metrics.address if front_end == "milter" \
        else config.metrics.policyd_address
    if metrics_address is not None and worker > 1:      # one listener per worker
        metrics_address = (metrics_address[0], metrics_address[1] + worker - 1)
    listener = runtime = None
    try:
        if metrics_address is not None:
            try:    # bound before any thread starts: a failure leaves nothing behind
                listener = MetricsListener(metrics_address, recorder, lambda: runtime.snapshot)
            except OSError as error:
                log.error("%s: %s: %s", path, metrics_key, error)
                return EX_UNAVAILABLE
        runtime = Runtime.start(config, metrics=recorder)
        if worker == 1:         # one of several: the first says what they all do
            runtime.workers_counting_apart = config.policyd.workers
        log.info("relaymilter %s %s starting on %s with %s (%d local domains%s)", __version__,
                 front_end, socket_text, path, runtime.snapshot.local_domain_count,
                 ", dry run" if config.decisions.dry_run else "")
        lines = attach_lines(socket_text) if front_end == "milter" \
            else policyd_lines(socket_text)
        for line in lines:
            log.info("%s", line)
        if front_end == "policyd" and config.dnsbl.zones \
                and config.dnsbl.reject_stage == "connect":
            log.warning("%s: dnsbl.reject_stage = \"connect\" has no effect on the policy "
                        "service: it decides at RCPT, postmaster exempt", path)
        runtime.load_domain_policy()
        runtime.watch(interval=1.0)
        runtime.check_health()
        _tune_collector()
        engine = Engine(runtime)
        if listener is not None:
            if config.counters.url is not None:
                listener.share_tops(config.counters.url, config.counters.timeout_ms / 1000)
            listener.start()
            log.info("metrics on %s/metrics, health check on %s/healthz",
                     listener.url, listener.url)
        if front_end == "milter":
            _serve_milter(engine, runtime, recorder)
        else:
            from relaymilter import policyd
            policyd.serve(engine, reload=runtime.reload_now, listener=policy_socket)
    except OSError as error:
        log.error("%s", error)
        return EX_UNAVAILABLE
    finally:
        if listener is not None:
            listener.stop()
        if runtime is not None:
            runtime.stop()
    log.info("relaymilter stopped")
    return EX_OK


def _tune_collector() -> None:
    """Keep the cyclic garbage collector out of the hot path.

    A daemon makes many small, acyclic objects per request, freed by
    reference counting. The collector's defaults (a pass every 700
    allocations, and full passes over a heap that holds the whole policy
    snapshot) cost about a quarter of a cold policy request's CPU. What is
    loaded by now (config, snapshot) is frozen out of its passes, and the
    young generation is collected every 50000 allocations.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _serve_milter(engine: Engine, runtime: Runtime, recorder: Recorder) -> None:
    """libmilter on a thread; the main thread takes SIGHUP (see _serve). Raises OSError."""
    from relaymilter import milter  # pymilter is imported only where it is used
    failed: list[OSError] = []
    settings = runtime.snapshot.config.milter
    sessions = SessionWatch(parse_socket(settings.socket), settings.session_timeout, recorder)

    def run() -> None:
        try:
            milter.serve(engine)
        except OSError as error:
            failed.append(error)

    sessions.start()
    signal.signal(signal.SIGHUP, lambda signum, frame: runtime.reload_now())
    thread = threading.Thread(target=run, name="milter")
    thread.start()
    # At once: a HUP that arrives before this thread takes it would go to
    # libmilter's signal thread, which stops on it.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    try:
        thread.join()   # interrupted by SIGHUP to run the handler, then waits on
    finally:
        sessions.stop()
    if failed:
        raise failed[0]


def policyd_lines(policyd_socket: str) -> list[str]:
    """The main.cf lines that put the policy service in front of relaying."""
    where = parse_socket(policyd_socket).postfix
    return [f"Postfix main.cf:  smtpd_relay_restrictions = check_policy_service {where},",
            "                      reject_unauth_destination",
            "                  smtpd_policy_service_default_action = 451 4.3.5 "
            "Policy service unavailable"]


DEFAULT_MAIL_LOG = "/var/log/mail.log"


def cmd_report(args: argparse.Namespace) -> int:
    """relaymilter report: read the logs, print the summary."""
    import gzip

    from relaymilter.report import Summary, text_lines
    summary = Summary()
    for name in args.logfiles or [DEFAULT_MAIL_LOG]:
        try:
            if name == "-":
                stream = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace")
            elif name.endswith(".gz"):
                stream = gzip.open(name, "rt", encoding="utf-8", errors="replace")
            else:
                stream = open(name, encoding="utf-8", errors="replace")
            with stream:
                for line in stream:
                    summary.add_line(line)
        except (OSError, EOFError) as error:
            sys.stderr.write(f"relaymilter report: {name}: "
                             f"{getattr(error, 'strerror', None) or error}\n")
            return EX_NOINPUT
    document = summary.document(top=max(1, args.top))
    if args.json:
        sys.stdout.write(json.dumps(document, indent=1) + "\n")
    else:
        sys.stdout.write("\n".join(text_lines(document)) + "\n")
    return EX_OK


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="relaymilter",
                     description="Milter that closes open relays and keeps listed relays out.")
    parser.add_argument("--version", action="version", version=f"relaymilter {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    verbs.required = True

    def verb(name: str, handler, help_text: str) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("-c", "--config", metavar="FILE",
                         help="config file (default: $RELAYMILTER_CONFIG or "
                              "/etc/relaymilter/relaymilter.toml)")
        sub.set_defaults(handler=handler)
        return sub

    run = verb("run", cmd_run, "run the milter in the foreground")
    run.add_argument("--syslog", action="store_true", help="log to syslog, facility mail")
    run.add_argument("--debug", action="store_true", help="also log every permit decision")
    policyd = verb("policyd", cmd_policyd,
                   "the same policy as a Postfix policy service (check_policy_service)")
    policyd.add_argument("--syslog", action="store_true", help="log to syslog, facility mail")
    policyd.add_argument("--debug", action="store_true", help="also log every permit decision")
    verb("check-config", cmd_check_config, "validate the config and print the effective values")
    lookup = verb("lookup", cmd_lookup,
                  "ask every DNSBL/DNSWL zone about one address and print the verdict")
    lookup.add_argument("address", metavar="IP", help="IPv4 or IPv6 address")
    lookup.add_argument("--health", action="store_true",
                        help="first run the zones' RFC 5782 health checks")
    explain_verb = verb("explain", cmd_explain,
                        "the decision the config, the domain policy and DNS give now for one "
                        "transaction, and every check behind it (exit 0 accepted, 2 refused, "
                        "3 deferred)")
    explain_verb.add_argument("--client", required=True, metavar="IP",
                              help="the client's IPv4 or IPv6 address")
    explain_verb.add_argument("--helo", metavar="NAME", help="the HELO name")
    explain_verb.add_argument("--sender", default="<>", metavar="ADDR",
                              help="MAIL FROM (default: <>)")
    explain_verb.add_argument("--sasl-user", metavar="USER",
                              help="the SASL user name, as if authenticated")
    explain_verb.add_argument("--rcpt", required=True, action="append", metavar="ADDR",
                              help="a recipient (repeatable)")
    explain_verb.add_argument("--json", action="store_true", help="JSON instead of text")
    report = verb("report", cmd_report, "a summary of relaymilter's decisions in mail logs: "
                  "refusals by reason, top clients, users and domains, per day")
    report.add_argument("logfiles", nargs="*", metavar="LOGFILE",
                        help=f"mail logs, .gz ones too; - for standard input (default "
                             f"{DEFAULT_MAIL_LOG})")
    report.add_argument("--top", type=int, default=10, metavar="N",
                        help="entries in each top list (default 10)")
    report.add_argument("--json", action="store_true", help="JSON instead of text")
    add_policy_verbs(verb)
    add_probe_verb(verb)
    add_top_verb(verb)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as error:
        sys.stderr.write(f"relaymilter: fatal: {error}\n")
        return EX_CONFIG
    except SyslogUnavailable as error:
        sys.stderr.write(f"relaymilter: fatal: {error}\n")
        return EX_UNAVAILABLE
    except KeyboardInterrupt:
        return EX_OK
    except BrokenPipeError:     # `relaymilter check-config | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EX_OK
