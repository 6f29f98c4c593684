"""statuspage - /status and /api/v1/: what the filter did in the last hour.

NAME
    statuspage - status_document(), decisions_document() and status_html()

SYNOPSIS
    document = status_document(recorder, snapshot, now)    # GET /api/v1/status
    found = decisions_document(recorder, Filters(client="192.0.2.9"))   # /api/v1/decisions
    page = status_html(document, found, filters)            # GET /status

DESCRIPTION
    Served by the metrics listener (metrics.py), read-only, from what the
    process already holds: the health report, the DNSBL zones and cache of
    the snapshot in force, the holds of its domain policy, and the
    recorder's activity (activity.py: per-minute verdicts, the top refused
    clients and outbound senders of the last hour, the last decisions).

    The page is HTML rendered here, one request, no JavaScript: a form
    (GET) filters the last decisions by client, SASL user and domain.
    Every value that a client or an operator wrote (addresses, users,
    reasons, recipients) is escaped (html.escape) before it is written.

    The JSON documents have the same content, for control panels:
      /api/v1/status     {"generated", "health", "zones", "cache",
                          "decisions": {"totals", "per_minute"}, "holds",
                          "top_refused_clients", "top_senders"}
      /api/v1/decisions  {"filters", "decisions": [...]}, newest first
"""

from __future__ import annotations

import datetime
import hmac
import html
import ipaddress
from typing import TYPE_CHECKING, Any, NamedTuple

from relaymilter import __version__

if TYPE_CHECKING:
    from relaymilter.engine import Snapshot

TOP = 10
RECENT = 100
MAX_FILTER = 255        # characters of a filter value kept


class Filters(NamedTuple):
    client: str | None = None
    user: str | None = None
    domain: str | None = None
    limit: int = RECENT

    @classmethod
    def from_query(cls, query: dict[str, list[str]]) -> "Filters":
        def one(name: str) -> str | None:
            value = (query.get(name) or [""])[0].strip()[:MAX_FILTER]
            return value or None
        try:
            limit = max(1, min(1000, int((query.get("limit") or [RECENT])[0])))
        except ValueError:
            limit = RECENT
        return cls(one("client"), one("user"), one("domain"), limit)


def access_refused(bound: str, token: str, authorization: str | None,
                   query_token: str | None) -> str | None:
    """Why a request to a listener bound to address `bound` may not see the
    status pages; None: it may. They name clients and users: on loopback to
    anyone, elsewhere only with [metrics] status_token, given as
    "Authorization: Bearer TOKEN" or ?token=TOKEN."""
    if ipaddress.ip_address(bound).is_loopback:
        return None
    if not token:
        return ("the status pages are served on loopback only; set [metrics] status_token "
                "to serve them here")
    given = query_token or ""
    if authorization and authorization.startswith("Bearer "):
        given = authorization[len("Bearer "):].strip()
    if hmac.compare_digest(given.encode("utf-8", "replace"), token.encode("utf-8")):
        return None
    return "a token is needed: Authorization: Bearer TOKEN, or ?token=TOKEN"


def _iso(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    return datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def status_document(recorder: Any, snapshot: "Snapshot | None", now: float,
                    fleet: Any = None) -> dict[str, Any]:
    """The /api/v1/status document; with fleet (fleettops.FleetTops), the top
    lists of every process sharing the counters."""
    _, health = recorder.health(snapshot)
    checker = snapshot.dnsbl if snapshot is not None else None
    zones, cache = [], None
    if checker is not None:
        disabled = checker.disabled_zones
        zones = [{"name": zone.display_name, "enabled": zone.display_name not in disabled}
                 for zone in checker.zones]
        stats = checker.cache.stats()
        asked = stats.hits + stats.misses
        cache = {"entries": stats.entries, "hits": stats.hits, "misses": stats.misses,
                 "hit_rate": round(stats.hits / asked, 4) if asked else None}
    activity = recorder.activity
    holds = snapshot.domain_policy.holds() if snapshot is not None else []
    tops = fleet.tops(now, TOP) if fleet is not None else None
    scope = "this process" if tops is None else "fleet"
    if tops is None:
        tops = {"refused": activity.top_refused_clients(now, TOP),
                "senders": activity.top_senders(now, TOP)}
    return {
        "generated": _iso(now), "version": __version__, "health": health, "zones": zones,
        "cache": cache,
        "decisions": {"totals": activity.totals(now),
                      "per_minute": [{"minute": _iso(start), "verdicts": verdicts}
                                     for start, verdicts in activity.per_minute(now)]},
        "holds": [{"kind": hold.kind, "value": hold.value, "scope": hold.scope,
                   "reason": hold.reason, "since": _iso(hold.created),
                   "expires": _iso(hold.expires)} for hold in holds],
        "top_scope": scope,
        "top_refused_clients": [{"client": client, "refusals": count}
                                for client, count in tops["refused"]],
        "top_senders": [{"sender": sender, "recipients": count}
                        for sender, count in tops["senders"]],
    }


def decisions_document(recorder: Any, filters: Filters) -> dict[str, Any]:
    """The /api/v1/decisions document."""
    found = recorder.activity.recent(filters.client, filters.user, filters.domain,
                                     filters.limit)
    return {"filters": filters._asdict(),
            "decisions": [{"at": _iso(seen.at), "stage": seen.stage, "verdict": seen.verdict,
                           "reason": seen.reason, "client": seen.client, "user": seen.user,
                           "sender": seen.sender, "recipient": seen.recipient}
                          for seen in found]}


_STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin-bottom:1.5em}
th,td{border:1px solid #ccc;padding:.2em .6em;text-align:left;font-size:90%}
th{background:#eee}.bad{color:#a00;font-weight:bold}.ok{color:#070}
h2{margin-top:1.5em;font-size:120%}form input{margin-right:.5em}"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _table(headers: list[str], rows: list[list[Any]], empty: str) -> str:
    if not rows:
        return f"<p>{_e(empty)}</p>"
    head = "".join(f"<th>{_e(header)}</th>" for header in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(cell)}</td>" for cell in row)
                   + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def status_html(document: dict[str, Any], found: dict[str, Any]) -> str:
    """The /status page."""
    health = document["health"]
    state = health["status"]
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>relaymilter status</title><style>{_STYLE}</style></head><body>",
             f"<h1>relaymilter status</h1><p>{_e(document['generated'])}, relaymilter "
             f"{_e(document['version'])}: <span class=\"{'ok' if state == 'ok' else 'bad'}\" "
             f"id=\"health\">{_e(state)}</span></p>"]
    problems = [[part, detail.get("error") or "disabled zones"]
                for part, detail in health.items()
                if isinstance(detail, dict) and not detail.get("ok", True)]
    if problems:
        parts.append(_table(["part", "problem"], problems, ""))
    parts.append("<h2>DNS blocklists</h2>")
    parts.append(_table(["zone", "state"], [
        [zone["name"], "enabled" if zone["enabled"] else "DEAD: disabled by its health check"]
        for zone in document["zones"]], "no zones configured"))
    cache = document["cache"]
    if cache is not None:
        rate = "-" if cache["hit_rate"] is None else f"{cache['hit_rate'] * 100:.1f} %"
        parts.append(f"<p>DNS cache: {_e(cache['entries'])} entries, hit rate {_e(rate)} "
                     f"({_e(cache['hits'])} hits, {_e(cache['misses'])} misses)</p>")
    decisions = document["decisions"]
    verdicts = ["permit", "reject", "defer", "would-reject", "would-defer"]
    parts.append("<h2>Decisions, last hour</h2>")
    parts.append(_table(verdicts, [[decisions["totals"].get(verdict, 0)
                                    for verdict in verdicts]], ""))
    parts.append(_table(["minute"] + verdicts, [
        [row["minute"]] + [row["verdicts"].get(verdict, 0) for verdict in verdicts]
        for row in reversed(decisions["per_minute"][-15:])], "no decisions in the last hour"))
    parts.append("<h2>Holds in force</h2>")
    parts.append(_table(["kind", "value", "scope", "reason", "since", "ends"], [
        [hold["kind"], hold["value"], hold["scope"], hold["reason"], hold["since"],
         hold["expires"] or "when removed"] for hold in document["holds"]], "no holds"))
    scope = "the fleet" if document.get("top_scope") == "fleet" else "this process"
    parts.append(f"<h2>Top refused clients, last hour ({scope})</h2>")
    parts.append(_table(["client", "refusals"], [
        [row["client"], row["refusals"]] for row in document["top_refused_clients"]],
        "no client refused"))
    parts.append(f"<h2>Top outbound senders, last hour ({scope})</h2>")
    parts.append(_table(["sender (SASL user or client)", "recipients"], [
        [row["sender"], row["recipients"]] for row in document["top_senders"]],
        "no outbound mail"))
    filters = found["filters"]
    parts.append("<h2>Last decisions</h2><form method=\"get\" action=\"/status\">"
                 + "".join(f"<label>{name} <input name=\"{name}\" value=\"{_e(filters[name])}\""
                           f" size=\"20\"></label>" for name in ("client", "user", "domain"))
                 + "<input type=\"submit\" value=\"filter\"></form>")
    parts.append(_table(["at", "verdict", "reason", "client", "user", "from", "to"], [
        [seen["at"], seen["verdict"], seen["reason"], seen["client"], seen["user"],
         seen["sender"], seen["recipient"]] for seen in found["decisions"]],
        "no decisions match"))
    parts.append("</body></html>\n")
    return "".join(parts)
