"""Bring one NeuronModel's children and status to what its spec asks for: read, decide (pure), apply the difference.

Reads come from the operator's in-memory indexes, so a reconcile with nothing to change makes no API call.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import kopf
from kubernetes import client
from kubernetes.client.rest import ApiException

from .builders import (
    REWRITE_ANNOTATION,
    Model,
    batching_config_map,
    rewrite_job,
    serving_deployment,
    serving_service,
)
from .config import OperatorConfig
from .naming import GROUP, SPEC_HASH_ANNOTATION, job_name
from .status import Observed, Retry, compute_status, job_outcome
from .validation import SpecError, validate

VERSION, PLURAL = "v1alpha1", "neuronmodels"
USER_AGENT = "neuronmodel-operator"
REWRITE_RETRY_SECONDS, MAX_REWRITE_RETRY_SECONDS = 30, 600
log = logging.getLogger("neuronmodel_operator")

# Reconciles of one model are serialised: child events arrive on several watch streams at once.
_locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
_written: dict[str, dict[str, Any]] = {}  # uid -> the status this process last wrote


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_none(v) for v in value]
    return value


class Children:
    """The observed children of one model, as the indexes hold them."""

    def __init__(self, jobs: list, deployments: list, services: list, config_maps: list, pods: list) -> None:
        self.jobs = {j["metadata"]["name"]: j for j in jobs}
        self.deployment = deployments[0] if deployments else None
        self.service = services[0] if services else None
        self.config_map = config_maps[0] if config_maps else None
        self.pods = pods


class Api:
    """The few writes the operator makes, through the official client."""

    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        api_client = api_client or client.ApiClient()
        api_client.user_agent = USER_AGENT  # the operator's own requests stand out in audit logs
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    def create(self, obj: dict[str, Any]) -> None:
        ns, kind = obj["metadata"]["namespace"], obj["kind"]
        create: Callable[..., Any] = {
            "Job": self.batch.create_namespaced_job,
            "Deployment": self.apps.create_namespaced_deployment,
            "Service": self.core.create_namespaced_service,
            "ConfigMap": self.core.create_namespaced_config_map,
        }[kind]
        try:
            create(ns, obj)
            log.info("created %s %s/%s", kind, ns, obj["metadata"]["name"])
        except ApiException as exc:
            if exc.status != 409:  # already there: a restart, or our index had not seen our last create yet
                raise

    def replace(self, obj: dict[str, Any], observed: dict[str, Any]) -> None:
        """PUT the whole object: a field the spec no longer sets (a nodeSelector, say) must go, not linger."""
        ns, kind, name = obj["metadata"]["namespace"], obj["kind"], obj["metadata"]["name"]
        obj = copy.deepcopy(obj)
        obj["metadata"]["ownerReferences"] = observed["metadata"].get("ownerReferences")
        if kind == "Service":  # immutable once allocated
            obj["spec"]["clusterIP"] = (observed.get("spec") or {}).get("clusterIP")
        replace: Callable[..., Any] = {
            "Deployment": self.apps.replace_namespaced_deployment,
            "Service": self.core.replace_namespaced_service,
            "ConfigMap": self.core.replace_namespaced_config_map,
        }[kind]
        replace(name, ns, obj)
        log.info("updated %s %s/%s", kind, ns, name)

    def delete_job(self, namespace: str, name: str) -> None:
        try:
            self.batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
            log.info("deleted superseded Job %s/%s", namespace, name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, {"status": status})


def _label(obj: dict[str, Any], key: str) -> str | None:
    return (obj["metadata"].get("labels") or {}).get(key)


def _apply(api: Api, owner: kopf.Body | dict, desired: dict[str, Any], observed: dict[str, Any] | None) -> None:
    """Create what is missing; patch what differs from what we last asked for (the spec-hash annotation)."""
    if observed is None:
        kopf.adopt(desired, owner=owner)  # owner reference: garbage collected with the model
        api.create(desired)
        return
    have = (observed["metadata"].get("annotations") or {}).get(SPEC_HASH_ANNOTATION)
    if have != desired["metadata"]["annotations"][SPEC_HASH_ANNOTATION]:
        api.replace(desired, observed)


def retry_delay(retries: int) -> float:
    """Back-off before re-running a failed rewrite, as a kubelet backs off a crash-looping container."""
    return float(min(REWRITE_RETRY_SECONDS * 2**retries, MAX_REWRITE_RETRY_SECONDS))


def _failed_at(job: dict[str, Any]) -> datetime:
    failed = next(c for c in job["status"]["conditions"] if c.get("type") == "Failed")
    stamp = failed.get("lastTransitionTime") or now()
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def reconcile(body: kopf.Body | dict, children: Children, api: Api, config: OperatorConfig) -> float | None:
    """Returns in how many seconds to look again when nothing else will trigger it (a rewrite retry), or None."""
    meta = body["metadata"]
    if meta.get("deletionTimestamp"):
        return None  # the garbage collector removes the children through their owner references
    with _locks[(meta["namespace"], meta["name"])]:
        return _reconcile(body, children, api, config)


def _reconcile(body: kopf.Body | dict, children: Children, api: Api, config: OperatorConfig) -> float | None:
    model = Model.from_body(dict(body))
    meta = body["metadata"]
    # Our own last write is newer than what the index may still show (the watch event of that write can lag).
    previous = _written.get(meta.get("uid", "")) or dict(body.get("status") or {})
    error: SpecError | None = None
    rewrite_id: str | None = None
    job = None
    retry = Retry()
    try:
        validate(model.spec, config)
    except SpecError as exc:
        error = exc
    if error is None:
        rewrite_id = model.rewrite_id(config)
        job = children.jobs.get(job_name(model.name, rewrite_id))
        last = previous.get("rewrite") or {}
        retry.count = int(last.get("retries") or 0) if last.get("id") == rewrite_id else 0
        if job is None:
            _apply(api, body, rewrite_job(model, config), None)
        elif job_outcome(job) == "Failed":
            # The source may be repaired or uploaded in place: run the rewrite again after a growing back-off.
            due = _failed_at(job) + timedelta(seconds=retry_delay(retry.count))
            retry.wait = (due - datetime.now(timezone.utc)).total_seconds()
            retry.at = due.strftime("%Y-%m-%dT%H:%M:%SZ")
            if retry.wait <= 0:
                api.delete_job(model.namespace, job["metadata"]["name"])  # recreated once its deletion is seen
                retry.count += 1
                retry.wait = None
        served = children.deployment
        served_id = ((served or {}).get("metadata", {}).get("annotations") or {}).get(REWRITE_ANNOTATION)
        if job_outcome(job) == "Complete":
            config_map = batching_config_map(model)
            if config_map is not None:  # before the Deployment whose pods mount it
                _apply(api, body, config_map, children.config_map)
            _apply(api, body, serving_deployment(model, config, rewrite_id), served)
        elif served is not None and served["spec"].get("replicas") != model.spec.get("replicas", 1):
            # A new rewrite is running: the pods keep serving the old one, only the replica count follows the spec.
            api.apps.patch_namespaced_deployment(
                served["metadata"]["name"], model.namespace, {"spec": {"replicas": model.spec.get("replicas", 1)}}
            )
        if served is not None or job_outcome(job) == "Complete":
            _apply(api, body, serving_service(model), children.service)
        if served_id == rewrite_id and job_outcome(job) == "Complete":
            for name in children.jobs.keys() - {job_name(model.name, rewrite_id)}:
                api.delete_job(model.namespace, name)  # superseded rewrites, once the new one serves
    job_pods = [
        p
        for p in children.pods
        if (p["metadata"].get("labels") or {}).get("job-name") == (job or {}).get("metadata", {}).get("name")
    ]
    serving_pods = [
        p for p in children.pods if (p["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "serving"
    ]
    observed = Observed(job, job_pods, children.deployment, serving_pods, children.service)
    status = compute_status(model, meta.get("generation", 1), rewrite_id, error, observed, previous, now(), retry)
    if without_none(status) != without_none({k: previous.get(k) for k in status}):
        api.patch_status(model.namespace, model.name, status)
        _written[meta.get("uid", "")] = status
        if status["phase"] != previous.get("phase"):
            ready = status["conditions"][-1]
            event = kopf.warn if status["phase"] in ("Failed", "Degraded") else kopf.info
            event(body, reason=ready["reason"], message=f"{status['phase']}: {ready['message']}")
            log.info(
                "model %s/%s phase %s -> %s: %s",
                model.namespace,
                model.name,
                previous.get("phase"),
                status["phase"],
                ready["message"],
            )
    return retry.wait
