"""topcli - `relaymilter top`: the status page in a terminal, refreshing.

NAME
    relaymilter top - what the filter does now, from /api/v1/status

SYNOPSIS
    relaymilter top [URL] [-c FILE] [--policyd] [--interval SECONDS] [--once]

DESCRIPTION
    Reads a daemon's /api/v1/status (statuspage.py) every --interval
    seconds (default 2) and redraws: health, zones, the DNS cache, the
    decisions of the last hour and of its last minutes, the holds in force,
    the top refused clients and outbound senders. URL defaults to the
    config's [metrics] listen (policyd_listen with --policyd). A listener
    off loopback asks for [metrics] status_token: it is read from the
    config, or from $RELAYMILTER_STATUS_TOKEN. --once prints one screen and
    exits (0, or 69 when the daemon does not answer). Ctrl-C ends it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from relaymilter.exitcodes import EX_OK, EX_UNAVAILABLE, EX_USAGE
from relaymilter.text import printable

TOKEN_VARIABLE = "RELAYMILTER_STATUS_TOKEN"
VERDICTS = ("permit", "reject", "defer", "would-reject", "would-defer")
CLEAR = "\x1b[H\x1b[2J"


def add_top_verb(verb: Any) -> None:
    top = verb("top", cmd_top, "the status page in the terminal, refreshing: health, zones, "
               "decisions per minute, holds, top refused clients and senders")
    top.add_argument("url", nargs="?", metavar="URL",
                     help="the daemon's metrics listener, http://HOST:PORT (default: from "
                          "the config)")
    top.add_argument("--policyd", action="store_true",
                     help="the policy service's listener ([metrics] policyd_listen)")
    top.add_argument("--interval", type=float, default=2.0, metavar="SECONDS",
                     help="seconds between two screens (default 2)")
    top.add_argument("--once", action="store_true", help="one screen, then exit")


def cmd_top(args: argparse.Namespace) -> int:
    try:
        url, token = _where(args)
    except ValueError as error:
        sys.stderr.write(f"relaymilter top: {error}\n")
        return EX_USAGE
    try:
        while True:
            try:
                lines = top_lines(fetch(url, token))
            except (OSError, ValueError) as error:
                if args.once:
                    sys.stderr.write(f"relaymilter top: {url}: {error}\n")
                    return EX_UNAVAILABLE
                lines = [f"relaymilter top: {url}: {error}; trying again"]
            sys.stdout.write(("" if args.once else CLEAR) + "\n".join(lines) + "\n")
            sys.stdout.flush()
            if args.once:
                return EX_OK
            time.sleep(max(0.2, args.interval))
    except KeyboardInterrupt:
        return EX_OK


def _where(args: argparse.Namespace) -> tuple[str, str | None]:
    """(the listener's base URL, the status token or None)."""
    token = os.environ.get(TOKEN_VARIABLE)
    if args.url:
        return args.url.rstrip("/"), token
    from relaymilter.config import config_path, load_config
    config = load_config(config_path(args.config))
    listen = config.metrics.policyd_listen if args.policyd else config.metrics.listen
    if not listen:
        key = "policyd_listen" if args.policyd else "listen"
        raise ValueError(f"[metrics] {key} is not set in {config.path}: give the URL")
    return f"http://{listen}", token or config.metrics.status_token or None


def fetch(url: str, token: str | None, timeout: float = 5.0) -> dict[str, Any]:
    request = urllib.request.Request(url + "/api/v1/status")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read(10_000_000))
    except urllib.error.HTTPError as error:
        raise ValueError(f"HTTP {error.code}: "
                         f"{error.read(500).decode('utf-8', 'replace').strip()}") from None


def top_lines(document: dict[str, Any], rows: int = 10) -> list[str]:
    """One screen of the status document. Every value is made printable: a
    client's escape sequence must not reach the terminal."""
    return [printable(line) for line in _screen(document, rows)]


def _screen(document: dict[str, Any], rows: int) -> list[str]:
    health = document["health"]
    lines = [f"relaymilter {document['version']}  {document['generated']}  "
             f"health: {health['status']}"]
    for part, detail in health.items():
        if isinstance(detail, dict) and not detail.get("ok", True) and detail.get("error"):
            lines.append(f"  {part}: {detail['error']}")
    zones = document["zones"]
    if zones:
        lines.append("zones: " + "  ".join(
            f"{zone['name']} {'ok' if zone['enabled'] else 'DEAD'}" for zone in zones))
    cache = document["cache"]
    if cache and cache["hit_rate"] is not None:
        lines.append(f"dns cache: {cache['entries']} entries, hit rate "
                     f"{cache['hit_rate'] * 100:.1f} %")
    totals = document["decisions"]["totals"]
    lines += ["", "last hour    " + "".join(f"{verdict:>14}" for verdict in VERDICTS),
              "             " + "".join(f"{totals.get(verdict, 0):>14}" for verdict in VERDICTS)]
    for row in reversed(document["decisions"]["per_minute"][-5:]):
        lines.append(f"{row['minute'][11:16]} UTC    "
                     + "".join(f"{row['verdicts'].get(verdict, 0):>14}" for verdict in VERDICTS))

    def table(title: str, items: list[str]) -> None:
        lines.extend(["", title] + (items[:rows] or ["  none"]))
    table("holds in force", [
        f"  {hold['kind']:<6} {hold['value']:<32} {hold['scope']:<5} {hold['reason']}"
        + (f"  (until {hold['expires']})" if hold["expires"] else "")
        for hold in document["holds"]])
    table("top refused clients, last hour", [
        f"  {row['refusals']:>7}  {row['client']}" for row in document["top_refused_clients"]])
    table("top outbound senders, last hour", [
        f"  {row['recipients']:>7}  {row['sender']}" for row in document["top_senders"]])
    return lines
