"""limitcli - how far a sender is into its outbound limit, and a fresh start.

NAME
    relaymilter limit status|reset - the shared count of a SASL user or client

SYNOPSIS
    relaymilter limit status (--user USER | --client ADDRESS) [--json]
    relaymilter limit reset (--user USER | --client ADDRESS)

DESCRIPTION
    With [counters] url (Redis), every relaymilter process counts a sender
    together, and these verbs read and clear that count: status shows, per
    rate of the limit in force (its own, else its domain's, else the
    default of its kind, from the store) and per rate with a count, the
    recipients or messages accepted in the sliding window, the attempts
    (refused ones included), what is left, when the oldest accepted slot
    leaves the window (some allowance comes back) and when the last does
    (the count is zero); reset forgets every count of the sender, so it
    starts again from zero (a hold is separate: `relaymilter hold remove`).

    Without [counters] url each process counts for itself, in memory:
    there is nothing to read from outside, and both verbs say so (exit 1).
    Redis that does not answer: exit 75.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from typing import Any

from relaymilter.config import load_config
from relaymilter.entries import user_key
from relaymilter.exitcodes import EX_ERROR, EX_OK, EX_TEMPFAIL
from relaymilter.limits import RATE_NAMES, RATES, Limit, WindowCount
from relaymilter.openstore import open_store
from relaymilter.store import StoreError


def add_counter_actions(actions: Any, common: argparse.ArgumentParser) -> None:
    """status and reset, beside the limit verb's add, remove and list."""
    status = actions.add_parser("status", help="the sender's count in the shared counters",
                                parents=[common])
    reset = actions.add_parser("reset", help="forget the sender's counts: it starts again "
                                             "from zero", parents=[common])
    for parser in (status, reset):
        who = parser.add_mutually_exclusive_group(required=True)
        who.add_argument("--client", metavar="ADDRESS", help="a client address")
        who.add_argument("--user", metavar="USER", help="a SASL user name")
    status.add_argument("--json", action="store_true", help="JSON instead of a sentence")


def run(args: argparse.Namespace, config_file: str) -> int:
    """limit status or reset, as args say."""
    config = load_config(config_file)
    if config.counters.url is None:
        sys.stderr.write("relaymilter: the limits are counted in each relaymilter process "
                         "([counters] url is not set): there is no count to read or reset "
                         "from outside; a restart of the daemons starts every count anew\n")
        return EX_ERROR
    try:
        kind, value, key = _sender(args)
    except ValueError as error:
        sys.stderr.write(f"relaymilter: {error}\n")
        return EX_ERROR
    import redis

    from relaymilter.rediscounter import RedisCounter
    counter = RedisCounter(config.counters.url, hour=config.limits.window, timeout=5.0)
    try:
        if args.action == "reset":
            ended = counter.reset(key)
            sys.stdout.write(f"{kind} {value}: " + ("counts forgotten, it starts again from "
                                                    "zero\n" if ended else
                                                    "nothing counted, nothing to reset\n"))
            return EX_OK
        counts = counter.status(key)
    except redis.RedisError as error:
        sys.stderr.write(f"relaymilter: Redis counters at {counter.shown} unavailable; try "
                         f"again later: {type(error).__name__}: {error}\n")
        return EX_TEMPFAIL
    finally:
        counter.close()
    return _show(kind, value, counts, _limit_of(config, kind, value), args.json)


def _sender(args: argparse.Namespace) -> tuple[str, str, tuple[str, str]]:
    """(kind, value as given, the counter key the engine uses)."""
    if args.user is not None:
        if not args.user.strip():
            raise ValueError("--user: empty user name")
        return "user", args.user, ("user", user_key(args.user))
    try:
        address = ipaddress.ip_address(args.client)
    except ValueError:
        raise ValueError(f"--client: {args.client!r} is not an IP address (a count is "
                         "kept per client address)") from None
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return "client", str(address), ("client", str(address))


def _limit_of(config: Any, kind: str, value: str) -> Limit | None:
    """The limit in force for the sender, from the store; None: none or unreadable."""
    location = config.store.location
    if location is None:
        return None
    try:
        with open_store(location, create=False) as store:
            return store.load_policy().limit(kind, value)
    except (StoreError, OSError):
        return None


def _show(kind: str, value: str, counts: dict[str, WindowCount], limit: Limit | None,
          as_json: bool) -> int:
    allowed = limit._asdict() if limit is not None else dict.fromkeys(RATE_NAMES)
    rates = {}
    for (name, unit, hours) in RATES:
        count = counts[name]
        if allowed[name] is None and not count.attempts:
            continue
        rates[name] = {"unit": unit, "window": "hour" if hours == 1 else "day",
                       "limit": allowed[name], "accepted": count.accepted,
                       "attempts": count.attempts,
                       "remaining": (None if allowed[name] is None
                                     else max(0, allowed[name] - count.accepted)),
                       "frees_in": count.frees_in, "empty_in": count.empty_in}
    if as_json:
        document = {"kind": kind, "value": value,
                    "limit": None if limit is None else limit._asdict(), "rates": rates}
        sys.stdout.write(json.dumps(document, indent=1) + "\n")
        return EX_OK
    sys.stdout.write(f"{kind} {value}: "
                     + (f"limit {limit.describe()}" if limit else "no limit in force") + "\n")
    if not rates:
        sys.stdout.write("  nothing counted\n")
    for rate in rates.values():
        of = "no limit" if rate["limit"] is None else f"{rate['remaining']} of {rate['limit']} left"
        line = (f"  {rate['unit']} per {rate['window']}: {rate['accepted']} accepted, "
                f"{rate['attempts']} attempts, {of}")
        if rate["frees_in"] is not None:
            line += (f"; the oldest leave the window in {_duration(rate['frees_in'])}, "
                     f"the last in {_duration(rate['empty_in'])}")
        sys.stdout.write(line + "\n")
    return EX_OK


def _duration(seconds: float) -> str:
    minutes, rest = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{rest:02d}s" if hours else f"{minutes}m{rest:02d}s"
