"""Bring one NeuronModel's children and status to what its spec asks for: read, decide (pure), apply the difference.

Reads come from the operator's in-memory indexes, so a reconcile with nothing to change makes no API call.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple

import kopf
from kubernetes import client
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from . import metrics
from .builders import (
    CLEANUP_COMPONENT,
    Model,
    batching_config_map,
    disruption_budget,
    rewrite_job,
    service_monitor,
    serving_deployment,
    serving_service,
    store_cleanup_job,
)
from .config import OperatorConfig
from .drift import drifted
from .naming import (
    COMPONENT_LABEL,
    DELETED_CLEANUP_SUFFIX,
    GROUP,
    JOB_NAME_LABEL,
    SPEC_HASH_ANNOTATION,
    cleanup_job_name,
    job_name,
    model_label,
)
from .own_writes import OwnWrites, slim, without_none
from .status import (
    REPORT_FIELDS,
    Observed,
    Retry,
    compute_status,
    creation_refused,
    failure_message,
    job_outcome,
    job_waits_for_pod,
    rewrite_facts,
    rewrite_report,
)
from .targets import image_warning, incompatible_target, unpinned_warning
from .validation import SpecError, validate

VERSION, PLURAL = "v1alpha1", "neuronmodels"
CUSTOM_PLURALS = {"PodDisruptionBudget": "poddisruptionbudgets", "ServiceMonitor": "servicemonitors"}
USER_AGENT = "neuronmodel-operator"
# Writes fail on a field the API does not know (a typo, a newer field than the release serves, a CRD's narrower
# schema) instead of dropping it in silence, which would read as drift at every reconcile.
STRICT = "Strict"
# (connect, read) seconds of every API call: a hung connection must not hold a model's lock for ever; the call
# fails, and the reconcile is retried with back-off.
REQUEST_TIMEOUT = (5.0, 30.0)
REWRITE_RETRY_SECONDS, MAX_REWRITE_RETRY_SECONDS = 30, 600
# A status change that only moves counts (pods starting one by one) waits until this long after the last status
# write, so a rollout of many pods costs a few writes, not one per pod event. Phase changes go out at once.
COUNTS_INTERVAL_SECONDS = 5.0
CLEANING_WAIT_SECONDS = 2.0
REPORT_WAIT_SECONDS = 1.0
# The Job controller records a pod it could not create (a quota, a webhook, Pod Security) only as a FailedCreate
# Event on the Job; its first status (startTime, no pod active) is the last change such a Job makes. So a synced Job
# without a pod (status.job_waits_for_pod) has its FailedCreate Events read, at that reconcile and, as the Event is
# posted a moment after the status, again each time the wait doubles (from 1 s, at most this far apart) until a
# refusal is found. Then no timer: the controller's own retries (1 s doubling to 60 s) bring the pod, and the pod's
# event the reconcile. A healthy Job's first status counts its pod active: no request.
MAX_CREATION_RECHECK_SECONDS = 60.0
log = logging.getLogger("neuronmodel_operator")


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ChildRefused(Exception):
    """A child the operator cannot make as the spec stands: the API refused it (invalid, forbidden by RBAC or a
    quota), or its name is taken by an object this model does not own. ``reason`` is the condition reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _refusal(exc: ApiException | ValidationError, verb: str, kind: str, name: str) -> Exception:
    """The API's own words when it refused for good (retrying the same request cannot help), else ``exc``. The
    client checks a body against the API's types before sending it: its refusal is told the same way."""
    if isinstance(exc, ValidationError):
        fields = "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in exc.errors())
        return ChildRefused("ChildRejected", f"the client refused to {verb} {kind} {name}: {fields}")
    if exc.status not in (400, 403, 422):
        return exc
    return ChildRefused("ChildRejected", f"the API refused to {verb} {kind} {name}: {api_message(exc)}")


def api_message(exc: ApiException) -> str:
    """The API's own words in an error answer, on one line (the client's text adds its headers and body)."""
    try:
        words = json.loads(exc.body or "{}").get("message") or exc.reason
    except ValueError:
        words = exc.body or exc.reason
    return " ".join(str(words).split())


def owned_by(obj: dict[str, Any], owner_uid: str) -> bool:
    return any(ref.get("uid") == owner_uid for ref in obj["metadata"].get("ownerReferences") or [])


def _foreign(obj: dict[str, Any]) -> ChildRefused:
    meta = obj["metadata"]
    return ChildRefused(
        "ChildConflict",
        f"{obj['kind']} {meta['name']} already exists and does not belong to this NeuronModel: the operator "
        "never adopts, changes or advertises an object it did not create; delete or rename it (its clients "
        "can then use the one this model creates), or give the NeuronModel another name",
    )


class Children:
    """The observed children of one model, as the indexes hold them."""

    def __init__(
        self,
        jobs: list,
        deployments: list,
        services: list,
        config_maps: list,
        budgets: list,
        monitors: list,
        pods: list,
    ) -> None:
        def cleanup(job: dict[str, Any]) -> bool:
            return (job["metadata"].get("labels") or {}).get(COMPONENT_LABEL) == CLEANUP_COMPONENT

        self.jobs = {j["metadata"]["name"]: j for j in jobs if not cleanup(j)}
        self.cleanups = {j["metadata"]["name"]: j for j in jobs if cleanup(j)}
        self.deployment = deployments[0] if deployments else None
        self.service = services[0] if services else None
        self.config_map = config_maps[0] if config_maps else None
        self.budget = budgets[0] if budgets else None
        self.monitor = monitors[0] if monitors else None
        self.pods = pods

    def pods_of_job(self, name: str | None) -> list[dict[str, Any]]:
        return [p for p in self.pods if (p["metadata"].get("labels") or {}).get(JOB_NAME_LABEL) == name]


@dataclass
class Scope:
    """What each step of one model's reconcile works with: the API, the model (and its body, the owner of what the
    step creates), the operator's settings and the model's children as observed."""

    api: Api
    body: kopf.Body | dict
    model: Model
    config: OperatorConfig
    children: Children
    # (kind, name) -> the paths of a child the API did not keep as set (status.fieldsNotKept): never repaired.
    not_kept: dict[tuple[str, str], list[str]] = field(default_factory=dict)


class Verbs(NamedTuple):
    """How the client creates, reads, replaces and deletes one kind: (namespace, body) / (name, namespace[, body])."""

    create: Callable[..., Any]
    read: Callable[..., Any]
    replace: Callable[..., Any]
    delete: Callable[..., Any]


class Api:
    """The few writes the operator makes, through the official client."""

    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        api_client = api_client or client.ApiClient()
        api_client.user_agent = USER_AGENT  # the operator's own requests stand out in audit logs
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.own = OwnWrites()
        self._serialize = api_client.sanitize_for_serialization
        self._verbs = {
            "Job": Verbs(
                self.batch.create_namespaced_job,
                self.batch.read_namespaced_job,
                self.batch.replace_namespaced_job,
                self.batch.delete_namespaced_job,
            ),
            "Deployment": Verbs(
                self.apps.create_namespaced_deployment,
                self.apps.read_namespaced_deployment,
                self.apps.replace_namespaced_deployment,
                self.apps.delete_namespaced_deployment,
            ),
            "Service": Verbs(
                self.core.create_namespaced_service,
                self.core.read_namespaced_service,
                self.core.replace_namespaced_service,
                self.core.delete_namespaced_service,
            ),
            "ConfigMap": Verbs(
                self.core.create_namespaced_config_map,
                self.core.read_namespaced_config_map,
                self.core.replace_namespaced_config_map,
                self.core.delete_namespaced_config_map,
            ),
        }

    def verbs(self, obj: dict[str, Any]) -> Verbs:
        if obj["kind"] in self._verbs:
            return self._verbs[obj["kind"]]
        # A PodDisruptionBudget and a ServiceMonitor (a custom resource) go through the generic client.
        group, version = obj["apiVersion"].split("/")
        custom, plural = self.custom, CUSTOM_PLURALS[obj["kind"]]
        return Verbs(
            lambda ns, body, **kw: custom.create_namespaced_custom_object(group, version, ns, plural, body, **kw),
            lambda name, ns, **kw: custom.get_namespaced_custom_object(group, version, ns, plural, name, **kw),
            lambda name, ns, body, **kw: custom.replace_namespaced_custom_object(
                group, version, ns, plural, name, body, **kw
            ),
            lambda name, ns, **kw: custom.delete_namespaced_custom_object(group, version, ns, plural, name, **kw),
        )

    def _wrote(self, result: Any) -> dict[str, Any]:
        """Remember the object as the API returned it, and hand it back as the reconcile reads objects."""
        obj = slim(self._serialize(result))
        self.own.wrote(obj)
        return obj

    def create(self, obj: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """The created object and True; the existing one and False when this model made it already (a restart, or
        the watch lagged longer than OwnWrites waits). ChildRefused when the API refuses it or the name is someone
        else's."""
        ns, kind, name = obj["metadata"]["namespace"], obj["kind"], obj["metadata"]["name"]
        verbs = self.verbs(obj)
        try:
            created = self._wrote(verbs.create(ns, obj, field_validation=STRICT, _request_timeout=REQUEST_TIMEOUT))
        except ValidationError as exc:
            raise _refusal(exc, "create", kind, name) from exc
        except ApiException as exc:
            if exc.status != 409:
                raise _refusal(exc, "create", kind, name) from exc
            existing = slim(self._serialize(verbs.read(name, ns, _request_timeout=REQUEST_TIMEOUT)))
            owners = obj["metadata"].get("ownerReferences") or []
            ours = (
                owned_by(existing, owners[0]["uid"])
                if owners
                else existing["metadata"]["labels"] == obj["metadata"]["labels"]
            )
            if not ours:
                raise _foreign(existing) from exc
            return existing, False
        log.info("created %s %s/%s", kind, ns, name)
        return created, True

    def replace(self, obj: dict[str, Any], why: str) -> dict[str, Any]:
        """PUT the whole object: a field the spec no longer sets (a nodeSelector, say) must go, not linger. Others'
        labels and annotations stay (ours win): read fresh, as the index may lag a change just made."""
        ns, kind, name = obj["metadata"]["namespace"], obj["kind"], obj["metadata"]["name"]
        verbs = self.verbs(obj)
        current = self._serialize(verbs.read(name, ns, _request_timeout=REQUEST_TIMEOUT))
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        meta["ownerReferences"] = current["metadata"].get("ownerReferences")
        for part in ("labels", "annotations"):
            meta[part] = {**(current["metadata"].get(part) or {}), **(meta.get(part) or {})}
        if kind in ("Service", *CUSTOM_PLURALS):  # the API updates these only at their resourceVersion
            meta["resourceVersion"] = current["metadata"]["resourceVersion"]
        if kind == "Service":  # and a Service's clusterIP never
            obj["spec"]["clusterIP"] = current["spec"].get("clusterIP")
        try:
            replaced = self._wrote(
                verbs.replace(name, ns, obj, field_validation=STRICT, _request_timeout=REQUEST_TIMEOUT)
            )
        except (ApiException, ValidationError) as exc:
            raise _refusal(exc, "update", kind, name) from exc
        log.info("updated %s %s/%s: %s", kind, ns, name, why)
        return replaced

    def scale_deployment(self, observed: dict[str, Any], replicas: int) -> dict[str, Any]:
        meta = observed["metadata"]
        patch = {"spec": {"replicas": replicas}}
        scaled = self._wrote(
            self.apps.patch_namespaced_deployment(
                meta["name"], meta["namespace"], patch, field_validation=STRICT, _request_timeout=REQUEST_TIMEOUT
            )
        )
        log.info("scaled Deployment %s/%s to %d", meta["namespace"], meta["name"], replicas)
        return scaled

    def delete(self, observed: dict[str, Any], why: str) -> None:
        meta, kind = observed["metadata"], observed["kind"]
        try:
            self.verbs(observed).delete(
                meta["name"], meta["namespace"], propagation_policy="Background", _request_timeout=REQUEST_TIMEOUT
            )
            log.info("deleted %s %s %s/%s", why, kind, meta["namespace"], meta["name"])
        except ApiException as exc:
            if exc.status != 404:
                raise
        self.own.wrote(observed, deleted=True)

    def failed_creations(self, obj: dict[str, Any]) -> list[dict[str, Any]]:
        """The FailedCreate Events a controller recorded on ``obj``: pods it could not create, and the refusal."""
        meta = obj["metadata"]
        response = self.core.list_namespaced_event(
            meta["namespace"],
            field_selector=f"involvedObject.uid={meta['uid']},reason=FailedCreate",
            _request_timeout=REQUEST_TIMEOUT,
            _preload_content=False,  # the API's JSON as it is: timestamps comparable with the indexes' pods
        )
        return json.loads(response.data)["items"]

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"status": status},
            field_validation=STRICT,
            _request_timeout=REQUEST_TIMEOUT,
        )
        self.own.wrote_status((namespace, model_label(name)), status)


def _apply(scope: Scope, desired: dict[str, Any], observed: dict[str, Any] | None) -> dict[str, Any]:
    """Create what is missing; replace what no longer holds what we set: the model's spec changed (the spec-hash
    annotation differs) or someone changed one of our fields (drift, told as an Event). Writes nothing otherwise.
    Returns the object as it now is, so the status written in the same reconcile already tells of it."""
    api, owner = scope.api, scope.body
    if observed is None:
        kopf.adopt(desired, owner=owner)  # owner reference: garbage collected with the model
        created, new = api.create(desired)
        return _kept(scope, desired, created) if new else created
    if not owned_by(observed, owner["metadata"]["uid"]):
        raise _foreign(observed)  # labelled like ours (a copied manifest), made by someone else
    if _spec_hash(observed) != _spec_hash(desired):
        return _kept(scope, desired, api.replace(desired, "the model's spec changed"))
    kind, name = desired["kind"], desired["metadata"]["name"]
    not_kept = scope.not_kept.get((kind, name)) or []
    drift = [path for path in drifted(_set_fields(desired), _set_fields(observed)) if path not in not_kept]
    if not drift:
        return observed
    repaired = _kept(scope, desired, api.replace(desired, f"changed outside the operator: {_listed(drift)}"))
    restored = [path for path in drift if path not in scope.not_kept.get((kind, name), [])]
    if restored:
        kopf.info(owner, reason="DriftRepaired", message=f"restored {kind} {name}: {_listed(restored)}")
    return repaired


def _kept(scope: Scope, desired: dict[str, Any], written: dict[str, Any]) -> dict[str, Any]:
    """Note the fields the API did not keep as we wrote them (a mutating webhook removed or changed them, or a
    feature gate drops them): telling them once, in a Warning and the status, and never writing them again for
    this spec, where repairing them would be a write at every reconcile, undone by the same hand each time."""
    kind, name = desired["kind"], desired["metadata"]["name"]
    lost = drifted(_set_fields(desired), _set_fields(written))
    if lost == (scope.not_kept.get((kind, name)) or []):
        return written
    if lost:
        scope.not_kept[(kind, name)] = lost
        kopf.warn(
            scope.body,
            reason="FieldsNotKept",
            message=f"the API did not keep {kind} {name}'s {_listed(lost)} as the operator wrote them (a mutating "
            "admission webhook, or a feature gate of the cluster, changed them): left as they are, not repaired",
        )
    else:
        scope.not_kept.pop((kind, name), None)
    return written


def _listed(paths: list[str]) -> str:
    return ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def _set_fields(obj: dict[str, Any]) -> dict[str, Any]:
    """The parts of a child the operator sets: its labels, annotations and spec (or a ConfigMap's data)."""
    meta = obj["metadata"]
    return {"metadata": {"labels": meta.get("labels"), "annotations": meta.get("annotations")}} | {
        part: obj.get(part) for part in ("spec", "data") if part in obj
    }


def _spec_hash(obj: dict[str, Any]) -> str | None:
    return (obj["metadata"].get("annotations") or {}).get(SPEC_HASH_ANNOTATION)


def retry_delay(retries: int) -> float:
    """Back-off before re-running a failed rewrite, as a kubelet backs off a crash-looping container."""
    return float(min(REWRITE_RETRY_SECONDS * 2**retries, MAX_REWRITE_RETRY_SECONDS))


def _failed_at(job: dict[str, Any]) -> datetime:
    failed = next(c for c in job["status"]["conditions"] if c.get("type") == "Failed")
    return _parse(failed.get("lastTransitionTime") or now())


def _only_counts_moved(status: dict[str, Any], previous: dict[str, Any]) -> bool:
    """Same phase, same conditions (type, status, reason), same fields: only pod counts, messages and the rewrite's
    report differ (its pod's event may trail the Job's by a moment: not worth a write of its own)."""

    def gist(value: dict[str, Any]) -> Any:
        kept = {k: value.get(k) for k in status if k not in ("replicas", "readyReplicas", "conditions", "rewrite")}
        rewrite = {k: v for k, v in (value.get("rewrite") or {}).items() if k not in REPORT_FIELDS}
        conditions = [(c.get("type"), c.get("status"), c.get("reason")) for c in value.get("conditions") or []]
        return without_none({**kept, "rewrite": rewrite, "conditions": conditions})

    return gist(status) == gist(previous)


def reconcile(body: kopf.Body | dict, children: Children, api: Api, config: OperatorConfig) -> float | None:
    """Returns in how many seconds to look again when nothing else will trigger it (a rewrite retry, a status
    write held back), or None. The caller serialises the reconciles of one model."""
    meta = body["metadata"]
    if meta.get("deletionTimestamp"):
        return None  # the garbage collector removes the children through their owner references
    model = Model.from_body(dict(body))
    key = (model.namespace, model_label(model.name))
    # Our own last write is newer than what the index may still show (the watch event of that write can lag).
    previous = api.own.status(key, dict(body.get("status") or {}))
    not_kept = {(c["kind"], c["name"]): list(c["fields"]) for c in previous.get("fieldsNotKept") or []}
    scope = Scope(api, body, model, config, children, not_kept)
    error: SpecError | None = None
    rewrite_id: str | None = None
    job = None
    retry = Retry()
    try:
        validate(model.spec, config)
    except SpecError as exc:
        error = exc
    published = False
    refused: ChildRefused | None = None
    incompatible: str | None = None
    if error is None:
        rewrite_id = model.rewrite_id()
        job = children.jobs.get(job_name(model.name, rewrite_id))
        last = previous.get("rewrite") or {}
        retry.count = int(last.get("retries") or 0) if last.get("id") == rewrite_id else 0
        # The status is the durable record that this rewrite completed: its Job is only a means, and may be gone
        # (a TTL, a clean-up script) without the rewrite running again.
        published = last.get("id") == rewrite_id and bool(last.get("publishedAt"))
        try:
            if job is None and not published and _cleaning(children):
                retry.wait = CLEANING_WAIT_SECONDS  # a new rewrite's directory would not be among those kept
            else:
                job = _run_rewrite(scope, job, published, retry)
            complete = published or job_outcome(job) == "Complete"
            pods = children.pods_of_job(_name(job))
            if complete and not published and not all(_terminal(p) for p in pods):
                # The pod's last event trails the Job's: its report, which says where the model can run, first.
                retry.wait = REPORT_WAIT_SECONDS
            else:
                target = _reported(previous, rewrite_id, complete, pods).get("target")
                # Before any serving pod: the node's runtime would refuse the model, after the node group scaled up.
                incompatible = incompatible_target(model.spec, target) if complete else None
                if incompatible is None:
                    _serve(scope, rewrite_id, complete)
        except ChildRefused as exc:
            refused = exc
    job_pods = children.pods_of_job(_name(job))
    serving_pods = [
        p for p in children.pods if (p["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "serving"
    ]
    observed = Observed(job, job_pods, children.deployment, serving_pods, children.service, published)
    if refused is not None:
        observed.refused = (refused.reason, str(refused))
    elif incompatible is not None:
        observed.refused = ("IncompatibleTarget", incompatible)
    observed.job_refused, recheck = _creation_refusal(api, job, job_pods)
    status = compute_status(model, meta.get("generation", 1), rewrite_id, error, observed, previous, now(), retry)
    metrics.MODEL_PHASES.set(key, status["phase"])
    _warn_placement(body, model, config, status, previous)
    status["store"] = previous.get("store")
    status["fieldsNotKept"] = [
        {"kind": kind, "name": name, "fields": fields} for (kind, name), fields in sorted(scope.not_kept.items())
    ] or None
    if status["phase"] == "Ready" and rewrite_id is not None:
        # Only once the new rewrite serves in full: until then a revert must find the old rewrite's Job complete,
        # and a pod of the old rollout restarting must find the batching file it mounts.
        for name in children.jobs.keys() - {job_name(model.name, rewrite_id)}:
            api.delete(children.jobs[name], "superseded")
        if children.config_map is not None and batching_config_map(model) is None:
            api.delete(children.config_map, "unused")
        # Ready: the rewrite's Job is complete, so the clean-up's is the only one that may wait for its pod.
        status["store"], recheck = _tend_store(scope, rewrite_id, previous.get("store") or {}, retry)
    requeue = _write_status(api, body, model, status, previous, retry)
    if refused is not None:
        raise refused  # told in the status; the caller retries with a growing back-off
    return min((r for r in (requeue, recheck) if r is not None), default=None)


def _terminal(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def _name(obj: dict[str, Any] | None) -> str | None:
    return (obj or {}).get("metadata", {}).get("name")


def _reported(
    previous: dict[str, Any], rewrite_id: str | None, complete: bool, pods: list[dict[str, Any]]
) -> dict[str, Any]:
    """What the complete rewrite reported (status.rewrite's facts), before the status is computed."""
    return rewrite_facts(previous, rewrite_id, "Complete" if complete else "Running", pods, now())


def _warn_placement(
    body: kopf.Body | dict, model: Model, config: OperatorConfig, status: dict[str, Any], previous: dict[str, Any]
) -> None:
    """Tell, once per rewrite and per spec, where the model's pods may land on nodes or in an image that cannot run
    what it was compiled for (the refusals that are certain stop it before serving: incompatible_target)."""
    rewrite, before = status.get("rewrite") or {}, previous.get("rewrite") or {}
    if not rewrite.get("publishedAt"):
        return
    told = before.get("id") == rewrite.get("id") and before.get("publishedAt")
    if told and previous.get("observedGeneration") == status.get("observedGeneration"):
        return
    unpinned = unpinned_warning(model.spec, rewrite.get("target"))
    if unpinned is not None:
        kopf.warn(body, reason="TargetNotPinned", message=unpinned)
    image = model.serving.get("image") or config.serving_image
    mismatch = image_warning(image, rewrite.get("target"), rewrite.get("compiler"))
    if mismatch is not None:
        kopf.warn(body, reason="ServingImageMismatch", message=mismatch)


def _creation_refusal(
    api: Api, job: dict[str, Any] | None, pods: list[dict[str, Any]]
) -> tuple[str | None, float | None]:
    """Why the Job's controller cannot create its pod (None: it is not refused, or not yet known), and in how many
    seconds to ask again (None: no need, see MAX_CREATION_RECHECK_SECONDS)."""
    if job is None or not job_waits_for_pod(job, pods):
        return None, None
    refused = creation_refused(api.failed_creations(job), pods)
    if refused is not None:
        return refused, None
    stamps = [p["metadata"].get("creationTimestamp") for p in pods] + [job["status"]["startTime"]]
    waited = (datetime.now(timezone.utc) - max(_parse(stamp) for stamp in stamps if stamp)).total_seconds()
    return None, min(max(waited, 1.0), MAX_CREATION_RECHECK_SECONDS)


def _parse(stamp: str) -> datetime:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def _tend_store(
    scope: Scope, rewrite_id: str, store: dict[str, Any], retry: Retry
) -> tuple[dict[str, Any], float | None]:
    """Record the rewrite that now serves in full, and remove from the store what nothing serves or will serve: a
    clean-up Job keeps it and the last ``retainRewrites`` served before it. Returns status.store, and in how many
    seconds to ask again why the clean-up Job has no pod (see MAX_CREATION_RECHECK_SECONDS)."""
    api, body, model, children = scope.api, scope.body, scope.model, scope.children
    served_before = [i for i in store.get("served") or [] if i != rewrite_id]
    retain = int((model.spec.get("store") or {}).get("retainRewrites", 1))
    store = {**store, "served": [rewrite_id, *served_before][: retain + 1]}
    name = cleanup_job_name(model.name, rewrite_id)
    for stale in children.cleanups.keys() - {name}:
        api.delete(children.cleanups[stale], "finished")  # of an earlier rewrite, or of a deleted namesake
    # Nothing to remove from a model's first rewrite, unless a failed attempt left a staging directory behind. A
    # clean-up Job already made is tended even so: at retainRewrites 0, status.store.served no longer names the rest.
    if store.get("cleanedFor") == rewrite_id or not (served_before or retry.count or name in children.cleanups):
        return store, None
    job = children.cleanups.get(name)
    if job is None:
        job = _apply(scope, store_cleanup_job(model, scope.config, store["served"], rewrite_id), None)
    outcome = job_outcome(job)
    if outcome == "Running":
        # A refusal of its pod is told as the clean-up's error until the pod is created (then as it ends).
        refused, recheck = _creation_refusal(api, job, children.pods_of_job(name))
        told = f"store clean-up Job {name}: "
        if refused is not None:
            return store | {"error": told + refused}, recheck
        if (store.get("error") or "").startswith(told):
            store = store | {"error": None}
        return store, recheck
    removed, freed, error = _cleanup_outcome(job, children)
    store |= {"cleanedFor": rewrite_id, "cleanedAt": now(), "removed": removed, "bytesFreed": freed, "error": error}
    if error is None:
        kept = ", ".join(store["served"])
        message = f"removed {removed} superseded rewrite(s) from the store, freeing {_size(freed or 0)}; kept {kept}"
        kopf.info(body, reason="StoreCleaned", message=message)
    else:  # told, and tried again with the next rewrite: a store that cannot be cleaned must not hold serving up
        kopf.warn(body, reason="StoreCleanupFailed", message=error)
    api.delete(job, "finished")
    return store, None


def _cleanup_outcome(job: dict[str, Any], children: Children) -> tuple[int | None, int | None, str | None]:
    """What a finished clean-up Job did, from its report (termination message): (rewrites removed, bytes freed,
    None), or (None, None, why it failed)."""
    pods = children.pods_of_job(job["metadata"]["name"])
    if job_outcome(job) != "Complete":
        return None, None, failure_message(job, pods)
    report = rewrite_report(pods)
    return len(report.get("removed") or []), int(report.get("bytesFreed") or 0), None


def _cleaning(children: Children) -> bool:
    """A clean-up Job of the model's store directory runs (or its pod still stops): this model's, or a deleted
    namesake's. It removes what it was not told to keep, so no rewrite may start writing there meanwhile."""
    running = any(job_outcome(job) == "Running" for job in children.cleanups.values())
    return running or any(
        (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
        for name in children.cleanups
        for p in children.pods_of_job(name)
    )


def clean_up_deleted(body: kopf.Body | dict, api: Api, config: OperatorConfig, others: list[dict[str, Any]]) -> None:
    """A deleted model's rewrites go with it, by a clean-up Job no model owns (it removes itself after an hour),
    unless another model of the namespace uses the same store directory."""
    model = Model.from_body(dict(body))
    if not ((body.get("status") or {}).get("rewrite") or {}).get("id"):
        return  # it never wrote anything
    where = (model.spec["store"]["claimName"], model.store_path)
    sharing = [o for o in map(Model.from_body, others) if (o.spec["store"]["claimName"], o.store_path) == where]
    if sharing:
        log.info(
            "store of deleted model %s/%s kept: %s uses the same directory",
            model.namespace,
            model.name,
            sharing[0].name,
        )
        return
    api.create(store_cleanup_job(model, config, [], None))  # no status to tell a field not kept in


def finish_deleted_cleanups(api: Api, children: Children) -> None:
    """The clean-up Jobs of models that are gone: their outcome logged and told on the Job, then removed."""
    for job in children.cleanups.values():
        meta = job["metadata"]
        if not meta["name"].endswith(DELETED_CLEANUP_SUFFIX) or job_outcome(job) == "Running":
            continue
        removed, freed, error = _cleanup_outcome(job, children)
        if error is None:
            message = (
                f"removed {removed} rewrite(s) of a deleted NeuronModel from the store, freeing {_size(freed or 0)}"
            )
            kopf.info(job, reason="StoreCleaned", message=message)
        else:
            message = f"store clean-up of a deleted NeuronModel failed: {error}"
            kopf.warn(job, reason="StoreCleanupFailed", message=message)
        log.info("job %s/%s: %s", meta["namespace"], meta["name"], message)
        api.delete(job, "finished")


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} bytes"
    value, unit = next((count / 1024**i, u) for i, u in ((3, "GiB"), (2, "MiB"), (1, "KiB")) if count >= 1024**i)
    return f"{value:.1f} {unit}"


def _run_rewrite(scope: Scope, job: dict[str, Any] | None, published: bool, retry: Retry) -> dict[str, Any] | None:
    """Create the rewrite's Job unless it is published; run a failed one again when due. Returns the Job."""
    desired = rewrite_job(scope.model, scope.config)
    if job is None and not published:
        return _apply(scope, desired, None)
    if job is not None and job_outcome(job) == "Failed":
        # The source may be repaired or uploaded in place: run the rewrite again after a growing back-off; at once
        # when the Job itself was changed (its securityContext, say): that may well be the fix.
        due = _failed_at(job) + timedelta(seconds=retry_delay(retry.count))
        retry.wait = (due - datetime.now(timezone.utc)).total_seconds()
        retry.at = due.strftime("%Y-%m-%dT%H:%M:%SZ")
        if retry.wait <= 0 or _spec_hash(job) != _spec_hash(desired):
            scope.api.delete(job, "failed")  # recreated by the next reconcile, under the same name
            retry.count += 1
            retry.wait = None
    return job


def _serve(scope: Scope, rewrite_id: str, complete: bool) -> None:
    """Serve the rewrite once complete; until then the pods keep serving the old one, at the spec's replica count."""
    api, model, config, children = scope.api, scope.model, scope.config, scope.children
    served = children.deployment
    if complete:
        config_map = batching_config_map(model)
        if config_map is not None:  # before the Deployment whose pods mount it
            _apply(scope, config_map, children.config_map)
        children.deployment = _apply(scope, serving_deployment(model, config, rewrite_id), served)
    elif served is not None and served["spec"].get("replicas") != model.spec.get("replicas", 1):
        children.deployment = api.scale_deployment(served, model.spec.get("replicas", 1))
    if served is not None or complete:
        children.service = _apply(scope, serving_service(model), children.service)
        children.budget = _apply_optional(scope, disruption_budget(model, config), children.budget)
        children.monitor = _apply_optional(scope, service_monitor(model, config), children.monitor)


def _apply_optional(
    scope: Scope, desired: dict[str, Any] | None, observed: dict[str, Any] | None
) -> dict[str, Any] | None:
    """A child the spec may not call for (a budget at one replica, metrics turned off): removed when it does not."""
    if desired is not None:
        return _apply(scope, desired, observed)
    if observed is not None:
        scope.api.delete(observed, "unneeded")
        scope.not_kept.pop((observed["kind"], observed["metadata"]["name"]), None)
    return None


def _observe_rewrite(rewrite: dict[str, Any], before: dict[str, Any]) -> None:
    """A rewrite's duration, once: when its report first reaches the status (written, not held back)."""
    told = before.get("id") == rewrite.get("id") and before.get("durationSeconds") is not None
    if rewrite.get("durationSeconds") is not None and not rewrite.get("reused") and not told:
        metrics.REWRITE_SECONDS.observe(float(rewrite["durationSeconds"]))


def _write_status(
    api: Api, body: kopf.Body | dict, model: Model, status: dict[str, Any], previous: dict[str, Any], retry: Retry
) -> float | None:
    """Write the status when it changed (counts held back a little), with an Event when the step changed."""
    key = (model.namespace, model_label(model.name))
    if without_none(status) == without_none({k: previous.get(k) for k in status}):
        return retry.wait
    since = api.own.seconds_since_status(key)
    if since is not None and since < COUNTS_INTERVAL_SECONDS and _only_counts_moved(status, previous):
        hold = COUNTS_INTERVAL_SECONDS - since
        return hold if retry.wait is None else min(hold, retry.wait)
    api.patch_status(model.namespace, model.name, status)
    _observe_rewrite(status.get("rewrite") or {}, previous.get("rewrite") or {})
    ready = status["conditions"][-1]
    before = {c.get("type"): c for c in previous.get("conditions") or []}.get("Ready") or {}
    if (status["phase"], ready["reason"]) == (previous.get("phase"), before.get("reason")):
        return retry.wait
    log.info(
        "model %s/%s phase %s -> %s: %s",
        model.namespace,
        model.name,
        previous.get("phase"),
        status["phase"],
        ready["message"],
    )
    # An Event for every step, bar a new model's first one into work: its creation is that step's own record.
    warning = status["phase"] in ("Failed", "Degraded", "Pending")
    if previous.get("phase") is not None or warning:
        (kopf.warn if warning else kopf.info)(
            body, reason=ready["reason"], message=f"{status['phase']}: {ready['message']}"
        )
    return retry.wait
