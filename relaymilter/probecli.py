"""probecli - `relaymilter probe`: is this server an open relay?

NAME
    relaymilter probe - try every relay form against an SMTP server, send no message

SYNOPSIS
    relaymilter probe HOST[:PORT] [--relay-domain D] [--local-domain D] [--json] ...
    relaymilter probe --self [-c FILE] [HOST[:PORT]] ...

DESCRIPTION
    Runs probe.run_probe() and prints one row per form (form, recipient,
    reply, verdict) and a summary, or JSON. --self probes the local MTA
    (127.0.0.1:25 unless HOST says otherwise) with the local domains of
    relaymilter's config, as another client when the MTA offers XCLIENT
    to us (--as, default 192.0.2.1): from loopback, which an MTA trusts,
    a relay accepted would prove nothing, and the probe says so.

    The password of --auth comes from --password-file or the environment
    variable RELAYMILTER_PROBE_PASSWORD, never from the command line
    (where `ps` shows it to every user).

    Exit status: 0 closed (every form refused), 1 open (a form relayed),
    69 unreachable, 75 not proven (a form deferred or cut off, none
    relayed), 77 closed but --auth could not log in, 64 bad usage, 70 a
    bug (never 1).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from relaymilter.exitcodes import (EX_ERROR, EX_NOPERM, EX_OK, EX_SOFTWARE, EX_TEMPFAIL,
                                   EX_UNAVAILABLE, EX_USAGE)
from relaymilter.text import one_line

if TYPE_CHECKING:       # smtplib and ssl only when a probe runs
    import ssl

    from relaymilter.config import Config
    from relaymilter.probe import ProbeOptions, Report, Row

PASSWORD_VARIABLE = "RELAYMILTER_PROBE_PASSWORD"
SELF_AS = "192.0.2.1"       # TEST-NET-1: a client no MTA trusts
EXIT = {"closed": EX_OK, "open": EX_ERROR, "deferred": EX_TEMPFAIL}


def add_probe_verb(verb: Any) -> None:
    probe = verb("probe", cmd_probe, "try every relay form against an SMTP server and say "
                 "whether it is an open relay; no message is sent (exit 0 closed, 1 open, "
                 "69 unreachable, 75 not proven)")
    probe.add_argument("server", nargs="?", metavar="HOST[:PORT]",
                       help="the server (with --self: default 127.0.0.1:25)")
    probe.add_argument("--self", action="store_true", dest="self_probe",
                       help="probe the local MTA with the config's local domains")
    probe.add_argument("--port", type=int, help="the SMTP port (default 25)")
    probe.add_argument("--source", metavar="ADDR", help="the local address to connect from")
    probe.add_argument("--helo", default="relaytest.invalid", metavar="NAME",
                       help="the HELO name (default relaytest.invalid)")
    probe.add_argument("--from", dest="sender", metavar="ADDR",
                       help="MAIL FROM (default relaytest@RELAY_DOMAIN)")
    probe.add_argument("--local-domain", metavar="D",
                       help="a domain the server takes mail for (default: the name in its "
                            "greeting; with --self, the config's first local domain)")
    probe.add_argument("--relay-domain", default=None, metavar="D",
                       help="a domain the server must not relay to (default example.com)")
    probe.add_argument("--as", dest="xclient", metavar="ADDR",
                       help="be seen as client ADDR through XCLIENT, when the server offers "
                            f"it (with --self: default {SELF_AS})")
    probe.add_argument("--starttls", action="store_true", help="STARTTLS before probing")
    probe.add_argument("--tls-cafile", metavar="FILE",
                       help="trust these CA certificates for STARTTLS (default: the system's)")
    probe.add_argument("--tls-no-verify", action="store_true",
                       help="do not verify the server's certificate")
    probe.add_argument("--auth", metavar="USER",
                       help="also log in as USER and show that authenticated relaying works "
                            f"(password: --password-file or ${PASSWORD_VARIABLE})")
    probe.add_argument("--password-file", metavar="FILE", help="the --auth password, its "
                                                                 "first line")
    probe.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                       help="for connecting and for each reply (default 30)")
    probe.add_argument("--json", action="store_true", help="JSON instead of a table")


def cmd_probe(args: argparse.Namespace) -> int:
    from relaymilter.probe import NoLocalDomain, Unreachable, run_probe
    config = None
    if args.self_probe:
        from relaymilter.config import config_path, load_config
        config = load_config(config_path(args.config))
    try:
        options = _options(args, config)
    except ValueError as error:
        sys.stderr.write(f"relaymilter probe: {error}\n")
        return EX_USAGE
    try:
        report = run_probe(options)
    except Unreachable as error:
        sys.stderr.write(f"relaymilter probe: {error}\n")
        return EX_UNAVAILABLE
    except NoLocalDomain as error:
        sys.stderr.write(f"relaymilter probe: {error}\n")
        return EX_USAGE
    except Exception as error:      # a bug must not read as 1, "open"
        sys.stderr.write(f"relaymilter probe: internal error: {type(error).__name__}: "
                         f"{one_line(str(error))}\n")
        return EX_SOFTWARE
    if config is not None and report.xclient is None:
        trusted = _trusted_source(args, config)
        if trusted:
            report.notes.append(f"we connected from {trusted}, which trusted_networks has: "
                                "the MTA may let us relay for that; use --source with an "
                                "address it does not trust, or let us use XCLIENT "
                                "(smtpd_authorized_xclient_hosts)")
    (_json if args.json else _table)(report)
    status = EXIT[report.verdict]
    if status == EX_OK and options.auth and (report.authenticated is None
                                             or report.authenticated.verdict != "relayed"):
        return EX_NOPERM
    return status


def _options(args: argparse.Namespace, config: "Config | None") -> "ProbeOptions":
    """The probe's options; config: relaymilter's, for --self."""
    from relaymilter.probe import ProbeOptions, resolve_port
    local, relay = args.local_domain, args.relay_domain
    xclient = args.xclient
    server = args.server
    if config is not None:
        domains = [domain for domain in config.relay.local_domains if not domain.startswith(".")]
        local = local or (domains[0] if domains else None)
        if local is None:
            raise ValueError("the config names no local domain: give --local-domain")
        relay = relay or next(candidate for candidate in ("example.com", "example.net",
                                                          "example.org")
                              if candidate not in config.relay.local_domains)
        xclient = xclient or SELF_AS
        server = server or "127.0.0.1"
    elif server is None:
        raise ValueError("name a server (HOST[:PORT]) or --self")
    try:
        host, port = resolve_port(server)
    except ValueError:
        raise ValueError(f"{server!r}: not HOST[:PORT]") from None
    if args.port is not None:
        port = args.port
    if xclient is not None:
        try:
            ipaddress.ip_address(xclient)
        except ValueError:
            raise ValueError(f"--as {xclient!r}: not an IP address") from None
    return ProbeOptions(
        host=host, port=port, relay_domain=relay or "example.com", local_domain=local,
        helo=args.helo, sender=args.sender, source=args.source, starttls=args.starttls,
        tls_context=_tls_context(args) if args.starttls else None, xclient=xclient,
        auth=(args.auth, _password(args)) if args.auth else None, timeout=args.timeout)


def _tls_context(args: argparse.Namespace) -> "ssl.SSLContext":
    import ssl
    context = ssl.create_default_context(cafile=args.tls_cafile)
    if args.tls_no_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _password(args: argparse.Namespace) -> str:
    if args.password_file:
        try:
            with open(args.password_file, encoding="utf-8") as stream:
                return stream.readline().rstrip("\r\n")
        except OSError as error:
            raise ValueError(f"--password-file: {error.strerror}: {args.password_file}") \
                from None
    password = os.environ.get(PASSWORD_VARIABLE)
    if password is None:
        raise ValueError(f"--auth needs a password: --password-file FILE or "
                         f"${PASSWORD_VARIABLE}")
    return password


def _trusted_source(args: argparse.Namespace, config: "Config") -> str | None:
    """The source we connect from, when the config trusts it (as loopback is)."""
    from relaymilter.relay import RelayRules
    rules = RelayRules.build(trusted_networks=config.relay.trusted_networks)
    source = ipaddress.ip_address(args.source or "127.0.0.1")
    return str(source) if any(source in network for network in rules.trusted_networks) \
        else None


def _row(row: "Row") -> dict[str, Any]:
    return {"form": row.form.name, "sender": row.form.sender, "recipient": row.form.recipient,
            "helo": row.form.helo, "mail_parameters": row.form.mail_parameters,
            "stage": row.stage, "code": row.code, "reply": row.reply, "verdict": row.verdict}


def _json(report: "Report") -> None:
    document = {"server": report.server, "greeting": report.greeting,
                "local_domain": report.local_domain, "relay_domain": report.relay_domain,
                "tls": report.tls, "as_client": report.xclient,
                "control": None if report.control is None else _row(report.control),
                "forms": [_row(row) for row in report.rows],
                "authenticated": (None if report.authenticated is None
                                  else _row(report.authenticated)),
                "counts": report.counts(), "notes": report.notes, "verdict": report.verdict}
    sys.stdout.write(json.dumps(document, indent=1, ensure_ascii=False) + "\n")


def _table(report: "Report") -> None:
    write = sys.stdout.write
    write(f"probing {report.server}: {report.greeting}\n")
    write(f"local domain {report.local_domain or '-'}, relay domain {report.relay_domain}"
          + (", over TLS" if report.tls else "")
          + (f", seen as client {report.xclient}" if report.xclient else "") + "\n\n")
    rows = ([report.control] if report.control else []) + report.rows
    if report.authenticated is not None:
        rows.append(report.authenticated._replace(
            form=report.authenticated.form._replace(name="authenticated")))
    if rows:
        width = max(len(row.form.name) for row in rows) + 2
        rwidth = min(48, max(len(row.form.recipient) for row in rows)) + 2
        write(f"{'form':<{width}}{'recipient':<{rwidth}}{'verdict':<10}reply\n")
        for row in rows:
            stage = f"at {row.stage}: " if row.stage and row.stage != "RCPT" else ""
            code = f"{row.code} " if row.code is not None else ""
            write(f"{row.form.name:<{width}}{row.form.recipient:<{rwidth - 2}}  "
                  f"{row.verdict:<10}{stage}{code}{row.reply}\n")
        write("\n")
    for note in report.notes:
        write(f"note: {note}\n")
    counts = report.counts()
    tried = sum(counts.values()) - counts["skipped"]
    if report.verdict == "open":
        relayed = ", ".join(row.form.name for row in report.rows if row.verdict == "relayed")
        write(f"OPEN RELAY: {counts['relayed']} of {tried} forms accepted for "
              f"{report.relay_domain}: {relayed}\n")
    elif report.verdict == "closed":
        write(f"closed: {counts['refused']} of {tried} forms refused"
              + (f", {counts['skipped']} skipped" if counts["skipped"] else "") + "\n")
    else:
        write(f"not proven: {counts['deferred']} of {tried} forms deferred or cut off, "
              f"{counts['refused']} refused, none accepted; try again later\n")
    if report.authenticated is not None:
        ok = report.authenticated.verdict == "relayed"
        write(f"authenticated: {'relaying allowed' if ok else 'relaying NOT allowed'} "
              f"({report.authenticated.reply})\n")
