"""KeyedLocks and Timers: per-model serialisation and delayed calls, from many threads."""

from __future__ import annotations

import threading

from localcluster.pytest_plugin import wait_for
from neuronmodel_operator.scheduling import KeyedLocks, Timers


def test_a_key_stays_locked_for_every_user_until_the_last_one_is_done() -> None:
    locks = KeyedLocks()
    inside = threading.Event()
    release = threading.Event()
    overlap: list[str] = []

    def first() -> None:
        with locks.hold("model"):
            inside.set()
            release.wait(5)

    def second() -> None:
        with locks.hold("model"):
            overlap.append("second ran" if release.is_set() else "second ran while the first held the lock")

    holder = threading.Thread(target=first)
    holder.start()
    inside.wait(5)
    waiter = threading.Thread(target=second)
    waiter.start()
    wait_for(lambda: len(locks) == 1 and not overlap, what="the second thread waiting")
    release.set()
    holder.join(5)
    waiter.join(5)
    assert overlap == ["second ran"]
    assert len(locks) == 0  # dropped by its last user: nothing kept for deleted models


def test_a_newer_request_replaces_the_pending_one_and_cancel_drops_it() -> None:
    timers = Timers()
    calls: list[str] = []
    timers.later("model", 0.5, calls.append, "old")
    timers.later("model", 0.1, calls.append, "new")
    wait_for(lambda: calls == ["new"] and len(timers) == 0, what="only the newer call, then nothing pending")
    timers.later("model", 0.1, calls.append, "cancelled")
    timers.cancel("model")
    fired = threading.Event()
    timers.later("other", 0.2, lambda: fired.set())
    assert fired.wait(5)
    assert calls == ["new"]
