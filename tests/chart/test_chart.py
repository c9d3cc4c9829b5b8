"""The Helm chart and the container images: what the chart renders for the ways a platform team installs it, what
its schema refuses, and an install on the local control plane whose operator pod (run by the node agent with the
chart's own service account) brings a NeuronModel to Ready."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import urllib.request
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from kubernetes import client

from localcluster.cluster import free_port, kubernetes_version
from localcluster.helm import helm, helm_binary
from localcluster.simcluster import SimulatedCluster
from neuronmodel_operator.crd import CRD_NAME, DIGEST_ANNOTATION

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "neuronmodel-operator"
GROUP = "serving.neuron.dev"
SERVING_IMAGE = "public.ecr.aws/neuron/tensorflow-inference-neuronx:chart-default"


def _operator_helpers() -> ModuleType:
    """tests/operator/conftest.py (Env, neuron_model, wait_for, the ``models`` fixture), loaded by path: its folder is
    no package, and the module name ``conftest`` means whichever conftest pytest imported last."""
    path = REPO / "tests" / "operator" / "conftest.py"
    spec = importlib.util.spec_from_file_location("operator_e2e_helpers", path)
    assert spec is not None and spec.loader is not None
    module = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
    if not hasattr(module, "Env"):
        spec.loader.exec_module(module)
    return module


_helpers = _operator_helpers()
Env, neuron_model, wait_for = _helpers.Env, _helpers.neuron_model, _helpers.wait_for
models = _helpers.models  # the session fixture: compiled models a NeuronModel's source points at

# What the operator does with the objects it serves, in every namespace it serves (the chart's _helpers.tpl).
OPERATOR_RULES = [
    {"apiGroups": [GROUP], "resources": ["neuronmodels"], "verbs": ["list", "watch"]},
    {"apiGroups": [GROUP], "resources": ["neuronmodels/status"], "verbs": ["patch"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["list", "watch", "get", "create", "delete"]},
    {
        "apiGroups": ["apps"],
        "resources": ["deployments"],
        "verbs": ["list", "watch", "get", "create", "update", "patch"],
    },
    {"apiGroups": [""], "resources": ["services"], "verbs": ["list", "watch", "get", "create", "update"]},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list", "watch", "get", "create", "update", "delete"]},
    {
        "apiGroups": ["policy"],
        "resources": ["poddisruptionbudgets"],
        "verbs": ["list", "watch", "get", "create", "update", "delete"],
    },
    {
        "apiGroups": ["monitoring.coreos.com"],
        "resources": ["servicemonitors"],
        "verbs": ["list", "watch", "get", "create", "update", "delete"],
    },
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "list"]},
]
CRD_RULE = {
    "apiGroups": ["apiextensions.k8s.io"],
    "resources": ["customresourcedefinitions"],
    "verbs": ["list", "watch"],
}
OWN_CRD_RULE = {
    "apiGroups": ["apiextensions.k8s.io"],
    "resources": ["customresourcedefinitions"],
    "resourceNames": ["neuronmodels.serving.neuron.dev"],
    "verbs": ["get"],
}
NAMESPACES_RULE = {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]}


def peering_rules(resource: str) -> list[dict[str, Any]]:
    return [
        {"apiGroups": ["kopf.dev"], "resources": [resource], "verbs": ["list", "watch"]},
        {
            "apiGroups": ["kopf.dev"],
            "resources": [resource],
            "resourceNames": ["neuronmodel-operator"],
            "verbs": ["get", "patch"],
        },
    ]


def sets(values: dict[str, str]) -> list[str]:
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


# Rendered for the release the suite runs on (helm's default is its own idea of a current release).
TEMPLATE = ("template", "rel", str(CHART), "--kube-version", kubernetes_version())


def test_the_chart_claims_only_the_tested_kubernetes() -> None:
    tested = kubernetes_version().lstrip("v").split(".")
    assert yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"] == f">={tested[0]}.{tested[1]}.0-0"
    older = helm("template", "rel", str(CHART), "--kube-version", f"{tested[0]}.{int(tested[1]) - 1}.0", check=False)
    assert older.returncode != 0 and "chart requires kubeVersion" in older.stderr, older.stderr


def render(values: dict[str, str] | None = None, namespace: str = "ops") -> list[dict[str, Any]]:
    out = helm(*TEMPLATE, "-n", namespace, *sets(values or {}))
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = of_kind(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# Rendering ---------------------------------------------------------------------------------------------------


def test_helm_comes_from_the_dev_wheel_cached_under_its_own_version() -> None:
    binary = helm_binary()
    assert binary.parent.name.startswith("helm-") and os.access(binary, os.X_OK)
    version = helm("version", "--template", "{{.Version}}").stdout
    assert version == f"v{binary.parent.name.removeprefix('helm-')}"


def test_lint_passes_strictly_for_every_value_set() -> None:
    for values in ({}, {"watchNamespaces": "{team-a,team-b}"}, {"replicas": "2"}):
        helm("lint", "--strict", str(CHART), *sets(values))


def test_cluster_wide_install_gets_one_cluster_role_with_exactly_the_operators_verbs() -> None:
    docs = render()
    (role,) = of_kind(docs, "ClusterRole")
    assert role["rules"] == [
        CRD_RULE,
        OWN_CRD_RULE,
        *OPERATOR_RULES,
    ]  # no namespaces: Kopf lists none when it serves them all
    assert not of_kind(docs, "Role") and not of_kind(docs, "RoleBinding")
    (binding,) = of_kind(docs, "ClusterRoleBinding")
    (account,) = of_kind(docs, "ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "ops"}]
    deployment = of_kind(docs, "Deployment")[0]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # a standalone operator never overlaps its successor
    container = operator_container(docs)
    assert container["command"] == ["neuronmodel-operator"]
    assert container["args"] == [
        "--all-namespaces",
        "--standalone",
        "--liveness=http://:8080/healthz",
        "--log-format=plain",
    ]
    # Kopf serves /healthz once the operator has started (its CRD checks passed): not ready until then, and not
    # killed by the liveness probe while it waits, for the default 30 minutes.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] == 1800
    assert container["ports"] == [
        {"name": "health", "containerPort": 8080, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 9090, "protocol": "TCP"},
    ]
    (service,) = of_kind(docs, "Service")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["health", "metrics"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert (annotations["prometheus.io/scrape"], annotations["prometheus.io/port"]) == ("true", "9090")
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NEURONMODEL_METRICS_PORT"] == "9090"
    pod_ip = next(e for e in container["env"] if e["name"] == "POD_IP")  # the liveness endpoint's address family
    assert pod_ip["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert (env["NEURONMODEL_DISRUPTION_BUDGET"], env["NEURONMODEL_MAX_UNAVAILABLE"]) == ("true", "1")
    assert not of_kind(docs, "ServiceMonitor")  # only when asked for: it needs the Prometheus operator's CRD
    assert not of_kind(docs, "ClusterKopfPeering") and not of_kind(docs, "KopfPeering")


def test_watched_namespaces_get_a_role_each_and_nothing_else_cluster_wide_but_kopfs_observation() -> None:
    docs = render({"watchNamespaces": "{team-a,team-b}"})
    (cluster_role,) = of_kind(docs, "ClusterRole")
    assert cluster_role["rules"] == [
        CRD_RULE,
        OWN_CRD_RULE,
        NAMESPACES_RULE,
    ]  # read-only: Kopf notices CRDs and namespaces
    roles = of_kind(docs, "Role")
    assert [r["metadata"]["namespace"] for r in roles] == ["team-a", "team-b"]
    assert all(r["rules"] == OPERATOR_RULES for r in roles)
    bindings = of_kind(docs, "RoleBinding")
    assert [b["metadata"]["namespace"] for b in bindings] == ["team-a", "team-b"]
    assert all(b["subjects"][0]["namespace"] == "ops" and b["roleRef"]["kind"] == "Role" for b in bindings)
    assert operator_container(docs)["args"][:3] == ["--namespace=team-a", "--namespace=team-b", "--standalone"]


def test_several_replicas_run_with_kopf_peering_and_may_write_only_their_peering_object() -> None:
    docs = render({"replicas": "2"})
    (role,) = of_kind(docs, "ClusterRole")
    assert role["rules"] == [CRD_RULE, OWN_CRD_RULE, *OPERATOR_RULES, *peering_rules("clusterkopfpeerings")]
    assert [p["metadata"]["name"] for p in of_kind(docs, "ClusterKopfPeering")] == ["neuronmodel-operator"]
    deployment = of_kind(docs, "Deployment")[0]
    assert deployment["spec"]["replicas"] == 2 and "strategy" not in deployment["spec"]
    assert operator_container(docs)["args"][:2] == ["--all-namespaces", "--peering=neuronmodel-operator"]
    assert env_of(operator_container(docs))["POD_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}

    docs = render({"replicas": "2", "watchNamespaces": "{team-a,team-b}"})
    assert all(r["rules"] == [*OPERATOR_RULES, *peering_rules("kopfpeerings")] for r in of_kind(docs, "Role"))
    assert [(p["metadata"]["namespace"], p["metadata"]["name"]) for p in of_kind(docs, "KopfPeering")] == [
        ("team-a", "neuronmodel-operator"),
        ("team-b", "neuronmodel-operator"),
    ]
    # Kopf's peering CRDs are in crds/ (Helm installs those before the templates that create peering objects).
    peering_crds = list(yaml.safe_load_all((CHART / "crds" / "kopfpeering.yaml").read_text()))
    assert sorted(c["metadata"]["name"] for c in peering_crds) == [
        "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev",
    ]


def test_no_rule_anywhere_uses_a_wildcard() -> None:
    for values in ({}, {"watchNamespaces": "{team-a}"}, {"replicas": "2"}, {"replicas": "2", "watchNamespaces": "{a}"}):
        docs = render(values)
        for rule in [rule for doc in of_kind(docs, "ClusterRole") + of_kind(docs, "Role") for rule in doc["rules"]]:
            assert "*" not in json.dumps(rule), rule


def test_the_operator_pod_runs_under_the_restricted_pod_security_standard() -> None:
    docs = render()
    pod = of_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert operator_container(docs)["securityContext"] == {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def test_values_reach_the_operator_as_the_settings_it_reads() -> None:
    docs = render(
        {
            "image.repository": "123456789012.dkr.ecr.us-west-2.amazonaws.com/nmo",
            "image.tag": "1.2.3",
            "rewriteImage.repository": "registry.example/rewrite",
            "neuronSchedulerName": "neuron-scheduler",
            "tolerateNeuronTaint": "false",
            "serving.defaultImage": "public.ecr.aws/neuron/tensorflow-inference-neuron:x",
            "logLevel": "debug",
            "logFormat": "json",
            "healthPort": "9090",
            "imagePullSecrets[0].name": "ecr",
            "nodeSelector.role": "system",
            "tolerations[0].key": "CriticalAddonsOnly",
            "tolerations[0].operator": "Exists",
            "resources.limits.memory": "1Gi",
            "metrics.port": "9100",
            "metrics.serviceMonitor.enabled": "true",
            "metrics.serviceMonitor.labels.release": "prometheus",
            "disruptionBudget.maxUnavailable": "25%",
        }
    )
    container = operator_container(docs)
    assert container["image"] == "123456789012.dkr.ecr.us-west-2.amazonaws.com/nmo:1.2.3"
    assert container["args"][2:] == ["--liveness=http://:9090/healthz", "--log-format=json", "--verbose"]
    env = env_of(container)
    assert env["NEURONMODEL_REWRITE_IMAGE"] == "registry.example/rewrite:0.1.0"  # tag: the chart's appVersion
    assert env["NEURONMODEL_SCHEDULER_NAME"] == "neuron-scheduler"
    assert env["NEURONMODEL_TOLERATE_TAINTS"] == ""
    assert env["NEURONMODEL_SERVING_IMAGE"] == "public.ecr.aws/neuron/tensorflow-inference-neuron:x"
    assert (env["NEURONMODEL_METRICS_PORT"], env["NEURONMODEL_MAX_UNAVAILABLE"]) == ("9100", "25%")
    (monitor,) = of_kind(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    assert container["resources"]["limits"] == {"memory": "1Gi"}
    pod = of_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "ecr"}]
    assert pod["nodeSelector"] == {"role": "system"}
    assert pod["tolerations"] == [{"key": "CriticalAddonsOnly", "operator": "Exists"}]
    assert env_of(operator_container(render()))["NEURONMODEL_TOLERATE_TAINTS"] == "aws.amazon.com/neuron"


def test_the_metrics_port_must_differ_from_the_health_port() -> None:
    out = helm(*TEMPLATE, *sets({"healthPort": "9090"}), check=False)
    assert out.returncode != 0
    assert "metrics.port must differ from healthPort" in out.stderr, out.stderr


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"logFormat": "xml"}, "logFormat"),
        ({"logLevel": "trace"}, "logLevel"),
        ({"replicas": "0"}, "replicas"),
        ({"watchNamespaces": "{Team_A}"}, "watchNamespaces"),
        ({"image.pullPolicy": "Sometimes"}, "pullPolicy"),
        ({"healthPort": "80"}, "healthPort"),
        ({"replica": "2"}, "replica"),  # a typo is refused, not ignored
        ({"disruptionBudget.maxUnavailable": "half"}, "maxUnavailable"),
        ({"metrics.port": "0"}, "port"),
    ],
)
def test_the_schema_refuses_a_bad_value_naming_it(values: dict[str, str], named: str) -> None:
    out = helm(*TEMPLATE, *sets(values), check=False)
    assert out.returncode != 0
    assert "values don't meet the specifications of the schema" in out.stderr
    assert named in out.stderr, out.stderr


def test_the_chart_ships_the_repositorys_crd_unchanged() -> None:
    assert (CHART / "crds" / "neuronmodel.yaml").read_bytes() == (REPO / "crds" / "neuronmodel.yaml").read_bytes()


# Fields of apiextensions.k8s.io/v1 JSONSchemaProps. Helm 4 installs CRDs with server-side apply, which refuses any
# other key (older clients' apply let the apiserver drop it silently).
SCHEMA_FIELDS = {
    "id", "$schema", "$ref", "description", "type", "format", "title", "default", "maximum", "exclusiveMaximum",
    "minimum", "exclusiveMinimum", "maxLength", "minLength", "pattern", "maxItems", "minItems", "uniqueItems",
    "multipleOf", "enum", "maxProperties", "minProperties", "required", "items", "allOf", "oneOf", "anyOf", "not",
    "properties", "additionalProperties", "patternProperties", "dependencies", "additionalItems", "definitions",
    "externalDocs", "example", "nullable", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-embedded-resource",
    "x-kubernetes-int-or-string", "x-kubernetes-list-map-keys", "x-kubernetes-list-type", "x-kubernetes-map-type",
    "x-kubernetes-validations",
}  # fmt: skip


def _schema_keys(schema: Any, path: str) -> Iterator[str]:
    if not isinstance(schema, dict):
        return
    yield from (f"{path}.{key}" for key in schema if key not in SCHEMA_FIELDS)
    for key in ("properties", "patternProperties", "definitions", "dependencies"):
        for name, sub in (schema.get(key) or {}).items():
            yield from _schema_keys(sub, f"{path}.{key}.{name}")
    for key in ("items", "additionalProperties", "additionalItems", "not"):
        yield from _schema_keys(schema.get(key), f"{path}.{key}")
    for key in ("allOf", "oneOf", "anyOf"):
        for i, sub in enumerate(schema.get(key) or []):
            yield from _schema_keys(sub, f"{path}.{key}[{i}]")


@pytest.mark.parametrize("crd", ["neuronmodel.yaml", "kopfpeering.yaml"])
def test_the_chart_crds_declare_only_schema_fields(crd: str) -> None:
    for doc in yaml.safe_load_all((CHART / "crds" / crd).read_text()):
        for version in doc["spec"]["versions"]:
            unknown = list(_schema_keys(version["schema"]["openAPIV3Schema"], "openAPIV3Schema"))
            assert unknown == [], f"{crd}: not JSONSchemaProps fields (an unquoted ', ' in a flow mapping?): {unknown}"


# Images ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dockerfile", "extra", "script"),
    [
        ("operator.Dockerfile", "operator", "neuronmodel-operator"),
        ("rewrite.Dockerfile", "s3", "tf-neuron-auto-multicore"),
    ],
)
def test_the_dockerfiles_install_an_extra_and_run_a_console_script_of_this_package(
    dockerfile: str, extra: str, script: str
) -> None:
    package = metadata.distribution("neuron-model-operator")  # as pyproject.toml declares it, installed
    text = (REPO / "images" / dockerfile).read_text()
    base = re.search(r"^FROM (\S+)$", text, re.MULTILINE)
    assert base is not None and re.fullmatch(r"python:3\.\d+-slim-[a-z]+", base[1]), "a pinned slim Python base"
    assert f'pip install ".[{extra}]"' in text and extra in package.metadata.get_all("Provides-Extra")
    requirements = [r for r in package.requires or [] if f'extra == "{extra}"' in r]
    assert requirements and not any("tensorflow" in r for r in requirements)
    assert re.search(r"^USER 65532:65532$", text, re.MULTILINE), "the chart's runAsUser, non-root"
    entrypoint = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.MULTILINE)
    assert entrypoint is not None and json.loads(entrypoint[1]) == [script]
    assert script in {e.name for e in package.entry_points if e.group == "console_scripts"}


# Installed on the local control plane --------------------------------------------------------------------------


class Release:
    """The chart installed in a test namespace, serving that namespace only."""

    def __init__(self, cluster: SimulatedCluster, env: Any, name: str, health_port: int) -> None:
        self.cluster, self.env, self.name, self.health_port = cluster, env, name, health_port
        self.account = f"{name}-neuronmodel-operator"
        self.user = f"system:serviceaccount:{env.namespace}:{self.account}"

    def operator_pod(self) -> Any:
        pods = self.env.core.list_namespaced_pod(
            self.env.namespace, label_selector=f"app.kubernetes.io/instance={self.name}"
        ).items
        return pods[0] if len(pods) == 1 and pods[0].status.phase == "Running" else None

    def health(self) -> Any:
        """Kopf's liveness endpoint, on the host's network as the agent runs pods; None until it listens."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            return None

    def requests(self) -> list[dict[str, Any]]:
        """What the operator's service account asked of the apiserver, from the audit log."""
        assert self.cluster.cluster.workdir is not None
        log = self.cluster.cluster.workdir / "audit.log"
        events = (json.loads(line) for line in log.read_text().splitlines())
        return [e for e in events if e["user"]["username"] == self.user]


@pytest.fixture
def release(cluster: SimulatedCluster, namespace: str, tmp_path: Path) -> Iterator[Release]:
    cluster.restrict_pods(namespace)
    env = Env(cluster, namespace, tmp_path)  # volumes and helpers only: the chart's pod is the operator
    env.hostpath_claim("model-store", _helpers.make_store(tmp_path / "store"))
    installed = Release(cluster, env, f"nmo-{namespace[-8:]}", free_port())  # the pod shares the host's network
    helm(
        "install", installed.name, str(CHART), "-n", namespace, "--wait", "--timeout", "3m",
        *sets({"watchNamespaces": f"{{{namespace}}}", "healthPort": str(installed.health_port),
               "rewriteImage.repository": "local/rewrite", "rewriteImage.tag": "test",
               "serving.defaultImage": SERVING_IMAGE}),
        kubeconfig=cluster.kubeconfig,
    )  # fmt: skip
    pod = wait_for(installed.operator_pod, what="the operator pod running")
    assert cluster.agent is not None
    env.log = cluster.agent.workdir / "pods" / pod.metadata.uid / "operator.log"  # wait_phase shows its tail
    yield installed
    helm("uninstall", installed.name, "-n", namespace, "--wait", kubeconfig=cluster.kubeconfig)
    for pv in env.volumes:
        env.core.delete_persistent_volume(pv)


@pytest.mark.cluster
def test_the_installed_operator_pod_brings_a_model_to_ready_with_its_own_service_account(
    release: Release, models: dict[str, Path]
) -> None:
    env = release.env
    assert wait_for(release.health, what="the health endpoint") == {"indexes": True}  # what the liveness probe GETs
    env.hostpath_claim("resnet50-compiled", models["resnet50"])
    manifest = neuron_model("resnet50", "resnet50-compiled", cores=2)
    del manifest["spec"]["serving"]  # the chart's serving.defaultImage stands in
    assert env.apply(manifest).returncode == 0
    status = env.wait_phase("resnet50", "Ready", timeout=180)
    assert status["servedCores"] == 2 and status["readyReplicas"] == 1

    # The chart's values reached the operator: the Job runs the rewriteImage, the pods run the default serving image
    # and tolerate the Neuron taint.
    (job,) = env.jobs()
    assert job.spec.template.spec.containers[0].image == "local/rewrite:test"
    deployment = env.apps.read_namespaced_deployment("resnet50", env.namespace)
    assert deployment.spec.template.spec.containers[0].image == SERVING_IMAGE
    tolerations = [t.to_dict() for t in deployment.spec.template.spec.tolerations]
    assert {"key": "aws.amazon.com/neuron", "operator": "Exists", "effect": "NoSchedule"} in [
        {k: v for k, v in t.items() if v is not None} for t in tolerations
    ]

    # It was the pod, with the chart's service account, that did it; and it never needed more than the chart grants.
    requests = release.requests()
    assert any(r["verb"] == "patch" and r["objectRef"].get("subresource") == "status" for r in requests)
    assert any(r["verb"] == "create" and r["objectRef"]["resource"] == "jobs" for r in requests)
    forbidden = [(r["verb"], r["requestURI"]) for r in requests if r["responseStatus"]["code"] == 403]
    assert forbidden == []


@pytest.mark.cluster
def test_the_operator_service_account_may_do_what_it_needs_and_nothing_more(
    release: Release, cluster: SimulatedCluster
) -> None:
    ns = release.env.namespace
    authorization = client.AuthorizationV1Api(cluster.api)

    def allowed(verb: str, resource: str, group: str = "", namespace: str = ns, subresource: str = "") -> bool:
        review = authorization.create_subject_access_review(
            {
                "spec": {
                    "user": release.user,
                    "groups": ["system:serviceaccounts", f"system:serviceaccounts:{ns}", "system:authenticated"],
                    "resourceAttributes": {
                        "verb": verb,
                        "group": group,
                        "resource": resource,
                        "subresource": subresource,
                        "namespace": namespace,
                    },
                }
            }
        )
        return bool(review.status.allowed)

    needed = [
        ("list", "neuronmodels", GROUP),
        ("watch", "neuronmodels", GROUP),
        ("create", "jobs", "batch"),
        ("delete", "jobs", "batch"),
        ("update", "deployments", "apps"),
        ("patch", "deployments", "apps"),
        ("update", "services", ""),
        ("create", "configmaps", ""),
        ("delete", "configmaps", ""),
        ("create", "poddisruptionbudgets", "policy"),
        ("delete", "poddisruptionbudgets", "policy"),
        ("get", "services", ""),
        ("watch", "pods", ""),
        ("create", "events", ""),
        ("list", "events", ""),
    ]
    assert [n for n in needed if not allowed(*n)] == []
    assert allowed("patch", "neuronmodels", GROUP, subresource="status")
    assert allowed("list", "customresourcedefinitions", "apiextensions.k8s.io", namespace="")
    assert allowed("watch", "namespaces", namespace="")

    refused = [
        ("patch", "neuronmodels", GROUP, ns),  # Kopf keeps no state on the models: status only
        ("delete", "neuronmodels", GROUP, ns),
        ("delete", "deployments", "apps", ns),
        ("delete", "deployments", "apps", ""),  # cluster-wide
        ("delete", "services", "", ns),
        ("get", "secrets", "", ns),
        ("list", "secrets", "", ""),
        ("create", "pods", "", ns),
        ("delete", "pods", "", ns),
        ("create", "jobs", "batch", "default"),  # a namespace it does not serve
        ("list", "neuronmodels", GROUP, "default"),
        ("create", "clusterroles", "rbac.authorization.k8s.io", ""),
        ("patch", "kopfpeerings", "kopf.dev", ns),  # one replica: no peering
    ]
    assert [r for r in refused if allowed(r[0], r[1], r[2], namespace=r[3])] == []


@pytest.mark.cluster
def test_the_operator_waits_for_the_crd_helm_did_not_upgrade_and_says_what_to_do(
    release: Release, cluster: SimulatedCluster
) -> None:
    assert wait_for(release.health, what="the operator ready") == {"indexes": True}
    kubectl = cluster.cluster.kubectl
    # What `helm upgrade` leaves behind: the previous release's CRD, while the upgrade rolls the operator's pod.
    kubectl("annotate", "crd", CRD_NAME, f"{DIGEST_ANNOTATION}=0ld0ld0ld0ld", "--overwrite")
    try:
        old = release.operator_pod()
        release.env.core.delete_namespaced_pod(old.metadata.name, release.env.namespace)
        new = wait_for(
            lambda: (pod := release.operator_pod()) and pod.metadata.uid != old.metadata.uid and pod,
            what="the new operator pod",
        )
        assert cluster.agent is not None
        log = cluster.agent.workdir / "pods" / new.metadata.uid / "operator.log"
        wait_for(
            lambda: (
                log.exists() and "the NeuronModel CRD in the cluster has schema digest 0ld0ld0ld0ld" in log.read_text()
            ),
            what="the operator saying the CRD is stale",
        )
        assert release.health() is None  # not serving, so not ready
        assert "kubectl apply --server-side --force-conflicts -f charts/neuronmodel-operator/crds/" in log.read_text()
    finally:
        kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds" / "neuronmodel.yaml"))
    assert wait_for(release.health, timeout=60, what="the operator started once the CRD is applied") == {
        "indexes": True
    }
