"""Faults on the real local control plane: the operator killed, control-plane parts restarted, nodes lost, failing
rewrites, racing edits, churn, and names long enough to break derived names."""

from __future__ import annotations

import os
import random
import re
import tarfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from faults import (
    NEURONCORE,
    NodePool,
    StatusRecorder,
    assert_converged,
    children,
    copy_model,
    describe,
    evict,
    live,
    orphans,
    restart,
    wait_until_none,
)

from conftest import GROUP, PLURAL, VERSION, Env, neuron_model, serving_pods, wait_for
from localcluster.httpserver import serving
from neuronmodel_operator.naming import MODEL_LABEL, model_label
from synthetic_models import tree_digest

pytestmark = pytest.mark.cluster


def rollout_done(env: Env, name: str, replicas: int) -> bool:
    deployment = env.apps.read_namespaced_deployment(name, env.namespace)
    status = deployment.status
    return (status.observed_generation or 0) >= deployment.metadata.generation and (
        status.updated_replicas == status.ready_replicas == status.replicas == replicas
    )


def test_operator_killed_during_a_rollout_converges_without_duplicates(env: Env, models: dict[str, Path]) -> None:
    env.hostpath_claim("compiled", models["resnet50"])
    assert env.apply(neuron_model("rollout", "compiled", cores=1, replicas=2)).returncode == 0
    first = assert_converged(env, "rollout")

    # A numCores change: a new rewrite, then a rolling update. Kill the operator once it has started the rollout.
    recorder = StatusRecorder(env, "rollout")
    try:
        env.patch_spec("rollout", {"numCores": 2})
        recorder.wait(lambda s: s.get("phase") == "Deploying", 120, "the rollout to start")
        env.kill_operator()
    finally:
        recorder.stop()
    # The controllers finish the rollout without the operator: the status it last wrote is now stale.
    wait_for(lambda: rollout_done(env, "rollout", 2), 120, "the rollout to finish with the operator down")
    assert env.status("rollout")["phase"] == "Deploying"

    env.start_operator()
    status = assert_converged(env, "rollout")
    assert status["rewrite"]["job"] != first["rewrite"]["job"]
    assert all(p.spec.containers[0].resources.limits[NEURONCORE] == "2" for p in serving_pods(env, "rollout"))
    assert len(live(env.apps.list_namespaced_deployment(env.namespace).items)) == 1
    assert len(env.core.list_namespaced_service(env.namespace).items) == 1


def available(status: dict) -> bool:
    return any(c["type"] == "Available" and c["status"] == "True" for c in status.get("conditions") or [])


def rewrite_pods(env: Env, job: str) -> list:
    return env.core.list_namespaced_pod(env.namespace, label_selector=f"batch.kubernetes.io/job-name={job}").items


def assert_nothing_published(env: Env, status: dict) -> None:
    """A failed rewrite leaves its store directory empty: no version folder, no staging directory."""
    out = env.tmp / "store" / status["rewrite"]["path"]
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


def stamp(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def next_retry(message: str, attempt: int) -> datetime:
    """When the status says the operator re-runs a failed rewrite (``...; retry N at <time>``)."""
    found = re.search(rf"; retry {attempt} at (\S+)$", message)
    assert found, message
    return stamp(found[1])


def failed_at(job: Any) -> datetime:
    return next(c.last_transition_time for c in job.status.conditions if c.type == "Failed")


def test_corrupt_model_fails_with_bounded_backed_off_retries_naming_the_file(env: Env, models: dict[str, Path]) -> None:
    source = copy_model(models["resnet50"], env.tmp / "corrupt")
    pb = source / "saved_model.pb"
    pb.write_bytes(pb.read_bytes()[: pb.stat().st_size // 2])  # cut short, as by an interrupted upload
    before = tree_digest(source)
    env.hostpath_claim("compiled", source)
    assert env.apply(neuron_model("corrupt", "compiled", cores=1, rewrite={"backoffLimit": 1})).returncode == 0
    status = env.wait_phase("corrupt", "Failed", timeout=180)

    rewrite = env.condition("corrupt", "RewriteSucceeded")
    assert rewrite["reason"] == "RewriteFailed" and env.condition("corrupt", "Ready")["reason"] == "RewriteFailed"
    assert "saved_model.pb: corrupt or truncated protobuf" in rewrite["message"], rewrite
    # A refusal fails the Job at once (its pod failure policy), whatever its backoffLimit; the operator re-runs it
    # 30 s later, then 60 s later.
    (job,) = env.jobs()
    assert job.status.failed == 1 and len(rewrite_pods(env, job.metadata.name)) == 1
    retry_at = next_retry(rewrite["message"], 1)
    assert retry_at - failed_at(job) == timedelta(seconds=30)
    wait_for(lambda: [j.metadata.uid for j in env.jobs()] not in ([job.metadata.uid], []), 120, "the retry's Job")
    assert datetime.now(timezone.utc) >= retry_at - timedelta(seconds=1), "not re-run before its back-off"
    wait_for(lambda: "; retry 2 at " in env.condition("corrupt", "Ready")["message"], 120, "the retry to fail")
    (second,) = env.jobs()
    assert next_retry(env.condition("corrupt", "Ready")["message"], 2) - failed_at(second) == timedelta(seconds=60)
    status = env.status("corrupt")
    assert status["phase"] == "Failed" and status["rewrite"]["retries"] == 1
    assert not env.apps.list_namespaced_deployment(env.namespace).items
    assert_nothing_published(env, status)
    assert tree_digest(source) == before, "the source is only read"


def test_an_evicted_rewrite_pod_is_replaced_without_counting_against_the_backoff_limit(
    env: Env, models: dict[str, Path]
) -> None:
    """A drain (or Karpenter's consolidation) evicts the rewrite's pod mid-download: the apiserver marks it
    DisruptionTarget, the node stops it, and the Job's pod failure policy replaces it without counting a failure,
    so even with backoffLimit 0 the rewrite completes."""
    (env.tmp / "www").mkdir()
    with serving(env.tmp / "www") as www:
        with tarfile.open(www.root / "resnet50.tar.gz", "w:gz") as tar:
            tar.add(models["resnet50"], arcname="resnet50")
        www.hold("/resnet50.tar.gz")  # the download stays in progress until released
        manifest = neuron_model("evicted", "unused", cores=1, rewrite={"backoffLimit": 0})
        manifest["spec"]["source"] = {"http": {"url": f"{www.url}/resnet50.tar.gz"}}
        assert env.apply(manifest).returncode == 0
        wait_for(lambda: "held GET /resnet50.tar.gz" in www.log, what="the rewrite downloading")
        (job,) = env.jobs()
        (first,) = rewrite_pods(env, job.metadata.name)
        accepted, words = evict(env, first.metadata.name)
        assert accepted, words

        def replaced_or_failed() -> str | None:
            if env.batch.read_namespaced_job(job.metadata.name, env.namespace).status.failed:
                return "the Job counted the evicted pod as a failure"
            pods = rewrite_pods(env, job.metadata.name)
            return "replaced" if any(p.metadata.uid != first.metadata.uid for p in pods) else None

        outcome = wait_for(replaced_or_failed, what="a new rewrite pod, or the Job failed")
        assert outcome == "replaced", describe(env, "evicted")
        www.release("/resnet50.tar.gz")
        status = env.wait_phase("evicted", "Ready", timeout=180)

    (done,) = env.jobs()
    assert done.metadata.uid == job.metadata.uid and not status["rewrite"].get("retries"), "the operator re-ran it"
    assert done.status.succeeded == 1 and not done.status.failed, describe(env, "evicted")
    assert first.metadata.uid not in {p.metadata.uid for p in rewrite_pods(env, job.metadata.name)}


def test_missing_source_fails_naming_the_path_then_recovers_when_the_spec_is_fixed(
    env: Env, models: dict[str, Path]
) -> None:
    env.hostpath_claim("compiled", models["resnet50"].parent)
    manifest = neuron_model("missing", "compiled", cores=1, rewrite={"backoffLimit": 0})
    manifest["spec"]["source"]["pvc"]["path"] = "incoming/resnet50"
    assert env.apply(manifest).returncode == 0
    status = env.wait_phase("missing", "Failed", timeout=180)
    message = env.condition("missing", "Ready")["message"]
    assert "incoming/resnet50: no such directory" in message, message
    assert_nothing_published(env, status)
    uid, failed_job = env.model("missing")["metadata"]["uid"], status["rewrite"]["job"]

    env.patch_spec("missing", {"source": {"pvc": {"claimName": "compiled", "path": "resnet50"}}})
    status = assert_converged(env, "missing")
    assert env.model("missing")["metadata"]["uid"] == uid, "recovered in place, nothing deleted and re-created"
    assert status["rewrite"]["job"] != failed_job  # and the failed Job is gone (assert_converged: one Job)


def test_a_source_uploaded_after_the_model_failed_is_picked_up(env: Env, models: dict[str, Path]) -> None:
    (env.tmp / "uploads").mkdir()
    env.hostpath_claim("uploads", env.tmp / "uploads")
    manifest = neuron_model("late", "uploads", cores=1, rewrite={"backoffLimit": 0})
    manifest["spec"]["source"]["pvc"]["path"] = "resnet50"
    assert env.apply(manifest).returncode == 0
    env.wait_phase("late", "Failed", timeout=180)
    uid = env.model("late")["metadata"]["uid"]
    copy_model(models["resnet50"], env.tmp / "uploads" / "resnet50")  # the upload completes; nobody edits the model
    status = assert_converged(env, "late", timeout=150)  # the first retry comes 30 s after the failure
    assert status["rewrite"]["retries"] == 1 and env.model("late")["metadata"]["uid"] == uid


def test_a_missing_source_claim_is_reported_with_the_schedulers_reason(env: Env, models: dict[str, Path]) -> None:
    assert env.apply(neuron_model("noclaim", "not-there", cores=1)).returncode == 0
    status = env.wait_phase("noclaim", "Pending", timeout=60)
    ready = env.condition("noclaim", "Ready")
    assert ready["reason"] == "RewritePending", ready
    assert 'persistentvolumeclaim "not-there" not found' in ready["message"], ready
    assert status["rewrite"]["job"] in ready["message"]

    # The claim appears (bound to a volume holding the model): the same Job's pod schedules and the model serves.
    env.hostpath_claim("not-there", models["resnet50"])
    assert_converged(env, "noclaim", timeout=180)


def test_apiserver_then_etcd_restarted_while_models_are_created(env: Env, models: dict[str, Path]) -> None:
    env.hostpath_claim("compiled", models["resnet50"])
    batches = [["a0", "a1"], ["b0", "b1"], ["c0", "c1"]]
    took = {}
    for batch, component in zip(batches, ["kube-apiserver", "etcd", None], strict=True):
        for name in batch:
            assert env.apply(neuron_model(name, "compiled", cores=1)).returncode == 0
        # Restart once the operator is working on the batch; the next batch needs its watches back.
        wait_for(lambda b=batch: all(env.status(n).get("phase") for n in b), what=f"the operator handling {batch}")
        if component:
            took[component] = restart(env.cluster, component)
    for name in (name for batch in batches for name in batch):
        assert_converged(env, name)
    assert env.operator is not None and env.operator.poll() is None, "the operator survived both restarts"
    print("apiserver ready again after restarting: " + ", ".join(f"{k} {v:.1f} s" for k, v in took.items()))


def test_a_node_deleted_under_serving_pods(env: Env, models: dict[str, Path]) -> None:
    """No node lifecycle controller runs here (as on a cluster where it is off): the pod garbage collector removes
    the pods bound to a deleted node, and the Deployment replaces them on the nodes left."""
    pool = NodePool(env.cluster, "trn1.2xlarge", 3)  # 2 NeuronCores each: one pod per node, one node spare
    env.hostpath_claim("compiled", models["resnet50"])
    try:
        manifest = neuron_model("survivor", "compiled", cores=2, replicas=2, **pool.placement)
        assert env.apply(manifest).returncode == 0
        assert_converged(env, "survivor")
        victim = serving_pods(env, "survivor")[0]
        recorder = StatusRecorder(env, "survivor")
        try:
            deleted = time.monotonic()
            pool.delete(victim.spec.node_name)
            wait_for(lambda: victim.metadata.uid not in {p.metadata.uid for p in serving_pods(env, "survivor")},
                     timeout=180, what="the pod garbage collector to remove the orphaned pod")  # fmt: skip
            gone = time.monotonic() - deleted
            assert_converged(env, "survivor")
            # The status showed the lost replica (Degraded, one pod ready, still available), then Ready again.
            lost = recorder.wait(
                lambda s: s.get("phase") == "Degraded" and s.get("readyReplicas") == 1 and available(s), 30, "the loss"
            )
            recorder.wait(lambda s: s.get("phase") == "Ready" and s.get("readyReplicas") == 2, 30, "Ready", lost + 1)
        finally:
            recorder.stop()
        seen = [(s.get("phase"), s.get("readyReplicas")) for s in recorder.statuses]
        pods = serving_pods(env, "survivor")
        assert {p.spec.node_name for p in pods} == set(pool.names), "rescheduled onto the nodes left"
        print(f"orphaned pod removed {gone:.0f} s after its node was deleted; statuses: {seen}")
    finally:
        env.custom.delete_namespaced_custom_object(GROUP, VERSION, env.namespace, PLURAL, "survivor")
        wait_for(lambda: not serving_pods(env, "survivor"), timeout=120, what="serving pods gone")
        pool.delete_all()


def test_concurrent_edits_of_cores_and_replicas_end_in_the_last_spec(env: Env, models: dict[str, Path]) -> None:
    env.hostpath_claim("compiled", models["resnet50"])
    assert env.apply(neuron_model("racy", "compiled", cores=1, replicas=1)).returncode == 0
    assert_converged(env, "racy")
    rng = random.Random(7)
    plans = {
        "numCores": [rng.choice([1, 2, 4]) for _ in range(12)],
        "replicas": [rng.choice([1, 2, 3]) for _ in range(12)],
    }

    def edit(field: str) -> None:
        for value in plans[field]:
            if field == "replicas":  # the way users scale: the scale subresource
                env.cluster.cluster.kubectl("scale", "-n", env.namespace, "nm/racy", f"--replicas={value}")
            else:
                env.patch_spec("racy", {field: value})
            time.sleep(rng.uniform(0, 0.6))

    with ThreadPoolExecutor(2) as pool:
        for done in [pool.submit(edit, "numCores"), pool.submit(edit, "replicas")]:
            done.result()
    spec = env.model("racy")["spec"]
    assert (spec["numCores"], spec["replicas"]) == (plans["numCores"][-1], plans["replicas"][-1])
    status = assert_converged(env, "racy", timeout=240)
    print(f"after {sum(map(len, plans.values()))} racing edits: {status['servedCores']} cores x "
          f"{status['readyReplicas']} replicas")  # fmt: skip


DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # Service names
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


def test_names_of_253_characters_keep_derived_names_valid_and_unique(env: Env, models: dict[str, Path]) -> None:
    env.hostpath_claim("compiled", models["resnet50"])
    stem = "bert.base-" + "x" * 200
    names = [(stem + "-" + "a" * 253)[:253], (stem + "-" + "b" * 253)[:253]]  # the same first 211 characters
    for name in names:
        manifest = neuron_model(name, "compiled", cores=1)
        manifest["spec"]["serving"]["batching"] = {"enabled": True}  # a ConfigMap too
        result = env.apply(manifest)
        assert result.returncode == 0, result.stderr
    derived: dict[str, set[str]] = {}
    for name in names:
        status = assert_converged(env, name)
        owned = {
            kind: [o.metadata for o in objects]
            for kind, objects in children(env, f"{MODEL_LABEL}={model_label(name)}").items()
        }
        assert all(owned.values()), owned
        for kind, metas in owned.items():
            for meta in metas:
                assert DNS_SUBDOMAIN.fullmatch(meta.name), (kind, meta.name)
                if kind != "Pod":  # a Job's name is its pods' job-name label; a Service's, a DNS label
                    assert len(meta.name) <= 63, (kind, meta.name)
                for key, value in meta.labels.items():
                    assert len(value) <= 63 and LABEL_VALUE.fullmatch(value), (kind, key, value)
                derived.setdefault(kind, set()).add(meta.name)
        service = owned["Service"][0].name
        assert DNS_1035.fullmatch(service), service
        assert status["endpoints"]["grpc"].startswith(f"{service}.{env.namespace}.svc:")
    for kind in ("Job", "Deployment", "Service", "ConfigMap"):
        assert len(derived[kind]) == 2, (kind, derived[kind])


CHURN_SECONDS = float(os.environ.get("FAULTS_CHURN_SECONDS", "180"))
CHURN_MODELS = int(os.environ.get("FAULTS_CHURN_MODELS", "30"))
OPERATOR_STARTUP = 10  # seconds an operator needs after its start before the apiserver may go away
CHURN_ALIVE = 12  # at most this many models at once: 2 cores x 2 replicas each fits the simulated nodes


def test_churn_with_faults_leaves_no_orphans_and_true_statuses(env: Env, models: dict[str, Path]) -> None:
    """Models created, edited and deleted at random for a bounded time while the operator is killed and the
    apiserver restarted; afterwards every status matches reality and nothing is left without its model."""
    env.hostpath_claim("compiled", models["resnet50"].parent)
    seed = int(os.environ.get("FAULTS_CHURN_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    start = time.monotonic()
    faults = [(0.2, "kill-operator"), (0.45, "restart-apiserver"), (0.7, "kill-operator")]
    alive: dict[str, str] = {}  # name -> uid
    deleted: list[str] = []
    actions: Counter[str] = Counter()
    created = 0
    operator_started = time.monotonic()

    def elapsed() -> float:
        return (time.monotonic() - start) / CHURN_SECONDS

    def spec() -> dict:
        return {"cores": rng.choice([1, 2]), "replicas": rng.choice([1, 2])}

    while elapsed() < 1:
        if faults and elapsed() >= faults[0][0]:
            fault = faults.pop(0)[1]
            if fault == "kill-operator":
                env.kill_operator()
                env.start_operator()
                operator_started = time.monotonic()
            else:
                # An apiserver restart during the operator's start can leave it serving nothing (its resource
                # discovery gives up; reported separately): this run is about faults once it runs.
                time.sleep(max(0.0, operator_started + OPERATOR_STARTUP - time.monotonic()))
                restart(env.cluster, "kube-apiserver")  # returns once the apiserver is ready again
            actions[fault] += 1
            continue
        due = created < min(CHURN_MODELS, CHURN_MODELS * elapsed() + 1) and len(alive) < CHURN_ALIVE
        action = "create" if due or not alive else rng.choice(["edit", "edit", "scale", "delete"])
        if action == "create":
            # Now and then re-use a deleted name: the old model's children may still be on their way out.
            reuse = deleted and rng.random() < 0.3
            name = deleted.pop(rng.randrange(len(deleted))) if reuse else f"c{created:03d}"
            manifest = neuron_model(name, "compiled", **spec())
            manifest["spec"]["source"]["pvc"]["path"] = rng.choice(["resnet50", "bert"])
            result = env.apply(manifest)
            assert result.returncode == 0, result.stderr
            alive[name] = env.model(name)["metadata"]["uid"]
            created += 1
            action = "re-create" if reuse else action
        elif action == "edit":  # numCores and replicas at once
            edit = spec()
            env.patch_spec(rng.choice(sorted(alive)), {"numCores": edit["cores"], "replicas": edit["replicas"]})
        elif action == "scale":
            env.patch_spec(rng.choice(sorted(alive)), {"replicas": rng.choice([0, 1, 2])})
        else:
            name = rng.choice(sorted(alive))
            env.custom.delete_namespaced_custom_object(GROUP, VERSION, env.namespace, PLURAL, name)
            del alive[name]
            deleted.append(name)
        actions[action] += 1
        time.sleep(rng.uniform(0.5, 2.5))

    print(f"churn seed {seed}, {CHURN_SECONDS:.0f} s: {dict(actions)}; {len(alive)} models left")
    for name in sorted(alive):
        assert_converged(env, name, timeout=300)
    wait_until_none(lambda: orphans(env, alive), 180, "children without their model", env.log)
