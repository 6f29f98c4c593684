"""promise.Promise, Done and wait_all, across real threads."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time

import pytest

from relaymilter.promise import Done, Promise, succeeded, wait_all


def test_a_waiter_on_another_thread_wakes_when_the_result_is_set():
    promise = Promise()
    got = []
    waiter = threading.Thread(target=lambda: got.append(promise.result(timeout=5)))
    waiter.start()
    time.sleep(0.05)
    promise.set_result("answer")
    waiter.join(5)
    assert got == ["answer"] and promise.done() and succeeded(promise)


def test_result_raises_the_exception_and_times_out_when_nothing_came():
    pending = Promise()
    with pytest.raises(TimeoutError):
        pending.result(timeout=0.05)
    failed = Promise()
    failed.set_exception(KeyError("no"))
    with pytest.raises(KeyError):
        failed.result()
    assert isinstance(failed.exception(), KeyError) and not succeeded(failed)


def test_callbacks_run_once_settled_or_at_once_and_one_failing_stops_none(caplog):
    promise, seen = Promise(), []
    promise.add_done_callback(lambda p: seen.append(("first", p.result())))
    promise.add_done_callback(lambda p: 1 / 0)
    promise.add_done_callback(lambda p: seen.append(("third", p.result())))
    assert seen == []
    with caplog.at_level(logging.ERROR):
        promise.set_result(7)
    assert seen == [("first", 7), ("third", 7)]
    assert "a promise callback failed" in caplog.text
    promise.add_done_callback(lambda p: seen.append(("late", p.result())))
    assert seen[-1] == ("late", 7)


def test_a_promise_is_settled_once():
    promise = Promise()
    promise.set_result(1)
    with pytest.raises(RuntimeError):
        promise.set_result(2)
    assert promise.result() == 1


def test_done_is_a_settled_value():
    done, seen = Done("v"), []
    done.add_done_callback(lambda d: seen.append(d.result()))
    assert done.done() and done.exception() is None and seen == ["v"]


def test_wait_all_waits_for_promises_and_futures_alike_but_not_past_its_timeout():
    promise, future = Promise(), concurrent.futures.Future()
    threading.Timer(0.05, promise.set_result, ("p",)).start()
    threading.Timer(0.1, future.set_result, ("f",)).start()
    started = time.monotonic()
    wait_all([promise, future], 5)
    assert promise.done() and future.done() and time.monotonic() - started < 2
    never = Promise()
    started = time.monotonic()
    wait_all([never], 0.1)
    assert 0.09 <= time.monotonic() - started < 1 and not never.done()
