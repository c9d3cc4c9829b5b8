"""What this process wrote and its watches have not shown back yet.

The indexes follow the API through watches, which lag our own writes by milliseconds to seconds under load. A
reconcile in that window would act on the older view: create a child again (answered 409), PUT the same change
twice, delete a Job twice, or compare a new status against the one before it and write it again. So for a while
our own writes stand in for what the index shows, until the index catches up (or ``ttl`` passes, after which the
index is trusted again: a write that never shows up, say because it was undone at once, must not be hidden).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .naming import MODEL_LABEL

ModelKey = tuple[str, str]  # (namespace, model label): how the indexes group a model with its children
_METADATA = (
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "labels",
    "annotations",
    # ownerReferences too: a PUT replace sends back the references it read, or the children would be orphaned.
    "ownerReferences",
    "creationTimestamp",
    "deletionTimestamp",
)


def slim(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the reconcile reads of an object: a plain copy, so an index holds no live view (and pods no spec)."""
    meta = body["metadata"]
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {k: meta.get(k) or ({} if k in ("labels", "annotations") else None) for k in _METADATA},
        "spec": dict(body.get("spec") or {}) if body.get("kind") != "Pod" else {},
        "status": dict(body.get("status") or {}),
        **({"data": dict(body.get("data") or {})} if body.get("kind") == "ConfigMap" else {}),
    }


def without_none(value: Any) -> Any:
    """A value as the API stores it: a merge patch deletes the keys it sets to null."""
    if isinstance(value, dict):
        return {k: without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_none(v) for v in value]
    return value


def model_key(obj: dict[str, Any]) -> ModelKey:
    meta = obj["metadata"]
    return meta["namespace"], (meta.get("labels") or {}).get(MODEL_LABEL, "")


def _shows(seen: dict[str, Any], written: dict[str, Any]) -> bool:
    """Whether an indexed object is our write or newer: the same object at our write's resourceVersion or later
    (a hand edit after our write is newer and rules)."""
    have, want = seen["metadata"], written["metadata"]
    return have.get("uid") == want.get("uid") and _same_or_later(have["resourceVersion"], want["resourceVersion"])


def _same_or_later(have: str, want: str) -> bool:
    """Whether resourceVersion ``have`` is ``want`` or later, for two versions of one object.

    Kubernetes documents resourceVersion as opaque (equality only) before 1.35; from 1.35 (KEP-5504, Comparable
    Resource Version, GA) kube-apiserver guarantees every type it serves, custom resources included, versions
    "orderable as monotonically increasing integers within the same resource type" (kubernetes.io, API Concepts,
    "Resource versions"). The chart requires 1.36. An aggregated API server need not keep that promise: a version
    that is no decimal integer counts as unknown, not later, so our write stands in until ``ttl`` passes.
    """
    if have == want:
        return True
    if not (have.isdecimal() and want.isdecimal() and have.isascii() and want.isascii()):
        return False
    return int(have) > int(want)


@dataclass
class _Write:
    at: float
    obj: dict[str, Any]
    deleted: bool = False


class OwnWrites:
    """Per model: the children and the status we wrote last, and when the status was written."""

    def __init__(self, ttl: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl, self.clock = ttl, clock
        self._children: dict[ModelKey, dict[tuple[str, str], _Write]] = {}
        self._status: dict[ModelKey, _Write] = {}
        self._lock = threading.Lock()

    def wrote(self, obj: dict[str, Any], deleted: bool = False) -> None:
        """Record a child, slimmed, as the API returned it from a create or update (or, deleted, as last seen)."""
        with self._lock:
            writes = self._children.setdefault(model_key(obj), {})
            writes[(obj["kind"], obj["metadata"]["name"])] = _Write(self.clock(), obj, deleted)

    def children(self, key: ModelKey, kind: str, indexed: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The children of one kind as the index shows them, corrected by our writes it does not show yet."""
        with self._lock:
            writes = self._children.get(key) or {}
            pending = {name: w for (k, name), w in writes.items() if k == kind}
            if not pending:
                return indexed
            view = []
            for obj in indexed:
                name = obj["metadata"]["name"]
                write = pending.pop(name, None)
                if write is None or self.clock() - write.at > self.ttl:
                    writes.pop((kind, name), None)
                    view.append(obj)
                elif write.deleted:
                    if obj["metadata"].get("uid") == write.obj["metadata"].get("uid"):
                        continue  # deleted by us, the watch has not said so yet
                    writes.pop((kind, name), None)
                    view.append(obj)  # a new object of the same name
                elif _shows(obj, write.obj):
                    writes.pop((kind, name), None)
                    view.append(obj)
                else:
                    view.append(write.obj)
            for name, write in pending.items():  # created by us, not in the index yet; or deleted and gone
                if write.deleted or self.clock() - write.at > self.ttl:
                    writes.pop((kind, name), None)
                else:
                    view.append(write.obj)
            return view

    def wrote_status(self, key: ModelKey, status: dict[str, Any]) -> None:
        with self._lock:
            self._status[key] = _Write(self.clock(), status)

    def status(self, key: ModelKey, indexed: dict[str, Any]) -> dict[str, Any]:
        """The status to compare against: ours when the index may lag it, else what the index shows."""
        with self._lock:
            write = self._status.get(key)
        if write is None or without_none(indexed) == without_none(write.obj) or self.clock() - write.at > self.ttl:
            return indexed
        return write.obj

    def seconds_since_status(self, key: ModelKey) -> float | None:
        with self._lock:
            write = self._status.get(key)
        return None if write is None else self.clock() - write.at

    def forget(self, key: ModelKey) -> None:
        """The model is gone: drop everything kept for it."""
        with self._lock:
            self._children.pop(key, None)
            self._status.pop(key, None)
