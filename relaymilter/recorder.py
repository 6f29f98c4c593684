"""recorder - the events relaymilter counts: the interface, and the no-op.

NAME
    recorder - Recorder, the metrics interface every module reports to

DESCRIPTION
    A leaf: the engine, the DNSBL checker and the store follower make one
    call into a Recorder per event and import nothing else of metrics.
    This base records nothing (metrics off, NO_METRICS): the hot path pays
    one empty method call. metrics.PrometheusRecorder counts for real.
"""

from __future__ import annotations

from typing import Any

class Recorder:
    """The events relaymilter counts. This base records nothing: metrics off."""

    def connection(self) -> None:
        """The milter's connect callback ran."""

    def milter_session_closed(self) -> None:
        """A milter connection was closed for lasting over [milter] session_timeout."""

    def decided(self, stage: str, decision: Any, client: Any, sender: str | None,
                recipient: str | None) -> None:
        """A decision.Decision was answered at stage "connect" or "rcpt" to the
        decision.ClientFacts client: counted (decision()) and kept for the
        status page (activity.py). The engine's one call per decision."""

    def decision(self, stage: str, action: str, reason: str) -> None:
        """A decision was answered at stage "connect" or "rcpt".

        action: permit, reject, defer, or would-reject / would-defer (dry
        run); reason: a Reason's label. Both from closed sets.
        """

    def internal_error(self, callback: str) -> None:
        """A callback raised; the error boundary answered for it."""

    def dnsbl_answer(self, zone: str, status: str) -> None:
        """A zone's answer about a client was classified (cached ones too):
        its display name, and the status value."""

    def dns_query(self, zone: str, seconds: float) -> None:
        """A zone's A query ended (answer or error) after seconds."""

    def config_loaded(self, path: str, reload: bool) -> None:
        """The config in force was loaded (at start, or by a reload)."""

    def config_failed(self, error: str) -> None:
        """A reload failed; the running config stays."""

    def store_loaded(self, seconds: float) -> None:
        """The policy store was read into a new snapshot."""

    def store_failed(self, error: str) -> None:
        """The policy store could not be read; the policy in force stays."""

    def counter_failed(self, error: str) -> None:
        """The shared counters (Redis) failed or timed out: an outage begins or goes on."""

    def counter_recovered(self) -> None:
        """The shared counters answer again."""

    def counter_fallback(self) -> None:
        """A recipient was not counted in the shared counters (counted in this
        process, or deferred)."""

    def auto_hold(self) -> None:
        """A sender over its outbound limit was put on hold automatically."""

    def probe_blocked(self) -> None:
        """A client was blocked for relay probing ([probes])."""


NO_METRICS = Recorder()
