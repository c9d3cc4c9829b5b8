"""One pure function from what the operator observes to the NeuronModel's status: status is a view of reality."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .builders import CORES_ANNOTATION, REWRITE_ANNOTATION, VERSION_ANNOTATION, Model, endpoints
from .instances import auto_cores_note
from .naming import selector_string
from .validation import SpecError

REWRITE_SUCCEEDED, AVAILABLE, READY = "RewriteSucceeded", "Available", "Ready"
# A pod name the apiserver generated for a ReplicaSet (its generateName and five random characters), as its
# refusals quote it.
_GENERATED_POD = re.compile(r'(pods "[a-z0-9.-]+-)[bcdfghjklmnpqrstvwxz2456789]{5}"')
# status.rewrite field -> key of the rewrite's report (tf-neuron-auto-multicore --report_file)
REPORT_FIELDS = {
    "sourceVersion": "sourceVersion",
    "neuronOps": "neuronOps",
    "bytesWritten": "bytesWritten",
    "durationSeconds": "seconds",
    "reused": "reused",
    "target": "target",
    "targetEvidence": "targetEvidence",
    "compiler": "compiler",
}
# Waiting reasons of a container that will not clear by themselves (a kubelet retries, the cause stays), by the
# condition reason that reports them. ContainerCreating and PodInitializing clear by themselves.
_STUCK_REASONS = {
    "CrashLoopBackOff": "ModelLoadFailed",
    "RunContainerError": "ModelLoadFailed",
    "ErrImagePull": "ImagePullFailed",
    "ImagePullBackOff": "ImagePullFailed",
    "InvalidImageName": "ImagePullFailed",
    "ErrImageNeverPull": "ImagePullFailed",
    "CreateContainerConfigError": "ContainerConfigInvalid",
    "CreateContainerError": "ContainerConfigInvalid",
}
# The rewrite's condition reason for what holds its pod (by _pod_problem's reason, or a refusal); else RewriteBlocked.
_REWRITE_STUCK = {"Unschedulable": "RewritePending", "RewritePodsRefused": "RewritePodsRefused"}
STORE_PERMISSION_HINT = (
    "the rewrite runs as spec.rewrite.podSecurityContext's runAsUser/runAsGroup (default 65532:65532) and "
    "must be able to write to the store: make the store's directory writable by that user (an EFS access point's "
    "uid/gid, the owner of an NFS export) or set spec.rewrite.podSecurityContext to its owner; fsGroup has no "
    "effect on NFS or EFS"
)


@dataclass
class Observed:
    """The children of one NeuronModel as last seen (plain dicts, from the operator's in-memory indexes)."""

    job: dict[str, Any] | None = None  # the Job of the current rewrite
    job_pods: list[dict[str, Any]] = field(default_factory=list)
    deployment: dict[str, Any] | None = None
    serving_pods: list[dict[str, Any]] = field(default_factory=list)
    service: dict[str, Any] | None = None
    published: bool = False  # the status already records this rewrite as complete (its Job may be gone)
    refused: tuple[str, str] | None = None  # (reason, message): a child the API refused, or a foreign object
    job_refused: str | None = None  # why the Job's controller cannot create its pod (creation_refused)


@dataclass
class Retry:
    """Re-runs of a failed rewrite: how many so far, and when the next one is due (absolute, so status is stable)."""

    count: int = 0
    at: str | None = None
    wait: float | None = None  # seconds until ``at``; None when no retry is pending


def job_outcome(job: dict[str, Any] | None) -> str:
    """ "Complete", "Failed", or "Running" (also for a Job not created yet: None)."""
    for condition in (job or {}).get("status", {}).get("conditions") or []:
        if condition.get("status") == "True" and condition.get("type") in ("Complete", "Failed"):
            return condition["type"]
    return "Running"


def _container_statuses(pod: dict[str, Any]) -> list[dict[str, Any]]:
    """Init containers first: the operator's pods have none of their own, but a webhook may inject one (a service
    mesh's), and the pod waits on it, or fails with it, before the rewrite or the server ever starts."""
    status = pod.get("status") or {}
    return [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]


def _newest_first(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "", reverse=True)


def _terminations(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The terminated states of the pods' containers, newest pod first."""
    states = []
    for pod in _newest_first(pods):
        for status in _container_statuses(pod):
            terminated = (status.get("state") or {}).get("terminated")
            if terminated:
                states.append(terminated)
    return states


def rewrite_report(pods: list[dict[str, Any]]) -> dict[str, Any]:
    """What the rewrite reported on success (its termination message: ``--report_file``), or {}."""
    for terminated in _terminations(pods):
        if terminated.get("exitCode") == 0:
            try:
                report = json.loads(terminated.get("message") or "")
            except ValueError:
                continue
            if isinstance(report, dict):
                return report
    return {}


def failure_message(job: dict[str, Any], pods: list[dict[str, Any]]) -> str:
    """The rewrite's own error line (its pod's termination message), with the Job's reason."""
    failed = next(
        (c for c in job.get("status", {}).get("conditions") or [] if c.get("type") == "Failed"), {"reason": "Failed"}
    )
    detail = ""
    for terminated in _terminations(pods):
        lines = [line for line in (terminated.get("message") or "").splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()]
        if lines:
            detail = (errors or lines)[-1].strip()
            break
    else:
        detail = _evicted(pods) or _failed_init_container(pods)
    reason = failed.get("reason") or "Failed"
    base = f"rewrite Job {job['metadata']['name']} failed ({reason})"
    message = f"{base}: {detail}" if detail else f"{base}: {failed.get('message', 'no message from the pod')}"
    if "Permission denied" in detail:
        message += f"; {STORE_PERMISSION_HINT}"
    return message


def _failed_init_container(pods: list[dict[str, Any]]) -> str:
    """An init container that failed without a word (one a webhook injected: the operator's pods have none), so the
    rewrite never ran: its name, exit code and reason."""
    for pod in _newest_first(pods):
        for status in (pod.get("status") or {}).get("initContainerStatuses") or []:
            terminated = (status.get("state") or {}).get("terminated") or {}
            if terminated.get("exitCode"):
                code, reason = terminated["exitCode"], terminated.get("reason") or "Error"
                return f"pod {pod['metadata']['name']} init container {status.get('name')} exited {code} ({reason})"
    return ""


def _evicted(pods: list[dict[str, Any]]) -> str:
    """The kubelet's words for a pod it stopped from outside (an eviction for node disk or memory pressure, or for
    going over its ephemeral-storage limit): its containers leave no message of their own then."""
    for pod in _newest_first(pods):
        status = pod.get("status") or {}
        if status.get("reason") and status.get("message"):
            return f"pod {pod['metadata']['name']} {status['reason']}: {status['message'].strip()}"
    return ""


def _pod_problem(pods: list[dict[str, Any]]) -> tuple[str, str] | None:
    """Why serving pods are not ready, in the scheduler's or the server's own words."""
    for pod in pods:
        for condition in pod.get("status", {}).get("conditions") or []:
            if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                return (
                    "Unschedulable",
                    f"pod {pod['metadata']['name']} cannot be scheduled: {condition.get('message', '')}",
                )
    for pod in pods:
        for status in _container_statuses(pod):
            waiting = (status.get("state") or {}).get("waiting") or {}
            reason = _STUCK_REASONS.get(waiting.get("reason", ""))
            if reason is not None:
                message = waiting.get("message") or waiting["reason"]
                where = f"pod {pod['metadata']['name']} container {status.get('name')}"
                return reason, f"{where}: {waiting['reason']}: {message}"
    return None


def _refusal_words(message: str) -> str:
    """The refusing component's words, the pod's generated suffix cut (``pods "m-7d4b9c-"``), so a refusal that
    lasts is one status, not a write for each of the controller's retries."""
    return _GENERATED_POD.sub(r'\1"', message)


def _pods_refused(deployment_status: dict[str, Any]) -> str | None:
    """Why the ReplicaSet cannot create serving pods, in the refusing component's words (Pod Security admission, a
    quota, a webhook): the Deployment carries the ReplicaSet's ReplicaFailure condition while the refusal lasts."""
    for condition in deployment_status.get("conditions") or []:
        if condition.get("type") == "ReplicaFailure" and condition.get("status") == "True":
            words = _refusal_words(condition.get("message") or condition.get("reason") or "")
            return f"the serving pods cannot be created: {words}"
    return None


def job_waits_for_pod(job: dict[str, Any], pods: list[dict[str, Any]]) -> bool:
    """A running Job its controller has synced (startTime) with no pod but failed ones: its pod was refused, or a
    failed one awaits its replacement. A healthy Job's first status already counts its pod active, and a succeeded
    pod only waits for the Job's Complete."""
    live = [p for p in pods if (p.get("status") or {}).get("phase") != "Failed"]
    status = job.get("status") or {}
    return job_outcome(job) == "Running" and bool(status.get("startTime")) and not live and not status.get("active")


def creation_refused(events: list[dict[str, Any]], pods: list[dict[str, Any]]) -> str | None:
    """Why a Job's controller cannot create its pod, in the refusing component's words: the newest of its
    ``FailedCreate`` Events (the only record a Job has of it) that is newer than the Job's newest pod, or None."""
    since = max((p["metadata"].get("creationTimestamp") or "" for p in pods), default="")

    def stamp(event: dict[str, Any]) -> str:
        return event.get("lastTimestamp") or event.get("eventTime") or event.get("firstTimestamp") or ""

    newer = [e for e in events if stamp(e) > since]
    if not newer:
        return None
    message = max(newer, key=stamp).get("message") or ""
    message = message.removeprefix("(combined from similar events): ").removeprefix("Error creating: ")
    return f"its pod cannot be created: {_refusal_words(message)}"


def rewrite_facts(
    previous: dict[str, Any], rewrite_id: str | None, outcome: str, pods: list[dict[str, Any]], now: str
) -> dict[str, Any]:
    """When the rewrite was published and what it did: from its report while its pod exists, else as recorded."""
    last = previous.get("rewrite") or {}
    kept = last if rewrite_id is not None and last.get("id") == rewrite_id else {}
    if outcome != "Complete":
        return {}
    report = rewrite_report(pods)
    facts = {"publishedAt": kept.get("publishedAt") or now}
    for key, reported in REPORT_FIELDS.items():
        facts[key] = report.get(reported, kept.get(key))
    return facts


def _compiled_for(facts: dict[str, Any]) -> str:
    if facts.get("target") is None:
        return ""
    compiler = f" by compiler {facts['compiler']}" if facts.get("compiler") else ""
    return f"; compiled for {facts['target']}{compiler}"


def _from_source(facts: dict[str, Any]) -> str:
    version = facts.get("sourceVersion")
    return "" if version is None else f" (source version {version})"


def _condition(kind: str, ok: bool | None, reason: str, message: str) -> dict[str, Any]:
    status = "Unknown" if ok is None else str(ok)
    return {"type": kind, "status": status, "reason": reason, "message": message}


def compute_status(
    model: Model,
    generation: int,
    rewrite_id: str | None,
    error: SpecError | None,
    observed: Observed,
    previous: dict[str, Any],
    now: str,
    retry: Retry | None = None,
) -> dict[str, Any]:
    spec = model.spec
    desired = spec.get("replicas", 1)
    deployment = observed.deployment
    dep_status = (deployment or {}).get("status") or {}
    annotations = ((deployment or {}).get("metadata") or {}).get("annotations") or {}
    served_id = annotations.get(REWRITE_ANNOTATION)
    outcome = "Complete" if observed.published else job_outcome(observed.job)
    facts = rewrite_facts(previous, rewrite_id, outcome, observed.job_pods, now)

    if error is not None:
        rewrite = _condition(REWRITE_SUCCEEDED, None, error.reason, str(error))
    elif outcome == "Complete":
        tagged = f"{facts['neuronOps']} NeuronOp(s)" if facts.get("neuronOps") is not None else "every NeuronOp"
        reused = " (found already published in the store)" if facts.get("reused") else ""
        rewrite = _condition(
            REWRITE_SUCCEEDED,
            True,
            "RewriteSucceeded",
            f"{tagged}{_from_source(facts)} tagged for {model.cores} NeuronCores{auto_cores_note(spec)}, published "
            f"as version {model.version}{reused}{_compiled_for(facts)}",
        )
    elif outcome == "Failed":
        message = failure_message(observed.job or {}, observed.job_pods)
        if retry is not None and retry.wait is not None:
            message += f"; retry {retry.count + 1} at {retry.at}"
        rewrite = _condition(REWRITE_SUCCEEDED, False, "RewriteFailed", message)
    else:
        job = (observed.job or {}).get("metadata", {}).get("name", "(creating)")
        # Its pod is refused (a quota, a webhook), its source claim does not exist (cannot schedule), its image
        # cannot be pulled, a Secret it reads is missing.
        stuck = (
            ("RewritePodsRefused", observed.job_refused)
            if observed.job_refused is not None
            else _pod_problem(observed.job_pods)
        )
        rewrite = (
            _condition(
                REWRITE_SUCCEEDED,
                False,
                _REWRITE_STUCK.get(stuck[0], "RewriteBlocked"),
                f"rewrite Job {job}: {stuck[1]}",
            )
            if stuck is not None
            else _condition(
                REWRITE_SUCCEEDED,
                False,
                "RewriteRunning",
                f"rewriting the model for {model.cores} NeuronCores in Job {job}",
            )
        )

    available_replicas = dep_status.get("availableReplicas") or 0
    if deployment is None:
        available = _condition(AVAILABLE, False, "NotDeployed", "no serving pods yet: waiting for the rewrite")
    elif available_replicas > 0:
        available = _condition(
            AVAILABLE, True, "MinimumReplicasAvailable", f"{available_replicas} serving pod(s) have the model loaded"
        )
    elif desired == 0:
        available = _condition(AVAILABLE, False, "ScaledToZero", "spec.replicas is 0: no pod serves the model")
    else:
        available = _condition(AVAILABLE, False, "NoReplicasAvailable", "no serving pod has the model loaded")

    ready_replicas = dep_status.get("readyReplicas") or 0
    updated = dep_status.get("updatedReplicas") or 0
    current_rollout = (
        deployment is not None
        and served_id == rewrite_id
        and (dep_status.get("observedGeneration") or 0) >= (deployment["metadata"].get("generation") or 0)
        and updated == desired
        and ready_replicas == desired
        and available_replicas == desired
        and (dep_status.get("replicas") or 0) == desired
    )
    # The same spec and rewrite were already served in full: pods missing now are a loss, not a rollout.
    was_serving = (
        previous.get("phase") in ("Ready", "Degraded")
        and previous.get("observedGeneration") == generation
        and deployment is not None
        and served_id == rewrite_id
    )
    problem = _pod_problem(observed.serving_pods)
    refused = _pods_refused(dep_status)
    progress_failed = any(
        c.get("type") == "Progressing" and c.get("reason") == "ProgressDeadlineExceeded"
        for c in dep_status.get("conditions") or []
    )
    serving = available["status"] == "True"
    if error is not None:
        # The pods of the last good spec keep serving it: degraded, as a failed rewrite in the same situation.
        keep = " (the current pods keep serving the previous spec)" if serving else ""
        ready = _condition(READY, False, error.reason, str(error) + keep)
        phase = "Degraded" if serving else "Failed"
    elif observed.refused is not None:
        ready = _condition(READY, False, *observed.refused)
        phase = "Degraded" if serving else "Failed"
    elif outcome == "Failed":
        ready = _condition(READY, False, "RewriteFailed", rewrite["message"])
        phase = "Degraded" if serving else "Failed"
    elif current_rollout and outcome == "Complete" and desired == 0:
        ready = _condition(
            READY,
            False,
            "ScaledToZero",
            f"version {model.version}{_from_source(facts)} on {model.cores} NeuronCores is published and deployed, "
            "but spec.replicas is 0: nothing serves until it is scaled up",
        )
        phase = "Idle"
    elif current_rollout and outcome == "Complete":
        ready = _condition(
            READY,
            True,
            "ModelServing",
            f"{ready_replicas} of {desired} pod(s) serve version {model.version}{_from_source(facts)} on "
            f"{model.cores} NeuronCores each",
        )
        phase = "Ready"
    elif outcome != "Complete":
        keep = " (the current pods keep serving the previous rewrite)" if deployment is not None else ""
        ready = _condition(READY, False, rewrite["reason"], rewrite["message"] + keep)
        if rewrite["reason"] in ("RewriteBlocked", "RewritePodsRefused"):  # waits for a cause that stays
            phase = "Degraded" if serving else "Failed"
        else:
            phase = "Pending" if rewrite["reason"] == "RewritePending" else "Rewriting"
    elif refused is not None:
        ready = _condition(READY, False, "PodsRefused", refused)
        phase = "Degraded" if serving else "Failed"
    elif problem is not None:
        ready = _condition(READY, False, *problem)
        phase = "Degraded" if serving else ("Pending" if problem[0] == "Unschedulable" else "Failed")
    elif progress_failed:
        ready = _condition(READY, False, "ProgressDeadlineExceeded", "the serving Deployment made no progress in time")
        phase = "Degraded" if serving else "Failed"
    elif was_serving and serving:
        # Pods of the current rollout were lost (a node went away, a server stopped answering) and are replaced.
        ready = _condition(
            READY,
            False,
            "ReplicasUnavailable",
            f"{available_replicas} of {desired} pod(s) available; the Deployment is replacing the others",
        )
        phase = "Degraded"
    else:
        ready = _condition(
            READY,
            False,
            "RollingOut",
            f"Waiting for deployment rollout to finish: {available_replicas} of {desired} updated replicas "
            "are available",
        )
        phase = "Deploying"

    conditions = []
    old = {c.get("type"): c for c in previous.get("conditions") or []}
    for condition in (rewrite, available, ready):
        before = old.get(condition["type"])
        changed = before is None or before.get("status") != condition["status"]
        condition["lastTransitionTime"] = now if changed else before.get("lastTransitionTime", now)
        condition["observedGeneration"] = generation
        conditions.append(condition)

    status: dict[str, Any] = {
        "phase": phase,
        "observedGeneration": generation,
        "conditions": conditions,
        "replicas": dep_status.get("replicas") or 0,
        "readyReplicas": ready_replicas,
        "selector": selector_string(model.name),
        "servedVersion": int(annotations[VERSION_ANNOTATION]) if VERSION_ANNOTATION in annotations else None,
        "servedCores": int(annotations[CORES_ANNOTATION]) if CORES_ANNOTATION in annotations else None,
        "rewrite": {
            "id": rewrite_id,
            "job": (observed.job or {}).get("metadata", {}).get("name"),
            "path": model.rewrite_path(rewrite_id) if rewrite_id else None,
            "retries": retry.count if retry is not None and retry.count else None,
            **facts,
        },
        "endpoints": endpoints(model) if observed.service is not None and (error is None or serving) else None,
    }
    return status
