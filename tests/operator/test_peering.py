"""Several operator replicas (Kopf peering, as the Helm chart runs them with replicas > 1) are safe together.

With mandatory peering Kopf starts every replica paused and resumes it only once the peering object shows no live
replica of higher priority. The test starts the higher one first, so the lower one's first look at the peering
already shows it: the lower one must never resume while the higher one lives. In other orders (a replica starting
while another works) both may act for a moment, so safety must not depend on the pause: every child has a name
derived from the model and what decides it, a create that finds the object already there is a no-op, and updates
compare a hash of the desired spec. So each child is created once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import REPO, Env, neuron_model, wait_for

pytestmark = pytest.mark.cluster
PEERING_CRDS = REPO / "charts" / "neuronmodel-operator" / "crds" / "kopfpeering.yaml"


PEERING = "neuronmodel-operator"


def peering_priorities(env: Env) -> Callable[[], list[int]]:
    """Create the peering object (the fixture's standalone operator stops); return what reads its replicas."""
    env.cluster.cluster.kubectl("apply", "-f", str(PEERING_CRDS))
    wait_for(lambda: env.cluster.cluster.kubectl("get", "kopfpeerings", "-A", check=False).returncode == 0)
    peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": PEERING}}
    assert env.apply(peering).returncode == 0
    env.stop_operator()

    def priorities() -> list[int]:
        obj = env.custom.get_namespaced_custom_object("kopf.dev", "v1", env.namespace, "kopfpeerings", PEERING)
        return sorted(peer["priority"] for peer in (obj.get("status") or {}).values())

    return priorities


def start_working_replica(env: Env, priority: int, priorities: Callable[[], list[int]]) -> Path:
    """A replica that is in the peering and at work (the highest so far); returns its log."""
    log = env.start_replica(PEERING, priority=priority)
    wait_for(lambda: priority in priorities(), what=f"the replica of priority {priority} in the peering")
    wait_for(lambda: "Resuming operations" in log.read_text(), what=f"the replica of priority {priority} at work")
    return log


def test_two_replicas_in_a_peering_create_each_child_once(env: Env, models: dict[str, Path]) -> None:
    priorities = peering_priorities(env)
    logs = [start_working_replica(env, 200, priorities), env.start_replica(PEERING, priority=100)]
    wait_for(lambda: priorities() == [100, 200], what="both replicas in the peering")

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
    # The lower priority stood by from its start: the higher one did all the work.
    assert "created Job" in high and " phase " in high
    assert "Resuming operations" not in low and "created " not in low and " phase " not in low, low[-3000:]


def test_a_retry_scheduled_before_the_pause_leaves_the_model_to_the_higher_replica(
    env: Env, models: dict[str, Path]
) -> None:
    """Retries run on timers outside Kopf: one due after Kopf paused the replica must not act (on stale indexes)."""
    priorities = peering_priorities(env)
    low = start_working_replica(env, 100, priorities)
    env.hostpath_claim("compiled", models["resnet50"])
    toleration = {"key": "aws.amazon.com/neuron", "operator": "Equals"}  # the API refuses it: retried with back-off
    assert env.apply(neuron_model("refused", "compiled", tolerations=[toleration])).returncode == 0
    wait_for(lambda: "reconcile of" in low.read_text() and "retrying in" in low.read_text(), what="a retry scheduled")

    high = start_working_replica(env, 200, priorities)
    wait_for(lambda: "Pausing operations in favour of" in low.read_text(), what="the lower replica paused")
    paused_at = low.read_text().index("Pausing operations in favour of")
    # The back-off is at most a minute: the pending retry fires, finds the higher replica alive and stands by.
    wait_for(
        lambda: f"standing by for {env.namespace}/refused" in low.read_text()[paused_at:],
        timeout=90,
        what="the retry standing by",
    )
    after_pause = low.read_text()[paused_at:]
    assert "retrying in" not in after_pause and "created " not in after_pause, after_pause
    assert "retrying in" in high.read_text()  # the model is not forgotten: the higher replica retries it
