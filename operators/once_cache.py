"""A thread-safe cache that computes each key once, however many threads ask for it at the same time.

Preparation and candidate threads ask for the same thing at once: the segments of one video its
download, the pairs of one image query its pixels, the pages of one PDF its bytes. Each of those
caches needs the same three guarantees, kept here once:
- concurrent callers of a key wait for the one computation in flight instead of starting their own;
- a value is in the cache before that computation is marked done, so a caller never misses both;
- an entry a caller holds (get(..., hold=True) until release) is never evicted under it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any, Callable, Generic, Hashable, TypeVar

V = TypeVar("V")

__all__ = ["OnceCache"]


class OnceCache(Generic[V]):
    """Values by key, computed once each; least recently used first out beyond max_items (None: no bound).

    on_evict(key, value) runs, outside the lock, for every entry that leaves: evicted, or at clear().
    A computation that raises caches nothing: its concurrent callers get its exception, a later one
    computes again.
    """

    def __init__(self, max_items: int | None = None,
                 on_evict: Callable[[Hashable, V], Any] | None = None) -> None:
        if max_items is not None and max_items < 0:
            raise ValueError(f"max_items must be >= 0 or None, got {max_items}")
        self.max_items = max_items
        self._on_evict = on_evict
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self._holds: dict[Hashable, int] = {}  # key -> get(hold=True) calls not yet released
        self._flights: dict[Hashable, Future] = {}  # key -> the computation in flight
        self._lock = threading.Lock()

    def get(self, key: Hashable, compute: Callable[[], V], hold: bool = False) -> V:
        """The value of key, computed by compute() if absent; with hold, kept until release(key)."""
        while True:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    if hold:
                        self._holds[key] = self._holds.get(key, 0) + 1
                    return self._items[key]
                flight = self._flights.get(key)
                owner = flight is None
                if owner:
                    flight = self._flights[key] = Future()
            if owner:
                return self._compute(key, compute, flight, hold)
            value = flight.result()  # raises the computation's exception
            if not hold:
                return value
            # A holder must count under the lock, with the value still cached: look again (the value
            # could have been evicted in between, when nobody held it; then it is computed anew).

    def _compute(self, key: Hashable, compute: Callable[[], V], flight: Future, hold: bool) -> V:
        try:
            value = compute()
        except BaseException as exc:
            with self._lock:
                del self._flights[key]
            flight.set_exception(exc)
            raise
        with self._lock:  # stored before the flight ends: a caller arriving in between finds it
            self._items[key] = value
            if hold:
                self._holds[key] = self._holds.get(key, 0) + 1
            del self._flights[key]
            evicted = self._evict()
        flight.set_result(value)
        self._dispose(evicted)
        return value

    def release(self, key: Hashable) -> None:
        """One get(key, hold=True) is done with its value: it may be evicted again (unheld keys: no-op)."""
        with self._lock:
            holds = self._holds.get(key)
            if holds is None:
                return
            if holds > 1:
                self._holds[key] = holds - 1
                return
            del self._holds[key]
            evicted = self._evict()
        self._dispose(evicted)

    def peek(self, key: Hashable) -> V | None:
        """The cached value of key, or None; computes nothing and leaves the order as it is."""
        with self._lock:
            return self._items.get(key)

    def clear(self) -> None:
        """Drop every entry, held or not (on_evict runs for each)."""
        with self._lock:
            evicted = list(self._items.items())
            self._items.clear()
            self._holds.clear()
        self._dispose(evicted)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def _evict(self) -> list[tuple[Hashable, V]]:
        """Remove the least recently used entries beyond max_items that nobody holds (under the lock)."""
        if self.max_items is None:
            return []
        excess = len(self._items) - self.max_items
        idle = [key for key in self._items if key not in self._holds][:max(0, excess)]
        return [(key, self._items.pop(key)) for key in idle]

    def _dispose(self, evicted: list[tuple[Hashable, V]]) -> None:
        if self._on_evict is not None:
            for key, value in evicted:
                self._on_evict(key, value)
