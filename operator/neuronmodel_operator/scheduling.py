"""Per-model serialisation and delayed re-reconciles, safe from any of the threads Kopf runs handlers in."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any


class KeyedLocks:
    """One lock per key, existing only while a thread holds or waits for it: an entry is dropped by its last user,
    never under another (dropping it on a model's deletion could let two reconciles of a new model run at once)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._entries: dict[Hashable, tuple[threading.Lock, list[int]]] = {}

    @contextmanager
    def hold(self, key: Hashable) -> Iterator[None]:
        with self._guard:
            lock, users = self._entries.setdefault(key, (threading.Lock(), [0]))
            users[0] += 1
        try:
            with lock:
                yield
        finally:
            with self._guard:
                users[0] -= 1
                if users[0] == 0:
                    del self._entries[key]

    def __len__(self) -> int:
        with self._guard:
            return len(self._entries)


class Timers:
    """At most one pending call per key: a newer request replaces the older one."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._pending: dict[Hashable, threading.Timer] = {}

    def later(self, key: Hashable, delay: float, call: Callable[..., Any], *args: Any) -> None:
        timer = threading.Timer(max(delay, 0.1), self._fire, (key, call, args))
        timer.daemon = True
        with self._guard:
            previous = self._pending.get(key)
            self._pending[key] = timer
        if previous is not None:
            previous.cancel()
        timer.start()

    def _fire(self, key: Hashable, call: Callable[..., Any], args: tuple[Any, ...]) -> None:
        with self._guard:
            if self._pending.get(key) is threading.current_thread():  # a Timer is the thread it runs in
                del self._pending[key]
        call(*args)

    def cancel(self, key: Hashable) -> None:
        with self._guard:
            timer = self._pending.pop(key, None)
        if timer is not None:
            timer.cancel()

    def __len__(self) -> int:
        with self._guard:
            return len(self._pending)
