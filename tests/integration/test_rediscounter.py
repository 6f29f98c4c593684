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
from relaymilter.rediscounter import KEY_PREFIX, RedisCounter

ALICE = ("user", "alice")


@pytest.fixture
def url(redis_server):
    redis_server.client().flushall()
    return redis_server.url()


def counters(url, count=2, **options):
    return [RedisCounter(url, **{"window": 3600, "timeout": 1.0, **options})
            for _ in range(count)]


def test_two_hosts_count_one_sender_together(url):
    one, two = counters(url)
    answers = [one.charge(ALICE, 5).allowed for _ in range(3)] + \
              [two.charge(ALICE, 5).allowed for _ in range(3)]
    assert answers == [True] * 5 + [False]
    assert two.status(ALICE)["accepted"] == 5 and one.status(ALICE)["attempts"] == 6


def test_hosts_racing_for_the_last_recipients_never_overshoot(url):
    hosts = counters(url, count=4)
    allowed = []

    def send(counter):
        for _ in range(50):
            allowed.append(counter.charge(ALICE, 37).allowed)
    threads = [threading.Thread(target=send, args=(counter,)) for counter in hosts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert allowed.count(True) == 37 and len(allowed) == 200


def test_a_recipient_asked_again_is_answered_alike_and_not_counted_twice(url):
    one, two = counters(url)
    assert one.charge(ALICE, 1, "4F1A2.1", "bob@example.org").allowed
    again = two.charge(ALICE, 1, "4F1A2.1", "bob@example.org")
    assert again.allowed and again.attempts == 1
    assert not two.charge(ALICE, 1, "4F1A2.1", "carol@example.org").allowed
    assert not one.charge(ALICE, 1, "4F1A2.1", "carol@example.org").allowed
    assert one.status(ALICE)["attempts"] == 2


def test_the_hold_falls_due_once_per_window_on_one_host(url):
    one, two = counters(url, auto_hold_factor=3)
    due = [counter.charge(ALICE, 2).hold_due for _ in range(5) for counter in (one, two)]
    assert due.count(True) == 1 and due.index(True) == 5      # the 6th attempt = 3 x 2


def test_a_window_ends_on_redis_s_clock_and_reset_ends_it_at_once(url):
    one, = counters(url, count=1, window=1)
    assert one.charge(ALICE, 1).allowed and not one.charge(ALICE, 1).allowed
    assert 0 < one.status(ALICE)["resets_in"] <= 1
    time.sleep(1.1)
    assert one.status(ALICE) is None and one.charge(ALICE, 1).allowed
    assert one.reset(ALICE) is True and one.reset(ALICE) is False
    assert one.charge(ALICE, 1).allowed


def test_no_sender_name_reaches_another_sender_s_keys(url, redis_server):
    one, = counters(url, count=1)
    odd = ("user", "a}:w{x%3A")
    assert one.charge(odd, 1).allowed
    assert one.charge(("user", "a"), 1).allowed
    keys = sorted(key.decode() for key in redis_server.client().keys("*"))
    assert keys == [KEY_PREFIX + "{user:a%7D%3Aw%7Bx%253A}:w", KEY_PREFIX + "{user:a}:w"]


def test_redis_gone_counts_in_this_process_logs_once_and_comes_back(caplog, monkeypatch):
    from redis_instance import RedisInstance

    monkeypatch.setattr(rediscounter, "RETRY_AFTER", 0.5)
    metrics = PrometheusRecorder()
    with RedisInstance() as server:
        counter, = counters(server.url(), count=1, metrics=metrics)
        assert counter.charge(ALICE, 3).allowed
        server.kill()
        with caplog.at_level(logging.WARNING, logger="relaymilter.rediscounter"):
            answers = [counter.charge(ALICE, 3).allowed for _ in range(4)]
            assert answers == [True, True, True, False]     # this process's own window
            time.sleep(0.6)
            assert not counter.charge(ALICE, 3).allowed    # tried Redis again: still gone
            assert [record.levelname for record in caplog.records] == ["ERROR"]
            assert "unavailable, counting in this process" in caplog.records[0].getMessage()
            assert metrics.health_state.counters_error is not None
            server.start()
            time.sleep(0.6)
            assert counter.charge(ALICE, 3).allowed         # Redis lost its counts with it
        assert [record.levelname for record in caplog.records] == ["ERROR", "WARNING"]
        assert metrics.health_state.counters_error is None


def test_a_redis_that_hangs_costs_a_decision_no_more_than_the_timeout(monkeypatch):
    from redis_instance import RedisInstance

    with RedisInstance() as server:
        counter, = counters(server.url(), count=1, timeout=0.05)
        assert counter.charge(ALICE, 3).allowed         # connected
        os.kill(server.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            charge = counter.charge(ALICE, 3)
            waited = time.monotonic() - started
            fast = time.monotonic()
            counter.charge(ALICE, 3)                      # the circuit is open: no wait
            skipped = time.monotonic() - fast
        finally:
            os.kill(server.pid, signal.SIGCONT)
    assert charge.allowed and waited < 0.5 and skipped < 0.01


def test_tempfail_mode_answers_unavailable_while_redis_is_gone():
    from redis_instance import RedisInstance

    with RedisInstance() as server:
        counter, = counters(server.url(), count=1, on_error="tempfail")
        server.kill()
        charge = counter.charge(ALICE, 3)
    assert charge.unavailable and not charge.allowed


def test_redis_back_is_seen_without_any_recipient_to_count(monkeypatch):
    from redis_instance import RedisInstance

    monkeypatch.setattr(rediscounter, "RETRY_AFTER", 0.3)
    metrics = PrometheusRecorder()
    with RedisInstance() as server:
        counter, = counters(server.url(), count=1, metrics=metrics)
        server.kill()
        counter.charge(ALICE, 3)
        assert metrics.health_state.counters_error is not None
        server.start()
        deadline = time.monotonic() + 5
        while metrics.health_state.counters_error is not None:
            assert time.monotonic() < deadline, "still degraded"
            time.sleep(0.05)
        assert counter.charge(ALICE, 3).attempts == 1          # counted in Redis again
