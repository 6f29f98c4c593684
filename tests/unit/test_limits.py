"""limits.LimitCounter: sliding windows, several rates, messages, the automatic hold, threads."""

import threading

import pytest

from relaymilter.limits import (SLOTS, SWEEP_EVERY, Limit, LimitCounter, WindowCount,
                                window_count)

HOUR = 3600.0
ALICE = ("user", "alice")


class Clock:
    def __init__(self):
        self.now = 1000 * HOUR      # the start of a slot

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


def allowed(counter, count, limit, key=ALICE, message=None):
    return [counter.charge(key, limit, message).allowed for _ in range(count)]


def test_allows_up_to_the_limit_then_refuses_naming_the_rate(clock):
    counter = LimitCounter(timer=clock)
    charges = [counter.charge(ALICE, Limit(per_hour=3)) for _ in range(5)]
    assert [charge.allowed for charge in charges] == [True, True, True, False, False]
    assert [charge.exceeded for charge in charges] == [None] * 3 + ["per_hour"] * 2


def test_senders_are_counted_apart(clock):
    counter = LimitCounter(timer=clock)
    allowed(counter, 3, Limit(3))
    assert counter.charge(("user", "bob"), Limit(3)).allowed
    assert counter.charge(("client", "alice"), Limit(3)).allowed


def test_the_window_slides_a_slot_at_a_time(clock):
    counter = LimitCounter(timer=clock)
    limit = Limit(per_hour=3)
    assert allowed(counter, 2, limit) == [True, True]
    clock.now += 30 * 60
    assert allowed(counter, 2, limit) == [True, False]
    clock.now += 30 * 60 - 0.1          # the first two are still in the window
    assert allowed(counter, 1, limit) == [False]
    clock.now += 0.1                    # their slot has left it: two come back, not three
    assert allowed(counter, 3, limit) == [True, True, False]
    clock.now += 30 * 60                # the one of minute 30 leaves
    assert allowed(counter, 2, limit) == [True, False]


def test_no_second_burst_just_after_a_boundary(clock):
    # A fixed window would take 5 at minute 59 and 5 more at minute 61.
    counter = LimitCounter(timer=clock)
    clock.now += 59 * 60
    assert allowed(counter, 6, Limit(5)).count(True) == 5
    clock.now += 2 * 60
    assert allowed(counter, 5, Limit(5)).count(True) == 0
    clock.now += 57 * 60                # 59 minutes after: still counted
    assert allowed(counter, 1, Limit(5)) == [False]
    clock.now += 60                     # 60 minutes after the slot began: gone
    assert allowed(counter, 6, Limit(5)).count(True) == 5


def test_hour_and_day_rates_hold_together(clock):
    counter = LimitCounter(timer=clock)
    limit = Limit(per_hour=10, per_day=15)
    assert allowed(counter, 11, limit).count(True) == 10
    assert counter.charge(ALICE, limit).exceeded == "per_hour"
    clock.now += HOUR
    assert allowed(counter, 5, limit) == [True] * 5
    refused = counter.charge(ALICE, limit)
    assert (refused.allowed, refused.exceeded) == (False, "per_day")
    clock.now += 23 * HOUR              # a day after the first ten: they leave the day
    assert allowed(counter, 11, limit).count(True) == 10


def test_a_refused_recipient_uses_no_allowance_of_the_other_rates(clock):
    counter = LimitCounter(timer=clock)
    assert allowed(counter, 4, Limit(per_hour=2, per_day=3)) == [True, True, False, False]
    clock.now += HOUR
    # Two refused in the first hour did not count against the day.
    assert allowed(counter, 2, Limit(per_hour=2, per_day=3)) == [True, False]


def test_a_message_counts_once_whatever_its_recipients(clock):
    counter = LimitCounter(timer=clock)
    limit = Limit(messages_per_hour=2)
    assert allowed(counter, 5, limit, message="m1") == [True] * 5
    assert allowed(counter, 3, limit, message="m2") == [True] * 3
    third = counter.charge(ALICE, limit, "m3", "a@example.org")
    assert (third.allowed, third.exceeded) == (False, "messages_per_hour")
    # Every recipient of a refused message is refused, even with no new count.
    assert not counter.charge(ALICE, limit, "m3", "b@example.org").allowed
    assert counter.charge(ALICE, limit, "m1", "z@example.org").allowed


def test_messages_and_recipients_are_separate_counts(clock):
    counter = LimitCounter(timer=clock)
    limit = Limit(per_hour=3, messages_per_hour=5)
    assert allowed(counter, 4, limit, message="m1") == [True, True, True, False]
    assert counter.charge(ALICE, limit, "m1").exceeded == "per_hour"
    # A message of four recipients is one message, not four.
    clock.now += HOUR
    limit = Limit(per_hour=10, messages_per_hour=2)
    assert allowed(counter, 4, limit, message="m2") == [True] * 4
    assert allowed(counter, 4, limit, message="m3") == [True] * 4
    assert counter.charge(ALICE, limit, "m4").exceeded == "messages_per_hour"


def test_without_a_message_id_each_recipient_is_a_message(clock):
    counter = LimitCounter(timer=clock)
    assert allowed(counter, 3, Limit(messages_per_hour=2)) == [True, True, False]


def test_hold_is_due_once_when_the_attempts_reach_the_factor(clock):
    counter = LimitCounter(auto_hold_factor=3, timer=clock)
    due = [counter.charge(ALICE, Limit(2)).hold_due for _ in range(10)]
    assert due == [False] * 5 + [True] + [False] * 4


def test_hold_is_due_again_only_when_the_attempts_reach_the_factor_anew(clock):
    counter = LimitCounter(auto_hold_factor=2, timer=clock)
    assert [counter.charge(ALICE, Limit(1)).hold_due for _ in range(3)] == [False, True, False]
    clock.now += HOUR                   # the attempts have left the window
    assert [counter.charge(ALICE, Limit(1)).hold_due for _ in range(2)] == [False, True]


def test_any_rate_can_make_the_hold_due(clock):
    counter = LimitCounter(auto_hold_factor=2, timer=clock)
    limit = Limit(per_hour=100, messages_per_hour=1)
    due = [counter.charge(ALICE, limit, f"m{number}").hold_due for number in range(3)]
    assert due == [False, True, False]


def test_no_hold_without_a_factor(clock):
    counter = LimitCounter(auto_hold_factor=0, timer=clock)
    assert not any(counter.charge(ALICE, Limit(1)).hold_due for _ in range(100))


def test_a_recipient_asked_again_gets_its_first_answer_uncounted(clock):
    counter = LimitCounter(timer=clock)
    limit = Limit(per_hour=1)
    assert counter.charge(ALICE, limit, "4F1A2.1", "bob@example.org").allowed
    assert counter.charge(ALICE, limit, "4F1A2.1", "bob@example.org").allowed
    refused = counter.charge(ALICE, limit, "4F1A2.1", "carol@example.org")
    assert counter.charge(ALICE, limit, "4F1A2.1", "carol@example.org") == refused
    assert not refused.allowed and refused.exceeded == "per_hour"
    clock.now += HOUR
    assert counter.charge(ALICE, limit, "4F1A2.2", "carol@example.org").allowed


def test_idle_senders_are_swept(clock):
    counter = LimitCounter(hour=10, timer=clock)
    for number in range(SWEEP_EVERY - 1):
        counter.charge(number, Limit(5))
    clock.now += 3601
    counter.charge("late", Limit(5))
    assert counter.senders() == 1


def test_concurrent_charges_never_allow_more_than_the_limit():
    counter = LimitCounter()
    results = []
    lock = threading.Lock()

    def work():
        mine = sum(counter.charge("shared", Limit(1000)).allowed for _ in range(500))
        with lock:
            results.append(mine)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(results) == 1000


def test_window_count_says_when_allowance_comes_back():
    slot = 60.0
    now = 100 * slot + 15       # 15 s into slot 100
    accepted = {40: 9, 50: 2, 100: 3}       # 40 has left the window (100 - 60)
    attempts = {40: 9, 50: 4, 100: 5}
    assert window_count(accepted, attempts, now, slot) == WindowCount(
        5, 9, (50 + SLOTS) * slot - now, (100 + SLOTS) * slot - now)
    assert window_count({}, {}, now, slot) == WindowCount(0, 0, None, None)


def test_an_hour_must_be_positive():
    with pytest.raises(ValueError):
        LimitCounter(hour=0)


def test_a_limit_describes_its_rates():
    assert Limit(per_hour=500, messages_per_day=40).describe() == \
        "500 recipients per hour, 40 messages per day"
