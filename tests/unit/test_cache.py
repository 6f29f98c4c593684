"""cache.py: TTL clamps, expiry, bounds, coalescing; a fake timer, no sleeps."""

import threading
from concurrent.futures import Executor, Future, ThreadPoolExecutor

import pytest

from relaymilter.cache import FetchSource, LookupCache


def Answer(text: str, ttl: float) -> tuple:
    """A cached value as the cache wants them: a plain tuple, TTL first."""
    return (ttl, text)


def text_of(value: tuple) -> str:
    return value[1]


class FakeTimer:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


class InlineExecutor(Executor):
    """Runs each job at submit(): deterministic, single-threaded."""

    def submit(self, fn, /, *args, **kwargs):
        future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as error:
            future.set_exception(error)
        return future


class CountingLookup:
    def __init__(self, answer=None, error=None):
        self.answer = answer or Answer("127.0.0.2", 300)
        self.error = error
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self):
        with self._lock:
            self.calls += 1
        if self.error:
            raise self.error
        return self.answer


@pytest.fixture
def timer():
    return FakeTimer()


def make_cache(timer, max_entries=100, min_ttl=60, max_ttl=3600):
    return LookupCache(max_entries=max_entries, min_ttl=min_ttl, max_ttl=max_ttl, timer=timer)


def fetch_value(cache, key, lookup):
    fetch = cache.fetch(key, lookup, InlineExecutor())
    return fetch.future.result(timeout=1), fetch.source


def test_first_fetch_looks_up_and_second_is_a_cache_hit(timer):
    cache, lookup = make_cache(timer), CountingLookup()
    assert fetch_value(cache, "k", lookup) == (lookup.answer, FetchSource.DNS)
    assert fetch_value(cache, "k", lookup) == (lookup.answer, FetchSource.CACHE)
    assert lookup.calls == 1


def test_a_cache_hit_is_an_already_completed_future(timer):
    cache, lookup = make_cache(timer), CountingLookup()
    fetch_value(cache, "k", lookup)
    assert cache.fetch("k", lookup, InlineExecutor()).future.done()


def test_entry_lives_for_its_ttl_and_then_expires(timer):
    cache, lookup = make_cache(timer), CountingLookup(Answer("127.0.0.2", 300))
    fetch_value(cache, "k", lookup)
    timer.now += 299.9
    assert fetch_value(cache, "k", lookup)[1] is FetchSource.CACHE
    timer.now += 0.1
    assert fetch_value(cache, "k", lookup)[1] is FetchSource.DNS
    assert lookup.calls == 2


def test_short_ttl_is_raised_to_min_ttl(timer):
    cache, lookup = make_cache(timer, min_ttl=60), CountingLookup(Answer("127.0.0.2", 5))
    fetch_value(cache, "k", lookup)
    timer.now += 59
    assert fetch_value(cache, "k", lookup)[1] is FetchSource.CACHE
    timer.now += 1
    assert fetch_value(cache, "k", lookup)[1] is FetchSource.DNS


def test_zero_ttl_is_raised_to_min_ttl(timer):
    cache, lookup = make_cache(timer, min_ttl=60), CountingLookup(Answer("127.0.0.2", 0))
    fetch_value(cache, "k", lookup)
    timer.now += 30
    assert fetch_value(cache, "k", lookup)[1] is FetchSource.CACHE


def test_long_ttl_is_cut_to_max_ttl(timer):
    cache, lookup = make_cache(timer, max_ttl=3600), CountingLookup(Answer("127.0.0.2", 86400))
    fetch_value(cache, "k", lookup)
    timer.now += 3599
    assert fetch_value(cache, "k", lookup)[1] is FetchSource.CACHE
    timer.now += 1
    assert fetch_value(cache, "k", lookup)[1] is FetchSource.DNS


@pytest.mark.parametrize("ttl, expected", [(0, 60), (59, 60), (60, 60), (600, 600),
                                           (3600, 3600), (3601, 3600), (10 ** 9, 3600)])
def test_clamp_ttl(ttl, expected):
    assert make_cache(FakeTimer()).clamp_ttl(ttl) == expected


def test_negative_answer_is_cached_like_any_other(timer):
    # The lookup turns NXDOMAIN into a value with the SOA's negative TTL.
    nxdomain = Answer("NXDOMAIN", 900)
    cache, lookup = make_cache(timer), CountingLookup(nxdomain)
    fetch_value(cache, "k", lookup)
    timer.now += 899
    assert fetch_value(cache, "k", lookup) == (nxdomain, FetchSource.CACHE)
    timer.now += 1
    assert fetch_value(cache, "k", lookup)[1] is FetchSource.DNS


def test_failed_lookup_is_not_cached(timer):
    cache, lookup = make_cache(timer), CountingLookup(error=TimeoutError("slow"))
    for _ in range(3):
        fetch = cache.fetch("k", lookup, InlineExecutor())
        assert isinstance(fetch.future.exception(), TimeoutError)
        assert fetch.source is FetchSource.DNS
    assert lookup.calls == 3
    assert cache.stats().entries == 0
    assert cache.stats().in_flight == 0


def test_cache_holds_at_most_max_entries(timer):
    cache, lookup = make_cache(timer, max_entries=10), CountingLookup()
    for number in range(50):
        fetch_value(cache, number, lookup)
    assert cache.stats().entries == 10
    # The most recent keys stayed; the oldest went.
    assert fetch_value(cache, 49, lookup)[1] is FetchSource.CACHE
    assert fetch_value(cache, 0, lookup)[1] is FetchSource.DNS


def test_keys_are_cached_separately(timer):
    cache = make_cache(timer)
    first, second = CountingLookup(Answer("a", 300)), CountingLookup(Answer("b", 300))
    assert text_of(fetch_value(cache, ("zone1", "192.0.2.1"), first)[0]) == "a"
    assert text_of(fetch_value(cache, ("zone2", "192.0.2.1"), second)[0]) == "b"
    assert (first.calls, second.calls) == (1, 1)


def test_concurrent_fetches_of_one_key_share_one_lookup(timer):
    cache = make_cache(timer)
    started, release = threading.Event(), threading.Event()
    calls = []

    def slow_lookup():
        calls.append(1)
        started.set()
        release.wait(5)
        return Answer("127.0.0.2", 300)

    with ThreadPoolExecutor(4) as executor:
        first = cache.fetch("k", slow_lookup, executor)
        assert started.wait(5)
        second = cache.fetch("k", slow_lookup, executor)
        third = cache.fetch("k", slow_lookup, executor)
        assert second.future is first.future is third.future
        assert (first.source, second.source, third.source) == (
            FetchSource.DNS, FetchSource.IN_FLIGHT, FetchSource.IN_FLIGHT)
        assert cache.stats().in_flight == 1
        release.set()
        assert text_of(third.future.result(timeout=5)) == "127.0.0.2"
    assert len(calls) == 1
    assert cache.fetch("k", slow_lookup, InlineExecutor()).source is FetchSource.CACHE
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.coalesced, stats.in_flight) == (1, 1, 2, 0)


def test_many_threads_at_once_cost_one_lookup(timer):
    cache = make_cache(timer)
    release = threading.Event()
    lookup_calls = []

    def slow_lookup():
        lookup_calls.append(1)
        release.wait(5)
        return Answer("127.0.0.2", 300)

    barrier = threading.Barrier(20)
    futures = []

    def session(executor):
        barrier.wait(5)
        futures.append(cache.fetch("k", slow_lookup, executor).future)

    with ThreadPoolExecutor(4) as executor:
        threads = [threading.Thread(target=session, args=(executor,)) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(5)
        release.set()
        assert {text_of(future.result(timeout=5)) for future in futures} == {"127.0.0.2"}
    assert len(lookup_calls) == 1
    assert len(futures) == 20


def test_failure_in_flight_reaches_every_waiter_and_is_not_cached(timer):
    cache = make_cache(timer)
    started, release = threading.Event(), threading.Event()

    def failing_lookup():
        started.set()
        release.wait(5)
        raise TimeoutError("no answer")

    with ThreadPoolExecutor(2) as executor:
        first = cache.fetch("k", failing_lookup, executor)
        assert started.wait(5)
        second = cache.fetch("k", failing_lookup, executor)
        release.set()
        for fetch in (first, second):
            assert isinstance(fetch.future.exception(timeout=5), TimeoutError)
    retry = CountingLookup()
    assert fetch_value(cache, "k", retry)[1] is FetchSource.DNS
    assert retry.calls == 1


@pytest.mark.parametrize("kwargs", [dict(max_entries=0), dict(min_ttl=-1),
                                    dict(min_ttl=100, max_ttl=10)])
def test_impossible_bounds_are_refused(kwargs):
    with pytest.raises(ValueError):
        LookupCache(**kwargs)
