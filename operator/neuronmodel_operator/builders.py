"""Pure functions from a NeuronModel to the objects it needs, as plain dicts. No API calls here."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

from neuron_rewrite import FORMAT_VERSION, InvalidModelError, NotReplicableError, OutputError, UsageError

from .config import OperatorConfig
from .instances import cores_per_pod
from .naming import (
    SPEC_HASH_ANNOTATION,
    bounded,
    cleanup_job_name,
    digest,
    job_name,
    labels,
    selector,
    serving_name,
)

NEURONCORE = "aws.amazon.com/neuroncore"
REWRITE_ANNOTATION = "serving.neuron.dev/rewrite"
VERSION_ANNOTATION = "serving.neuron.dev/version"
CORES_ANNOTATION = "serving.neuron.dev/cores"
BATCHING_ANNOTATION = "serving.neuron.dev/batching"
# TF Serving reads its Prometheus settings from a file: the pod carries them in this annotation, and a downwardAPI
# volume makes the file of it. No object of its own (a ConfigMap would cost every model a write and a watch event).
MONITORING_ANNOTATION = "serving.neuron.dev/monitoring-config"
MONITORING_DIR = "/etc/tfserving/monitoring"
METRICS_PATH = "/monitoring/prometheus/metrics"  # TF Serving's default
NONROOT = 65532
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": NONROOT,
    "runAsGroup": NONROOT,
    "fsGroup": NONROOT,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}
DEFAULT_STRATEGY = {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
SOURCE_DIR, STORE_DIR, MODELS_DIR = "/source", "/store", "/models"
STORE_MOUNT = {"name": "store", "mountPath": STORE_DIR}
BATCHING_FILE = "/etc/tfserving/batching.config"
# The serving pod template's own volumes, mount paths and server container: a spec's additions must not clash.
SERVING_VOLUMES = ("models", "tmp", "batching", "monitoring")
SERVING_MOUNT_PATHS = (MODELS_DIR, "/tmp", "/etc/tfserving")
SERVER_CONTAINER = "tfserving"
TERMINATION_LOG = "/dev/termination-log"  # the container's termination message: the rewrite's report
# The Jobs write nothing on the node: every source is read in place or unpacked beside the output in the store, and
# the root filesystem is read-only. Their node disk is their log and termination message, declared so the scheduler
# counts it and the kubelet evicts a runaway instead of letting it fill the node.
NODE_DISK = {"requests": {"ephemeral-storage": "16Mi"}, "limits": {"ephemeral-storage": "64Mi"}}
REWRITE_RESOURCES = {
    "requests": {"cpu": "250m", "memory": "128Mi", **NODE_DISK["requests"]},
    "limits": {"memory": "512Mi", **NODE_DISK["limits"]},
}
CLEANUP_RESOURCES = {
    "requests": {"cpu": "50m", "memory": "64Mi", **NODE_DISK["requests"]},
    "limits": {"memory": "128Mi", **NODE_DISK["limits"]},
}
# A new serving pod shows no progress to the Deployment controller until it is available: scheduling, the pull of a
# multi-GiB Neuron image and the model's load (up to the startup timeout) all come first. The progress deadline is
# the startup timeout plus this margin, so a healthy load is never reported ProgressDeadlineExceeded.
PROGRESS_MARGIN_SECONDS = 300
S3_REGION_ENV = ("AWS_DEFAULT_REGION", "AWS_REGION")
S3_ENDPOINT_ENV = "AWS_ENDPOINT_URL_S3"
S3_ENV = [*S3_REGION_ENV, S3_ENDPOINT_ENV]  # set from spec.source.s3 only: spec.rewrite.env may not name them
CLEANUP_COMPONENT = "store-cleanup"  # the component label of the store clean-up Jobs
# How a stopping serving pod drains. A terminating pod leaves the Service's endpoints, then kube-proxy's rules, within
# ROUTING_SECONDS; but a gRPC client keeps its one HTTP/2 connection for as long as the connection lives, and kube-proxy
# never cuts an established one, so routing alone drains no gRPC client. The server's own gRPC core ends each
# connection at CONNECTION_AGE_MS (+10% jitter) with a GOAWAY, which clients follow by reconnecting (through the
# Service, to a pod that is not stopping) while the calls in flight get CONNECTION_GRACE_MS to finish. TF Serving
# exits at SIGTERM without a GOAWAY of its own, so the kubelet holds the SIGTERM back (preStop sleep) until the last
# connection opened before routing changed has been ended.
ROUTING_SECONDS = 5
CONNECTION_AGE_MS = 5000
CONNECTION_GRACE_MS = 5000
DRAIN_SECONDS = ROUTING_SECONDS + math.ceil((1.1 * CONNECTION_AGE_MS + CONNECTION_GRACE_MS) / 1000)  # 16
GRPC_CHANNEL_ARGUMENTS = (
    f"grpc.max_connection_age_ms={CONNECTION_AGE_MS},grpc.max_connection_age_grace_ms={CONNECTION_GRACE_MS}"
)
# The exit codes by which tf-neuron-auto-multicore refuses the model or its arguments (neuron_rewrite.errors;
# archive and S3 refusals are InvalidModelError): running it again cannot help, so they fail the Job at once.
# Exit code 1 (an I/O failure, a broken transfer) may pass, and counts against backoffLimit.
REWRITE_REFUSALS = sorted(e.exit_code for e in (UsageError, InvalidModelError, NotReplicableError, OutputError))
CLEANUP_REFUSALS = [UsageError.exit_code]  # neuron-store-clean's bad arguments; 1 is an I/O failure


@dataclass(frozen=True)
class Model:
    """The facts of one NeuronModel every builder needs, with defaults applied."""

    name: str
    namespace: str
    uid: str
    spec: dict[str, Any]

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Model:
        meta = body["metadata"]
        return cls(meta["name"], meta["namespace"], meta.get("uid", ""), body.get("spec") or {})

    @property
    def model_name(self) -> str:
        return (self.spec.get("model") or {}).get("name") or self.name

    @property
    def version(self) -> int:
        return int((self.spec.get("model") or {}).get("version") or 1)

    @property
    def serving(self) -> dict[str, Any]:
        return self.spec.get("serving") or {}

    @property
    def source_version(self) -> int | None:
        """The version folder of a base-path source to serve; None: the newest, or the source is a SavedModel."""
        return self.spec["source"].get("version")

    @property
    def rewrite(self) -> dict[str, Any]:
        return self.spec.get("rewrite") or {}

    @property
    def cores(self) -> int:
        """NeuronCores per pod, "auto" resolved (validation has refused a spec where it cannot be)."""
        return cores_per_pod(self.spec)

    @property
    def store_path(self) -> str:
        return (self.spec.get("store") or {}).get("path") or f"{self.namespace}/{self.name}"

    def rewrite_image(self, config: OperatorConfig) -> str:
        return self.rewrite.get("image") or config.rewrite_image

    def rewrite_id(self) -> str:
        """Identity of the rewrite: what decides its output bytes and where it lands, and nothing else. Not the
        rewrite image: an operator upgrade re-runs rewrites only when the output format changes (FORMAT_VERSION)."""
        store = [self.spec["store"]["claimName"], self.store_path]
        return digest([self.spec["source"], self.cores, self.version, FORMAT_VERSION, store])

    def rewrite_path(self, rewrite_id: str) -> str:
        """Directory in the store whose only child is the version folder TF Serving loads."""
        return f"{self.store_path}/{rewrite_id}"


def _with_hash(obj: dict[str, Any]) -> dict[str, Any]:
    """Stamp the object with a hash of what we asked for, so an update is needed exactly when the hash differs."""
    obj["metadata"].setdefault("annotations", {})[SPEC_HASH_ANNOTATION] = digest(obj.get("spec", obj.get("data")))
    return obj


def _pull_secrets(spec: dict[str, Any]) -> dict[str, Any]:
    return {"imagePullSecrets": spec["imagePullSecrets"]} if spec.get("imagePullSecrets") else {}


def _service_account(spec: dict[str, Any]) -> dict[str, Any]:
    return {"serviceAccountName": spec["serviceAccountName"]} if spec.get("serviceAccountName") else {}


def _over(default: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    """The spec's fields over the operator's defaults, one level deep (a securityContext, resource amounts)."""
    merged = copy.deepcopy(default)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **copy.deepcopy(value)}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _serving_metadata(model: Model) -> dict[str, Any]:
    """Name, namespace and labels of the objects around the serving pods: Deployment, Service, budget, monitor."""
    return {"name": serving_name(model.name), "namespace": model.namespace, "labels": labels(model.name, "serving")}


def _placement(spec: dict[str, Any]) -> dict[str, Any]:
    return {key: spec[key] for key in ("nodeSelector", "tolerations", "affinity") if spec.get(key)}


def rewrite_job(model: Model, config: OperatorConfig) -> dict[str, Any]:
    """The Job that writes the model tagged for numCores into the store, as version ``model.version``."""
    spec = model.spec
    rewrite = model.rewrite
    rewrite_id = model.rewrite_id()
    image = model.rewrite_image(config)
    source = spec["source"]
    volumes: list[dict[str, Any]] = []  # the store's is _store_job's
    env: list[dict[str, Any]] = list(rewrite.get("env") or [])  # never one of S3_ENV (the CRD's rule)
    mounts = [
        # The whole claim: the kubelet creates a missing subPath directory as root, which the Job (non-root)
        # could not write into on a hostPath, NFS or static EFS volume. The rewrite creates the directories.
        dict(STORE_MOUNT),
    ]
    if "pvc" in source:
        volumes.append(
            {"name": "source", "persistentVolumeClaim": {"claimName": source["pvc"]["claimName"], "readOnly": True}}
        )
        mounts.insert(0, {"name": "source", "mountPath": SOURCE_DIR, "readOnly": True})
        model_dir = "/".join(p for p in (SOURCE_DIR, source["pvc"].get("path", "")) if p)
    elif "s3" in source:
        # Read in place by the rewrite, straight into the store: no scratch volume.
        model_dir = source["s3"]["uri"]
        if source["s3"].get("region"):
            # botocore reads AWS_DEFAULT_REGION, not AWS_REGION; set both, since both win over what EKS's pod
            # identity webhook would inject (the cluster's region).
            env += [{"name": n, "value": source["s3"]["region"]} for n in S3_REGION_ENV]
        if source["s3"].get("endpointUrl"):
            env.append({"name": S3_ENDPOINT_ENV, "value": source["s3"]["endpointUrl"]})
    else:
        # Unpacked by the rewrite as it downloads, beside its output in the store: no scratch volume either.
        model_dir = source["http"]["url"]
    container = {
        "name": "rewrite",
        "image": image,
        "command": [
            "tf-neuron-auto-multicore",
            model_dir,
            "--num_cores",
            str(model.cores),
            "--new_model_dir",
            f"{STORE_DIR}/{model.rewrite_path(rewrite_id)}/{model.version}",
            # One SavedModel, published where TF Serving loads it, even from a base path with version folders.
            "--select_version",
            "latest" if model.source_version is None else str(model.source_version),
            # Published once: a Job run again (deleted, retried) re-uses a complete output and never rewrites it.
            "--rewrite_id",
            rewrite_id,
            "--report_file",
            TERMINATION_LOG,
            "--fsync",
        ],
        "env": env,
        "volumeMounts": mounts,
        "securityContext": CONTAINER_SECURITY,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        # The rewrite streams the model: its memory does not grow with the model's size.
        "resources": _over(REWRITE_RESOURCES, rewrite.get("resources")),
    }
    pod_labels = labels(model.name, "rewrite") | {"serving.neuron.dev/rewrite": rewrite_id}
    job = _store_job(model, job_name(model.name, rewrite_id), pod_labels, [container], volumes, REWRITE_REFUSALS)
    job["spec"]["backoffLimit"] = rewrite.get("backoffLimit", 2)
    job["spec"]["activeDeadlineSeconds"] = rewrite.get("activeDeadlineSeconds", 1800)
    return _with_hash(job)


def _failure_policy(container: str, refusals: list[int]) -> dict[str, Any]:
    """The Job fails at once when ``container`` exits with one of its ``refusals``; a pod stopped from outside
    (eviction, node drain, preemption: the DisruptionTarget condition) is replaced without counting as a failure."""
    return {
        "rules": [
            {"action": "FailJob", "onExitCodes": {"containerName": container, "operator": "In", "values": refusals}},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        ]
    }


def _store_job(
    model: Model,
    name: str,
    pod_labels: dict[str, str],
    containers: list[dict],
    volumes: list[dict],
    refusals: list[int],
) -> dict[str, Any]:
    """A Job that works on the store as the rewrite does: its user (the store's owner), placement and identity, and
    the whole store claim (mounted by its containers as STORE_MOUNT) before ``volumes``; it fails at once when its
    one container exits with one of ``refusals``."""
    rewrite = model.rewrite
    store = {"name": "store", "persistentVolumeClaim": {"claimName": model.spec["store"]["claimName"]}}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": model.namespace, "labels": pod_labels},
        "spec": {
            "podFailurePolicy": _failure_policy(containers[0]["name"], refusals),
            "template": {
                # Ours win: the CRD refuses a podLabels key the operator's watches rely on.
                "metadata": {"labels": (rewrite.get("podLabels") or {}) | pod_labels}
                | ({"annotations": rewrite["podAnnotations"]} if rewrite.get("podAnnotations") else {}),
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,  # it never calls the Kubernetes API
                    "securityContext": _over(POD_SECURITY, rewrite.get("podSecurityContext")),
                    "containers": containers,
                    "volumes": [store, *volumes],
                    **_placement(rewrite),
                    **_service_account(model.spec),
                    **_pull_secrets(model.spec),
                },
            },
        },
    }


def store_cleanup_job(model: Model, config: OperatorConfig, keep: list[str], rewrite_id: str | None) -> dict[str, Any]:
    """The Job that removes from the model's store directory every rewrite but ``keep`` (the served one and its
    fallbacks), and what interrupted rewrites left; ``rewrite_id`` None: the model is gone, remove them all."""
    command = ["neuron-store-clean", f"{STORE_DIR}/{model.store_path}"]
    for kept in keep:
        command += ["--keep", kept]
    container = {
        "name": "clean",
        "image": model.rewrite_image(config),
        "command": [*command, "--report_file", TERMINATION_LOG],
        "volumeMounts": [dict(STORE_MOUNT)],
        "securityContext": CONTAINER_SECURITY,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": copy.deepcopy(CLEANUP_RESOURCES),  # the Job is the caller's to change, the default is not
    }
    name = cleanup_job_name(model.name, rewrite_id)
    job = _store_job(model, name, labels(model.name, CLEANUP_COMPONENT), [container], [], CLEANUP_REFUSALS)
    job["spec"] |= {"backoffLimit": 1, "activeDeadlineSeconds": 600}
    if rewrite_id is None:
        job["spec"]["ttlSecondsAfterFinished"] = 3600  # no model owns it: it goes by itself if the operator is away
    return _with_hash(job)


def _batching(serving: dict[str, Any]) -> dict[str, Any] | None:
    batching = serving.get("batching") or {}
    return batching if batching.get("enabled") else None


def serving_metrics_path(model: Model) -> str | None:
    """Where TF Serving serves Prometheus metrics on its REST port; None when turned off."""
    metrics = model.serving.get("metrics") or {}
    return metrics.get("path", METRICS_PATH) if metrics.get("enabled", True) else None


def batching_config_map(model: Model) -> dict[str, Any] | None:
    """TF Serving's batching parameters file, when batching is on."""
    batching = _batching(model.serving)
    if batching is None:
        return None
    params = {
        "max_batch_size": batching.get("maxBatchSize", 8),
        "batch_timeout_micros": batching.get("batchTimeoutMicros", 1000),
        "num_batch_threads": batching.get("numBatchThreads", 4),
        "max_enqueued_batches": batching.get("maxEnqueuedBatches", 100),
    }
    text = "".join(f"{key} {{ value: {value} }}\n" for key, value in params.items())
    return _with_hash(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": bounded(model.name, "-batching"),
                "namespace": model.namespace,
                "labels": labels(model.name, "serving"),
            },
            "data": {"batching.config": text},
        }
    )


def serving_deployment(model: Model, config: OperatorConfig, rewrite_id: str) -> dict[str, Any]:
    """TF Serving pods on numCores NeuronCores each, serving the rewrite ``rewrite_id``."""
    spec = model.spec
    serving = model.serving
    grpc, rest = serving.get("grpcPort", 8500), serving.get("restPort", 8501)
    base_path = f"{MODELS_DIR}/{model.model_name}"
    args = [
        f"--port={grpc}",
        f"--rest_api_port={rest}",
        f"--model_name={model.model_name}",
        f"--model_base_path={base_path}",
        # Every served base path is immutable (a new rewrite gets a new one and a rollout), so the server loads it
        # once and never polls: nothing done to the store later can unload a model that serves.
        "--file_system_poll_wait_seconds=0",
        f"--grpc_channel_arguments={GRPC_CHANNEL_ARGUMENTS}",
    ]
    mounts = [
        {"name": "models", "mountPath": base_path, "subPath": model.rewrite_path(rewrite_id), "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "models", "persistentVolumeClaim": {"claimName": spec["store"]["claimName"], "readOnly": True}},
        {"name": "tmp", "emptyDir": {}},
    ]
    template_annotations = {REWRITE_ANNOTATION: rewrite_id}
    config_map = batching_config_map(model)
    if config_map is not None:
        args += ["--enable_batching=true", f"--batching_parameters_file={BATCHING_FILE}"]
        mounts.append({"name": "batching", "mountPath": BATCHING_FILE, "subPath": "batching.config", "readOnly": True})
        volumes.append({"name": "batching", "configMap": {"name": config_map["metadata"]["name"]}})
        # TF Serving reads the file once: a change of parameters must roll the pods.
        template_annotations[BATCHING_ANNOTATION] = config_map["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
    metrics_path = serving_metrics_path(model)
    if metrics_path is not None:
        args.append(f"--monitoring_config_file={MONITORING_DIR}/monitoring.config")
        mounts.append({"name": "monitoring", "mountPath": MONITORING_DIR, "readOnly": True})
        field = f"metadata.annotations['{MONITORING_ANNOTATION}']"
        volumes.append(
            {
                "name": "monitoring",
                "downwardAPI": {"items": [{"path": "monitoring.config", "fieldRef": {"fieldPath": field}}]},
            }
        )
        template_annotations |= {
            MONITORING_ANNOTATION: f'prometheus_config {{ enable: true, path: "{metrics_path}" }}',
            # Where Prometheus' usual Kubernetes pod discovery finds the metrics: on the REST port.
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(rest),
            "prometheus.io/path": metrics_path,
        }
    resources = copy.deepcopy(serving.get("resources") or {})
    for kind in ("requests", "limits"):
        resources.setdefault(kind, {})[NEURONCORE] = str(model.cores)
    model_path = f"/v1/models/{model.model_name}"
    startup_timeout = serving.get("startupTimeoutSeconds", 600)
    probes = serving.get("probes") or {}
    startup_period = (probes.get("startup") or {}).get("periodSeconds", 10)
    mounts += list(serving.get("volumeMounts") or [])
    volumes += list(serving.get("volumes") or [])
    container = {
        "name": SERVER_CONTAINER,
        "image": serving.get("image") or config.serving_image,
        "command": serving.get("command") or ["tensorflow_model_server_neuronx"],
        "args": args + list(serving.get("extraArgs") or []),
        "ports": [
            {"name": "grpc", "containerPort": grpc, "protocol": "TCP"},
            {"name": "http", "containerPort": rest, "protocol": "TCP"},
        ],
        "env": list(serving.get("env") or []),
        "resources": resources,
        # "Ready" means the model is loaded, not that the port is open.
        "readinessProbe": _over(
            {"httpGet": {"path": model_path, "port": "http"}, "periodSeconds": 5, "failureThreshold": 3},
            probes.get("readiness"),
        ),
        "startupProbe": _over(
            {"httpGet": {"path": model_path, "port": "http"}, "periodSeconds": 10},
            probes.get("startup"),
        )
        | {"failureThreshold": max(1, startup_timeout // startup_period)},  # the startup timeout decides
        "livenessProbe": _over(
            {"tcpSocket": {"port": "grpc"}, "periodSeconds": 10, "failureThreshold": 6}, probes.get("liveness")
        ),
        # The drain (DRAIN_SECONDS above) as the kubelet's own sleep action, so the image needs no sleep binary (the
        # CRD's minimum grace period keeps it valid: the apiserver refuses a sleep longer than the grace period).
        "lifecycle": {"preStop": {"sleep": {"seconds": DRAIN_SECONDS}}},
        "volumeMounts": mounts,
        "securityContext": _over(CONTAINER_SECURITY, serving.get("securityContext")),
    }
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,  # TF Serving never calls the Kubernetes API
        "containers": [container, *(serving.get("sidecars") or [])],
        "volumes": volumes,
        "securityContext": _over(POD_SECURITY, serving.get("podSecurityContext")),
        "tolerations": list(spec.get("tolerations") or config.default_tolerations),
        **_service_account(spec),
        **_pull_secrets(spec),
    }
    for key in ("nodeSelector", "affinity"):
        if spec.get(key):
            pod_spec[key] = spec[key]
    for key in ("priorityClassName", "terminationGracePeriodSeconds"):
        if serving.get(key) is not None:
            pod_spec[key] = serving[key]
    if serving.get("topologySpreadConstraints"):
        # Without a labelSelector a constraint counts no pod at all: spread this model's serving pods by default.
        pod_spec["topologySpreadConstraints"] = [
            {"labelSelector": {"matchLabels": selector(model.name)}} | constraint
            for constraint in serving["topologySpreadConstraints"]
        ]
    scheduler = spec.get("schedulerName") or config.scheduler_name
    if scheduler:
        pod_spec["schedulerName"] = scheduler
    return _with_hash(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                **_serving_metadata(model),
                "annotations": {
                    REWRITE_ANNOTATION: rewrite_id,
                    VERSION_ANNOTATION: str(model.version),
                    CORES_ANNOTATION: str(model.cores),
                },
            },
            "spec": {
                "replicas": spec.get("replicas", 1),
                "progressDeadlineSeconds": startup_timeout + PROGRESS_MARGIN_SECONDS,
                "selector": {"matchLabels": selector(model.name)},
                "strategy": spec.get("strategy") or DEFAULT_STRATEGY,
                "template": {
                    "metadata": {
                        # Ours win: validation refuses a podLabels key the selector or the indexes rely on.
                        "labels": (serving.get("podLabels") or {})
                        | labels(model.name, "serving")
                        | selector(model.name),
                        "annotations": (serving.get("podAnnotations") or {}) | template_annotations,
                    },
                    "spec": pod_spec,
                },
            },
        }
    )


def serving_service(model: Model) -> dict[str, Any]:
    serving = model.serving
    return _with_hash(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _serving_metadata(model),
            "spec": {
                "selector": selector(model.name),
                "ports": [
                    {"name": "grpc", "port": serving.get("grpcPort", 8500), "targetPort": "grpc", "protocol": "TCP"},
                    {"name": "http", "port": serving.get("restPort", 8501), "targetPort": "http", "protocol": "TCP"},
                ],
            },
        }
    )


def disruption_budget(model: Model, config: OperatorConfig) -> dict[str, Any] | None:
    """At most maxUnavailable serving pods evicted at once (node drains, Karpenter consolidation); none for a single
    replica, where any budget would either allow its eviction anyway or block every drain of its node.

    Unready pods (crash-looping, a broken model) may always be evicted: they serve nothing, and under the default
    policy they are evictable only while the rest is within the budget, so a few of them would stall every drain.
    """
    budget = model.spec.get("disruptionBudget") or {}
    if not budget.get("enabled", config.disruption_budget) or model.spec.get("replicas", 1) <= 1:
        return None
    if "minAvailable" in budget:
        limit = {"minAvailable": budget["minAvailable"]}
    else:
        limit = {"maxUnavailable": budget.get("maxUnavailable", config.max_unavailable)}
    return _with_hash(
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": _serving_metadata(model),
            "spec": {
                "selector": {"matchLabels": selector(model.name)},
                **limit,
                "unhealthyPodEvictionPolicy": "AlwaysAllow",  # policy/v1, GA in Kubernetes 1.31
            },
        }
    )


def service_monitor(model: Model, config: OperatorConfig) -> dict[str, Any] | None:
    """The Prometheus operator's scrape target for the model's TF Serving metrics, where its CRD is installed."""
    path = serving_metrics_path(model)
    if path is None or not config.service_monitors:
        return None
    return _with_hash(
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "ServiceMonitor",
            "metadata": _serving_metadata(model),
            "spec": {
                "selector": {"matchLabels": selector(model.name)},  # the model's Service, which carries them
                "namespaceSelector": {"matchNames": [model.namespace]},
                "endpoints": [{"port": "http", "path": path}],
            },
        }
    )


def endpoints(model: Model) -> dict[str, str]:
    serving = model.serving
    host = f"{serving_name(model.name)}.{model.namespace}.svc"
    return {
        "grpc": f"{host}:{serving.get('grpcPort', 8500)}",
        "rest": f"http://{host}:{serving.get('restPort', 8501)}/v1/models/{model.model_name}",
    }
