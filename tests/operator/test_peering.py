"""Several operator replicas (Kopf peering, as the Helm chart runs them with replicas > 1) are safe together.

Kopf's peering pauses replicas of lower priority, but a pause only follows the peering object's watch events,
so for a while two replicas may both act. Safety must not depend on it: every child has a name derived from the
model and what decides it, a create that finds the object already there is a no-op, and updates compare a hash
of the desired spec. So the replicas together create each child once.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import REPO, Env, neuron_model, wait_for

pytestmark = pytest.mark.cluster
PEERING_CRDS = REPO / "charts" / "neuronmodel-operator" / "crds" / "kopfpeering.yaml"


def test_two_replicas_in_a_peering_create_each_child_once(env: Env, models: dict[str, Path]) -> None:
    env.cluster.cluster.kubectl("apply", "-f", str(PEERING_CRDS))
    wait_for(lambda: env.cluster.cluster.kubectl("get", "kopfpeerings", "-A", check=False).returncode == 0)
    peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "neuronmodel-operator"}}
    assert env.apply(peering).returncode == 0
    env.stop_operator()  # the fixture's standalone operator
    logs = [env.start_replica("neuronmodel-operator", priority=p) for p in (200, 100)]

    env.hostpath_claim("compiled", models["resnet50"])
    for name in ("peered-a", "peered-b"):
        assert env.apply(neuron_model(name, "compiled", cores=1, replicas=2)).returncode == 0
    for name in ("peered-a", "peered-b"):
        env.wait_phase(name, "Ready")
    env.patch_spec("peered-a", {"replicas": 1, "numCores": 2})  # an update too, not only creates
    wait_for(lambda: env.status("peered-a").get("servedCores") == 2 and env.status("peered-a")["phase"] == "Ready")
    time.sleep(3)

    jobs = sorted(j.metadata.name for j in env.jobs())
    assert len(jobs) == 2 and {j.split("-rewrite-")[0] for j in jobs} == {"peered-a", "peered-b"}, jobs
    deployments = env.apps.list_namespaced_deployment(env.namespace).items
    assert sorted(d.metadata.name for d in deployments) == ["peered-a", "peered-b"]
    assert env.apps.read_namespaced_deployment("peered-a", env.namespace).spec.replicas == 1
    text = "".join(log.read_text() for log in logs)
    assert "Traceback" not in text, text[-3000:]
    assert "created Job" in text
