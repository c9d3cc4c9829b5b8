"""The NeuronModel operator end to end on the real local control plane, with simulated Neuron nodes."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import Env, neuron_model, serving_pods, wait_for
from localcluster.simcluster import SimulatedCluster
from neuron_rewrite import inspect_model

pytestmark = pytest.mark.cluster

NEURONCORE = "aws.amazon.com/neuroncore"


def test_model_goes_ready_scales_changes_cores_and_cleans_up(env: Env, models: dict[str, Path]) -> None:
    env.hostpath_claim("resnet50-compiled", models["resnet50"])
    manifest = neuron_model(
        "resnet50", "resnet50-compiled", cores=2, nodeSelector={"node.kubernetes.io/instance-type": "inf2.xlarge"}
    )
    assert env.apply(manifest).returncode == 0
    status = env.wait_phase("resnet50", "Ready")

    assert status["servedVersion"] == 1 and status["servedCores"] == 2
    assert status["replicas"] == 1 and status["readyReplicas"] == 1
    assert status["observedGeneration"] == env.model("resnet50")["metadata"]["generation"]
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "RewriteSucceeded": "True",
        "Available": "True",
        "Ready": "True",
    }
    assert status["endpoints"]["rest"] == f"http://resnet50.{env.namespace}.svc:8501/v1/models/resnet50"
    store = env.tmp / "store" / status["rewrite"]["path"] / "1"
    ops = inspect_model(store).models[0].neuron_ops
    assert ops and {op.automatic_multicore for op in ops} == {2}
    (job,) = env.jobs()
    assert job.status.succeeded == 1 and job.metadata.owner_references[0].kind == "NeuronModel"
    pods = serving_pods(env, "resnet50")
    assert len(pods) == 1
    resources = pods[0].spec.containers[0].resources
    assert resources.requests[NEURONCORE] == "2" and resources.limits[NEURONCORE] == "2"
    service = env.core.read_namespaced_service("resnet50", env.namespace)
    assert {p.name: p.port for p in service.spec.ports} == {"grpc": 8500, "http": 8501}

    # An Event for each step after the first. Kopf posts them from a queue, so they may trail the status a little,
    # and their times have a resolution of seconds, so they are compared sorted, not in order of time.
    def steps() -> list[tuple[str, str, str]] | None:
        events = env.core.list_namespaced_event(env.namespace, field_selector="involvedObject.name=resnet50").items
        found = [(e.type, e.reason, e.message.split(":")[0]) for e in events if e.involved_object.kind == "NeuronModel"]
        return sorted(found) if len(found) >= 2 else None

    assert wait_for(steps, what="the model's Events") == [
        ("Normal", "ModelServing", "Ready"),
        ("Normal", "RollingOut", "Deploying"),
    ]

    # Scaling through the scale subresource never re-runs the rewrite.
    env.cluster.cluster.kubectl("scale", "-n", env.namespace, "nm/resnet50", "--replicas=2")
    wait_for(lambda: env.status("resnet50").get("readyReplicas") == 2, what="2 ready replicas")
    env.wait_phase("resnet50", "Ready")
    assert len(env.jobs()) == 1

    # A numCores change runs a new rewrite and rolls the pods to it, never below 2 ready pods (maxUnavailable 0).
    env.patch_spec("resnet50", {"numCores": 1, "nodeSelector": None})
    ready_seen: list[int] = []

    def rolled() -> bool:
        ready_seen.append(env.apps.read_namespaced_deployment_status("resnet50", env.namespace).status.ready_replicas)
        status = env.status("resnet50")
        return status.get("servedCores") == 1 and status.get("phase") == "Ready"

    wait_for(rolled, timeout=120, what="Ready on 1 core")
    assert min(r or 0 for r in ready_seen) >= 2, ready_seen
    status = env.wait_phase("resnet50", "Ready")
    assert status["rewrite"]["path"] != store.parent.relative_to(env.tmp / "store").as_posix()
    wait_for(lambda: len(env.jobs()) == 1, what="the superseded Job deleted")
    pods = wait_for(
        lambda: (
            [p for p in serving_pods(env, "resnet50") if p.metadata.deletion_timestamp is None]
            if all(p.spec.containers[0].resources.limits[NEURONCORE] == "1" for p in serving_pods(env, "resnet50"))
            else None
        ),
        what="pods rolled to 1 core",
    )
    assert len(pods) == 2

    # Deleting the model removes everything it owns (the garbage collector follows the owner references).
    env.custom.delete_namespaced_custom_object(
        "serving.neuron.dev", "v1alpha1", env.namespace, "neuronmodels", "resnet50"
    )
    wait_for(lambda: not env.apps.list_namespaced_deployment(env.namespace).items, what="Deployment deleted")
    wait_for(lambda: not env.jobs(), what="Job deleted")
    wait_for(lambda: not env.core.list_namespaced_service(env.namespace).items, what="Service deleted")
    wait_for(lambda: not serving_pods(env, "resnet50"), what="pods deleted")


def test_failed_rewrite_carries_the_cause_then_recovers_when_the_source_is_fixed(
    env: Env, models: dict[str, Path]
) -> None:
    env.hostpath_claim("compiled", models["pipelined"].parent)
    manifest = neuron_model("pipelined", "compiled", cores=2, rewrite={"backoffLimit": 0})
    manifest["spec"]["source"]["pvc"]["path"] = "pipelined"
    assert env.apply(manifest).returncode == 0
    status = env.wait_phase("pipelined", "Failed")
    rewrite = env.condition("pipelined", "RewriteSucceeded")
    assert rewrite["status"] == "False" and rewrite["reason"] == "RewriteFailed"
    assert "pipeline" in rewrite["message"] and "--neuroncore-pipeline-cores" in rewrite["message"], rewrite
    assert env.condition("pipelined", "Ready")["reason"] == "RewriteFailed"
    assert not env.apps.list_namespaced_deployment(env.namespace).items
    failed_job = status["rewrite"]["job"]

    # Point the same NeuronModel at a good model: a new rewrite runs and the model serves, nothing deleted by hand.
    env.patch_spec("pipelined", {"source": {"pvc": {"claimName": "compiled", "path": "resnet50"}}})
    status = env.wait_phase("pipelined", "Ready")
    assert status["rewrite"]["job"] != failed_job
    wait_for(lambda: [j.metadata.name for j in env.jobs()] == [status["rewrite"]["job"]], what="failed Job removed")


def test_pods_that_cannot_schedule_report_the_schedulers_reason(env: Env, models: dict[str, Path]) -> None:
    env.hostpath_claim("compiled", models["resnet50"])
    # 64 NeuronCores per pod: the rewrite succeeds, but no simulated node has that many.
    assert env.apply(neuron_model("huge", "compiled", cores=64)).returncode == 0

    # On the way, the rewrite Job's pod may be Pending too, while the claim binds (RewritePending, as it should).
    def unschedulable() -> dict[str, Any] | None:
        ready = env.condition("huge", "Ready")
        return ready if ready.get("reason") == "Unschedulable" else None

    ready = wait_for(unschedulable, what="the serving pods reported unschedulable")
    assert "Insufficient aws.amazon.com/neuroncore" in ready["message"], ready
    assert env.status("huge")["phase"] == "Pending"


def test_instance_type_too_small_is_refused_before_any_pod(env: Env, models: dict[str, Path]) -> None:
    # Pinned by required node affinity, which the CRD's rules cannot read (a nodeSelector pin is refused at apply:
    # test_crd_rules): the operator refuses it.
    env.hostpath_claim("compiled", models["resnet50"])
    pin = {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": ["inf2.xlarge"]}
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [pin]}]}
        }
    }
    manifest = neuron_model("small", "compiled", cores=4, affinity=affinity)
    assert env.apply(manifest).returncode == 0
    env.wait_phase("small", "Failed")
    ready = env.condition("small", "Ready")
    assert ready["reason"] == "InsufficientInstanceCores"
    assert "inf2.xlarge (2 NeuronCores per node)" in ready["message"] and "spec.numCores is 4" in ready["message"]
    assert not env.jobs() and not env.apps.list_namespaced_deployment(env.namespace).items

    # Fixing the spec clears it.
    env.patch_spec("small", {"numCores": 2})
    env.wait_phase("small", "Ready")


def test_operator_killed_during_the_rewrite_resumes_without_duplicating_it(env: Env, models: dict[str, Path]) -> None:
    env.hostpath_claim("compiled", models["bert"])
    assert env.apply(neuron_model("bert", "compiled", cores=8, replicas=2)).returncode == 0
    wait_for(env.jobs, what="the rewrite Job")
    env.kill_operator()
    env.start_operator()
    env.wait_phase("bert", "Ready")
    assert len(env.jobs()) == 1
    assert len(env.apps.list_namespaced_deployment(env.namespace).items) == 1
    # A second restart once Ready re-runs and rolls nothing: no new Job, the same pod template. The scale is the
    # evidence that the new process has reconciled the model.
    template = env.apps.read_namespaced_deployment("bert", env.namespace).spec.template.to_dict()
    env.kill_operator()
    env.start_operator()
    env.scale_and_wait("bert", 1)
    assert len(env.jobs()) == 1
    assert env.apps.read_namespaced_deployment("bert", env.namespace).spec.template.to_dict() == template


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"numCores": 0}, "spec.numCores"),
        ({"numCores": 129}, "spec.numCores"),
        ({"numCores": "two"}, "spec.numCores"),
        ({"replicas": -1}, "spec.replicas"),
        ({"source": {"s3": {"uri": "ftp://bucket/model"}}}, "spec.source.s3.uri"),
        ({"source": {"pvc": {"claimName": ""}}}, "spec.source.pvc.claimName"),
        ({"store": {"claimName": "store", "path": "../other-team"}}, "spec.store.path"),
        ({"serving": {"image": ""}}, "spec.serving.image"),
        ({"store": {"claimName": "store", "path": "/abs"}}, "spec.store.path"),
        ({"source": {"pvc": {"claimName": "c", "path": "a/../../b"}}}, "spec.source.pvc.path"),
        ({"source": {"gcs": {"uri": "gs://bucket/model"}}}, "spec.source"),
        ({"source": {}}, "spec.source"),
        ({"numCores": "all"}, "spec.numCores"),
        ({"disruptionBudget": {"maxUnavailable": 1, "minAvailable": 2}}, "spec.disruptionBudget"),
        ({"disruptionBudget": {"maxUnavailable": "half"}}, "spec.disruptionBudget.maxUnavailable"),
        (
            {"serving": {"image": "tfs", "terminationGracePeriodSeconds": 2}},
            "spec.serving.terminationGracePeriodSeconds",
        ),
        (
            {"serving": {"image": "tfs", "topologySpreadConstraints": [{"maxSkew": 1, "whenUnsatisfiable": "Never"}]}},
            "spec.serving.topologySpreadConstraints",
        ),
        ({"serving": {"image": "tfs", "sidecars": [{"name": "logs"}]}}, "spec.serving.sidecars[0].image"),
        ({"serving": {"image": "tfs", "probes": {"readiness": {"periodSeconds": 0}}}}, "spec.serving.probes"),
    ],
)
def test_the_crd_schema_rejects_bad_input_naming_the_field(
    cluster: SimulatedCluster, crd: None, namespace: str, patch: dict, field: str
) -> None:
    manifest = neuron_model("bad", "compiled")
    manifest["spec"].update(patch)
    # --validate=false: the apiserver's own answer, which every client gets, not kubectl's client-side check.
    result = cluster.cluster.kubectl(
        "apply", "--validate=false", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest), check=False
    )
    assert result.returncode != 0
    assert field in result.stderr, result.stderr


def test_a_model_reaches_ready_in_eight_writes(env: Env, models: dict[str, Path]) -> None:
    """The write budget of issue 6 for one model: the three children, a status for each of the three steps and
    an Event for each step after the first. bench/operator_scale.py measures the same at 50 to 500 models. (A
    rollout slower than 5 s would add a status write for the pod counts; the simulated pod starts well within.)"""
    env.hostpath_claim("compiled", models["resnet50"])
    offset = env.audit_offset()
    assert env.apply(neuron_model("frugal", "compiled", cores=1)).returncode == 0
    env.wait_phase("frugal", "Ready")
    wait_for(  # the Ready Event is posted from a queue
        lambda: (
            len(env.core.list_namespaced_event(env.namespace, field_selector="involvedObject.name=frugal").items) >= 2
        ),
        what="the model's Events",
    )
    assert sorted(env.operator_writes(offset)) == [
        ("create", "deployments", ""),
        ("create", "events", ""),
        ("create", "events", ""),
        ("create", "jobs", ""),
        ("create", "services", ""),
        ("patch", "neuronmodels", "status"),
        ("patch", "neuronmodels", "status"),
        ("patch", "neuronmodels", "status"),
    ]


def test_an_idle_operator_makes_no_api_writes(env: Env, models: dict[str, Path]) -> None:
    env.hostpath_claim("compiled", models["resnet50"])
    assert env.apply(neuron_model("idle", "compiled", cores=1, replicas=2)).returncode == 0
    env.wait_phase("idle", "Ready")
    time.sleep(3)  # let the last watch events of the rollout arrive
    offset = env.audit_offset()
    time.sleep(20)
    assert env.operator_writes(offset) == []


def test_no_secret_value_reaches_logs_events_or_status(env: Env, models: dict[str, Path]) -> None:
    """The operator passes secret references through, never values: none shows up where people read."""
    secret_value = "s3cr3t-" + uuid.uuid4().hex
    env.core.create_namespaced_secret(
        env.namespace, {"metadata": {"name": "api-key"}, "stringData": {"key": secret_value}}
    )
    env.hostpath_claim("compiled", models["resnet50"])
    manifest = neuron_model("secretive", "compiled", cores=1)
    manifest["spec"]["serving"]["env"] = [
        {"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "api-key", "key": "key"}}}
    ]
    manifest["spec"]["imagePullSecrets"] = [{"name": "api-key"}]
    assert env.apply(manifest).returncode == 0
    status = env.wait_phase("secretive", "Ready")
    events = env.core.list_namespaced_event(env.namespace).items
    assert any(e.involved_object.name == "secretive" for e in events), "the check needs the model's Events"
    seen = [
        json.dumps(status),
        " ".join(f"{e.reason} {e.message}" for e in events),
        env.log.read_text(errors="replace"),
        json.dumps(env.apps.read_namespaced_deployment("secretive", env.namespace).to_dict(), default=str),
    ]
    assert all(secret_value not in text for text in seen)


def test_kubectl_delete_all_leaves_the_model_and_its_store_alone(env: Env, models: dict[str, Path]) -> None:
    """`kubectl delete all --all` is a common clean-up of a namespace's workloads: it must not delete the models
    (a deleted model's clean-up Job would remove its rewrites from the store). It deletes the model's Deployment,
    pods, Service and Job; the operator puts them back on the same rewrite, without running it again."""
    env.hostpath_claim("compiled", models["resnet50"])
    assert env.apply(neuron_model("kept", "compiled", cores=1, replicas=2)).returncode == 0
    before = env.wait_phase("kept", "Ready")
    rewrite = env.tmp / "store" / before["rewrite"]["path"]
    deployment = env.apps.read_namespaced_deployment("kept", env.namespace).metadata.uid

    # --wait=false: the evidence is the operator's recreation below, not kubectl's own wait for each object, which
    # once hung for hours in a CI run after everything it deleted was gone (it has no deadline of its own).
    deleted = env.cluster.cluster.kubectl("delete", "all", "--all", "--wait=false", "-n", env.namespace)
    assert "deployment.apps" in deleted.stdout and "neuronmodel" not in deleted.stdout, deleted.stdout

    assert "deletionTimestamp" not in env.model("kept")["metadata"]

    def recreated() -> bool:
        found = env.apps.list_namespaced_deployment(env.namespace).items
        return any(d.metadata.uid != deployment and d.status.ready_replicas == 2 for d in found)

    wait_for(recreated, timeout=120, what="the Deployment recreated with 2 ready replicas")
    after = env.wait_phase("kept", "Ready")
    assert after["rewrite"]["path"] == before["rewrite"]["path"], after["rewrite"]
    assert after["rewrite"]["publishedAt"] == before["rewrite"]["publishedAt"], after["rewrite"]
    assert (rewrite / "1" / "saved_model.pb").is_file()
    assert env.jobs() == [], [j.metadata.name for j in env.jobs()]  # no rewrite again, no clean-up of a deletion
