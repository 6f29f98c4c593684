"""ioloop.IoLoop: calls handed over from other threads, and the one heap of timers."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from relaymilter.ioloop import IoLoop


@pytest.fixture
def io():
    loop = IoLoop("test-io").start()
    yield loop
    loop.stop()


def on_loop(io: IoLoop, function) -> None:
    """Run function on the loop and wait for it."""
    done = threading.Event()
    io.call(lambda: (function(), done.set()))
    assert done.wait(5)


def test_calls_from_other_threads_run_on_the_loop_in_order(io):
    seen, done = [], threading.Event()
    for number in range(100):
        io.call(lambda number=number: seen.append((number, io.on_loop)))
    io.call(done.set)
    assert done.wait(5)
    assert seen == [(number, True) for number in range(100)]


def test_timers_fire_in_time_order_not_before_their_time(io):
    fired, done = [], threading.Event()
    start = time.monotonic()

    def arm():
        for delay in (0.3, 0.1, 0.2):
            io.at(start + delay, lambda delay=delay: fired.append((delay, time.monotonic())))
        io.at(start + 0.35, done.set)

    on_loop(io, arm)
    assert done.wait(5)
    assert [delay for delay, _ in fired] == [0.1, 0.2, 0.3]
    assert all(when >= start + delay for delay, when in fired)


def test_an_earlier_timer_armed_later_still_fires_first(io):
    fired, done = [], threading.Event()
    start = time.monotonic()
    on_loop(io, lambda: io.at(start + 1.0, lambda: fired.append("late")))
    on_loop(io, lambda: io.at(start + 0.05, lambda: (fired.append("early"), done.set())))
    assert done.wait(0.8)
    assert fired == ["early"]


def test_a_failing_call_or_timer_is_logged_and_the_loop_goes_on(io, caplog):
    done = threading.Event()
    with caplog.at_level(logging.ERROR):
        io.call(lambda: 1 / 0)
        on_loop(io, lambda: io.at(time.monotonic(), lambda: 1 / 0))
        on_loop(io, lambda: io.at(time.monotonic() + 0.05, done.set))
        assert done.wait(5)
    assert "a call on the I/O loop failed" in caplog.text
    assert "a timer on the I/O loop failed" in caplog.text
