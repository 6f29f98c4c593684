"""storecli - the verbs that manage the domain policy store.

NAME
    relaymilter allowlist|relay-client|hold|limit|domain|policy - edit the domain policy

SYNOPSIS
    relaymilter allowlist add NETWORK [--domain DOMAIN] [--comment TEXT]
    relaymilter relay-client add NETWORK [--sender-domain DOMAIN]... [--comment TEXT]
    relaymilter hold add (--client NETWORK | --user USER) [--reason TEXT]
    relaymilter limit add (--client NETWORK | --user USER | --default client|user) PER_HOUR
    relaymilter domain add DOMAIN [--dnsbl on|off] [--threshold N] [--owner USER]...
    relaymilter VERB remove ...          same selectors as add
    relaymilter VERB list [--json]
    relaymilter policy export [FILE]     JSON to FILE or standard output
    relaymilter policy import FILE [--replace]

DESCRIPTION
    The domain policy is the store's data (store.py): allowlist, relay
    clients, holds, limits and domains. Every verb takes -c FILE (the
    config that names [store] path) or --store PATH, and opens the store
    with store.open_store(), whatever its backend. A change is one
    transaction; a running milter sees it within two seconds. Bad input (a bad network, domain or user
    name, a bad import row) is refused with a message on standard error and
    exit status 1, and the store is left as it was. No store configured:
    exit status 78.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from relaymilter.config import ConfigError, config_path, load_config
from relaymilter.exitcodes import EX_ERROR, EX_OK
from relaymilter.openstore import open_store
from relaymilter.store import Storage, StoreError, StoreInputError

# (verb, help, list columns)
KINDS = {
    "allowlist": ("DNSBL allowlist: client networks never refused for a DNSBL listing",
                  ("network", "domain", "comment", "added_by", "created")),
    "relay-client": ("client networks allowed to relay, optionally for some sender domains",
                     ("network", "sender_domains", "comment", "added_by", "created")),
    "hold": ("client networks and SASL users whose relaying is suspended",
             ("kind", "value", "reason", "comment", "added_by", "created")),
    "limit": ("outbound recipients per hour, per SASL user and per relaying client",
              ("kind", "value", "per_hour", "comment", "added_by", "created")),
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
        add = actions.add_parser("add", help="add or replace an entry", parents=[common])
        remove = actions.add_parser("remove", help="remove an entry", parents=[common])
        listing = actions.add_parser("list", help="list the entries", parents=[common])
        listing.add_argument("--json", action="store_true", help="JSON instead of a table")
        _SELECTORS[name](add, remove)
        add.add_argument("--comment", default="", help="free text kept with the entry")
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


def _common_options() -> argparse.ArgumentParser:
    """-c and --store, accepted after the action too (`hold add ... -c FILE`)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", dest="action_config", metavar="FILE",
                        help="config file naming [store] path")
    common.add_argument("--store", metavar="PATH",
                        help="the domain policy store (default: [store] path of the config)")
    return common


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


def _who(parser: argparse.ArgumentParser, default: bool = False) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--client", metavar="NETWORK", help="a client address or network")
    group.add_argument("--user", metavar="USER", help="a SASL user name")
    if default:
        group.add_argument("--default", choices=("client", "user"),
                           help="the limit of every client or user without one of its own")


def _hold_selectors(add: argparse.ArgumentParser, remove: argparse.ArgumentParser) -> None:
    _who(add)
    _who(remove)
    add.add_argument("--reason", default="", help="why (shown by list, logged)")


def _limit_selectors(add: argparse.ArgumentParser, remove: argparse.ArgumentParser) -> None:
    _who(add, default=True)
    _who(remove, default=True)
    add.add_argument("per_hour", type=int, metavar="PER_HOUR",
                     help="recipients outside our domains per hour")


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


# ------------------------------------------------------------ handlers ---

def cmd_policy_kind(args: argparse.Namespace) -> int:
    return _with_store(args, lambda store: _KIND_ACTIONS[args.kind](store, args))


def cmd_policy_bulk(args: argparse.Namespace) -> int:
    return _with_store(args, lambda store: _bulk(store, args))


def _with_store(args: argparse.Namespace, work: Callable[[Storage], int]) -> int:
    config_file = config_path(args.action_config or args.config)
    path = args.store or load_config(config_file).store.path
    if not path:
        raise ConfigError(config_file, "store.path",
                          "no policy store configured (set [store] path or use --store)")
    try:
        store = open_store(path)
    except (StoreError, OSError) as error:
        sys.stderr.write(f"relaymilter: cannot open the policy store {path}: {error}\n")
        return EX_ERROR
    try:
        return work(store)
    except StoreInputError as error:
        sys.stderr.write(f"relaymilter: {error}; nothing changed\n")
        return EX_ERROR
    except StoreError as error:
        sys.stderr.write(f"relaymilter: policy store {path}: {error}\n")
        return EX_ERROR
    finally:
        store.close()


def _changed(removed: bool, what: str) -> int:
    if not removed:
        sys.stderr.write(f"relaymilter: no such entry: {what}\n")
        return EX_ERROR
    return EX_OK


def _who_of(args: argparse.Namespace) -> tuple[str, str | None]:
    if getattr(args, "default", None):
        return args.default, None
    return ("client", args.client) if args.client else ("user", args.user)


def _allowlist(store: Storage, args: argparse.Namespace) -> int:
    if args.action == "add":
        store.add_allowlist(args.network, args.domain, comment=args.comment)
        return EX_OK
    if args.action == "remove":
        return _changed(store.remove_allowlist(args.network, args.domain), args.network)
    return _print(store.list_allowlist(), args)


def _relay_client(store: Storage, args: argparse.Namespace) -> int:
    if args.action == "add":
        store.add_relay_client(args.network, args.sender_domain, comment=args.comment)
        return EX_OK
    if args.action == "remove":
        return _changed(store.remove_relay_client(args.network), args.network)
    return _print(store.list_relay_clients(), args)


def _hold(store: Storage, args: argparse.Namespace) -> int:
    if args.action == "list":
        return _print(store.list_holds(), args)
    kind, value = _who_of(args)
    if args.action == "add":
        store.add_hold(kind, value, reason=args.reason, comment=args.comment)
        return EX_OK
    return _changed(store.remove_hold(kind, value), f"{kind} {value}")


def _limit(store: Storage, args: argparse.Namespace) -> int:
    if args.action == "list":
        return _print(store.list_limits(), args)
    kind, value = _who_of(args)
    if args.action == "add":
        store.set_limit(kind, value, args.per_hour, comment=args.comment)
        return EX_OK
    return _changed(store.remove_limit(kind, value), f"{kind} {value or '(default)'}")


def _domain(store: Storage, args: argparse.Namespace) -> int:
    if args.action == "add":
        store.set_domain(args.domain, dnsbl=args.dnsbl, threshold=args.threshold,
                         owners=args.owner, comment=args.comment)
        return EX_OK
    if args.action == "remove":
        return _changed(store.remove_domain(args.domain), args.domain)
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
    try:
        if args.file == "-":
            document = json.load(sys.stdin)
        else:
            with open(args.file, encoding="utf-8") as source:
                document = json.load(source)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        sys.stderr.write(f"relaymilter: cannot read {args.file}: {error}; nothing changed\n")
        return EX_ERROR
    counts = store.import_policy(document, replace=args.replace)
    sys.stdout.write("imported " + ", ".join(f"{count} {kind}" for kind, count in counts.items())
                     + "\n")
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


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value) or "-"
    if isinstance(value, float):
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(value))
    return str(value).replace("\n", " ")
