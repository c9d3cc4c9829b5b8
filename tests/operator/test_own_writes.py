"""OwnWrites: the operator's own writes stand in for a lagging index, and only until it catches up."""

from __future__ import annotations

from typing import Any

from neuronmodel_operator.naming import MODEL_LABEL, SPEC_HASH_ANNOTATION
from neuronmodel_operator.own_writes import OwnWrites
from neuronmodel_operator.reconcile import _only_counts_moved

KEY = ("ns", "m")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def child(
    kind: str, name: str, uid: str, spec_hash: str = "h1", generation: int = 1, version: int = 0
) -> dict[str, Any]:
    """``version``: the resourceVersion, by default the generation (each change of ours is a later revision)."""
    return {
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": uid,
            "resourceVersion": str(version or generation),
            "generation": generation,
            "labels": {MODEL_LABEL: "m"},
            "annotations": {SPEC_HASH_ANNOTATION: spec_hash},
        },
        "spec": {},
        "status": {},
    }


def uids(objs: list[dict[str, Any]]) -> list[str]:
    return [o["metadata"]["uid"] for o in objs]


def test_a_created_child_counts_as_there_until_the_index_shows_it() -> None:
    own = OwnWrites(clock=Clock())
    own.wrote(child("Service", "m", "u1"))
    assert uids(own.children(KEY, "Service", [])) == ["u1"]
    assert own.children(KEY, "Deployment", []) == []  # other kinds are not affected
    assert own.children(("ns", "other"), "Service", []) == []  # nor other models
    indexed = child("Service", "m", "u1")
    indexed["status"] = {"loadBalancer": {}}
    assert own.children(KEY, "Service", [indexed]) == [indexed]
    assert own.children(KEY, "Service", []) == []  # caught up once: the record is gone, the index rules


def test_an_update_stands_in_for_the_older_object_the_index_still_shows() -> None:
    own = OwnWrites(clock=Clock())
    old = child("Deployment", "m", "u1", "h1", generation=1)
    new = child("Deployment", "m", "u1", "h2", generation=2)
    own.wrote(new)
    assert own.children(KEY, "Deployment", [old])[0]["metadata"]["annotations"][SPEC_HASH_ANNOTATION] == "h2"
    newer = child("Deployment", "m", "u1", "h2", generation=3)  # a later change by someone else: that one rules
    assert own.children(KEY, "Deployment", [newer]) == [newer]


def test_a_scale_shows_through_the_generation_even_with_the_same_spec_hash() -> None:
    own = OwnWrites(clock=Clock())
    own.wrote(child("Deployment", "m", "u1", generation=5))
    stale = child("Deployment", "m", "u1", generation=4)
    assert own.children(KEY, "Deployment", [stale])[0]["metadata"]["generation"] == 5


def test_a_hand_edit_after_our_write_shows_through_though_spec_hash_and_generation_are_ours() -> None:
    own = OwnWrites(clock=Clock())
    own.wrote(child("Service", "m", "u1", version=10))
    edited = child("Service", "m", "u1", version=11)  # a Service has no generation; its selector changed by hand
    edited["spec"] = {"selector": {"app": "someone-else"}}
    stale = child("Service", "m", "u1", version=9)
    assert own.children(KEY, "Service", [stale])[0]["metadata"]["resourceVersion"] == "10"  # older than ours
    assert own.children(KEY, "Service", [edited]) == [edited]


def test_a_deleted_job_is_hidden_until_gone_and_a_new_one_of_the_same_name_shows() -> None:
    own = OwnWrites(clock=Clock())
    failed = child("Job", "m-rewrite", "u1")
    own.wrote(failed, deleted=True)
    assert own.children(KEY, "Job", [failed]) == []
    replacement = child("Job", "m-rewrite", "u2")
    assert own.children(KEY, "Job", [replacement]) == [replacement]


def test_a_recreated_job_replaces_the_deleted_one_the_index_still_shows() -> None:
    own = OwnWrites(clock=Clock())
    failed = child("Job", "m-rewrite", "u1")
    own.wrote(failed, deleted=True)
    own.wrote(child("Job", "m-rewrite", "u2"))  # the create after the delete: the latest write counts
    assert uids(own.children(KEY, "Job", [failed])) == ["u2"]


def test_after_the_ttl_the_index_is_trusted_again() -> None:
    clock = Clock()
    own = OwnWrites(ttl=30, clock=clock)
    own.wrote(child("Service", "m", "u1"))
    old = child("ConfigMap", "m-batching", "u0", "h1")
    own.wrote(child("ConfigMap", "m-batching", "u0", "h2"))
    clock.t += 31
    assert own.children(KEY, "Service", []) == []  # never showed up (deleted at once?): create it again
    assert own.children(KEY, "ConfigMap", [old]) == [old]


def test_the_status_we_wrote_stands_until_the_index_shows_it() -> None:
    clock = Clock()
    own = OwnWrites(ttl=30, clock=clock)
    assert own.seconds_since_status(KEY) is None
    ours = {"phase": "Deploying", "endpoints": None}
    own.wrote_status(KEY, ours)
    clock.t += 2
    assert own.status(KEY, {"phase": "Rewriting"}) == ours
    assert own.status(KEY, {"phase": "Deploying"}) == {"phase": "Deploying"}  # nulls are dropped by the API
    assert own.seconds_since_status(KEY) == 2
    clock.t += 30
    assert own.status(KEY, {"phase": "Rewriting"}) == {"phase": "Rewriting"}


def test_forget_drops_everything_kept_for_a_model() -> None:
    own = OwnWrites(clock=Clock())
    own.wrote(child("Service", "m", "u1"))
    own.wrote_status(KEY, {"phase": "Ready"})
    own.forget(KEY)
    assert own.children(KEY, "Service", []) == []
    assert own.seconds_since_status(KEY) is None
    assert own.status(KEY, {}) == {}


def _status(phase: str, ready_reason: str, message: str, replicas: int) -> dict[str, Any]:
    return {
        "phase": phase,
        "replicas": replicas,
        "readyReplicas": 0,
        "conditions": [{"type": "Ready", "status": "False", "reason": ready_reason, "message": message}],
        "servedVersion": 1,
    }


def test_only_pod_counts_moving_is_told_apart_from_a_step() -> None:
    before = _status("Deploying", "RollingOut", "0 of 2 updated replicas are available", 0)
    counts = _status("Deploying", "RollingOut", "1 of 2 updated replicas are available", 1)
    assert _only_counts_moved(counts, before)
    assert not _only_counts_moved(_status("Ready", "ModelServing", "2 of 2", 2), before)
    assert not _only_counts_moved(_status("Deploying", "Unschedulable", "pod x cannot be scheduled", 1), before)
    assert not _only_counts_moved({**counts, "servedVersion": 2}, before)


def test_a_resource_version_that_is_no_integer_is_unknown_not_newer() -> None:
    """Kubernetes guarantees integer resourceVersions only from 1.35 and only for kube-apiserver's own types: an
    opaque one (an aggregated API server's) keeps our write standing in, until the ttl, instead of failing."""
    clock = Clock()
    own = OwnWrites(clock=clock)
    ours = child("Service", "m", "u1")
    ours["metadata"]["resourceVersion"] = "v1-opaque"
    own.wrote(ours)
    seen = child("Service", "m", "u1")
    seen["metadata"]["resourceVersion"] = "v0-opaque"
    assert own.children(KEY, "Service", [seen]) == [ours]
    same = {**seen, "metadata": {**seen["metadata"], "resourceVersion": "v1-opaque"}}
    assert own.children(KEY, "Service", [same]) == [same]  # equality is always meaningful
    own.wrote(ours)
    clock.t += 31
    assert own.children(KEY, "Service", [seen]) == [seen]  # past the ttl the index rules
