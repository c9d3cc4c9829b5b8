"""compute_status(): the NeuronModel's status as a view of what the operator observed."""

from __future__ import annotations

from typing import Any

from unit_helpers import (
    NAMESPACE,
    deployment_body,
    job_body,
    job_pod,
    make_model,
    serving_pod,
)

from neuronmodel_operator.builders import Model
from neuronmodel_operator.config import OperatorConfig
from neuronmodel_operator.naming import job_name
from neuronmodel_operator.status import (
    Observed,
    Retry,
    compute_status,
    creation_refused,
    job_outcome,
    job_waits_for_pod,
)
from neuronmodel_operator.validation import SpecError, validate

CONFIG = OperatorConfig()
NOW = "2025-05-01T10:05:00Z"
EARLIER = "2025-05-01T09:00:00Z"
PIPELINE_ERROR = "error: NeuronOp x compiled with pipeline size 4"
UNSCHEDULABLE = "0/3 nodes are available: 3 Insufficient aws.amazon.com/neuroncore."


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def status_of(
    model: Model,
    observed: Observed,
    *,
    generation: int = 1,
    previous: dict[str, Any] | None = None,
    now: str = NOW,
) -> dict[str, Any]:
    return compute_status(model, generation, model.rewrite_id(), None, observed, previous or {}, now)


def complete_job(model: Model) -> dict[str, Any]:
    return job_body(job_name(model.name, model.rewrite_id()), "Complete")


def test_job_outcome() -> None:
    assert job_outcome(None) == "Running"
    assert job_outcome(job_body("j")) == "Running"
    assert job_outcome(job_body("j", "Complete")) == "Complete"
    assert job_outcome(job_body("j", "Failed")) == "Failed"
    suspended = job_body("j")
    suspended["status"]["conditions"] = [{"type": "Failed", "status": "False"}]
    assert job_outcome(suspended) == "Running"


def test_a_spec_error_fails_the_model() -> None:
    model = make_model(numCores=4, nodeSelector={"node.kubernetes.io/instance-type": "inf2.xlarge"})
    try:
        validate(model.spec, CONFIG)
    except SpecError as exc:
        error = exc
    else:
        raise AssertionError("inf2.xlarge with 4 NeuronCores must be refused")
    status = compute_status(model, 3, None, error, Observed(), {}, NOW)

    assert status["phase"] == "Failed"
    ready = conditions(status)["Ready"]
    assert ready["status"] == "False"
    assert ready["reason"] == "InsufficientInstanceCores"
    assert ready["message"] == str(error) and "inf2.xlarge" in ready["message"]
    assert conditions(status)["RewriteSucceeded"]["status"] == "Unknown"
    assert conditions(status)["RewriteSucceeded"]["reason"] == "InsufficientInstanceCores"
    assert status["observedGeneration"] == 3
    assert status["rewrite"] == {"id": None, "job": None, "path": None, "retries": None}
    assert status["endpoints"] is None


def test_a_running_rewrite_is_rewriting() -> None:
    model = make_model(numCores=4)
    name = job_name(model.name, model.rewrite_id())
    status = status_of(model, Observed(job=job_body(name)))

    assert status["phase"] == "Rewriting"
    rewrite, ready = conditions(status)["RewriteSucceeded"], conditions(status)["Ready"]
    assert rewrite["status"] == "False" and rewrite["reason"] == "RewriteRunning"
    assert name in rewrite["message"] and "4 NeuronCores" in rewrite["message"]
    assert ready["status"] == "False" and ready["reason"] == "RewriteRunning"
    assert conditions(status)["Available"]["reason"] == "NotDeployed"
    assert status["rewrite"]["job"] == name
    assert status["rewrite"]["id"] == model.rewrite_id()
    assert status["rewrite"]["path"] == f"{NAMESPACE}/resnet50/{model.rewrite_id()}"
    assert status["servedVersion"] is None and status["servedCores"] is None


def test_a_job_not_created_yet_is_rewriting() -> None:
    status = status_of(make_model(), Observed())
    assert status["phase"] == "Rewriting"
    assert "(creating)" in conditions(status)["RewriteSucceeded"]["message"]


def test_a_new_rewrite_while_old_pods_serve_says_they_keep_serving() -> None:
    model = make_model(numCores=4)
    old = deployment_body("0ld0ld0ld0", cores=2)
    status = status_of(model, Observed(job=job_body(job_name(model.name, model.rewrite_id())), deployment=old))
    assert status["phase"] == "Rewriting"
    assert "keep serving the previous rewrite" in conditions(status)["Ready"]["message"]
    assert conditions(status)["Available"]["status"] == "True"
    assert status["servedCores"] == 2


def test_a_failed_rewrite_reports_the_rewrite_error_line() -> None:
    model = make_model()
    name = job_name(model.name, model.rewrite_id())
    message = (
        "tf-neuron-auto-multicore: reading /source/resnet50/neuron\n"
        f"{PIPELINE_ERROR}\n"
        "hint: recompile with --neuroncore-pipeline-cores 1\n"
    )
    pods = [
        job_pod(name, "aaaaa", "2025-05-01T10:00:05Z", "an older attempt: error: disk full"),
        job_pod(name, "bbbbb", "2025-05-01T10:02:00Z", message),
    ]
    status = status_of(model, Observed(job=job_body(name, "Failed"), job_pods=pods))

    assert status["phase"] == "Failed"
    rewrite, ready = conditions(status)["RewriteSucceeded"], conditions(status)["Ready"]
    assert rewrite["status"] == "False" and rewrite["reason"] == "RewriteFailed"
    assert PIPELINE_ERROR in rewrite["message"]
    assert "disk full" not in rewrite["message"]  # the latest attempt's error, not the first's
    assert name in rewrite["message"] and "BackoffLimitExceeded" in rewrite["message"]
    assert ready["status"] == "False" and ready["reason"] == "RewriteFailed"
    assert PIPELINE_ERROR in ready["message"]


def test_a_failed_rewrite_without_pods_uses_the_job_message() -> None:
    model = make_model()
    name = job_name(model.name, model.rewrite_id())
    job = job_body(name, "Failed", reason="DeadlineExceeded", message="Job was active longer than specified deadline")
    status = status_of(model, Observed(job=job))
    assert status["phase"] == "Failed"
    message = conditions(status)["RewriteSucceeded"]["message"]
    assert "DeadlineExceeded" in message and "active longer than specified deadline" in message


def test_a_rewrite_job_failed_by_its_pod_failure_policy_tells_the_rewrites_line() -> None:
    """A refusal fails the Job at once (reason PodFailurePolicy): the rewrite's line, as after BackoffLimitExceeded,
    not the Job controller's words; an earlier pod stopped by an eviction does not hide it."""
    model = make_model()
    name = job_name(model.name, model.rewrite_id())
    refused = "tf-neuron-auto-multicore: error: /source: not a SavedModel (no saved_model.pb)"
    pods = [
        job_pod(name, "aaaaa", "2025-05-01T10:00:05Z", "", exit_code=143),  # evicted: DisruptionTarget, ignored
        job_pod(name, "bbbbb", "2025-05-01T10:02:00Z", refused, exit_code=3),
    ]
    words = (
        f"Container rewrite for pod {NAMESPACE}/{name}-bbbbb failed with exit code 3 matching FailJob rule at index 0"
    )
    job = job_body(name, "Failed", reason="PodFailurePolicy", message=words)
    status = status_of(model, Observed(job=job, job_pods=pods))
    assert status["phase"] == "Failed"
    ready = conditions(status)["Ready"]
    assert ready["reason"] == "RewriteFailed"
    assert ready["message"] == f"rewrite Job {name} failed (PodFailurePolicy): {refused}", ready


def test_an_evicted_rewrite_pod_is_reported_in_the_kubelets_words() -> None:
    """An eviction (here for the ephemeral-storage limit) leaves no termination message: the pod's own reason and
    message say why, not only the Job's BackoffLimitExceeded."""
    model = make_model()
    name = job_name(model.name, model.rewrite_id())
    pod = job_pod(name, "ddddd", "2025-05-01T10:02:00Z", "", exit_code=137)
    words = "Pod ephemeral local storage usage exceeds the total limit of containers 64Mi. "
    pod["status"] |= {"reason": "Evicted", "message": words}
    status = status_of(model, Observed(job=job_body(name, "Failed"), job_pods=[pod]))
    message = conditions(status)["RewriteSucceeded"]["message"]
    assert message == (
        f"rewrite Job {name} failed (BackoffLimitExceeded): pod {name}-ddddd Evicted: {words.strip()}"
    ), message


def test_a_failed_rewrite_while_old_pods_serve_is_degraded() -> None:
    model = make_model(numCores=4)
    name = job_name(model.name, model.rewrite_id())
    pods = [job_pod(name, "ccccc", "2025-05-01T10:02:00Z", PIPELINE_ERROR)]
    observed = Observed(job=job_body(name, "Failed"), job_pods=pods, deployment=deployment_body("0ld0ld0ld0"))
    status = status_of(model, observed)
    assert status["phase"] == "Degraded"
    assert conditions(status)["Available"]["status"] == "True"
    assert conditions(status)["Ready"]["reason"] == "RewriteFailed"


def test_a_fully_rolled_out_model_is_ready() -> None:
    model = make_model(numCores=2, replicas=3, model={"name": "resnet50", "version": 5})
    rewrite_id = model.rewrite_id()
    dep = deployment_body(
        rewrite_id,
        desired=3,
        generation=4,
        observed_generation=4,
        replicas=3,
        ready=3,
        updated=3,
        available=3,
        version=5,
        cores=2,
    )
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "resnet50", "namespace": NAMESPACE}}
    status = status_of(model, Observed(job=complete_job(model), deployment=dep, service=service), generation=2)

    assert status["phase"] == "Ready"
    assert {t: c["status"] for t, c in conditions(status).items()} == {
        "RewriteSucceeded": "True",
        "Available": "True",
        "Ready": "True",
    }
    assert conditions(status)["Ready"]["reason"] == "ModelServing"
    assert "3 of 3" in conditions(status)["Ready"]["message"]
    assert status["servedVersion"] == 5 and status["servedCores"] == 2
    assert status["replicas"] == 3 and status["readyReplicas"] == 3
    assert status["selector"] == "serving.neuron.dev/model=resnet50,app.kubernetes.io/component=serving"
    assert status["endpoints"] == {
        "grpc": f"resnet50.{NAMESPACE}.svc:8500",
        "rest": f"http://resnet50.{NAMESPACE}.svc:8501/v1/models/resnet50",
    }


def test_served_values_come_from_the_deployment_annotations() -> None:
    # The Deployment still serves version 1 on 2 cores; the spec already asks for more.
    model = make_model(numCores=4, model={"name": "resnet50", "version": 2})
    dep = deployment_body("0ld0ld0ld0", version=1, cores=2)
    status = status_of(model, Observed(job=complete_job(model), deployment=dep))
    assert status["servedVersion"] == 1 and status["servedCores"] == 2
    assert status["phase"] != "Ready"


def test_an_unrolled_deployment_is_not_ready_yet() -> None:
    model = make_model(replicas=2)
    rewrite_id = model.rewrite_id()
    fully = {"desired": 2, "replicas": 2, "ready": 2, "updated": 2, "available": 2}
    cases = {
        "old generation": deployment_body(rewrite_id, generation=3, observed_generation=2, **fully),
        "updated short": deployment_body(rewrite_id, **(fully | {"updated": 1})),
        "ready short": deployment_body(rewrite_id, **(fully | {"ready": 1, "available": 1})),
        "surge pod": deployment_body(rewrite_id, **(fully | {"replicas": 3})),
        "other rewrite": deployment_body("0ld0ld0ld0", **fully),
    }
    for what, dep in cases.items():
        status = status_of(model, Observed(job=complete_job(model), deployment=dep))
        assert status["phase"] == "Deploying", what
        assert conditions(status)["Ready"]["status"] == "False", what
        assert conditions(status)["Ready"]["reason"] == "RollingOut", what
        assert conditions(status)["Available"]["status"] == "True", what


def test_an_unschedulable_serving_pod_is_pending_with_the_scheduler_message() -> None:
    model = make_model(numCores=2)
    dep = deployment_body(model.rewrite_id(), ready=0, updated=1, available=0)
    pod = serving_pod(
        "resnet50-7d9c8b6f5-x2x9k",
        scheduled={"status": "False", "reason": "Unschedulable", "message": UNSCHEDULABLE},
    )
    status = status_of(model, Observed(job=complete_job(model), deployment=dep, serving_pods=[pod]))

    assert status["phase"] == "Pending"
    ready = conditions(status)["Ready"]
    assert ready["status"] == "False" and ready["reason"] == "Unschedulable"
    assert UNSCHEDULABLE in ready["message"] and "resnet50-7d9c8b6f5-x2x9k" in ready["message"]
    assert conditions(status)["Available"]["status"] == "False"


def test_an_unschedulable_pod_while_others_serve_is_degraded() -> None:
    model = make_model(replicas=2)
    dep = deployment_body(model.rewrite_id(), desired=2, replicas=2, ready=1, updated=2, available=1)
    pod = serving_pod("resnet50-7d9c8b6f5-b7k2m", scheduled={"status": "False", "message": UNSCHEDULABLE})
    status = status_of(model, Observed(job=complete_job(model), deployment=dep, serving_pods=[pod]))
    assert status["phase"] == "Degraded"
    assert conditions(status)["Ready"]["reason"] == "Unschedulable"


def test_a_crash_looping_server_fails_the_model() -> None:
    model = make_model()
    dep = deployment_body(model.rewrite_id(), ready=0, updated=1, available=0)
    waiting = {
        "reason": "CrashLoopBackOff",
        "message": "back-off 2m40s restarting failed container=tfserving pod=resnet50-7d9c8b6f5-q8p4z",
    }
    pod = serving_pod("resnet50-7d9c8b6f5-q8p4z", waiting=waiting)
    status = status_of(model, Observed(job=complete_job(model), deployment=dep, serving_pods=[pod]))

    assert status["phase"] == "Failed"
    ready = conditions(status)["Ready"]
    assert ready["status"] == "False" and ready["reason"] == "ModelLoadFailed"
    assert "CrashLoopBackOff" in ready["message"] and "resnet50-7d9c8b6f5-q8p4z" in ready["message"]


def test_a_container_still_creating_is_not_a_failure() -> None:
    model = make_model()
    dep = deployment_body(model.rewrite_id(), ready=0, updated=1, available=0)
    pod = serving_pod("resnet50-7d9c8b6f5-q8p4z", waiting={"reason": "ContainerCreating"})
    status = status_of(model, Observed(job=complete_job(model), deployment=dep, serving_pods=[pod]))
    assert status["phase"] == "Deploying"
    assert conditions(status)["Available"]["reason"] == "NoReplicasAvailable"


def test_available_during_a_new_rollout_is_deploying() -> None:
    model = make_model(replicas=2)
    # The new ReplicaSet has one of two pods; the old pods still answer.
    dep = deployment_body(
        model.rewrite_id(),
        desired=2,
        generation=5,
        observed_generation=5,
        replicas=3,
        ready=2,
        updated=1,
        available=2,
    )
    status = status_of(model, Observed(job=complete_job(model), deployment=dep))
    assert status["phase"] == "Deploying"
    assert conditions(status)["Available"]["status"] == "True"
    ready = conditions(status)["Ready"]
    assert ready["status"] == "False" and ready["reason"] == "RollingOut"
    assert "2 of 2" in ready["message"]


def test_pods_lost_after_ready_are_degraded_until_replaced() -> None:
    model = make_model(replicas=2)
    served = {"phase": "Ready", "observedGeneration": 1}
    # A node went away with one pod: the Deployment's replacement is not ready yet, the other pod still serves.
    dep = deployment_body(model.rewrite_id(), desired=2, replicas=2, ready=1, updated=2, available=1)
    status = status_of(model, Observed(job=complete_job(model), deployment=dep), previous=served)
    assert status["phase"] == "Degraded"
    ready = conditions(status)["Ready"]
    assert ready["reason"] == "ReplicasUnavailable" and "1 of 2 pod(s) available" in ready["message"]
    # The same Deployment on its way up the first time, or after a spec change (scaling up), is a rollout.
    for previous in ({"phase": "Deploying", "observedGeneration": 1}, {"phase": "Ready", "observedGeneration": 0}):
        status = status_of(model, Observed(job=complete_job(model), deployment=dep), previous=previous)
        assert status["phase"] == "Deploying", previous
    # With no pod left, it is not degraded but down: back to a rollout from nothing.
    none_left = deployment_body(model.rewrite_id(), desired=2, replicas=2, ready=0, updated=2, available=0)
    status = status_of(model, Observed(job=complete_job(model), deployment=none_left), previous=served)
    assert status["phase"] == "Deploying"


def test_progress_deadline_exceeded() -> None:
    model = make_model()
    stalled = [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]
    dep = deployment_body(model.rewrite_id(), ready=0, updated=1, available=0, extra_conditions=stalled)
    status = status_of(model, Observed(job=complete_job(model), deployment=dep))
    assert status["phase"] == "Failed"
    assert conditions(status)["Ready"]["reason"] == "ProgressDeadlineExceeded"


def test_pods_the_api_refuses_to_create_are_told_in_its_words() -> None:
    model = make_model(replicas=2)
    words = (
        'pods "resnet50-7d4b9c-" is forbidden: violates PodSecurity "restricted:latest": runAsNonRoot != true '
        "(pod must not set securityContext.runAsNonRoot=false)"
    )
    refused = [{"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": words}]
    none = deployment_body(model.rewrite_id(), desired=2, replicas=0, ready=0, updated=0, available=0,
                           extra_conditions=refused)  # fmt: skip
    status = status_of(model, Observed(job=complete_job(model), deployment=none))
    assert status["phase"] == "Failed"
    assert conditions(status)["Ready"]["reason"] == "PodsRefused"
    assert conditions(status)["Ready"]["message"] == f"the serving pods cannot be created: {words}"
    # Each retry of the ReplicaSet names another generated pod: the same status, so no write for it.
    for name in ("resnet50-7d4b9c-x2v5q", "resnet50-7d4b9c-7c4cl"):
        retried = [refused[0] | {"message": words.replace('"resnet50-7d4b9c-"', f'"{name}"')}]
        again = deployment_body(model.rewrite_id(), desired=2, replicas=0, ready=0, updated=0, available=0,
                                extra_conditions=retried)  # fmt: skip
        assert status_of(model, Observed(job=complete_job(model), deployment=again)) == status
    # One of two admitted (a quota with room for one): that one serves, the refusal is named.
    one = deployment_body(model.rewrite_id(), desired=2, replicas=1, ready=1, updated=1, available=1,
                          extra_conditions=refused)  # fmt: skip
    status = status_of(model, Observed(job=complete_job(model), deployment=one))
    assert status["phase"] == "Degraded" and conditions(status)["Ready"]["reason"] == "PodsRefused"
    assert conditions(status)["Available"]["status"] == "True"


def test_last_transition_time_kept_while_unchanged_and_moved_when_it_flips() -> None:
    model = make_model()
    name = job_name(model.name, model.rewrite_id())
    first = status_of(model, Observed(job=job_body(name)), now=EARLIER)
    assert {c["lastTransitionTime"] for c in first["conditions"]} == {EARLIER}

    again = status_of(model, Observed(job=job_body(name)), previous=first, now=NOW)
    assert {c["lastTransitionTime"] for c in again["conditions"]} == {EARLIER}

    done = status_of(model, Observed(job=job_body(name, "Complete")), previous=again, now=NOW)
    assert conditions(done)["RewriteSucceeded"]["status"] == "True"
    assert conditions(done)["RewriteSucceeded"]["lastTransitionTime"] == NOW
    # Available and Ready stayed False: their transition times stay too, though their reasons changed.
    assert conditions(done)["Available"]["lastTransitionTime"] == EARLIER
    assert conditions(done)["Ready"]["lastTransitionTime"] == EARLIER


def test_every_condition_carries_the_observed_generation() -> None:
    model = make_model()
    name = job_name(model.name, model.rewrite_id())
    previous = status_of(model, Observed(job=job_body(name)), generation=1, now=EARLIER)
    status = status_of(model, Observed(job=job_body(name)), generation=7, previous=previous)
    assert status["observedGeneration"] == 7
    assert [c["observedGeneration"] for c in status["conditions"]] == [7, 7, 7]
    assert [c["type"] for c in status["conditions"]] == ["RewriteSucceeded", "Available", "Ready"]
    assert all(c["status"] in ("True", "False", "Unknown") for c in status["conditions"])


def test_a_rewrite_pod_that_cannot_schedule_is_pending_with_the_schedulers_reason() -> None:
    model = make_model()
    rewrite_id = model.rewrite_id()
    name = job_name(model.name, rewrite_id)
    pod = job_pod(name, "x1", "2025-05-01T10:00:06Z", "")
    pod["status"] = {
        "phase": "Pending",
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": '0/7 nodes are available: persistentvolumeclaim "compiled" not found.',
            }
        ],
    }
    status = compute_status(
        model, 1, rewrite_id, None, Observed(job=job_body(name), job_pods=[pod]), {}, "2025-05-01T10:01:00Z"
    )
    assert status["phase"] == "Pending"
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "RewritePending"
    assert 'persistentvolumeclaim "compiled" not found' in ready["message"]


def test_a_failed_rewrite_names_its_next_retry() -> None:
    model = make_model()
    rewrite_id = model.rewrite_id()
    name = job_name(model.name, rewrite_id)
    job = job_body(name, "Failed", reason="BackoffLimitExceeded", message="Job has reached the specified backoff limit")
    retry = Retry(count=1, at="2025-05-01T10:05:00Z", wait=60.0)
    status = compute_status(model, 1, rewrite_id, None, Observed(job=job), {}, "2025-05-01T10:04:00Z", retry)
    assert status["phase"] == "Failed"
    rewrite = next(c for c in status["conditions"] if c["type"] == "RewriteSucceeded")
    assert rewrite["message"].endswith("; retry 2 at 2025-05-01T10:05:00Z")
    assert status["rewrite"]["retries"] == 1


# What the rewrite published, recorded durably


REPORT = (
    '{"formatVersion": 1, "rewriteId": "x", "numCores": 2, "sourceVersion": 3, "neuronOps": 12, '
    '"bytesWritten": 1048576, "seconds": 1.25, "reused": false, "output": "/store/x/1"}'
)


def succeeded_pod(job: str, report: str = REPORT) -> dict[str, Any]:
    pod = job_pod(job, "abcde", EARLIER, report, exit_code=0)
    pod["status"]["phase"] = "Succeeded"
    return pod


def test_the_rewrites_report_is_recorded_with_when_it_was_published() -> None:
    model = make_model()
    job = complete_job(model)
    status = status_of(model, Observed(job=job, job_pods=[succeeded_pod(job["metadata"]["name"])]))
    rewrite = status["rewrite"]
    assert rewrite["publishedAt"] == NOW
    assert (rewrite["sourceVersion"], rewrite["neuronOps"], rewrite["bytesWritten"]) == (3, 12, 1048576)
    assert rewrite["durationSeconds"] == 1.25 and rewrite["reused"] is False
    message = conditions(status)["RewriteSucceeded"]["message"]
    assert message == "12 NeuronOp(s) (source version 3) tagged for 2 NeuronCores, published as version 1"


def test_a_published_rewrite_stays_complete_when_its_job_and_pods_are_gone() -> None:
    model = make_model()
    job = complete_job(model)
    first = status_of(model, Observed(job=job, job_pods=[succeeded_pod(job["metadata"]["name"])]))
    later = status_of(model, Observed(job=None, published=True), previous=first, now="2025-05-01T11:00:00Z")
    assert conditions(later)["RewriteSucceeded"]["status"] == "True"
    assert later["phase"] != "Rewriting"
    recorded = {k: v for k, v in first["rewrite"].items() if k != "job"}
    assert {k: v for k, v in later["rewrite"].items() if k != "job"} == recorded  # publishedAt kept, not moved


def test_facts_of_another_rewrite_are_not_carried_over() -> None:
    model = make_model()
    job = complete_job(model)
    first = status_of(model, Observed(job=job, job_pods=[succeeded_pod(job["metadata"]["name"])]))
    changed = make_model(numCores=4)
    status = status_of(changed, Observed(job=None), previous=first)
    assert status["rewrite"]["id"] == changed.rewrite_id()
    assert "publishedAt" not in status["rewrite"] and "neuronOps" not in status["rewrite"]


def test_a_reused_rewrite_says_so() -> None:
    model = make_model()
    job = complete_job(model)
    pod = succeeded_pod(job["metadata"]["name"], REPORT.replace('"reused": false', '"reused": true'))
    status = status_of(model, Observed(job=job, job_pods=[pod]))
    assert status["rewrite"]["reused"] is True
    assert conditions(status)["RewriteSucceeded"]["message"].endswith("(found already published in the store)")


def test_a_store_the_rewrite_cannot_write_says_what_to_do() -> None:
    model = make_model()
    name = job_name(model.name, model.rewrite_id())
    line = (
        "tf-neuron-auto-multicore: error: /store/ns/m/abc/1: cannot create the directory /store/ns (Permission denied)"
    )
    observed = Observed(job=job_body(name, "Failed"), job_pods=[job_pod(name, "x1", EARLIER, line)])
    message = conditions(status_of(model, observed))["RewriteSucceeded"]["message"]
    assert line in message
    assert "must be able to write to the store" in message and "spec.rewrite.podSecurityContext" in message


# Every failure told, and told the same way


SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "resnet50", "namespace": NAMESPACE}}


def test_an_invalid_spec_while_pods_serve_is_degraded_and_keeps_the_endpoints() -> None:
    model = make_model()
    error = SpecError("InvalidSpec", "spec.serving.podSecurityContext.runAsUser is 0 (root) but ...")
    dep = deployment_body("0ld0ld0ld0")
    status = compute_status(model, 2, None, error, Observed(deployment=dep, service=SERVICE), {}, NOW)
    assert status["phase"] == "Degraded"  # as a failed rewrite in the same situation: something still serves
    assert conditions(status)["Available"]["status"] == "True"
    assert conditions(status)["Ready"]["message"].endswith("(the current pods keep serving the previous spec)")
    assert status["endpoints"] is not None


def test_zero_replicas_is_idle_not_ready() -> None:
    model = make_model(replicas=0)
    dep = deployment_body(model.rewrite_id(), desired=0, replicas=0, ready=0, updated=0, available=0)
    status = status_of(model, Observed(job=complete_job(model), deployment=dep, service=SERVICE))
    assert status["phase"] == "Idle"
    assert {t: (c["status"], c["reason"]) for t, c in conditions(status).items()} == {
        "RewriteSucceeded": ("True", "RewriteSucceeded"),
        "Available": ("False", "ScaledToZero"),
        "Ready": ("False", "ScaledToZero"),
    }
    assert "spec.replicas is 0: nothing serves" in conditions(status)["Ready"]["message"]


def test_a_rewrite_image_that_cannot_be_pulled_blocks_the_rewrite() -> None:
    model = make_model(source={"s3": {"uri": "s3://models/resnet50/"}})
    name = job_name(model.name, model.rewrite_id())
    pod = job_pod(name, "p1", EARLIER, "")
    pod["status"] = {
        "phase": "Pending",
        "containerStatuses": [
            {
                "name": "rewrite",
                "state": {
                    "waiting": {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "typo/rewrite"'}
                },
            }
        ],
    }
    status = status_of(model, Observed(job=job_body(name), job_pods=[pod]))
    rewrite = conditions(status)["RewriteSucceeded"]
    assert rewrite["reason"] == "RewriteBlocked"
    assert "container rewrite: ImagePullBackOff: Back-off pulling image" in rewrite["message"]
    assert status["phase"] == "Failed" and conditions(status)["Ready"]["reason"] == "RewriteBlocked"


def test_an_injected_init_container_that_cannot_start_blocks_the_rewrite_in_its_words() -> None:
    model = make_model()
    name = job_name(model.name, model.rewrite_id())
    pod = job_pod(name, "p1", EARLIER, "")
    pod["status"] = {
        "phase": "Pending",
        "initContainerStatuses": [
            {"name": "istio-init", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling"}}}
        ],
        "containerStatuses": [{"name": "rewrite", "state": {"waiting": {"reason": "PodInitializing"}}}],
    }
    rewrite = conditions(status_of(model, Observed(job=job_body(name), job_pods=[pod])))["RewriteSucceeded"]
    assert rewrite["reason"] == "RewriteBlocked"
    assert f"pod {name}-p1 container istio-init: ImagePullBackOff: Back-off pulling" in rewrite["message"]


def test_a_rewrite_that_never_ran_for_a_failed_init_container_names_it() -> None:
    model = make_model()
    name = job_name(model.name, model.rewrite_id())
    pod = job_pod(name, "p1", EARLIER, "")
    pod["status"]["initContainerStatuses"] = [
        {"name": "vault-agent-init", "state": {"terminated": {"exitCode": 2, "reason": "Error", "message": ""}}}
    ]
    pod["status"]["containerStatuses"] = [{"name": "rewrite", "state": {"waiting": {"reason": "PodInitializing"}}}]
    rewrite = conditions(status_of(model, Observed(job=job_body(name, "Failed"), job_pods=[pod])))["RewriteSucceeded"]
    assert rewrite["message"].startswith(
        f"rewrite Job {name} failed (BackoffLimitExceeded): pod {name}-p1 init container vault-agent-init exited 2 "
        "(Error)"
    ), rewrite["message"]


QUOTA_WORDS = "exceeded quota: no-pods, requested: pods=1, used: pods=0, limited: pods=0"


def failed_create(job: str, suffix: str, at: str, combined: bool = False) -> dict[str, Any]:
    """A FailedCreate Event of the Job controller, as the API lists it (core/v1, the legacy recorder's fields)."""
    words = f'Error creating: pods "{job}-{suffix}" is forbidden: {QUOTA_WORDS}'
    message = f"(combined from similar events): {words}" if combined else words
    return {"reason": "FailedCreate", "type": "Warning", "message": message, "firstTimestamp": at, "lastTimestamp": at}


def test_a_job_waits_for_its_pod_while_running_with_none_live() -> None:
    name = "resnet50-rw"
    waiting = job_body(name) | {"status": {"startTime": "2025-05-01T10:00:05Z"}}
    assert job_waits_for_pod(waiting, [])
    assert job_waits_for_pod(waiting, [job_pod(name, "a1b2c", EARLIER, "")])  # a failed pod, no replacement yet
    pending = job_pod(name, "a1b2c", EARLIER, "") | {"status": {"phase": "Pending"}}
    assert not job_waits_for_pod(waiting, [pending])
    assert not job_waits_for_pod(job_body(name), [])  # the controller counts an active pod the index lags
    assert not job_waits_for_pod(job_body(name, "Failed"), [])
    assert not job_waits_for_pod(job_body(name) | {"status": {}}, [])  # not synced by its controller yet
    succeeded = job_pod(name, "a1b2c", EARLIER, "", exit_code=0) | {"status": {"phase": "Succeeded"}}
    assert not job_waits_for_pod(waiting, [succeeded])  # done: the Job's Complete follows


def test_a_refused_job_pod_is_told_in_the_newest_events_words_without_the_generated_suffix() -> None:
    name = "resnet50-rw"
    events = [failed_create(name, "x2v5q", EARLIER), failed_create(name, "7c4cl", NOW, combined=True)]
    told = creation_refused(events, [])
    assert told == f'its pod cannot be created: pods "{name}-" is forbidden: {QUOTA_WORDS}'
    assert creation_refused(events[:1], []) == told  # each retry's event: the same words, no write for it
    assert creation_refused([], []) is None
    # A pod created after the refusals: they are over (the Events stay an hour).
    assert creation_refused(events, [job_pod(name, "q8r9s", "2025-05-01T10:06:00Z", "")]) is None
    assert creation_refused(events, [job_pod(name, "q8r9s", EARLIER, "")]) == told


def test_a_rewrite_pod_the_api_refuses_is_told_and_is_no_progress() -> None:
    model = make_model()
    name = job_name(model.name, model.rewrite_id())
    waiting = job_body(name) | {"status": {"startTime": "2025-05-01T10:00:05Z"}}
    refusal = creation_refused([failed_create(name, "x2v5q", NOW)], [])
    status = status_of(model, Observed(job=waiting, job_refused=refusal))
    rewrite, ready = conditions(status)["RewriteSucceeded"], conditions(status)["Ready"]
    assert rewrite["status"] == "False" and rewrite["reason"] == "RewritePodsRefused"
    assert (
        rewrite["message"]
        == f'rewrite Job {name}: its pod cannot be created: pods "{name}-" is forbidden: {QUOTA_WORDS}'
    )
    assert status["phase"] == "Failed" and ready["reason"] == "RewritePodsRefused"
    # A new rewrite refused while the previous one's pods serve: they keep serving it.
    serving = deployment_body("previous", ready=1, updated=1, available=1)
    status = status_of(model, Observed(job=waiting, deployment=serving, job_refused=refusal))
    assert status["phase"] == "Degraded" and conditions(status)["Ready"]["reason"] == "RewritePodsRefused"
    assert conditions(status)["Ready"]["message"].endswith("(the current pods keep serving the previous rewrite)")


def test_a_serving_container_whose_secret_is_missing_is_reported() -> None:
    model = make_model()
    dep = deployment_body(model.rewrite_id(), ready=0, updated=1, available=0)
    waiting = {"reason": "CreateContainerConfigError", "message": 'secret "hf-token" not found'}
    pod = serving_pod("resnet50-7d9c8b6f5-q8p4z", waiting=waiting)
    status = status_of(model, Observed(job=complete_job(model), deployment=dep, serving_pods=[pod]))
    assert status["phase"] == "Failed"
    ready = conditions(status)["Ready"]
    assert ready["reason"] == "ContainerConfigInvalid" and 'secret "hf-token" not found' in ready["message"]


def test_a_refused_child_is_told_in_the_ready_condition() -> None:
    model = make_model()
    message = 'the API refused to create Deployment resnet50: Deployment.apps "resnet50" is invalid: ...'
    observed = Observed(job=complete_job(model), refused=("ChildRejected", message))
    status = status_of(model, observed)
    assert status["phase"] == "Failed"
    assert conditions(status)["RewriteSucceeded"]["status"] == "True"
    assert (conditions(status)["Ready"]["reason"], conditions(status)["Ready"]["message"]) == ("ChildRejected", message)
