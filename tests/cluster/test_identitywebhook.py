"""EKS's pod identity webhook in the local cluster: what it gives pods for IRSA and for EKS Pod Identity, on the real
apiserver, and the apiserver's tokens the simulated and the real node then write for them."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from localcluster.identitywebhook import (
    AWS_REGION,
    IRSA_TOKEN_FILE,
    POD_IDENTITY_AUDIENCE,
    POD_IDENTITY_FULL_URI,
    POD_IDENTITY_TOKEN_FILE,
    ROLE_ARN_ANNOTATION,
    STS_AUDIENCE,
)
from localcluster.images import Image
from localcluster.pytest_plugin import wait_for
from localcluster.simcluster import SimulatedCluster

pytestmark = pytest.mark.cluster

ROLE = "arn:aws:iam::111122223333:role/model-reader"
ISSUER = "https://kubernetes.default.svc.cluster.local"  # cluster.py's --service-account-issuer
# What both IRSA and Pod Identity give a container that sets none of these (pkg/handler/handler.go addEnvToContainer).
REGION_ENV = {"AWS_STS_REGIONAL_ENDPOINTS": "regional", "AWS_DEFAULT_REGION": AWS_REGION, "AWS_REGION": AWS_REGION}
IRSA_ENV = {**REGION_ENV, "AWS_ROLE_ARN": ROLE, "AWS_WEB_IDENTITY_TOKEN_FILE": IRSA_TOKEN_FILE}
POD_IDENTITY_ENV = {
    **REGION_ENV,
    "AWS_CONTAINER_CREDENTIALS_FULL_URI": POD_IDENTITY_FULL_URI,
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": POD_IDENTITY_TOKEN_FILE,
}
LOCAL_STS = "http://127.0.0.1:9"  # never reached: shows where the node agent's aws_env goes


def account(core: client.CoreV1Api, namespace: str, name: str, role: str | None = None) -> None:
    annotations = {ROLE_ARN_ANNOTATION: role} if role else {}
    core.create_namespaced_service_account(namespace, {"metadata": {"name": name, "annotations": annotations}})


def pod(name: str, script: str, out: Path | None = None, **spec: Any) -> dict[str, Any]:
    """A pod running ``script`` (with ``out`` as /out), for a simulated node."""
    container: dict[str, Any] = {"name": "main", "image": "local", "command": ["sh", "-c", script]}
    volumes = []
    if out is not None:
        container["volumeMounts"] = [{"name": "out", "mountPath": "/out"}]
        volumes = [{"name": "out", "hostPath": {"path": str(out)}}]
    return {"metadata": {"name": name}, "spec": {"containers": [container], "restartPolicy": "Never",
                                                  "volumes": volumes, **spec}}  # fmt: skip


def writable_by_all(path: Path) -> Path:
    path.mkdir()
    path.chmod(0o777)
    return path


def env_of(container: Any) -> dict[str, str]:
    return {e.name: e.value for e in container.env or []}


def token_volume(created: Any, name: str) -> Any:
    """The projected serviceAccountToken source of the pod's volume ``name``."""
    (volume,) = [v for v in created.spec.volumes if v.name == name]
    (source,) = volume.projected.sources
    return source.service_account_token


def mounts_of(container: Any) -> dict[str, tuple[str, bool]]:
    return {m.name: (m.mount_path, bool(m.read_only)) for m in container.volume_mounts or []}


def claims(token: str) -> dict[str, Any]:
    """A JWT's payload, not verified (the local STS verifies signatures; here only what the apiserver put in it)."""
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def succeeded(core: client.CoreV1Api, namespace: str, name: str) -> None:
    def done() -> Any:
        found = core.read_namespaced_pod(name, namespace)
        return found.status.phase in ("Succeeded", "Failed") and found

    found = wait_for(done, what=f"pod {name} to finish")
    assert found.status.phase == "Succeeded", found.status.container_statuses


def test_an_irsa_pod_gets_the_role_the_region_and_an_apiserver_token_for_sts(
    cluster: SimulatedCluster, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    core = client.CoreV1Api(cluster.api)
    account(core, namespace, "reader", ROLE)
    assert cluster.agent is not None
    monkeypatch.setitem(cluster.agent.aws_env, "AWS_ENDPOINT_URL_STS", LOCAL_STS)
    out = writable_by_all(tmp_path / "out")
    script = 'cat "$AWS_WEB_IDENTITY_TOKEN_FILE" > /out/token && echo "$AWS_ENDPOINT_URL_STS" > /out/sts'
    created = core.create_namespaced_pod(namespace, pod("irsa", script, out, serviceAccountName="reader"))

    # What the webhook put into the pod as the apiserver admitted it.
    (container,) = created.spec.containers
    assert env_of(container) == IRSA_ENV
    assert mounts_of(container)["aws-iam-token"] == (str(Path(IRSA_TOKEN_FILE).parent), True)
    token = token_volume(created, "aws-iam-token")
    assert (token.audience, token.path, token.expiration_seconds) == (STS_AUDIENCE, "token", 86400)
    # On a simulated node the agent asked the apiserver for that token, for this pod (TokenRequest).
    succeeded(core, namespace, "irsa")
    issued = claims((out / "token").read_text())
    assert issued["aud"] == [STS_AUDIENCE]
    assert issued["sub"] == f"system:serviceaccount:{namespace}:reader"
    assert issued["iss"] == ISSUER
    assert issued["kubernetes.io"]["pod"] == {"name": "irsa", "uid": created.metadata.uid}
    assert issued["exp"] - issued["iat"] == 86400
    assert (out / "sts").read_text() == f"{LOCAL_STS}\n"  # the agent's endpoints, for a pod with IRSA


def test_containers_that_set_the_variables_or_are_skipped_are_left_alone(
    cluster: SimulatedCluster, namespace: str
) -> None:
    """The webhook's opt-outs: a container setting AWS_ROLE_ARN keeps its own and gets no token file (only what it
    does not set: the region and the mount); one setting a role, a region and the STS endpoint is not touched; one
    named in the pod's eks.amazonaws.com/skip-containers annotation neither."""
    core = client.CoreV1Api(cluster.api)
    account(core, namespace, "reader", ROLE)
    own_role = {"name": "AWS_ROLE_ARN", "value": "arn:aws:iam::444455556666:role/its-own"}
    everything = [own_role, {"name": "AWS_REGION", "value": "eu-west-1"},
                  {"name": "AWS_STS_REGIONAL_ENDPOINTS", "value": "legacy"}]  # fmt: skip
    containers = {"plain": [], "own-role": [own_role], "own-everything": everything, "skipped": []}
    manifest = {
        "metadata": {"name": "mixed", "annotations": {"eks.amazonaws.com/skip-containers": "skipped"}},
        "spec": {
            "serviceAccountName": "reader",
            "containers": [{"name": name, "image": "local", "env": env} for name, env in containers.items()],
        },
    }
    admitted = core.create_namespaced_pod(namespace, manifest, dry_run="All")  # admitted as created, never stored
    found = {c.name: c for c in admitted.spec.containers}
    assert env_of(found["plain"]) == IRSA_ENV
    assert env_of(found["own-role"]) == {"AWS_ROLE_ARN": own_role["value"], **REGION_ENV}
    assert "aws-iam-token" in mounts_of(found["own-role"])
    for untouched in ("own-everything", "skipped"):
        assert env_of(found[untouched]) == {e["name"]: e["value"] for e in containers[untouched]}
        assert "aws-iam-token" not in mounts_of(found[untouched])


def test_a_pod_identity_association_gives_the_agent_uri_and_an_apiserver_token_for_it(
    cluster: SimulatedCluster, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    core = client.CoreV1Api(cluster.api)
    webhook = cluster.identity_webhook
    assert webhook is not None and cluster.agent is not None
    monkeypatch.setitem(cluster.agent.aws_env, "AWS_ENDPOINT_URL_STS", LOCAL_STS)
    account(core, namespace, "app")
    account(core, namespace, "both", ROLE)
    webhook.associate(namespace, "app")
    webhook.associate(namespace, "both")
    out = writable_by_all(tmp_path / "out")
    script = 'cat "$AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE" > /out/token && echo "$AWS_ENDPOINT_URL_STS" > /out/sts'
    created = core.create_namespaced_pod(namespace, pod("identity", script, out, serviceAccountName="app"))

    (container,) = created.spec.containers
    assert env_of(container) == POD_IDENTITY_ENV
    assert created.metadata.labels == {"eks.amazonaws.com/pod-identity": "enabled"}
    path, name = POD_IDENTITY_TOKEN_FILE.rsplit("/", 1)
    assert mounts_of(container)[name] == (path, True)
    token = token_volume(created, name)
    assert (token.audience, token.path) == (POD_IDENTITY_AUDIENCE, name)
    assert 79200 <= token.expiration_seconds <= 86400  # the webhook's jitter on the default day
    succeeded(core, namespace, "identity")
    issued = claims((out / "token").read_text())
    assert issued["aud"] == [POD_IDENTITY_AUDIENCE]
    assert issued["sub"] == f"system:serviceaccount:{namespace}:app"
    assert issued["kubernetes.io"]["pod"]["uid"] == created.metadata.uid
    assert (out / "sts").read_text() == f"{LOCAL_STS}\n"

    # An association wins over a role annotation; deleted, the account's new pods get nothing.
    both = core.create_namespaced_pod(namespace, pod("both", "true", serviceAccountName="both"), dry_run="All")
    assert env_of(both.spec.containers[0]) == POD_IDENTITY_ENV
    webhook.disassociate(namespace, "app")
    again = core.create_namespaced_pod(namespace, pod("again", "true", serviceAccountName="app"), dry_run="All")
    assert env_of(again.spec.containers[0]) == {}
    assert (namespace, "app") not in webhook.associations


def test_a_pod_whose_account_has_neither_gets_nothing(
    cluster: SimulatedCluster, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    core = client.CoreV1Api(cluster.api)
    assert cluster.agent is not None
    monkeypatch.setitem(cluster.agent.aws_env, "AWS_ENDPOINT_URL_STS", LOCAL_STS)
    out = writable_by_all(tmp_path / "out")
    created = core.create_namespaced_pod(namespace, pod("plain", "env > /out/env", out))
    assert env_of(created.spec.containers[0]) == {}
    assert created.metadata.labels is None
    assert [v.name for v in created.spec.volumes if not v.name.startswith("kube-api-access-")] == ["out"]
    succeeded(core, namespace, "plain")
    assert not [line for line in (out / "env").read_text().splitlines() if line.startswith("AWS_")]


def test_on_the_real_node_the_kubelet_writes_the_irsa_token(
    cluster: SimulatedCluster, namespace: str, built_images: dict[str, Image]
) -> None:
    """The same pod spec on the real node: the kubelet projects the token (owned by the pod's user, as it does when
    runAsUser is set); the pod prints its claims, never the token."""
    core = client.CoreV1Api(cluster.api)
    account(core, namespace, "reader", ROLE)
    decode = (
        "import base64, json, os; p = open(os.environ['AWS_WEB_IDENTITY_TOKEN_FILE']).read().split('.')[1]; "
        "c = json.loads(base64.urlsafe_b64decode(p + '=' * (-len(p) % 4))); "
        "print(json.dumps({'aud': c['aud'], 'sub': c['sub'], 'role': os.environ['AWS_ROLE_ARN']}))"
    )
    manifest = pod("real", "", serviceAccountName="reader")
    container = manifest["spec"]["containers"][0]
    container.update(image=built_images["rewrite"].ref, command=["python3", "-c", decode])
    container["resources"] = {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "64Mi"}}
    manifest["spec"]["securityContext"] = {"runAsUser": 65532, "runAsGroup": 65532, "runAsNonRoot": True}
    with cluster.place_on_real_node() as node:
        core.create_namespaced_pod(namespace, manifest)
        succeeded(core, namespace, "real")
    assert core.read_namespaced_pod("real", namespace).spec.node_name == node
    printed = json.loads(core.read_namespaced_pod_log("real", namespace).strip().splitlines()[-1])
    assert printed == {"aud": [STS_AUDIENCE], "sub": f"system:serviceaccount:{namespace}:reader", "role": ROLE}
