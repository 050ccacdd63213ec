"""The compute-once cache behind the video copies, the reranker's image cache and the query's source reads."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from operators.once_cache import OnceCache


def _concurrently(n, fn):
    """fn(i) for i in range(n), all released at once; the results in order."""
    start = threading.Barrier(n)

    def run(i):
        start.wait()
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def test_concurrent_callers_of_one_key_share_one_computation():
    cache, calls = OnceCache(), []

    def compute():
        calls.append(1)
        time.sleep(0.2)  # long enough for every other caller to arrive while it runs
        return object()

    values = _concurrently(8, lambda i: cache.get("k", compute))
    assert len(calls) == 1 and all(v is values[0] for v in values)


def test_different_keys_compute_in_parallel():
    cache, running, peak, lock = OnceCache(), [0], [0], threading.Lock()

    def compute(i):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        return i

    assert _concurrently(4, lambda i: cache.get(i, lambda: compute(i))) == [0, 1, 2, 3]
    assert peak[0] > 1  # one key's computation does not block another's


def test_a_failure_reaches_every_waiting_caller_and_is_not_cached():
    cache, calls = OnceCache(), []

    def failing():
        calls.append(1)
        time.sleep(0.2)
        raise OSError("gone")

    def call(_):
        try:
            return cache.get("k", failing)
        except OSError as exc:
            return str(exc)

    assert _concurrently(6, call) == ["gone"] * 6 and len(calls) == 1
    assert cache.get("k", lambda: "back") == "back"  # a later caller computes again
    assert len(cache) == 1


def test_a_value_is_cached_before_its_computation_is_marked_done():
    # Thousands of rounds of two racing callers: the second must find the first's value or wait
    # for it, never compute again.
    for round_ in range(2000):
        cache, calls = OnceCache(), []

        def compute():
            calls.append(1)
            return round_

        _concurrently(2, lambda i: cache.get("k", compute))
        assert len(calls) == 1, round_


def test_least_recently_used_entries_leave_first_and_on_evict_sees_them():
    evicted = []
    cache = OnceCache(2, on_evict=lambda key, value: evicted.append((key, value)))
    for key in "abc":
        cache.get(key, lambda key=key: key.upper())
    assert evicted == [("a", "A")]
    cache.get("b", lambda: "never")  # b used: c is now the oldest
    cache.get("d", lambda: "D")
    assert evicted == [("a", "A"), ("c", "C")]
    assert cache.peek("b") == "B" and cache.peek("c") is None
    cache.clear()
    assert sorted(evicted[2:]) == [("b", "B"), ("d", "D")] and len(cache) == 0


def test_a_held_entry_is_never_evicted_until_released():
    evicted = []
    cache = OnceCache(1, on_evict=lambda key, value: evicted.append(key))
    cache.get("held", lambda: 0, hold=True)
    cache.get("held", lambda: 0, hold=True)  # held twice
    for key in "xyz":
        cache.get(key, lambda: 1)
    assert evicted == ["x", "y", "z"] and cache.peek("held") == 0  # the others go, the held one stays
    cache.release("held")
    cache.get("w", lambda: 2)
    assert evicted[-1] == "w" and cache.peek("held") == 0  # one hold left
    cache.release("held")
    cache.get("v", lambda: 3, hold=True)  # two entries, one too many: the idle oldest goes
    assert evicted[-1] == "held" and len(cache) == 1
    cache.release("never held")  # no-op


def test_waiters_that_hold_count_once_each():
    cache = OnceCache(0, on_evict=lambda key, value: None)

    def compute():
        time.sleep(0.2)
        return "v"

    assert _concurrently(5, lambda i: cache.get("k", compute, hold=True)) == ["v"] * 5
    for _ in range(4):
        cache.release("k")
        assert cache.peek("k") == "v"  # still held by the others
    cache.release("k")
    assert cache.peek("k") is None  # max_items 0: gone with the last hold


def test_max_items_must_not_be_negative():
    with pytest.raises(ValueError, match="max_items"):
        OnceCache(-1)
