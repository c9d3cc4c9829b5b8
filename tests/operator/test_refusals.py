"""A child the client refuses before sending it is told like one the apiserver refuses: field by field."""

from __future__ import annotations

import pytest
from kubernetes import client
from unit_helpers import make_model

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
