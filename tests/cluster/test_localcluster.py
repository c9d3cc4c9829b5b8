"""The local control plane, the simulated Neuron nodes and the node agent, on the real apiserver."""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from localcluster.identitywebhook import AWS_REGION
from localcluster.nodes import INSTANCE_TYPES, NEURON_TAINT, NEURONCORE, node_manifest, node_status
from localcluster.pytest_plugin import wait_for
from localcluster.simcluster import SimulatedCluster
from neuron_rewrite import rewrite_model
from synthetic_models import saved_model, write_model

pytestmark = pytest.mark.cluster


def pod(name: str, command: list[str], *, cores: int | None = None, **spec: Any) -> dict[str, Any]:
    resources = {"limits": {NEURONCORE: str(cores)}, "requests": {NEURONCORE: str(cores)}} if cores else {}
    container = {"name": "main", "image": "local", "command": command, "resources": resources}
    container.update(spec.pop("container", {}))
    return {
        "metadata": {"name": name},
        "spec": {"containers": [container], "restartPolicy": "Never", "terminationGracePeriodSeconds": 5, **spec},
    }


def dedicated_node(cluster: SimulatedCluster, instance_type: str) -> dict[str, Any]:
    """A fresh node only this test's pods can land on (its own label and taint), so tests don't share capacity."""
    key = f"t{uuid.uuid4().hex[:8]}"
    taint = {"key": "test", "value": key, "effect": "NoSchedule"}
    cluster.add_nodes({instance_type: 1}, prefix=f"{key}-", labels={"test": key}, taints=[taint])
    return {
        "nodeSelector": {"test": key},
        "tolerations": [{"key": "test", "operator": "Exists"}],
    }


def pending_reason(core: client.CoreV1Api, namespace: str, name: str) -> str | None:
    events = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items
    return next((e.message for e in events if e.reason == "FailedScheduling"), None)


# Pure functions -------------------------------------------------------------------------------------------------


def test_node_manifest_for_every_instance_type() -> None:
    for instance_type, spec in INSTANCE_TYPES.items():
        node = node_manifest("n", instance_type, taints=[NEURON_TAINT])
        assert node["metadata"]["labels"]["node.kubernetes.io/instance-type"] == instance_type
        assert node["spec"]["taints"] == [NEURON_TAINT]
        status = node_status(instance_type, "2026-01-01T00:00:00Z")["status"]
        assert status["allocatable"][NEURONCORE] == str(spec.neuroncores)
        assert status["conditions"][0]["type"] == "Ready"
    assert INSTANCE_TYPES["inf2.xlarge"].neuroncores == 2
    assert INSTANCE_TYPES["trn1.32xlarge"].neuroncores == 32
    assert "taints" not in node_manifest("n", "inf2.xlarge")["spec"]
    with pytest.raises(ValueError, match="unknown instance type"):
        node_manifest("n", "p4d.24xlarge")


# The control plane ----------------------------------------------------------------------------------------------


def test_objects_with_maps_round_trip(cluster: SimulatedCluster, namespace: str) -> None:
    """Maps (labels, ConfigMap data) stored and read back, and selected by label."""
    core = client.CoreV1Api(cluster.api)
    data = {f"key-{i}": f"value-{i}" for i in range(50)}
    labels = {"app": "x", "tier": "y", "neuron": "true"}
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "maps", "labels": labels}, "data": data})
    read = core.read_namespaced_config_map("maps", namespace)
    assert read.data == data and read.metadata.labels == labels
    listed = core.list_namespaced_config_map(namespace, label_selector="app=x").items
    assert [c.metadata.name for c in listed] == ["maps"]


def test_nodes_are_ready_with_neuron_capacity(cluster: SimulatedCluster) -> None:
    nodes = client.CoreV1Api(cluster.api).list_node(label_selector="node.kubernetes.io/instance-type=inf2.24xlarge")
    node = nodes.items[0]
    assert node.status.allocatable[NEURONCORE] == "12"
    assert node.status.allocatable["aws.amazon.com/neuron"] == "6"
    assert any(c.type == "Ready" and c.status == "True" for c in node.status.conditions)


def test_pod_asking_more_cores_than_any_node_stays_pending(cluster: SimulatedCluster, namespace: str) -> None:
    core = client.CoreV1Api(cluster.api)
    core.create_namespaced_pod(namespace, pod("greedy", ["sleep", "60"], cores=256))
    reason = wait_for(lambda: pending_reason(core, namespace, "greedy"), what="FailedScheduling event")
    assert f"Insufficient {NEURONCORE}" in reason
    assert core.read_namespaced_pod("greedy", namespace).status.phase == "Pending"


def test_two_pods_of_two_cores_fit_a_12_core_node(cluster: SimulatedCluster, namespace: str) -> None:
    core = client.CoreV1Api(cluster.api)
    placement = dedicated_node(cluster, "inf2.24xlarge")
    for i in range(2):
        core.create_namespaced_pod(namespace, pod(f"two-{i}", ["sleep", "60"], cores=2, **placement))
    for i in range(2):
        wait_for(lambda i=i: core.read_namespaced_pod(f"two-{i}", namespace).spec.node_name, what="binding")


def test_three_pods_of_eight_cores_do_not_fit_a_12_core_node(cluster: SimulatedCluster, namespace: str) -> None:
    core = client.CoreV1Api(cluster.api)
    placement = dedicated_node(cluster, "inf2.24xlarge")
    for i in range(3):
        core.create_namespaced_pod(namespace, pod(f"eight-{i}", ["sleep", "60"], cores=8, **placement))

    def outcome() -> tuple[int, list[str]] | None:
        pods = core.list_namespaced_pod(namespace).items
        bound = [p for p in pods if p.spec.node_name]
        reasons = [r for p in pods if not p.spec.node_name and (r := pending_reason(core, namespace, p.metadata.name))]
        return (len(bound), reasons) if len(bound) + len(reasons) == 3 else None

    bound, reasons = wait_for(outcome, what="one pod bound and two refused")
    assert bound == 1
    assert all(f"Insufficient {NEURONCORE}" in r for r in reasons)


# The node agent -------------------------------------------------------------------------------------------------


def job(name: str, command: list[str]) -> dict[str, Any]:
    template = pod(name, command, container={"terminationMessagePolicy": "FallbackToLogsOnError"})
    return {"metadata": {"name": name}, "spec": {"backoffLimit": 0, "template": template}}


def job_pods(core: client.CoreV1Api, namespace: str, name: str) -> list[Any]:
    return core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items


def test_agent_runs_a_job_to_completion(cluster: SimulatedCluster, namespace: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir(mode=0o777)
    spec = job("hello", ["sh", "-c", "echo hello from $POD > /work/greeting"])
    container = spec["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    container["volumeMounts"] = [{"name": "work", "mountPath": "/work"}]
    spec["spec"]["template"]["spec"]["volumes"] = [{"name": "work", "hostPath": {"path": str(out)}}]
    client.BatchV1Api(cluster.api).create_namespaced_job(namespace, spec)
    batch = client.BatchV1Api(cluster.api)
    wait_for(lambda: batch.read_namespaced_job("hello", namespace).status.succeeded, what="job to succeed")
    pod_name = job_pods(client.CoreV1Api(cluster.api), namespace, "hello")[0].metadata.name
    assert (out / "greeting").read_text() == f"hello from {pod_name}\n"


def test_agent_reports_a_failing_command_with_its_message(cluster: SimulatedCluster, namespace: str) -> None:
    core = client.CoreV1Api(cluster.api)
    client.BatchV1Api(cluster.api).create_namespaced_job(
        namespace, job("boom", ["sh", "-c", "echo preparing; echo 'error: NeuronOp x is broken' >&2; exit 3"])
    )

    def failed() -> Any:
        pods = job_pods(core, namespace, "boom")
        return pods and pods[0].status.phase == "Failed" and pods[0]

    failed_pod = wait_for(failed, what="failed pod")
    terminated = failed_pod.status.container_statuses[0].state.terminated
    assert terminated.exit_code == 3 and terminated.reason == "Error"
    assert terminated.message.splitlines() == ["preparing", "error: NeuronOp x is broken"]
    batch = client.BatchV1Api(cluster.api)
    wait_for(lambda: batch.read_namespaced_job("boom", namespace).status.failed, what="job failure")


def test_agent_reports_a_missing_executable(cluster: SimulatedCluster, namespace: str) -> None:
    core = client.CoreV1Api(cluster.api)
    core.create_namespaced_pod(namespace, pod("missing", ["no-such-binary-here"]))
    wait_for(lambda: core.read_namespaced_pod("missing", namespace).status.phase == "Failed", what="failure")
    state = core.read_namespaced_pod("missing", namespace).status.container_statuses[0].state.terminated
    assert state.exit_code == 127


# What the rewrite Job's pod asks for (the operator's POD_SECURITY): non-root, fsGroup, no volume ownership change.
NON_ROOT = {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532}
IRSA_ROLE = "arn:aws:iam::111122223333:role/model-reader"


def writable_by_all(path: Path) -> Path:
    path.mkdir()
    path.chmod(0o777)  # mkdir's mode goes through the umask
    return path


def with_volume(name: str, command: list[str], host: Path, mount: dict[str, Any], **spec: Any) -> dict[str, Any]:
    """A pod whose container mounts the hostPath ``host`` (``mount``: mountPath, subPath...) and reports its logs as
    its termination message when it fails."""
    container = {"terminationMessagePolicy": "FallbackToLogsOnError", "volumeMounts": [{"name": "v", **mount}]}
    container.update(spec.pop("container", {}))
    return pod(name, command, container=container, volumes=[{"name": "v", "hostPath": {"path": str(host)}}], **spec)


def finished(core: client.CoreV1Api, namespace: str, name: str) -> Any:
    """The container's terminated state once the pod has Succeeded or Failed."""

    def done() -> Any:
        found = core.read_namespaced_pod(name, namespace)
        return found.status.phase in ("Succeeded", "Failed") and found.status.container_statuses[0].state.terminated

    return wait_for(done, what=f"pod {name} to finish")


def test_agent_runs_the_command_as_the_containers_user_and_groups(
    cluster: SimulatedCluster, namespace: str, tmp_path: Path
) -> None:
    """The container's runAsUser over the pod's, runAsGroup, and fsGroup and supplementalGroups as supplementary
    groups, as the kubelet asks the runtime. (The 0700 tmp_path above ``out`` is traversed: reads are lenient.)"""
    core = client.CoreV1Api(cluster.api)
    out = writable_by_all(tmp_path / "out")
    security = {"runAsUser": 1111, "runAsGroup": 2345, "fsGroup": 4567, "supplementalGroups": [3456]}
    spec = with_volume(
        "ids",
        ["sh", "-c", "{ id -u; id -g; id -G; } > /out/ids"],
        out,
        {"mountPath": "/out"},
        container={"securityContext": {"runAsUser": 1234}},
        securityContext=security,
    )
    core.create_namespaced_pod(namespace, spec)
    assert finished(core, namespace, "ids").exit_code == 0
    uid, gid, groups = (out / "ids").read_text().splitlines()
    assert (uid, gid) == ("1234", "2345")
    assert set(groups.split()) == {"2345", "3456", "4567"}
    written = (out / "ids").stat()
    assert (written.st_uid, written.st_gid) == (1234, 2345)


def test_a_non_root_pod_cannot_write_into_a_root_owned_volume(
    cluster: SimulatedCluster, namespace: str, tmp_path: Path
) -> None:
    """As on NFS, FSx or a static EFS volume whose root is root's: fsGroup changes nothing there, the write fails."""
    core = client.CoreV1Api(cluster.api)
    store = tmp_path / "store"
    store.mkdir()
    store.chmod(0o755)
    command = ["sh", "-c", "mkdir /store/model"]
    core.create_namespaced_pod(
        namespace, with_volume("writer", command, store, {"mountPath": "/store"}, securityContext=NON_ROOT)
    )
    state = finished(core, namespace, "writer")
    assert state.exit_code != 0 and "Permission denied" in state.message, state
    assert not (store / "model").exists()


def test_run_as_non_root_is_refused_as_the_kubelet_refuses_it(
    cluster: SimulatedCluster, namespace: str, tmp_path: Path
) -> None:
    """runAsUser 0, and no runAsUser (the image's user: every image counts as running as root): the container waits
    with CreateContainerConfigError and the kubelet's words (kuberuntime verifyRunAsNonRoot), and never starts."""
    core = client.CoreV1Api(cluster.api)
    out = writable_by_all(tmp_path / "out")
    cases = {
        "uid-zero": ({"runAsNonRoot": True, "runAsUser": 0}, "container's runAsUser breaks non-root policy"),
        "image-user": ({"runAsNonRoot": True}, "container has runAsNonRoot and image will run as root"),
    }
    for name, (security, _) in cases.items():
        command = ["sh", "-c", f"touch /out/{name}"]
        spec = with_volume(name, command, out, {"mountPath": "/out"}, container={"securityContext": security})
        core.create_namespaced_pod(namespace, spec)

    def refused(name: str) -> Any:
        statuses = core.read_namespaced_pod(name, namespace).status.container_statuses
        waiting = statuses and statuses[0].state.waiting
        return waiting and waiting.reason == "CreateContainerConfigError" and waiting

    for name, (_, words) in cases.items():
        waiting = wait_for(lambda name=name: refused(name), what=f"{name} refused")
        found = core.read_namespaced_pod(name, namespace)
        assert waiting.message == f'{words} (pod: "{name}_{namespace}({found.metadata.uid})", container: main)'
        assert found.status.phase == "Pending"
        assert not (out / name).exists()


def test_a_missing_subpath_is_created_by_root_with_the_mode_of_the_volume_root(
    cluster: SimulatedCluster, namespace: str, tmp_path: Path
) -> None:
    """The kubelet's SafeMakeDir: root-owned, the volume root's mode; a non-root pod writes there only if it may
    write the volume's root."""
    core = client.CoreV1Api(cluster.api)
    roots = {"locked": 0o751, "open": 0o777}
    for name, mode in roots.items():
        (tmp_path / name).mkdir()
        (tmp_path / name).chmod(mode)
        mount = {"mountPath": "/data", "subPath": "team/model"}
        command = ["sh", "-c", "touch /data/written"]
        spec = with_volume(name, command, tmp_path / name, mount, securityContext=NON_ROOT)
        core.create_namespaced_pod(namespace, spec)
    for name, mode in roots.items():
        state = finished(core, namespace, name)
        created = tmp_path / name / "team" / "model"
        for directory in (created, created.parent):
            assert (directory.stat().st_uid, directory.stat().st_gid) == (0, 0), directory
        assert stat.S_IMODE(created.stat().st_mode) == mode  # exactly, whatever the umask
        if name == "locked":
            assert state.exit_code != 0 and "Permission denied" in state.message, state
        else:
            assert state.exit_code == 0, state
            assert (created / "written").stat().st_uid == 65532


def test_read_only_root_filesystem_leaves_home_and_working_directory_unwritable(
    cluster: SimulatedCluster, namespace: str
) -> None:
    """HOME and the working directory stand for the root filesystem: read-only (EROFS, for root too) with
    readOnlyRootFilesystem, the container's user's without."""
    core = client.CoreV1Api(cluster.api)
    script = 'touch "$HOME/in-home"; home=$?; touch in-working-directory; exit $((home + $?))'
    cases = {
        "read-only": ({"readOnlyRootFilesystem": True}, NON_ROOT),
        "read-only-root-user": ({"readOnlyRootFilesystem": True}, {}),
        "writable": ({"readOnlyRootFilesystem": False}, NON_ROOT),
    }
    for name, (container_security, pod_security) in cases.items():
        container = {"securityContext": container_security, "terminationMessagePolicy": "FallbackToLogsOnError"}
        core.create_namespaced_pod(
            namespace, pod(name, ["sh", "-c", script], container=container, securityContext=pod_security)
        )
    for name in ("read-only", "read-only-root-user"):
        state = finished(core, namespace, name)
        assert state.exit_code != 0 and state.message.count("Read-only file system") == 2, state
    assert finished(core, namespace, "writable").exit_code == 0


def test_irsa_pods_get_the_clusters_region_unless_they_set_one(
    cluster: SimulatedCluster, namespace: str, tmp_path: Path
) -> None:
    """EKS's pod identity webhook (the real one, beside the apiserver): AWS_REGION and AWS_DEFAULT_REGION only into a
    container that sets neither, and the role into each, which the node agent's process sees."""
    core = client.CoreV1Api(cluster.api)
    account = {"metadata": {"name": "reader", "annotations": {"eks.amazonaws.com/role-arn": IRSA_ROLE}}}
    core.create_namespaced_service_account(namespace, account)
    out = writable_by_all(tmp_path / "out")
    cases = {
        "plain": [],
        "own-region": [{"name": "AWS_REGION", "value": "eu-west-1"}],
        "own-default-region": [{"name": "AWS_DEFAULT_REGION", "value": "ap-south-1"}],
    }
    for name, env in cases.items():
        command = ["sh", "-c", f'echo "$AWS_ROLE_ARN,$AWS_REGION,$AWS_DEFAULT_REGION" > /out/{name}']
        spec = with_volume(
            name,
            command,
            out,
            {"mountPath": "/out"},
            container={"env": env},
            serviceAccountName="reader",
            automountServiceAccountToken=False,  # no need to wait for the account's token
        )
        core.create_namespaced_pod(namespace, spec)
    for name in cases:
        assert finished(core, namespace, name).exit_code == 0
    region = AWS_REGION  # the webhook's --aws-default-region, the region of the tests' S3 (tests/operator/s3.py)
    assert (out / "plain").read_text() == f"{IRSA_ROLE},{region},{region}\n"
    assert (out / "own-region").read_text() == f"{IRSA_ROLE},eu-west-1,\n"
    assert (out / "own-default-region").read_text() == f"{IRSA_ROLE},,ap-south-1\n"


def serving_pod(name: str, base: Path, cores: int) -> dict[str, Any]:
    spec = pod(
        name,
        ["tensorflow_model_server_neuronx", "--port=8500", "--rest_api_port=8501", "--model_name=m",
         "--model_base_path=/models/m"],
        cores=cores,
        container={"volumeMounts": [{"name": "models", "mountPath": "/models/m", "readOnly": True}]},
    )  # fmt: skip
    spec["spec"]["restartPolicy"] = "Always"
    spec["spec"]["volumes"] = [{"name": "models", "hostPath": {"path": str(base)}}]
    return spec


def test_serving_pod_is_ready_only_with_a_model_tagged_for_its_cores(
    cluster: SimulatedCluster, namespace: str, tmp_path: Path
) -> None:
    core = client.CoreV1Api(cluster.api)
    compiled = write_model(tmp_path / "compiled", saved_model())
    base = tmp_path / "base"
    base.mkdir()
    rewrite_model(compiled, base / "1", 2)
    core.create_namespaced_pod(namespace, serving_pod("good", base, 2))
    core.create_namespaced_pod(namespace, serving_pod("wrong-cores", base, 1))

    def ready(name: str) -> bool:
        conditions = core.read_namespaced_pod(name, namespace).status.conditions or []
        return any(c.type == "Ready" and c.status == "True" for c in conditions)

    wait_for(lambda: ready("good"), what="serving pod ready")
    good = core.read_namespaced_pod("good", namespace)
    assert good.status.phase == "Running" and good.status.pod_ip

    def waiting() -> Any:
        statuses = core.read_namespaced_pod("wrong-cores", namespace).status.container_statuses
        return statuses and statuses[0].state.waiting

    state = wait_for(waiting, what="crash-looping serving pod")
    assert state.reason == "CrashLoopBackOff"
    assert "_automatic_multicore=2 but the pod has 1 aws.amazon.com/neuroncore" in state.message
    assert not ready("wrong-cores")
    # Once a version tagged for one core appears, the server loads it (the newest version wins).
    rewrite_model(compiled, base / "2", 1)
    wait_for(lambda: ready("wrong-cores"), what="pod ready after a matching version appears")


def test_graceful_deletion_terminates_then_removes_the_pod(
    cluster: SimulatedCluster, namespace: str, tmp_path: Path
) -> None:
    core = client.CoreV1Api(cluster.api)
    marker = tmp_path / "marker"
    tmp_path.chmod(0o777)
    script = f"trap 'echo TERM > {marker}; exit 0' TERM; while true; do sleep 0.1; done"
    core.create_namespaced_pod(namespace, pod("graceful", ["sh", "-c", script]))
    wait_for(lambda: core.read_namespaced_pod("graceful", namespace).status.phase == "Running", what="running")
    core.delete_namespaced_pod("graceful", namespace, grace_period_seconds=10)

    def gone() -> bool:
        return not core.list_namespaced_pod(namespace, field_selector="metadata.name=graceful").items

    wait_for(gone, timeout=30, what="pod removed")
    assert marker.read_text() == "TERM\n"


def test_an_evicted_pod_is_reported_failed_with_its_exit_and_disruption_before_it_goes(
    cluster: SimulatedCluster, namespace: str
) -> None:
    """As a kubelet: the stopped container's exit (128 + SIGTERM) and the pod's terminal phase, with the condition
    the apiserver set on eviction kept: what a Job's pod failure policy waits for and matches. A finalizer (as the
    Job controller's) keeps the pod to be read."""
    core = client.CoreV1Api(cluster.api)
    body = pod("evicted", ["sh", "-c", "while true; do sleep 0.1; done"])
    body["metadata"]["finalizers"] = ["test.neuron.dev/keep"]
    core.create_namespaced_pod(namespace, body)
    wait_for(lambda: core.read_namespaced_pod("evicted", namespace).status.phase == "Running", what="running")
    eviction = client.V1Eviction(metadata=client.V1ObjectMeta(name="evicted", namespace=namespace))
    core.create_namespaced_pod_eviction("evicted", namespace, eviction)

    def terminal() -> Any:
        got = core.read_namespaced_pod("evicted", namespace)
        return got if got.status.phase in ("Succeeded", "Failed") else None

    stopped = wait_for(terminal, timeout=30, what="the pod's terminal phase")
    assert stopped.status.phase == "Failed"
    assert stopped.status.container_statuses[0].state.terminated.exit_code == 143
    disruption = next(c for c in stopped.status.conditions if c.type == "DisruptionTarget")
    assert (disruption.status, disruption.reason) == ("True", "EvictionByEvictionAPI")
    core.patch_namespaced_pod("evicted", namespace, {"metadata": {"finalizers": None}})
    wait_for(
        lambda: not core.list_namespaced_pod(namespace, field_selector="metadata.name=evicted").items,
        what="pod removed",
    )


def test_teardown_leaves_no_process_behind() -> None:
    with SimulatedCluster(nodes={"inf2.xlarge": 1}) as simcluster:
        pids = simcluster.cluster.pids()
        assert len(pids) == 4
        assert simcluster.identity_webhook is not None and simcluster.identity_webhook.process is not None
        pids.append(simcluster.identity_webhook.process.popen.pid)
        workdir = simcluster.cluster.workdir
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"process {pid} still running"
    assert workdir is not None and not workdir.exists()


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_kubectl_works_with_the_kubeconfig(cluster: SimulatedCluster) -> None:
    out = cluster.cluster.kubectl("get", "nodes", "-o", "name")
    assert "node/inf2-xlarge-0" in out.stdout.split()
    assert os.path.exists(cluster.kubeconfig)
