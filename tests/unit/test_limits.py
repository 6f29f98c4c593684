"""limits.RecipientCounter: windows, refusals, the automatic hold, threads."""

import threading

import pytest

from relaymilter.limits import SWEEP_EVERY, RecipientCounter


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


def test_allows_up_to_the_limit_then_refuses(clock):
    counter = RecipientCounter(window=3600, timer=clock)
    outcomes = [counter.charge(("user", "alice"), limit=3).allowed for _ in range(5)]
    assert outcomes == [True, True, True, False, False]


def test_senders_are_counted_apart(clock):
    counter = RecipientCounter(window=3600, timer=clock)
    for _ in range(3):
        counter.charge(("user", "alice"), limit=3)
    assert counter.charge(("user", "bob"), limit=3).allowed
    assert counter.charge(("client", "alice"), limit=3).allowed


def test_a_new_window_starts_after_the_old_one_ended(clock):
    counter = RecipientCounter(window=60, timer=clock)
    for _ in range(3):
        counter.charge("k", limit=2)
    clock.now += 59.9
    assert not counter.charge("k", limit=2).allowed
    clock.now += 0.1
    charge = counter.charge("k", limit=2)
    assert (charge.allowed, charge.accepted, charge.attempts) == (True, 1, 1)


def test_hold_is_due_once_when_attempts_reach_the_factor(clock):
    counter = RecipientCounter(window=3600, auto_hold_factor=3, timer=clock)
    due = [counter.charge("k", limit=2).hold_due for _ in range(10)]
    assert due == [False] * 5 + [True] + [False] * 4


def test_no_hold_without_a_factor(clock):
    counter = RecipientCounter(window=3600, auto_hold_factor=0, timer=clock)
    assert not any(counter.charge("k", limit=1).hold_due for _ in range(100))


def test_expired_windows_are_swept(clock):
    counter = RecipientCounter(window=10, timer=clock)
    for number in range(SWEEP_EVERY - 1):
        counter.charge(number, limit=5)
    clock.now += 11
    counter.charge("late", limit=5)
    assert counter.senders() == 1


def test_concurrent_charges_never_allow_more_than_the_limit():
    counter = RecipientCounter(window=3600)
    allowed = []
    lock = threading.Lock()

    def work():
        mine = sum(counter.charge("shared", limit=1000).allowed for _ in range(500))
        with lock:
            allowed.append(mine)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(allowed) == 1000


def test_a_recipient_asked_again_gets_its_first_answer_uncounted(clock):
    counter = RecipientCounter(window=3600, timer=clock)
    alice = ("user", "alice")
    assert counter.charge(alice, 1, "4F1A2.1", "bob@example.org").allowed
    again = counter.charge(alice, 1, "4F1A2.1", "bob@example.org")
    assert again.allowed and again.attempts == 1
    assert not counter.charge(alice, 1, "4F1A2.1", "carol@example.org").allowed
    assert not counter.charge(alice, 1, "4F1A2.1", "carol@example.org").allowed
    assert counter.charge(alice, 1, "4F1A2.2", "bob@example.org").attempts == 3
    clock.now += 3600           # a new window remembers nothing
    assert counter.charge(alice, 1, "4F1A2.1", "carol@example.org").allowed


def test_window_must_be_positive():
    with pytest.raises(ValueError):
        RecipientCounter(window=0)
