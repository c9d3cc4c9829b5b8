"""Every manifest in examples/ is applied, unchanged, on the local control plane and reaches Ready."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO, Env, LocalS3, wait_for
from localcluster.s3server import refusals, upload_tree

pytestmark = pytest.mark.cluster
EXAMPLES = REPO / "examples"


def test_every_example_is_applied_and_goes_ready(env: Env, models: dict[str, Path], local_s3: LocalS3) -> None:
    assert {p.name for p in EXAMPLES.glob("*.yaml")} == {
        "store-pvc.yaml",
        "resnet50-inf2.yaml",
        "bert-trn1.yaml",
        "s3-irsa.yaml",
        "resnet50-hpa.yaml",
    }, "a new example needs its place in this test"
    # The volumes a cluster admin (or the EFS CSI driver) provides behind the examples' claims.
    env.hostpath_claim("compiled-models", models["resnet50"].parent, storage_class="efs-sc", create_claim=False)
    env.hostpath_claim("neuron-model-store", env.tmp / "store", storage_class="efs-sc", create_claim=False)
    upload_tree(local_s3.endpoint, "my-neuron-models", "resnet50/", models["resnet50"])

    for example in ("store-pvc.yaml", "resnet50-inf2.yaml", "bert-trn1.yaml", "s3-irsa.yaml", "resnet50-hpa.yaml"):
        result = env.cluster.cluster.kubectl("apply", "-n", env.namespace, "-f", str(EXAMPLES / example), check=False)
        assert result.returncode == 0, result.stderr

    # No metrics adapter here: the HPA controller still holds the model at its minReplicas, through the NeuronModel.
    resnet = wait_for(
        lambda: (s := env.status("resnet50")).get("readyReplicas") == 2 and s.get("phase") == "Ready" and s,
        timeout=180,
        what="the HPA's minimum of 2 resnet50 pods Ready",
    )
    assert resnet["servedCores"] == 2 and env.model("resnet50")["spec"]["replicas"] == 2
    bert = env.wait_phase("bert", "Ready", timeout=180)
    assert bert["servedCores"] == 8 and bert["readyReplicas"] == 4
    assert bert["endpoints"]["rest"].endswith("/v1/models/bert-base")
    s3_model = env.wait_phase("resnet50-s3", "Ready", timeout=180)
    assert s3_model["servedCores"] == 1 and s3_model["readyReplicas"] == 2

    nodes = {n.metadata.name: n.metadata.labels["node.kubernetes.io/instance-type"] for n in env.core.list_node().items}
    pods = env.core.list_namespaced_pod(env.namespace, label_selector="app.kubernetes.io/component=serving").items
    placed = {(p.metadata.labels["serving.neuron.dev/model"], nodes[p.spec.node_name]) for p in pods}
    assert ("resnet50", "inf2.xlarge") in placed and ("bert", "trn1.32xlarge") in placed
    assert not {t for m, t in placed if m == "bert"} - {"trn1.32xlarge"}
    batching = env.core.read_namespaced_config_map("bert-batching", env.namespace).data["batching.config"]
    assert "max_batch_size { value: 16 }" in batching
    # The S3 model was read in place by the rewrite, with the service account's (IRSA) identity: no scratch volume.
    job = env.batch.read_namespaced_job(s3_model["rewrite"]["job"], env.namespace)
    assert not job.spec.template.spec.init_containers
    assert [v.name for v in job.spec.template.spec.volumes] == ["store"]
    assert job.spec.template.spec.containers[0].command[1] == "s3://my-neuron-models/resnet50/"
    assert job.spec.template.spec.service_account_name == "model-reader"
    assert refusals(local_s3.log) == []  # every request signed for the bucket's region
