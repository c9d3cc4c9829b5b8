"""Several operator replicas (Kopf peering, as the Helm chart runs them with replicas > 1) are safe together.

Kopf's peering pauses replicas of lower priority once the peering object shows them a higher one, which the test
checks. Before that (a replica starting while the other works) both may act for a moment, so safety must not
depend on the pause: every child has a name derived from the model and what decides it, a create that finds the
object already there is a no-op, and updates compare a hash of the desired spec. So each child is created once.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO, Env, neuron_model, wait_for

pytestmark = pytest.mark.cluster
PEERING_CRDS = REPO / "charts" / "neuronmodel-operator" / "crds" / "kopfpeering.yaml"


def test_two_replicas_in_a_peering_create_each_child_once(env: Env, models: dict[str, Path]) -> None:
    env.cluster.cluster.kubectl("apply", "-f", str(PEERING_CRDS))
    wait_for(lambda: env.cluster.cluster.kubectl("get", "kopfpeerings", "-A", check=False).returncode == 0)
    peering_name = "neuronmodel-operator"
    peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": peering_name}}
    assert env.apply(peering).returncode == 0
    env.stop_operator()  # the fixture's standalone operator
    logs = [env.start_replica(peering_name, priority=p) for p in (200, 100)]

    def peers() -> dict:
        obj = env.custom.get_namespaced_custom_object("kopf.dev", "v1", env.namespace, "kopfpeerings", peering_name)
        return obj.get("status") or {}

    wait_for(lambda: len(peers()) == 2, what="both replicas in the peering")
    assert sorted(p["priority"] for p in peers().values()) == [100, 200]
    # The lower one has seen the higher one (Kopf logs its pause): from now on it stands by.
    wait_for(lambda: "Pausing operations in favour of" in logs[1].read_text(), what="the lower replica paused")

    env.hostpath_claim("compiled", models["resnet50"])
    for name in ("peered-a", "peered-b"):
        assert env.apply(neuron_model(name, "compiled", cores=1, replicas=2)).returncode == 0
    for name in ("peered-a", "peered-b"):
        env.wait_phase(name, "Ready")
    env.patch_spec("peered-a", {"replicas": 1, "numCores": 2})  # an update too, not only creates
    wait_for(lambda: env.status("peered-a").get("servedCores") == 2 and env.status("peered-a")["phase"] == "Ready")
    wait_for(lambda: len(env.jobs()) == 2, what="the superseded Job deleted")

    jobs = sorted(j.metadata.name for j in env.jobs())
    assert len(jobs) == 2 and {j.split("-rewrite-")[0] for j in jobs} == {"peered-a", "peered-b"}, jobs
    deployments = env.apps.list_namespaced_deployment(env.namespace).items
    assert sorted(d.metadata.name for d in deployments) == ["peered-a", "peered-b"]
    assert env.apps.read_namespaced_deployment("peered-a", env.namespace).spec.replicas == 1
    high, low = (log.read_text() for log in logs)
    assert "Traceback" not in high + low, (high + low)[-3000:]
    # Once both are in the peering, the lower priority stands by: the higher one did all the work.
    assert "created Job" in high and " phase " in high
    assert "created " not in low and " phase " not in low, low[-3000:]
