"""The bounded channels between a stream's stage threads."""

from __future__ import annotations

import collections
import threading


class _Closed(Exception):
    """The channel was closed and is empty."""


class _Channel:
    """A bounded queue between two stages.

    ``put`` on a full channel waits (``drop_oldest=False``: a file source, every item
    counts) or drops the oldest item and returns it (a live source: the producer
    never waits). ``get`` raises :class:`_Closed` once the channel is closed and empty.
    """

    def __init__(self, maxsize: int, *, drop_oldest: bool) -> None:
        self._items: collections.deque = collections.deque()
        self._maxsize, self._drop_oldest = maxsize, drop_oldest
        self._cond = threading.Condition()
        self._closed = False

    def put(self, item) -> object | None:
        with self._cond:
            dropped = None
            while len(self._items) >= self._maxsize and not self._closed:
                if self._drop_oldest:
                    dropped = self._items.popleft()
                    break
                self._cond.wait()
            if self._closed:
                return item  # nobody will read it
            self._items.append(item)
            self._cond.notify_all()
            return dropped

    def get(self):
        with self._cond:
            while not self._items:
                if self._closed:
                    raise _Closed
                self._cond.wait()
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def close(self, *, discard: bool = False) -> list:
        """No more puts; ``discard`` also empties the channel and returns what it held."""
        with self._cond:
            self._closed = True
            dropped = list(self._items) if discard else []
            if discard:
                self._items.clear()
            self._cond.notify_all()
            return dropped
