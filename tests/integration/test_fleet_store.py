"""A fleet on one PostgreSQL store and one Redis: one policy, one count, on every host.

Two `relaymilter policyd` processes, each with a config of its own (as on
two hosts), share a private PostgreSQL ([store] url) and a private Redis
([counters] url). The CLI writes through one's config; the other's
decisions, asked over its policy socket as smtpd asks, must follow within
2 s. Then the database goes away: the services go on deciding from the
policy last read, say "degraded" on /healthz, and the CLI exits 75 without
changing anything; when the database returns, a change reaches them again
without a restart. A limit is counted across both hosts; with Redis killed,
every recipient still gets an answer, and never a 5xx.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from typing import Callable, Iterator

import pytest

from policy_client import PolicyClient, request
from postgres_instance import PostgresInstance
from redis_instance import RedisInstance
from relaymilter_process import RELAYMILTER, RelaymilterProcess, _free_port, public_subdirectory

PICKUP = 2.0                    # the promise: in force on every host within 2 s
HELD = b"action=550 5.7.1 Relaying suspended for this sender"
LIMITED = b"action=450 4.7.1 Sending rate limit exceeded, try again later"
AUTO_HOLD_FACTOR = 10           # high: only the notify test goes that far over a limit
NOTIFY_SCRIPT = """#!/bin/sh
echo "$RELAYMILTER_HOLD_KIND|$RELAYMILTER_HOLD_VALUE|$RELAYMILTER_HOLD_REASON|\
$RELAYMILTER_HOLD_EXPIRES|$RELAYMILTER_HOLD_HOST" >> {log}
"""
REMOTE = "someone@remote.test"
PROBE_REFUSALS = 4


class Host:
    """One policy service of the fleet, with its config and /healthz."""

    def __init__(self, directory, url: str, counters: str, notify: str) -> None:
        self.metrics_port = _free_port()
        self.service = RelaymilterProcess(
            directory, front_end="policyd", relay={"local_domains": ["local.test"]},
            store={"url": url}, counters={"url": counters},
            limits={"auto_hold_factor": AUTO_HOLD_FACTOR}, holds={"notify": notify},
            probes={"refusals": PROBE_REFUSALS, "window": 60, "block_for": 600},
            metrics={"policyd_listen": f"127.0.0.1:{self.metrics_port}"})

    def answer(self, user: str, message: str = "", recipient: str = REMOTE) -> bytes:
        client = PolicyClient(str(self.service.socket_path))
        try:
            return client.ask(request(recipient, sasl_username=user, instance=message))[0]
        finally:
            client.close()

    def ask(self, client: str, recipient: str) -> bytes:
        """An unauthenticated client's recipient."""
        policy = PolicyClient(str(self.service.socket_path))
        try:
            return policy.ask(request(recipient, client=client))[0]
        finally:
            policy.close()

    def cli(self, *words: str) -> subprocess.CompletedProcess:
        return subprocess.run([RELAYMILTER, *words, "-c", str(self.service.config_path)],
                              capture_output=True, text=True, timeout=60)

    def health(self) -> dict:
        url = f"http://127.0.0.1:{self.metrics_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            return json.loads(error.read())


def ended_events(host: Host, entry: str) -> int:
    """How many times the history says entry ended."""
    history = json.loads(host.cli("history", "--json").stdout)
    return sum(1 for event in history
               if (event["action"], event["entry"], event["actor"]) ==
               ("expire", entry, "relaymilter"))


@pytest.fixture(scope="module")
def fleet(public_tree) -> Iterator[tuple[PostgresInstance, Host, Host]]:
    with PostgresInstance() as server, RedisInstance() as counters:
        url = server.create_database("mail")
        notify = public_tree / "notify-abuse-desk"
        notify.write_text(NOTIFY_SCRIPT.format(log=public_tree / "notified.log"))
        notify.chmod(0o755)
        one = Host(public_subdirectory(public_tree, "host-one"), url, counters.url(),
                   str(notify))
        two = Host(public_subdirectory(public_tree, "host-two"), url, counters.url(),
                   str(notify))
        one.service.start()
        two.service.start()
        try:
            yield server, one, two, counters
        finally:
            one.service.kill()
            two.service.kill()


def within(seconds: float, condition: Callable[[], bool]) -> float:
    """Seconds until condition() holds; fails after seconds."""
    started = time.monotonic()
    while not condition():
        elapsed = time.monotonic() - started
        assert elapsed < seconds, f"not so after {elapsed:.1f} s"
        time.sleep(0.05)
    return time.monotonic() - started


def test_a_hold_added_on_one_host_is_applied_by_the_other_within_two_seconds(fleet):
    _, one, two, _ = fleet
    assert two.answer("mallory") != HELD
    done = one.cli("hold", "add", "--user", "mallory", "--reason", "phished")
    assert done.returncode == 0, done.stderr
    assert within(PICKUP, lambda: two.answer("Mallory") == HELD) < PICKUP
    assert one.answer("mallory") == HELD
    assert two.answer("alice") != HELD
    assert two.cli("hold", "remove", "--user", "mallory", "--by", "desk-7").returncode == 0
    within(PICKUP, lambda: one.answer("mallory") != HELD and two.answer("mallory") != HELD)
    history = json.loads(two.cli("history", "--since", "1h", "--json").stdout)
    assert [(event["action"], event["entry"], event["actor"])
            for event in history if "mallory" in event["entry"]][-2:] == [
        ("add", "user mallory", history[-2]["actor"]), ("remove", "user mallory", "desk-7")]


def test_without_the_database_decisions_go_on_and_the_cli_changes_nothing(fleet):
    server, one, two, _ = fleet
    assert one.cli("hold", "add", "--user", "trudy").returncode == 0
    within(PICKUP, lambda: two.answer("trudy") == HELD)
    server.stop()
    try:
        report = {}

        def degraded() -> bool:
            report.update(two.health())
            return report["status"] == "degraded"
        within(5.0, degraded)
        assert report["store"]["ok"] is False and "unavailable" not in report["store"]["path"]
        assert two.answer("trudy") == HELD            # the policy last read, still in force
        assert two.answer("alice") != HELD
        done = one.cli("hold", "add", "--user", "alice")
        assert done.returncode == 75, (done.returncode, done.stderr)
        assert "unavailable" in done.stderr and "nothing changed" in done.stderr
        two.service.wait_for_log(r"policy store postgresql://\S+ unreadable, keeping the "
                                 r"policy last read")
    finally:
        server.start()
    within(5.0, lambda: two.health()["status"] == "ok")
    assert one.cli("hold", "add", "--user", "alice").returncode == 0
    assert within(PICKUP, lambda: two.answer("alice") == HELD) < PICKUP
    assert two.answer("trudy") == HELD
    for user in ("alice", "trudy"):
        assert one.cli("hold", "remove", "--user", user).returncode == 0


def test_a_limit_of_five_is_reached_by_three_messages_on_each_host(fleet):
    _, one, two, _ = fleet
    assert one.cli("limit", "add", "--user", "bob", "5").returncode == 0
    try:
        within(PICKUP, lambda: one.answer("carol", "m0") != LIMITED)     # the store is read
        time.sleep(PICKUP)
        answers = [host.answer("bob", f"m{number}.{host is one}")
                   for number in range(3) for host in (one, two)]
        assert answers.count(LIMITED) == 1 and answers[-1] == LIMITED, answers
        assert two.answer("bob", "m0.False") != LIMITED     # asked again: counted once
        status = two.cli("limit", "status", "--user", "BOB", "--json")
        assert status.returncode == 0, status.stderr
        shown = json.loads(status.stdout)
        rate = shown["rates"]["per_hour"]
        assert (rate["limit"], rate["accepted"], rate["attempts"], rate["remaining"]) \
            == (5, 5, 6, 0)
        assert 3500 < rate["frees_in"] <= rate["empty_in"] <= 3600
        assert list(shown["rates"]) == ["per_hour"] and shown["limit"]["per_hour"] == 5
        assert "bob: counts forgotten" in one.cli("limit", "reset", "--user", "bob").stdout
        assert "recipients per hour: 0 accepted, 0 attempts, 5 of 5 left" in \
            one.cli("limit", "status", "--user", "bob").stdout
        assert two.answer("bob", "m9") != LIMITED
    finally:
        one.cli("limit", "remove", "--user", "bob")


def test_messages_are_counted_once_across_hosts_beside_recipients(fleet):
    _, one, two, _ = fleet
    done = one.cli("limit", "add", "--user", "frank", "--messages-per-hour", "2", "--per-day",
                   "100")
    assert done.returncode == 0, done.stderr
    try:
        time.sleep(PICKUP)
        first = [one.answer("frank", "f1", f"r{number}@remote.test") for number in range(3)]
        second = [two.answer("frank", "f2", f"r{number}@remote.test") for number in range(2)]
        assert LIMITED not in first + second
        assert one.answer("frank", "f3") == LIMITED and two.answer("frank", "f3") == LIMITED
        assert two.answer("frank", "f1", "r9@remote.test") != LIMITED     # an allowed message
        rates = json.loads(two.cli("limit", "status", "--user", "frank", "--json").stdout)[
            "rates"]
        assert (rates["messages_per_hour"]["accepted"], rates["per_day"]["accepted"]) == (2, 6)
        assert rates["per_day"]["remaining"] == 94
    finally:
        one.cli("limit", "remove", "--user", "frank")


def test_redis_killed_mid_run_loses_no_mail(fleet):
    _, one, two, counters = fleet
    assert one.cli("limit", "add", "--user", "dave", "2").returncode == 0
    assert one.cli("limit", "add", "--user", "erin", "1000").returncode == 0
    try:
        time.sleep(PICKUP)
        assert one.answer("dave", "d1") != LIMITED
        counters.kill()
        answers = [host.answer("dave", f"d{number}.{host is one}")
                   for number in range(3) for host in (one, two)]
        # Each host counts for itself now: 2 each, never a 5xx, never a hang.
        assert all(answer == LIMITED or not answer.startswith(b"action=5")
                   for answer in answers), answers
        assert answers.count(LIMITED) >= 2
        assert not two.health()["counters"]["ok"] and two.health()["status"] == "degraded"
        two.service.wait_for_log(r"Redis counters at unix://\S+ unavailable \(outbound limits\), "
                                 r"counting in this process")
        counters.start()
        # The next limited recipient after the retry interval finds Redis again
        # (erin: a limit far from reach, however often this asks).
        within(10.0, lambda: two.answer("erin", f"r{time.monotonic()}") != LIMITED
               and two.health()["status"] == "ok")
    finally:
        if not counters.running:
            counters.start()
        for user in ("dave", "erin"):
            one.cli("limit", "remove", "--user", user)


def test_a_hold_for_a_while_ends_by_itself_on_every_host(fleet):
    _, one, two, _ = fleet
    done = one.cli("hold", "add", "--user", "oscar", "--for", "3s", "--reason", "cooling off")
    assert done.returncode == 0, done.stderr
    within(PICKUP, lambda: two.answer("oscar") == HELD and one.answer("oscar") == HELD)
    listed = json.loads(one.cli("hold", "list", "--json").stdout)
    assert [hold["value"] for hold in listed if hold["expires"]] == ["oscar"]
    ended = within(3.0 + PICKUP, lambda: two.answer("oscar") != HELD)
    assert one.answer("oscar") != HELD
    assert ended > 0.5          # it was in force for a while, then not
    within(PICKUP, lambda: "oscar" not in one.cli("hold", "list").stdout)
    assert ended_events(one, "user oscar") == 1


def test_an_automatic_hold_is_applied_everywhere_and_notified_once(fleet, public_tree):
    _, one, two, _ = fleet
    notified = public_tree / "notified.log"
    assert one.cli("limit", "add", "--user", "mike", "1").returncode == 0
    try:
        time.sleep(PICKUP)
        answers = [host.answer("mike", f"n{number}.{host is one}")
                   for number in range(5) for host in (one, two)]     # 10 = 10 x the limit
        assert answers[0] != LIMITED and answers[1:] == [LIMITED] * 9
        within(PICKUP + 1, lambda: notified.exists() and notified.read_text().count("\n") == 1)
        kind, value, reason, expires, host = notified.read_text().strip().split("|")
        assert (kind, value, expires) == ("user", "mike", "")
        assert "10 times its outbound limit" in reason and host
        within(PICKUP, lambda: one.answer("mike", "n9") == HELD and two.answer("mike") == HELD)
        for number in range(10):
            two.answer("mike", f"again{number}")
        time.sleep(1.5)
        assert notified.read_text().count("\n") == 1        # once per incident
        holds = json.loads(one.cli("hold", "list", "--json").stdout)
        assert [(hold["value"], hold["added_by"]) for hold in holds] == [("mike", "relaymilter")]
    finally:
        one.cli("hold", "remove", "--user", "mike")
        one.cli("limit", "remove", "--user", "mike")


def test_a_relay_client_for_a_while_stops_relaying_when_it_ends(fleet):
    _, one, two, _ = fleet
    customer = "192.0.2.77"

    def relaying() -> bool:
        client = PolicyClient(str(two.service.socket_path))
        try:
            answer = client.ask(request(REMOTE, client=customer))[0]
        finally:
            client.close()
        assert answer == b"action=OK" or answer.startswith(b"action=554 5.7.1"), answer
        return answer == b"action=OK"
    assert not relaying()
    done = one.cli("relay-client", "add", customer, "--for", "3s", "--comment", "migration")
    assert done.returncode == 0, done.stderr
    within(PICKUP, relaying)
    assert within(3.0 + PICKUP, lambda: not relaying()) > 0.5
    # Both hosts saw it end; one removed it from the store, and said so once.
    within(PICKUP, lambda: "[]" == one.cli("relay-client", "list", "--json").stdout.strip())
    assert ended_events(one, f"{customer}/32") == 1


def test_a_prober_spreading_its_tries_over_the_fleet_is_blocked_on_every_host(fleet):
    _, one, two, _ = fleet
    prober = "192.0.2.123"
    tries = [(one if number % 2 else two).ask(prober, f"r{number}@remote.test")
             for number in range(PROBE_REFUSALS)]
    assert tries == [b"action=554 5.7.1 Relay access denied"] * PROBE_REFUSALS
    blocked = f"action=554 5.7.1 Client host [{prober}] blocked: relay probing".encode()
    within(PICKUP, lambda: one.ask(prober, "user@local.test") == blocked
           and two.ask(prober, "user@local.test") == blocked)
    assert one.ask("192.0.2.124", "user@local.test") == b"action=DUNNO"     # a neighbour
    holds = [hold for hold in json.loads(one.cli("hold", "list", "--json").stdout)
             if hold["value"] == f"{prober}/32"]
    assert [(hold["scope"], hold["reason"]) for hold in holds] == [("all", "relay probing")]
    assert one.cli("hold", "remove", "--client", prober).returncode == 0


def test_the_status_page_s_top_lists_cover_the_fleet(fleet):
    _, one, two, _ = fleet
    prober = "192.0.2.150"      # fewer tries than [probes] refusals: counted, not blocked
    assert [host.ask(prober, "x@remote.test") for host in (one, one, two)] == \
        [b"action=554 5.7.1 Relay access denied"] * 3

    def fleet_count() -> int | None:
        url = f"http://127.0.0.1:{two.metrics_port}/api/v1/status"
        with urllib.request.urlopen(url, timeout=5) as response:
            document = json.loads(response.read())
        assert document["top_scope"] == "fleet"
        return {row["client"]: row["refusals"]
                for row in document["top_refused_clients"]}.get(prober)
    within(10.0, lambda: fleet_count() == 3)       # shared every 5 s
