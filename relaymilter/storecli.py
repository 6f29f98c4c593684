"""storecli - the verbs that manage the domain policy store.

NAME
    relaymilter allowlist|relay-client|hold|limit|domain|policy - edit the domain policy

SYNOPSIS
    relaymilter allowlist add NETWORK [--domain DOMAIN] [--comment TEXT]
    relaymilter relay-client add NETWORK [--sender-domain DOMAIN]... [--comment TEXT]
    relaymilter hold add (--client NETWORK | --user USER) [--reason TEXT] [--for 24h] [--all]
    relaymilter limit add (--client NETWORK | --user USER | --domain DOMAIN |
                          --default client|user) [PER_HOUR] [--per-day N]
                          [--messages-per-hour N] [--messages-per-day N]
    relaymilter limit status|reset (--client ADDRESS | --user USER)   (limitcli.py)
    relaymilter domain add DOMAIN [--dnsbl on|off] [--threshold N] [--owner USER]...
    relaymilter VERB add ... [--replace] replace an entry that says otherwise
    relaymilter VERB remove ...          same selectors as add
    relaymilter VERB list [--json]
    relaymilter policy export [FILE]     JSON to FILE or standard output
    relaymilter policy import FILE [--replace] [--force] [--dry-run]
    relaymilter policy copy --from PATH|URL [--to PATH|URL] [--replace]
    relaymilter history [--since 24h|DATE] [--json]
    relaymilter VERB ... --by NAME       who makes the change (history, added_by)

DESCRIPTION
    The domain policy is the store's data (store.py): allowlist, relay
    clients, holds, limits and domains. Every verb takes -c FILE (the
    config that names [store] path or url) or --store PATH|URL, and opens the store
    with store.open_store(), whatever its backend. A change is one
    transaction; a running milter sees it within two seconds. Bad input (a
    bad network, domain or user name, a bad import row) is refused with a
    message on standard error and exit status 1, and the store is left as
    it was. No store configured: exit status 78. A store whose server
    cannot be reached (PostgreSQL down): exit status 75 (EX_TEMPFAIL),
    nothing changed, try again.

    Safety. Only add and import create a missing store: list, remove and
    export on a store that does not exist exit 66 (EX_NOINPUT), import
    --dry-run compares with an empty one, and none of them creates
    anything. add refuses to replace an entry whose sender domains
    (relay-client), reason (hold) or owners (domain) differ, showing it,
    unless --replace. A relay client wider than /8 or /32 needs --force
    (add, and import rows). A remove that matches nothing shows the
    nearest entries. import --dry-run prints what would be added,
    replaced and removed, per section, and changes nothing.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import ipaddress
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from relaymilter import limitcli
from relaymilter.config import ConfigError, config_path, load_config
from relaymilter.entries import SECTIONS, canonical_domain, import_changes, user_key
from relaymilter.exitcodes import EX_ERROR, EX_NOINPUT, EX_OK, EX_TEMPFAIL
from relaymilter.openstore import open_store
from relaymilter.store import (Storage, StoreError, StoreInputError, StoreMissingError,
                               StoreUnavailableError, WideNetworkError)
from relaymilter.storelocation import display_location

# (verb, help, list columns)
KINDS = {
    "allowlist": ("DNSBL allowlist: client networks never refused for a DNSBL listing",
                  ("network", "domain", "comment", "added_by", "created", "expires")),
    "relay-client": ("client networks allowed to relay, optionally for some sender domains",
                     ("network", "sender_domains", "comment", "added_by", "created",
                      "expires")),
    "hold": ("client networks and SASL users whose relaying is suspended",
             ("kind", "value", "scope", "reason", "comment", "added_by", "created", "expires")),
    "limit": ("outbound recipients and messages per hour and per day, per SASL user and "
              "per relaying client",
              ("kind", "value", "per_hour", "per_day", "messages_per_hour", "messages_per_day",
               "comment", "added_by", "created")),
    "domain": ("hosted domains: DNSBL opt-out or threshold, owners (SASL users)",
               ("domain", "dnsbl", "threshold", "owners", "comment", "added_by", "created")),
}


def add_policy_verbs(verb: Callable[..., argparse.ArgumentParser]) -> None:
    """Register the store verbs; verb(name, handler, help) makes a subparser."""
    common = _common_options()
    for name, (help_text, _) in KINDS.items():
        parser = verb(name, cmd_policy_kind, help_text)
        parser.set_defaults(kind=name)
        actions = parser.add_subparsers(dest="action", metavar="ACTION")
        actions.required = True
        add = actions.add_parser("add", help="add an entry", parents=[common])
        remove = actions.add_parser("remove", help="remove an entry", parents=[common])
        listing = actions.add_parser("list", help="list the entries", parents=[common])
        listing.add_argument("--json", action="store_true", help="JSON instead of a table")
        _SELECTORS[name](add, remove)
        add.add_argument("--comment", default="", help="free text kept with the entry")
        if name in ("allowlist", "relay-client", "hold"):
            _for_option(add)
        if name in _GUARDED:
            add.add_argument("--replace", action="store_true",
                             help=f"replace an entry of the same key whose {_GUARDED[name][1]} "
                                  "differ (refused without it)")
        if name == "limit":
            limitcli.add_counter_actions(actions, common)
    history = verb("history", cmd_history, "every change to the domain policy: when, who, "
                                           "what, oldest first")
    _store_option(history)
    history.set_defaults(action="history", action_config=None, by=None)
    history.add_argument("--since", type=_since, metavar="WHEN",
                         help="only changes since WHEN: a time ago (90m, 24h, 7d) or a date "
                              "and time (2026-12-01, 2026-12-01T08:30, local time)")
    history.add_argument("--json", action="store_true", help="JSON instead of lines")
    policy = verb("policy", cmd_policy_bulk, "export or import the whole domain policy as JSON")
    actions = policy.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    export = actions.add_parser("export", help="write every entry as JSON", parents=[common])
    export.add_argument("file", nargs="?", default="-", help="output file (default: stdout)")
    load = actions.add_parser("import", help="apply a JSON export in one transaction",
                              parents=[common])
    load.add_argument("file", help="input file, - for standard input")
    load.add_argument("--replace", action="store_true",
                      help="delete every entry first (same transaction)")
    load.add_argument("--force", action="store_true",
                      help="accept relay clients wider than /8 (IPv4) or /32 (IPv6)")
    load.add_argument("--dry-run", action="store_true",
                      help="print what would be added, replaced and removed; change nothing")
    copy = actions.add_parser("copy", help="copy every entry from another store (SQLite to "
                                           "PostgreSQL and back), in one transaction",
                              parents=[common])
    copy.add_argument("--from", dest="source", metavar="PATH|URL", required=True,
                      help="the store to copy from (read only)")
    copy.add_argument("--to", dest="target", metavar="PATH|URL",
                      help="the store to copy to, created if missing (default: --store, "
                           "else the config's)")
    copy.add_argument("--replace", action="store_true",
                      help="delete the target's entries first (refused without it when "
                           "the target has entries)")


def _common_options() -> argparse.ArgumentParser:
    """-c, --by and --store, accepted after the action too (`hold add ... -c FILE`)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", dest="action_config", metavar="FILE",
                        help="config file naming [store] path or url")
    common.add_argument("--by", metavar="NAME",
                        help="who makes the change, for the history and added_by (default: "
                             "$SUDO_USER, else the Unix user)")
    _store_option(common)
    return common


def _store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", metavar="PATH|URL",
                        help="the domain policy store: a SQLite file or a postgresql:// URL "
                             "(default: [store] url, else path, of the config)")


def _allowlist_selectors(add: argparse.ArgumentParser, remove: argparse.ArgumentParser) -> None:
    for parser in (add, remove):
        parser.add_argument("network", help="client address or CIDR network")
        parser.add_argument("--domain", help="only for recipients in this domain "
                                             "(default: every domain)")


def _relay_client_selectors(add: argparse.ArgumentParser,
                            remove: argparse.ArgumentParser) -> None:
    for parser in (add, remove):
        parser.add_argument("network", help="client address or CIDR network")
    add.add_argument("--sender-domain", action="append", default=[], metavar="DOMAIN",
                     help="relay only for MAIL FROM in this domain (repeatable)")
    add.add_argument("--force", action="store_true",
                     help="accept a network wider than /8 (IPv4) or /32 (IPv6): an open relay "
                          "for every client in it")


def _who(parser: argparse.ArgumentParser, default: bool = False) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--client", metavar="NETWORK", help="a client address or network")
    group.add_argument("--user", metavar="USER", help="a SASL user name")
    if default:
        group.add_argument("--domain", metavar="DOMAIN",
                           help="the limit of every SASL user USER@DOMAIN without one of its "
                                "own (kept as the user entry @DOMAIN)")
        group.add_argument("--default", choices=("client", "user"),
                           help="the limit of every client or user without one of its own "
                                "(or of its domain)")


def _hold_selectors(add: argparse.ArgumentParser, remove: argparse.ArgumentParser) -> None:
    _who(add)
    _who(remove)
    add.add_argument("--reason", default="", help="why (shown by list, logged)")
    add.add_argument("--all", dest="scope", action="store_const", const="all",
                     default="relay", help="a client only: refuse every recipient it sends, "
                                           "local ones included (as a relay prober is), not "
                                           "only its relaying")


def _for_option(add: argparse.ArgumentParser) -> None:
    add.add_argument("--for", dest="duration", type=_duration, metavar="DURATION",
                     help="end the entry by itself after DURATION: 90m, 24h, 7d, 2w "
                          "(default: until removed)")


def _expires(args: argparse.Namespace) -> float | None:
    return None if args.duration is None else time.time() + args.duration


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _since(text: str) -> float:
    """--since: a duration ago ("24h") or a local date and time -> unix time."""
    try:
        return time.time() - _duration(text)
    except argparse.ArgumentTypeError:
        pass
    try:
        return datetime.datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a time ago (24h, 7d) nor a "
                                         "date and time (2026-12-01T08:30)") from None


def _duration(text: str) -> float:
    """"24h" -> 86400.0: a number and one of the units s, m, h, d, w."""
    number, unit = text.strip()[:-1], text.strip()[-1:].lower()
    try:
        seconds = float(number) * _UNITS[unit]
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: a number and s, m, "
                                         "h, d or w (24h, 7d)") from None
    if not 0 < seconds <= 10 * 365 * 86400:
        raise argparse.ArgumentTypeError(f"{text!r}: from 1 second to 10 years")
    return seconds


def _limit_selectors(add: argparse.ArgumentParser, remove: argparse.ArgumentParser) -> None:
    _who(add, default=True)
    _who(remove, default=True)
    add.add_argument("per_hour", type=int, metavar="PER_HOUR", nargs="?",
                     help="recipients outside our domains per hour")
    add.add_argument("--per-day", type=int, metavar="N",
                     help="recipients outside our domains per day")
    add.add_argument("--messages-per-hour", type=int, metavar="N",
                     help="messages per hour (a message counts once, whatever its "
                          "recipients)")
    add.add_argument("--messages-per-day", type=int, metavar="N", help="messages per day")


def _domain_selectors(add: argparse.ArgumentParser, remove: argparse.ArgumentParser) -> None:
    for parser in (add, remove):
        parser.add_argument("domain", help="a hosted domain")
    add.add_argument("--dnsbl", choices=("on", "off"), default="on",
                     help="off: its recipients get no DNSBL check")
    add.add_argument("--threshold", type=int, help="DNSBL threshold for its recipients")
    add.add_argument("--owner", action="append", default=[], metavar="USER",
                     help="a SASL user that may send as this domain (repeatable); a user "
                          "that owns any domain may relay only with the domains it owns")


_SELECTORS = {"allowlist": _allowlist_selectors, "relay-client": _relay_client_selectors,
              "hold": _hold_selectors, "limit": _limit_selectors, "domain": _domain_selectors}
# verb -> (section, the field an add must not replace unawares, normalised for comparing)
_GUARDED: dict[str, tuple[str, str, Callable[[Any], Any]]] = {
    "relay-client": ("relay_clients", "sender_domains", tuple),
    "hold": ("holds", "reason", str),
    "domain": ("domains", "owners", lambda owners: sorted(map(user_key, owners))),
}


# ------------------------------------------------------------ handlers ---

def cmd_policy_kind(args: argparse.Namespace) -> int:
    if args.kind == "limit" and args.action in ("status", "reset"):
        return limitcli.run(args, config_path(args.action_config or args.config))
    return _with_store(args, lambda store: _KIND_ACTIONS[args.kind](store, args),
                       create=args.action == "add")


def cmd_history(args: argparse.Namespace) -> int:
    return _with_store(args, lambda store: _history(store, args), create=False)


def _history(store: Storage, args: argparse.Namespace) -> int:
    events = store.history(args.since)
    if args.json:
        sys.stdout.write(json.dumps(events, indent=1) + "\n")
        return EX_OK
    for event in events:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["at"]))
        detail = f"  {event['detail']}" if event["detail"] else ""
        sys.stdout.write(f"{when}  {event['actor']}  {event['action']} {event['section']} "
                         f"{event['entry']}{detail}\n")
    return EX_OK


def cmd_policy_bulk(args: argparse.Namespace) -> int:
    if args.action == "copy":
        return _copy(args)
    dry_run = args.action == "import" and args.dry_run
    return _with_store(args, lambda store: _bulk(store, args),
                       create=args.action == "import" and not dry_run,
                       if_missing=(lambda: _dry_run(None, args)) if dry_run else None)


def _with_store(args: argparse.Namespace, work: Callable[[Storage], int], create: bool,
                if_missing: Callable[[], int] | None = None) -> int:
    """work(store) on the store of args; a missing store is created only if create,
    else if_missing() answers, else exit 66."""
    config_file = config_path(args.action_config or args.config)
    location = (getattr(args, "target", None) or args.store
                or load_config(config_file).store.location)
    if not location:
        raise ConfigError(config_file, "store.path",
                          "no policy store configured (set [store] path or url, or use --store)")
    opened = _open(location, create, if_missing, " (nothing created; check --store or "
                                                 "[store] path and url)")
    if isinstance(opened, int):
        return opened
    try:
        return _guarded(lambda: work(opened), display_location(location))
    finally:
        opened.close()


def _open(location: str, create: bool, if_missing: Callable[[], int] | None,
          missing_note: str) -> Storage | int:
    """The store at location; or, after a message on standard error, the exit
    status: 66 missing (unless if_missing() answers), 75 unavailable, 1 else."""
    shown = display_location(location)
    try:
        return open_store(location, create=create)
    except StoreMissingError:
        if if_missing is not None:
            return _guarded(if_missing)
        sys.stderr.write(f"relaymilter: no policy store at {shown}{missing_note}\n")
        return EX_NOINPUT
    except StoreUnavailableError as error:
        sys.stderr.write(f"relaymilter: the policy store is unavailable, nothing changed; "
                         f"try again later: {error}\n")
        return EX_TEMPFAIL
    except (StoreError, OSError) as error:
        sys.stderr.write(f"relaymilter: cannot open the policy store {shown}: {error}\n")
        return EX_ERROR


def _guarded(work: Callable[[], int], shown: str = "") -> int:
    try:
        return work()
    except WideNetworkError as error:
        sys.stderr.write(f"relaymilter: {error}; use --force if that is meant; "
                         "nothing changed\n")
        return EX_ERROR
    except StoreInputError as error:
        sys.stderr.write(f"relaymilter: {error}; nothing changed\n")
        return EX_ERROR
    except StoreUnavailableError as error:
        sys.stderr.write(f"relaymilter: the policy store is unavailable, nothing changed; "
                         f"try again later: {error}\n")
        return EX_TEMPFAIL
    except StoreError as error:
        sys.stderr.write(f"relaymilter: policy store {shown}: {error}\n")
        return EX_ERROR


def _changed(removed: bool, what: str, store: Storage | None = None,
             args: argparse.Namespace | None = None) -> int:
    if not removed:
        sys.stderr.write(f"relaymilter: no such entry: {what}; nothing removed\n")
        if store is not None and args is not None:
            nearest = _nearest(store, args)
            if nearest:
                sys.stderr.write("relaymilter: nearest entries:\n")
                for entry in nearest:
                    sys.stderr.write(f"  {_entry_line(entry, args.kind)}\n")
        return EX_ERROR
    return EX_OK


_SECTION_OF = {"allowlist": "allowlist", "relay-client": "relay_clients", "hold": "holds",
               "limit": "limits", "domain": "domains"}
NEAREST = 5


def _nearest(store: Storage, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The entries a remove that matched nothing probably meant: the same
    network for another domain, networks overlapping the one given, the same
    name of the other kind, names spelt nearly alike."""
    entries = getattr(store, "list_" + _SECTION_OF[args.kind])()
    if args.kind == "domain":
        names = difflib.get_close_matches(args.domain.strip().lower().rstrip("."),
                                          [entry["domain"] for entry in entries], NEAREST)
        return [entry for entry in entries if entry["domain"] in names]
    if args.kind in ("allowlist", "relay-client"):
        wanted = args.network
    else:
        wanted = _who_of(args)[1] or ""
    found = []
    network = _network_or_none(wanted)
    for entry in entries:
        value = entry.get("network", entry.get("value", ""))
        other = _network_or_none(value)
        if network is not None and other is not None and network.version == other.version \
                and network.overlaps(other):
            found.append(entry)
        elif network is None and other is None and wanted and \
                user_key(value) == user_key(wanted.strip()):
            found.append(entry)
    if not found and network is None and wanted:
        names = difflib.get_close_matches(user_key(wanted.strip()),
                                          [user_key(entry["value"]) for entry in entries
                                           if _network_or_none(entry["value"]) is None],
                                          NEAREST)
        found = [entry for entry in entries if user_key(entry["value"]) in names]
    return found[:NEAREST]


def _network_or_none(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        return None


def _refuse_replacing(store: Storage, args: argparse.Namespace, **fields: Any) -> bool:
    """True (and a message) when add would replace an entry that says otherwise
    in its guarded field, and --replace was not given."""
    section_name, field, normal = _GUARDED[args.kind]
    if args.replace:
        return False
    existing = store.entry(section_name, **fields)
    if existing is None:
        return False
    section = SECTIONS[section_name]
    wanted = section.record(fields, 0.0, "-")._asdict()[field]
    if normal(wanted) == normal(existing[field]):
        return False
    sys.stderr.write(f"relaymilter: an entry exists whose {field} differ:\n"
                     f"  {_entry_line(existing, args.kind)}\n"
                     f"relaymilter: add --replace to replace it; nothing changed\n")
    return True


def _who_of(args: argparse.Namespace) -> tuple[str, str | None]:
    if getattr(args, "default", None):
        return args.default, None
    if getattr(args, "domain", None) and args.kind == "limit":
        return "user", "@" + canonical_domain(args.domain)
    return ("client", args.client) if args.client else ("user", args.user)


def _allowlist(store: Storage, args: argparse.Namespace) -> int:
    if args.action == "add":
        store.add_allowlist(args.network, args.domain, comment=args.comment,
                            added_by=args.by, expires=_expires(args))
        return EX_OK
    if args.action == "remove":
        what = args.network + (f" for {args.domain}" if args.domain else "")
        return _changed(store.remove_allowlist(args.network, args.domain, args.by), what,
                        store, args)
    return _print(store.list_allowlist(), args)


def _relay_client(store: Storage, args: argparse.Namespace) -> int:
    if args.action == "add":
        if _refuse_replacing(store, args, network=args.network,
                             sender_domains=args.sender_domain):
            return EX_ERROR
        store.add_relay_client(args.network, args.sender_domain, comment=args.comment,
                               added_by=args.by, force=args.force, expires=_expires(args))
        return EX_OK
    if args.action == "remove":
        return _changed(store.remove_relay_client(args.network, args.by), args.network, store,
                        args)
    return _print(store.list_relay_clients(), args)


def _hold(store: Storage, args: argparse.Namespace) -> int:
    if args.action == "list":
        return _print(store.list_holds(), args)
    kind, value = _who_of(args)
    if args.action == "add":
        if _refuse_replacing(store, args, kind=kind, value=value, reason=args.reason):
            return EX_ERROR
        store.add_hold(kind, value, reason=args.reason, comment=args.comment,
                       added_by=args.by, expires=_expires(args), scope=args.scope)
        return EX_OK
    return _changed(store.remove_hold(kind, value, args.by), f"{kind} {value}", store, args)


def _limit(store: Storage, args: argparse.Namespace) -> int:
    if args.action == "list":
        return _print(store.list_limits(), args)
    kind, value = _who_of(args)
    if args.action == "add":
        store.set_limit(kind, value, args.per_hour, comment=args.comment, added_by=args.by,
                        per_day=args.per_day, messages_per_hour=args.messages_per_hour,
                        messages_per_day=args.messages_per_day)
        return EX_OK
    return _changed(store.remove_limit(kind, value, args.by), f"{kind} {value or '(default)'}",
                    store, args)


def _domain(store: Storage, args: argparse.Namespace) -> int:
    if args.action == "add":
        if _refuse_replacing(store, args, domain=args.domain, owners=args.owner):
            return EX_ERROR
        store.set_domain(args.domain, dnsbl=args.dnsbl, threshold=args.threshold,
                         owners=args.owner, comment=args.comment, added_by=args.by)
        return EX_OK
    if args.action == "remove":
        return _changed(store.remove_domain(args.domain, args.by), args.domain, store, args)
    return _print(store.list_domains(), args)


_KIND_ACTIONS = {"allowlist": _allowlist, "relay-client": _relay_client, "hold": _hold,
                 "limit": _limit, "domain": _domain}


def _bulk(store: Storage, args: argparse.Namespace) -> int:
    if args.action == "export":
        text = json.dumps(store.export(), indent=1, sort_keys=True) + "\n"
        if args.file == "-":
            sys.stdout.write(text)
        else:
            with open(args.file, "w", encoding="utf-8") as output:
                output.write(text)
        return EX_OK
    if args.dry_run:
        return _dry_run(store, args)
    document = _read_document(args.file)
    if document is None:
        return EX_ERROR
    counts = store.import_policy(document, replace=args.replace, force=args.force,
                                 by=args.by)
    sys.stdout.write("imported " + ", ".join(f"{count} {kind}" for kind, count in counts.items())
                     + "\n")
    return EX_OK


def _copy(args: argparse.Namespace) -> int:
    """policy copy: the source's export, imported as it is (creation times, who
    added each entry, wide relay clients the source already had)."""
    shown = display_location(args.source)
    source = _open(args.source, False, None, " to copy from")
    if isinstance(source, int):
        return source
    try:
        document = source.export()
    except StoreError as error:
        sys.stderr.write(f"relaymilter: cannot read {shown}, nothing changed: {error}\n")
        return EX_TEMPFAIL if isinstance(error, StoreUnavailableError) else EX_ERROR
    finally:
        source.close()

    def copy_into(target: Storage) -> int:
        entries = sum(len(rows) for name, rows in target.export().items() if name in SECTIONS)
        if entries and not args.replace:
            sys.stderr.write(f"relaymilter: the target store has {entries} entries: use "
                             "--replace to replace them; nothing changed\n")
            return EX_ERROR
        counts = target.import_policy(document, replace=args.replace, force=True,
                                      by=args.by)
        sys.stdout.write(f"copied from {shown}: "
                         + ", ".join(f"{count} {kind}" for kind, count in counts.items()) + "\n")
        return EX_OK
    return _with_store(args, copy_into, create=True)


def _read_document(file: str) -> Any:
    """The JSON document in file (- for standard input); None after a message."""
    try:
        if file == "-":
            return json.load(sys.stdin)
        with open(file, encoding="utf-8") as source:
            return json.load(source)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        sys.stderr.write(f"relaymilter: cannot read {file}: {error}; nothing changed\n")
        return None


def _dry_run(store: Storage | None, args: argparse.Namespace) -> int:
    """Print what importing args.file would change in store (None: a missing
    store, as empty), per section; write nothing."""
    document = _read_document(args.file)
    if document is None:
        return EX_ERROR
    if store is not None:
        planned = store.import_changes(document, replace=args.replace, force=args.force)
    else:       # a missing store: as an empty one
        planned = import_changes(None, document, args.replace, args.force)
    marks = {"added": "+", "replaced": "~", "removed": "-"}
    for name, section_changes in planned.items():
        counts = ", ".join(f"{len(labels)} {change}" for change, labels in section_changes.items()
                           if change != "removed" or args.replace)
        sys.stdout.write(f"{name}: {counts}\n")
        for change, labels in section_changes.items():
            for text in labels:
                sys.stdout.write(f"  {marks[change]} {text}\n")
    sys.stdout.write("dry run: nothing changed\n")
    return EX_OK


# -------------------------------------------------------------- output ---

def _print(rows: list[dict[str, Any]], args: argparse.Namespace) -> int:
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=1, sort_keys=True) + "\n")
        return EX_OK
    columns = KINDS[args.kind][1]
    table = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max([len(column)] + [len(line[index]) for line in table])
              for index, column in enumerate(columns)]
    for line in [list(columns)] + table:
        sys.stdout.write("  ".join(cell.ljust(width) for cell, width in zip(line, widths))
                         .rstrip() + "\n")
    return EX_OK


def _entry_line(entry: dict[str, Any], kind: str) -> str:
    """One entry as column=value pairs, in the columns of its verb's list."""
    return "  ".join(f"{column}={_cell(entry.get(column))}" for column in KINDS[kind][1])


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value) or "-"
    if isinstance(value, float):
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(value))
    return str(value).replace("\n", " ")
