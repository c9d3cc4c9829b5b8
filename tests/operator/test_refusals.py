"""Refusals: a child the client refuses before sending it is told like one the apiserver refuses, field by field;
a model the rewrite refuses fails its Job at once, told in the rewrite's own words."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from kubernetes import client
from unit_helpers import make_model

from conftest import Env, neuron_model, wait_for
from neuronmodel_operator.builders import serving_deployment
from neuronmodel_operator.config import OperatorConfig
from neuronmodel_operator.reconcile import Api, ChildRefused


def test_a_body_the_client_refuses_names_each_field() -> None:
    # Nothing listens there: the client's own check must refuse the body before any connection.
    api = Api(client.ApiClient(client.Configuration(host="http://127.0.0.1:9")))
    model = make_model(serving={"image": "tfs", "env": [{"nmae": "TF_CPP_MIN_LOG_LEVEL", "value": "1"}]})
    deployment = serving_deployment(model, OperatorConfig(), model.rewrite_id())
    with pytest.raises(ChildRefused) as refused:
        api.create(deployment)
    assert refused.value.reason == "ChildRejected"
    assert str(refused.value).startswith("the client refused to create Deployment resnet50: ")
    assert "spec.template.spec.containers.0.env.0.name: Field required" in str(refused.value)


# The Job controller's back-off before a failed rewrite's second and third pods (10 s, then 20 s): a Job that failed
# sooner after its creation did not retry.
JOB_BACKOFF = timedelta(seconds=30)


@pytest.mark.cluster
def test_a_model_the_rewrite_refuses_fails_at_once_with_one_pod_and_the_rewrites_line(env: Env, tmp_path: Path) -> None:
    (tmp_path / "upload").mkdir()
    (tmp_path / "upload" / "model.onnx").write_bytes(b"not a SavedModel")  # the wrong export uploaded
    env.hostpath_claim("compiled", tmp_path / "upload")
    assert env.apply(neuron_model("wrong", "compiled", cores=1)).returncode == 0  # backoffLimit: the default 2
    env.wait_phase("wrong", "Failed", timeout=60)

    (job,) = env.jobs()
    failed = next(c for c in job.status.conditions if c.type == "Failed" and c.status == "True")
    assert failed.reason == "PodFailurePolicy", failed
    assert failed.last_transition_time - job.metadata.creation_timestamp < JOB_BACKOFF
    assert job.status.failed == 1
    (pod,) = env.core.list_namespaced_pod(
        env.namespace, label_selector=f"batch.kubernetes.io/job-name={job.metadata.name}"
    ).items
    assert pod.status.container_statuses[0].state.terminated.exit_code == 3  # InvalidModelError

    line = "not a SavedModel (no saved_model.pb) nor a TF Serving base path (no numbered version folder)"
    ready = env.condition("wrong", "Ready")
    assert ready["reason"] == "RewriteFailed", ready
    assert ready["message"].startswith(f"rewrite Job {job.metadata.name} failed (PodFailurePolicy): "), ready
    assert line in ready["message"], ready

    def event() -> list[str]:
        events = env.core.list_namespaced_event(env.namespace, field_selector="involvedObject.name=wrong").items
        return [e.message for e in events if e.reason == "RewriteFailed" and e.type == "Warning"]

    assert f"Failed: {ready['message']}" in wait_for(event, what="the RewriteFailed Event")
