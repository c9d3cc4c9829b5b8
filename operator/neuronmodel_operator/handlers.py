"""Kopf handlers: keep in-memory indexes of NeuronModels and their children, and reconcile on every change.

Every handler is an event handler: it stores nothing on the objects (no progress annotations, no finalizer), so
the only API writes are the children and the status the reconcile decides on, and deleting a model never waits
for the operator.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
from typing import Any

import kopf
import kubernetes
import urllib3
from kubernetes.client.rest import ApiException

from . import metrics
from .config import OperatorConfig
from .crd import stale_crd_message
from .naming import GROUP, MANAGED_BY, MANAGED_BY_LABEL, MODEL_LABEL, model_label
from .own_writes import ModelKey, slim
from .peering import Peering
from .reconcile import (
    REQUEST_TIMEOUT,
    VERSION,
    Api,
    ChildRefused,
    Children,
    api_message,
    clean_up_deleted,
    finish_deleted_cleanups,
    reconcile,
)
from .scheduling import KeyedLocks, Timers

OWNED = {MANAGED_BY_LABEL: MANAGED_BY}
REQUIRED_GROUPS = {GROUP, "apps", "batch", "policy"}
MONITORING_GROUP = "monitoring.coreos.com"  # the Prometheus operator's: ServiceMonitors where it is installed
RETRY_SECONDS, MAX_RETRY_SECONDS = 2, 60
log = logging.getLogger("neuronmodel_operator")
_state: dict[str, Any] = {}
_timers = Timers()
# Reconciles of one model are serialised (child events arrive on several watch streams at once), and each reads
# the indexes only once it holds the lock: a reconcile that waited must see what the one before it did.
_locks = KeyedLocks()


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, logger: logging.Logger, **_: Any) -> None:
    settings.posting.level = logging.INFO
    settings.posting.reporting_component = "neuronmodel-operator"  # `From` in kubectl describe, not "kopf"
    settings.watching.server_timeout = 300
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    served = _wait_for_api_groups()
    stale = stale_crd_message()
    if stale is not None:
        raise kopf.TemporaryError(stale, delay=10)  # not ready (the chart's probe fails) until the CRD is applied
    _state["config"] = dataclasses.replace(OperatorConfig.from_env(), service_monitors=MONITORING_GROUP in served)
    _state["peering"] = Peering.of(settings)
    if _state["config"].metrics_port and "metrics" not in _state:
        metrics.serve(_state["config"].metrics_port)
        _state["metrics"] = True
        logger.info("metrics served on port %d at /metrics", _state["config"].metrics_port)
    _state["api"] = Api()
    logger.info("operator configured: rewrite image default %r", _state["config"].rewrite_image or "(none)")


def _wait_for_api_groups() -> dict[str, str]:
    """Kopf resolves the watched resources once, at start: if the apiserver is restarting or the CRD is not
    installed yet, it would serve nothing and say nothing. So start only once the API serves them all. Returns
    each group's preferred group/version."""
    try:
        groups = kubernetes.client.ApisApi().get_api_versions(_request_timeout=REQUEST_TIMEOUT).groups
        served = {group.name: group.preferred_version.group_version for group in groups}
    except (ApiException, OSError, urllib3.exceptions.HTTPError) as exc:
        raise kopf.TemporaryError(f"the Kubernetes API is not reachable yet: {exc}", delay=2) from exc
    missing = sorted(REQUIRED_GROUPS - served.keys())
    if missing:
        hint = " (is the NeuronModel CRD installed?)" if GROUP in missing else ""
        raise kopf.TemporaryError(f"the API does not serve {', '.join(missing)} yet{hint}", delay=2)
    return served


@kopf.on.probe(id="indexes")
def probe(**_: Any) -> bool:
    return "api" in _state


# Indexes: (namespace, model label) -> bodies -------------------------------------------------------------------


@kopf.index(GROUP, VERSION, "neuronmodels")
def models_index(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, model_label(name)): slim(body)}


def _child_key(namespace: str, labels: kopf.Labels) -> ModelKey:
    return (namespace, labels.get(MODEL_LABEL, ""))


@kopf.index("batch", "v1", "jobs", labels=OWNED)
def jobs_index(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    return {_child_key(namespace, labels): slim(body)}


@kopf.index("apps", "v1", "deployments", labels=OWNED)
def deployments_index(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    return {_child_key(namespace, labels): slim(body)}


@kopf.index("v1", "services", labels=OWNED)
def services_index(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    return {_child_key(namespace, labels): slim(body)}


@kopf.index("v1", "configmaps", labels=OWNED)
def configmaps_index(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    return {_child_key(namespace, labels): slim(body)}


@kopf.index("policy", "v1", "poddisruptionbudgets", labels=OWNED)
def budgets_index(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    return {_child_key(namespace, labels): slim(body)}


@kopf.index(MONITORING_GROUP, "servicemonitors", labels=OWNED)  # served only where the CRD is installed
def monitors_index(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    return {_child_key(namespace, labels): slim(body)}


@kopf.index("v1", "pods", labels=OWNED)
def pods_index(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    return {_child_key(namespace, labels): slim(body)}


# Reconcile triggers ---------------------------------------------------------------------------------------------


def _reconcile_key(key: ModelKey, indexes: dict[str, kopf.Index], attempt: int = 0, timed: bool = False) -> None:
    """``timed``: called by a timer, not by Kopf, so Kopf may have paused this replica since."""
    if "api" not in _state:
        return
    api: Api = _state["api"]
    with _locks.hold(key):
        models = list(indexes["models_index"].get(key, []))

        def of(index: str, kind: str) -> list:
            return api.own.children(key, kind, list(indexes[index].get(key, [])))

        children = Children(
            of("jobs_index", "Job"),
            of("deployments_index", "Deployment"),
            of("services_index", "Service"),
            of("configmaps_index", "ConfigMap"),
            of("budgets_index", "PodDisruptionBudget"),
            of("monitors_index", "ServiceMonitor"),
            list(indexes["pods_index"].get(key, [])),
        )
        try:
            if timed and _outranked(key, api):
                return  # Kopf lists every object again when it resumes this replica: nothing is lost
            if not models:
                finish_deleted_cleanups(api, children)
                return
            requeue = reconcile(models[0], children, api, _state["config"])
            metrics.RECONCILES.inc()
        except (ApiException, OSError, urllib3.exceptions.HTTPError, ChildRefused) as exc:
            metrics.RECONCILE_ERRORS.labels(reason=_error_reason(exc)).inc()
            # Temporary (the API unreachable, a conflict), or a child refused (told in the status; a quota may be
            # raised, a foreign object removed): event handlers are not retried by Kopf, and no finalizer should
            # hold a model for a timer, so retry here. A spec that cannot work is reported in the status, and
            # retried when the spec changes.
            delay = min(RETRY_SECONDS * 2**attempt, MAX_RETRY_SECONDS)
            log.warning("reconcile of %s/%s failed (%s); retrying in %d s", key[0], key[1], _one_line(exc), delay)
            _later(delay, key, indexes, attempt + 1)
            return
    if requeue is not None:
        _later(requeue, key, indexes)


def _error_reason(exc: Exception) -> str:
    if isinstance(exc, ChildRefused):
        return exc.reason
    return "ApiError" if isinstance(exc, ApiException) else "Unreachable"


def _one_line(exc: Exception) -> str:
    return f"{exc.status} {api_message(exc)}" if isinstance(exc, ApiException) else " ".join(str(exc).split())


def _later(delay: float, key: ModelKey, indexes: dict[str, kopf.Index], attempt: int = 0) -> None:
    """One pending timer per model: a newer request replaces the older one."""
    # In a copy of the handler's context: Kopf's event posting (kopf.info/warn) reads its settings from it.
    context = contextvars.copy_context()
    _timers.later(key, delay, context.run, _reconcile_key, key, indexes, attempt, True)


def _outranked(key: ModelKey, api: Api) -> bool:
    peering: Peering | None = _state["peering"]
    peers = peering.outranked_in(key[0], api.custom, REQUEST_TIMEOUT) if peering else []
    if peering and peers:
        log.info("standing by for %s/%s: peering %s shows %s of higher or equal priority", *key, peering.name, peers[0])
    return bool(peers)


@kopf.on.event(GROUP, VERSION, "neuronmodels")
def model_changed(type: str, namespace: str, name: str, **kwargs: Any) -> None:
    key = (namespace, model_label(name))
    if type != "DELETED":
        _reconcile_key(key, kwargs)
        return
    # Gone: nothing of it stays in memory (its children go with it, through their owner references; its lock
    # with its last user).
    _timers.cancel(key)
    metrics.MODEL_PHASES.forget(key)
    if "api" not in _state:
        return
    _state["api"].own.forget(key)
    others = [
        m
        for (ns, _), bodies in kwargs["models_index"].items()
        if ns == namespace
        for m in bodies
        if m["metadata"]["name"] != name  # the index may still hold the deleted model
    ]
    try:
        clean_up_deleted(kwargs["body"], _state["api"], _state["config"], others)
    except (ApiException, OSError, urllib3.exceptions.HTTPError, ChildRefused) as exc:
        log.warning("store clean-up of deleted model %s/%s not started: %s", namespace, name, _one_line(exc))


@kopf.on.event("batch", "v1", "jobs", labels=OWNED)
@kopf.on.event("apps", "v1", "deployments", labels=OWNED)
@kopf.on.event("v1", "configmaps", labels=OWNED)
@kopf.on.event("v1", "services", labels=OWNED)
@kopf.on.event("policy", "poddisruptionbudgets", labels=OWNED)
@kopf.on.event(MONITORING_GROUP, "servicemonitors", labels=OWNED)
@kopf.on.event("v1", "pods", labels=OWNED)
def child_changed(namespace: str, labels: kopf.Labels, **kwargs: Any) -> None:
    _reconcile_key(_child_key(namespace, labels), kwargs)
