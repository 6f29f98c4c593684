"""rediscounter.py against a private Redis: one count for the fleet, and no mail lost when Redis is.

Two RedisCounter objects on one Redis stand for two relaymilter processes
(or hosts): they must count a sender together, exactly.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest

from relaymilter import rediscounter
from relaymilter.metrics import PrometheusRecorder
from relaymilter.limits import Limit, LimitCounter
from relaymilter.rediscounter import KEY_PREFIX, RedisCounter

ALICE = ("user", "alice")


@pytest.fixture
def url(redis_server):
    redis_server.client().flushall()
    return redis_server.url()


def counters(url, count=2, **options):
    return [RedisCounter(url, **{"hour": 3600, "timeout": 1.0, **options})
            for _ in range(count)]


def test_two_hosts_count_one_sender_together(url):
    one, two = counters(url)
    answers = [one.charge(ALICE, Limit(5)).allowed for _ in range(3)] + \
              [two.charge(ALICE, Limit(5)).allowed for _ in range(3)]
    assert answers == [True] * 5 + [False]
    counts = two.status(ALICE)["per_hour"]
    assert (counts.accepted, counts.attempts) == (5, 6)
    assert 3540 < counts.frees_in <= counts.empty_in <= 3600


def test_hosts_racing_for_the_last_recipients_never_overshoot(url):
    hosts = counters(url, count=4)
    allowed = []

    def send(counter):
        for number in range(50):
            allowed.append(counter.charge(ALICE, Limit(per_hour=37, messages_per_day=20),
                                          f"{id(counter)}.{number // 5}").allowed)
    threads = [threading.Thread(target=send, args=(counter,)) for counter in hosts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert allowed.count(True) == 37 and len(allowed) == 200
    assert hosts[0].status(ALICE)["messages_per_day"].accepted <= 20


# The same rules in Redis as in one process: each scenario runs on both.
@pytest.fixture(params=["local", "redis"])
def pair(request):
    if request.param == "local":
        counter = LimitCounter(auto_hold_factor=2)
        return counter, counter
    return tuple(counters(request.getfixturevalue("url"), auto_hold_factor=2))


def test_scenario_a_message_counts_once_and_a_refused_one_stays_refused(pair):
    one, two = pair
    limit = Limit(per_hour=100, messages_per_hour=2)
    assert [one.charge(ALICE, limit, "m1", f"r{n}@example.org").allowed for n in range(4)] \
        == [True] * 4
    assert two.charge(ALICE, limit, "m2", "r0@example.org").allowed
    third = two.charge(ALICE, limit, "m3", "r0@example.org")
    assert (third.allowed, third.exceeded, third.hold_due) == \
        (False, "messages_per_hour", False)
    assert not one.charge(ALICE, limit, "m3", "r1@example.org").allowed
    fourth = one.charge(ALICE, limit, "m4", "r0@example.org")
    assert fourth.hold_due and not fourth.allowed          # 4 message attempts = 2 x 2
    assert one.charge(ALICE, limit, "m1", "r9@example.org").allowed


def test_scenario_the_first_rate_used_up_refuses_and_the_others_keep_their_allowance(pair):
    one, two = pair
    limit = Limit(per_hour=2, per_day=3)
    answers = [counter.charge(ALICE, limit) for counter in (one, two, one)]
    assert [(charge.allowed, charge.exceeded) for charge in answers] == \
        [(True, None), (True, None), (False, "per_hour")]
    assert two.charge(ALICE, Limit(per_hour=5, per_day=3)).allowed
    assert two.charge(ALICE, Limit(per_hour=5, per_day=3)).exceeded == "per_day"


def test_scenario_a_recipient_asked_again_is_answered_alike_and_not_counted_twice(pair):
    one, two = pair
    limit = Limit(1)
    assert one.charge(ALICE, limit, "4F1A2.1", "bob@example.org").allowed
    assert two.charge(ALICE, limit, "4F1A2.1", "bob@example.org").allowed
    refused = two.charge(ALICE, limit, "4F1A2.1", "carol@example.org")
    assert (refused.allowed, refused.exceeded, refused.hold_due) == (False, "per_hour", True)
    again = one.charge(ALICE, limit, "4F1A2.1", "carol@example.org")
    assert (again.allowed, again.exceeded, again.hold_due) == (False, "per_hour", False)
    third = one.charge(ALICE, limit, "4F1A2.2", "dave@example.org")
    assert (third.allowed, third.hold_due) == (False, False)


def test_the_hold_falls_due_once_on_one_host(url):
    one, two = counters(url, auto_hold_factor=3)
    due = [counter.charge(ALICE, Limit(2)).hold_due for _ in range(5) for counter in (one, two)]
    assert due.count(True) == 1 and due.index(True) == 5      # the 6th attempt = 3 x 2


def test_the_window_slides_on_redis_s_clock_and_reset_forgets_at_once(url):
    one, = counters(url, count=1, hour=1)
    assert one.charge(ALICE, Limit(1)).allowed and not one.charge(ALICE, Limit(1)).allowed
    assert 0.9 < one.status(ALICE)["per_hour"].frees_in <= 1.02     # 60 slots of 17 ms
    time.sleep(1.05)
    assert one.status(ALICE)["per_hour"].accepted == 0 and one.charge(ALICE, Limit(1)).allowed
    assert one.reset(ALICE) is True and one.reset(ALICE) is False
    assert one.charge(ALICE, Limit(1)).allowed


def test_no_sender_name_reaches_another_sender_s_keys(url, redis_server):
    one, = counters(url, count=1)
    odd = ("user", "a}:per_hour{x%3A")
    assert one.charge(odd, Limit(1), "m:1}", "b@example.org").allowed
    assert one.charge(("user", "a"), Limit(1)).allowed
    keys = sorted(key.decode() for key in redis_server.client().keys("*"))
    odd_tag = KEY_PREFIX + "{user:a%7D%3Aper_hour%7Bx%253A}"
    assert keys == [odd_tag + ":m:m%3A1%7D", odd_tag + ":per_hour",
                    odd_tag + ":r:m%3A1%7D:b@example.org", KEY_PREFIX + "{user:a}:per_hour"]
    assert all(redis_server.client().ttl(key) > 0 for key in keys)


def test_redis_gone_counts_in_this_process_logs_once_and_comes_back(caplog, monkeypatch):
    from redis_instance import RedisInstance

    monkeypatch.setattr(rediscounter, "RETRY_AFTER", 0.5)
    metrics = PrometheusRecorder()
    with RedisInstance() as server:
        counter, = counters(server.url(), count=1, metrics=metrics)
        assert counter.charge(ALICE, Limit(3)).allowed
        server.kill()
        with caplog.at_level(logging.WARNING, logger="relaymilter.rediscounter"):
            answers = [counter.charge(ALICE, Limit(3)).allowed for _ in range(4)]
            assert answers == [True, True, True, False]     # this process's own window
            time.sleep(0.6)
            assert not counter.charge(ALICE, Limit(3)).allowed    # tried Redis again: still gone
            assert [record.levelname for record in caplog.records] == ["ERROR"]
            assert "unavailable (outbound limits), counting in this process" in caplog.records[0].getMessage()
            assert metrics.health_state.counters_error is not None
            server.start()
            time.sleep(0.6)
            assert counter.charge(ALICE, Limit(3)).allowed         # Redis lost its counts with it
        assert [record.levelname for record in caplog.records] == ["ERROR", "WARNING"]
        assert metrics.health_state.counters_error is None


def test_a_redis_that_hangs_costs_a_decision_no_more_than_the_timeout(monkeypatch):
    from redis_instance import RedisInstance

    with RedisInstance() as server:
        counter, = counters(server.url(), count=1, timeout=0.05)
        assert counter.charge(ALICE, Limit(3)).allowed         # connected
        os.kill(server.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            charge = counter.charge(ALICE, Limit(3))
            waited = time.monotonic() - started
            fast = time.monotonic()
            counter.charge(ALICE, Limit(3))                      # the circuit is open: no wait
            skipped = time.monotonic() - fast
        finally:
            os.kill(server.pid, signal.SIGCONT)
    assert charge.allowed and waited < 0.5 and skipped < 0.01


def test_tempfail_mode_answers_unavailable_while_redis_is_gone():
    from redis_instance import RedisInstance

    with RedisInstance() as server:
        counter, = counters(server.url(), count=1, on_error="tempfail")
        server.kill()
        charge = counter.charge(ALICE, Limit(3))
    assert charge.unavailable and not charge.allowed


def test_redis_back_is_seen_without_any_recipient_to_count(monkeypatch):
    from redis_instance import RedisInstance

    monkeypatch.setattr(rediscounter, "RETRY_AFTER", 0.3)
    metrics = PrometheusRecorder()
    with RedisInstance() as server:
        counter, = counters(server.url(), count=1, metrics=metrics)
        server.kill()
        counter.charge(ALICE, Limit(3))
        assert metrics.health_state.counters_error is not None
        server.start()
        deadline = time.monotonic() + 5
        while metrics.health_state.counters_error is not None:
            assert time.monotonic() < deadline, "still degraded"
            time.sleep(0.05)
        assert counter.charge(ALICE, Limit(3)).allowed
        assert counter.status(ALICE)["per_hour"].attempts == 1      # counted in Redis again
